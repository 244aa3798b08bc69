//! The orthogonal-merge tasks from `data/` and the hooks that train one
//! adapter per task: orthogonal adaptation (Po et al., CVPR 2024: each task
//! owns one bin of a shared, seeded orthogonal basis, its frozen factor) on
//! either side, or plain PEFT-style LoRA. Every task keeps its own linear
//! head; only the encoder deltas are merged. Used by `cargo xtask experiment
//! merge` and the demo's merge step.

use std::path::Path;

use crate::{AnyResult, repo_root};
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::data::{TextClassification, TextExample, load_jsonl};
use model_zoo::finetune::FinetuneHooks;
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use model_zoo::train::{BatchPlan, SplitMix64, evaluate, pad_batch_with_labels};
use orthogonal_merge::{
    AdapterConfig, FrozenSide, Merged, Registry, TaskDelta, add_lora, add_orthogonal, apply_merged,
    mark_only_trainable, task_delta,
};
use tensor_core::layers::Linear;
use tensor_core::module::downcast_ref;
use tensor_core::tch::{Device, Tensor};

pub const TARGETS: [&str; 2] = ["query", "value"];

fn zoo(e: impl std::fmt::Display) -> model_zoo::Error {
    model_zoo::Error::invalid(e.to_string())
}

/// The arms of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arm {
    /// Orthogonal adaptation, output side `B` frozen to the task's bin.
    Orthogonal,
    /// Orthogonal adaptation, input side `A = B_iᵀ` frozen to the task's bin.
    OrthogonalInput,
    PlainLora,
}

impl Arm {
    pub const ALL: [Arm; 3] = [Arm::Orthogonal, Arm::OrthogonalInput, Arm::PlainLora];

    pub fn name(self) -> &'static str {
        match self {
            Arm::Orthogonal => "orthogonal (output side frozen to the task's bin)",
            Arm::OrthogonalInput => "orthogonal (input side frozen to the task's bin)",
            Arm::PlainLora => "plain LoRA",
        }
    }

    /// The `--arms` word.
    pub fn flag(self) -> &'static str {
        match self {
            Arm::Orthogonal => "output",
            Arm::OrthogonalInput => "input",
            Arm::PlainLora => "plain",
        }
    }

    /// The frozen side of an orthogonal arm.
    pub fn frozen_side(self) -> Option<FrozenSide> {
        match self {
            Arm::Orthogonal => Some(FrozenSide::Output),
            Arm::OrthogonalInput => Some(FrozenSide::Input),
            Arm::PlainLora => None,
        }
    }
}

/// One task: a name, what it asks, and its data.
pub struct Task {
    pub name: &'static str,
    pub what: &'static str,
    pub data: TextClassification,
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

/// Split `rows` (already in a seeded order) into train / validation / test by fractions.
fn three_way(
    rows: Vec<TextExample>,
    val: f64,
    test: f64,
) -> (Vec<TextExample>, Vec<TextExample>, Vec<TextExample>) {
    let n = rows.len();
    let n_test = (n as f64 * test).round() as usize;
    let n_val = (n as f64 * val).round() as usize;
    let mut rows = rows;
    let test_rows = rows.split_off(n - n_test);
    let val_rows = rows.split_off(n - n_test - n_val);
    (rows, val_rows, test_rows)
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

/// The functional corpus: which of five functionalities (code, prose,
/// translation, math, shell) a snippet is; its own train/test split, 10% of
/// train held out for validation.
fn functionality_task(dir: &Path) -> AnyResult<TextClassification> {
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
        let label = names.iter().position(|n| n == f).unwrap_or(0) as i64;
        let ex = TextExample {
            text: field(r, "text", &path)?.to_owned(),
            label,
        };
        match field(r, "split", &path)? {
            "test" => test.push(ex),
            _ => train.push(ex),
        }
    }
    SplitMix64::new(0xf0c5).shuffle(&mut train);
    let n_val = train.len() / 10;
    let validation = train.split_off(train.len() - n_val);
    classification(dir, train, validation, test)
}

/// Where a review sentence comes from: movie review, Amazon product review
/// or tweet (the three domains of the sentiment data; sentiment labels are
/// ignored). 1500 sentences per source, split 70/10/20 after a seeded shuffle.
fn source_task(dir: &Path) -> AnyResult<TextClassification> {
    let mut all = Vec::new();
    for (label, file) in ["train.jsonl", "test_ood.jsonl", "test_ood_tweets.jsonl"]
        .into_iter()
        .enumerate()
    {
        let mut rows = load_jsonl(dir.join(file))?;
        SplitMix64::new(0x50_0c + label as u64).shuffle(&mut rows);
        rows.truncate(1500);
        all.extend(rows.into_iter().map(|e| TextExample {
            text: e.text,
            label: label as i64,
        }));
    }
    SplitMix64::new(0x50_0ce).shuffle(&mut all);
    let (train, validation, test) = three_way(all, 0.1, 0.2);
    classification(dir, train, validation, test)
}

pub fn tasks() -> AnyResult<Vec<Task>> {
    let data = repo_root().join("data");
    Ok(vec![
        Task {
            name: "sentiment",
            what: "positive/negative movie-review sentence (data/sentiment_domains)",
            data: TextClassification::load(data.join("sentiment_domains"))?,
        },
        Task {
            name: "topic",
            what: "newsgroup topic: comp/rec/sci/talk (data/newsgroups_shift)",
            data: TextClassification::load(data.join("newsgroups_shift"))?,
        },
        Task {
            name: "functionality",
            what: "code / prose / translation / math / shell snippet (data/functional_corpus)",
            data: functionality_task(&data.join("functional_corpus"))?,
        },
        Task {
            name: "source",
            what: "movie review / Amazon review / tweet (texts of data/sentiment_domains, sentiment ignored)",
            data: source_task(&data.join("sentiment_domains"))?,
        },
    ])
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

impl FinetuneHooks for MergeHooks<'_> {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let cfg = AdapterConfig {
            seed: self.seed,
            ..AdapterConfig::new(&TARGETS).with_alpha(2.0 * self.rank as f64)
        };
        match self.arm {
            Arm::Orthogonal | Arm::OrthogonalInput => {
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
