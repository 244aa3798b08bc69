//! `modular predict`: the labels and class probabilities a classifier
//! written by `modular tune` gives each line of a JSONL file, as JSONL.

use std::io::Write;
use std::path::PathBuf;

use model_zoo::data::load_texts;
use model_zoo::finetune::class_logits;
use serde_json::json;
use tensor_core::tch::Kind;

use super::tuned::load_tuned;
use super::{AnyResult, Flags};

pub const HELP: &str = "\
usage: modular predict TUNED_DIR --data FILE.jsonl [--out FILE.jsonl] [--model DIR]

Classify every line of FILE ({\"text\": \"...\"}; other fields are ignored) with a
classifier written by `modular tune`, and write one JSON line per input line:
{\"line\": N, \"text\": \"...\", \"label\": K, \"probabilities\": [p0, p1, ...]}.

options:
  --data FILE   JSONL input (required)
  --out FILE    output JSONL, written atomically [standard output]
  --model DIR   base encoder folder [tune.json's base_model]

exit codes: 0 written, 1 a file is missing or malformed, 2 a malformed command line.

examples:
  modular predict adapters/sentiment --data reviews.jsonl
  modular predict adapters/sentiment --data reviews.jsonl --out predictions.jsonl";

pub fn run(args: &[String]) -> AnyResult<()> {
    let f = Flags::parse("predict", args, &["--data", "--out", "--model"], &[])?;
    if f.help {
        println!("{HELP}");
        return Ok(());
    }
    let dir = super::one_positional("predict", &f, "tuned folder")?;
    let data = PathBuf::from(f.required("--data")?);
    let out = f.path("--out");
    if let Some(o) = &out {
        f.out_not_input(o, &[("--data", &data), ("TUNED_DIR", &dir)])?;
    }
    if !data.is_file() {
        return Err(format!("data {} is not a file", data.display()).into());
    }
    let device = tensor_core::best();
    let tuned = load_tuned(&dir, f.path("--model").as_deref(), device)?;
    let texts = load_texts(&data)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let probs =
        class_logits(&tuned.model, &tuned.tokenizer, &refs, device)?.f_softmax(-1, Kind::Double)?;
    let k = tuned.num_labels as usize;
    let flat: Vec<f64> = Vec::try_from(probs.f_flatten(0, -1)?)?;
    let mut lines = String::new();
    for (i, (text, p)) in texts.iter().zip(flat.chunks(k)).enumerate() {
        let label = p
            .iter()
            .enumerate()
            .fold(0, |best, (j, &x)| if x > p[best] { j } else { best });
        let row = json!({"line": i + 1, "text": text, "label": label, "probabilities": p});
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    match out {
        Some(o) => {
            super::write_text(&o, &lines)?;
            eprintln!(
                "modular predict: {} predictions written to {}",
                texts.len(),
                o.display()
            );
        }
        None => {
            std::io::stdout()
                .write_all(lines.as_bytes())
                .map_err(|e| format!("write to standard output: {e}"))?;
        }
    }
    Ok(())
}
