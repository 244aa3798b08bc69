//! [`AdaptedLinear`]: a frozen `Linear` with named adapters beside it
//! (PEFT's `LoraLayer` / `IA3Layer`); docs/pet-core.md, Method, part 2.
//!
//! Unmerged forward with active adapters `A` (see [`crate::lora`],
//! [`crate::ia3`], [`crate::bottleneck`], [`crate::gate`]):
//!
//! ```text
//! x̃    = x ⊙ Π_{IA3 input a∈A} l_a                     (FFN-side IA3)
//! H    = (x̃ Wᵀ + b) ⊙ Π_{IA3 output a∈A} l_a            (key/value IA3)
//! y    = H + Σ_{a∈A} c_a,  c_a = ΔH_a                    (no gate)
//!                          c_a = s·(H + ΔH_a) ⊙ G_a − H  (LoRA + G)
//! ΔH_a = s·x AᵀBᵀ (LoRA) | DoRA's change | s·act(x W_dᵀ + b_d) W_uᵀ + b_u
//! ```
//!
//! The one-LoRA case runs as `y = addmm(x Wᵀ + b, s·(x Aᵀ), Bᵀ)`: one extra
//! skinny GEMM pair and no separate add, which keeps the unmerged overhead
//! small at small batch (PEFT issues #303, #957).
//!
//! Merging folds an adapter into `W` (and `b` for output-side IA3), in f32,
//! recording what is needed to undo it exactly; unmerging pops in reverse
//! (LIFO). Data-dependent changes (bottleneck, gated) cannot be merged.

use tensor_core::error::check_finite;
use tensor_core::layers::Linear;
use tensor_core::module::{Context, Module, Slot, downcast_mut, downcast_ref};
use tensor_core::tch::{self, Kind, Tensor};

use crate::bottleneck::Bottleneck;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::host::AdapterHost;
use crate::ia3::Ia3;
use crate::lora::Lora;
use crate::mixed::{MixedBatch, stack_padded, stack_vectors};

/// The change one adapter makes to a `Linear`.
#[derive(Debug)]
pub enum LinearDelta {
    Lora(Lora),
    Ia3(Ia3),
    /// A parallel bottleneck, `s·ΔH(x)` (VL-PET's decoder value adapter).
    Bottleneck {
        module: Bottleneck,
        scale: f64,
    },
}

/// One named adapter on one `Linear`.
#[derive(Debug)]
pub struct LinearAdapter {
    pub name: String,
    pub delta: LinearDelta,
    /// VL-PET's `G` on this adapter ("LoRA + G").
    pub gate: Option<Gate>,
    /// Local parameter names, in the order of [`LinearAdapter::tensors`].
    names: Vec<String>,
}

impl LinearAdapter {
    pub fn new(name: &str, delta: LinearDelta, gate: Option<Gate>) -> Self {
        let mut names = Vec::new();
        match &delta {
            LinearDelta::Lora(l) => {
                names.push(format!("lora_A.{name}.weight"));
                names.push(format!("lora_B.{name}.weight"));
                if l.magnitude.is_some() {
                    names.push(format!("lora_magnitude_vector.{name}.weight"));
                }
            }
            LinearDelta::Ia3(_) => names.push(format!("ia3_l.{name}")),
            LinearDelta::Bottleneck { module, .. } => {
                for (n, _) in &module.params {
                    names.push(format!("adapter.{name}.{n}"));
                }
            }
        }
        if let Some(g) = &gate {
            for (n, _) in &g.params {
                names.push(format!("vlpet_gate.{name}.{n}"));
            }
        }
        Self {
            name: name.to_owned(),
            delta,
            gate,
            names,
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = match &self.delta {
            LinearDelta::Lora(l) => {
                let mut v = vec![&l.a, &l.b];
                if let Some(m) = &l.magnitude {
                    v.push(m);
                }
                v
            }
            LinearDelta::Ia3(i) => vec![&i.l],
            LinearDelta::Bottleneck { module, .. } => {
                module.params.iter().map(|(_, t)| t).collect()
            }
        };
        if let Some(g) = &self.gate {
            v.extend(g.params.iter().map(|(_, t)| t));
        }
        v
    }

    /// `(local name, tensor)` pairs, mutably (names and tensors are disjoint fields).
    fn named_tensors_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let Self {
            names, delta, gate, ..
        } = self;
        let mut v: Vec<&mut Tensor> = match delta {
            LinearDelta::Lora(l) => {
                let mut v = vec![&mut l.a, &mut l.b];
                if let Some(m) = &mut l.magnitude {
                    v.push(m);
                }
                v
            }
            LinearDelta::Ia3(i) => vec![&mut i.l],
            LinearDelta::Bottleneck { module, .. } => {
                module.params.iter_mut().map(|(_, t)| t).collect()
            }
        };
        if let Some(g) = gate {
            v.extend(g.params.iter_mut().map(|(_, t)| t));
        }
        names.iter().map(String::as_str).zip(v).collect()
    }

    /// Number of parameters this adapter adds.
    pub fn param_count(&self) -> i64 {
        self.tensors().iter().map(|t| t.numel() as i64).sum()
    }

    /// Can it be folded into `W`?
    fn mergeable(&self) -> bool {
        self.gate.is_none() && !matches!(self.delta, LinearDelta::Bottleneck { .. })
    }
}

/// What undoing one merge needs.
#[derive(Debug)]
struct MergeRecord {
    name: String,
    /// DoRA: the factor `m / ‖W + sBA‖` applied at merge time.
    dora_factor: Option<Tensor>,
}

/// Merges computed but not yet written.
struct MergePlan {
    steps: Vec<MergeRecord>,
    result: Option<(Tensor, Option<Tensor>)>,
}

/// A `Linear` with named adapters; the base stays under a transparent
/// child, so its parameters keep their names (`query.weight`).
#[derive(Debug)]
pub struct AdaptedLinear {
    base: Slot,
    adapters: Vec<LinearAdapter>,
    active: Vec<String>,
    enabled: bool,
    merged: Vec<MergeRecord>,
}

impl AdaptedLinear {
    /// Wrap `base`, which must hold a `Linear` (else it is handed back).
    pub fn wrap(base: Slot) -> std::result::Result<Self, (Slot, Error)> {
        if downcast_ref::<Linear>(base.as_ref()).is_none() {
            let kind = base.kind();
            return Err((
                base,
                Error::config(format!("LoRA/IA3 need a Linear, found a {kind}")),
            ));
        }
        Ok(Self {
            base,
            adapters: Vec::new(),
            active: Vec::new(),
            enabled: true,
            merged: Vec::new(),
        })
    }

    pub fn linear(&self) -> &Linear {
        downcast_ref::<Linear>(self.base.as_ref()).expect("checked in wrap")
    }

    fn linear_mut(&mut self) -> &mut Linear {
        downcast_mut::<Linear>(self.base.as_mut()).expect("checked in wrap")
    }

    /// Add an adapter (made active if nothing else is, as PEFT does for the first one).
    pub fn add(&mut self, adapter: LinearAdapter) -> Result<()> {
        if self.adapters.iter().any(|a| a.name == adapter.name) {
            return Err(Error::DuplicateAdapter(adapter.name));
        }
        if self.active.is_empty() {
            self.active.push(adapter.name.clone());
        }
        self.adapters.push(adapter);
        Ok(())
    }

    pub fn adapter(&self, name: &str) -> Option<&LinearAdapter> {
        self.adapters.iter().find(|a| a.name == name)
    }

    pub fn adapters(&self) -> &[LinearAdapter] {
        &self.adapters
    }

    fn is_merged(&self, name: &str) -> bool {
        self.merged.iter().any(|m| m.name == name)
    }

    /// Active adapters whose change is not already in `W`.
    fn live(&self) -> Vec<&LinearAdapter> {
        if !self.enabled {
            return Vec::new();
        }
        self.adapters
            .iter()
            .filter(|a| self.active.contains(&a.name) && !self.is_merged(&a.name))
            .collect()
    }

    fn forward_single_lora(&self, x: &Tensor, l: &Lora, train: bool) -> Result<Tensor> {
        let lin = self.linear();
        let size = x.size();
        let inp = *size.last().unwrap_or(&0);
        let x2 = x.f_reshape([-1, inp])?;
        let xd = if train && l.dropout > 0.0 {
            x2.f_dropout(l.dropout, true)?
        } else {
            x2.shallow_clone()
        };
        let y = x2.f_linear(&lin.weight, lin.bias.as_ref())?;
        let t = xd.f_mm(&l.a.f_transpose(0, 1)?)?.f_mul_scalar(l.scale)?;
        let y = y.f_addmm(&t, &l.b.f_transpose(0, 1)?)?;
        // Same leading dimensions as x, the output width last.
        let mut out_shape = size[..size.len().saturating_sub(1)].to_vec();
        out_shape.push(lin.out_features());
        Ok(y.f_reshape(out_shape.as_slice())?)
    }

    fn forward_live(&self, x: &Tensor, ctx: &Context, live: &[&LinearAdapter]) -> Result<Tensor> {
        let lin = self.linear();
        if let [a] = live
            && let LinearDelta::Lora(l) = &a.delta
            && a.gate.is_none()
            && !l.is_dora()
        {
            return self.forward_single_lora(x, l, ctx.train);
        }
        let mut xin = x.shallow_clone();
        for a in live {
            if let LinearDelta::Ia3(i) = &a.delta
                && i.on_input
            {
                xin = xin.f_mul(&i.vector(x.kind())?)?;
            }
        }
        let needs_nobias = live
            .iter()
            .any(|a| matches!(&a.delta, LinearDelta::Lora(l) if l.is_dora()));
        let (mut h, nobias) = if needs_nobias {
            let nb = xin.f_linear::<&Tensor>(&lin.weight, None)?;
            let h = match &lin.bias {
                Some(b) => nb.f_add(b)?,
                None => nb.shallow_clone(),
            };
            (h, Some(nb))
        } else {
            (xin.f_linear(&lin.weight, lin.bias.as_ref())?, None)
        };
        for a in live {
            if let LinearDelta::Ia3(i) = &a.delta
                && !i.on_input
            {
                h = h.f_mul(&i.vector(h.kind())?)?;
            }
        }
        let mut out = h.shallow_clone();
        for a in live {
            let d = match &a.delta {
                LinearDelta::Ia3(_) => continue,
                LinearDelta::Lora(l) => {
                    l.output_delta(x, nobias.as_ref(), &lin.weight, ctx.train)?
                }
                LinearDelta::Bottleneck { module, scale } => {
                    module.forward(x)?.f_mul_scalar(*scale)?
                }
            };
            let c = match &a.gate {
                None => d,
                Some(g) => g
                    .apply(x, &h.f_add(&d)?, ctx.attention_mask.as_ref())?
                    .f_sub(&h)?,
            };
            out = out.f_add(&c)?;
        }
        Ok(out)
    }

    fn forward_mixed(&self, x: &Tensor, ctx: &Context, mb: &MixedBatch) -> Result<Tensor> {
        if !self.merged.is_empty() {
            return Err(Error::state(
                "a mixed-adapter batch needs unmerged adapters; unmerge first",
            ));
        }
        mb.check_rows(x, "mixed-batch input")?;
        let lin = self.linear();
        let names_of = |pred: &dyn Fn(&LinearAdapter) -> bool| -> Vec<&LinearAdapter> {
            self.adapters.iter().filter(|a| pred(a)).collect()
        };
        if self
            .adapters
            .iter()
            .any(|a| matches!(&a.delta, LinearDelta::Lora(l) if l.is_dora()))
        {
            return Err(Error::state(
                "mixed-adapter batches are not supported with DoRA adapters (their change is not additive per row)",
            ));
        }
        let ia3_in = names_of(&|a| matches!(&a.delta, LinearDelta::Ia3(i) if i.on_input));
        let ia3_out = names_of(&|a| matches!(&a.delta, LinearDelta::Ia3(i) if !i.on_input));
        let plain_lora =
            names_of(&|a| matches!(&a.delta, LinearDelta::Lora(_)) && a.gate.is_none());
        // Everything else (gated LoRA, bottlenecks) is masked row by row.
        let other = names_of(&|a| match &a.delta {
            LinearDelta::Ia3(_) => false,
            LinearDelta::Lora(_) => a.gate.is_some(),
            LinearDelta::Bottleneck { .. } => true,
        });
        // [B, 1, ..., k] view of a per-sample [B, k] tensor, to broadcast over x.
        let per_row = |t: Tensor, like: &Tensor| -> Result<Tensor> {
            let mut shape = vec![t.size()[0]];
            shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(2)));
            shape.push(t.size()[1]);
            Ok(t.f_reshape(shape.as_slice())?)
        };
        let gather_ia3 = |set: &[&LinearAdapter], like: &Tensor| -> Result<Option<Tensor>> {
            if set.is_empty() {
                return Ok(None);
            }
            let names: Vec<&str> = set.iter().map(|a| a.name.as_str()).collect();
            let vs = set
                .iter()
                .map(|a| match &a.delta {
                    LinearDelta::Ia3(i) => i.vector(like.kind()),
                    _ => unreachable!("filtered to IA3"),
                })
                .collect::<Result<Vec<_>>>()?;
            let g = stack_vectors(&vs, 1.0)?.f_index_select(0, &mb.local_index(&names)?)?;
            Ok(Some(per_row(g, like)?))
        };
        let mut xin = x.shallow_clone();
        if let Some(l) = gather_ia3(&ia3_in, x)? {
            xin = xin.f_mul(&l)?;
        }
        let mut h = xin.f_linear(&lin.weight, lin.bias.as_ref())?;
        if let Some(l) = gather_ia3(&ia3_out, &h)? {
            h = h.f_mul(&l)?;
        }
        let mut out = h.shallow_clone();
        if !plain_lora.is_empty() {
            let names: Vec<&str> = plain_lora.iter().map(|a| a.name.as_str()).collect();
            let (mut a_s, mut b_s) = (Vec::new(), Vec::new());
            for a in &plain_lora {
                if let LinearDelta::Lora(l) = &a.delta {
                    a_s.push(l.a.shallow_clone());
                    b_s.push(l.b.f_mul_scalar(l.scale)?);
                }
            }
            let local = mb.local_index(&names)?;
            let a_g = stack_padded(&a_s, false)?.f_index_select(0, &local)?; // [B, r, in]
            let b_g = stack_padded(&b_s, true)?.f_index_select(0, &local)?; // [B, out, r]
            let x3 = if x.dim() == 2 {
                x.f_unsqueeze(1)?
            } else {
                x.f_flatten(1, -2)?
            };
            let d = x3
                .f_bmm(&a_g.f_transpose(1, 2)?)?
                .f_bmm(&b_g.f_transpose(1, 2)?)?
                .f_reshape(h.size().as_slice())?;
            out = out.f_add(&d)?;
        }
        if !other.is_empty() {
            let names: Vec<&str> = other.iter().map(|a| a.name.as_str()).collect();
            let local = mb.local_index(&names)?;
            for (j, a) in other.iter().enumerate() {
                let d = match &a.delta {
                    LinearDelta::Lora(l) => l.delta(x, false)?,
                    LinearDelta::Bottleneck { module, scale } => {
                        module.forward(x)?.f_mul_scalar(*scale)?
                    }
                    LinearDelta::Ia3(_) => unreachable!("filtered out"),
                };
                let c = match &a.gate {
                    None => d,
                    Some(g) => g
                        .apply(x, &h.f_add(&d)?, ctx.attention_mask.as_ref())?
                        .f_sub(&h)?,
                };
                out = out.f_add(&c.f_mul(&MixedBatch::row_mask(&local, j, &c)?)?)?;
            }
        }
        Ok(out)
    }

    /// `(W', b')` after merging `a` into `(w, b)`, in f32, and the DoRA factor used.
    fn merged_weights(
        a: &LinearAdapter,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let wf = w.f_to_kind(Kind::Float)?.f_detach()?;
        let bf = b
            .map(|b| b.f_to_kind(Kind::Float).and_then(|b| b.f_detach()))
            .transpose()?;
        Ok(match &a.delta {
            LinearDelta::Lora(l) => {
                let dw = l.delta_weight()?.f_detach()?;
                let sum = wf.f_add(&dw)?;
                match &l.magnitude {
                    None => (sum, bf, None),
                    Some(m) => {
                        let f = m
                            .f_to_kind(Kind::Float)?
                            .f_detach()?
                            .f_div(&crate::lora::row_norm(&sum)?)?;
                        (sum.f_mul(&f.f_unsqueeze(1)?)?, bf, Some(f))
                    }
                }
            }
            LinearDelta::Ia3(i) => {
                let l = i.l.f_to_kind(Kind::Float)?.f_detach()?;
                if i.on_input {
                    (wf.f_mul(&l.f_unsqueeze(0)?)?, bf, None)
                } else {
                    let b2 = bf.map(|b| b.f_mul(&l)).transpose()?;
                    (wf.f_mul(&l.f_unsqueeze(1)?)?, b2, None)
                }
            }
            LinearDelta::Bottleneck { .. } => unreachable!("checked mergeable"),
        })
    }

    /// The merge of the held adapters among `names`, computed from the
    /// current weights without writing them: IA3 first, then DoRA, then
    /// LoRA, which is the order in which folding reproduces the unmerged
    /// forward. Refuses combinations that no order makes exact (DoRA on a
    /// layer with anything already merged, IA3 after LoRA or DoRA), and,
    /// with `safe`, any NaN/Inf in the result.
    fn plan_merge(&self, path: &str, names: &[String], safe: bool) -> Result<MergePlan> {
        let rank = |a: &LinearAdapter| match &a.delta {
            LinearDelta::Ia3(_) => 0,
            LinearDelta::Lora(l) if l.is_dora() => 1,
            _ => 2,
        };
        let mut todo: Vec<&LinearAdapter> = names
            .iter()
            .filter_map(|n| self.adapter(n))
            .filter(|a| !self.is_merged(&a.name))
            .collect();
        todo.dedup_by(|x, y| x.name == y.name);
        todo.sort_by_key(|a| rank(a));
        let lin = self.linear();
        let mut done: Vec<u8> = self
            .merged
            .iter()
            .filter_map(|m| self.adapter(&m.name).map(rank))
            .collect();
        let mut cur: Option<(Tensor, Option<Tensor>)> = None;
        let mut steps = Vec::new();
        for a in todo {
            if !a.mergeable() {
                return Err(Error::state(format!(
                    "{path}: adapter '{}' cannot be merged: its change depends on the input (bottleneck or gated)",
                    a.name
                )));
            }
            let k = rank(a);
            if (k == 1 && !done.is_empty()) || (k == 0 && done.iter().any(|&d| d != 0)) {
                return Err(Error::state(format!(
                    "{path}: merging '{}' ({}) after other merged adapters on this layer would not reproduce the unmerged forward; unmerge first",
                    a.name,
                    if k == 0 { "IA3" } else { "DoRA" }
                )));
            }
            let (w, b) = match &cur {
                Some((w, b)) => (w.shallow_clone(), b.as_ref().map(Tensor::shallow_clone)),
                None => (
                    lin.weight.shallow_clone(),
                    lin.bias.as_ref().map(Tensor::shallow_clone),
                ),
            };
            let (w2, b2, f) = Self::merged_weights(a, &w, b.as_ref())?;
            if safe {
                let bad = check_finite("merge", "weight", &w2).is_err()
                    || b2
                        .as_ref()
                        .is_some_and(|b| check_finite("merge", "bias", b).is_err());
                if bad {
                    return Err(Error::NonFiniteMerge {
                        adapter: a.name.clone(),
                        path: path.to_owned(),
                    });
                }
            }
            cur = Some((w2, b2));
            done.push(k);
            steps.push(MergeRecord {
                name: a.name.clone(),
                dora_factor: f,
            });
        }
        Ok(MergePlan { steps, result: cur })
    }

    fn write_base(&mut self, w: &Tensor, b: Option<&Tensor>) -> Result<()> {
        let lin = self.linear_mut();
        tch::no_grad(|| -> Result<()> {
            lin.weight.f_copy_(&w.f_to_kind(lin.weight.kind())?)?;
            if let (Some(dst), Some(src)) = (lin.bias.as_mut(), b) {
                dst.f_copy_(&src.f_to_kind(dst.kind())?)?;
            }
            Ok(())
        })
    }
}

impl Module for AdaptedLinear {
    fn kind(&self) -> &'static str {
        "AdaptedLinear"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let lin = self.linear();
        if xs.size().last() != Some(&lin.in_features()) {
            return Err(tensor_core::Error::shape(
                "AdaptedLinear",
                format!("[*, {}]", lin.in_features()),
                xs.size(),
            ));
        }
        let mixed = ctx
            .get::<MixedBatch>()
            .filter(|_| self.enabled && !self.adapters.is_empty());
        let r = if let Some(mb) = mixed {
            self.forward_mixed(xs, ctx, mb)
        } else {
            let live = self.live();
            if live.is_empty() {
                return ctx.call("", self.base.as_ref(), xs);
            }
            self.forward_live(xs, ctx, &live)
        };
        r.map_err(Into::into)
    }

    fn params(&self) -> Vec<(&str, &Tensor)> {
        let mut v = Vec::new();
        for a in &self.adapters {
            for (n, t) in a.names.iter().zip(a.tensors()) {
                v.push((n.as_str(), t));
            }
        }
        v
    }

    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let mut v = Vec::new();
        for a in &mut self.adapters {
            v.extend(a.named_tensors_mut());
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

impl AdapterHost for AdaptedLinear {
    fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }

    fn set_active(&mut self, names: &[String]) {
        self.active = names
            .iter()
            .filter(|n| self.adapters.iter().any(|a| &a.name == *n))
            .cloned()
            .collect();
    }

    fn active_names(&self) -> Vec<String> {
        self.active.clone()
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if !enabled && !self.merged.is_empty() {
            return Err(Error::state(
                "cannot disable adapters that are merged into the base weights; unmerge first",
            ));
        }
        self.enabled = enabled;
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<bool> {
        if self.is_merged(name) {
            return Err(Error::state(format!(
                "adapter '{name}' is merged into the base weights; unmerge before deleting it"
            )));
        }
        let before = self.adapters.len();
        self.adapters.retain(|a| a.name != name);
        self.active.retain(|a| a != name);
        Ok(self.adapters.len() != before)
    }

    fn check_merge(&self, path: &str, names: &[String], safe: bool) -> Result<()> {
        self.plan_merge(path, names, safe).map(|_| ())
    }

    fn merge(&mut self, path: &str, names: &[String], safe: bool) -> Result<usize> {
        let plan = self.plan_merge(path, names, safe)?;
        let n = plan.steps.len();
        if let Some((w, b)) = plan.result {
            self.write_base(&w, b.as_ref())?;
        }
        self.merged.extend(plan.steps);
        Ok(n)
    }

    fn unmerge_all(&mut self, path: &str) -> Result<usize> {
        let mut n = 0;
        while let Some(rec) = self.merged.pop() {
            let a = self
                .adapters
                .iter()
                .find(|a| a.name == rec.name)
                .ok_or_else(|| {
                    Error::state(format!("{path}: merged adapter '{}' vanished", rec.name))
                })?;
            let lin = self.linear();
            let w = lin.weight.f_to_kind(Kind::Float)?.f_detach()?;
            let b = lin
                .bias
                .as_ref()
                .map(|b| b.f_to_kind(Kind::Float))
                .transpose()?;
            let (w, b) = match &a.delta {
                LinearDelta::Lora(l) => {
                    let w = match &rec.dora_factor {
                        Some(f) => w.f_div(&f.f_unsqueeze(1)?)?,
                        None => w,
                    };
                    (w.f_sub(&l.delta_weight()?.f_detach()?)?, b)
                }
                LinearDelta::Ia3(i) => {
                    let l = i.l.f_to_kind(Kind::Float)?.f_detach()?;
                    if i.on_input {
                        (w.f_div(&l.f_unsqueeze(0)?)?, b)
                    } else {
                        let b = b.map(|b| b.f_div(&l)).transpose()?;
                        (w.f_div(&l.f_unsqueeze(1)?)?, b)
                    }
                }
                LinearDelta::Bottleneck { .. } => unreachable!("never merged"),
            };
            if check_finite("unmerge", "weight", &w).is_err() {
                self.merged.push(rec);
                return Err(Error::state(format!(
                    "{path}: cannot unmerge: the result is not finite (an IA3 or DoRA factor is 0)"
                )));
            }
            self.write_base(&w, b.as_ref())?;
            n += 1;
        }
        Ok(n)
    }

    fn merged_names(&self) -> Vec<String> {
        self.merged.iter().map(|m| m.name.clone()).collect()
    }

    fn adapter_param_count(&self, name: &str) -> i64 {
        self.adapter(name)
            .map(|a| a.tensors().iter().map(|t| t.numel() as i64).sum())
            .unwrap_or(0)
    }

    fn into_inner(self: Box<Self>) -> Slot {
        self.base
    }
}
