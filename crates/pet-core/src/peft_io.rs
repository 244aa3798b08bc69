//! Adapter folders that Python PEFT reads and writes (docs/pet-core.md,
//! Method, part 2 step 8), in the one format of
//! [`tensor_core::adapt::peft`]: `adapter_config.json` +
//! `adapter_model.safetensors`, tensor keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`
//! (LoRA) and `base_model.model.<module path>.ia3_l` (IA3), with no adapter
//! name in the key. IA3 vectors are `[out, 1]` (output side) or `[1, in]`
//! (feed-forward, input side).
//!
//! Writing: any adapter whose change is a plain `s·BA` on every layer (this
//! crate's LoRA, orthogonal-merge's adapters) is written as a LoRA file,
//! each layer's `s` as `lora_alpha = s·r` with `rank_pattern` /
//! `alpha_pattern` where layers differ, so PEFT rebuilds the same `s·BA`;
//! IA3 adapters as IA3 files, LoHa adapters as LOHA files (keys
//! `<module>.hada_w1_a` ... `.hada_w2_b`, `s = alpha / r` with the same
//! patterns). Both files are written to temporary names and
//! renamed.
//!
//! Reading checks everything before the model changes: the PEFT type, the
//! options we do not support (DoRA files, trained biases, `modules_to_save`,
//! `layers_to_transform`), every key's module path and every shape.

use std::path::Path;

use serde_json::json;
use tensor_core::adapt::delta::downcast_delta;
use tensor_core::adapt::peft::{
    self, LoraHeader, PREFIX, WEIGHTS_FILE, check_targets, group_keys, read_config, refuse_set,
    str_list, write_folder,
};
use tensor_core::adapt::{LinearDelta, hosts};
use tensor_core::io::SafetensorsFile;
use tensor_core::module::ModuleExt;
use tensor_core::tch::Tensor;

use crate::error::{Error, Result};
use crate::ia3::Ia3;
use crate::loha::Loha;
use crate::lora::Lora;
use crate::model::{AddReport, adapter_names, add_linear_adapters, is_feedforward, linear_paths};

pub use tensor_core::adapt::peft::CONFIG_FILE;

/// Write adapter `name` of `model` as a PEFT folder `dir` (created if needed).
pub fn save_adapter<M: ModuleExt + ?Sized>(
    model: &M,
    name: &str,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let layers: Vec<(String, &dyn LinearDelta)> = hosts(model)
        .into_iter()
        .filter_map(|(p, h)| h.get(name).map(|d| (p, d)))
        .collect();
    if layers.is_empty() {
        return Err(tensor_core::Error::unknown_adapter(name, adapter_names(model)).into());
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let config = if layers[0].1.low_rank().is_some() {
        let mut rs = Vec::new();
        for (p, d) in &layers {
            let Some(l) = d.low_rank() else {
                return Err(Error::config(format!(
                    "adapter '{name}': only plain LoRA (s·BA on every layer) and IA3 adapters can be written as PEFT files ({p} holds a {} delta)",
                    d.kind()
                )));
            };
            rs.push((p.clone(), l.a.size()[0], l.scale));
            tensors.push((format!("{PREFIX}{p}.lora_A.weight"), l.a.detach()));
            tensors.push((format!("{PREFIX}{p}.lora_B.weight"), l.b.detach()));
        }
        peft::lora_config(&rs)
    } else if downcast_delta::<Ia3>(layers[0].1).is_some() {
        let mut ff = Vec::new();
        for (p, d) in &layers {
            let Some(i) = downcast_delta::<Ia3>(*d) else {
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
    } else if downcast_delta::<Loha>(layers[0].1).is_some() {
        let mut rs = Vec::new();
        for (p, d) in &layers {
            let Some(l) = downcast_delta::<Loha>(*d) else {
                return Err(Error::state(format!(
                    "{p}: adapter '{name}' mixes LoHa and other kinds"
                )));
            };
            rs.push((p.clone(), l.rank(), l.scale));
            for (k, t) in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
                .into_iter()
                .zip(l.tensors())
            {
                tensors.push((format!("{PREFIX}{p}.{k}"), t.detach()));
            }
        }
        let (r0, alpha0, rank_pattern, alpha_pattern) = peft::rank_alpha_patterns(&rs);
        json!({
            "peft_type": "LOHA",
            "r": r0,
            "alpha": alpha0,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "target_modules": layers.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "init_weights": true,
            "use_effective_conv2d": false,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "base_model_name_or_path": null,
            "task_type": null,
        })
    } else {
        return Err(Error::config(format!(
            "adapter '{name}': only plain LoRA, IA3 and LoHa adapters can be written as PEFT files (this one is {})",
            layers[0].1.kind()
        )));
    };
    Ok(write_folder(dir, &config, &tensors)?)
}

/// Load a PEFT adapter folder `dir` into `model` under `name`. The model
/// must hold every module the file names (as `Linear`s, possibly already adapted).
pub fn load_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    dir: impl AsRef<Path>,
) -> Result<AddReport> {
    let dir = dir.as_ref();
    let (cpath, cfg) = read_config(dir)?;
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(tensor_core::Error::duplicate_adapter(name.to_owned()).into());
    }
    let peft_type = peft::peft_type(&cpath, &cfg)?.to_owned();
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
    let suffixes: &[&str] = match peft_type.as_str() {
        "LORA" => &[".lora_A.weight", ".lora_B.weight"],
        "IA3" => &[".ia3_l"],
        "LOHA" => &[".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"],
        other => {
            return Err(Error::file(
                &cpath,
                format!("peft_type '{other}' is not supported (LORA, IA3 and LOHA are)"),
            ));
        }
    };
    let wpath = dir.join(WEIGHTS_FILE);
    let file = SafetensorsFile::open(&wpath)?;
    let paths = linear_paths(model);
    let (by_module, _) = group_keys(&wpath, &file, suffixes, &peft_type, |_| false)?;
    for (module, keys) in &by_module {
        if !paths.iter().any(|p| p == module) {
            let key = keys.values().next().expect("grouped keys are non-empty");
            return Err(Error::Tensor(tensor_core::Error::unknown(
                format!("Linear module for tensor '{key}'"),
                module,
                paths.clone(),
            )));
        }
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
    let mut built: Vec<(String, Box<dyn LinearDelta>)> = Vec::new();
    if peft_type == "LORA" {
        let header = LoraHeader::read(&cpath, &cfg)?;
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
            let (rank, alpha) = header.rank_alpha(module);
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
            let lora = Lora::from_weights(a, b, header.scale(rank, alpha), w, ka)
                .map_err(|e| Error::file(&cpath, e.to_string()))?;
            built.push((module.clone(), Box::new(lora)));
        }
    } else if peft_type == "LOHA" {
        let header = LoraHeader::ranks(&cpath, &cfg, "alpha")?;
        for (module, keys) in &by_module {
            let mut factors = Vec::with_capacity(4);
            for k in [".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"] {
                let key = keys.get(k).ok_or_else(|| {
                    Error::file(
                        &wpath,
                        format!("{module}: needs all four of hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (no {k})"),
                    )
                })?;
                factors.push(file.load_weight(key, dev)?);
            }
            let (rank, alpha) = header.rank_alpha(module);
            if factors[0].size().get(1) != Some(&rank) {
                return Err(Error::file(
                    &wpath,
                    format!(
                        "{module}.hada_w1_a has shape {:?} but the config gives rank {rank}",
                        factors[0].size()
                    ),
                ));
            }
            let factors: [Tensor; 4] = factors.try_into().expect("four factors");
            let w = &base_weight(model, module)?;
            let loha = Loha::from_weights(factors, alpha / rank as f64, w, module)
                .map_err(|e| Error::file(&cpath, e.to_string()))?;
            built.push((module.clone(), Box::new(loha)));
        }
    } else {
        let ff = str_list(&cpath, &cfg, "feedforward_modules")?;
        for (module, keys) in &by_module {
            let key = &keys[".ia3_l"];
            let t = file.load_weight(key, dev)?;
            let w = &base_weight(model, module)?;
            let ia3 = Ia3::from_peft(&t, w, is_feedforward(module, &ff), key)?;
            built.push((module.clone(), Box::new(ia3)));
        }
    }
    add_linear_adapters(model, name, built)
}

fn base_weight<M: ModuleExt + ?Sized>(model: &M, path: &str) -> Result<Tensor> {
    Ok(crate::model::base_linear(model, path)?
        .weight
        .shallow_clone())
}
