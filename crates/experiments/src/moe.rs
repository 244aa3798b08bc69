//! `cargo xtask experiment moe`: ModuleFormer's claims on a small decoder
//! (moe-router): its mutual-information loss against the Switch balance
//! loss, and extendability, adding a new domain without forgetting the old.
//!
//! The model is a small ModuleFormer-style decoder: model-zoo's GPT-2 with
//! every block's attention replaced by moe-router's [`MixtureOfAttention`]
//! (stick-breaking attention experts) and every FFN by a [`MoeLayer`] (MLP
//! gate, raw gates, dropless, top-k), positions from stick-breaking only
//! (`wpe` zeroed and frozen), dropout 0.
//!
//! 1. **Base.** Trained from scratch on the movie reviews of
//!    `data/sentiment_domains` (next-token prediction on packed windows),
//!    once with ModuleFormer's MI loss `H(e|x) − H(e)` and once with the
//!    Switch balance loss instead, same steps, several seeds. Reported: the
//!    movie validation loss, and how the experts specialise by domain
//!    (Jensen–Shannon divergence between the FFN experts' usage on movies
//!    and on tweets or Amazon reviews; per-token routing entropy).
//! 2. **Extension.** From each MI base, the tweets (a new domain; even
//!    windows train, odd windows test) are added by (a) full fine-tuning,
//!    (b) ModuleFormer's way: [`grow_experts`] adds new FFN experts with the
//!    old ones frozen and only the new experts and the routers train, and
//!    (c) LoRA on every FFN expert's weights. Reported: the gain on tweets
//!    and the forgetting on movies (held-out losses before and after).
//!
//! Every comparison is paired over seeds (t interval) and over evaluation
//! windows (bootstrap); [`crate::stats`] decides.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use crate::stats::{Bootstrap, PairedT, bootstrap_mean_diff, fmt_p, mean_std, paired_t};
use model_zoo::data::load_jsonl;
use model_zoo::gpt::{Gpt2Config, Gpt2Model};
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use moe_router::router::GateParams;
use moe_router::{
    ExpertWeights, MixtureOfAttention, MoaConfig, MoeConfig, MoeLayer, Router, grow_experts,
};
use recipes::flags::{AnyResult, Flags, usage};
use tensor_core::module::downcast_ref;
use tensor_core::tch::{self, Device, Kind, Reduction, Tensor};
use tensor_core::train::{
    AdamW, AdamWConfig, LrSchedule, ScheduleKind, SplitMix64, clip_grad_norm,
};
use tensor_core::{Context, Module, ModuleExt, Slot};

pub const MOE_HELP: &str = "usage: cargo xtask experiment moe [--seeds 0,1,2] [--base-steps N] [--ext-steps N] [--mi-weight X]
                             [--balance-weight X] [--grow N] [--lora-rank R] [--batch N] [--seq N]
                             [--vocab N] [--d-model N] [--layers N] [--experts N] [--top-k K] [--d-ff N]
                             [--lr X] [--ext-lr X] [--eval-chunks N] [--threads N] [--out DIR]
A small ModuleFormer-style decoder (model-zoo GPT-2 with MoA + MoE FFN from moe-router) trained
from scratch on the movie reviews of data/sentiment_domains with ModuleFormer's MI loss and,
at equal steps, with the Switch balance loss (expert specialisation by domain); then the MI base
learns tweets by full fine-tuning, by growing new FFN experts with the old ones frozen
(ModuleFormer's extension) and by LoRA on the FFN experts: the gain on tweets and the forgetting
on movies, paired over seeds and evaluation windows.
Defaults: --seeds 0,1,2 --base-steps 500 --ext-steps 100 --mi-weight 0.01 --balance-weight 0.01
--grow 2 --lora-rank 4 --lr 1e-3 --ext-lr 5e-4 --eval-chunks 128 (about 45 minutes on 2 cores).
Writes DIR/moe.md (default docs/results/moe.md). A smoke run: --seeds 0 --base-steps 4 --ext-steps 2
--eval-chunks 4 --out /tmp/moe";

/// Everything the command can change.
#[derive(Debug, Clone)]
struct Plan {
    seeds: Vec<u64>,
    base_steps: u64,
    ext_steps: u64,
    mi_weight: f64,
    balance_weight: f64,
    /// New FFN experts per layer in the grow arm.
    grow: usize,
    lora_rank: i64,
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
    ext_lr: f64,
    warmup: f64,
    weight_decay: f64,
    clip: f64,
    eval_chunks: usize,
    threads: Option<i32>,
    out: PathBuf,
    command: String,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            seeds: vec![0, 1, 2],
            base_steps: 500,
            ext_steps: 100,
            mi_weight: 0.01,
            balance_weight: 0.01,
            grow: 2,
            lora_rank: 4,
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
            ext_lr: 5e-4,
            warmup: 0.1,
            weight_decay: 0.01,
            clip: 1.0,
            eval_chunks: 128,
            threads: None,
            out: recipes::repo_root().join("docs/results/moe.md"),
            command: "cargo xtask experiment moe".into(),
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
            "--base-steps",
            "--ext-steps",
            "--mi-weight",
            "--balance-weight",
            "--grow",
            "--lora-rank",
            "--batch",
            "--seq",
            "--vocab",
            "--d-model",
            "--layers",
            "--experts",
            "--top-k",
            "--d-ff",
            "--lr",
            "--ext-lr",
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
    let shown = recipes::flags::without_out(args);
    let p = Plan {
        seeds: f.seeds(d.seeds.clone())?,
        base_steps: f.parsed_or("--base-steps", d.base_steps)?,
        ext_steps: f.parsed_or("--ext-steps", d.ext_steps)?,
        mi_weight: f.parsed_or("--mi-weight", d.mi_weight)?,
        balance_weight: f.parsed_or("--balance-weight", d.balance_weight)?,
        grow: f.parsed_or("--grow", d.grow)?,
        lora_rank: f.parsed_or("--lora-rank", d.lora_rank)?,
        batch: f.parsed_or("--batch", d.batch)?,
        seq: f.parsed_or("--seq", d.seq)?,
        vocab: f.parsed_or("--vocab", d.vocab)?,
        d_model: f.parsed_or("--d-model", d.d_model)?,
        layers: f.parsed_or("--layers", d.layers)?,
        experts: f.parsed_or("--experts", d.experts)?,
        top_k: f.parsed_or("--top-k", d.top_k)?,
        d_ff: f.parsed_or("--d-ff", d.d_ff)?,
        lr: f.parsed_or("--lr", d.lr)?,
        ext_lr: f.parsed_or("--ext-lr", d.ext_lr)?,
        eval_chunks: f.parsed_or("--eval-chunks", d.eval_chunks)?,
        // `--threads 0`: libtorch's default pool.
        threads: threads.and_then(|n| (n > 0).then_some(n)),
        out: f.path("--out").unwrap_or(d.out.clone()),
        command: if shown.is_empty() {
            d.command.clone()
        } else {
            format!("{} {}", d.command, shown.join(" "))
        },
        ..d
    };
    if p.base_steps == 0
        || p.ext_steps == 0
        || p.batch == 0
        || p.seq < 2
        || p.vocab < 2
        || p.eval_chunks == 0
        || p.grow == 0
        || p.lora_rank <= 0
    {
        return usage(
            CMD,
            "--base-steps, --ext-steps, --batch, --vocab, --eval-chunks, --grow and --lora-rank must be positive, --seq >= 2",
        );
    }
    if p.top_k == 0 || p.top_k > p.experts {
        return usage(CMD, "--top-k must be in 1..=--experts");
    }
    for (flag, x) in [
        ("--mi-weight", p.mi_weight),
        ("--balance-weight", p.balance_weight),
    ] {
        if !(x.is_finite() && x > 0.0) {
            return usage(CMD, format!("{flag} must be a positive number"));
        }
    }
    for (flag, x) in [("--lr", p.lr), ("--ext-lr", p.ext_lr)] {
        if !(x.is_finite() && x > 0.0) {
            return usage(CMD, format!("{flag} must be a positive number"));
        }
    }
    Ok(Some(p))
}

/// The routing loss a base model trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// ModuleFormer's mutual-information loss `λ·(H(e|x) − H(e))`.
    Mi,
    /// The Switch Transformer's balance loss `λ·E·Σ f_e P_e`.
    Switch,
}

impl Variant {
    /// `(mi_weight, balance_weight)` of the routers.
    fn weights(self, p: &Plan) -> (f64, f64) {
        match self {
            Variant::Mi => (p.mi_weight, 0.0),
            Variant::Switch => (0.0, p.balance_weight),
        }
    }

    fn name(self, p: &Plan) -> String {
        match self {
            Variant::Mi => format!("MI loss (λ = {})", p.mi_weight),
            Variant::Switch => format!("Switch balance loss (λ = {})", p.balance_weight),
        }
    }
}

// ---------------------------------------------------------------- data

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

/// Evaluation and extension windows, fixed for all runs.
struct Sets<'a> {
    /// Movie `validation.jsonl`: the old domain, for forgetting.
    movie: Vec<&'a [i64]>,
    /// Amazon `test_ood.jsonl`, for specialisation.
    amazon: Vec<&'a [i64]>,
    /// Tweets: even windows train the extension, odd windows test it.
    tweets_train: Vec<&'a [i64]>,
    tweets: Vec<&'a [i64]>,
}

fn sets(c: &Corpus, seq: usize, cap: usize) -> Sets<'_> {
    let tw = windows(&c.tweets, seq, 0);
    Sets {
        movie: windows(&c.val, seq, 0).into_iter().take(cap).collect(),
        amazon: windows(&c.amazon, seq, 0).into_iter().take(cap).collect(),
        tweets_train: tw.iter().step_by(2).copied().collect(),
        tweets: tw.iter().skip(1).step_by(2).copied().take(cap).collect(),
    }
}

// ---------------------------------------------------------------- model

// ---------------------------------------------------------------- model

/// Identity after `ln_1` / `ln_2` that keeps its input (the router's input)
/// when the context carries [`Taps`].
#[derive(Debug, Module)]
#[module(kind = "Tap", forward = forward_impl)]
struct Tap;

/// Captured router inputs by tap path (`h.3.ln_2.tap`).
#[derive(Debug, Default)]
struct Taps(HashMap<String, Vec<Tensor>>);

impl Tap {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
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

fn moa_config(p: &Plan, v: Variant) -> MoaConfig {
    let mut c = MoaConfig::new(p.d_model, p.att_hidden, p.att_heads, p.experts, p.top_k);
    c.router.mlp_hidden = p.gating;
    (c.router.mi_weight, c.router.balance_weight) = v.weights(p);
    c
}

fn moe_config(p: &Plan, v: Variant) -> MoeConfig {
    let mut c = MoeConfig::moduleformer(p.d_model, p.d_ff, p.experts, p.top_k);
    c.router.mlp_hidden = p.gating;
    (c.router.mi_weight, c.router.balance_weight) = v.weights(p);
    c
}

/// GPT-2 decoder with MoA + MoE FFN in every block, `wpe` zeroed and frozen,
/// taps on the routers' inputs. Seeded by the caller.
fn build_model(p: &Plan, vocab: i64, v: Variant, device: Device) -> AnyResult<Gpt2Model> {
    let config = Gpt2Config::new(vocab, p.seq as i64, p.d_model, p.layers, 4).with_dropout(0.0);
    let mut model = Gpt2Model::new(config, device)?;
    for l in 0..p.layers {
        let moa = MixtureOfAttention::new(moa_config(p, v), device)?;
        model.replace(&moa_path(l), Box::new(moa))?;
        let moe = MoeLayer::new(moe_config(p, v), device)?;
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

/// A router sharing `r`'s tensors (the LoRA arm routes with the frozen base router).
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

/// LoRA on every FFN expert of a frozen [`MoeLayer`]:
/// `W1_e + s·B1_e A1_e` and `W2_e + s·B2_e A2_e` (`s = α / r`, `α = 2r`),
/// `A` small random, `B = 0`, so training starts at the base model. The
/// router and the base experts stay frozen.
#[derive(Debug, Module)]
#[module(kind = "ExpertLora", forward = forward_impl)]
struct ExpertLora {
    #[child]
    base: Slot,
    /// `[E, r, d]`, `[E, d_ff, r]`, `[E, r, d_ff]`, `[E, d, r]`.
    #[param(name = "lora_a1")]
    a1: Tensor,
    #[param(name = "lora_b1")]
    b1: Tensor,
    #[param(name = "lora_a2")]
    a2: Tensor,
    #[param(name = "lora_b2")]
    b2: Tensor,
    scale: f64,
}

impl ExpertLora {
    fn new(base: MoeLayer, r: i64) -> AnyResult<Self> {
        let (e, d, f) = (base.num_experts(), base.config.d_model, base.config.d_ff);
        let dev = base.experts.w1.device();
        let a = |rows: i64, cols: i64| -> AnyResult<Tensor> {
            let bound = 1.0 / (cols as f64).sqrt();
            let mut t = Tensor::f_empty([e, rows, cols], (Kind::Float, dev))?;
            let _ = t.f_uniform_(-bound, bound)?;
            Ok(t.set_requires_grad(true))
        };
        let zero = |rows: i64, cols: i64| -> AnyResult<Tensor> {
            Ok(Tensor::f_zeros([e, rows, cols], (Kind::Float, dev))?.set_requires_grad(true))
        };
        let mut base = base;
        base.set_trainable("*", false);
        Ok(Self {
            a1: a(r, d)?,
            b1: zero(f, r)?,
            a2: a(r, f)?,
            b2: zero(d, r)?,
            base: Box::new(base),
            scale: 2.0,
        })
    }

    fn moe(&self) -> tensor_core::Result<&MoeLayer> {
        downcast_ref::<MoeLayer>(self.base.as_ref())
            .ok_or_else(|| tensor_core::Error::config("ExpertLora: the base is not a MoeLayer"))
    }
}

impl ExpertLora {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let base = self.moe()?;
        let w = base.expert_weights()?;
        let w1 =
            w.w1.f_add(&self.b1.f_bmm(&self.a1)?.f_mul_scalar(self.scale)?)?;
        let w2 =
            w.w2.f_add(&self.b2.f_bmm(&self.a2)?.f_mul_scalar(self.scale)?)?;
        let layer = MoeLayer {
            config: base.config.clone(),
            router: share_router(&base.router),
            experts: ExpertWeights {
                w1,
                w2,
                w_gate: w.w_gate,
                b1: w.b1,
                b2: w.b2,
            },
            frozen: None,
        };
        layer.forward(xs, ctx)
    }
}

/// How the tweets are added to a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Full,
    Grow,
    Lora,
}

const ARMS: [Arm; 3] = [Arm::Full, Arm::Grow, Arm::Lora];

impl Arm {
    fn name(self, p: &Plan) -> String {
        match self {
            Arm::Full => "(a) full fine-tuning".into(),
            Arm::Grow => format!(
                "(b) grow {} FFN experts per layer, old experts frozen (ModuleFormer)",
                p.grow
            ),
            Arm::Lora => format!("(c) LoRA r = {} on every FFN expert", p.lora_rank),
        }
    }

    fn short(self) -> &'static str {
        match self {
            Arm::Full => "full FT",
            Arm::Grow => "grow",
            Arm::Lora => "LoRA",
        }
    }
}

/// Turn a copy of the base into arm `arm`'s starting point: set what trains.
fn prepare_arm(model: &mut Gpt2Model, p: &Plan, arm: Arm) -> AnyResult<()> {
    match arm {
        Arm::Full => {}
        Arm::Grow => {
            model.set_trainable("*", false);
            for l in 0..p.layers {
                let moe = model.get_as_mut::<MoeLayer>(&moe_path(l))?;
                grow_experts(moe, p.grow, true, false)?;
                moe.set_trainable("router.*", true);
            }
        }
        Arm::Lora => {
            model.set_trainable("*", false);
            for l in 0..p.layers {
                let path = moe_path(l);
                let old = model.replace(&path, Box::new(Tap))?;
                let moe = tensor_core::module::downcast_box::<MoeLayer>(old)
                    .map_err(|m| format!("{path} is a {}, not a MoeLayer", m.kind()))?;
                model.replace(&path, Box::new(ExpertLora::new(*moe, p.lora_rank)?))?;
            }
        }
    }
    // `wpe` stays zero and frozen in every arm.
    model.set_trainable("wpe.*", false);
    Ok(())
}

// ---------------------------------------------------------------- training

/// Train `model`'s trainable parameters for `steps`, each epoch on the
/// windows `epoch` gives (shuffled), returning the mean loss of the last 20
/// steps.
fn train<'a>(
    model: &Gpt2Model,
    epoch: &dyn Fn(&mut SplitMix64) -> Vec<&'a [i64]>,
    p: &Plan,
    steps: u64,
    lr: f64,
    seed: u64,
    label: &str,
) -> AnyResult<f64> {
    let device = model.device();
    let mut opt = AdamW::for_module(
        model,
        AdamWConfig::new(lr).with_weight_decay(p.weight_decay),
    )?;
    let params = opt.parameters();
    if params.is_empty() {
        return Err(format!("{label}: nothing to train").into());
    }
    let sched = LrSchedule::with_warmup_ratio(ScheduleKind::Cosine, p.warmup, steps)?;
    let mut rng = SplitMix64::new(seed ^ 0x6d6f_655f_7472_6169);
    let mut step = 0u64;
    let mut recent = Vec::new();
    let start = Instant::now();
    let every = (steps / 5).max(1);
    'epochs: loop {
        let mut ws = epoch(&mut rng);
        if ws.len() < p.batch {
            return Err(format!("{label}: fewer training windows than one batch").into());
        }
        rng.shuffle(&mut ws);
        for rows in ws.chunks_exact(p.batch) {
            if step >= steps {
                break 'epochs;
            }
            opt.set_lr(sched.lr(lr, step))?;
            opt.zero_grad()?;
            let ids = batch_tensor(rows, device)?;
            let mut ctx = Context::train();
            let lm = model.lm_loss(&ids, None, &mut ctx)?;
            let aux = ctx.aux_loss_total(device)?;
            lm.f_add(&aux)?.backward();
            clip_grad_norm(&params, p.clip)?;
            opt.step()?;
            let l = lm.double_value(&[]);
            if !l.is_finite() {
                return Err(format!("{label}: loss is {l} at step {step}").into());
            }
            recent.push(l);
            step += 1;
            if step.is_multiple_of(every) || step == steps {
                eprintln!(
                    "  {label} step {step}/{steps}  lm loss {:.3}  ({:.0} s)",
                    tail_mean(&recent),
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(tail_mean(&recent))
}

fn tail_mean(v: &[f64]) -> f64 {
    let n = v.len().min(20);
    v[v.len() - n..].iter().sum::<f64>() / n.max(1) as f64
}

/// Mean next-token loss of each window (nats per token), optionally keeping
/// the routers' inputs.
fn window_losses(
    model: &Gpt2Model,
    rows: &[&[i64]],
    batch: usize,
    taps: bool,
) -> AnyResult<(Vec<f64>, Taps)> {
    let device = model.device();
    let mut out = Vec::with_capacity(rows.len());
    let mut kept = Taps::default();
    tch::no_grad(|| -> AnyResult<()> {
        for b in rows.chunks(batch) {
            let ids = batch_tensor(b, device)?;
            let mut ctx = Context::eval();
            if taps {
                ctx.insert(Taps::default());
            }
            let logits = model.logits(&ids, &mut ctx)?;
            let t = ids.size()[1];
            let v = logits.size()[2];
            let pred = logits.f_narrow(1, 0, t - 1)?.f_reshape([-1, v])?;
            let gold = ids.f_narrow(1, 1, t - 1)?.f_reshape([-1])?;
            let per = pred
                .f_cross_entropy_loss::<Tensor>(&gold, None, Reduction::None, -100, 0.0)?
                .f_view([b.len() as i64, t - 1])?
                .f_mean_dim(1, false, Kind::Double)?;
            out.extend(Vec::<f64>::try_from(per.f_to_device(Device::Cpu)?)?);
            if let Some(k) = ctx.remove::<Taps>() {
                for (key, v) in k.0 {
                    kept.0.entry(key).or_default().extend(v);
                }
            }
        }
        Ok(())
    })?;
    Ok((out, kept))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

// ---------------------------------------------------------------- routing statistics

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

/// FFN usage JS divergence between two taps, averaged over layers.
fn js_between(model: &Gpt2Model, a: &Taps, b: &Taps, layers: i64) -> AnyResult<f64> {
    let (fa, _) = all_stats(model, a, layers)?;
    let (fb, _) = all_stats(model, b, layers)?;
    let v: Vec<f64> = fa
        .iter()
        .zip(&fb)
        .map(|(x, y)| js(&x.load, &y.load))
        .collect();
    Ok(mean(&v))
}

// ---------------------------------------------------------------- runs

/// A base model of one variant and seed.
struct Base {
    variant: Variant,
    seed: u64,
    train_loss: f64,
    movie: Vec<f64>,
    tweets: Vec<f64>,
    amazon: Vec<f64>,
    /// FFN usage JS divergence movie↔tweets and movie↔Amazon, mean over layers.
    js_tweets: f64,
    js_amazon: f64,
    /// Per-token routing entropy / log E and usage entropy / log E on movies (FFN).
    token_entropy: f64,
    usage_entropy: f64,
    seconds: f64,
}

/// One extension arm from one MI base.
struct Extension {
    arm: Arm,
    seed: u64,
    trainable: i64,
    train_loss: f64,
    movie: Vec<f64>,
    tweets: Vec<f64>,
    seconds: f64,
}

fn train_base(
    p: &Plan,
    c: &Corpus,
    s: &Sets,
    v: Variant,
    seed: u64,
    device: Device,
) -> AnyResult<(Base, Vec<(String, Tensor)>)> {
    let start = Instant::now();
    let label = format!("{} seed {seed}", v.name(p));
    let model = tensor_core::seed::with_seed(seed, || build_model(p, c.vocab, v, device))?;
    // A fresh random offset into the token stream every epoch.
    let epoch = |rng: &mut SplitMix64| windows(&c.train, p.seq, rng.below(p.seq as u64) as usize);
    let train_loss = train(&model, &epoch, p, p.base_steps, p.lr, seed, &label)?;
    let (movie, mt) = window_losses(&model, &s.movie, p.batch, true)?;
    let (tweets, tt) = window_losses(&model, &s.tweets, p.batch, true)?;
    let (amazon, at) = window_losses(&model, &s.amazon, p.batch, true)?;
    let (ffn, _) = all_stats(&model, &mt, p.layers)?;
    let base = Base {
        variant: v,
        seed,
        train_loss,
        js_tweets: js_between(&model, &mt, &tt, p.layers)?,
        js_amazon: js_between(&model, &mt, &at, p.layers)?,
        token_entropy: mean_of(&ffn, |x| x.token_entropy),
        usage_entropy: mean_of(&ffn, |x| x.usage_entropy),
        movie,
        tweets,
        amazon,
        seconds: start.elapsed().as_secs_f64(),
    };
    eprintln!(
        "  {label}: movie {:.3}, tweets {:.3}, JS movie-tweets {:.4} ({:.0} s)",
        mean(&base.movie),
        mean(&base.tweets),
        base.js_tweets,
        base.seconds
    );
    let named = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    Ok((base, named))
}

fn extend(
    p: &Plan,
    c: &Corpus,
    s: &Sets,
    base: &[(String, Tensor)],
    arm: Arm,
    seed: u64,
    device: Device,
) -> AnyResult<Extension> {
    let start = Instant::now();
    let mut model =
        tensor_core::seed::with_seed(seed, || build_model(p, c.vocab, Variant::Mi, device))?;
    model.load_named(base, true)?;
    tensor_core::seed::with_seed(seed.wrapping_add(1000), || prepare_arm(&mut model, p, arm))?;
    let trainable = model.param_count().trainable as i64;
    let label = format!("{} seed {seed}", arm.short());
    let epoch = |_: &mut SplitMix64| s.tweets_train.clone();
    let train_loss = train(
        &model,
        &epoch,
        p,
        p.ext_steps,
        p.ext_lr,
        seed.wrapping_add(7),
        &label,
    )?;
    let (movie, _) = window_losses(&model, &s.movie, p.batch, false)?;
    let (tweets, _) = window_losses(&model, &s.tweets, p.batch, false)?;
    eprintln!(
        "  {label}: movie {:.3}, tweets {:.3} ({trainable} trainable)",
        mean(&movie),
        mean(&tweets)
    );
    Ok(Extension {
        arm,
        seed,
        trainable,
        train_loss,
        movie,
        tweets,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn param_count(p: &Plan, vocab: i64) -> AnyResult<(f64, f64)> {
    let m = tensor_core::seed::with_seed(0, || build_model(p, vocab, Variant::Mi, Device::Cpu))?;
    Ok((
        m.param_count().trainable as f64 / 1e6,
        (vocab * p.d_model) as f64 / 1e6,
    ))
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
    let s = sets(&corpus, p.seq, p.eval_chunks);
    eprintln!(
        "moe: vocabulary {}, train {} tokens; windows movie {}, tweets {} train / {} test, amazon {}",
        corpus.vocab,
        corpus.train.len(),
        s.movie.len(),
        s.tweets_train.len(),
        s.tweets.len(),
        s.amazon.len()
    );
    let mut bases = Vec::new();
    let mut exts = Vec::new();
    for &seed in &p.seeds {
        let (mi, named) = train_base(&p, &corpus, &s, Variant::Mi, seed, device)?;
        bases.push(mi);
        let (switch, _) = train_base(&p, &corpus, &s, Variant::Switch, seed, device)?;
        bases.push(switch);
        for arm in ARMS {
            exts.push(extend(&p, &corpus, &s, &named, arm, seed, device)?);
        }
    }
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let md = report(&p, &corpus, &s, &bases, &exts, minutes)?;
    recipes::report::write(&p.out, &md)
}

// ---------------------------------------------------------------- report

const RESAMPLES: usize = 2000;

/// A real-valued paired comparison: per-seed means (t interval) and the
/// per-window differences pooled over seeds (bootstrap).
struct Decided {
    seeds: PairedT,
    windows: Bootstrap,
    verdict: &'static str,
}

/// Decide `a − b` (losses, nats): lower is better. `a[s]`, `b[s]` are seed
/// `s`'s per-window values, paired by window.
fn decide_loss(a: &[Vec<f64>], b: &[Vec<f64>], seed: u64) -> AnyResult<Decided> {
    let ma: Vec<f64> = a.iter().map(|v| mean(v)).collect();
    let mb: Vec<f64> = b.iter().map(|v| mean(v)).collect();
    let seeds = paired_t(&ma, &mb)?;
    let fa: Vec<f64> = a.iter().flatten().copied().collect();
    let fb: Vec<f64> = b.iter().flatten().copied().collect();
    let windows = bootstrap_mean_diff(&fa, &fb, RESAMPLES, seed)?;
    let agree = (seeds.n < 2 || seeds.excludes_zero()) && windows.excludes_zero();
    let verdict = match (agree, windows.diff < 0.0) {
        (true, true) => "lower (better)",
        (true, false) => "higher (worse)",
        _ => "no significant difference",
    };
    Ok(Decided {
        seeds,
        windows,
        verdict,
    })
}

/// The verdict of a measure with no better side: which arm is higher, when
/// the interval over seeds excludes 0 (the rule of `decide_seeds_only`).
fn direction(t: &PairedT) -> &'static str {
    match crate::stats::decide_seeds_only(t) {
        crate::stats::Verdict::Better => "MI higher",
        crate::stats::Verdict::Worse => "MI lower",
        crate::stats::Verdict::NoSignificantDifference => "no significant difference",
    }
}

fn fmt_seeds(t: &PairedT) -> String {
    if t.n < 2 {
        format!("{:+.4} (one seed)", t.mean)
    } else {
        format!("{:+.4} [{:+.4}, {:+.4}]", t.mean, t.low, t.high)
    }
}

fn decided_cells(d: &Decided) -> String {
    format!(
        "| {} | {} | {:+.4} [{:+.4}, {:+.4}] | {} |",
        fmt_seeds(&d.seeds),
        fmt_p(d.seeds.p),
        d.windows.diff,
        d.windows.low,
        d.windows.high,
        d.verdict
    )
}

const DECIDED_HEADER: &str = "| Δ nats/token, mean [95% CI over seeds] | paired t p (seeds) | Δ over windows [95% bootstrap CI] | verdict |";
const DECIDED_RULE: &str = "|---|---|---|---|";

fn ms(v: &[f64], digits: usize) -> String {
    let (m, s) = mean_std(v);
    format!("{m:.digits$} ± {s:.digits$}")
}

fn report(
    p: &Plan,
    c: &Corpus,
    s: &Sets,
    bases: &[Base],
    exts: &[Extension],
    minutes: f64,
) -> AnyResult<String> {
    let base_of = |v: Variant| -> Vec<&Base> { bases.iter().filter(|b| b.variant == v).collect() };
    let ext_of = |a: Arm| -> Vec<&Extension> { exts.iter().filter(|e| e.arm == a).collect() };
    let mi = base_of(Variant::Mi);
    let sw = base_of(Variant::Switch);
    // Extension: per arm, tweets after − before (gain, negative = learnt) and
    // movie after − before (forgetting, positive = forgot).
    let mut per_arm = Vec::new();
    for (k, arm) in ARMS.into_iter().enumerate() {
        let e = ext_of(arm);
        let tweets_after: Vec<Vec<f64>> = e.iter().map(|x| x.tweets.clone()).collect();
        let tweets_before: Vec<Vec<f64>> = mi.iter().map(|b| b.tweets.clone()).collect();
        let movie_after: Vec<Vec<f64>> = e.iter().map(|x| x.movie.clone()).collect();
        let movie_before: Vec<Vec<f64>> = mi.iter().map(|b| b.movie.clone()).collect();
        per_arm.push((
            arm,
            decide_loss(&tweets_after, &tweets_before, 10 + k as u64)?,
            decide_loss(&movie_after, &movie_before, 20 + k as u64)?,
        ));
    }
    let mut between = Vec::new();
    for (k, (a, b)) in [
        (Arm::Grow, Arm::Full),
        (Arm::Grow, Arm::Lora),
        (Arm::Lora, Arm::Full),
    ]
    .into_iter()
    .enumerate()
    {
        let get = |arm: Arm, tweets: bool| -> Vec<Vec<f64>> {
            ext_of(arm)
                .iter()
                .map(|x| {
                    if tweets {
                        x.tweets.clone()
                    } else {
                        x.movie.clone()
                    }
                })
                .collect()
        };
        between.push((
            a,
            b,
            decide_loss(&get(a, true), &get(b, true), 30 + k as u64)?,
            decide_loss(&get(a, false), &get(b, false), 40 + k as u64)?,
        ));
    }
    // MI vs Switch at equal steps.
    let losses = |v: &[&Base], f: fn(&Base) -> &Vec<f64>| -> Vec<Vec<f64>> {
        v.iter().map(|b| f(b).clone()).collect()
    };
    let mi_movie = decide_loss(&losses(&mi, |b| &b.movie), &losses(&sw, |b| &b.movie), 50)?;
    let scalar = |f: fn(&Base) -> f64| -> AnyResult<PairedT> {
        let a: Vec<f64> = mi.iter().map(|b| f(b)).collect();
        let b: Vec<f64> = sw.iter().map(|b| f(b)).collect();
        Ok(paired_t(&a, &b)?)
    };
    let spec: Vec<(&str, PairedT)> = vec![
        (
            "FFN usage JS movie↔tweets (nats; higher = more domain-specific experts)",
            scalar(|b| b.js_tweets)?,
        ),
        ("FFN usage JS movie↔Amazon (nats)", scalar(|b| b.js_amazon)?),
        (
            "FFN per-token routing entropy / log E (lower = more decisive)",
            scalar(|b| b.token_entropy)?,
        ),
        (
            "FFN usage entropy / log E (1 = balanced)",
            scalar(|b| b.usage_entropy)?,
        ),
    ];
    let headline = {
        let mut h: Vec<String> = per_arm
            .iter()
            .map(|(arm, tw, mv)| {
                format!(
                    "{}: tweets {} nats ({}), movies {} nats ({})",
                    arm.short(),
                    fmt_seeds(&tw.seeds),
                    tw.verdict,
                    fmt_seeds(&mv.seeds),
                    mv.verdict
                )
            })
            .collect();
        if let Some((_, _, _, mv)) = between.first() {
            h.push(format!(
                "grow − full FT on movies {} nats, {}",
                fmt_seeds(&mv.seeds),
                mv.verdict
            ));
        }
        for (what, t) in [
            ("JS movie↔tweets", &spec[0].1),
            ("per-token entropy", &spec[2].1),
        ] {
            h.push(format!(
                "MI − Switch {what} {}, {}",
                fmt_seeds(t),
                direction(t)
            ));
        }
        h.join("; ")
    };
    let budget = format!(
        "{} seeds × (2 base variants × {} steps + 3 extension arms × {} steps), {:.1} min on {:?}",
        p.seeds.len(),
        p.base_steps,
        p.ext_steps,
        minutes,
        tensor_core::best()
    );
    let (params, emb) = param_count(p, c.vocab)?;
    let mut md = crate::index::block(&p.command, &budget, &headline);
    writeln!(
        md,
        "# ModuleFormer on a small decoder: the MI loss, and extending to a new domain\n"
    )?;
    writeln!(md, "Command: `{}`.\n", p.command)?;
    writeln!(
        md,
        "Budget: {budget} ({} libtorch thread(s); the machine has 2 cores, shared at times, so times are upper bounds). The budget stops the base at {} steps (≈ {:.1} epochs of the movie reviews); its last-20-step training loss is {} nats/token (MI) — a small model still learning, not a converged one.\n",
        tch::get_num_threads(),
        p.base_steps,
        (p.base_steps as f64 * (p.batch * p.seq) as f64) / c.train.len() as f64,
        ms(&mi.iter().map(|b| b.train_loss).collect::<Vec<_>>(), 3)
    )?;
    writeln!(md, "## Setting\n")?;
    writeln!(
        md,
        "- **Model**: model-zoo's `Gpt2Model` (pre-LN decoder, tied embedding), d = {}, {} blocks; every attention is moe-router's `MixtureOfAttention` ({} experts, top-{}, {} heads × {}, shared K/V, stick-breaking attention) and every FFN a `MoeLayer` (`MoeConfig::moduleformer`: {} experts of width {}, top-{}, GELU-tanh, no biases); MLP gates with {} hidden units, raw gates, dropless. `wpe` zeroed and frozen; dropout 0; {:.2}M parameters ({:.2}M in the tied embedding).",
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
        params,
        emb
    )?;
    writeln!(
        md,
        "- **Tokens**: the packaged MiniLM WordPiece tokenizer, remapped to the {} most frequent training ids + `[UNK]` (vocabulary {}; out-of-vocabulary: train {:.1}%, movie validation {:.1}%, Amazon {:.1}%, tweets {:.1}%). Windows of {} tokens, non-overlapping.",
        p.vocab,
        c.vocab,
        100.0 * c.unk[0],
        100.0 * c.unk[1],
        100.0 * c.unk[2],
        100.0 * c.unk[3],
        p.seq
    )?;
    writeln!(
        md,
        "- **Base** (per seed, both variants from the same initialisation): {} steps on the movie reviews (`train.jsonl`, {} sentences), AdamW lr {:e}, weight decay {}, {:.0}% warm-up then cosine decay, clip {}, batch {}; the routing loss of all {} routers is either ModuleFormer's MI loss `λ·(H(e|x) − H(e))` (λ = {}) or the Switch balance loss (λ = {}), nothing else differs.",
        p.base_steps,
        c.sentences[0],
        p.lr,
        p.weight_decay,
        100.0 * p.warmup,
        p.clip,
        p.batch,
        2 * p.layers,
        p.mi_weight,
        p.balance_weight
    )?;
    writeln!(
        md,
        "- **Extension** (from each seed's MI base): the tweets of `test_ood_tweets.jsonl` cut into windows; even windows ({}) train, odd windows test ({} of them). {} steps, AdamW lr {:e}, same schedule. (a) every parameter trains; (b) `grow_experts` adds {} FFN experts per layer with the old ones frozen, and only the new experts and the FFN routers train (attention experts, embeddings and norms frozen); (c) rank-{} LoRA factors on both weight matrices of every FFN expert (`B = 0` at the start), nothing else trains. Forgetting is measured on {} movie validation windows, the gain on the {} held-out tweet windows; both are losses before (the base) and after, per window.",
        s.tweets_train.len(),
        s.tweets.len(),
        p.ext_steps,
        p.ext_lr,
        p.grow,
        p.lora_rank,
        s.movie.len(),
        s.tweets.len()
    )?;
    writeln!(
        md,
        "- **Decisions**: Δ over seeds gets a paired t interval; the per-window differences, pooled over seeds, a paired bootstrap ({RESAMPLES} resamples). A difference is called only when both intervals exclude 0.\n"
    )?;
    writeln!(md, "## The paper's claims next to ours\n")?;
    writeln!(
        md,
        "ModuleFormer (Shen et al., 2023): new modules can be added to learn a new domain with the old ones frozen, learning it while forgetting less than fine-tuning the whole model; and its mutual-information loss makes experts specialise (domain-dependent usage, decisive routing) while keeping the load balanced.\n"
    )?;
    writeln!(
        md,
        "### Extension: each arm against the base (after − before)\n"
    )?;
    writeln!(md, "| arm | test set {DECIDED_HEADER}")?;
    writeln!(md, "|---|---{DECIDED_RULE}")?;
    for (arm, tw, mv) in &per_arm {
        writeln!(
            md,
            "| {} | tweets (gain: lower is learnt) {}",
            arm.name(p),
            decided_cells(tw)
        )?;
        writeln!(
            md,
            "| {} | movies (forgetting: higher is forgotten) {}",
            arm.name(p),
            decided_cells(mv)
        )?;
    }
    writeln!(
        md,
        "\n### Extension: arms against each other (loss after extension, A − B)\n"
    )?;
    writeln!(md, "| comparison | test set {DECIDED_HEADER}")?;
    writeln!(md, "|---|---{DECIDED_RULE}")?;
    for (a, b, tw, mv) in &between {
        writeln!(
            md,
            "| {} − {} | tweets {}",
            a.short(),
            b.short(),
            decided_cells(tw)
        )?;
        writeln!(
            md,
            "| {} − {} | movies {}",
            a.short(),
            b.short(),
            decided_cells(mv)
        )?;
    }
    writeln!(md, "\n### MI loss − Switch balance loss, equal steps\n")?;
    writeln!(
        md,
        "| measure | Δ, mean [95% CI over seeds] | paired t p | verdict |"
    )?;
    writeln!(md, "|---|---|---|---|")?;
    for (name, t) in &spec {
        let verdict = direction(t);
        writeln!(
            md,
            "| {name} | {} | {} | {verdict} |",
            fmt_seeds(t),
            fmt_p(t.p)
        )?;
    }
    writeln!(md, "\n| loss {DECIDED_HEADER}")?;
    writeln!(md, "|---{DECIDED_RULE}")?;
    writeln!(
        md,
        "| movie validation, MI − Switch {}",
        decided_cells(&mi_movie)
    )?;
    writeln!(md, "\n## Runs\n")?;
    writeln!(md, "Mean ± sd over seeds; losses in nats per token.\n")?;
    writeln!(
        md,
        "| base | train loss (last 20 steps) | movie val | tweets (held out) | Amazon | JS movie↔tweets | JS movie↔Amazon | per-token entropy | usage entropy | s / run |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for v in [Variant::Mi, Variant::Switch] {
        let b = base_of(v);
        let col = |f: &dyn Fn(&Base) -> f64| b.iter().map(|x| f(x)).collect::<Vec<_>>();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            v.name(p),
            ms(&col(&|x| x.train_loss), 3),
            ms(&col(&|x| mean(&x.movie)), 3),
            ms(&col(&|x| mean(&x.tweets)), 3),
            ms(&col(&|x| mean(&x.amazon)), 3),
            ms(&col(&|x| x.js_tweets), 4),
            ms(&col(&|x| x.js_amazon), 4),
            ms(&col(&|x| x.token_entropy), 3),
            ms(&col(&|x| x.usage_entropy), 3),
            mean(&col(&|x| x.seconds)),
        )?;
    }
    writeln!(
        md,
        "\n| extension arm | trainable parameters | tweets train loss (last 20 steps) | tweets (held out) | movie val | s / run |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for arm in ARMS {
        let e = ext_of(arm);
        let col = |f: &dyn Fn(&Extension) -> f64| e.iter().map(|x| f(x)).collect::<Vec<_>>();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} |",
            arm.name(p),
            e.first().map_or(0, |x| x.trainable),
            ms(&col(&|x| x.train_loss), 3),
            ms(&col(&|x| mean(&x.tweets)), 3),
            ms(&col(&|x| mean(&x.movie)), 3),
            mean(&col(&|x| x.seconds)),
        )?;
    }
    writeln!(
        md,
        "\nPer seed (base: movies / tweets / JS movie↔tweets; extension: tweets / movies after):\n"
    )?;
    for b in bases {
        writeln!(
            md,
            "- seed {} {}: {:.3} / {:.3} / {:.4}",
            b.seed,
            b.variant.name(p),
            mean(&b.movie),
            mean(&b.tweets),
            b.js_tweets
        )?;
    }
    for e in exts {
        writeln!(
            md,
            "- seed {} {}: {:.3} / {:.3}",
            e.seed,
            e.arm.short(),
            mean(&e.tweets),
            mean(&e.movie)
        )?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn flags_and_their_errors() {
        let p = parse(&[]).unwrap().unwrap();
        assert_eq!((p.base_steps, p.ext_steps, p.seeds.len()), (500, 100, 3));
        assert_eq!(p.command, "cargo xtask experiment moe");
        let p = parse(&args(&["--base-steps", "7", "--out", "/x.md"]))
            .unwrap()
            .unwrap();
        assert_eq!(p.base_steps, 7);
        assert_eq!(p.command, "cargo xtask experiment moe --base-steps 7");
        for bad in [
            &["--grow", "0"][..],
            &["--top-k", "9"],
            &["--mi-weight", "0"],
            &["--ext-lr", "-1"],
            &["--seeds", "1,1"],
        ] {
            let e = parse(&args(bad)).expect_err("an error");
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
    }

    fn tiny() -> Plan {
        Plan {
            seq: 8,
            vocab: 50,
            d_model: 16,
            layers: 2,
            experts: 4,
            top_k: 2,
            d_ff: 16,
            att_hidden: 8,
            att_heads: 2,
            gating: 8,
            batch: 4,
            ..Plan::default()
        }
    }

    /// Each arm trains what it says: (a) everything but `wpe`, (b) only the
    /// new experts and the FFN routers, (c) only the LoRA factors; and the
    /// LoRA and grow arms start exactly at the base model's function.
    #[test]
    fn the_arms_train_what_they_say_and_start_at_the_base() {
        let p = tiny();
        let base =
            tensor_core::testing::with_seed(0, || build_model(&p, 50, Variant::Mi, Device::Cpu))
                .unwrap();
        let named: Vec<(String, Tensor)> = base
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        let ids =
            Tensor::from_slice(&(0..32).map(|i| (i * 7) % 50).collect::<Vec<i64>>()).view([4, 8]);
        let out = |m: &Gpt2Model| m.logits(&ids, &mut Context::eval()).unwrap();
        let want = out(&base);
        for arm in ARMS {
            let mut m = tensor_core::testing::with_seed(1, || {
                build_model(&p, 50, Variant::Mi, Device::Cpu)
            })
            .unwrap();
            m.load_named(&named, true).unwrap();
            prepare_arm(&mut m, &p, arm).unwrap();
            let trainable: Vec<String> = m
                .trainable_parameters()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            assert!(!trainable.is_empty());
            assert!(!trainable.iter().any(|n| n.starts_with("wpe")), "{arm:?}");
            match arm {
                Arm::Full => assert!(trainable.iter().any(|n| n.contains("attn"))),
                Arm::Grow => {
                    assert!(
                        trainable
                            .iter()
                            .all(|n| n.contains(".mlp.experts.") || n.contains(".mlp.router.")),
                        "{trainable:?}"
                    );
                    // Two new experts per layer: E grows from 4 to 6.
                    let moe = m.get_as::<MoeLayer>(&moe_path(0)).unwrap();
                    assert_eq!(moe.num_experts(), 6);
                }
                Arm::Lora => assert!(
                    trainable.iter().all(|n| n.contains("lora_")),
                    "{trainable:?}"
                ),
            }
            if arm != Arm::Grow {
                // B = 0 (LoRA) or nothing changed (full): the same function.
                assert!(out(&m).allclose(&want, 1e-6, 1e-6, false), "{arm:?}");
            }
        }
    }

    #[test]
    fn window_losses_average_to_the_lm_loss() {
        let p = tiny();
        let m = tensor_core::testing::with_seed(0, || {
            build_model(&p, 50, Variant::Switch, Device::Cpu)
        })
        .unwrap();
        let rows: Vec<Vec<i64>> = (0..6)
            .map(|r| (0..8).map(|i| (r * 5 + i * 3) % 50).collect())
            .collect();
        let refs: Vec<&[i64]> = rows.iter().map(Vec::as_slice).collect();
        let (per, _) = window_losses(&m, &refs, 4, false).unwrap();
        assert_eq!(per.len(), 6);
        let ids = batch_tensor(&refs, Device::Cpu).unwrap();
        let whole = tch::no_grad(|| m.lm_loss(&ids, None, &mut Context::eval()))
            .unwrap()
            .double_value(&[]);
        assert!(
            (mean(&per) - whole).abs() < 1e-5,
            "{} vs {whole}",
            mean(&per)
        );
    }

    #[test]
    fn measures_without_a_better_side_say_which_arm_is_higher() {
        let up = paired_t(&[2.0, 2.1, 2.2], &[1.0, 1.0, 1.1]).unwrap();
        assert_eq!(direction(&up), "MI higher");
        let down = paired_t(&[1.0, 1.0, 1.1], &[2.0, 2.1, 2.2]).unwrap();
        assert_eq!(direction(&down), "MI lower");
        let flat = paired_t(&[1.0, 2.0, 1.5], &[1.5, 1.5, 1.5]).unwrap();
        assert_eq!(direction(&flat), "no significant difference");
    }

    #[test]
    fn losses_are_decided_lower_is_better() {
        let a = vec![vec![1.0, 1.1, 0.9], vec![1.0, 1.2, 0.8]];
        let b = vec![vec![2.0, 2.1, 1.9], vec![2.1, 2.2, 1.8]];
        let d = decide_loss(&a, &b, 0).unwrap();
        assert_eq!(d.verdict, "lower (better)");
        assert!((d.windows.diff + 1.0166666).abs() < 1e-4);
        let d = decide_loss(&b, &a, 0).unwrap();
        assert_eq!(d.verdict, "higher (worse)");
        let d = decide_loss(&a, &a, 0).unwrap();
        assert_eq!(d.verdict, "no significant difference");
    }
}
