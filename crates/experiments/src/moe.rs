//! `cargo xtask experiment moe`: the real task of issue 5 (moe-router).
//!
//! A small ModuleFormer-style decoder — model-zoo's GPT-2 decoder with every
//! block's attention replaced by moe-router's [`MixtureOfAttention`]
//! (stick-breaking attention experts) and every FFN by a [`MoeLayer`] (MLP
//! gate, raw gates, dropless, top-k), positions from stick-breaking only
//! (`wpe` zeroed and frozen), dropout 0 — is trained from scratch on the
//! movie-review text of `data/sentiment_domains` (next-token prediction on
//! packed 64-token windows), with and without ModuleFormer's mutual-information
//! loss `H(e|x) − H(e)`, several seeds. Then:
//! - validation loss on held-out movie reviews, and the loss on two held-out
//!   domains (Amazon product reviews, tweets);
//! - expert-usage entropy per router: `H(load)/log E` (balance) and the
//!   per-token routing entropy `H(e|x)/log E` (specialisation), averaged over layers;
//! - pruning: per layer, the FFN experts that the held-out Amazon domain
//!   uses least (measured on one half of its windows with
//!   [`moe_router::expert_usage`]) are removed with
//!   [`moe_router::prune_experts`] — and, in a third rule, the attention
//!   experts too ([`moe_router::attention_expert_usage`],
//!   [`moe_router::prune_attention_experts`]) — and the loss change is
//!   measured on the other half, on the movie validation set and on tweets.
//!
//! Tokens: the packaged MiniLM WordPiece tokenizer (30,522 ids), remapped to
//! the `vocab` most frequent ids of the training text plus one `[UNK]` id, to
//! keep the tied embedding and the softmax cheap on a CPU.
//!
//! Writes a markdown table (default `docs/results/moe.md`) atomically.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::stats::mean_std;
use model_zoo::data::load_jsonl;
use model_zoo::gpt::{Gpt2Config, Gpt2Model};
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use model_zoo::train::{AdamW, AdamWConfig, LrSchedule, ScheduleKind, SplitMix64, clip_grad_norm};
use moe_router::router::GateParams;
use moe_router::{
    ExpertWeights, MixtureOfAttention, MoaConfig, MoeConfig, MoeLayer, Router,
    attention_expert_usage, expert_usage, prune_attention_experts, prune_experts,
};
use recipes::flags::{AnyResult, Flags, usage};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::{Context, Module, ModuleExt, Slot};

pub const MOE_HELP: &str = "usage: cargo xtask experiment moe [--seeds 0,1,2] [--mi-weights 0,0.01,0.1] [--steps N] [--batch N] [--seq N]
                             [--vocab N] [--d-model N] [--layers N] [--experts N] [--top-k K] [--d-ff N]
                             [--lr X] [--eval-chunks N] [--threads N] [--out FILE]
A small ModuleFormer-style decoder (model-zoo GPT-2 with MoA + MoE FFN from moe-router)
trained from scratch on the movie reviews of data/sentiment_domains, with and without
ModuleFormer's MI loss (one variant per --mi-weights value, each for every seed);
reports validation / out-of-domain loss, expert-usage entropy, and the loss change
after pruning the FFN (and attention) experts the Amazon domain uses least.
Writes docs/results/moe.md (or --out). A smoke run: --steps 20 --seeds 0 --out /tmp/moe.md";

/// Everything the command can change.
#[derive(Debug, Clone)]
struct Plan {
    seeds: Vec<u64>,
    mi_weights: Vec<f64>,
    steps: u64,
    batch: usize,
    seq: usize,
    vocab: usize,
    d_model: i64,
    layers: i64,
    experts: usize,
    top_k: usize,
    /// Hidden width of each FFN expert.
    d_ff: i64,
    /// Query/key/value width of each attention expert, and its heads.
    att_hidden: i64,
    att_heads: i64,
    /// Hidden units of the MLP gates.
    gating: i64,
    lr: f64,
    warmup: f64,
    weight_decay: f64,
    clip: f64,
    eval_chunks: usize,
    threads: Option<i32>,
    out: PathBuf,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            seeds: vec![0, 1, 2],
            mi_weights: vec![0.0, 0.01, 0.1],
            steps: 120,
            batch: 32,
            seq: 64,
            vocab: 4096,
            d_model: 128,
            layers: 4,
            experts: 8,
            top_k: 2,
            d_ff: 128,
            att_hidden: 64,
            att_heads: 2,
            gating: 128,
            lr: 1e-3,
            warmup: 0.1,
            weight_decay: 0.01,
            clip: 1.0,
            eval_chunks: 256,
            threads: Some(1),
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/results/moe.md"),
        }
    }
}

fn parse(args: &[String]) -> AnyResult<Option<Plan>> {
    const CMD: &str = "experiment moe";
    let Some(f) = Flags::parse_options(
        CMD,
        args,
        &[
            "--seeds",
            "--mi-weights",
            "--steps",
            "--batch",
            "--seq",
            "--vocab",
            "--d-model",
            "--layers",
            "--experts",
            "--top-k",
            "--d-ff",
            "--lr",
            "--eval-chunks",
            "--threads",
            "--out",
        ],
        &[],
        MOE_HELP,
    )?
    else {
        return Ok(None);
    };
    let d = Plan::default();
    let threads: Option<i32> = f.parsed("--threads")?;
    let p = Plan {
        seeds: f.seeds(d.seeds)?,
        mi_weights: f.list("--mi-weights")?.unwrap_or(d.mi_weights),
        steps: f.parsed_or("--steps", d.steps)?,
        batch: f.parsed_or("--batch", d.batch)?,
        seq: f.parsed_or("--seq", d.seq)?,
        vocab: f.parsed_or("--vocab", d.vocab)?,
        d_model: f.parsed_or("--d-model", d.d_model)?,
        layers: f.parsed_or("--layers", d.layers)?,
        experts: f.parsed_or("--experts", d.experts)?,
        top_k: f.parsed_or("--top-k", d.top_k)?,
        d_ff: f.parsed_or("--d-ff", d.d_ff)?,
        lr: f.parsed_or("--lr", d.lr)?,
        eval_chunks: f.parsed_or("--eval-chunks", d.eval_chunks)?,
        // `--threads 0`: libtorch's default pool.
        threads: threads.map_or(d.threads, |n| (n > 0).then_some(n)),
        out: f.path("--out").unwrap_or(d.out),
        ..d
    };
    if p.mi_weights.is_empty() {
        return usage(CMD, "--mi-weights needs at least one value");
    }
    if p.steps == 0 || p.batch == 0 || p.seq < 2 || p.vocab < 2 || p.eval_chunks == 0 {
        return usage(
            CMD,
            "--steps, --batch, --vocab and --eval-chunks must be positive, --seq >= 2",
        );
    }
    if p.top_k == 0 || p.top_k > p.experts {
        return usage(CMD, "--top-k must be in 1..=--experts");
    }
    Ok(Some(p))
}

// ---------------------------------------------------------------- data

/// Token streams of the splits, in the remapped vocabulary (`0` = `[UNK]`).
struct Corpus {
    train: Vec<i64>,
    /// Movie reviews, `validation.jsonl`.
    val: Vec<i64>,
    amazon: Vec<i64>,
    tweets: Vec<i64>,
    vocab: i64,
    /// Fraction of each stream's tokens outside the kept vocabulary.
    unk: [f64; 4],
    /// Sentences per split.
    sentences: [usize; 4],
}

/// WordPiece ids of each text without `[CLS]`, ending with `[SEP]`, concatenated.
fn stream(tok: &TextTokenizer, texts: &[String]) -> AnyResult<Vec<i64>> {
    let mut out = Vec::new();
    for t in texts {
        let ids = tok.encode_ids(t)?;
        // encode_ids adds [CLS] ... [SEP]; keep [SEP] as the document separator.
        out.extend(ids.into_iter().skip(1));
    }
    Ok(out)
}

fn load_corpus(vocab: usize) -> AnyResult<Corpus> {
    let source = ModelSource::resolve(None)?;
    let tok = TextTokenizer::from_file(source.tokenizer_path(), 512, 30522)?;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/sentiment_domains");
    let texts = |file: &str| -> AnyResult<Vec<String>> {
        Ok(load_jsonl(dir.join(file))?
            .into_iter()
            .map(|e| e.text)
            .collect())
    };
    let files = [
        "train.jsonl",
        "validation.jsonl",
        "test_ood.jsonl",
        "test_ood_tweets.jsonl",
    ];
    let mut raw = Vec::new();
    let mut sentences = [0usize; 4];
    for (i, f) in files.iter().enumerate() {
        let t = texts(f)?;
        sentences[i] = t.len();
        raw.push(stream(&tok, &t)?);
    }
    // The `vocab` most frequent training ids (ties by id) get 1..=vocab.
    let mut freq: HashMap<i64, u64> = HashMap::new();
    for &id in &raw[0] {
        *freq.entry(id).or_default() += 1;
    }
    let mut by_freq: Vec<(i64, u64)> = freq.into_iter().collect();
    by_freq.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let map: HashMap<i64, i64> = by_freq
        .iter()
        .take(vocab)
        .enumerate()
        .map(|(rank, &(id, _))| (id, rank as i64 + 1))
        .collect();
    let kept = map.len() as i64;
    let mut unk = [0.0; 4];
    let mut mapped: Vec<Vec<i64>> = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let m: Vec<i64> = s.iter().map(|id| *map.get(id).unwrap_or(&0)).collect();
        unk[i] = m.iter().filter(|&&x| x == 0).count() as f64 / m.len().max(1) as f64;
        mapped.push(m);
    }
    let tweets = mapped.pop().unwrap_or_default();
    let amazon = mapped.pop().unwrap_or_default();
    let val = mapped.pop().unwrap_or_default();
    let train = mapped.pop().unwrap_or_default();
    Ok(Corpus {
        train,
        val,
        amazon,
        tweets,
        vocab: kept + 1,
        unk,
        sentences,
    })
}

/// Non-overlapping windows of `seq` tokens starting at `offset` (the tail is dropped).
fn windows(s: &[i64], seq: usize, offset: usize) -> Vec<&[i64]> {
    s.get(offset..).unwrap_or(&[]).chunks_exact(seq).collect()
}

fn batch_tensor(rows: &[&[i64]], device: Device) -> AnyResult<Tensor> {
    let seq = rows[0].len() as i64;
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Ok(Tensor::from_slice(&flat)
        .f_view([rows.len() as i64, seq])?
        .f_to_device(device)?)
}

/// Evaluation windows of the splits, fixed for all runs.
struct EvalSets<'a> {
    val: Vec<&'a [i64]>,
    /// Amazon windows that choose the experts to prune (even windows).
    amazon_calib: Vec<&'a [i64]>,
    /// Amazon windows that measure the loss (odd windows).
    amazon: Vec<&'a [i64]>,
    tweets: Vec<&'a [i64]>,
}

fn eval_sets(c: &Corpus, seq: usize, cap: usize) -> EvalSets<'_> {
    fn take(v: Vec<&[i64]>, cap: usize) -> Vec<&[i64]> {
        v.into_iter().take(cap).collect()
    }
    let az = windows(&c.amazon, seq, 0);
    let calib = az.iter().step_by(2).copied().collect();
    let rest = az.iter().skip(1).step_by(2).copied().collect();
    EvalSets {
        val: take(windows(&c.val, seq, 0), cap),
        amazon_calib: take(calib, cap),
        amazon: take(rest, cap),
        tweets: take(windows(&c.tweets, seq, 0), cap),
    }
}

// ---------------------------------------------------------------- model

/// Identity after `ln_1` / `ln_2` that keeps its input (the router's input)
/// when the context carries [`Taps`].
#[derive(Debug)]
struct Tap;

/// Captured router inputs by tap path (`h.3.ln_2.tap`).
#[derive(Debug, Default)]
struct Taps(HashMap<String, Vec<Tensor>>);

impl Module for Tap {
    fn kind(&self) -> &'static str {
        "Tap"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let path = ctx.path();
        if let Some(t) = ctx.get_mut::<Taps>() {
            t.0.entry(path).or_default().push(xs.detach());
        }
        Ok(xs.shallow_clone())
    }
}

fn moe_path(l: i64) -> String {
    format!("h.{l}.mlp.(ffn)")
}

fn moa_path(l: i64) -> String {
    format!("h.{l}.attn")
}

fn moa_config(p: &Plan, mi: f64) -> MoaConfig {
    let mut c = MoaConfig::new(p.d_model, p.att_hidden, p.att_heads, p.experts, p.top_k);
    c.router.mlp_hidden = p.gating;
    c.router.mi_weight = mi;
    c
}

fn moe_config(p: &Plan, mi: f64) -> MoeConfig {
    let mut c = MoeConfig::moduleformer(p.d_model, p.d_ff, p.experts, p.top_k);
    c.router.mlp_hidden = p.gating;
    c.router.mi_weight = mi;
    c
}

/// GPT-2 decoder with MoA + MoE FFN in every block, `wpe` zeroed and frozen,
/// taps on the routers' inputs. Seeded by the caller.
fn build_model(p: &Plan, vocab: i64, mi: f64, device: Device) -> AnyResult<Gpt2Model> {
    let config = Gpt2Config::new(vocab, p.seq as i64, p.d_model, p.layers, 4).with_dropout(0.0);
    let mut model = Gpt2Model::new(config, device)?;
    for l in 0..p.layers {
        let moa = MixtureOfAttention::new(moa_config(p, mi), device)?;
        model.replace(&moa_path(l), Box::new(moa))?;
        let moe = MoeLayer::new(moe_config(p, mi), device)?;
        model.replace(&moe_path(l), Box::new(moe))?;
        model.insert_after(&format!("h.{l}.ln_1"), "tap", Box::new(Tap))?;
        model.insert_after(&format!("h.{l}.ln_2"), "tap", Box::new(Tap))?;
    }
    // ModuleFormer has no positional embedding: stick-breaking attention orders tokens.
    model.for_each_param_mut(&mut |name, t| {
        if name == "wpe.weight" {
            *t = t.f_zeros_like()?.set_requires_grad(false);
        }
        Ok(())
    })?;
    Ok(model)
}

/// A [`MoeLayer`] sharing `m`'s tensors (pruning builds new tensors, so the
/// original stays intact and can be put back).
fn share_router(r: &Router) -> Router {
    let params = match &r.params {
        GateParams::Linear { weight } => GateParams::Linear {
            weight: weight.shallow_clone(),
        },
        GateParams::Mlp { w1, b1, w2 } => GateParams::Mlp {
            w1: w1.shallow_clone(),
            b1: b1.shallow_clone(),
            w2: w2.shallow_clone(),
        },
        GateParams::Cosine {
            proj,
            centers,
            temperature,
        } => GateParams::Cosine {
            proj: proj.shallow_clone(),
            centers: centers.shallow_clone(),
            temperature: temperature.shallow_clone(),
        },
        GateParams::Fixed { a, b } => GateParams::Fixed { a: *a, b: *b },
    };
    Router {
        config: r.config.clone(),
        d_model: r.d_model,
        params,
        active: r.active.as_ref().map(Tensor::shallow_clone),
    }
}

fn share_moe(m: &MoeLayer) -> MoeLayer {
    let share = |w: &ExpertWeights| ExpertWeights {
        w1: w.w1.shallow_clone(),
        w_gate: w.w_gate.as_ref().map(Tensor::shallow_clone),
        w2: w.w2.shallow_clone(),
        b1: w.b1.as_ref().map(Tensor::shallow_clone),
        b2: w.b2.as_ref().map(Tensor::shallow_clone),
    };
    MoeLayer {
        config: m.config.clone(),
        router: share_router(&m.router),
        experts: share(&m.experts),
        frozen: m.frozen.as_ref().map(share),
    }
}

/// A [`MixtureOfAttention`] sharing `m`'s tensors (as [`share_moe`]).
fn share_moa(m: &MixtureOfAttention) -> MixtureOfAttention {
    let opt = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
    MixtureOfAttention {
        config: m.config.clone(),
        router: share_router(&m.router),
        w_k: opt(&m.w_k),
        w_v: opt(&m.w_v),
        w_q: m.w_q.shallow_clone(),
        w_o: m.w_o.shallow_clone(),
        frozen_q: opt(&m.frozen_q),
        frozen_o: opt(&m.frozen_o),
        head_bias: opt(&m.head_bias),
        gn_weight: opt(&m.gn_weight),
        gn_bias: opt(&m.gn_bias),
    }
}

// ---------------------------------------------------------------- training

/// Mean next-token loss over the last steps.
fn train(
    model: &Gpt2Model,
    corpus: &Corpus,
    p: &Plan,
    seed: u64,
    device: Device,
    label: &str,
) -> AnyResult<f64> {
    let mut opt = AdamW::for_module(
        model,
        AdamWConfig::new(p.lr).with_weight_decay(p.weight_decay),
    )?;
    let params = opt.parameters();
    let sched = LrSchedule::with_warmup_ratio(ScheduleKind::Cosine, p.warmup, p.steps)?;
    let mut rng = SplitMix64::new(seed ^ 0x6d6f_655f_7472_6169);
    let mut step = 0u64;
    let mut recent = Vec::new();
    let start = Instant::now();
    let every = (p.steps / 6).max(1);
    'epochs: loop {
        let offset = rng.below(p.seq as u64) as usize;
        let mut ws = windows(&corpus.train, p.seq, offset);
        rng.shuffle(&mut ws);
        for rows in ws.chunks_exact(p.batch) {
            if step >= p.steps {
                break 'epochs;
            }
            opt.set_lr(sched.lr(p.lr, step))?;
            opt.zero_grad()?;
            let ids = batch_tensor(rows, device)?;
            let mut ctx = Context::train();
            let lm = model.lm_loss(&ids, None, &mut ctx)?;
            let aux = ctx.aux_loss_total(device)?;
            let loss = lm.f_add(&aux)?;
            loss.backward();
            clip_grad_norm(&params, p.clip)?;
            opt.step()?;
            let l = lm.double_value(&[]);
            if !l.is_finite() {
                return Err(format!("{label}: loss is {l} at step {step}").into());
            }
            recent.push(l);
            step += 1;
            if step.is_multiple_of(every) || step == p.steps {
                let n = recent.len().min(20);
                let m = recent[recent.len() - n..].iter().sum::<f64>() / n as f64;
                eprintln!(
                    "  {label} step {step}/{}  lm loss {m:.3}  aux {:+.4}  ({:.0} s)",
                    p.steps,
                    aux.double_value(&[]),
                    start.elapsed().as_secs_f64()
                );
            }
        }
        if ws.len() < p.batch {
            return Err("fewer training windows than one batch".into());
        }
    }
    let n = recent.len().min(20);
    Ok(recent[recent.len() - n..].iter().sum::<f64>() / n.max(1) as f64)
}

/// Mean next-token loss over `rows` (all windows full, so the mean of batch
/// means weighted by rows), optionally keeping the routers' inputs.
fn eval_loss(
    model: &Gpt2Model,
    rows: &[&[i64]],
    batch: usize,
    device: Device,
    taps: bool,
) -> AnyResult<(f64, Taps)> {
    let mut total = 0.0;
    let mut n = 0usize;
    let mut kept = Taps::default();
    tch::no_grad(|| -> AnyResult<()> {
        for b in rows.chunks(batch) {
            let ids = batch_tensor(b, device)?;
            let mut ctx = Context::eval();
            if taps {
                ctx.insert(Taps::default());
            }
            let l = model.lm_loss(&ids, None, &mut ctx)?.double_value(&[]);
            total += l * b.len() as f64;
            n += b.len();
            if let Some(t) = ctx.remove::<Taps>() {
                for (k, v) in t.0 {
                    kept.0.entry(k).or_default().extend(v);
                }
            }
        }
        Ok(())
    })?;
    Ok((total / n.max(1) as f64, kept))
}

// ---------------------------------------------------------------- routing statistics

/// One router on one data set.
#[derive(Debug, Clone)]
struct RouterStats {
    /// Kept assignments per expert.
    load: Vec<f64>,
    /// `H(load / Σ load) / log E`.
    usage_entropy: f64,
    /// `mean_t H(p_t) / log E`.
    token_entropy: f64,
}

fn entropy(p: &[f64]) -> f64 {
    let s: f64 = p.iter().sum();
    if s <= 0.0 {
        return 0.0;
    }
    -p.iter()
        .map(|&x| x / s)
        .filter(|&q| q > 0.0)
        .map(|q| q * q.ln())
        .sum::<f64>()
}

/// Jensen–Shannon divergence (nats) of two unnormalised distributions.
fn js(a: &[f64], b: &[f64]) -> f64 {
    let (sa, sb) = (a.iter().sum::<f64>(), b.iter().sum::<f64>());
    if sa <= 0.0 || sb <= 0.0 {
        return f64::NAN;
    }
    let pa: Vec<f64> = a.iter().map(|x| x / sa).collect();
    let pb: Vec<f64> = b.iter().map(|x| x / sb).collect();
    let m: Vec<f64> = pa.iter().zip(&pb).map(|(x, y)| 0.5 * (x + y)).collect();
    entropy(&m) - 0.5 * (entropy(&pa) + entropy(&pb))
}

fn router_stats(router: &Router, inputs: &[Tensor]) -> AnyResult<RouterStats> {
    let e = router.num_experts();
    let d = router.d_model;
    let mut load = Tensor::f_zeros([e], (Kind::Float, Device::Cpu))?;
    let mut h_sum = 0.0;
    let mut count = 0i64;
    tch::no_grad(|| -> AnyResult<()> {
        for x in inputs {
            let xf = x.f_reshape([-1, d])?;
            let r = router.route(&xf, &mut Context::eval())?;
            load = load.f_add(&r.load()?.f_to_device(Device::Cpu)?)?;
            let h = r
                .probs
                .f_mul(&r.probs.f_clamp_min(1e-30)?.f_log()?)?
                .f_sum(Kind::Double)?
                .f_neg()?;
            h_sum += h.double_value(&[]);
            count += xf.size()[0];
        }
        Ok(())
    })?;
    let load = Vec::<f64>::try_from(load.f_to_kind(Kind::Double)?)?;
    let log_e = (e as f64).ln();
    Ok(RouterStats {
        usage_entropy: entropy(&load) / log_e,
        token_entropy: h_sum / count.max(1) as f64 / log_e,
        load,
    })
}

fn tapped<'a>(taps: &'a Taps, key: &str) -> AnyResult<&'a [Tensor]> {
    taps.0
        .get(key)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("no router inputs captured at {key}").into())
}

/// FFN and attention router statistics per layer.
fn all_stats(
    model: &Gpt2Model,
    taps: &Taps,
    layers: i64,
) -> AnyResult<(Vec<RouterStats>, Vec<RouterStats>)> {
    let mut ffn = Vec::new();
    let mut att = Vec::new();
    for l in 0..layers {
        let moe = model.get_as::<MoeLayer>(&moe_path(l))?;
        ffn.push(router_stats(
            &moe.router,
            tapped(taps, &format!("h.{l}.ln_2.tap"))?,
        )?);
        let moa = model.get_as::<MixtureOfAttention>(&moa_path(l))?;
        att.push(router_stats(
            &moa.router,
            tapped(taps, &format!("h.{l}.ln_1.tap"))?,
        )?);
    }
    Ok((ffn, att))
}

fn mean_of(v: &[RouterStats], f: impl Fn(&RouterStats) -> f64) -> f64 {
    v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
}

// ---------------------------------------------------------------- pruning

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// Remove experts with less than `1/(4E)` of the domain's assignments.
    Unused,
    /// Keep the `E/2` experts the domain uses most (fewer if fewer are used;
    /// more on ties).
    TopHalf,
    /// `Unused` on the FFN and on the attention experts.
    UnusedWithAttention,
}

const RULES: [Rule; 3] = [Rule::Unused, Rule::TopHalf, Rule::UnusedWithAttention];

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Unused => "usage < 1/(4E)",
            Rule::TopHalf => "keep top E/2 (used)",
            Rule::UnusedWithAttention => "usage < 1/(4E), FFN + MoA",
        }
    }
}

#[derive(Debug, Clone)]
struct Pruned {
    rule: Rule,
    kept: Vec<usize>,
    /// Attention experts kept per layer (all of them unless the rule prunes MoA).
    kept_att: Vec<usize>,
    amazon: f64,
    val: f64,
    tweets: f64,
}

/// The absolute usage threshold of `rule` for `usage` (counts). Never more
/// than the `k`-th largest count (`k` experts must remain, and every token
/// uses `k` distinct experts, so `k` have a count >= 1), and at least 0.5, so
/// unused experts go even when more than `E/2` of them are unused.
fn threshold(rule: Rule, usage: &[f64], k: usize) -> f64 {
    let mut sorted = usage.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let e = usage.len();
    let total: f64 = usage.iter().sum();
    let kth = |n: usize| sorted[n.clamp(1, e) - 1];
    match rule {
        Rule::Unused | Rule::UnusedWithAttention => (total / (4.0 * e as f64)).min(kth(k)).max(0.5),
        Rule::TopHalf => kth((e / 2).max(k)).max(0.5),
    }
}

fn prune_and_eval(
    model: &mut Gpt2Model,
    p: &Plan,
    sets: &EvalSets,
    calib_taps: &Taps,
    rule: Rule,
    device: Device,
) -> AnyResult<Pruned> {
    let mut originals: Vec<(String, Slot)> = Vec::new();
    let mut kept = Vec::new();
    let mut kept_att = Vec::new();
    let ffn_rule = if rule == Rule::UnusedWithAttention {
        Rule::Unused
    } else {
        rule
    };
    let result = (|| -> AnyResult<()> {
        for l in 0..p.layers {
            let path = moe_path(l);
            let copy = share_moe(model.get_as::<MoeLayer>(&path)?);
            let usage_t = expert_usage(&copy, tapped(calib_taps, &format!("h.{l}.ln_2.tap"))?)?;
            let usage =
                Vec::<f64>::try_from(usage_t.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
            let mut copy = copy;
            let keep = prune_experts(&mut copy, &usage_t, threshold(ffn_rule, &usage, p.top_k))?;
            kept.push(keep.len());
            originals.push((path.clone(), model.replace(&path, Box::new(copy))?));
            if rule == Rule::UnusedWithAttention {
                let path = moa_path(l);
                let mut copy = share_moa(model.get_as::<MixtureOfAttention>(&path)?);
                let inputs = tapped(calib_taps, &format!("h.{l}.ln_1.tap"))?;
                let usage_t = attention_expert_usage(&copy, inputs, None)?;
                let usage = Vec::<f64>::try_from(
                    usage_t.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?,
                )?;
                let keep = prune_attention_experts(
                    &mut copy,
                    &usage_t,
                    threshold(Rule::Unused, &usage, p.top_k),
                )?;
                kept_att.push(keep.len());
                originals.push((path.clone(), model.replace(&path, Box::new(copy))?));
            } else {
                kept_att.push(p.experts);
            }
        }
        Ok(())
    })();
    let losses = result.and_then(|()| {
        let amazon = eval_loss(model, &sets.amazon, p.batch, device, false)?.0;
        let val = eval_loss(model, &sets.val, p.batch, device, false)?.0;
        let tweets = eval_loss(model, &sets.tweets, p.batch, device, false)?.0;
        Ok((amazon, val, tweets))
    });
    // Put the unpruned layers back whatever happened.
    for (path, slot) in originals {
        model.replace(&path, slot)?;
    }
    let (amazon, val, tweets) = losses?;
    Ok(Pruned {
        rule,
        kept,
        kept_att,
        amazon,
        val,
        tweets,
    })
}

// ---------------------------------------------------------------- one run

#[derive(Debug, Clone)]
struct RunResult {
    mi: f64,
    seed: u64,
    train_loss: f64,
    val: f64,
    amazon: f64,
    tweets: f64,
    ffn_movie: Vec<RouterStats>,
    ffn_amazon: Vec<RouterStats>,
    att_movie: Vec<RouterStats>,
    pruned: Vec<Pruned>,
    seconds: f64,
}

fn run_one(
    p: &Plan,
    corpus: &Corpus,
    sets: &EvalSets,
    mi: f64,
    seed: u64,
    device: Device,
) -> AnyResult<RunResult> {
    let start = Instant::now();
    let label = format!("MI {mi} seed {seed}");
    let mut model =
        tensor_core::testing::with_seed(seed, || build_model(p, corpus.vocab, mi, device))?;
    let train_loss = train(&model, corpus, p, seed, device, &label)?;
    let (val, movie_taps) = eval_loss(&model, &sets.val, p.batch, device, true)?;
    let (amazon, _) = eval_loss(&model, &sets.amazon, p.batch, device, false)?;
    let (tweets, _) = eval_loss(&model, &sets.tweets, p.batch, device, false)?;
    let (_, calib_taps) = eval_loss(&model, &sets.amazon_calib, p.batch, device, true)?;
    let (ffn_movie, att_movie) = all_stats(&model, &movie_taps, p.layers)?;
    let (ffn_amazon, _) = all_stats(&model, &calib_taps, p.layers)?;
    drop(movie_taps);
    let mut pruned = Vec::new();
    for rule in RULES {
        pruned.push(prune_and_eval(
            &mut model,
            p,
            sets,
            &calib_taps,
            rule,
            device,
        )?);
    }
    let r = RunResult {
        mi,
        seed,
        train_loss,
        val,
        amazon,
        tweets,
        ffn_movie,
        ffn_amazon,
        att_movie,
        pruned,
        seconds: start.elapsed().as_secs_f64(),
    };
    eprintln!(
        "  {label}: val {:.4}  amazon {:.4}  tweets {:.4}  FFN usage H {:.3}  token H {:.3}  ({:.0} s)",
        r.val,
        r.amazon,
        r.tweets,
        mean_of(&r.ffn_movie, |s| s.usage_entropy),
        mean_of(&r.ffn_movie, |s| s.token_entropy),
        r.seconds
    );
    for pr in &r.pruned {
        eprintln!(
            "    prune ({}): kept {:?} (MoA {:?})  amazon {:+.4}  val {:+.4}  tweets {:+.4}",
            pr.rule.name(),
            pr.kept,
            pr.kept_att,
            pr.amazon - r.amazon,
            pr.val - r.val,
            pr.tweets - r.tweets
        );
    }
    Ok(r)
}

// ---------------------------------------------------------------- report

fn ms(v: &[f64], digits: usize) -> String {
    let (m, s) = mean_std(v);
    format!("{m:.digits$} ± {s:.digits$}")
}

/// `mean ± std` with the mean's sign always shown (loss changes).
fn ms_signed(v: &[f64], digits: usize) -> String {
    let (m, s) = mean_std(v);
    format!("{m:+.digits$} ± {s:.digits$}")
}

fn variant_name(mi: f64) -> String {
    if mi == 0.0 {
        "no MI loss".into()
    } else {
        format!("MI loss (λ = {mi})")
    }
}

fn js_layers(r: &RunResult) -> f64 {
    let v: Vec<f64> = r
        .ffn_movie
        .iter()
        .zip(&r.ffn_amazon)
        .map(|(a, b)| js(&a.load, &b.load))
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn report(
    p: &Plan,
    c: &Corpus,
    sets: &EvalSets,
    runs: &[RunResult],
    minutes: f64,
) -> AnyResult<String> {
    let device = tensor_core::best();
    let params = param_count(p, c.vocab)?;
    let mut md = String::new();
    writeln!(
        md,
        "# moe-router real task: a small ModuleFormer-style decoder with and without the MI loss\n"
    )?;
    writeln!(
        md,
        "Command: `cargo xtask experiment moe` (the binary is the `experiments` crate's: `cargo run --release -p experiments -- moe` is the same code). Options: `cargo xtask experiment moe --help`.\n"
    )?;
    writeln!(md, "## Setting\n")?;
    writeln!(
        md,
        "- **Model**: model-zoo's `Gpt2Model` (GPT-2 pre-LN decoder, tied embedding, final LN), d = {}, {} blocks, every `h.N.attn` replaced by moe-router's `MixtureOfAttention` ({} attention experts, top-{}, {} heads × {} per expert, shared K/V, MF stick-breaking attention, no remainder) and every `h.N.mlp.(ffn)` by a `MoeLayer` (`MoeConfig::moduleformer`: {} experts of width {}, top-{}, GELU-tanh, no biases); both routers are ModuleFormer's (MLP gate with {} hidden units, raw gates `g = p`, dropless, no balance or z-loss). `wpe` is zeroed and frozen (ModuleFormer has no positional embedding; stick-breaking attention orders the tokens); dropout 0. Random init, seeded ({:.2}M trainable parameters, {:.2}M of them in the tied embedding).",
        p.d_model,
        p.layers,
        p.experts,
        p.top_k,
        p.att_heads,
        p.att_hidden / p.att_heads.max(1),
        p.experts,
        p.d_ff,
        p.top_k,
        p.gating,
        params.0,
        params.1
    )?;
    writeln!(
        md,
        "- **Tokens**: the packaged all-MiniLM-L6-v2 WordPiece tokenizer (30,522 ids; `[CLS]` dropped, `[SEP]` kept as the sentence separator), remapped to the {} most frequent ids of the training text + one `[UNK]` id (vocabulary {}). Out-of-vocabulary rate: train {:.1}%, movie validation {:.1}%, Amazon {:.1}%, tweets {:.1}% (`[UNK]` is a target like any other token, so the out-of-domain losses are slightly optimistic).",
        p.vocab,
        c.vocab,
        100.0 * c.unk[0],
        100.0 * c.unk[1],
        100.0 * c.unk[2],
        100.0 * c.unk[3]
    )?;
    writeln!(
        md,
        "- **Data** (`data/sentiment_domains`): each split's sentences concatenated and cut into non-overlapping {}-token windows. Training: `train.jsonl` (movie reviews, {} sentences, {} tokens), a fresh random offset and shuffle per epoch (SplitMix64 from the seed). Evaluation (at most {} windows each): movie `validation.jsonl` ({} windows), Amazon `test_ood.jsonl` split into interleaved halves — even windows choose the experts to prune ({} windows), odd windows measure the loss ({} windows) — and tweets `test_ood_tweets.jsonl` ({} windows).",
        p.seq,
        c.sentences[0],
        c.train.len(),
        p.eval_chunks,
        sets.val.len(),
        sets.amazon_calib.len(),
        sets.amazon.len(),
        sets.tweets.len()
    )?;
    writeln!(
        md,
        "- **Training**: next-token cross-entropy + the routers' auxiliary losses (`ctx.aux_loss_total`: the MI loss `λ·(H(e|x) − H(e))` per router, per call, summed over the {} routers; nothing when λ = 0), AdamW lr {:.0e} (weight decay {}, none on biases/LN), {:.0}% linear warm-up then cosine decay, gradient clipping {}, batch {} × {} tokens, {} steps (≈ {:.1} epochs). λ for the MI variant: the spec leaves ModuleFormer's training value open (the released configs carry weight 0), so λ is swept (`--mi-weights`): 0.01 is the spec's default weight of the other routing losses (balance 1e-2), 0.1 ten times that.",
        2 * p.layers,
        p.lr,
        p.weight_decay,
        100.0 * p.warmup,
        p.clip,
        p.batch,
        p.seq,
        p.steps,
        (p.steps as f64 * (p.batch * p.seq) as f64) / c.train.len() as f64
    )?;
    writeln!(
        md,
        "- **Expert usage** (evaluation mode, on the movie validation windows): per router, `load_e` = tokens routed to expert e (top-{}); usage entropy `H(load/Σload)/log E` (1 = perfectly balanced) and per-token routing entropy `mean_t H(p_t)/log E` (lower = more decisive, specialised routing), averaged over layers. \"movie↔Amazon JS\" = Jensen–Shannon divergence (nats, max ln 2) between the FFN usage on movie validation and on Amazon, averaged over layers (domain specialisation of the experts).",
        p.top_k
    )?;
    writeln!(
        md,
        "- **Pruning**: per layer, `expert_usage` of the FFN router on the Amazon calibration half, then `prune_experts` with (a) threshold `Σusage/(4E)` (\"experts the domain does not use\"), or (b) the E/2 most used experts kept (a fixed budget that compares the variants at equal size; fewer when fewer are used at all, more on ties), or (c) rule (a) on the FFN experts and on the attention experts (`attention_expert_usage` of the MoA router on the same windows, then `prune_attention_experts`). The loss change is measured on the other Amazon half, on movie validation and on tweets; the model is restored between rules. With ModuleFormer's raw gates the surviving experts' probabilities are renormalised over fewer experts, so the outputs change even when the removed experts were never chosen.",
    )?;
    writeln!(
        md,
        "- **Budget**: {:.1} min wall time for all {} runs on {:?} ({} libtorch thread(s), 2 CPU cores shared with another developer's training job). Seeds {:?}.\n",
        minutes,
        runs.len(),
        device,
        p.threads.map_or("default".to_owned(), |n| n.to_string()),
        p.seeds
    )?;

    writeln!(md, "## Results\n")?;
    writeln!(
        md,
        "Mean ± std over seeds (sample std; one seed gives ± 0). Losses in nats per token.\n"
    )?;
    writeln!(
        md,
        "| variant | seeds | train loss (last 20 steps) | val loss (movie) | OOD loss Amazon | OOD loss tweets | FFN usage entropy | FFN per-token entropy | MoA usage entropy | MoA per-token entropy | movie↔Amazon JS (FFN) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for &mi in &p.mi_weights {
        let r: Vec<&RunResult> = runs.iter().filter(|r| r.mi == mi).collect();
        let col = |f: &dyn Fn(&RunResult) -> f64| r.iter().map(|x| f(x)).collect::<Vec<_>>();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            variant_name(mi),
            r.iter()
                .map(|x| x.seed.to_string())
                .collect::<Vec<_>>()
                .join(","),
            ms(&col(&|x| x.train_loss), 3),
            ms(&col(&|x| x.val), 3),
            ms(&col(&|x| x.amazon), 3),
            ms(&col(&|x| x.tweets), 3),
            ms(&col(&|x| mean_of(&x.ffn_movie, |s| s.usage_entropy)), 3),
            ms(&col(&|x| mean_of(&x.ffn_movie, |s| s.token_entropy)), 3),
            ms(&col(&|x| mean_of(&x.att_movie, |s| s.usage_entropy)), 3),
            ms(&col(&|x| mean_of(&x.att_movie, |s| s.token_entropy)), 3),
            ms(&col(&js_layers), 4),
        )?;
    }
    writeln!(
        md,
        "\n### Pruning the experts by Amazon usage\n\nExperts kept = per layer, summed over the {} layers (of {} × {} = {}), mean over seeds, FFN and attention (MoA). Δ = loss after pruning − loss before (nats/token).\n",
        p.layers,
        p.layers,
        p.experts,
        p.layers as usize * p.experts
    )?;
    writeln!(
        md,
        "| variant | rule | FFN experts kept | MoA experts kept | Δ Amazon loss (held-out half) | Δ movie val loss | Δ tweets loss |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for &mi in &p.mi_weights {
        let r: Vec<&RunResult> = runs.iter().filter(|r| r.mi == mi).collect();
        for (i, rule) in RULES.iter().enumerate() {
            let col = |f: &dyn Fn(&RunResult, &Pruned) -> f64| {
                r.iter().map(|x| f(x, &x.pruned[i])).collect::<Vec<_>>()
            };
            let kept = col(&|_, q| q.kept.iter().sum::<usize>() as f64);
            let kept_att = col(&|_, q| q.kept_att.iter().sum::<usize>() as f64);
            writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {} | {} | {} |",
                variant_name(mi),
                rule.name(),
                mean_std(&kept).0,
                mean_std(&kept_att).0,
                ms_signed(&col(&|x, q| q.amazon - x.amazon), 4),
                ms_signed(&col(&|x, q| q.val - x.val), 4),
                ms_signed(&col(&|x, q| q.tweets - x.tweets), 4),
            )?;
        }
    }
    writeln!(md, "\nPer run:\n")?;
    for r in runs {
        writeln!(
            md,
            "- {} seed {}: val {:.4}, Amazon {:.4}, tweets {:.4}; FFN usage entropy per layer [{}], per-token [{}]; Amazon FFN load per layer {}; pruned (a) kept {:?}: Δ Amazon {:+.4}, Δ val {:+.4}; (b) kept {:?}: Δ Amazon {:+.4}, Δ val {:+.4}; (c) kept FFN {:?}, MoA {:?}: Δ Amazon {:+.4}, Δ val {:+.4}; {:.0} s",
            variant_name(r.mi),
            r.seed,
            r.val,
            r.amazon,
            r.tweets,
            r.ffn_movie
                .iter()
                .map(|s| format!("{:.3}", s.usage_entropy))
                .collect::<Vec<_>>()
                .join(", "),
            r.ffn_movie
                .iter()
                .map(|s| format!("{:.3}", s.token_entropy))
                .collect::<Vec<_>>()
                .join(", "),
            r.ffn_amazon
                .iter()
                .map(|s| format!(
                    "[{}]",
                    s.load
                        .iter()
                        .map(|x| format!("{x:.0}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .collect::<Vec<_>>()
                .join(" "),
            r.pruned[0].kept,
            r.pruned[0].amazon - r.amazon,
            r.pruned[0].val - r.val,
            r.pruned[1].kept,
            r.pruned[1].amazon - r.amazon,
            r.pruned[1].val - r.val,
            r.pruned[2].kept,
            r.pruned[2].kept_att,
            r.pruned[2].amazon - r.amazon,
            r.pruned[2].val - r.val,
            r.seconds
        )?;
    }
    claims(&mut md, p, runs, params.0)?;
    Ok(md)
}

/// The paper's claims next to what was measured (directions computed here).
fn claims(md: &mut String, p: &Plan, runs: &[RunResult], params_m: f64) -> AnyResult<()> {
    writeln!(md, "\n## Claim vs measured\n")?;
    let base: Vec<&RunResult> = runs.iter().filter(|r| r.mi == 0.0).collect();
    let mi_runs: Vec<f64> = p.mi_weights.iter().copied().filter(|&w| w > 0.0).collect();
    if base.is_empty() || mi_runs.is_empty() {
        writeln!(
            md,
            "(Needs a λ = 0 variant and a λ > 0 variant to compare; run with `--mi-weights 0,0.01`.)"
        )?;
        return Ok(());
    }
    let avg = |rs: &[&RunResult], f: &dyn Fn(&RunResult) -> f64| {
        mean_std(&rs.iter().map(|x| f(x)).collect::<Vec<_>>())
    };
    let tok = |x: &RunResult| mean_of(&x.ffn_movie, |s| s.token_entropy);
    let usage = |x: &RunResult| mean_of(&x.ffn_movie, |s| s.usage_entropy);
    let dtop = |x: &RunResult| x.pruned[1].amazon - x.amazon;
    let dunused = |x: &RunResult| x.pruned[0].amazon - x.amazon;
    let kept_unused = |x: &RunResult| x.pruned[0].kept.iter().sum::<usize>() as f64;
    let total = (p.layers as usize * p.experts) as f64;
    writeln!(
        md,
        "| ModuleFormer (Shen et al., arXiv 2306.04640) claims | measured here |"
    )?;
    writeln!(md, "|---|---|")?;
    let b = |f: &dyn Fn(&RunResult) -> f64| avg(&base, f);
    for &w in &mi_runs {
        let m: Vec<&RunResult> = runs.iter().filter(|r| r.mi == w).collect();
        let a = |f: &dyn Fn(&RunResult) -> f64| avg(&m, f);
        let dir = |x: f64, y: f64| if y < x { "lower" } else { "higher" };
        let (bt, mt) = (b(&tok).0, a(&tok).0);
        let (bu, mu) = (b(&usage).0, a(&usage).0);
        writeln!(
            md,
            "| The MI loss makes each token's routing more decisive (lower per-token entropy H(e\\|x)). | FFN per-token entropy {:.3} with λ = {w} vs {:.3} without: {} ({:+.3}); MoA {:.3} vs {:.3}. |",
            mt,
            bt,
            dir(bt, mt),
            mt - bt,
            a(&|x| mean_of(&x.att_movie, |s| s.token_entropy)).0,
            b(&|x| mean_of(&x.att_movie, |s| s.token_entropy)).0,
        )?;
        writeln!(
            md,
            "| ... while keeping expert use balanced (high H(e)). | FFN usage entropy {:.3} with λ = {w} vs {:.3} without ({}, {:+.3}); MoA {:.3} vs {:.3}. |",
            mu,
            bu,
            dir(bu, mu),
            mu - bu,
            a(&|x| mean_of(&x.att_movie, |s| s.usage_entropy)).0,
            b(&|x| mean_of(&x.att_movie, |s| s.usage_entropy)).0,
        )?;
        writeln!(
            md,
            "| Experts specialise, so a domain uses a subset of them. | movie↔Amazon JS divergence of FFN usage {:.4} with λ = {w} vs {:.4} without; experts with < 1/(4E) of Amazon's assignments: {:.1} of {} with λ = {w} vs {:.1} without. |",
            a(&js_layers).0,
            b(&js_layers).0,
            total - a(&kept_unused).0,
            total,
            total - b(&kept_unused).0,
        )?;
        writeln!(
            md,
            "| Pruning the experts a domain does not use costs little loss on it. | Δ Amazon loss, rule (a): {:+.4} with λ = {w}, {:+.4} without; keeping the top half (b): {:+.4} with λ = {w}, {:+.4} without. |",
            a(&dunused).0,
            b(&dunused).0,
            a(&dtop).0,
            b(&dtop).0,
        )?;
        writeln!(
            md,
            "| (The MI loss is an auxiliary objective; the paper does not claim it lowers LM loss.) | Movie validation loss {:.4} with λ = {w} vs {:.4} without; Amazon {:.4} vs {:.4}. |",
            a(&|x| x.val).0,
            b(&|x| x.val).0,
            a(&|x| x.amazon).0,
            b(&|x| x.amazon).0,
        )?;
    }
    writeln!(
        md,
        "\nScale caveat: ModuleFormer's claims come from MoLM models (350M–700M active, 4B–8B total parameters) trained on 300B tokens; here a {:.1}M-parameter model sees {}k tokens of one domain in {} steps, so the routers are far from converged, and differences within one standard deviation across seeds are noise.",
        params_m,
        (p.steps as usize * p.batch * p.seq) / 1000,
        p.steps
    )?;
    Ok(())
}

/// Trainable parameters of the model (millions), and those of the tied embedding.
fn param_count(p: &Plan, vocab: i64) -> AnyResult<(f64, f64)> {
    let m = tensor_core::testing::with_seed(0, || build_model(p, vocab, 0.0, Device::Cpu))?;
    Ok((
        m.param_count().trainable as f64 / 1e6,
        (vocab * p.d_model) as f64 / 1e6,
    ))
}

fn write(out: &Path, md: &str) -> AnyResult<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    tensor_core::io::write_atomic(out, |tmp| {
        std::fs::write(tmp, md).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    println!("{md}");
    println!("written to {}", out.display());
    Ok(())
}

/// `cargo xtask experiment moe [options]`.
pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(p) = parse(args)? else {
        return Ok(());
    };
    if let Some(n) = p.threads {
        tch::set_num_threads(n);
    }
    let device = tensor_core::best();
    let start = Instant::now();
    let corpus = load_corpus(p.vocab)?;
    let sets = eval_sets(&corpus, p.seq, p.eval_chunks);
    eprintln!(
        "moe: vocabulary {} (UNK: train {:.1}%, val {:.1}%, amazon {:.1}%, tweets {:.1}%), train {} tokens; eval windows val {}, amazon {} + {} (calibration), tweets {}; device {device:?}",
        corpus.vocab,
        100.0 * corpus.unk[0],
        100.0 * corpus.unk[1],
        100.0 * corpus.unk[2],
        100.0 * corpus.unk[3],
        corpus.train.len(),
        sets.val.len(),
        sets.amazon.len(),
        sets.amazon_calib.len(),
        sets.tweets.len()
    );
    let mut runs = Vec::new();
    for &seed in &p.seeds {
        for &mi in &p.mi_weights {
            eprintln!("{} seed {seed} ...", variant_name(mi));
            runs.push(run_one(&p, &corpus, &sets, mi, seed, device)?);
        }
    }
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let md = report(&p, &corpus, &sets, &runs, minutes)?;
    write(&p.out, &md)
}
