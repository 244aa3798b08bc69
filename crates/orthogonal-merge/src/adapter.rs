//! Orthogonal LoRA-style adapters on `Linear` layers (Po et al., CVPR 2024,
//! arXiv 2312.02432; docs/orthogonal-merge.md, Method, part 1 step 3), in any
//! `tensor-core` model.
//!
//! For a frozen `Linear` `y = x Wᵀ + b`, `W ∈ R^{out×in}`, adapter `i` adds
//!
//! ```text
//! y += s · Dropout(x) Aᵀ Bᵀ,   ΔW_i = s · B A,   A ∈ R^{r×in},  B ∈ R^{out×r}
//! frozen input side:   A = B_iᵀ (basis bin, frozen),  B = 0 (trained)   ΔW_i = s·A_i B_iᵀ, A_i=B
//! frozen output side:  B = B_i  (basis bin, frozen),  A = 0 (trained)   ΔW_i = s·B_i A_i
//! plain LoRA (control): A ~ U(±1/√in) seeded, B = 0, both trained
//! ```
//!
//! with `B_i` the concept's bin of the layer's shared basis
//! ([`crate::basis`], bins from a [`Registry`]). The trained factor starts
//! at zero, so the model is unchanged at step 0, and its gradient is
//! non-zero because the frozen factor is. The frozen factor is detached in
//! the forward pass, so it never receives a gradient even if a glob marks
//! it trainable.
//!
//! [`OrthoAdapter`] is a delta kind of tensor-core's [`AdaptedLinear`], the
//! host every adapter crate shares: the base `Linear` keeps its parameter
//! names (`query.weight`), the adapters' sit beside them as
//! `query.lora_A.<name>.weight` / `query.lora_B.<name>.weight` (PEFT's
//! in-memory layout), and they may share a layer, a mixed batch and a file
//! with pet-core's adapters. Every adapter added here is active, so the
//! layer computes `W0 + Σ_i ΔW_i`. Adding is all-or-nothing: every target's
//! adapter is built before the first slot changes.

use std::collections::BTreeMap;

use tensor_core::adapt::delta::downcast_delta;
use tensor_core::adapt::{AdaptedLinear, LinearDelta, LowRank, hosts};
use tensor_core::layers::Linear;
use tensor_core::module::{Identity, ModuleExt, downcast_box, downcast_mut, join_path};
use tensor_core::seed::uniform_seeded;
use tensor_core::tch::{self, Kind, Tensor};

use crate::basis::FrozenSide;
use crate::delta::{AdapterMeta, Delta, LoraFactors, OrthoInfo, TaskDelta};
use crate::error::{Error, Result};
use crate::registry::{Registry, check_name};
use crate::target::{base_linear, base_linear_mut, name_seed, resolve_targets};

/// Where and how strongly an adapter acts.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Module paths to adapt: PEFT's suffix rule (`"query"` matches
    /// `encoder.layer.0.attention.self.query`) or globs.
    pub target_modules: Vec<String>,
    /// `α`, with `s = α/r`; `None` means `α = r` (`s = 1`).
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Seed of the plain LoRA control's random `A` (orthogonal adapters draw nothing).
    pub seed: u64,
}

impl AdapterConfig {
    pub fn new(targets: &[&str]) -> Self {
        Self {
            target_modules: targets.iter().map(|s| (*s).to_owned()).collect(),
            alpha: None,
            dropout: 0.0,
            seed: 0,
        }
    }

    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = Some(alpha);
        self
    }

    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    fn scale(&self, r: i64) -> f64 {
        self.alpha.map_or(1.0, |a| a / r as f64)
    }

    fn validate(&self, r: i64) -> Result<()> {
        if r <= 0 {
            return Err(Error::config(format!("rank must be >= 1, got {r}")));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.alpha.is_some_and(|a| !a.is_finite()) {
            return Err(Error::config("alpha must be finite"));
        }
        Ok(())
    }
}

/// One orthogonal (or plain LoRA) adapter on one `Linear`, a delta kind of
/// tensor-core's [`AdaptedLinear`]: its change is the low-rank `s·BA`, with
/// the frozen factor handed over detached.
#[derive(Debug)]
pub struct OrthoAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// The basis and bin of an orthogonal adapter; `None` for plain LoRA.
    pub info: Option<OrthoInfo>,
    /// `‖W0‖_F` of the base this adapter was made on.
    pub base_norm: f64,
}

impl OrthoAdapter {
    /// An adapter from its factors; the frozen factor (if any) gets
    /// `requires_grad = false`, the other `true`.
    pub fn new(
        a: Tensor,
        b: Tensor,
        scale: f64,
        info: Option<OrthoInfo>,
        base_norm: f64,
    ) -> Result<Self> {
        let f = LoraFactors::new(a, b, scale)?;
        let side = info.map(|i| i.spec.frozen_side);
        let a = f.a.set_requires_grad(side != Some(FrozenSide::Input));
        let b = f.b.set_requires_grad(side != Some(FrozenSide::Output));
        Ok(Self {
            a,
            b,
            scale,
            dropout: 0.0,
            info,
            base_norm,
        })
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    pub fn frozen_side(&self) -> Option<FrozenSide> {
        self.info.map(|i| i.spec.frozen_side)
    }

    /// Which of `[A, B]` train.
    fn trained(&self) -> [bool; 2] {
        match self.frozen_side() {
            Some(FrozenSide::Input) => [false, true],
            Some(FrozenSide::Output) => [true, false],
            None => [true, true],
        }
    }

    /// `s·B·A` in f32, detached.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.lora().delta_weight()
    }

    pub fn lora(&self) -> LoraFactors {
        LoraFactors {
            a: self.a.detach(),
            b: self.b.detach(),
            scale: self.scale,
        }
    }
}

impl LinearDelta for OrthoAdapter {
    fn kind(&self) -> &'static str {
        if self.info.is_some() {
            "orthogonal LoRA"
        } else {
            "LoRA"
        }
    }

    fn param_names(&self, name: &str) -> Vec<String> {
        vec![
            format!("lora_A.{name}.weight"),
            format!("lora_B.{name}.weight"),
        ]
    }

    fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.a, &self.b]
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.a, &mut self.b]
    }

    /// The frozen factor is detached here, so it never receives a gradient
    /// even if a glob marks it trainable.
    fn low_rank(&self) -> Option<LowRank> {
        let [ta, tb] = self.trained();
        let keep = |t: &Tensor, trained: bool| {
            if trained {
                t.shallow_clone()
            } else {
                t.detach()
            }
        };
        Some(LowRank {
            a: keep(&self.a, ta),
            b: keep(&self.b, tb),
            scale: self.scale,
            dropout: self.dropout,
        })
    }
}

/// What an `add_*` / `load_adapter` call did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AddReport {
    /// Paths that received the adapter.
    pub paths: Vec<String>,
    /// Parameters the adapter trains.
    pub trainable: i64,
    /// Frozen basis parameters it stores.
    pub frozen: i64,
}

/// `‖W‖_F` in f64.
pub(crate) fn frobenius(w: &Tensor) -> Result<f64> {
    Ok(w.f_to_kind(Kind::Double)?.f_norm()?.double_value(&[]))
}

/// Every adapter name on the model's adapted linear layers (of any crate), in first-seen order.
pub fn adapter_names<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    tensor_core::adapt::adapter_names(model)
}

fn check_new_name<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<()> {
    check_name(name)?;
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(tensor_core::Error::duplicate_adapter(name.to_owned()).into());
    }
    Ok(())
}

/// Put `adapter` on the `Linear` at `path` (wrapping it first if needed),
/// active beside the others: `W = W0 + Σ_i ΔW_i`.
pub(crate) fn insert_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    path: &str,
    name: &str,
    adapter: OrthoAdapter,
) -> Result<()> {
    tensor_core::adapt::insert(model, path, name, Box::new(adapter))?;
    if let Some(h) = downcast_mut::<AdaptedLinear>(model.slot_mut(path)?.as_mut()) {
        h.activate(name);
    }
    Ok(())
}

pub(crate) fn install<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    built: Vec<(String, OrthoAdapter)>,
) -> Result<AddReport> {
    let mut report = AddReport::default();
    for (p, a) in built {
        for (t, trained) in [&a.a, &a.b].into_iter().zip(a.trained()) {
            if trained {
                report.trainable += t.numel() as i64;
            } else {
                report.frozen += t.numel() as i64;
            }
        }
        insert_adapter(model, &p, name, a)?;
        report.paths.push(p);
    }
    Ok(report)
}

/// Add concept `concept`'s orthogonal adapter (its bin from `registry`) to
/// every `Linear` matching `cfg.target_modules`. The adapter is named after
/// the concept.
pub fn add_orthogonal<M: ModuleExt + ?Sized>(
    model: &mut M,
    concept: &str,
    registry: &Registry,
    cfg: &AdapterConfig,
) -> Result<AddReport> {
    let spec = registry.spec;
    cfg.validate(spec.rank)?;
    check_new_name(model, concept)?;
    let bin = registry.bin(concept)?;
    let info = OrthoInfo { spec, bin };
    let r = spec.rank;
    let mut built = Vec::new();
    for p in resolve_targets(model, &cfg.target_modules)? {
        let lin = base_linear(model, &p)?;
        let (out, inp) = (lin.out_features(), lin.in_features());
        let (kind, dev) = (lin.weight.kind(), lin.weight.device());
        let n = spec.frozen_side.size(out, inp);
        registry.check_adapted_layer(&p, n)?;
        let basis = spec.block(&p, n, bin, kind, dev)?; // [n, r]
        let (a, b) = match spec.frozen_side {
            FrozenSide::Input => (
                basis.f_transpose(0, 1)?.f_contiguous()?,
                Tensor::f_zeros([out, r], (kind, dev))?,
            ),
            FrozenSide::Output => (Tensor::f_zeros([r, inp], (kind, dev))?, basis),
        };
        let mut ad = OrthoAdapter::new(a, b, cfg.scale(r), Some(info), frobenius(&lin.weight)?)?;
        ad.dropout = cfg.dropout;
        built.push((p, ad));
    }
    install(model, concept, built)
}

/// Add a plain LoRA adapter (the control): `A ~ U(±1/√in)` seeded by
/// `(cfg.seed, path, name)`, `B = 0`, both trained; PEFT's default initialisation.
pub fn add_lora<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    rank: i64,
    cfg: &AdapterConfig,
) -> Result<AddReport> {
    cfg.validate(rank)?;
    check_new_name(model, name)?;
    let mut built = Vec::new();
    for p in resolve_targets(model, &cfg.target_modules)? {
        let lin = base_linear(model, &p)?;
        let (out, inp) = (lin.out_features(), lin.in_features());
        let (kind, dev) = (lin.weight.kind(), lin.weight.device());
        let bound = 1.0 / (inp as f64).sqrt();
        let seed = name_seed(cfg.seed, &[&p, name, "lora"]);
        let a = uniform_seeded(&[rank, inp], bound, seed, dev)?.f_to_kind(kind)?;
        let b = Tensor::f_zeros([out, rank], (kind, dev))?;
        let mut ad = OrthoAdapter::new(a, b, cfg.scale(rank), None, frobenius(&lin.weight)?)?;
        ad.dropout = cfg.dropout;
        built.push((p, ad));
    }
    install(model, name, built)
}

fn check_known<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<()> {
    let known = adapter_names(model);
    if known.iter().any(|k| k == name) {
        Ok(())
    } else {
        Err(tensor_core::Error::unknown_adapter(name, known).into())
    }
}

/// Remove adapter `name` everywhere; layers left without adapters get their `Linear` back.
pub fn remove_adapter<M: ModuleExt + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    check_known(model, name)?;
    let mut err = None;
    model.for_each_slot_mut(&mut |_, slot| {
        if let Some(h) = downcast_mut::<AdaptedLinear>(slot.as_mut())
            && let Err(e) = h.remove(name)
        {
            err.get_or_insert(e);
        }
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    tensor_core::adapt::unwrap_empty_hosts(model)?;
    Ok(())
}

/// Turn every adapter's contribution on or off (off: the base model).
pub fn set_adapters_enabled<M: ModuleExt + ?Sized>(model: &mut M, enabled: bool) -> Result<()> {
    model.for_each_slot_mut(&mut |_, slot| {
        if let Some(h) = downcast_mut::<AdaptedLinear>(slot.as_mut()) {
            h.set_enabled(enabled)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Full names of the trained factors of this crate's adapters `names` (all when empty).
pub fn trained_parameter_names<M: ModuleExt + ?Sized>(model: &M, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (p, h) in hosts(model) {
        for (n, d) in h.deltas() {
            let Some(a) = downcast_delta::<OrthoAdapter>(d) else {
                continue;
            };
            if names.is_empty() || names.contains(&n) {
                for (local, trained) in h.param_names_of(n).iter().zip(a.trained()) {
                    if trained {
                        out.push(join_path(&p, local));
                    }
                }
            }
        }
    }
    out
}

/// Make exactly the trained factors of adapters `names` (all when empty),
/// plus the parameters matching the globs in `also` (e.g. `classifier.*`),
/// trainable; freeze everything else. Returns how many parameters are trainable.
pub fn mark_only_trainable<M: ModuleExt + ?Sized>(
    model: &mut M,
    names: &[&str],
    also: &[&str],
) -> usize {
    let keep = trained_parameter_names(model, names);
    tensor_core::adapt::mark_only_trainable(model, &keep, also)
}

/// Adapter `name` of `model` as a [`TaskDelta`] (LoRA factors per layer,
/// detached, sharing storage with the model), with its metadata. Any
/// adapter whose change is a plain `s·BA` qualifies, whichever crate added it.
pub fn task_delta<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<TaskDelta> {
    check_known(model, name)?;
    let mut t = TaskDelta::new(name);
    let mut norms = BTreeMap::new();
    let mut info = None;
    for (p, h) in hosts(model) {
        let Some(d) = h.get(name) else {
            continue;
        };
        let l = d.low_rank().ok_or_else(|| {
            Error::config(format!(
                "{p}: adapter '{name}' is a {} delta, not a low-rank s·BA; it cannot be merged as a task",
                d.kind()
            ))
        })?;
        t.layers.insert(
            p.clone(),
            Delta::Lora(LoraFactors {
                a: l.a.detach(),
                b: l.b.detach(),
                scale: l.scale,
            }),
        );
        let norm = match downcast_delta::<OrthoAdapter>(d) {
            Some(a) => {
                info = a.info;
                a.base_norm
            }
            None => frobenius(&h.linear().weight)?,
        };
        norms.insert(p, norm);
    }
    t.meta = Some(AdapterMeta {
        concept: name.to_owned(),
        orthogonal: info,
        base_norms: norms,
    });
    Ok(t)
}

/// Fold every adapter into its base weight (`W += s·B·A`, in f32) and put
/// the plain `Linear`s back. Returns the number of layers changed.
pub fn merge_and_unload<M: ModuleExt + ?Sized>(model: &mut M) -> Result<usize> {
    let mut n = 0;
    model.for_each_slot_mut(&mut |path, slot| {
        let Some(h) = downcast_mut::<AdaptedLinear>(slot.as_mut()) else {
            return Ok(());
        };
        let names = h.names();
        if h.merge(path, &names, false)? > 0 {
            n += 1;
        }
        let old = std::mem::replace(slot, Box::new(Identity));
        *slot = match downcast_box::<AdaptedLinear>(old) {
            Ok(h) => h.into_inner(),
            Err(old) => old,
        };
        Ok(())
    })?;
    Ok(n)
}

/// `W += d` (computed in f32, stored in `W`'s dtype), under `no_grad`.
pub(crate) fn add_to_weight(lin: &mut Linear, d: &Tensor) -> Result<()> {
    if d.size() != lin.weight.size() {
        return Err(Error::mismatch(format!(
            "a delta of shape {:?} cannot be added to a weight of shape {:?}",
            d.size(),
            lin.weight.size()
        )));
    }
    tch::no_grad(|| -> Result<()> {
        let w = lin
            .weight
            .f_to_kind(Kind::Float)?
            .f_add(&d.f_to_kind(Kind::Float)?.f_to_device(lin.weight.device())?)?;
        lin.weight.f_copy_(&w.f_to_kind(lin.weight.kind())?)?;
        Ok(())
    })
}

/// `W += d` for the `Linear` at `path` (plain or wrapped).
pub(crate) fn add_to_layer<M: ModuleExt + ?Sized>(
    model: &mut M,
    path: &str,
    d: &Tensor,
) -> Result<()> {
    let lin = base_linear_mut(model, path)?;
    add_to_weight(lin, d).map_err(|e| match e {
        Error::Mismatch(m) => Error::mismatch(format!("{path}: {m}")),
        other => other,
    })
}
