//! The adapter lifecycle over a whole model, by adapter name (PEFT's
//! `PeftModel` / `LoraModel`; docs/pet-core.md, Method, part 2 steps 5–6): add, activate
//! (several active adapters add their changes), disable, delete, merge
//! (optionally safe), unmerge (last merged first), merge-and-unload, and
//! the trainable-parameter report.
//!
//! Every function takes any `tensor-core` module tree and finds its targets
//! by path; no model type is named here. Adding is all-or-nothing: every
//! target's adapter is built before the first slot changes.

use std::collections::BTreeMap;
use std::fmt;

use tensor_core::adapt::{AdaptedLinear, LinearDelta};
use tensor_core::layers::Linear;
use tensor_core::module::{ModuleExt, is, join_path};

use crate::bottleneck::{AdapterConfig, Bottleneck, ParallelAdapter};
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::host::{host_box, host_mut, host_ref};
use crate::ia3::{Ia3, Ia3Config};
use crate::lora::{Lora, LoraConfig};
use crate::mixed::{BASE, MixedBatch};
use crate::site::{AdapterSite, SiteAdapter};
use crate::target::{matches_any, module_seed};

pub use tensor_core::adapt::linear_paths;

fn no_target<M: ModuleExt + ?Sized>(model: &M, patterns: &[String], kind: &'static str) -> Error {
    let examples = match kind {
        "Linear" => linear_paths(model),
        _ => model
            .named_modules()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| !p.is_empty())
            .collect(),
    };
    tensor_core::Error::NoTarget {
        patterns: patterns.to_vec(),
        kind,
        examples: examples.into_iter().take(8).collect(),
    }
    .into()
}

/// The base `Linear` at `path` (inside an adapter host or not).
pub(crate) fn base_linear<'a, M: ModuleExt + ?Sized>(
    model: &'a M,
    path: &str,
) -> Result<&'a Linear> {
    tensor_core::adapt::base_linear(model, path).map_err(|e| Error::config(e.to_string()))
}

pub(crate) fn check_new_name<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('.') || name == BASE {
        return Err(Error::config(format!(
            "adapter name '{name}' must be non-empty, contain no '.', and not be '{BASE}'"
        )));
    }
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(tensor_core::Error::duplicate_adapter(name.to_owned()).into());
    }
    Ok(())
}

/// Put delta `name` on the `Linear` at `path`, wrapping it first if needed.
pub(crate) fn insert_linear_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    path: &str,
    name: &str,
    delta: Box<dyn LinearDelta>,
) -> Result<()> {
    Ok(tensor_core::adapt::insert(model, path, name, delta)?)
}

/// What an `add_*` call did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AddReport {
    /// Paths that received the adapter.
    pub paths: Vec<String>,
    /// Parameters the adapter added.
    pub params: i64,
}

pub(crate) fn add_linear_adapters<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    built: Vec<(String, Box<dyn LinearDelta>)>,
) -> Result<AddReport> {
    let mut report = AddReport::default();
    for (p, d) in built {
        report.params += d.param_count();
        insert_linear_adapter(model, &p, name, d)?;
        report.paths.push(p);
    }
    Ok(report)
}

/// The `Linear` paths matching `patterns`, or an error naming some that exist.
pub(crate) fn linear_targets<M: ModuleExt + ?Sized>(
    model: &M,
    patterns: &[String],
) -> Result<Vec<String>> {
    let targets: Vec<String> = linear_paths(model)
        .into_iter()
        .filter(|p| matches_any(p, patterns))
        .collect();
    if targets.is_empty() {
        return Err(no_target(model, patterns, "Linear"));
    }
    Ok(targets)
}

/// Add a LoRA (or DoRA, or LoRA + G) adapter named `name` to every `Linear` matching `cfg.target_modules`.
pub fn add_lora<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &LoraConfig,
) -> Result<AddReport> {
    cfg.validate()?;
    check_new_name(model, name)?;
    let targets = linear_targets(model, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(targets.len());
    for p in targets {
        let lin = base_linear(model, &p)?;
        let mut lora = Lora::init(cfg, &p, name, &lin.weight)?;
        lora.gate = match &cfg.gate {
            Some(g) => Some(Gate::new(
                g,
                lin.in_features(),
                lin.out_features(),
                module_seed(cfg.seed, &[&p, name, "gate"]),
                lin.weight.device(),
            )?),
            None => None,
        };
        built.push((p, Box::new(lora) as Box<dyn LinearDelta>));
    }
    add_linear_adapters(model, name, built)
}

/// Add an IA3 adapter named `name`. `feedforward_modules` follow PEFT 0.21's
/// rule for them: a plain suffix match (no dot boundary), or a glob.
pub fn add_ia3<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &Ia3Config,
) -> Result<AddReport> {
    cfg.validate()?;
    check_new_name(model, name)?;
    let targets = linear_targets(model, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(targets.len());
    for p in targets {
        let lin = base_linear(model, &p)?;
        let ia3 = Ia3::init(&lin.weight, is_feedforward(&p, &cfg.feedforward_modules))?;
        built.push((p, Box::new(ia3) as Box<dyn LinearDelta>));
    }
    add_linear_adapters(model, name, built)
}

/// PEFT's `feedforward_modules` rule.
pub fn is_feedforward(path: &str, ff: &[String]) -> bool {
    ff.iter().any(|e| {
        if e.contains('*') || e.contains('?') {
            tensor_core::module::glob_match(e, path)
        } else {
            path.ends_with(e.as_str())
        }
    })
}

/// Add a bottleneck adapter (optionally VL-PET-gated) named `name` around
/// every sub-module matching `cfg.target_modules` (e.g. BERT's `attention`
/// and `(ffn)`). Widths are read from the sub-module's parameters by
/// running nothing: the site's input and output width `d` must be given.
pub fn add_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &AdapterConfig,
    d_model: i64,
) -> Result<AddReport> {
    cfg.validate()?;
    check_new_name(model, name)?;
    let mut targets: Vec<String> = Vec::new();
    for (p, m) in model.named_modules() {
        if !p.is_empty() && matches_any(&p, &cfg.target_modules) && !targets.contains(&p) {
            if is::<Linear>(m) || is::<AdaptedLinear>(m) {
                continue; // Linear targets take the parallel form: add_linear_adapter
            }
            targets.push(p);
        }
    }
    if targets.is_empty() {
        return Err(no_target(model, &cfg.target_modules, "sub-module"));
    }
    let dev = model
        .named_parameters()
        .first()
        .map(|(_, t)| t.device())
        .unwrap_or(tensor_core::tch::Device::Cpu);
    let mut built = Vec::new();
    let mut report = AddReport::default();
    for p in &targets {
        let seed = module_seed(cfg.seed, &[p, name, "adapter"]);
        let bn = Bottleneck::new(cfg, d_model, d_model, seed, dev)?;
        let gate = match &cfg.gate {
            Some(g) => Some(Gate::new(g, d_model, d_model, seed ^ 0x9e37, dev)?),
            None => None,
        };
        let a = SiteAdapter::new(name, bn, cfg.placement, cfg.scale, gate);
        built.push((p.clone(), a));
    }
    for (p, a) in built {
        report.params += a_site_count(&a);
        let slot = model.slot_mut(&p)?;
        if let Some(h) = tensor_core::module::downcast_mut::<AdapterSite>(slot.as_mut()) {
            h.add(a)?;
        } else {
            let old = std::mem::replace(slot, Box::new(tensor_core::module::Identity));
            let mut site = AdapterSite::wrap(old);
            site.add(a)?;
            *slot = Box::new(site);
        }
        report.paths.push(p);
    }
    Ok(report)
}

fn a_site_count(a: &SiteAdapter) -> i64 {
    let mut n: i64 = a
        .bottleneck
        .params
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    if let Some(g) = &a.gate {
        n += g.params.iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
    }
    n
}

/// Add a parallel bottleneck on `Linear` targets, `y = xWᵀ + b + s·ΔH(x)`
/// (VL-PET's decoder cross-attention value adapter; ungated unless `cfg.gate`).
pub fn add_linear_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &AdapterConfig,
) -> Result<AddReport> {
    cfg.validate()?;
    check_new_name(model, name)?;
    let targets = linear_targets(model, &cfg.target_modules)?;
    let mut built = Vec::new();
    for p in targets {
        let lin = base_linear(model, &p)?;
        let (i, o, dev) = (lin.in_features(), lin.out_features(), lin.weight.device());
        let seed = module_seed(cfg.seed, &[&p, name, "adapter"]);
        let module = Bottleneck::new(cfg, i, o, seed, dev)?;
        let gate = match &cfg.gate {
            Some(g) => Some(Gate::new(g, i, o, seed ^ 0x9e37, dev)?),
            None => None,
        };
        let delta = ParallelAdapter {
            module,
            scale: cfg.scale,
            gate,
        };
        built.push((p, Box::new(delta) as Box<dyn LinearDelta>));
    }
    add_linear_adapters(model, name, built)
}

/// Every adapter name in the model, in first-seen order.
pub fn adapter_names<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, m) in model.named_modules() {
        if let Some(h) = host_ref(m) {
            for n in h.adapter_names() {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// Visit every adapter host with its path.
fn for_each_host<M: ModuleExt + ?Sized>(
    model: &mut M,
    f: &mut dyn FnMut(&str, &mut dyn crate::host::AdapterHost) -> Result<()>,
) -> Result<()> {
    let mut err = None;
    model.for_each_slot_mut(&mut |path, slot| {
        if let Some(h) = host_mut(slot.as_mut())
            && let Err(e) = f(path, h)
        {
            err.get_or_insert(e);
        }
        Ok(())
    })?;
    err.map_or(Ok(()), Err)
}

fn check_known<M: ModuleExt + ?Sized>(model: &M, names: &[&str]) -> Result<()> {
    let known = adapter_names(model);
    for n in names {
        if !known.iter().any(|k| k == n) {
            return Err(tensor_core::Error::unknown_adapter(*n, known).into());
        }
    }
    Ok(())
}

/// Make `names` the active adapters (their changes add); enables adapters.
pub fn set_adapter<M: ModuleExt + ?Sized>(model: &mut M, names: &[&str]) -> Result<()> {
    check_known(model, names)?;
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    for_each_host(model, &mut |_, h| {
        h.set_active(&names);
        h.set_enabled(true)
    })
}

/// The active adapters (union over layers, first-seen order).
pub fn active_adapters<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, m) in model.named_modules() {
        if let Some(h) = host_ref(m) {
            for n in h.active_names() {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// Compute the base model only (adapters kept) until [`enable_adapters`].
pub fn disable_adapters<M: ModuleExt + ?Sized>(model: &mut M) -> Result<()> {
    if !merged_adapters(model).is_empty() {
        return Err(Error::state(
            "cannot disable adapters that are merged into the base weights; unmerge first",
        ));
    }
    for_each_host(model, &mut |_, h| h.set_enabled(false))
}

pub fn enable_adapters<M: ModuleExt + ?Sized>(model: &mut M) -> Result<()> {
    for_each_host(model, &mut |_, h| h.set_enabled(true))
}

/// Run `f` with adapters disabled, re-enabling them afterwards (also on error).
pub fn with_adapters_disabled<M: ModuleExt + ?Sized, T>(
    model: &mut M,
    f: impl FnOnce(&mut M) -> Result<T>,
) -> Result<T> {
    disable_adapters(model)?;
    let r = f(model);
    enable_adapters(model)?;
    r
}

/// Remove adapter `name` everywhere; layers left with no adapter get their plain module back.
pub fn delete_adapter<M: ModuleExt + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    check_known(model, &[name])?;
    if merged_adapters(model).iter().any(|m| m == name) {
        return Err(Error::state(format!(
            "adapter '{name}' is merged into the base weights; unmerge before deleting it"
        )));
    }
    let mut err = None;
    model.for_each_slot_mut(&mut |_, slot| {
        if let Some(h) = host_mut(slot.as_mut()) {
            match h.delete(name) {
                Ok(_) if h.adapter_names().is_empty() => {
                    let old = std::mem::replace(slot, Box::new(tensor_core::module::Identity));
                    *slot = match host_box(old) {
                        Ok(h) => h.into_inner(),
                        Err(old) => old,
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
        }
        Ok(())
    })?;
    err.map_or(Ok(()), Err)
}

/// Merged adapters (union over layers).
pub fn merged_adapters<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, m) in model.named_modules() {
        if let Some(h) = host_ref(m) {
            for n in h.merged_names() {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// Fold `names` (empty: the active adapters) into the base weights, in
/// order. Every layer's merge is computed and checked before any weight is
/// written, so a refused merge (with `safe`: NaN/Inf in a merged weight)
/// leaves the model exactly as it was.
pub fn merge_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    names: &[&str],
    safe: bool,
) -> Result<usize> {
    check_known(model, names)?;
    let names: Vec<String> = if names.is_empty() {
        active_adapters(model)
    } else {
        names.iter().map(|s| (*s).to_owned()).collect()
    };
    // Check every layer first, then write: a refused merge changes nothing.
    let mut first_err = None;
    for (path, m) in model.named_modules() {
        if let Some(h) = host_ref(m)
            && let Err(e) = h.check_merge(&path, &names, safe)
        {
            first_err = Some(e);
            break;
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let mut total = 0;
    for_each_host(model, &mut |path, h| {
        total += h.merge(path, &names, safe)?;
        Ok(())
    })?;
    Ok(total)
}

/// Undo every merge, last merged first; returns how many layer merges were undone.
pub fn unmerge_adapter<M: ModuleExt + ?Sized>(model: &mut M) -> Result<usize> {
    let mut total = 0;
    for_each_host(model, &mut |path, h| {
        total += h.unmerge_all(path)?;
        Ok(())
    })?;
    Ok(total)
}

/// Merge the active adapters and return plain modules (PEFT's `merge_and_unload`).
pub fn merge_and_unload<M: ModuleExt + ?Sized>(model: &mut M, safe: bool) -> Result<()> {
    merge_adapter(model, &[], safe)?;
    unload(model)
}

/// Drop every adapter without merging (merged changes stay in the weights).
pub fn unload<M: ModuleExt + ?Sized>(model: &mut M) -> Result<()> {
    model.for_each_slot_mut(&mut |_, slot| {
        if host_ref(slot.as_ref()).is_some() {
            let old = std::mem::replace(slot, Box::new(tensor_core::module::Identity));
            *slot = match host_box(old) {
                Ok(h) => h.into_inner(),
                Err(old) => old,
            };
        }
        Ok(())
    })?;
    Ok(())
}

/// Full names of every adapter parameter (optionally only of `names`).
pub fn adapter_parameter_names<M: ModuleExt + ?Sized>(model: &M, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, m) in model.named_modules() {
        if host_ref(m).is_some() {
            for (n, _) in m.params() {
                let owner = n.split('.').nth(1).unwrap_or("");
                if names.is_empty() || names.contains(&owner) {
                    out.push(join_path(&param_prefix(&path), n));
                }
            }
        }
    }
    out
}

/// The parameter-name prefix of a module path: labels (`(ffn)`) vanish.
fn param_prefix(path: &str) -> String {
    path.split('.')
        .filter(|s| !tensor_core::module::is_label(s))
        .collect::<Vec<_>>()
        .join(".")
}

/// Freeze everything except adapter parameters (of `names`, or all) and
/// parameters matching the `also` globs (e.g. `"classifier.*"`, VL-PET's
/// `"encoder.*LayerNorm.*"`). Returns the number of trainable tensors.
pub fn mark_only_adapters_trainable<M: ModuleExt + ?Sized>(
    model: &mut M,
    names: &[&str],
    also: &[&str],
) -> usize {
    let keep = adapter_parameter_names(model, names);
    tensor_core::adapt::mark_only_trainable(model, &keep, also)
}

/// Trainable parameters and each adapter's size, like PEFT's `print_trainable_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableReport {
    pub trainable: i64,
    pub total: i64,
    pub per_adapter: BTreeMap<String, i64>,
}

impl TrainableReport {
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl fmt::Display for TrainableReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            self.trainable,
            self.total,
            self.percent()
        )?;
        for (n, c) in &self.per_adapter {
            write!(f, " || {n}: {c}")?;
        }
        Ok(())
    }
}

pub fn trainable_report<M: ModuleExt + ?Sized>(model: &M) -> TrainableReport {
    let c = model.param_count();
    let mut per_adapter = BTreeMap::new();
    for (_, m) in model.named_modules() {
        if let Some(h) = host_ref(m) {
            for n in h.adapter_names() {
                *per_adapter.entry(n.clone()).or_insert(0) += h.adapter_param_count(&n);
            }
        }
    }
    TrainableReport {
        trainable: c.trainable,
        total: c.total,
        per_adapter,
    }
}

/// A [`MixedBatch`] for `model`, with every name checked (`"__base__"` is always allowed).
pub fn mixed_batch<M: ModuleExt + ?Sized, S: AsRef<str>>(
    model: &M,
    names: &[S],
    device: tensor_core::tch::Device,
) -> Result<MixedBatch> {
    let wanted: Vec<&str> = names
        .iter()
        .map(AsRef::as_ref)
        .filter(|n| *n != BASE)
        .collect();
    check_known(model, &wanted)?;
    if !merged_adapters(model).is_empty() {
        return Err(Error::state(
            "a mixed-adapter batch needs unmerged adapters; unmerge first",
        ));
    }
    Ok(MixedBatch::new(names, device)?)
}
