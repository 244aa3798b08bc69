//! The adapter folder Python PEFT reads and writes, shared by every crate
//! that saves adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensor keys are `base_model.model.<module path>.<suffix>` with no adapter
//! name in them: `lora_A.weight` (`[r, in]`), `lora_B.weight` (`[out, r]`),
//! `ia3_l` (`[out, 1]` or `[1, in]`), and whole parameters
//! (`base_model.model.classifier.weight`) for `modules_to_save`.
//!
//! For LoRA the config gives `r` and `lora_alpha` with per-module
//! `rank_pattern` / `alpha_pattern`, so `s = lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`). [`lora_config`] writes each layer's
//! `s` back as `lora_alpha = s·r`, targets as exact module paths, and
//! patterns for the layers whose rank or `s` differ from the most common
//! one, so PEFT rebuilds exactly the same `s·BA`. [`LoraHeader::read`]
//! reads any PEFT LoRA config and refuses what we do not support (DoRA
//! files, trained biases, `layers_to_transform`).
//!
//! Both files are written to temporary names and renamed ([`write_folder`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tch::Tensor;

use crate::adapt::target::{matches_any, rank_alpha};
use crate::error::{Error, Result};
use crate::io::{self as tio, SafetensorsFile};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix of every tensor key.
pub const PREFIX: &str = "base_model.model.";

/// `dir/adapter_config.json`, parsed; it must be a JSON object.
pub fn read_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::path(&path, e.to_string()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::path(&path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::path(&path, "expected a JSON object"));
    }
    Ok((path, v))
}

/// The config's `peft_type`.
pub fn peft_type<'a>(path: &Path, v: &'a Value) -> Result<&'a str> {
    v.get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::path(path, "missing 'peft_type'"))
}

/// A list of strings (missing or null: empty). PEFT also allows a regular
/// expression in a string; that is refused by name.
pub fn str_list(path: &Path, v: &Value, key: &str) -> Result<Vec<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::path(path, format!("'{key}' must be a list of strings")))
            })
            .collect(),
        Some(Value::String(s)) => Err(Error::path(
            path,
            format!(
                "'{key}' is the regular expression '{s}'; only lists of module names are supported"
            ),
        )),
        Some(_) => Err(Error::path(
            path,
            format!("'{key}' must be a list of strings"),
        )),
    }
}

/// A map of numbers (missing or null: empty), each converted by `conv`.
pub fn num_map<T>(
    path: &Path,
    v: &Value,
    key: &str,
    conv: impl Fn(&Value) -> Option<T>,
) -> Result<BTreeMap<String, T>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                conv(x)
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| Error::path(path, format!("'{key}.{k}' must be a number")))
            })
            .collect(),
        Some(_) => Err(Error::path(path, format!("'{key}' must be an object"))),
    }
}

/// Refuse an option that is set (not missing, null, false or empty): `what`
/// names the feature in the message.
pub fn refuse_set(path: &Path, v: &Value, key: &str, what: &str) -> Result<()> {
    match v.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(x) => Err(Error::path(
            path,
            format!("'{key}' = {x}: {what} is not supported"),
        )),
    }
}

/// What a PEFT LoRA config says about ranks and scales.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraHeader {
    pub r: i64,
    pub alpha: f64,
    pub rslora: bool,
    pub rank_pattern: BTreeMap<String, i64>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub target_modules: Vec<String>,
}

impl LoraHeader {
    /// Read and check a LoRA config (`path` names it in errors).
    pub fn read(path: &Path, cfg: &Value) -> Result<Self> {
        match peft_type(path, cfg)? {
            "LORA" => {}
            other => {
                return Err(Error::path(
                    path,
                    format!("peft_type '{other}' is not LORA"),
                ));
            }
        }
        if cfg
            .get("use_dora")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return Err(Error::path(
                path,
                "DoRA adapter files are not supported (their change is not s·BA)",
            ));
        }
        match cfg.get("bias").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(b) => {
                return Err(Error::path(
                    path,
                    format!("bias = '{b}': trained biases are not supported"),
                ));
            }
        }
        refuse_set(
            path,
            cfg,
            "layers_to_transform",
            "restricting layers (layers_to_transform)",
        )?;
        Self::ranks(path, cfg, "lora_alpha")
    }

    /// Only the rank and scale fields, with `α` under `alpha_key` (PEFT's
    /// LoHa and LoKr configs call it `alpha`); the config's type is not checked.
    pub fn ranks(path: &Path, cfg: &Value, alpha_key: &str) -> Result<Self> {
        let r = cfg
            .get("r")
            .and_then(Value::as_i64)
            .ok_or_else(|| Error::path(path, "missing integer 'r'"))?;
        if r <= 0 {
            return Err(Error::path(
                path,
                format!("'r' = {r}: the rank must be >= 1"),
            ));
        }
        let alpha = cfg
            .get(alpha_key)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::path(path, format!("missing number '{alpha_key}'")))?;
        Ok(Self {
            r,
            alpha,
            rslora: cfg
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rank_pattern: num_map(path, cfg, "rank_pattern", Value::as_i64)?,
            alpha_pattern: num_map(path, cfg, "alpha_pattern", Value::as_f64)?,
            target_modules: str_list(path, cfg, "target_modules")?,
        })
    }

    /// Rank and `α` of the module at `module` (patterns first).
    pub fn rank_alpha(&self, module: &str) -> (i64, f64) {
        rank_alpha(
            module,
            self.r,
            self.alpha,
            &self.rank_pattern,
            &self.alpha_pattern,
        )
    }

    /// `s` for rank `r` and `α`.
    pub fn scale(&self, r: i64, alpha: f64) -> f64 {
        if self.rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

fn most_common<T: PartialEq + Copy>(xs: &[T]) -> Option<T> {
    let mut best: Option<(T, usize)> = None;
    for &x in xs {
        let c = xs.iter().filter(|&&y| y == x).count();
        if best.is_none_or(|(_, bc)| c > bc) {
            best = Some((x, c));
        }
    }
    best.map(|(x, _)| x)
}

/// The most common rank `r0` and, among its layers, the most common `s0`,
/// with the per-module patterns that give every other layer of `layers` =
/// `(module path, rank, s)` its own rank and `α = s·r`: PEFT then rebuilds
/// `s = α / r` exactly on every layer. Returns `(r0, α0, rank_pattern, alpha_pattern)`.
pub fn rank_alpha_patterns(layers: &[(String, i64, f64)]) -> (i64, f64, Value, Value) {
    let ranks: Vec<i64> = layers.iter().map(|l| l.1).collect();
    let r0 = most_common(&ranks).unwrap_or(8);
    let scales: Vec<u64> = layers
        .iter()
        .filter(|l| l.1 == r0)
        .map(|l| l.2.to_bits())
        .collect();
    let s0 = f64::from_bits(most_common(&scales).unwrap_or(1f64.to_bits()));
    let (mut rank_pattern, mut alpha_pattern) = (BTreeMap::new(), BTreeMap::new());
    for (p, r, s) in layers {
        if *r != r0 {
            rank_pattern.insert(p.clone(), json!(r));
        }
        if *r != r0 || s.to_bits() != s0.to_bits() {
            alpha_pattern.insert(p.clone(), json!(s * *r as f64));
        }
    }
    (
        r0,
        s0 * r0 as f64,
        json!(rank_pattern),
        json!(alpha_pattern),
    )
}

/// The PEFT LoRA config for `layers` = `(module path, rank, s)`, so that
/// PEFT rebuilds each layer's `s·BA` exactly. Callers add their own keys
/// (`modules_to_save`, metadata) to the object it returns.
pub fn lora_config(layers: &[(String, i64, f64)]) -> Value {
    let (r0, alpha0, rank_pattern, alpha_pattern) = rank_alpha_patterns(layers);
    json!({
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": 0.0,
        "target_modules": layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "bias": "none",
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "base_model_name_or_path": null,
        "task_type": null,
    })
}

/// Write `config` and `tensors` (full keys) as the folder `dir`, created
/// if needed; each file goes to a temporary name first and is renamed.
pub fn write_folder(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::path(dir, e.to_string()))?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::path(dir, e.to_string()))?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tio::save(dir.join(WEIGHTS_FILE), &refs, None)?;
    tio::write_atomic(&dir.join(CONFIG_FILE), |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|source| Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })
}

/// `module path -> key suffix -> full tensor key`.
pub type KeysByModule = BTreeMap<String, BTreeMap<String, String>>;

/// The weights file's keys grouped by module: `module path -> suffix -> key`.
/// A key that is not under [`PREFIX`], or that ends in none of `suffixes`
/// and is not accepted by `extra` (e.g. a `modules_to_save` parameter), is
/// an error naming it. Keys accepted by `extra` are returned apart.
pub fn group_keys(
    wpath: &Path,
    file: &SafetensorsFile,
    suffixes: &[&str],
    what: &str,
    extra: impl Fn(&str) -> bool,
) -> Result<(KeysByModule, Vec<String>)> {
    let mut by_module = KeysByModule::new();
    let mut others = Vec::new();
    for key in file.names() {
        let rest = key.strip_prefix(PREFIX).ok_or_else(|| {
            Error::path(
                wpath,
                format!("tensor '{key}' does not start with '{PREFIX}'"),
            )
        })?;
        if let Some((module, suffix)) = suffixes
            .iter()
            .find_map(|s| rest.strip_suffix(s).map(|m| (m, *s)))
        {
            by_module
                .entry(module.to_owned())
                .or_default()
                .insert(suffix.to_owned(), key.clone());
        } else if extra(rest) {
            others.push(key.clone());
        } else {
            return Err(Error::path(
                wpath,
                format!(
                    "tensor '{key}' is not a {what} weight (expected a key ending in {suffixes:?})"
                ),
            ));
        }
    }
    if by_module.is_empty() {
        return Err(Error::path(wpath, format!("holds no {what} tensors")));
    }
    Ok((by_module, others))
}

/// PEFT's contract between a config's `target_modules` and the tensors:
/// every module with tensors is a target, every `Linear` of the model the
/// targets name has tensors, and every target names some `Linear`. A
/// mismatch (a typo, a file cut short, a config from another adapter) is an
/// error naming the config, the module and the patterns.
pub fn check_targets<'a>(
    cpath: &Path,
    targets: &[String],
    with_tensors: impl IntoIterator<Item = &'a String>,
    model_linears: &[String],
) -> Result<()> {
    if targets.is_empty() {
        return Err(Error::path(
            cpath,
            "'target_modules' is missing or empty; PEFT needs the list of adapted modules",
        ));
    }
    let with_tensors: Vec<&String> = with_tensors.into_iter().collect();
    if let Some(m) = with_tensors.iter().find(|m| !matches_any(m, targets)) {
        return Err(Error::path(
            cpath,
            format!(
                "the weights file has tensors for '{m}', which target_modules {targets:?} does not name"
            ),
        ));
    }
    if let Some(p) = model_linears
        .iter()
        .find(|p| matches_any(p, targets) && !with_tensors.contains(p))
    {
        return Err(Error::path(
            cpath,
            format!(
                "target_modules {targets:?} names '{p}', but the weights file has no tensors for it"
            ),
        ));
    }
    let unmatched: Vec<&String> = targets
        .iter()
        .filter(|t| {
            !model_linears
                .iter()
                .any(|p| matches_any(p, std::slice::from_ref(t)))
        })
        .collect();
    if !unmatched.is_empty() {
        return Err(Error::path(
            cpath,
            format!("target_modules entries {unmatched:?} match no Linear module of the model"),
        ));
    }
    Ok(())
}
