//! The m2mKD pipeline (Lo et al., 2024), composed once for `modular
//! distill`, the demo and `cargo xtask experiment m2mkd`, on text and on
//! images.
//!
//! Teacher: on text, all-MiniLM-L6-v2 fine-tuned on the task (mean pooling
//! and a linear head); on images, a `model-zoo` ViT trained here from scratch
//! (final LayerNorm + linear head on the class token). Either is split into
//! `M` modules of consecutive layers ([`m2mkd::split_into_modular`]).
//! Meta model: one layer per module, initialised from the teacher (its
//! embeddings, the last layer of each module and the head), trained briefly
//! with CE, frozen; the teacher modules are then incubated in it (Deep
//! Incubation's step, [`m2mkd::incubate`]).
//!
//! Student: a narrower modular network of the teacher's kind: `M` modules
//! of one layer of width `student_width` (4 heads) whose FFN is
//! `moe-router`'s [`MoeLayer`] (a linear router, softmax top-2
//! renormalised, dropless, GELU experts with biases, the Switch balance loss
//! at weight 0.01), with its own embeddings and head; on images this is the
//! paper's MoE-ViT student. The arms:
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
use model_zoo::data::{ImageSet, TextClassification, TextExample};
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use model_zoo::vit::{VitConfig, VitModel};
use moe_router::{ExpertActivation, MoeConfig, MoeLayer, RouterConfig};
use tensor_core::layers::{LayerNorm, Linear, PreNormBlock};
use tensor_core::module::{downcast_box, downcast_mut, is};
use tensor_core::seed::with_seed;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::train::{ClassificationMetrics, SplitMix64, class_ids, pad_batch};
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
    /// The teacher's learning rate: 1e-4 fine-tunes MiniLM; a ViT trained
    /// from scratch takes 1e-3.
    pub teacher_lr: f64,
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
            teacher_lr: 1e-4,
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

/// `classifier(dropout(mean over the mask of h))`, the text head of the
/// teacher, the meta model and the student.
#[derive(Debug, Module)]
#[module(kind = "MeanPoolHead", forward = forward_impl)]
struct MeanPoolHead {
    #[child]
    classifier: Slot,
    dropout: f64,
}

impl MeanPoolHead {
    fn forward_impl(&self, h: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
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
}

/// `classifier(layernorm(h)[:, 0])`, ViT's head on the class token: the
/// image head of the teacher, the meta model and the student.
#[derive(Debug, Module)]
#[module(kind = "ClassTokenHead", forward = forward_impl)]
struct ClassTokenHead {
    #[child]
    layernorm: Slot,
    #[child]
    classifier: Slot,
}

impl ClassTokenHead {
    fn forward_impl(&self, h: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let z = ctx.call("layernorm", self.layernorm.as_ref(), h)?;
        let cls = z.f_select(1, 0)?;
        ctx.call("classifier", self.classifier.as_ref(), &cls)
    }
}

fn linear_head(d: i64, labels: i64) -> AnyResult<Slot> {
    let mut lin = Linear::new(d, labels, true, Device::Cpu)?;
    tch::no_grad(|| -> AnyResult<()> {
        let _ = lin.weight.f_normal_(0.0, 0.02)?;
        if let Some(b) = &mut lin.bias {
            let _ = b.f_zero_()?;
        }
        Ok(())
    })?;
    Ok(Box::new(lin))
}

/// A BERT encoder's parts: `(embeddings, layers)`.
fn bert_parts(bert: BertModel) -> AnyResult<(Slot, Vec<Slot>)> {
    let enc = downcast_box::<BertEncoder>(bert.encoder)
        .map_err(|m| format!("the encoder is a {}, not a BertEncoder", m.kind()))?;
    Ok((bert.embeddings, enc.layers))
}

/// The kind of network the teacher, the meta model and the student are
/// built from: BERT layers on text, ViT layers on images.
#[derive(Debug, Clone)]
pub enum Arch {
    Bert(BertConfig),
    Vit(VitConfig),
}

impl Arch {
    pub fn width(&self) -> i64 {
        match self {
            Arch::Bert(c) => c.hidden_size,
            Arch::Vit(c) => c.hidden_size,
        }
    }

    fn heads(&self) -> i64 {
        match self {
            Arch::Bert(c) => c.num_attention_heads,
            Arch::Vit(c) => c.num_attention_heads,
        }
    }

    fn ff(&self) -> i64 {
        match self {
            Arch::Bert(c) => c.intermediate_size,
            Arch::Vit(c) => c.intermediate_size,
        }
    }

    /// The same kind of network with other sizes.
    fn resized(&self, d: i64, heads: i64, ff: i64, layers: i64) -> Arch {
        match self {
            Arch::Bert(c) => Arch::Bert(BertConfig {
                hidden_size: d,
                num_attention_heads: heads,
                intermediate_size: ff,
                num_hidden_layers: layers,
                ..c.clone()
            }),
            Arch::Vit(c) => Arch::Vit(VitConfig {
                hidden_size: d,
                num_attention_heads: heads,
                intermediate_size: ff,
                num_hidden_layers: layers,
                ..c.clone()
            }),
        }
    }

    /// Freshly initialised `(embeddings, layers)` (seed them with `with_seed`).
    fn parts(&self) -> AnyResult<(Slot, Vec<Slot>)> {
        match self {
            Arch::Bert(c) => bert_parts(BertModel::new(c.clone(), false, Device::Cpu)?),
            Arch::Vit(c) => {
                let (embed, layers, _, _) = VitModel::new(c.clone(), Device::Cpu)?.into_parts();
                Ok((embed, layers))
            }
        }
    }

    /// A fresh head at this width: mean pooling + linear (text), or final
    /// LayerNorm + linear on the class token (images).
    fn head(&self, labels: i64) -> AnyResult<Slot> {
        let d = self.width();
        Ok(match self {
            Arch::Bert(_) => Box::new(MeanPoolHead {
                classifier: linear_head(d, labels)?,
                dropout: 0.1,
            }),
            Arch::Vit(c) => Box::new(ClassTokenHead {
                layernorm: Box::new(LayerNorm::new(d, c.layer_norm_eps, true, Device::Cpu)?),
                classifier: linear_head(d, labels)?,
            }),
        })
    }

    /// The FFN slot of one of this architecture's layers.
    fn ffn_of(layer: &mut Slot) -> AnyResult<&mut Slot> {
        let kind = layer.kind();
        if is::<BertLayer>(layer.as_ref()) {
            if let Some(l) = downcast_mut::<BertLayer>(layer.as_mut()) {
                return Ok(&mut l.ffn);
            }
        } else if let Some(l) = downcast_mut::<PreNormBlock>(layer.as_mut()) {
            return Ok(&mut l.mlp);
        }
        Err(format!("a BERT or ViT layer was expected, not a {kind}").into())
    }

    /// The layer's name on the results pages.
    pub fn layer_name(&self) -> &'static str {
        match self {
            Arch::Bert(_) => "BERT layer",
            Arch::Vit(_) => "ViT layer",
        }
    }

    /// A [`LayerStack`] of fresh parts and a fresh head, under `seed`.
    fn fresh_stack(&self, labels: i64, seed: u64) -> AnyResult<LayerStack> {
        with_seed(seed, || -> AnyResult<LayerStack> {
            let (e, l) = self.parts()?;
            Ok(LayerStack::new(e, l, self.head(labels)?, self.width())?)
        })
    }
}

// ------------------------------------------------------------ data

/// A split's inputs: token ids (text) or pixels (images).
pub enum Inputs {
    Tokens {
        ids: Vec<Vec<i64>>,
        pad: i64,
    },
    /// Row-major pixels of `[channels, rows, cols]` images, one after another.
    Pixels {
        data: Vec<f32>,
        shape: [i64; 3],
    },
}

/// The inputs and labels of a split, in file order (`Sync`: plain vectors,
/// so the modules' threads can share it).
pub struct Encoded {
    pub inputs: Inputs,
    pub labels: Vec<i64>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn text(tok: &TextTokenizer, examples: &[TextExample]) -> AnyResult<Self> {
        Ok(Self {
            inputs: Inputs::Tokens {
                ids: examples
                    .iter()
                    .map(|e| tok.encode_ids(&e.text))
                    .collect::<Result<_, _>>()?,
                pad: tok.pad_id as i64,
            },
            labels: examples.iter().map(|e| e.label).collect(),
        })
    }

    /// The images of `set` at `idx` (in that order).
    fn images(set: &ImageSet, idx: &[usize]) -> AnyResult<Self> {
        let size = set.images.size();
        let [n, c, h, w] = size[..] else {
            return Err(format!("images of shape {size:?}, expected [N, C, H, W]").into());
        };
        let pixels = Vec::<f32>::try_from(set.images.f_contiguous()?.f_view([-1])?)?;
        let labels = Vec::<i64>::try_from(&set.labels)?;
        if labels.len() as i64 != n {
            return Err(format!("{} labels for {n} images", labels.len()).into());
        }
        let per = (c * h * w) as usize;
        let mut data = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            data.extend_from_slice(&pixels[i * per..(i + 1) * per]);
        }
        Ok(Self {
            inputs: Inputs::Pixels {
                data,
                shape: [c, h, w],
            },
            labels: idx.iter().map(|&i| labels[i]).collect(),
        })
    }

    fn batch(&self, idx: &[usize]) -> m2mkd::Result<Batch> {
        let y: Vec<i64> = idx.iter().map(|&i| self.labels[i]).collect();
        let y = Tensor::from_slice(&y);
        match &self.inputs {
            Inputs::Tokens { ids, pad } => {
                let seqs: Vec<&[i64]> = idx.iter().map(|&i| ids[i].as_slice()).collect();
                let b = pad_batch(&seqs, *pad, None, Device::Cpu)
                    .map_err(|e| m2mkd::Error::config(e.to_string()))?;
                Ok(Batch::new(b.input_ids, y).with_mask(b.attention_mask))
            }
            Inputs::Pixels { data, shape } => {
                let per = (shape[0] * shape[1] * shape[2]) as usize;
                let mut x = Vec::with_capacity(idx.len() * per);
                for &i in idx {
                    x.extend_from_slice(&data[i * per..(i + 1) * per]);
                }
                let x = Tensor::from_slice(&x).f_view([
                    idx.len() as i64,
                    shape[0],
                    shape[1],
                    shape[2],
                ])?;
                Ok(Batch::new(x, y))
            }
        }
    }
}

/// Seeded shuffled batches, epoch after epoch.
struct Batches<'a> {
    data: &'a Encoded,
    order: Vec<usize>,
    batch: usize,
}

impl<'a> Batches<'a> {
    fn new(data: &'a Encoded, batch: usize, steps: u64, seed: u64) -> Self {
        let n = data.len();
        let mut order = Vec::with_capacity(steps as usize * batch + n);
        let mut rng = SplitMix64::new(seed ^ 0x0ba7_c4e5);
        while order.len() < steps as usize * batch {
            let mut idx: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut idx);
            order.extend(idx);
        }
        Self { data, order, batch }
    }
}

impl BatchSource for Batches<'_> {
    fn batch(&self, step: u64) -> m2mkd::Result<Batch> {
        let s = step as usize * self.batch;
        let idx = self.order.get(s..s + self.batch).ok_or_else(|| {
            m2mkd::Error::config(format!("batch {step} is beyond the planned steps"))
        })?;
        self.data.batch(idx)
    }
}

/// Metrics and per-example correctness of `model` on `data`.
fn evaluate(model: &dyn Module, data: &Encoded) -> AnyResult<(ClassificationMetrics, Vec<bool>)> {
    let mut preds = Vec::with_capacity(data.len());
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(64) {
        let b = data.batch(chunk)?;
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

/// The first `n` of a fixed seeded permutation of `0..len`.
fn subset_idx(len: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    SplitMix64::new(0x5eed_e7a1).shuffle(&mut idx);
    idx.truncate(n);
    idx
}

fn subset(examples: &[TextExample], n: usize) -> Vec<TextExample> {
    subset_idx(examples.len(), n)
        .into_iter()
        .map(|i| examples[i].clone())
        .collect()
}

// ------------------------------------------------------------ runs

/// A model's scores on one out-of-domain test set.
#[derive(Debug, Clone)]
pub struct OodScores {
    pub name: String,
    pub metrics: ClassificationMetrics,
    /// Whether each example was classified correctly (file order).
    pub correct: Vec<bool>,
}

#[derive(Debug, Clone)]
pub struct Scores {
    pub id: ClassificationMetrics,
    /// Every out-of-domain test set, in [`Setup::test_ood`]'s order (empty
    /// when the data has none).
    pub ood: Vec<OodScores>,
    pub seconds: f64,
    /// Whether each in-domain test example was classified correctly (file order).
    pub id_correct: Vec<bool>,
}

impl Scores {
    /// Accuracy on the first out-of-domain set (NaN without one).
    pub fn ood_accuracy(&self) -> f64 {
        self.ood.first().map_or(f64::NAN, |o| o.metrics.accuracy)
    }
}

pub struct Setup {
    pub arch: Arch,
    pub labels: i64,
    pub train: Encoded,
    pub test_id: Encoded,
    /// Out-of-domain test sets, by name.
    pub test_ood: Vec<(String, Encoded)>,
}

impl Setup {
    /// Tokenise `data` for plan `p`: a seeded subset of `p.train_limit`
    /// training examples, `p.eval_limit` examples of the in-domain test set,
    /// of `test_ood.jsonl` (named "out-of-domain") when present and of each
    /// of `extra_ood`.
    pub fn text(
        p: &Plan,
        base: &BertConfig,
        source: &ModelSource,
        data: &TextClassification,
        extra_ood: &[(String, Vec<TextExample>)],
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
        let mut test_ood = Vec::new();
        let first = data
            .test_ood
            .iter()
            .map(|o| ("out-of-domain".to_owned(), o.clone()));
        for (name, ood) in first.chain(extra_ood.iter().cloned()) {
            if !ood.is_empty() {
                test_ood.push((name, Encoded::text(&tok, &subset(&ood, p.eval_limit))?));
            }
        }
        Ok(Self {
            labels: data.num_labels,
            train: Encoded::text(&tok, &train)?,
            test_id: Encoded::text(&tok, &subset(&data.test, p.eval_limit))?,
            test_ood,
            arch: Arch::Bert(base.clone()),
        })
    }

    /// An image task for plan `p`: a seeded subset of `p.train_limit` of
    /// `train`, `p.eval_limit` of `test`; the teacher is a ViT of `config`.
    pub fn images(
        p: &Plan,
        config: VitConfig,
        train: &ImageSet,
        test: &ImageSet,
    ) -> AnyResult<Self> {
        let n = train.labels.size().first().copied().unwrap_or(0) as usize;
        let mut idx: Vec<usize> = (0..n).collect();
        SplitMix64::new(7).shuffle(&mut idx);
        idx.truncate(p.train_limit);
        let t = test.labels.size().first().copied().unwrap_or(0) as usize;
        if idx.is_empty() || t == 0 {
            return Err("the image task needs training and test images".into());
        }
        let mut test_idx = subset_idx(t, p.eval_limit);
        test_idx.sort_unstable();
        let train = Encoded::images(train, &idx)?;
        let test_id = Encoded::images(test, &test_idx)?;
        let labels = config.num_labels;
        if let Some(bad) = train
            .labels
            .iter()
            .chain(&test_id.labels)
            .find(|&&y| y < 0 || y >= labels)
        {
            return Err(format!("image label {bad} outside 0..{labels} (num_labels)").into());
        }
        Ok(Self {
            arch: Arch::Vit(config),
            labels,
            train,
            test_id,
            test_ood: Vec::new(),
        })
    }

    pub fn train_examples(&self) -> usize {
        self.train.len()
    }
}

/// The student: `p.modules` modules, each one layer of the teacher's kind
/// of width `p.student_width` (4 heads) whose FFN is a top-2 [`MoeLayer`];
/// the first owns the embeddings, the last the head.
fn student(s: &Setup, p: &Plan, seed: u64) -> AnyResult<ModularModel> {
    let d = p.student_width;
    let m = p.modules;
    let arch = s.arch.resized(d, 4, 2 * d, m as i64);
    with_seed(seed, || -> AnyResult<ModularModel> {
        let (embed, layers) = arch.parts()?;
        let mut embed = Some(embed);
        let mut stages = Vec::new();
        for (i, mut layer) in layers.into_iter().enumerate() {
            *Arch::ffn_of(&mut layer)? = Box::new(MoeLayer::new(
                student_moe(d, p.experts, seed.wrapping_add(i as u64)),
                Device::Cpu,
            )?);
            let e = if i == 0 { embed.take() } else { None };
            let h = if i + 1 == m {
                Some(arch.head(s.labels)?)
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
    let (id, id_correct) = evaluate(model, &s.test_id)?;
    let mut ood = Vec::new();
    for (name, o) in &s.test_ood {
        let (metrics, correct) = evaluate(model, o)?;
        ood.push(OodScores {
            name: name.clone(),
            metrics,
            correct,
        });
    }
    Ok(Scores {
        id,
        ood,
        seconds,
        id_correct,
    })
}

/// `what: ID 0.xxxx, NAME 0.xxxx ...` on stderr.
pub fn log_scores(what: &str, s: &Scores) {
    let ood: String = s
        .ood
        .iter()
        .map(|o| format!(", {} {:.4}", o.name, o.metrics.accuracy))
        .collect();
    eprintln!("{what}: ID {:.4}{ood}", s.id.accuracy);
}

pub const STUDENT_LR: f64 = 1e-3;

/// What every seed shares: the data, the trained teacher (whole, frozen),
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

/// Steps 1-3 of the pipeline on text: fine-tune MiniLM (+ mean-pool
/// head) as the teacher, build and train the meta model, incubate the
/// teacher modules (see [`prepare_with`]).
pub fn prepare(p: &Plan, source: &ModelSource, data: &TextClassification) -> AnyResult<Prepared> {
    prepare_text(p, source, data, &[])
}

/// [`prepare`], scoring every model also on the named `extra_ood` test sets.
pub fn prepare_text(
    p: &Plan,
    source: &ModelSource,
    data: &TextClassification,
    extra_ood: &[(String, Vec<TextExample>)],
) -> AnyResult<Prepared> {
    let bert = BertModel::from_source(source, Device::Cpu)?;
    let s = Setup::text(p, &bert.config, source, data, extra_ood)?;
    prepare_with(p, s, Some(bert_parts(bert)?))
}

/// Steps 1-3 on images: a ViT of `config` trained from scratch on `train`
/// as the teacher (seed 0), then the meta model and incubation.
pub fn prepare_images(
    p: &Plan,
    config: VitConfig,
    train: &ImageSet,
    test: &ImageSet,
) -> AnyResult<Prepared> {
    let s = Setup::images(p, config, train, test)?;
    prepare_with(p, s, None)
}

/// Steps 1-3: train the teacher (from `pretrained` embeddings and layers,
/// or from a seed-0 initialisation), build and train the meta model (one
/// layer per module, initialised from the teacher's embeddings, the last
/// layer of each module and the head), then incubate the teacher modules
/// in it.
pub fn prepare_with(
    p: &Plan,
    s: Setup,
    pretrained: Option<(Slot, Vec<Slot>)>,
) -> AnyResult<Prepared> {
    let kd = KdConfig::default();
    let registry = LossRegistry::with_builtins(&kd);
    let (width, labels) = (s.arch.width(), s.labels);

    // 1. The teacher, trained end to end.
    let t0 = Instant::now();
    let teacher = match pretrained {
        Some((embed, layers)) => with_seed(0, || -> AnyResult<LayerStack> {
            Ok(LayerStack::new(embed, layers, s.arch.head(labels)?, width)?)
        })?,
        None => s.arch.fresh_stack(labels, 0)?,
    };
    let depth = teacher.depth();
    let boundaries = Boundaries::even(depth, p.modules)?;
    let tdata = Batches::new(&s.train, p.batch, p.teacher_steps, 0);
    train_end_to_end(
        &teacher,
        None,
        &tdata,
        p.teacher_steps,
        &optim(p.teacher_lr, 0.1),
        &kd,
        0,
    )?;
    let teacher_scores = score(&teacher, &s, t0.elapsed().as_secs_f64())?;
    log_scores("teacher", &teacher_scores);
    let teacher_named = teacher.named_parameters();
    let mut teacher_full = s.arch.fresh_stack(labels, 0)?;
    teacher_full.load_named(&teacher_named, true)?;
    teacher_full.set_trainable("*", false);

    // 2. Meta model: one layer per module, from the last teacher layer of each module.
    let t0 = Instant::now();
    let meta_arch = s.arch.resized(width, s.arch.heads(), s.arch.ff(), 1);
    let builder: Arc<m2mkd::ModuleBuilder> = Arc::new(move |i, m| {
        let build = || -> AnyResult<Slot> {
            let (e, mut l) = meta_arch.parts()?;
            let e = (i == 0).then_some(e);
            let h = if i + 1 == m {
                Some(meta_arch.head(labels)?)
            } else {
                None
            };
            Ok(Box::new(Stage::new(e, vec![l.remove(0)], h, width, i)?))
        };
        build().map_err(|e| m2mkd::Error::config(e.to_string()))
    });
    let mut meta = MetaModel::new(p.modules, width, builder)?;
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
        let mdata = Batches::new(&s.train, p.batch, p.meta_steps, 1);
        train_end_to_end(
            meta.model(),
            None,
            &mdata,
            p.meta_steps,
            &optim(p.teacher_lr, 0.1),
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
            optim: optim(p.teacher_lr / 2.0, 0.1),
            parallel: p.parallel,
            ..DistilConfig::default()
        };
        let idata = Batches::new(&s.train, p.batch, p.incubate_steps, 2);
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
    let distil_data = Batches::new(&s.train, p.batch, distil_steps, seed.wrapping_add(100));
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
    let e2e_data = Batches::new(&s.train, p.batch, e2e, seed.wrapping_add(200));
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
    let data = Batches::new(&s.train, p.batch, steps, seed);
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
    let data = Batches::new(&s.train, p.batch, p.steps, seed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use model_zoo::data::digits;

    #[test]
    fn image_batches_carry_the_chosen_images_in_order() {
        let set = ImageSet {
            images: Tensor::arange(5 * 16, (Kind::Float, Device::Cpu)).view([5, 1, 4, 4]),
            labels: Tensor::from_slice(&[0i64, 1, 2, 3, 4]),
        };
        let e = Encoded::images(&set, &[3, 1]).unwrap();
        assert_eq!(e.labels, vec![3, 1]);
        let b = e.batch(&[1, 0]).unwrap();
        assert!(b.mask.is_none());
        let want = set.images.index_select(0, &Tensor::from_slice(&[1i64, 3]));
        assert!(b.input.equal(&want));
        assert_eq!(Vec::<i64>::try_from(&b.targets).unwrap(), vec![1, 3]);
    }

    /// The whole image pipeline on the 8×8 digits with a tiny ViT: the
    /// student is an MoE-ViT of the planned width, every arm is scored on
    /// every test image, and the same seed gives the same student.
    #[test]
    fn the_image_pipeline_distils_a_vit_into_an_moe_vit() {
        let (train, test) = (digits("train").unwrap(), digits("test").unwrap());
        let config = VitConfig {
            image_size: 8,
            patch_size: 4,
            num_channels: 1,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            num_labels: 10,
            ..VitConfig::default()
        };
        let p = Plan {
            seeds: vec![0],
            steps: 3,
            distil_steps: 2,
            batch: 16,
            train_limit: 200,
            eval_limit: usize::MAX,
            teacher_steps: 3,
            teacher_lr: 1e-3,
            meta_steps: 1,
            incubate_steps: 1,
            modules: 2,
            student_width: 8,
            experts: 2,
            parallel: false,
            ..Plan::default()
        };
        let mut prep = prepare_images(&p, config, &train, &test).unwrap();
        assert_eq!((prep.depth, prep.setup.train_examples()), (2, 200));
        assert_eq!(prep.teacher_scores.id_correct.len(), 359);
        let run = m2mkd_arm(&mut prep, &p, 0, None).unwrap();
        for s in [&run.stitched, &run.assembled, &run.trained] {
            assert_eq!(s.id_correct.len(), 359);
            assert!(s.ood.is_empty());
        }
        let names: Vec<(String, Vec<i64>)> = run
            .model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        let has = |needle: &str| names.iter().any(|(n, _)| n.contains(needle));
        assert!(
            has("cls_token") && has("experts") && has("router"),
            "{names:?}"
        );
        let cls = names.iter().find(|(n, _)| n.contains("cls_token")).unwrap();
        assert_eq!(cls.1, vec![1, 1, 8]);
        let again = scratch(&prep, &p, 0, p.steps).unwrap();
        let first = scratch(&prep, &p, 0, p.steps).unwrap();
        assert_eq!(again.id_correct, first.id_correct);
    }
}
