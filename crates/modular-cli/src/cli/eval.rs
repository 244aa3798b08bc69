//! `modular eval`: score a classifier written by `modular tune` on labelled
//! text: accuracy, macro-F1, Matthews' correlation and the confusion matrix
//! per set.
//!
//! Without `--data` it scores the data the run was tuned on, split as `tune`
//! split it (its seed), so the accuracy `tune` printed is reproduced; with a
//! dataset folder it scores `validation.jsonl`, `test_id.jsonl` and
//! `test_ood.jsonl` where present; with a JSONL file, every line of it.

use std::path::{Path, PathBuf};

use model_zoo::data::{TextExample, load_jsonl};
use model_zoo::finetune::class_logits;
use serde_json::json;
use tensor_core::tch::{Device, Kind};
use tensor_core::train::{ClassificationMetrics, ConfusionMatrix};

use super::tune::load_data;
use super::tuned::{Tuned, load_tuned};
use super::{AnyResult, Flags};

pub const HELP: &str = "\
usage: modular eval TUNED_DIR [--data FILE.jsonl|DIR] [--model DIR] [--json]

Score a classifier written by `modular tune` (LoRA or VL-PET adapter with its head)
on labelled JSONL ({\"text\": \"...\", \"label\": 0} per line): accuracy, macro-F1,
Matthews' correlation (MCC) and the confusion matrix of each set.

  (no --data)   the data tune.json names, split as tune split it: reproduces the
                accuracy tune printed
  --data DIR    its validation.jsonl, test_id.jsonl and test_ood.jsonl, those present
  --data FILE   every line of FILE

options:
  --data P      JSONL file or dataset folder [tune.json's data]
  --model DIR   base encoder folder [tune.json's base_model]
  --json        print one JSON document instead of tables

exit codes: 0 scored, 1 a file is missing or malformed, 2 a malformed command line.

examples:
  modular eval adapters/sentiment
  modular eval adapters/sentiment --data data/sentiment_domains/test_ood_tweets.jsonl
  modular eval adapters/sentiment --data data/sentiment_domains --json > scores.json";

/// The scores of one labelled set.
#[derive(Debug, Clone)]
pub struct SetScores {
    pub name: String,
    pub metrics: ClassificationMetrics,
    pub confusion: ConfusionMatrix,
}

/// Score `tuned` on `examples`; a label outside the classifier's classes is
/// an error naming `source` and the example's position.
pub fn score_set(
    tuned: &Tuned,
    name: &str,
    source: &Path,
    examples: &[TextExample],
    device: Device,
) -> AnyResult<SetScores> {
    if let Some((i, e)) = examples
        .iter()
        .enumerate()
        .find(|(_, e)| e.label >= tuned.num_labels)
    {
        return Err(format!(
            "{}: example {} has label {}, but the classifier has {} classes (0..{})",
            source.display(),
            i + 1,
            e.label,
            tuned.num_labels,
            tuned.num_labels - 1
        )
        .into());
    }
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let logits = class_logits(&tuned.model, &tuned.tokenizer, &texts, device)?;
    let predictions: Vec<i64> = Vec::try_from(logits.f_argmax(-1, false)?.f_to_kind(Kind::Int64)?)?;
    let labels: Vec<i64> = examples.iter().map(|e| e.label).collect();
    Ok(SetScores {
        name: name.to_owned(),
        metrics: ClassificationMetrics::new(&predictions, &labels)?,
        confusion: ConfusionMatrix::new(&predictions, &labels)?,
    })
}

/// The labelled sets `--data` (or the run's own data) names.
fn sets(tuned: &Tuned, data: Option<&Path>) -> AnyResult<Vec<(String, PathBuf, Vec<TextExample>)>> {
    match data {
        Some(p) if p.is_dir() => {
            let mut out = Vec::new();
            for f in ["validation", "test_id", "test_ood"] {
                let path = p.join(format!("{f}.jsonl"));
                if path.is_file() {
                    let ex = load_jsonl(&path)?;
                    out.push((f.to_owned(), path, ex));
                }
            }
            if out.is_empty() {
                return Err(format!(
                    "dataset folder {} has none of validation.jsonl, test_id.jsonl, test_ood.jsonl",
                    p.display()
                )
                .into());
            }
            Ok(out)
        }
        Some(p) => {
            if !p.exists() {
                return Err(format!("data {} does not exist", p.display()).into());
            }
            let name = p
                .file_stem()
                .map_or("data".into(), |s| s.to_string_lossy().into_owned());
            Ok(vec![(name, p.to_owned(), load_jsonl(p)?)])
        }
        None => {
            let rec = &tuned.record;
            let data = rec["data"]
                .as_str()
                .ok_or("tune.json names no 'data'; pass --data")?;
            let seed = rec["options"]["seed"].as_u64().unwrap_or(0);
            let path = PathBuf::from(data);
            let (d, has_test) = load_data(&path, seed).map_err(|e| {
                format!("{e} (the data tune.json names; pass --data to score other data)")
            })?;
            let mut out = vec![("validation".to_owned(), path.clone(), d.validation)];
            if has_test {
                out.push(("test_id".to_owned(), path.join("test_id.jsonl"), d.test));
            }
            if let Some(ood) = d.test_ood {
                out.push(("test_ood".to_owned(), path.join("test_ood.jsonl"), ood));
            }
            Ok(out)
        }
    }
}

fn confusion_json(c: &ConfusionMatrix) -> serde_json::Value {
    json!({"classes": c.classes, "counts": c.counts, "rows": "true class", "columns": "predicted class"})
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let f = Flags::parse("eval", args, &["--data", "--model"], &["--json"])?;
    if f.help {
        println!("{HELP}");
        return Ok(());
    }
    let dir = super::one_positional("eval", &f, "tuned folder")?;
    let device = tensor_core::best();
    let tuned = load_tuned(&dir, f.path("--model").as_deref(), device)?;
    let sets = sets(&tuned, f.path("--data").as_deref())?;
    let mut scored = Vec::new();
    for (name, path, examples) in &sets {
        scored.push(score_set(&tuned, name, path, examples, device)?);
    }
    if f.switch("--json") {
        let doc = json!({
            "tuned": dir.display().to_string(),
            "method": tuned.method,
            "base_model": tuned.base.display().to_string(),
            "sets": scored.iter().zip(&sets).map(|(s, (_, path, _))| json!({
                "name": s.name,
                "file": path.display().to_string(),
                "examples": s.metrics.examples,
                "accuracy": s.metrics.accuracy,
                "macro_f1": s.metrics.macro_f1,
                "mcc": s.metrics.mcc,
                "confusion": confusion_json(&s.confusion),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("modular eval");
    println!(
        "  tuned    {} ({}, base {})",
        dir.display(),
        tuned.method,
        tuned.base.display()
    );
    for s in &scored {
        println!(
            "  accuracy {:<10} {:.4} (macro-F1 {:.4}, MCC {:.4}, {} examples)",
            s.name, s.metrics.accuracy, s.metrics.macro_f1, s.metrics.mcc, s.metrics.examples
        );
        let head: Vec<String> = s
            .confusion
            .classes
            .iter()
            .map(|c| format!("{c:>6}"))
            .collect();
        println!("    confusion (rows: true class, columns: predicted)");
        println!("    {:>6} {}", "", head.join(" "));
        for (c, row) in s.confusion.classes.iter().zip(&s.confusion.counts) {
            let cells: Vec<String> = row.iter().map(|n| format!("{n:>6}")).collect();
            println!("    {c:>6} {}", cells.join(" "));
        }
    }
    Ok(())
}
