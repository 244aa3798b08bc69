//! The m2mKD pipeline on all-MiniLM-L6-v2 (Lo et al., 2024), composed once
//! for `modular distill`, the demo and `cargo xtask experiment m2mkd`.
//!
//! Teacher: MiniLM fine-tuned on the task (mean pooling + linear head), split
//! into `M` modules of consecutive layers ([`m2mkd::split_into_modular`]).
//! Meta model: one layer per module, initialised from the teacher (its
//! embeddings, the last layer of each module and the head), trained briefly
//! with CE, frozen; the teacher modules are then incubated in it (Deep
//! Incubation's step, [`m2mkd::incubate`]).
//!
//! Student: a narrower modular encoder: `M` modules of one BERT layer of
//! width `student_width` (4 heads) whose FFN is `moe-router`'s [`MoeLayer`]
//! (a linear router, softmax top-2 renormalised, dropless, GELU experts with
//! biases, the Switch balance loss at weight 0.01), with its own embeddings
//! and head. The arms:
//! - **scratch**: end-to-end CE;
//! - **logit KD**: end-to-end eq. 2 against the whole teacher;
//! - **m2mKD**: each module distilled in its hybrid network (LayerNorm +
//!   Linear stitches between the widths, modules in parallel threads),
//!   assembled with the stitches dropped, then trained end to end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::AnyResult;
use m2mkd::{
    Batch, BatchSource, Boundaries, DistilConfig, KdConfig, LayerStack, LossRegistry, MetaModel,
    ModularModel, OptimConfig, Schedule, Stage, StitchKind, assemble, distil_all, incubate,
    predict, split_into_modular, train_end_to_end,
};
use model_zoo::bert::{BertEncoder, BertLayer, BertModel, mean_pool};
use model_zoo::config::BertConfig;
use model_zoo::data::{TextClassification, TextExample};
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use model_zoo::train::{ClassificationMetrics, SplitMix64, class_ids, pad_batch};
use moe_router::{ExpertActivation, MoeConfig, MoeLayer, RouterConfig};
use tensor_core::layers::Linear;
use tensor_core::module::downcast_box;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::with_seed;
use tensor_core::{Context, Module, ModuleExt, Slot};

/// The pipeline's sizes: steps, data, the student's shape.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seeds: Vec<u64>,
    /// `N`: end-to-end optimiser steps of the scratch and logit-KD arms, and
    /// of m2mKD's end-to-end phase after distillation (the paper runs the
    /// baseline's full schedule there).
    pub steps: u64,
    /// `D`: distillation steps per module before m2mKD's end-to-end phase;
    /// the "scratch, equal total" arm trains `N + D` steps.
    pub distil_steps: u64,
    pub batch: usize,
    pub max_len: usize,
    pub train_limit: usize,
    pub eval_limit: usize,
    pub teacher_steps: u64,
    pub meta_steps: u64,
    pub incubate_steps: u64,
    /// Number of modules M (teacher layers split evenly).
    pub modules: usize,
    pub student_width: i64,
    pub experts: usize,
    pub parallel: bool,
    pub threads: i32,
    pub out: PathBuf,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            seeds: vec![0, 1, 2],
            steps: 100,
            distil_steps: 100,
            batch: 32,
            max_len: 32,
            train_limit: 3200,
            eval_limit: 600,
            teacher_steps: 100,
            meta_steps: 40,
            incubate_steps: 30,
            modules: 3,
            student_width: 192,
            experts: 4,
            parallel: true,
            threads: 1,
            out: crate::repo_root().join("docs/results/m2mkd.md"),
        }
    }
}

/// `classifier(dropout(mean over the mask of h))`, the head of the teacher,
/// the meta model and the student.
#[derive(Debug)]
struct MeanPoolHead {
    classifier: Slot,
    dropout: f64,
}

impl Module for MeanPoolHead {
    fn kind(&self) -> &'static str {
        "MeanPoolHead"
    }
    fn forward(&self, h: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let mask = match &ctx.attention_mask {
            Some(m) => m.shallow_clone(),
            None => Tensor::f_ones(&h.size()[..2], (Kind::Int64, h.device()))?,
        };
        let pooled = mean_pool(h, &mask).map_err(|e| tensor_core::Error::config(e.to_string()))?;
        let pooled = if ctx.train && self.dropout > 0.0 {
            pooled.f_dropout(self.dropout, true)?
        } else {
            pooled
        };
        ctx.call("classifier", self.classifier.as_ref(), &pooled)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("classifier", self.classifier.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("classifier", &mut self.classifier)]
    }
}

fn head(d: i64, labels: i64, device: Device) -> AnyResult<Slot> {
    let mut lin = Linear::new(d, labels, true, device)?;
    tch::no_grad(|| -> AnyResult<()> {
        let _ = lin.weight.f_normal_(0.0, 0.02)?;
        if let Some(b) = &mut lin.bias {
            let _ = b.f_zero_()?;
        }
        Ok(())
    })?;
    Ok(Box::new(MeanPoolHead {
        classifier: Box::new(lin),
        dropout: 0.1,
    }))
}

/// A BERT encoder's parts: `(embeddings, layers)`.
fn bert_parts(bert: BertModel) -> AnyResult<(Slot, Vec<Slot>)> {
    let enc = downcast_box::<BertEncoder>(bert.encoder)
        .map_err(|m| format!("the encoder is a {}, not a BertEncoder", m.kind()))?;
    Ok((bert.embeddings, enc.layers))
}

fn layer_config(base: &BertConfig, d: i64, heads: i64, ff: i64, layers: i64) -> BertConfig {
    BertConfig {
        hidden_size: d,
        num_attention_heads: heads,
        intermediate_size: ff,
        num_hidden_layers: layers,
        ..base.clone()
    }
}

// ------------------------------------------------------------ data

/// Token ids and labels of a split, in file order.
pub struct Encoded {
    pub ids: Vec<Vec<i64>>,
    pub labels: Vec<i64>,
}

fn encode(tok: &TextTokenizer, examples: &[TextExample]) -> AnyResult<Encoded> {
    Ok(Encoded {
        ids: examples
            .iter()
            .map(|e| tok.encode_ids(&e.text))
            .collect::<Result<_, _>>()?,
        labels: examples.iter().map(|e| e.label).collect(),
    })
}

/// Seeded shuffled batches, epoch after epoch (`Sync`: plain vectors).
struct Batches<'a> {
    data: &'a Encoded,
    order: Vec<usize>,
    batch: usize,
    pad: i64,
}

impl<'a> Batches<'a> {
    fn new(data: &'a Encoded, batch: usize, steps: u64, seed: u64, pad: i64) -> Self {
        let n = data.ids.len();
        let mut order = Vec::with_capacity(steps as usize * batch + n);
        let mut rng = SplitMix64::new(seed ^ 0x0ba7_c4e5);
        while order.len() < steps as usize * batch {
            let mut idx: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut idx);
            order.extend(idx);
        }
        Self {
            data,
            order,
            batch,
            pad,
        }
    }
}

fn make_batch(data: &Encoded, idx: &[usize], pad: i64) -> m2mkd::Result<Batch> {
    let seqs: Vec<&[i64]> = idx.iter().map(|&i| data.ids[i].as_slice()).collect();
    let b = pad_batch(&seqs, pad, None, Device::Cpu)
        .map_err(|e| m2mkd::Error::config(e.to_string()))?;
    let y: Vec<i64> = idx.iter().map(|&i| data.labels[i]).collect();
    Ok(Batch::new(b.input_ids, Tensor::from_slice(&y)).with_mask(b.attention_mask))
}

impl BatchSource for Batches<'_> {
    fn batch(&self, step: u64) -> m2mkd::Result<Batch> {
        let s = step as usize * self.batch;
        let idx = self.order.get(s..s + self.batch).ok_or_else(|| {
            m2mkd::Error::config(format!("batch {step} is beyond the planned steps"))
        })?;
        make_batch(self.data, idx, self.pad)
    }
}

/// Metrics and per-example correctness of `model` on `data`.
fn evaluate(
    model: &dyn Module,
    data: &Encoded,
    pad: i64,
) -> AnyResult<(ClassificationMetrics, Vec<bool>)> {
    let mut preds = Vec::with_capacity(data.ids.len());
    let idx: Vec<usize> = (0..data.ids.len()).collect();
    for chunk in idx.chunks(64) {
        let b = make_batch(data, chunk, pad)?;
        let z = predict(model, &b.input, b.mask.as_ref())?;
        preds.extend(class_ids(&z)?);
    }
    let correct = preds
        .iter()
        .zip(&data.labels)
        .map(|(p, y)| p == y)
        .collect();
    Ok((ClassificationMetrics::new(&preds, &data.labels)?, correct))
}

fn subset(examples: &[TextExample], n: usize) -> Vec<TextExample> {
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    SplitMix64::new(0x5eed_e7a1).shuffle(&mut idx);
    idx.into_iter()
        .take(n)
        .map(|i| examples[i].clone())
        .collect()
}

// ------------------------------------------------------------ runs

#[derive(Debug, Clone)]
pub struct Scores {
    pub id: ClassificationMetrics,
    /// `None` when the data has no out-of-domain split.
    pub ood: Option<ClassificationMetrics>,
    pub seconds: f64,
    /// Whether each in-domain test example was classified correctly (file order).
    pub id_correct: Vec<bool>,
    /// The same for the out-of-domain test set.
    pub ood_correct: Option<Vec<bool>>,
}

impl Scores {
    pub fn ood_accuracy(&self) -> f64 {
        self.ood.map_or(f64::NAN, |m| m.accuracy)
    }
    pub fn ood_f1(&self) -> f64 {
        self.ood.map_or(f64::NAN, |m| m.macro_f1)
    }
}

pub struct Setup {
    pub base: BertConfig,
    pub labels: i64,
    pub pad: i64,
    pub train: Encoded,
    pub test_id: Encoded,
    pub test_ood: Option<Encoded>,
}

impl Setup {
    /// Tokenise `data` for plan `p`: a seeded subset of `p.train_limit`
    /// training examples, `p.eval_limit` test (and out-of-domain) examples.
    pub fn new(
        p: &Plan,
        base: &BertConfig,
        source: &ModelSource,
        data: &TextClassification,
    ) -> AnyResult<Self> {
        let tok = TextTokenizer::from_file(source.tokenizer_path(), p.max_len, base.vocab_size)?;
        let mut train = data.train.clone();
        SplitMix64::new(7).shuffle(&mut train);
        train.truncate(p.train_limit);
        if train.is_empty() {
            return Err(format!("{} has no training examples", data.dir.display()).into());
        }
        if data.test.is_empty() {
            return Err(format!("{} has no test examples", data.dir.display()).into());
        }
        Ok(Self {
            labels: data.num_labels,
            pad: tok.pad_id as i64,
            train: encode(&tok, &train)?,
            test_id: encode(&tok, &subset(&data.test, p.eval_limit))?,
            test_ood: match &data.test_ood {
                Some(ood) if !ood.is_empty() => Some(encode(&tok, &subset(ood, p.eval_limit))?),
                _ => None,
            },
            base: base.clone(),
        })
    }

    pub fn train_examples(&self) -> usize {
        self.train.ids.len()
    }
}

/// The student: `p.modules` modules, each one BERT layer of width
/// `p.student_width` (4 heads) whose FFN is a top-2 [`MoeFfn`]; the first
/// owns the embeddings, the last the head.
fn student(s: &Setup, p: &Plan, seed: u64) -> AnyResult<ModularModel> {
    let d = p.student_width;
    let m = p.modules;
    let cfg = layer_config(&s.base, d, 4, 2 * d, m as i64);
    with_seed(seed, || -> AnyResult<ModularModel> {
        let (embed, layers) = bert_parts(BertModel::new(cfg.clone(), false, Device::Cpu)?)?;
        let mut embed = Some(embed);
        let mut stages = Vec::new();
        for (i, mut layer) in layers.into_iter().enumerate() {
            let bl = tensor_core::module::downcast_mut::<BertLayer>(layer.as_mut())
                .ok_or("a BERT layer was expected")?;
            bl.ffn = Box::new(MoeLayer::new(
                student_moe(d, p.experts, seed.wrapping_add(i as u64)),
                Device::Cpu,
            )?);
            let e = if i == 0 { embed.take() } else { None };
            let h = if i + 1 == m {
                Some(head(d, s.labels, Device::Cpu)?)
            } else {
                None
            };
            stages.push(Stage::new(e, vec![layer], h, d, i)?);
        }
        Ok(ModularModel::from_stages(stages)?)
    })
}

/// The student's FFN: `E` GELU experts of width `d / 2` with biases, a
/// linear router, softmax top-2 renormalised, dropless, and the Switch
/// balance loss at weight 0.01 (no z-loss).
pub fn student_moe(d: i64, experts: usize, seed: u64) -> MoeConfig {
    let mut router = RouterConfig::new(experts, 2).dropless();
    router.balance_weight = 0.01;
    router.z_loss_weight = 0.0;
    router.seed = seed;
    MoeConfig {
        bias: true,
        activation: ExpertActivation::Gelu,
        ..MoeConfig::new(d, d / 2, router)
    }
}

fn optim(lr: f64, steps_warmup: f64) -> OptimConfig {
    OptimConfig {
        lr,
        weight_decay: 0.01,
        schedule: Schedule::Linear,
        warmup_ratio: steps_warmup,
        ..OptimConfig::default()
    }
}

fn score(model: &dyn Module, s: &Setup, seconds: f64) -> AnyResult<Scores> {
    let (id, id_correct) = evaluate(model, &s.test_id, s.pad)?;
    let (ood, ood_correct) = match &s.test_ood {
        Some(o) => {
            let (m, c) = evaluate(model, o, s.pad)?;
            (Some(m), Some(c))
        }
        None => (None, None),
    };
    Ok(Scores {
        id,
        ood,
        seconds,
        id_correct,
        ood_correct,
    })
}

pub fn log_scores(what: &str, s: &Scores) {
    match s.ood {
        Some(o) => eprintln!("{what}: ID {:.4} OOD {:.4}", s.id.accuracy, o.accuracy),
        None => eprintln!("{what}: test {:.4}", s.id.accuracy),
    }
}

pub const STUDENT_LR: f64 = 1e-3;

/// What every seed shares: the data, the fine-tuned teacher (whole, frozen),
/// the frozen meta model and the incubated teacher modules.
pub struct Prepared {
    pub setup: Setup,
    pub depth: usize,
    pub boundaries: Boundaries,
    teacher_full: LayerStack,
    meta: MetaModel,
    incubated: Option<ModularModel>,
    pub teacher_scores: Scores,
    pub meta_scores: Scores,
    pub incubate_seconds: f64,
}

impl Prepared {
    /// Parameters of the whole teacher (embeddings, layers, head).
    pub fn teacher_parameters(&self) -> i64 {
        self.teacher_full
            .named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }
}

/// The m2mKD arm of one seed.
pub struct M2mRun {
    /// The assembled student after end-to-end training.
    pub model: ModularModel,
    /// The distilled modules assembled with their stitches kept (each
    /// boundary `post_i ∘ pre_{i+1}`, the widths of the meta model's
    /// interface), before end-to-end training.
    pub stitched: Scores,
    /// The distilled modules loaded into the student (stitches dropped, the
    /// paper's non-strict load), before end-to-end training.
    pub assembled: Scores,
    pub trained: Scores,
    /// Wall time of distilling all modules (in parallel when `p.parallel`).
    pub distil_wall: f64,
    /// Per module: (seconds, steps, trainable parameters).
    pub modules: Vec<(f64, u64, i64)>,
}

/// Steps 1-3 of the pipeline: fine-tune the teacher (MiniLM + mean-pool
/// head), build and train the meta model (one layer per module, initialised
/// from the teacher's embeddings, the last layer of each module and the
/// head), then incubate the teacher modules in it.
pub fn prepare(p: &Plan, source: &ModelSource, data: &TextClassification) -> AnyResult<Prepared> {
    let bert = BertModel::from_source(source, Device::Cpu)?;
    let base = bert.config.clone();
    let s = Setup::new(p, &base, source, data)?;
    let pad = s.pad;
    let kd = KdConfig::default();
    let registry = LossRegistry::with_builtins(&kd);

    // 1. The teacher: MiniLM + mean-pool head, fine-tuned end to end.
    let t0 = Instant::now();
    let (embed, layers) = bert_parts(bert)?;
    let depth = layers.len();
    let boundaries = Boundaries::even(depth, p.modules)?;
    let teacher = with_seed(0, || -> AnyResult<LayerStack> {
        Ok(LayerStack::new(
            embed,
            layers,
            head(base.hidden_size, s.labels, Device::Cpu)?,
            base.hidden_size,
        )?)
    })?;
    let tdata = Batches::new(&s.train, p.batch, p.teacher_steps, 0, pad);
    train_end_to_end(
        &teacher,
        None,
        &tdata,
        p.teacher_steps,
        &optim(1e-4, 0.1),
        &kd,
        0,
    )?;
    let teacher_scores = score(&teacher, &s, t0.elapsed().as_secs_f64())?;
    log_scores("teacher", &teacher_scores);
    let teacher_named = teacher.named_parameters();
    let teacher_copy = with_seed(0, || -> AnyResult<LayerStack> {
        let (e, l) = bert_parts(BertModel::new(base.clone(), false, Device::Cpu)?)?;
        Ok(LayerStack::new(
            e,
            l,
            head(base.hidden_size, s.labels, Device::Cpu)?,
            base.hidden_size,
        )?)
    })?;
    let mut teacher_full = teacher_copy;
    teacher_full.load_named(&teacher_named, true)?;
    teacher_full.set_trainable("*", false);

    // 2. Meta model: one layer per module, from the last teacher layer of each module.
    let t0 = Instant::now();
    let meta_cfg = layer_config(
        &base,
        base.hidden_size,
        base.num_attention_heads,
        base.intermediate_size,
        1,
    );
    let labels = s.labels;
    let builder: Arc<m2mkd::ModuleBuilder> = Arc::new(move |i, m| {
        let build = || -> AnyResult<Slot> {
            let (e, mut l) = bert_parts(BertModel::new(meta_cfg.clone(), false, Device::Cpu)?)?;
            let e = (i == 0).then_some(e);
            let h = if i + 1 == m {
                Some(head(meta_cfg.hidden_size, labels, Device::Cpu)?)
            } else {
                None
            };
            Ok(Box::new(Stage::new(
                e,
                vec![l.remove(0)],
                h,
                meta_cfg.hidden_size,
                i,
            )?))
        };
        build().map_err(|e| m2mkd::Error::config(e.to_string()))
    });
    let mut meta = MetaModel::new(p.modules, base.hidden_size, builder)?;
    let last = p.modules - 1;
    let mut init = Vec::new();
    for (n, t) in &teacher_named {
        if let Some(rest) = n.strip_prefix("embed.") {
            init.push((format!("stage.0.embed.{rest}"), t.shallow_clone()));
        } else if let Some(rest) = n.strip_prefix("head.") {
            init.push((format!("stage.{last}.head.{rest}"), t.shallow_clone()));
        }
    }
    for (i, (_, end)) in boundaries.ranges().into_iter().enumerate() {
        let prefix = format!("block.{}.", end - 1);
        for (n, t) in &teacher_named {
            if let Some(rest) = n.strip_prefix(&prefix) {
                init.push((format!("stage.{i}.block.0.{rest}"), t.shallow_clone()));
            }
        }
    }
    meta.model_mut().load_named(&init, true)?;
    if p.meta_steps > 0 {
        let mdata = Batches::new(&s.train, p.batch, p.meta_steps, 1, pad);
        train_end_to_end(
            meta.model(),
            None,
            &mdata,
            p.meta_steps,
            &optim(1e-4, 0.1),
            &kd,
            1,
        )?;
    }
    meta.freeze();
    let meta_scores = score(meta.model(), &s, t0.elapsed().as_secs_f64())?;
    log_scores("meta", &meta_scores);

    // 3. Teacher modules, incubated in the meta model.
    let t0 = Instant::now();
    let split = split_into_modular(teacher, &boundaries)?;
    let incubated = if p.incubate_steps > 0 {
        let cfg = DistilConfig {
            steps: p.incubate_steps,
            optim: optim(5e-5, 0.1),
            parallel: p.parallel,
            ..DistilConfig::default()
        };
        let idata = Batches::new(&s.train, p.batch, p.incubate_steps, 2, pad);
        incubate(&meta, split, &idata, &cfg, &registry)?.0
    } else {
        split
    };
    Ok(Prepared {
        setup: s,
        depth,
        boundaries,
        teacher_full,
        meta,
        incubated: Some(incubated),
        teacher_scores,
        meta_scores,
        incubate_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Steps 4-5 for one seed: distil every student module in its hybrid
/// network for `p.distil_steps` steps (LayerNorm + Linear stitches), save
/// the distilled modules (into `save_dir` when given, else a scratch folder
/// removed afterwards), score them assembled with their stitches, load them
/// into the student (stitches dropped) and train it end to end for the
/// baseline's full `p.steps`.
pub fn m2mkd_arm(
    prep: &mut Prepared,
    p: &Plan,
    seed: u64,
    save_dir: Option<&Path>,
) -> AnyResult<M2mRun> {
    let s = &prep.setup;
    let kd = KdConfig::default();
    let t0 = Instant::now();
    let distil_steps = p.distil_steps;
    let cfg = DistilConfig {
        kd,
        steps: distil_steps,
        optim: optim(STUDENT_LR, 0.1),
        stitch_kind: StitchKind::LayerNormLinear,
        parallel: p.parallel,
        seed,
        ..DistilConfig::default()
    };
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let teacher = prep
        .incubated
        .take()
        .ok_or("the incubated teacher went missing")?;
    let distil_data = Batches::new(
        &s.train,
        p.batch,
        distil_steps,
        seed.wrapping_add(100),
        s.pad,
    );
    let d = distil_all(
        &prep.meta,
        teacher,
        student(s, p, seed)?,
        &distil_data,
        &cfg,
        &registry,
    )?;
    prep.incubated = Some(d.teacher);
    let modules = d
        .modules
        .iter()
        .map(|m| (m.report.seconds, m.report.steps, m.report.trainable_params))
        .collect();
    let scratch_dir = ScratchDir::new(seed)?;
    let dir = save_dir.unwrap_or(&scratch_dir.0);
    let files: Vec<PathBuf> = d
        .modules
        .iter()
        .map(|m| dir.join(format!("module_{}.safetensors", m.index)))
        .collect();
    for (m, f) in d.modules.iter().zip(&files) {
        m2mkd::save_module(m, f)?;
    }
    let stitched_model = assemble(d.modules, true)?;
    let stitched = score(&stitched_model, s, t0.elapsed().as_secs_f64())?;
    drop(stitched_model);
    let mut model = student(s, p, seed)?;
    for (i, f) in files.iter().enumerate() {
        m2mkd::load_module(&mut model, i, f)?;
    }
    drop(scratch_dir);
    let assembled = score(&model, s, t0.elapsed().as_secs_f64())?;
    let e2e = p.steps;
    let e2e_data = Batches::new(&s.train, p.batch, e2e, seed.wrapping_add(200), s.pad);
    train_end_to_end(
        &model,
        None,
        &e2e_data,
        e2e,
        &optim(STUDENT_LR, 0.1),
        &kd,
        seed,
    )?;
    let trained = score(&model, s, t0.elapsed().as_secs_f64())?;
    Ok(M2mRun {
        model,
        stitched,
        assembled,
        trained,
        distil_wall: d.wall_seconds,
        modules,
    })
}

/// A folder for the distilled modules of one run, removed when dropped
/// (also when the run fails).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(seed: u64) -> AnyResult<Self> {
        let dir =
            std::env::temp_dir().join(format!(".m2mkd-modules.tmp-{}-{seed}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The student trained end to end from scratch for `steps` steps.
pub fn scratch(prep: &Prepared, p: &Plan, seed: u64, steps: u64) -> AnyResult<Scores> {
    let s = &prep.setup;
    let kd = KdConfig::default();
    let data = Batches::new(&s.train, p.batch, steps, seed, s.pad);
    let t0 = Instant::now();
    let m = student(s, p, seed)?;
    train_end_to_end(&m, None, &data, steps, &optim(STUDENT_LR, 0.1), &kd, seed)?;
    let scores = score(&m, s, t0.elapsed().as_secs_f64())?;
    log_scores(&format!("seed {seed}: scratch, {steps} steps"), &scores);
    Ok(scores)
}

/// The baselines at the same budget: the student trained end to end from
/// scratch, and (when `with_kd`) with logit KD against the whole teacher.
pub fn baselines(
    prep: &Prepared,
    p: &Plan,
    seed: u64,
    with_kd: bool,
) -> AnyResult<(Scores, Option<Scores>)> {
    let s = &prep.setup;
    let kd = KdConfig::default();
    let data = Batches::new(&s.train, p.batch, p.steps, seed, s.pad);
    let scratch = scratch(prep, p, seed, p.steps)?;
    if !with_kd {
        return Ok((scratch, None));
    }
    let t0 = Instant::now();
    let m = student(s, p, seed)?;
    train_end_to_end(
        &m,
        Some(&prep.teacher_full),
        &data,
        p.steps,
        &optim(STUDENT_LR, 0.1),
        &kd,
        seed,
    )?;
    let kd_scores = score(&m, s, t0.elapsed().as_secs_f64())?;
    log_scores(&format!("seed {seed}: logit KD"), &kd_scores);
    Ok((scratch, Some(kd_scores)))
}
