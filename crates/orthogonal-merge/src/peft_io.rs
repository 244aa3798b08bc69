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

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tensor_core::adapt::peft::{self, LoraHeader, PREFIX, group_keys, read_config, str_list};
use tensor_core::io::SafetensorsFile;
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Device, Tensor};

use crate::adapter::{AddReport, OrthoAdapter, adapter_names, frobenius, install, task_delta};
use crate::delta::{AdapterMeta, Delta, LoraFactors, TaskDelta};
use crate::error::{Error, Result};
use crate::merge::{check_against_model, check_tasks};
use crate::registry::check_name;
use crate::target::{base_linear, matches_any, matches_target};

pub use tensor_core::adapt::peft::{CONFIG_FILE, WEIGHTS_FILE};
pub const META_KEY: &str = "modular_orthogonal";

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
    let mut config = peft::lora_config(&rs);
    if !opts.modules_to_save.is_empty() {
        config["modules_to_save"] = json!(opts.modules_to_save);
    }
    config["base_model_name_or_path"] = json!(opts.base_model_name_or_path);
    if let Some(m) = &task.meta {
        config[META_KEY] = serde_json::to_value(m).map_err(|e| Error::file(dir, e.to_string()))?;
    }
    Ok(peft::write_folder(dir, &config, &tensors)?)
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

/// Read a PEFT LoRA folder. The task is named `name`, else after the
/// concept in its metadata, else after the folder.
pub fn read_adapter(dir: impl AsRef<Path>, name: Option<&str>) -> Result<AdapterFile> {
    let dir = dir.as_ref();
    let (cpath, cfg) = read_config(dir)?;
    let header = LoraHeader::read(&cpath, &cfg)?;
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
    let saved = |rest: &str| {
        modules_to_save
            .iter()
            .any(|m| rest.starts_with(&format!("{m}.")) || rest.contains(&format!(".{m}.")))
    };
    let (by_module, others) = group_keys(
        &wpath,
        &file,
        &[".lora_A.weight", ".lora_B.weight"],
        "LoRA",
        saved,
    )
    .map_err(|e| match e {
        tensor_core::Error::Path { path, reason } if reason.starts_with("tensor '") => Error::file(
            path,
            format!("{reason}, nor under modules_to_save {modules_to_save:?}"),
        ),
        other => other.into(),
    })?;
    let mut saved_modules = Vec::new();
    for key in others {
        let rest = key.strip_prefix(PREFIX).unwrap_or(&key).to_owned();
        saved_modules.push((rest, file.load_weight(&key, Device::Cpu)?));
    }
    // PEFT's contract: the modules with tensors are exactly the targets the
    // config names (a typo or a config from another adapter is an error).
    let targets = &header.target_modules;
    if targets.is_empty() {
        return Err(Error::file(
            &cpath,
            "'target_modules' is missing or empty; PEFT needs the list of adapted modules",
        ));
    }
    if let Some(m) = by_module.keys().find(|m| !matches_any(m, targets)) {
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
        let (Some(ka), Some(kb)) = (keys.get(".lora_A.weight"), keys.get(".lora_B.weight")) else {
            return Err(Error::file(
                &wpath,
                format!("{module}: needs both lora_A.weight and lora_B.weight"),
            ));
        };
        let a = file.load_weight(ka, Device::Cpu)?;
        let b = file.load_weight(kb, Device::Cpu)?;
        let (rank, alpha) = header.rank_alpha(module);
        if rank <= 0 || a.size().first() != Some(&rank) {
            return Err(Error::file(
                &wpath,
                format!(
                    "'{ka}' has shape {:?} but the config gives rank {rank} for {module}",
                    a.size()
                ),
            ));
        }
        let scale = header.scale(rank, alpha);
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
    name: &str,
    dir: impl AsRef<Path>,
) -> Result<AddReport> {
    check_name(name)?;
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(tensor_core::Error::duplicate_adapter(name.to_owned()).into());
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
        built.push((p, OrthoAdapter::new(a, b, l.scale, info, norm)?));
    }
    install(model, name, built)
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
