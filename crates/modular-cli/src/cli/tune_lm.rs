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
//! Batches are right-padded (`tensor_core::train::pad_batch`) in a seeded
//! order (`BatchPlan`); 10% of the lines (seeded) are held out; `tune.json` records the options,
//! the training loss per epoch and the held-out loss before and after.

use std::path::Path;

use model_zoo::data::load_texts;
use model_zoo::llama::LlamaForCausalLM;
use model_zoo::tokenizer::TextTokenizer;
use pet_core::{
    LoraConfig, add_lora, mark_only_adapters_trainable, save_adapter, trainable_report,
};
use serde_json::json;
use tensor_core::module::ModuleExt;
use tensor_core::tch::{self, Device};
use tensor_core::train::optim::{AdamW, AdamWConfig};
use tensor_core::train::{Batch, BatchPlan, SplitMix64, pad_batch};

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

/// Token ids of `texts` (the tokenizer's special tokens added), right-padded
/// with `pad` after each is cut to `max_len` tokens.
fn batch(tok: &TextTokenizer, texts: &[&String], max_len: usize, pad: i64) -> AnyResult<Batch> {
    let seqs = texts
        .iter()
        .map(|t| tok.encode_ids(t))
        .collect::<model_zoo::Result<Vec<_>>>()?;
    Ok(pad_batch(&seqs, pad, Some(max_len), Device::Cpu)?)
}

/// Mean held-out loss, token-weighted.
fn held_out_loss(model: &LlamaForCausalLM, batches: &[Batch]) -> AnyResult<f64> {
    let (mut sum, mut n) = (0.0, 0.0);
    for b in batches {
        let (l, k) = tch::no_grad(|| model.lm_loss(&b.input_ids, Some(&b.attention_mask), false))?;
        let k = k.f_double_value(&[])?;
        sum += l.f_double_value(&[])? * k;
        n += k;
    }
    Ok(if n > 0.0 { sum / n } else { f64::NAN })
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
    let mut texts = load_texts(data)?;
    if texts.len() < 2 {
        return Err(format!(
            "data {} holds {} text(s); language-model tuning needs at least 2 (one is held out)",
            data.display(),
            texts.len()
        )
        .into());
    }
    SplitMix64::new(o.seed).shuffle(&mut texts);
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
    let plan = BatchPlan::new(train_texts.len(), o.batch)?.shuffled(o.seed);
    for epoch in 0..o.epochs {
        let pb = progress(
            plan.num_batches() as u64,
            &format!("epoch {}", epoch + 1),
            o.quiet,
        );
        let (mut sum, mut steps) = (0.0, 0usize);
        for idx in plan.epoch(epoch as u64) {
            let texts: Vec<&String> = idx.iter().map(|&i| train_texts[i]).collect();
            let b = batch(&tok, &texts, o.max_len, pad)?;
            let (loss, n) = model.lm_loss(&b.input_ids, Some(&b.attention_mask), true)?;
            if n.f_double_value(&[])? == 0.0 {
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
