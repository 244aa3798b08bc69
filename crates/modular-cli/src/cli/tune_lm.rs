//! `modular tune` on a Llama-family decoder folder: LoRA (Hu et al. 2021,
//! `y = xWᵀ + (α/r)·x AᵀBᵀ`, `α = 2r`) on the attention projections
//! `q_proj`, `k_proj`, `v_proj`, `o_proj`, trained on the next-token loss
//!
//! ```text
//! L = −1/N Σ_{(b,t): m_bt = m_b,t+1 = 1} log p(x_{b,t+1} | x_{b,≤t})
//! ```
//!
//! of a JSONL corpus (`{"text": ...}` lines) with AdamW, and written as a
//! PEFT LoRA folder that `modular generate --adapters` and Python PEFT load.
//! 10% of the lines (seeded) are held out; `tune.json` records the options,
//! the training loss per epoch and the held-out loss before and after.

use std::path::Path;

use model_zoo::llama::LlamaForCausalLM;
use model_zoo::tokenizer::TextTokenizer;
use pet_core::{
    LoraConfig, add_lora, mark_only_adapters_trainable, save_adapter, trainable_report,
};
use serde_json::{Value, json};
use tensor_core::module::{Context, ModuleExt};
use tensor_core::tch::{self, Device, Kind, Reduction, Tensor};
use tensor_core::train::SplitMix64;
use tensor_core::train::optim::{AdamW, AdamWConfig};

use super::{AnyResult, AtomicDir, Flags, progress};

/// The adapter's name in the model (the folder holds no name).
const ADAPTER: &str = "task";

/// What the run needs from the command line.
pub struct LmOptions {
    pub rank: i64,
    pub epochs: usize,
    pub lr: f64,
    pub batch: usize,
    pub max_len: usize,
    pub seed: u64,
    pub train_limit: Option<usize>,
    pub quiet: bool,
    pub force: bool,
}

fn read_texts(path: &Path) -> AnyResult<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("data {}: cannot read: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("{at}: not valid JSON: {e}"))?;
        let t = v
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}: needs a string field \"text\""))?;
        out.push(t.to_owned());
    }
    if out.len() < 2 {
        return Err(format!(
            "data {} holds {} text(s); language-model tuning needs at least 2 (one is held out)",
            path.display(),
            out.len()
        )
        .into());
    }
    Ok(out)
}

/// Token ids `[B, T]` and mask of `texts`, each cut to `max_len` tokens and
/// left-padded with `pad`.
fn batch(
    tok: &TextTokenizer,
    texts: &[&String],
    max_len: usize,
    pad: i64,
) -> AnyResult<(Tensor, Tensor)> {
    let mut rows = Vec::with_capacity(texts.len());
    for t in texts {
        let mut ids = tok.encode_ids(t)?;
        ids.truncate(max_len);
        rows.push(ids);
    }
    let t = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in &rows {
        ids.extend(std::iter::repeat_n(pad, t - r.len()).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, t - r.len()).chain(std::iter::repeat_n(1, r.len())));
    }
    let shape = [rows.len() as i64, t as i64];
    Ok((
        Tensor::from_slice(&ids).f_view(shape)?,
        Tensor::from_slice(&mask).f_view(shape)?,
    ))
}

/// Mean next-token cross-entropy over the positions where both the token and
/// the next one are real, and how many there were.
fn lm_loss(
    model: &LlamaForCausalLM,
    ids: &Tensor,
    mask: &Tensor,
    train: bool,
) -> AnyResult<(Tensor, i64)> {
    let mut ctx = if train {
        Context::train()
    } else {
        Context::eval()
    };
    ctx.attention_mask = Some(mask.shallow_clone());
    let logits = ctx.call("", model, ids)?;
    let t = ids.size()[1];
    let v = logits.size()[2];
    let pred = logits.f_narrow(1, 0, t - 1)?.f_reshape([-1, v])?;
    let target = ids.f_narrow(1, 1, t - 1)?.f_reshape([-1])?;
    let keep = mask
        .f_narrow(1, 0, t - 1)?
        .f_mul(&mask.f_narrow(1, 1, t - 1)?)?
        .f_reshape([-1])?;
    let n = keep.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    // Positions to ignore get the target -100.
    let target = target.f_where_self(&keep.f_ne(0)?, &Tensor::from(-100i64))?;
    let loss = pred
        .f_to_kind(Kind::Float)?
        .f_cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, -100, 0.0)?;
    Ok((loss, n))
}

/// Mean held-out loss, token-weighted.
fn held_out_loss(model: &LlamaForCausalLM, batches: &[(Tensor, Tensor)]) -> AnyResult<f64> {
    let (mut sum, mut n) = (0.0, 0i64);
    for (ids, mask) in batches {
        let (l, k) = tch::no_grad(|| lm_loss(model, ids, mask, false))?;
        if k > 0 {
            sum += l.f_double_value(&[])? * k as f64;
            n += k;
        }
    }
    Ok(if n > 0 { sum / n as f64 } else { f64::NAN })
}

pub fn run(f: &Flags, model_dir: &Path, data: &Path, out: &Path, o: &LmOptions) -> AnyResult<()> {
    if !data.is_file() {
        return Err(format!(
            "data {}: language-model tuning reads one JSONL file of {{\"text\": ...}} lines",
            data.display()
        )
        .into());
    }
    f.out_not_input(out, &[("--data", data), ("--model", model_dir)])?;
    let mut texts = read_texts(data)?;
    let mut rng = SplitMix64::new(o.seed);
    for i in (1..texts.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        texts.swap(i, j);
    }
    let held = (texts.len() / 10).max(1);
    let (eval_texts, train_texts) = texts.split_at(held);
    let mut train_texts: Vec<&String> = train_texts.iter().collect();
    if let Some(n) = o.train_limit {
        train_texts.truncate(n);
    }
    let device = Device::Cpu;
    let mut model = LlamaForCausalLM::from_folder(model_dir, device)?;
    let c = model.config().clone();
    let tok = TextTokenizer::for_decoder(
        model_dir.join("tokenizer.json"),
        c.vocab_size,
        c.pad_token_id,
    )?;
    let pad = i64::from(tok.pad_id);
    let out_dir = AtomicDir::new(out, o.force)?;
    let mut cfg = LoraConfig::new(
        o.rank,
        2.0 * o.rank as f64,
        &["q_proj", "k_proj", "v_proj", "o_proj"],
    );
    cfg.seed = o.seed;
    add_lora(&mut model, ADAPTER, &cfg)?;
    mark_only_adapters_trainable(&mut model, &[], &[]);
    let report = trainable_report(&model);
    let mut opt = AdamW::new(model.trainable_parameters(), AdamWConfig::new(o.lr))?;
    let eval_refs: Vec<&String> = eval_texts.iter().collect();
    let eval_batches = eval_refs
        .chunks(o.batch)
        .map(|c| batch(&tok, c, o.max_len, pad))
        .collect::<AnyResult<Vec<_>>>()?;
    let before = held_out_loss(&model, &eval_batches)?;
    println!("modular tune (language model)");
    println!(
        "  model    {} ({:?}, {} layers)",
        model_dir.display(),
        c.family,
        c.num_hidden_layers
    );
    println!(
        "  data     {} ({} train, {} held out)",
        data.display(),
        train_texts.len(),
        eval_texts.len()
    );
    println!(
        "  lora     r {} alpha {} on q/k/v/o_proj; {report}",
        o.rank,
        2 * o.rank
    );
    let mut epoch_losses = Vec::new();
    tensor_core::seed::manual_seed(o.seed);
    for epoch in 0..o.epochs {
        let mut order: Vec<&String> = train_texts.clone();
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let chunks: Vec<&[&String]> = order.chunks(o.batch).collect();
        let pb = progress(
            chunks.len() as u64,
            &format!("epoch {}", epoch + 1),
            o.quiet,
        );
        let (mut sum, mut steps) = (0.0, 0usize);
        for ch in chunks {
            let (ids, mask) = batch(&tok, ch, o.max_len, pad)?;
            let (loss, n) = lm_loss(&model, &ids, &mask, true)?;
            if n == 0 {
                pb.inc(1);
                continue;
            }
            tensor_core::error::check_finite("tune", "loss", &loss)?;
            loss.f_backward()?;
            opt.step()?;
            opt.zero_grad()?;
            sum += loss.f_double_value(&[])?;
            steps += 1;
            pb.inc(1);
        }
        pb.finish_and_clear();
        let mean = sum / steps.max(1) as f64;
        println!("  epoch {}: train loss {mean:.4}", epoch + 1);
        epoch_losses.push(mean);
    }
    let after = held_out_loss(&model, &eval_batches)?;
    println!("  held-out loss {before:.4} -> {after:.4}");
    save_adapter(&model, ADAPTER, out_dir.path())?;
    let doc = json!({
        "format": "modular-tune-lm",
        "version": 1,
        "model": model_dir.display().to_string(),
        "data": data.display().to_string(),
        "method": "lora",
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rank": o.rank,
        "alpha": 2 * o.rank,
        "epochs": o.epochs,
        "lr": o.lr,
        "batch": o.batch,
        "max_len": o.max_len,
        "seed": o.seed,
        "train_examples": train_texts.len(),
        "held_out_examples": eval_texts.len(),
        "train_loss_per_epoch": epoch_losses,
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "trainable_params": report.trainable,
    });
    super::write_text(
        &out_dir.path().join("tune.json"),
        &serde_json::to_string_pretty(&doc)?,
    )?;
    out_dir.commit()?;
    println!(
        "  wrote    {} (a PEFT LoRA folder; modular generate --adapters NAME={})",
        out.display(),
        out.display()
    );
    Ok(())
}
