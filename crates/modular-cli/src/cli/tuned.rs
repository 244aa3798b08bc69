//! What `modular tune` wrote, read back as one classifier: the base encoder
//! named in `tune.json` (or `--model`), the adapter (a PEFT LoRA folder, or
//! VL-PET's config and trained tensors) and the classification head. `eval`
//! and `predict` score text with it.
//!
//! Every file is checked as it is read: the record's format and fields, the
//! adapter through pet-core's loader (PEFT's target rules, finite float
//! weights), and the head or VL-PET tensors, which must each be a parameter
//! of the rebuilt model with its shape, none missing.

use std::path::{Path, PathBuf};

use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::data::MAX_LABELS;
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use pet_core::{VlPetConfig, apply_vlpet, load_adapter};
use serde_json::Value;
use tensor_core::io::SafetensorsFile;
use tensor_core::module::ModuleExt;
use tensor_core::seed::with_seed;
use tensor_core::tch::Device;

use super::tune::{ADAPTER, HEAD_FILE, VLPET_CONFIG, VLPET_WEIGHTS};
use super::{AnyResult, read_json, require_dir, require_model_dir};

/// A classifier rebuilt from a `modular tune` folder.
pub struct Tuned {
    pub model: SequenceClassifier,
    pub tokenizer: TextTokenizer,
    pub num_labels: i64,
    /// `lora` or `vlpet`.
    pub method: String,
    /// The base encoder's folder.
    pub base: PathBuf,
    /// The parsed `tune.json`.
    pub record: Value,
}

/// Rebuild the classifier `dir` holds, on `device`; `model` overrides the
/// base encoder folder that `tune.json` names.
pub fn load_tuned(dir: &Path, model: Option<&Path>, device: Device) -> AnyResult<Tuned> {
    require_dir(dir, "tuned folder")?;
    let rec_path = dir.join("tune.json");
    if !rec_path.is_file() {
        return Err(format!(
            "{} has no tune.json (pass a folder written by `modular tune`)",
            dir.display()
        )
        .into());
    }
    let record = read_json(&rec_path)?;
    let bad = |what: String| format!("{}: {what}", rec_path.display());
    if record["format"] != "modular-tune" {
        return Err(bad(format!(
            "format is {}, not \"modular-tune\" (not written by `modular tune`)",
            record["format"]
        ))
        .into());
    }
    let method = record["method"]
        .as_str()
        .ok_or_else(|| bad("missing string 'method'".into()))?
        .to_owned();
    let num_labels = record["num_labels"]
        .as_i64()
        .filter(|k| (2..=MAX_LABELS).contains(k))
        .ok_or_else(|| {
            bad(format!(
                "'num_labels' must be an integer in 2..={MAX_LABELS}, got {}",
                record["num_labels"]
            ))
        })?;
    let max_len = record["options"]["max_len"]
        .as_u64()
        .filter(|&m| m >= 2)
        .ok_or_else(|| bad("'options.max_len' must be an integer >= 2".into()))?
        as usize;
    let base = match model {
        Some(m) => m.to_owned(),
        None => PathBuf::from(
            record["base_model"]
                .as_str()
                .ok_or_else(|| bad("missing string 'base_model' (or pass --model)".into()))?,
        ),
    };
    require_model_dir(&base).map_err(|e| {
        if model.is_none() {
            format!("{e} (the base model tune.json names; pass --model to use another copy)")
        } else {
            e.to_string()
        }
    })?;
    let source = ModelSource::resolve(Some(&base))?;
    let bert = BertModel::from_source(&source, device)?;
    let d_model = bert.hidden_size();
    let tokenizer = TextTokenizer::from_file(
        source.tokenizer_path(),
        max_len.min(bert.config.max_position_embeddings.max(2) as usize),
        bert.config.vocab_size,
    )?;
    let mut model = with_seed(0, || {
        SequenceClassifier::new(bert, num_labels, Pooling::Mean)
    })?;
    let (weights, expected): (PathBuf, Vec<String>) = match method.as_str() {
        "lora" => {
            load_adapter(&mut model, ADAPTER, dir)?;
            let head = model
                .named_parameters()
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| n.starts_with("classifier."))
                .collect();
            (dir.join(HEAD_FILE), head)
        }
        "vlpet" => {
            let cpath = dir.join(VLPET_CONFIG);
            let doc = read_json(&cpath)?;
            let cfg: VlPetConfig = serde_json::from_value(doc["vlpet"].clone())
                .map_err(|e| format!("{}: 'vlpet' is malformed: {e}", cpath.display()))?;
            apply_vlpet(&mut model, ADAPTER, &cfg, d_model)?;
            let trained = model
                .trainable_parameters()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            (dir.join(VLPET_WEIGHTS), trained)
        }
        other => {
            return Err(bad(format!("unknown method '{other}' (lora or vlpet)")).into());
        }
    };
    let file = SafetensorsFile::open(&weights)?;
    let shapes: std::collections::HashMap<String, Vec<i64>> = model
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.size()))
        .collect();
    let mut values = Vec::new();
    for name in file.names() {
        let Some(shape) = shapes.get(&name) else {
            return Err(format!(
                "{}: tensor '{name}' is not a parameter of the rebuilt {method} classifier",
                weights.display()
            )
            .into());
        };
        let t = file.load_weight(&name, device)?;
        if &t.size() != shape {
            return Err(format!(
                "{}: tensor '{name}' has shape {:?}, the model's parameter {shape:?}",
                weights.display(),
                t.size(),
            )
            .into());
        }
        values.push((name, t));
    }
    if let Some(missing) = expected
        .iter()
        .find(|n| !values.iter().any(|(v, _)| v == *n))
    {
        return Err(format!(
            "{}: no tensor for '{missing}' ({} expected)",
            weights.display(),
            expected.len()
        )
        .into());
    }
    model.load_named(&values, false)?;
    Ok(Tuned {
        model,
        tokenizer,
        num_labels,
        method,
        base,
        record,
    })
}
