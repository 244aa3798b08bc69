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
//! [`OrthoLinear`] keeps the base `Linear` under a transparent child, so its
//! parameters keep their names (`query.weight`) and the adapters' sit
//! beside them as `query.lora_A.<name>.weight` / `query.lora_B.<name>.weight`
//! (PEFT's in-memory layout). Adding is all-or-nothing: every target's
//! adapter is built before the first slot changes.

use std::collections::BTreeMap;

use tensor_core::layers::Linear;
use tensor_core::module::{
    Context, Identity, Module, ModuleExt, Slot, downcast_box, downcast_mut, downcast_ref, join_path,
};
use tensor_core::seed::with_seed;
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

/// One named adapter on one `Linear`.
#[derive(Debug)]
pub struct OrthoAdapter {
    pub name: String,
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
    names: [String; 2],
}

impl OrthoAdapter {
    /// An adapter from its factors; the frozen factor (if any) gets
    /// `requires_grad = false`, the other `true`.
    pub fn new(
        name: &str,
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
            name: name.to_owned(),
            a,
            b,
            scale,
            dropout: 0.0,
            info,
            base_norm,
            names: [
                format!("lora_A.{name}.weight"),
                format!("lora_B.{name}.weight"),
            ],
        })
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    pub fn frozen_side(&self) -> Option<FrozenSide> {
        self.info.map(|i| i.spec.frozen_side)
    }

    /// Local name of the trained factor(s).
    fn trained_names(&self) -> Vec<&str> {
        match self.frozen_side() {
            Some(FrozenSide::Input) => vec![self.names[1].as_str()],
            Some(FrozenSide::Output) => vec![self.names[0].as_str()],
            None => vec![self.names[0].as_str(), self.names[1].as_str()],
        }
    }

    /// The factors with the frozen one detached.
    fn factors(&self) -> (Tensor, Tensor) {
        match self.frozen_side() {
            Some(FrozenSide::Input) => (self.a.detach(), self.b.shallow_clone()),
            Some(FrozenSide::Output) => (self.a.shallow_clone(), self.b.detach()),
            None => (self.a.shallow_clone(), self.b.shallow_clone()),
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

/// A `Linear` with orthogonal (or plain LoRA) adapters beside it; the base
/// stays under a transparent child, so its parameters keep their names.
#[derive(Debug)]
pub struct OrthoLinear {
    base: Slot,
    adapters: Vec<OrthoAdapter>,
    enabled: bool,
}

impl OrthoLinear {
    /// Wrap `base`, which must hold a `Linear` (else it is handed back).
    pub fn wrap(base: Slot) -> std::result::Result<Self, (Slot, Error)> {
        if downcast_ref::<Linear>(base.as_ref()).is_none() {
            let kind = base.kind();
            return Err((
                base,
                Error::config(format!("orthogonal adapters need a Linear, found a {kind}")),
            ));
        }
        Ok(Self {
            base,
            adapters: Vec::new(),
            enabled: true,
        })
    }

    pub fn linear(&self) -> &Linear {
        downcast_ref::<Linear>(self.base.as_ref()).expect("checked in wrap")
    }

    pub fn linear_mut(&mut self) -> &mut Linear {
        downcast_mut::<Linear>(self.base.as_mut()).expect("checked in wrap")
    }

    pub fn add(&mut self, adapter: OrthoAdapter) -> Result<()> {
        if self.adapters.iter().any(|a| a.name == adapter.name) {
            return Err(Error::DuplicateAdapter(adapter.name));
        }
        let lin = self.linear();
        let (o, i) = (lin.out_features(), lin.in_features());
        if adapter.b.size()[0] != o || adapter.a.size()[1] != i {
            return Err(Error::mismatch(format!(
                "adapter '{}' has A {:?}, B {:?}, but the Linear is [{o}, {i}]",
                adapter.name,
                adapter.a.size(),
                adapter.b.size()
            )));
        }
        self.adapters.push(adapter);
        Ok(())
    }

    pub fn adapter(&self, name: &str) -> Option<&OrthoAdapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    pub fn adapters(&self) -> &[OrthoAdapter] {
        &self.adapters
    }

    /// Remove adapter `name`; returns it if it was there.
    pub fn remove(&mut self, name: &str) -> Option<OrthoAdapter> {
        let i = self.adapters.iter().position(|a| a.name == name)?;
        Some(self.adapters.remove(i))
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// The base module back.
    pub fn into_inner(self) -> Slot {
        self.base
    }

    fn forward_adapters(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let lin = self.linear();
        let size = x.size();
        let inp = *size.last().unwrap_or(&0);
        let x2 = x.f_reshape([-1, inp])?;
        let mut y = x2.f_linear(&lin.weight, lin.bias.as_ref())?;
        for ad in &self.adapters {
            let (a, b) = ad.factors();
            let xd = if train && ad.dropout > 0.0 {
                x2.f_dropout(ad.dropout, true)?
            } else {
                x2.shallow_clone()
            };
            let t = xd.f_mm(&a.f_transpose(0, 1)?)?.f_mul_scalar(ad.scale)?;
            y = y.f_addmm(&t, &b.f_transpose(0, 1)?)?;
        }
        let mut out = size;
        *out.last_mut().expect("checked dim") = lin.out_features();
        Ok(y.f_reshape(out.as_slice())?)
    }
}

impl Module for OrthoLinear {
    fn kind(&self) -> &'static str {
        "OrthoLinear"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let lin = self.linear();
        if xs.dim() == 0 || xs.size().last() != Some(&lin.in_features()) {
            return Err(tensor_core::Error::shape(
                "OrthoLinear",
                format!("[*, {}]", lin.in_features()),
                xs.size(),
            ));
        }
        if !self.enabled || self.adapters.is_empty() {
            return ctx.call("", self.base.as_ref(), xs);
        }
        self.forward_adapters(xs, ctx.train).map_err(Into::into)
    }

    fn params(&self) -> Vec<(&str, &Tensor)> {
        let mut v = Vec::new();
        for a in &self.adapters {
            v.push((a.names[0].as_str(), &a.a));
            v.push((a.names[1].as_str(), &a.b));
        }
        v
    }

    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let mut v = Vec::new();
        for a in &mut self.adapters {
            let OrthoAdapter { names, a, b, .. } = a;
            v.push((names[0].as_str(), a));
            v.push((names[1].as_str(), b));
        }
        v
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("", self.base.as_ref())]
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("", &mut self.base)]
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

/// Every adapter name in the model, in first-seen order.
pub fn adapter_names<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, m) in model.named_modules() {
        if let Some(h) = downcast_ref::<OrthoLinear>(m) {
            for a in &h.adapters {
                if !out.contains(&a.name) {
                    out.push(a.name.clone());
                }
            }
        }
    }
    out
}

/// Every `OrthoLinear` with its path.
fn hosts<M: ModuleExt + ?Sized>(model: &M) -> Vec<(String, &OrthoLinear)> {
    model
        .named_modules()
        .into_iter()
        .filter_map(|(p, m)| downcast_ref::<OrthoLinear>(m).map(|h| (p, h)))
        .collect()
}

fn check_new_name<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<()> {
    check_name(name)?;
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(Error::DuplicateAdapter(name.to_owned()));
    }
    Ok(())
}

/// Put `adapter` into the `OrthoLinear` at `path`, wrapping the `Linear` first if needed.
pub(crate) fn insert_adapter<M: ModuleExt + ?Sized>(
    model: &mut M,
    path: &str,
    adapter: OrthoAdapter,
) -> Result<()> {
    let slot = model.slot_mut(path)?;
    if let Some(h) = downcast_mut::<OrthoLinear>(slot.as_mut()) {
        return h.add(adapter);
    }
    let old = std::mem::replace(slot, Box::new(Identity));
    match OrthoLinear::wrap(old) {
        Ok(mut h) => match h.add(adapter) {
            Ok(()) => {
                *slot = Box::new(h);
                Ok(())
            }
            Err(e) => {
                *slot = h.into_inner();
                Err(e)
            }
        },
        Err((old, e)) => {
            *slot = old;
            Err(e)
        }
    }
}

pub(crate) fn install<M: ModuleExt + ?Sized>(
    model: &mut M,
    built: Vec<(String, OrthoAdapter)>,
) -> Result<AddReport> {
    let mut report = AddReport::default();
    for (p, a) in built {
        for (t, trained) in [(&a.a, a.a.requires_grad()), (&a.b, a.b.requires_grad())] {
            if trained {
                report.trainable += t.numel() as i64;
            } else {
                report.frozen += t.numel() as i64;
            }
        }
        insert_adapter(model, &p, a)?;
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
        let mut ad = OrthoAdapter::new(
            concept,
            a,
            b,
            cfg.scale(r),
            Some(info),
            frobenius(&lin.weight)?,
        )?;
        ad.dropout = cfg.dropout;
        built.push((p, ad));
    }
    install(model, built)
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
        let a = with_seed(seed, || {
            Tensor::f_empty([rank, inp], (Kind::Float, tch::Device::Cpu))
                .and_then(|mut t| t.f_uniform_(-bound, bound))
        })?
        .f_to_kind(kind)?
        .f_to_device(dev)?;
        let b = Tensor::f_zeros([out, rank], (kind, dev))?;
        let mut ad = OrthoAdapter::new(name, a, b, cfg.scale(rank), None, frobenius(&lin.weight)?)?;
        ad.dropout = cfg.dropout;
        built.push((p, ad));
    }
    install(model, built)
}

fn check_known<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<()> {
    let known = adapter_names(model);
    if known.iter().any(|k| k == name) {
        Ok(())
    } else {
        Err(Error::UnknownAdapter {
            name: name.to_owned(),
            available: known,
        })
    }
}

/// Remove adapter `name` everywhere; layers left without adapters get their `Linear` back.
pub fn remove_adapter<M: ModuleExt + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    check_known(model, name)?;
    model.for_each_slot_mut(&mut |_, slot| {
        if let Some(h) = downcast_mut::<OrthoLinear>(slot.as_mut()) {
            h.remove(name);
            if h.adapters.is_empty() {
                let old = std::mem::replace(slot, Box::new(Identity));
                *slot = match downcast_box::<OrthoLinear>(old) {
                    Ok(h) => h.into_inner(),
                    Err(old) => old,
                };
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Turn every adapter's contribution on or off (off: the base model).
pub fn set_adapters_enabled<M: ModuleExt + ?Sized>(model: &mut M, enabled: bool) -> Result<()> {
    model.for_each_slot_mut(&mut |_, slot| {
        if let Some(h) = downcast_mut::<OrthoLinear>(slot.as_mut()) {
            h.set_enabled(enabled);
        }
        Ok(())
    })?;
    Ok(())
}

/// Full names of the trained factors of adapters `names` (all when empty).
pub fn trained_parameter_names<M: ModuleExt + ?Sized>(model: &M, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (p, h) in hosts(model) {
        for a in &h.adapters {
            if names.is_empty() || names.contains(&a.name.as_str()) {
                out.extend(a.trained_names().into_iter().map(|n| join_path(&p, n)));
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
    let mut n = 0;
    let _ = model.for_each_param_mut(&mut |name, t| {
        let on = keep.iter().any(|k| k == name)
            || also
                .iter()
                .any(|g| tensor_core::module::glob_match(g, name));
        if t.requires_grad() != on {
            *t = t.detach().set_requires_grad(on);
        }
        n += on as usize;
        Ok(())
    });
    n
}

/// Adapter `name` of `model` as a [`TaskDelta`] (LoRA factors per layer,
/// detached, sharing storage with the model), with its metadata.
pub fn task_delta<M: ModuleExt + ?Sized>(model: &M, name: &str) -> Result<TaskDelta> {
    check_known(model, name)?;
    let mut t = TaskDelta::new(name);
    let mut norms = BTreeMap::new();
    let mut info = None;
    for (p, h) in hosts(model) {
        if let Some(a) = h.adapter(name) {
            t.layers.insert(p.clone(), Delta::Lora(a.lora()));
            norms.insert(p, a.base_norm);
            info = a.info;
        }
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
    let mut err = None;
    model.for_each_slot_mut(&mut |_, slot| {
        if !tensor_core::module::is::<OrthoLinear>(slot.as_ref()) {
            return Ok(());
        }
        let old = std::mem::replace(slot, Box::new(Identity));
        let h = downcast_box::<OrthoLinear>(old).expect("checked");
        let mut d = None;
        for a in &h.adapters {
            match a.delta_weight() {
                Ok(w) => {
                    d = Some(match d {
                        None => w,
                        Some(acc) => acc + w,
                    })
                }
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
        }
        let mut base = h.into_inner();
        if let (Some(d), Some(lin)) = (d, downcast_mut::<Linear>(base.as_mut())) {
            if let Err(e) = add_to_weight(lin, &d) {
                err.get_or_insert(e);
            }
            n += 1;
        }
        *slot = base;
        Ok(())
    })?;
    err.map_or(Ok(n), Err)
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
