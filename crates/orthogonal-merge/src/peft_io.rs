//! PEFT-style LoRA adapter folders, read and written here (the layout of
//! docs/pet-core.md, Method, part 2 step 8; this crate does not depend on `pet-core`):
//! `adapter_config.json` + `adapter_model.safetensors`, tensor keys
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and
//! `.lora_B.weight` (`[out, r]`), no adapter name in the key, and
//! `base_model.model.<parameter>` for `modules_to_save` (e.g. a task's
//! classifier head, as PEFT stores it).
//!
//! ```text
//! ΔW = s · B A,   s = lora_alpha / r   (lora_alpha / √r with use_rslora)
//! ```
//!
//! Writing: `lora_alpha = s·r` with `use_rslora = false`, targets as exact
//! module paths, `rank_pattern` / `alpha_pattern` for layers whose rank or
//! `s` differ from the most common one, and a `modular_orthogonal` block
//! ([`AdapterMeta`]: concept, basis, seed, rank, frozen side, bin, the base
//! weights' norms). PEFT ignores the extra key (with a warning) and loads
//! the file as a plain LoRA, which it is: the frozen basis is stored as the
//! factor it is. Both files are written atomically.
//!
//! Reading accepts any PEFT LoRA file (ours, PEFT's, pet-core's) and checks
//! everything before a model changes: the PEFT type, the options we do not
//! support (DoRA, trained biases, `layers_to_transform`), every key, every
//! shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tensor_core::io::{self as tio, SafetensorsFile};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Device, Tensor};

use crate::adapter::{AddReport, OrthoAdapter, adapter_names, frobenius, install, task_delta};
use crate::delta::{AdapterMeta, Delta, LoraFactors, TaskDelta};
use crate::error::{Error, Result};
use crate::merge::{check_against_model, check_tasks};
use crate::registry::{check_name, write_text};
use crate::target::{base_linear, matches_any, matches_target};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const META_KEY: &str = "modular_orthogonal";
const PREFIX: &str = "base_model.model.";

/// Extra things to write beside the adapter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SaveOptions {
    /// Module paths whose parameters are saved whole (PEFT's `modules_to_save`), e.g. `["classifier"]`.
    pub modules_to_save: Vec<String>,
    pub base_model_name_or_path: Option<String>,
}

/// A PEFT LoRA folder, read.
#[derive(Debug)]
pub struct AdapterFile {
    pub dir: PathBuf,
    /// The adapter as LoRA factors per layer, with its metadata (if written here).
    pub task: TaskDelta,
    /// `modules_to_save` entries of the config.
    pub modules_to_save: Vec<String>,
    /// Their parameters, by full parameter name (`classifier.weight`).
    pub saved_modules: Vec<(String, Tensor)>,
    pub config: Value,
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

/// Write a task whose layers are all LoRA pairs as a PEFT folder `dir`,
/// with `extra` tensors (full parameter names) for `modules_to_save`.
pub fn save_task(
    task: &TaskDelta,
    dir: impl AsRef<Path>,
    extra: &[(String, Tensor)],
    opts: &SaveOptions,
) -> Result<()> {
    let dir = dir.as_ref();
    if task.layers.is_empty() {
        return Err(Error::config(format!(
            "task '{}' changes no layer; nothing to save",
            task.name
        )));
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut rs: Vec<(String, i64, f64)> = Vec::new();
    for (p, d) in &task.layers {
        let Delta::Lora(l) = d else {
            return Err(Error::config(format!(
                "task '{}': layer '{p}' is a full delta; only LoRA factors can be written as a PEFT LoRA file (truncate it with low_rank)",
                task.name
            )));
        };
        rs.push((p.clone(), l.rank(), l.scale));
        tensors.push((format!("{PREFIX}{p}.lora_A.weight"), l.a.detach()));
        tensors.push((format!("{PREFIX}{p}.lora_B.weight"), l.b.detach()));
    }
    for (n, t) in extra {
        tensors.push((format!("{PREFIX}{n}"), t.detach()));
    }
    let ranks: Vec<i64> = rs.iter().map(|r| r.1).collect();
    let r0 = most_common(&ranks).expect("non-empty");
    let scales: Vec<u64> = rs
        .iter()
        .filter(|r| r.1 == r0)
        .map(|r| r.2.to_bits())
        .collect();
    let s0 = f64::from_bits(most_common(&scales).expect("non-empty"));
    let (mut rank_pattern, mut alpha_pattern) = (BTreeMap::new(), BTreeMap::new());
    for (p, r, s) in &rs {
        if *r != r0 {
            rank_pattern.insert(p.clone(), json!(r));
        }
        if *r != r0 || s.to_bits() != s0.to_bits() {
            alpha_pattern.insert(p.clone(), json!(s * *r as f64));
        }
    }
    let mut config = json!({
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": s0 * r0 as f64,
        "lora_dropout": 0.0,
        "target_modules": rs.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "bias": "none",
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": if opts.modules_to_save.is_empty() { Value::Null } else { json!(opts.modules_to_save) },
        "layers_to_transform": null,
        "base_model_name_or_path": opts.base_model_name_or_path,
        "task_type": null,
    });
    if let Some(m) = &task.meta {
        config[META_KEY] = serde_json::to_value(m).map_err(|e| Error::file(dir, e.to_string()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e.to_string()))?;
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::file(dir, e.to_string()))?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tio::save(dir.join(WEIGHTS_FILE), &refs, None)?;
    write_text(&dir.join(CONFIG_FILE), &text)
}

/// Write adapter `name` of `model` as a PEFT folder `dir` (created if needed),
/// with the parameters of `opts.modules_to_save` (e.g. the classifier head).
pub fn save_adapter<M: ModuleExt + ?Sized>(
    model: &M,
    name: &str,
    dir: impl AsRef<Path>,
    opts: &SaveOptions,
) -> Result<()> {
    let task = task_delta(model, name)?;
    let mut extra = Vec::new();
    for m in &opts.modules_to_save {
        model.get(m)?;
        let prefix = format!("{m}.");
        let found: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        if found.is_empty() {
            return Err(Error::config(format!(
                "modules_to_save '{m}' has no parameters"
            )));
        }
        extra.extend(found);
    }
    save_task(&task, dir, &extra, opts)
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
        Some(_) => Err(Error::file(
            path,
            format!("'{key}' must be a list of strings"),
        )),
    }
}

fn num_map(path: &Path, v: &Value, key: &str) -> Result<BTreeMap<String, f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                x.as_f64()
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| Error::file(path, format!("'{key}.{k}' must be a number")))
            })
            .collect(),
        Some(_) => Err(Error::file(path, format!("'{key}' must be an object"))),
    }
}

/// The value of the most specific (longest) pattern key matching `path`.
fn pattern_value(path: &str, patterns: &BTreeMap<String, f64>) -> Option<f64> {
    patterns
        .iter()
        .filter(|(k, _)| matches_target(path, k))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}

/// Read a PEFT LoRA folder. The task is named `name`, else after the
/// concept in its metadata, else after the folder.
pub fn read_adapter(dir: impl AsRef<Path>, name: Option<&str>) -> Result<AdapterFile> {
    let dir = dir.as_ref();
    let (cpath, cfg) = read_config(dir)?;
    match cfg.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(Error::file(
                &cpath,
                format!("peft_type '{other}' is not LORA"),
            ));
        }
        None => return Err(Error::file(&cpath, "missing 'peft_type'")),
    }
    if cfg
        .get("use_dora")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Err(Error::file(
            &cpath,
            "DoRA adapter files are not supported (their change is not s·BA)",
        ));
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
    match cfg.get("layers_to_transform") {
        None | Some(Value::Null) => {}
        Some(x) => {
            return Err(Error::file(
                &cpath,
                format!("layers_to_transform = {x} is not supported"),
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
    let rslora = cfg
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let rank_pattern = num_map(&cpath, &cfg, "rank_pattern")?;
    let alpha_pattern = num_map(&cpath, &cfg, "alpha_pattern")?;
    let modules_to_save = str_list(&cpath, &cfg, "modules_to_save")?;
    let meta: Option<AdapterMeta> = match cfg.get(META_KEY) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|e| Error::file(&cpath, format!("'{META_KEY}' is malformed: {e}")))?,
        ),
    };
    let wpath = dir.join(WEIGHTS_FILE);
    let file = SafetensorsFile::open(&wpath)?;
    let mut by_module: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    let mut saved_modules = Vec::new();
    for key in file.names() {
        let rest = key.strip_prefix(PREFIX).ok_or_else(|| {
            Error::file(
                &wpath,
                format!("tensor '{key}' does not start with '{PREFIX}'"),
            )
        })?;
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            by_module.entry(m.to_owned()).or_default()[0] = Some(key.clone());
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            by_module.entry(m.to_owned()).or_default()[1] = Some(key.clone());
        } else if modules_to_save
            .iter()
            .any(|m| rest.starts_with(&format!("{m}.")) || rest.contains(&format!(".{m}.")))
        {
            saved_modules.push((rest.to_owned(), file.load_weight(&key, Device::Cpu)?));
        } else {
            return Err(Error::file(
                &wpath,
                format!(
                    "tensor '{key}' is neither a LoRA weight (.lora_A.weight / .lora_B.weight) nor under modules_to_save {modules_to_save:?}"
                ),
            ));
        }
    }
    if by_module.is_empty() {
        return Err(Error::file(&wpath, "holds no LoRA tensors"));
    }
    // PEFT's contract: the modules with tensors are exactly the targets the
    // config names (a typo or a config from another adapter is an error).
    let targets = str_list(&cpath, &cfg, "target_modules")?;
    if targets.is_empty() {
        return Err(Error::file(
            &cpath,
            "'target_modules' is missing or empty; PEFT needs the list of adapted modules",
        ));
    }
    if let Some(m) = by_module.keys().find(|m| !matches_any(m, &targets)) {
        return Err(Error::file(
            &cpath,
            format!(
                "the weights file has LoRA tensors for '{m}', which target_modules {targets:?} does not name"
            ),
        ));
    }
    if let Some(t) = targets
        .iter()
        .find(|t| !by_module.keys().any(|m| matches_target(m, t)))
    {
        return Err(Error::file(
            &cpath,
            format!(
                "target_modules entry '{t}' matches none of the modules the weights file adapts"
            ),
        ));
    }
    let task_name = match (name, &meta) {
        (Some(n), _) => n.to_owned(),
        (None, Some(m)) => m.concept.clone(),
        (None, None) => dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".to_owned()),
    };
    let mut task = TaskDelta::new(&task_name);
    for (module, keys) in &by_module {
        let [Some(ka), Some(kb)] = keys else {
            return Err(Error::file(
                &wpath,
                format!("{module}: needs both lora_A.weight and lora_B.weight"),
            ));
        };
        let a = file.load_weight(ka, Device::Cpu)?;
        let b = file.load_weight(kb, Device::Cpu)?;
        let rank = pattern_value(module, &rank_pattern).map_or(r, |x| x as i64);
        let alpha = pattern_value(module, &alpha_pattern).unwrap_or(alpha);
        if rank <= 0 || a.size().first() != Some(&rank) {
            return Err(Error::file(
                &wpath,
                format!(
                    "'{ka}' has shape {:?} but the config gives rank {rank} for {module}",
                    a.size()
                ),
            ));
        }
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        let f = LoraFactors::new(a, b, scale)
            .map_err(|e| Error::file(&wpath, format!("{module}: {e}")))?;
        task.layers.insert(module.clone(), Delta::Lora(f));
    }
    task.meta = meta;
    Ok(AdapterFile {
        dir: dir.to_owned(),
        task,
        modules_to_save,
        saved_modules,
        config: cfg,
    })
}

/// Load a PEFT LoRA folder into `model` as adapter `name` (orthogonal if its
/// metadata says so: the frozen factor stays frozen). The model must hold
/// every module the file names, as `Linear`s of the same shapes, with the
/// base weights the adapter recorded. `modules_to_save` are not touched: see
/// [`load_saved_modules`].
pub fn load_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    dir: impl AsRef<Path>,
    name: &str,
) -> Result<AddReport> {
    check_name(name)?;
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(Error::DuplicateAdapter(name.to_owned()));
    }
    let file = read_adapter(dir, Some(name))?;
    let tasks = [file.task];
    check_tasks(&tasks)?;
    check_against_model(model, &tasks)?;
    let [task] = tasks;
    let info = task.meta.as_ref().and_then(|m| m.orthogonal);
    let mut built = Vec::new();
    for (p, d) in task.layers {
        let Delta::Lora(l) = d else {
            unreachable!("read_adapter gives LoRA factors")
        };
        let lin = base_linear(model, &p)?;
        let (kind, dev) = (lin.weight.kind(), lin.weight.device());
        let norm = frobenius(&lin.weight)?;
        let a = l.a.f_to_kind(kind)?.f_to_device(dev)?;
        let b = l.b.f_to_kind(kind)?.f_to_device(dev)?;
        built.push((p, OrthoAdapter::new(name, a, b, l.scale, info, norm)?));
    }
    install(model, built)
}

/// Copy the `modules_to_save` parameters of a read adapter file into
/// `model` (e.g. the task's classifier head). Returns how many were copied.
pub fn load_saved_modules<M: ModuleExt + ?Sized>(
    model: &mut M,
    file: &AdapterFile,
) -> Result<usize> {
    if file.saved_modules.is_empty() {
        return Ok(0);
    }
    let all: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    if let Some((extra, _)) = file.saved_modules.iter().find(|(n, _)| !all.contains(n)) {
        return Err(Error::Tensor(tensor_core::Error::unknown(
            format!("parameter (from modules_to_save of {})", file.dir.display()),
            extra.clone(),
            all,
        )));
    }
    model.load_named(&file.saved_modules, false)?;
    Ok(file.saved_modules.len())
}
