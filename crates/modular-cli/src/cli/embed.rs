//! `modular embed`: sentence embeddings of a JSONL file's texts, as the
//! encoder's sentence-transformers configuration defines them (mean pooling
//! over the tokens, L2-normalised when the folder's `modules.json` says so),
//! written to safetensors or JSONL.

use std::path::PathBuf;

use model_zoo::bert::SentenceEncoder;
use model_zoo::data::load_texts;
use model_zoo::source::ModelSource;
use serde_json::json;
use tensor_core::tch::{Device, Tensor};

use super::{AnyResult, Flags, require_model_dir};

pub const HELP: &str = "\
usage: modular embed --data FILE.jsonl --out FILE.safetensors|FILE.jsonl [--model DIR] [--batch 64]

Embed the text of every line of FILE ({\"text\": \"...\"}; other fields are ignored)
with a sentence encoder (the packaged all-MiniLM-L6-v2 unless --model): mean pooling,
then L2 normalisation when the model folder's modules.json has a Normalize module,
as sentence-transformers does.

  --out X.safetensors   one f32 tensor 'embeddings' [lines, width], row i = line i
  --out X.jsonl         one line per input: {\"line\": N, \"embedding\": [...]}

options:
  --data FILE   JSONL input (required)
  --out FILE    output, written atomically (required; format from its extension)
  --model DIR   encoder folder (config.json, model.safetensors, tokenizer.json)
  --batch N     texts per forward pass [64]

exit codes: 0 written, 1 a file is missing or malformed, 2 a malformed command line.

examples:
  modular embed --data corpus.jsonl --out corpus.safetensors
  modular embed --data queries.jsonl --out queries.jsonl --model models/MiniLM-L6";

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(f) = Flags::parse_options(
        "embed",
        args,
        &["--data", "--out", "--model", "--batch"],
        &[],
        HELP,
    )?
    else {
        return Ok(());
    };
    let data = PathBuf::from(f.required("--data")?);
    let out = PathBuf::from(f.required("--out")?);
    let batch = f.positive_or("--batch", 64)?;
    let format = match out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => "safetensors",
        Some("jsonl") => "jsonl",
        _ => {
            return super::usage(
                "embed",
                format!(
                    "--out {}: name a .safetensors or a .jsonl file",
                    out.display()
                ),
            );
        }
    };
    let model_flag = f.path("--model");
    if let Some(m) = &model_flag {
        require_model_dir(m)?;
    }
    let source = ModelSource::resolve(model_flag.as_deref())?;
    f.out_not_input(&out, &[("--data", &data), ("--model", &source.dir)])?;
    if !data.is_file() {
        return Err(format!("data {} is not a file", data.display()).into());
    }
    let texts = load_texts(&data)?;
    let device = tensor_core::best();
    let enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let mut parts = Vec::new();
    for chunk in texts.chunks(batch) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        parts.push(enc.embed(&refs)?.f_to_device(Device::Cpu)?);
    }
    let all = Tensor::f_cat(&parts, 0)?;
    match format {
        "safetensors" => {
            let meta = std::collections::HashMap::from([
                ("model".to_owned(), source.dir.display().to_string()),
                ("normalized".to_owned(), enc.normalize.to_string()),
                ("source".to_owned(), data.display().to_string()),
            ]);
            tensor_core::io::save(&out, &[("embeddings", &all)], Some(meta))?;
        }
        _ => {
            let width = all.size()[1] as usize;
            let flat: Vec<f32> = Vec::try_from(all.f_flatten(0, -1)?)?;
            let mut lines = String::new();
            for (i, row) in flat.chunks(width).enumerate() {
                lines.push_str(&json!({"line": i + 1, "embedding": row}).to_string());
                lines.push('\n');
            }
            super::write_text(&out, &lines)?;
        }
    }
    println!(
        "modular embed: {} embeddings of width {} ({}) written to {}",
        texts.len(),
        all.size()[1],
        if enc.normalize {
            "L2-normalised"
        } else {
            "not normalised"
        },
        out.display()
    );
    Ok(())
}
