//! The orthogonal-merge tasks from `data/` and the hooks that train one
//! adapter per task: orthogonal adaptation (Po et al., CVPR 2024: each task
//! owns one bin of a shared, seeded basis, its frozen factor; the paper
//! freezes the input side) on either side and with an exactly orthogonal
//! (QR) or a Gaussian basis, or plain PEFT-style LoRA. Every task keeps its
//! own linear head; only the encoder deltas are merged. Used by `cargo xtask
//! experiment merge` and the demo's merge step.
//!
//! Tasks: movie-review sentiment, newsgroup topic, and each of the functional
//! corpus's five functionalities as its own one-vs-rest task (is the snippet
//! code? prose? ...); the five share their test inputs, so [`correct_stacked`]
//! scores them in one pass with their heads stacked.

use std::path::Path;

use crate::{AnyResult, repo_root};
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::data::{TextClassification, TextExample};
use model_zoo::finetune::TrainHooks;
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use orthogonal_merge::{
    AdapterConfig, BasisKind, FrozenSide, Merged, Registry, TaskDelta, add_lora, add_orthogonal,
    apply_merged, mark_only_trainable, task_delta,
};
use tensor_core::layers::Linear;
use tensor_core::module::downcast_ref;
use tensor_core::tch::{Device, Tensor};
use tensor_core::train::{BatchPlan, SplitMix64, evaluate, pad_batch_with_labels};

pub const TARGETS: [&str; 2] = ["query", "value"];

fn zoo(e: impl std::fmt::Display) -> model_zoo::Error {
    model_zoo::Error::invalid(e.to_string())
}

/// The arms of the comparison, the paper's variant first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arm {
    /// Orthogonal adaptation as the paper defines it: the input side
    /// `A = B_iᵀ` frozen to the task's bin of an exactly orthogonal (QR) basis.
    OrthogonalInput,
    /// The output side `B` frozen to the task's bin (third-party re-implementations).
    Orthogonal,
    /// The input side frozen to the task's bin of a Gaussian basis (only
    /// near-orthogonal, as the paper's cheap alternative).
    OrthogonalGaussian,
    PlainLora,
}

impl Arm {
    pub const ALL: [Arm; 4] = [
        Arm::OrthogonalInput,
        Arm::Orthogonal,
        Arm::OrthogonalGaussian,
        Arm::PlainLora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arm::OrthogonalInput => "orthogonal, input side frozen (the paper's variant)",
            Arm::Orthogonal => "orthogonal, output side frozen",
            Arm::OrthogonalGaussian => "orthogonal, input side frozen, Gaussian basis",
            Arm::PlainLora => "plain LoRA",
        }
    }

    /// The `--arms` word.
    pub fn flag(self) -> &'static str {
        match self {
            Arm::OrthogonalInput => "input",
            Arm::Orthogonal => "output",
            Arm::OrthogonalGaussian => "gaussian",
            Arm::PlainLora => "plain",
        }
    }

    /// The frozen side of an orthogonal arm.
    pub fn frozen_side(self) -> Option<FrozenSide> {
        match self {
            Arm::Orthogonal => Some(FrozenSide::Output),
            Arm::OrthogonalInput | Arm::OrthogonalGaussian => Some(FrozenSide::Input),
            Arm::PlainLora => None,
        }
    }

    /// The basis of an orthogonal arm.
    pub fn basis(self) -> Option<BasisKind> {
        match self {
            Arm::OrthogonalInput | Arm::Orthogonal => Some(BasisKind::QrBins),
            Arm::OrthogonalGaussian => Some(BasisKind::Gaussian),
            Arm::PlainLora => None,
        }
    }
}

/// One task: a name, what it asks, and its data.
pub struct Task {
    pub name: &'static str,
    pub what: &'static str,
    pub data: TextClassification,
    /// Tasks with the same group share their test inputs (in the same order).
    pub group: &'static str,
}

/// A JSONL file's rows as raw JSON objects (for the files whose label is not `label`).
fn read_rows(path: &Path) -> AnyResult<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: not valid JSON: {e}", path.display(), i + 1).into())
        })
        .collect()
}

fn field<'a>(row: &'a serde_json::Value, key: &str, path: &Path) -> AnyResult<&'a str> {
    row.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("{}: a row without a string '{key}'", path.display()).into())
}

fn classification(
    dir: &Path,
    train: Vec<TextExample>,
    validation: Vec<TextExample>,
    test: Vec<TextExample>,
) -> AnyResult<TextClassification> {
    let num_labels = train.iter().map(|e| e.label).max().unwrap_or(0) + 1;
    if num_labels < 2 || validation.is_empty() || test.is_empty() {
        return Err(format!(
            "{}: a task needs two labels and non-empty splits",
            dir.display()
        )
        .into());
    }
    Ok(TextClassification {
        dir: dir.to_owned(),
        train,
        validation,
        test,
        test_ood: None,
        num_labels,
    })
}

/// The five functionalities of the functional corpus (code, math, prose,
/// shell, translation), each as a one-vs-rest task: label 1 when the snippet
/// has that functionality. The corpus's own train/test split; the same 10%
/// of train held out for validation in every task, and the same test inputs
/// in the same order.
fn functional_tasks(dir: &Path) -> AnyResult<Vec<(String, TextClassification)>> {
    let path = dir.join("functional.jsonl");
    let rows = read_rows(&path)?;
    let mut names: Vec<String> = rows
        .iter()
        .map(|r| field(r, "function", &path).map(str::to_owned))
        .collect::<AnyResult<_>>()?;
    names.sort();
    names.dedup();
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for r in &rows {
        let f = field(r, "function", &path)?;
        let ex = (field(r, "text", &path)?.to_owned(), f.to_owned());
        match field(r, "split", &path)? {
            "test" => test.push(ex),
            _ => train.push(ex),
        }
    }
    SplitMix64::new(0xf0c5).shuffle(&mut train);
    let n_val = train.len() / 10;
    let validation = train.split_off(train.len() - n_val);
    let binary = |rows: &[(String, String)], name: &str| -> Vec<TextExample> {
        rows.iter()
            .map(|(text, f)| TextExample {
                text: text.clone(),
                label: i64::from(f == name),
            })
            .collect()
    };
    names
        .iter()
        .map(|n| {
            let c = classification(
                dir,
                binary(&train, n),
                binary(&validation, n),
                binary(&test, n),
            )?;
            Ok((n.clone(), c))
        })
        .collect()
}

/// The functionality names of the functional corpus, as the tasks call them.
pub const FUNCTIONALITIES: [&str; 5] = ["code", "math", "prose", "shell", "translation"];

pub fn tasks() -> AnyResult<Vec<Task>> {
    let data = repo_root().join("data");
    let mut out = vec![
        Task {
            name: "sentiment",
            what: "positive/negative movie-review sentence (data/sentiment_domains)",
            data: TextClassification::load(data.join("sentiment_domains"))?,
            group: "sentiment",
        },
        Task {
            name: "topic",
            what: "newsgroup topic: comp/rec/sci/talk (data/newsgroups_shift)",
            data: TextClassification::load(data.join("newsgroups_shift"))?,
            group: "topic",
        },
    ];
    let dir = data.join("functional_corpus");
    for (found, c) in functional_tasks(&dir)? {
        let Some(&name) = FUNCTIONALITIES.iter().find(|n| **n == found) else {
            return Err(format!(
                "{}: an unknown functionality '{found}' (expected {FUNCTIONALITIES:?})",
                dir.display()
            )
            .into());
        };
        out.push(Task {
            name,
            what: "is the snippet this functionality, or one of the other four? (data/functional_corpus, one vs rest)",
            data: c,
            group: "functional",
        });
    }
    Ok(out)
}

/// What one training run leaves behind: the encoder delta and the head.
pub struct Trained {
    pub delta: TaskDelta,
    pub head: (Tensor, Option<Tensor>),
}

/// Adds this arm's adapter before training and keeps the result before evaluation.
pub struct MergeHooks<'a> {
    pub arm: Arm,
    pub task: &'static str,
    pub registry: &'a Registry,
    pub rank: i64,
    pub seed: u64,
    pub out: Option<Trained>,
}

impl TrainHooks<SequenceClassifier, model_zoo::Error> for MergeHooks<'_> {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let cfg = AdapterConfig {
            seed: self.seed,
            ..AdapterConfig::new(&TARGETS).with_alpha(2.0 * self.rank as f64)
        };
        match self.arm {
            Arm::Orthogonal | Arm::OrthogonalInput | Arm::OrthogonalGaussian => {
                add_orthogonal(model, self.task, self.registry, &cfg)
            }
            Arm::PlainLora => add_lora(model, self.task, self.rank, &cfg),
        }
        .map_err(zoo)?;
        mark_only_trainable(model, &[], &["classifier.*"]);
        Ok(format!("{} adapter '{}'", self.arm.name(), self.task))
    }

    fn before_eval(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let delta = task_delta(model, self.task).map_err(zoo)?;
        let head = downcast_ref::<Linear>(model.classifier.as_ref())
            .ok_or_else(|| zoo("the classifier head is not a plain Linear"))?;
        let copy = |t: &Tensor| t.detach().copy();
        self.out = Some(Trained {
            delta,
            head: (copy(&head.weight), head.bias.as_ref().map(copy)),
        });
        Ok(String::new())
    }
}

/// The evaluation subset of a test set: the first `limit` after a fixed shuffle.
pub fn eval_subset(examples: &[TextExample], limit: Option<usize>) -> Vec<TextExample> {
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    SplitMix64::new(0xe7a1).shuffle(&mut idx);
    idx.truncate(limit.unwrap_or(usize::MAX).min(examples.len()));
    idx.into_iter().map(|i| examples[i].clone()).collect()
}

/// Tokenised evaluation (or feature) sets.
pub struct Encoded {
    pub ids: Vec<Vec<i64>>,
    pub labels: Vec<i64>,
}

/// `examples` tokenised and sorted by length (stable), so that evaluation
/// batches pad little: the metrics and feature Grams computed on an
/// `Encoded` set are sums over the set and do not depend on its order.
pub fn encode(tok: &TextTokenizer, examples: &[TextExample]) -> AnyResult<Encoded> {
    let mut rows: Vec<(Vec<i64>, i64)> = examples
        .iter()
        .map(|e| Ok((tok.encode_ids(&e.text)?, e.label)))
        .collect::<AnyResult<_>>()?;
    rows.sort_by_key(|(ids, _)| ids.len());
    let (ids, labels) = rows.into_iter().unzip();
    Ok(Encoded { ids, labels })
}

pub fn accuracy(
    model: &SequenceClassifier,
    set: &Encoded,
    pad: i64,
    device: Device,
) -> AnyResult<f64> {
    let plan = BatchPlan::new(set.ids.len(), 64)?;
    let out = evaluate(plan.epoch(0), false, |idx| -> model_zoo::Result<Tensor> {
        let seqs: Vec<&[i64]> = idx.iter().map(|&i| set.ids[i].as_slice()).collect();
        let b = pad_batch_with_labels(&seqs, &vec![0; idx.len()], pad, None, device)?;
        model.logits(&b.input_ids, &b.attention_mask, false)
    })?;
    Ok(out.metrics(&set.labels)?.accuracy)
}

/// A fresh classifier on the base encoder with `head` in place.
pub fn with_head(
    source: &ModelSource,
    head: &(Tensor, Option<Tensor>),
    device: Device,
) -> AnyResult<SequenceClassifier> {
    let bert = BertModel::from_source(source, device)?;
    let n = head.0.size()[0];
    let mut m = SequenceClassifier::new(bert, n, Pooling::Mean)?;
    m.classifier = Box::new(Linear::from_weights(
        head.0.shallow_clone(),
        head.1.as_ref().map(Tensor::shallow_clone),
    )?);
    Ok(m)
}

/// Accuracy of every task with `merged` applied to the base encoder and the task's own head.
pub fn score_merged(
    source: &ModelSource,
    merged: &Merged,
    trained: &[Trained],
    sets: &[Encoded],
    pad: i64,
    device: Device,
) -> AnyResult<Vec<f64>> {
    let mut model = with_head(source, &trained[0].head, device)?;
    apply_merged(&mut model, merged)?;
    let mut out = Vec::new();
    for (t, set) in trained.iter().zip(sets) {
        model.num_labels = t.head.0.size()[0];
        model.classifier = Box::new(Linear::from_weights(
            t.head.0.shallow_clone(),
            t.head.1.as_ref().map(Tensor::shallow_clone),
        )?);
        out.push(accuracy(&model, set, pad, device)?);
    }
    Ok(out)
}

/// Per-example correctness of tasks that share one evaluation set's inputs
/// (`ids`, in `labels`' order), with their heads stacked into one classifier
/// on `model`'s encoder: one forward pass scores all of them. `heads[t]` is
/// task `t`'s `(weight [C_t, d], bias)`.
pub fn correct_stacked(
    model: &mut SequenceClassifier,
    heads: &[&(Tensor, Option<Tensor>)],
    ids: &[Vec<i64>],
    labels: &[&[i64]],
    pad: i64,
    device: Device,
) -> AnyResult<Vec<Vec<bool>>> {
    if heads.len() != labels.len() || labels.iter().any(|l| l.len() != ids.len()) {
        return Err(format!(
            "correct_stacked: {} heads and {} label lists for {} examples",
            heads.len(),
            labels.len(),
            ids.len()
        )
        .into());
    }
    let sizes: Vec<i64> = heads.iter().map(|h| h.0.size()[0]).collect();
    let weight = Tensor::f_cat(&heads.iter().map(|h| &h.0).collect::<Vec<_>>(), 0)?;
    let bias = heads
        .iter()
        .map(|h| match &h.1 {
            Some(b) => Ok(b.shallow_clone()),
            None => Tensor::f_zeros([h.0.size()[0]], (h.0.kind(), h.0.device())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    model.num_labels = sizes.iter().sum();
    model.classifier = Box::new(Linear::from_weights(
        weight,
        Some(Tensor::f_cat(&bias, 0)?),
    )?);
    let mut out = vec![Vec::with_capacity(ids.len()); heads.len()];
    let mut start = 0;
    for chunk in ids.chunks(64) {
        let seqs: Vec<&[i64]> = chunk.iter().map(Vec::as_slice).collect();
        let b = pad_batch_with_labels(&seqs, &vec![0; chunk.len()], pad, None, device)?;
        let logits =
            tensor_core::tch::no_grad(|| model.logits(&b.input_ids, &b.attention_mask, false))?;
        let mut col = 0;
        for (t, &c) in sizes.iter().enumerate() {
            let pred = Vec::<i64>::try_from(logits.f_narrow(1, col, c)?.f_argmax(1, false)?)?;
            col += c;
            for (k, p) in pred.iter().enumerate() {
                out[t].push(*p == labels[t][start + k]);
            }
        }
        start += chunk.len();
    }
    Ok(out)
}
