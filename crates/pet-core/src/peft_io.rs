//! Adapter folders that Python PEFT reads and writes (docs/pet-core.md,
//! Method, part 2 step 8): `adapter_config.json` + `adapter_model.safetensors`, tensor keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`
//! (LoRA) and `base_model.model.<module path>.ia3_l` (IA3), with no adapter
//! name in the key. IA3 vectors are `[out, 1]` (output side) or `[1, in]`
//! (feed-forward, input side).
//!
//! Writing: each layer's `s` is written back as `lora_alpha = s·r` (with
//! `use_rslora = false`), targets as the exact module paths, and layers
//! whose rank or `s` differ from the most common one get `rank_pattern` /
//! `alpha_pattern` entries, so PEFT rebuilds exactly the same `s·BA`.
//! Both files are written to temporary names and renamed.
//!
//! Reading checks everything before the model changes: the PEFT type, the
//! options we do not support (DoRA files, trained biases, `modules_to_save`,
//! `layers_to_transform`), every key's module path and every shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tensor_core::io::{self as tio, SafetensorsFile};
use tensor_core::module::ModuleExt;
use tensor_core::tch::Tensor;

use crate::error::{Error, Result};
use crate::ia3::Ia3;
use crate::linear::{AdaptedLinear, LinearAdapter, LinearDelta};
use crate::lora::{Lora, LoraConfig, LoraScaling};
use crate::model::{AddReport, adapter_names, is_feedforward, linear_paths};
use crate::target::matches_any;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The adapters of `name`, by module path.
fn collect<'a, M: ModuleExt + ?Sized>(
    model: &'a M,
    name: &str,
) -> Vec<(String, &'a LinearAdapter)> {
    let mut out = Vec::new();
    for p in linear_paths(model) {
        if let Ok(m) = model.get(&p)
            && let Some(h) = tensor_core::module::downcast_ref::<AdaptedLinear>(m)
            && let Some(a) = h.adapter(name)
        {
            out.push((p, a));
        }
    }
    out
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

/// Write adapter `name` of `model` as a PEFT folder `dir` (created if needed).
pub fn save_adapter<M: ModuleExt + ?Sized>(
    model: &M,
    name: &str,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let layers = collect(model, name);
    if layers.is_empty() {
        return Err(Error::UnknownAdapter {
            name: name.to_owned(),
            available: adapter_names(model),
        });
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let config = match &layers[0].1.delta {
        LinearDelta::Lora(_) => {
            let mut rs = Vec::new();
            for (p, a) in &layers {
                let LinearDelta::Lora(l) = &a.delta else {
                    return Err(Error::state(format!(
                        "{p}: adapter '{name}' mixes LoRA and other kinds"
                    )));
                };
                if l.is_dora() || a.gate.is_some() {
                    return Err(Error::config(format!(
                        "adapter '{name}': only plain LoRA and IA3 adapters can be written as PEFT files (this one is {})",
                        if l.is_dora() {
                            "DoRA"
                        } else {
                            "gated (LoRA + G)"
                        }
                    )));
                }
                rs.push((l.rank(), l.scale));
                tensors.push((format!("{PREFIX}{p}.lora_A.weight"), l.a.detach()));
                tensors.push((format!("{PREFIX}{p}.lora_B.weight"), l.b.detach()));
            }
            let ranks: Vec<i64> = rs.iter().map(|r| r.0).collect();
            let r0 = most_common(&ranks).unwrap_or(8);
            let scales: Vec<u64> = rs
                .iter()
                .filter(|r| r.0 == r0)
                .map(|r| r.1.to_bits())
                .collect();
            let s0 = f64::from_bits(most_common(&scales).unwrap_or(1f64.to_bits()));
            let (mut rank_pattern, mut alpha_pattern) = (BTreeMap::new(), BTreeMap::new());
            for ((p, _), (r, s)) in layers.iter().zip(&rs) {
                if *r != r0 {
                    rank_pattern.insert(p.clone(), json!(r));
                }
                if *r != r0 || s.to_bits() != s0.to_bits() {
                    alpha_pattern.insert(p.clone(), json!(s * *r as f64));
                }
            }
            json!({
                "peft_type": "LORA",
                "r": r0,
                "lora_alpha": s0 * r0 as f64,
                "lora_dropout": 0.0,
                "target_modules": layers.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
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
        LinearDelta::Ia3(_) => {
            let mut ff = Vec::new();
            for (p, a) in &layers {
                let LinearDelta::Ia3(i) = &a.delta else {
                    return Err(Error::state(format!(
                        "{p}: adapter '{name}' mixes IA3 and other kinds"
                    )));
                };
                if i.on_input {
                    ff.push(p.clone());
                }
                tensors.push((format!("{PREFIX}{p}.ia3_l"), i.to_peft()?));
            }
            json!({
                "peft_type": "IA3",
                "target_modules": layers.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
                "feedforward_modules": ff,
                "fan_in_fan_out": false,
                "init_ia3_weights": true,
                "inference_mode": true,
                "modules_to_save": null,
                "base_model_name_or_path": null,
                "task_type": null,
            })
        }
        LinearDelta::Bottleneck { .. } => {
            return Err(Error::config(format!(
                "adapter '{name}': bottleneck adapters have no PEFT file format; only LoRA and IA3 can be written"
            )));
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e.to_string()))?;
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::file(dir, e.to_string()))?;
    let cfg_path = dir.join(CONFIG_FILE);
    tio::write_atomic(&cfg_path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tio::save(dir.join(WEIGHTS_FILE), &refs, None)?;
    Ok(())
}

fn read_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e.to_string()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::file(&path, "expected a JSON object"));
    }
    Ok((path, v))
}

fn str_list(path: &Path, v: &Value, key: &str) -> Result<Vec<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::file(path, format!("'{key}' must be a list of strings")))
            })
            .collect(),
        Some(Value::String(s)) => Err(Error::file(
            path,
            format!(
                "'{key}' is the regular expression '{s}'; only lists of module names are supported"
            ),
        )),
        Some(_) => Err(Error::file(
            path,
            format!("'{key}' must be a list of strings"),
        )),
    }
}

fn num_map<T>(
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
                    .ok_or_else(|| Error::file(path, format!("'{key}.{k}' must be a number")))
            })
            .collect(),
        Some(_) => Err(Error::file(path, format!("'{key}' must be an object"))),
    }
}

fn refuse_set(path: &Path, v: &Value, key: &str, what: &str) -> Result<()> {
    match v.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(x) => Err(Error::file(
            path,
            format!("'{key}' = {x}: {what} is not supported"),
        )),
    }
}

/// PEFT's contract between a config's `target_modules` and the tensors:
/// every module with tensors must be a target, and every `Linear` of the
/// model the targets name must have tensors. Either way round, a mismatch
/// (a typo in `target_modules`, a file cut short, a config from another
/// adapter) is an error naming the config, the module and the patterns.
fn check_targets<'a>(
    cpath: &Path,
    targets: &[String],
    with_tensors: impl IntoIterator<Item = &'a String>,
    model_linears: &[String],
) -> Result<()> {
    if targets.is_empty() {
        return Err(Error::file(
            cpath,
            "'target_modules' is missing or empty; PEFT needs the list of adapted modules",
        ));
    }
    let with_tensors: Vec<&String> = with_tensors.into_iter().collect();
    if let Some(m) = with_tensors.iter().find(|m| !matches_any(m, targets)) {
        return Err(Error::file(
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
        return Err(Error::file(
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
        return Err(Error::file(
            cpath,
            format!("target_modules entries {unmatched:?} match no Linear module of the model"),
        ));
    }
    Ok(())
}

/// Load a PEFT adapter folder into `model` under `name`. The model must
/// hold every module the file names (as `Linear`s, possibly already adapted).
pub fn load_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    dir: impl AsRef<Path>,
    name: &str,
) -> Result<AddReport> {
    let dir = dir.as_ref();
    let (cpath, cfg) = read_config(dir)?;
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(Error::DuplicateAdapter(name.to_owned()));
    }
    let peft_type = cfg
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::file(&cpath, "missing 'peft_type'"))?
        .to_owned();
    refuse_set(
        &cpath,
        &cfg,
        "modules_to_save",
        "training whole extra modules (modules_to_save)",
    )?;
    refuse_set(
        &cpath,
        &cfg,
        "layers_to_transform",
        "restricting layers (layers_to_transform)",
    )?;
    let wpath = dir.join(WEIGHTS_FILE);
    let file = SafetensorsFile::open(&wpath)?;
    let paths = linear_paths(model);
    // module path -> (suffix -> tensor key)
    let mut by_module: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let suffixes: &[&str] = match peft_type.as_str() {
        "LORA" => &[".lora_A.weight", ".lora_B.weight"],
        "IA3" => &[".ia3_l"],
        other => {
            return Err(Error::file(
                &cpath,
                format!("peft_type '{other}' is not supported (LORA and IA3 are)"),
            ));
        }
    };
    for key in file.names() {
        let rest = key.strip_prefix(PREFIX).ok_or_else(|| {
            Error::file(
                &wpath,
                format!("tensor '{key}' does not start with '{PREFIX}'"),
            )
        })?;
        let (module, suffix) = suffixes
            .iter()
            .find_map(|s| rest.strip_suffix(s).map(|m| (m, *s)))
            .ok_or_else(|| {
                Error::file(
                    &wpath,
                    format!("tensor '{key}' is not a {peft_type} weight (expected a key ending in {suffixes:?})"),
                )
            })?;
        if !paths.iter().any(|p| p == module) {
            return Err(Error::Tensor(tensor_core::Error::unknown(
                format!("Linear module for tensor '{key}'"),
                module,
                paths.clone(),
            )));
        }
        by_module
            .entry(module.to_owned())
            .or_default()
            .insert(suffix.to_owned(), key.clone());
    }
    if by_module.is_empty() {
        return Err(Error::file(&wpath, "holds no adapter tensors"));
    }
    check_targets(
        &cpath,
        &str_list(&cpath, &cfg, "target_modules")?,
        by_module.keys(),
        &paths,
    )?;
    let dev = model
        .named_parameters()
        .first()
        .map(|(_, t)| t.device())
        .unwrap_or(tensor_core::tch::Device::Cpu);
    let mut built = Vec::new();
    match peft_type.as_str() {
        "LORA" => {
            if cfg
                .get("use_dora")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                return Err(Error::file(&cpath, "DoRA adapter files are not supported"));
            }
            match cfg.get("bias").and_then(Value::as_str) {
                None | Some("none") => {}
                Some(b) => {
                    return Err(Error::file(
                        &cpath,
                        format!("bias = '{b}': trained biases are not supported"),
                    ));
                }
            }
            let r = cfg
                .get("r")
                .and_then(Value::as_i64)
                .ok_or_else(|| Error::file(&cpath, "missing integer 'r'"))?;
            let alpha = cfg
                .get("lora_alpha")
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::file(&cpath, "missing number 'lora_alpha'"))?;
            let lcfg = LoraConfig {
                r,
                alpha,
                scaling: if cfg
                    .get("use_rslora")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                {
                    LoraScaling::Rslora
                } else {
                    LoraScaling::AlphaOverR
                },
                target_modules: str_list(&cpath, &cfg, "target_modules")?,
                rank_pattern: num_map(&cpath, &cfg, "rank_pattern", Value::as_i64)?,
                alpha_pattern: num_map(&cpath, &cfg, "alpha_pattern", Value::as_f64)?,
                ..LoraConfig::default()
            };
            if lcfg.r <= 0 {
                return Err(Error::file(
                    &cpath,
                    format!("'r' = {}: the rank must be >= 1", lcfg.r),
                ));
            }
            for (module, keys) in &by_module {
                let (ka, kb) = match (keys.get(".lora_A.weight"), keys.get(".lora_B.weight")) {
                    (Some(a), Some(b)) => (a, b),
                    _ => {
                        return Err(Error::file(
                            &wpath,
                            format!("{module}: needs both lora_A.weight and lora_B.weight"),
                        ));
                    }
                };
                let a = file.load_weight(ka, dev)?;
                let b = file.load_weight(kb, dev)?;
                let (rank, alpha) = lcfg.rank_alpha(module);
                if a.size().first() != Some(&rank) {
                    return Err(Error::file(
                        &wpath,
                        format!(
                            "'{ka}' has shape {:?} but the config gives rank {rank} for {module}",
                            a.size()
                        ),
                    ));
                }
                let w = &base_weight(model, module)?;
                let lora = Lora::from_weights(a, b, lcfg.scale(rank, alpha), w, ka)
                    .map_err(|e| Error::file(&cpath, e.to_string()))?;
                built.push((
                    module.clone(),
                    LinearAdapter::new(name, LinearDelta::Lora(lora), None),
                ));
            }
        }
        _ => {
            let ff = str_list(&cpath, &cfg, "feedforward_modules")?;
            for (module, keys) in &by_module {
                let key = &keys[".ia3_l"];
                let t = file.load_weight(key, dev)?;
                let w = &base_weight(model, module)?;
                let on_input = is_feedforward(module, &ff);
                let ia3 = Ia3::from_peft(&t, w, on_input, key)?;
                built.push((
                    module.clone(),
                    LinearAdapter::new(name, LinearDelta::Ia3(ia3), None),
                ));
            }
        }
    }
    let mut report = AddReport::default();
    for (p, a) in built {
        report.params += a.param_count();
        crate::model::insert_linear_adapter(model, &p, a)?;
        report.paths.push(p);
    }
    Ok(report)
}

fn base_weight<M: ModuleExt + ?Sized>(model: &M, path: &str) -> Result<Tensor> {
    Ok(crate::model::base_linear(model, path)?
        .weight
        .shallow_clone())
}
