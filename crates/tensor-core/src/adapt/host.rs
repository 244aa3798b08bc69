//! [`AdaptedLinear`]: a frozen `Linear` with named deltas beside it, and the
//! helpers that find, wrap and unwrap such layers in a model tree.
//!
//! The base stays under a transparent child, so its parameters keep their
//! checkpoint names (`query.weight`) and each delta's sit beside them under
//! the names it gives (`query.lora_A.<name>.weight`).
//!
//! Forward with the live deltas `A` (active, not merged, host enabled):
//! - every one has a low-rank view: `y = x Wᵀ + b`, then
//!   `y = addmm(y, s_a·x A_aᵀ, B_aᵀ)` per delta: one skinny GEMM pair per
//!   adapter and no separate add;
//! - otherwise the three stages of [`crate::adapt::delta`]: input scales,
//!   the base GEMM, output scales, then `y = h + Σ_a c_a(x, h)`;
//! - a [`MixedBatch`] in the context: one forward for samples that each
//!   name their adapter ([`crate::adapt::mixed`]).
//!
//! Merging folds deltas into `W` (and `b`) in f32, scale → normalising →
//! additive, and records each fold's undo tensor; unmerging pops the records
//! last first. A plan is computed whole before anything is written, so a
//! refused merge (a data-dependent delta, an order no fold reproduces, NaN
//! or Inf under `safe`) leaves the layer unchanged.

use tch::{Kind, Tensor};

use crate::adapt::delta::{DeltaInput, LinearDelta, LowRank, MergeOrder, downcast_delta};
use crate::adapt::mixed::{MixedBatch, stack_padded, stack_vectors};
use crate::adapt::target::matches_any;
use crate::error::{Error, Result, check_finite};
use crate::layers::Linear;
use crate::module::{
    Context, Identity, Module, ModuleExt, Slot, downcast_box, downcast_mut, downcast_ref, is,
};

/// One named delta and its parameter names.
#[derive(Debug)]
struct Entry {
    name: String,
    names: Vec<String>,
    delta: Box<dyn LinearDelta>,
}

/// What undoing one fold needs.
#[derive(Debug)]
struct MergeRecord {
    name: String,
    undo: Option<Tensor>,
}

/// A `Linear` with named deltas of any kind.
#[derive(Debug)]
pub struct AdaptedLinear {
    base: Slot,
    entries: Vec<Entry>,
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
                Error::config(format!(
                    "adapters on a linear layer need a Linear, found a {kind}"
                )),
            ));
        }
        Ok(Self {
            base,
            entries: Vec::new(),
            active: Vec::new(),
            enabled: true,
            merged: Vec::new(),
        })
    }

    pub fn linear(&self) -> &Linear {
        downcast_ref::<Linear>(self.base.as_ref()).expect("checked in wrap")
    }

    pub fn linear_mut(&mut self) -> &mut Linear {
        downcast_mut::<Linear>(self.base.as_mut()).expect("checked in wrap")
    }

    /// Add delta `name`; it becomes active if nothing else is (PEFT's rule
    /// for the first adapter).
    pub fn add(&mut self, name: &str, delta: Box<dyn LinearDelta>) -> Result<()> {
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::DuplicateAdapter(name.to_owned()));
        }
        if self.active.is_empty() {
            self.active.push(name.to_owned());
        }
        self.entries.push(Entry {
            name: name.to_owned(),
            names: delta.param_names(name),
            delta,
        });
        Ok(())
    }

    /// Make `name` active beside those already active.
    pub fn activate(&mut self, name: &str) {
        if self.has(name) && !self.active.iter().any(|a| a == name) {
            self.active.push(name.to_owned());
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// Delta `name`, if held here.
    pub fn get(&self, name: &str) -> Option<&dyn LinearDelta> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.delta.as_ref())
    }

    /// Delta `name` as its concrete type, if held here and of that type.
    pub fn get_as<T: LinearDelta>(&self, name: &str) -> Option<&T> {
        self.get(name).and_then(downcast_delta::<T>)
    }

    /// `(name, delta)` in the order they were added.
    pub fn deltas(&self) -> impl Iterator<Item = (&str, &dyn LinearDelta)> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.delta.as_ref()))
    }

    /// Full parameter names (local to this layer) of delta `name`.
    pub fn param_names_of(&self, name: &str) -> &[String] {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map_or(&[], |e| e.names.as_slice())
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Activate exactly those of `names` that are held here.
    pub fn set_active(&mut self, names: &[String]) {
        self.active = names.iter().filter(|n| self.has(n)).cloned().collect();
    }

    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// `false`: the layer computes the base output only (deltas kept).
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if !enabled && !self.merged.is_empty() {
            return Err(Error::adapter_state(
                "cannot disable adapters that are merged into the base weights; unmerge first",
            ));
        }
        self.enabled = enabled;
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn is_merged(&self, name: &str) -> bool {
        self.merged.iter().any(|m| m.name == name)
    }

    /// Remove delta `name` and hand it back; `Ok(None)` if it is not held here.
    pub fn remove(&mut self, name: &str) -> Result<Option<Box<dyn LinearDelta>>> {
        if self.is_merged(name) {
            return Err(Error::adapter_state(format!(
                "adapter '{name}' is merged into the base weights; unmerge before deleting it"
            )));
        }
        let Some(i) = self.entries.iter().position(|e| e.name == name) else {
            return Ok(None);
        };
        self.active.retain(|a| a != name);
        Ok(Some(self.entries.remove(i).delta))
    }

    /// Parameters of delta `name` here (0 if not held).
    pub fn param_count(&self, name: &str) -> i64 {
        self.get(name).map_or(0, |d| d.param_count())
    }

    /// Merged deltas, first merged first.
    pub fn merged(&self) -> Vec<String> {
        self.merged.iter().map(|m| m.name.clone()).collect()
    }

    /// The wrapped module (deltas dropped).
    pub fn into_inner(self) -> Slot {
        self.base
    }

    /// Active deltas whose change is not already in `W`.
    fn live(&self) -> Vec<&Entry> {
        if !self.enabled {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|e| self.active.contains(&e.name) && !self.is_merged(&e.name))
            .collect()
    }

    /// `x Wᵀ + b + Σ s·x AᵀBᵀ` through `addmm`, on `x` flattened to 2-D.
    fn forward_low_rank(&self, x: &Tensor, views: &[LowRank], train: bool) -> Result<Tensor> {
        let lin = self.linear();
        let size = x.size();
        let x2 = x.f_reshape([-1, lin.in_features()])?;
        let mut y = x2.f_linear(&lin.weight, lin.bias.as_ref())?;
        for l in views {
            let xd = if train && l.dropout > 0.0 {
                x2.f_dropout(l.dropout, true)?
            } else {
                x2.shallow_clone()
            };
            let t = xd.f_mm(&l.a.f_transpose(0, 1)?)?.f_mul_scalar(l.scale)?;
            y = y.f_addmm(&t, &l.b.f_transpose(0, 1)?)?;
        }
        let mut out = size;
        *out.last_mut().expect("checked dim") = lin.out_features();
        Ok(y.f_reshape(out.as_slice())?)
    }

    fn forward_stages(&self, x: &Tensor, ctx: &Context, live: &[&Entry]) -> Result<Tensor> {
        let lin = self.linear();
        let mut xin = x.shallow_clone();
        for e in live {
            if let Some(u) = e.delta.input_scale() {
                xin = xin.f_mul(&u.f_to_kind(x.kind())?)?;
            }
        }
        let (mut h, nobias) = if live.iter().any(|e| e.delta.needs_base_nobias()) {
            let nb = xin.f_linear::<&Tensor>(&lin.weight, None)?;
            let h = match &lin.bias {
                Some(b) => nb.f_add(b)?,
                None => nb.shallow_clone(),
            };
            (h, Some(nb))
        } else {
            (xin.f_linear(&lin.weight, lin.bias.as_ref())?, None)
        };
        for e in live {
            if let Some(v) = e.delta.output_scale() {
                h = h.f_mul(&v.f_to_kind(h.kind())?)?;
            }
        }
        let io = DeltaInput {
            x,
            h: &h,
            base_nobias: nobias.as_ref(),
            linear: lin,
            attention_mask: ctx.attention_mask.as_ref(),
            train: ctx.train,
        };
        let mut out = h.shallow_clone();
        for e in live {
            if let Some(c) = e.delta.additive(&io)? {
                out = out.f_add(&c)?;
            }
        }
        Ok(out)
    }

    fn forward_mixed(&self, x: &Tensor, ctx: &Context, mb: &MixedBatch) -> Result<Tensor> {
        if !self.merged.is_empty() {
            return Err(Error::adapter_state(
                "a mixed-adapter batch needs unmerged adapters; unmerge first",
            ));
        }
        mb.check_rows(x, "mixed-batch input")?;
        if let Some((e, why)) = self
            .entries
            .iter()
            .find_map(|e| e.delta.unmixable().map(|w| (e, w)))
        {
            return Err(Error::adapter_state(format!(
                "mixed-adapter batches are not supported with {} adapters ('{}': {why})",
                e.delta.kind(),
                e.name
            )));
        }
        let lin = self.linear();
        // [B, 1, ..., k] view of a per-sample [B, k] tensor, to broadcast over `like`.
        let per_row = |t: Tensor, like: &Tensor| -> Result<Tensor> {
            let mut shape = vec![t.size()[0]];
            shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(2)));
            shape.push(t.size()[1]);
            Ok(t.f_reshape(shape.as_slice())?)
        };
        // Each sample's product of the scale vectors of its own adapter.
        let gather = |pick: &dyn Fn(&dyn LinearDelta) -> Option<&Tensor>,
                      like: &Tensor|
         -> Result<Option<Tensor>> {
            let (mut names, mut vs) = (Vec::new(), Vec::new());
            for e in &self.entries {
                if let Some(v) = pick(e.delta.as_ref()) {
                    names.push(e.name.as_str());
                    vs.push(v.f_to_kind(like.kind())?);
                }
            }
            if vs.is_empty() {
                return Ok(None);
            }
            let g = stack_vectors(&vs, 1.0)?.f_index_select(0, &mb.local_index(&names)?)?;
            Ok(Some(per_row(g, like)?))
        };
        let mut xin = x.shallow_clone();
        if let Some(u) = gather(&|d| d.input_scale(), x)? {
            xin = xin.f_mul(&u)?;
        }
        let mut h = xin.f_linear(&lin.weight, lin.bias.as_ref())?;
        if let Some(v) = gather(&|d| d.output_scale(), &h)? {
            h = h.f_mul(&v)?;
        }
        let mut out = h.shallow_clone();
        let (mut low_names, mut a_s, mut b_s) = (Vec::new(), Vec::new(), Vec::new());
        let mut other = Vec::new();
        for e in &self.entries {
            match e.delta.low_rank() {
                Some(l) => {
                    low_names.push(e.name.as_str());
                    b_s.push(l.b.f_mul_scalar(l.scale)?);
                    a_s.push(l.a);
                }
                None => other.push(e),
            }
        }
        if !a_s.is_empty() {
            let local = mb.local_index(&low_names)?;
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
            let names: Vec<&str> = other.iter().map(|e| e.name.as_str()).collect();
            let local = mb.local_index(&names)?;
            let io = DeltaInput {
                x,
                h: &h,
                base_nobias: None,
                linear: lin,
                attention_mask: ctx.attention_mask.as_ref(),
                train: false,
            };
            for (j, e) in other.iter().enumerate() {
                if let Some(c) = e.delta.additive(&io)? {
                    out = out.f_add(&c.f_mul(&MixedBatch::row_mask(&local, j, &c)?)?)?;
                }
            }
        }
        Ok(out)
    }

    /// The merge of the held deltas among `names`, computed from the current
    /// weights without writing them (see the module docs for the rules).
    fn plan_merge(&self, path: &str, names: &[String], safe: bool) -> Result<MergePlan> {
        let mut todo: Vec<&Entry> = Vec::new();
        for n in names {
            if let Some(e) = self.entries.iter().find(|e| &e.name == n)
                && !self.is_merged(n)
                && !todo.iter().any(|t| t.name == e.name)
            {
                todo.push(e);
            }
        }
        for e in &todo {
            if e.delta.merge_order().is_none() {
                return Err(Error::adapter_state(format!(
                    "{path}: adapter '{}' cannot be merged: its change depends on the input ({})",
                    e.name,
                    e.delta.kind()
                )));
            }
        }
        todo.sort_by_key(|e| e.delta.merge_order());
        let mut done: Vec<MergeOrder> = self
            .merged
            .iter()
            .filter_map(|m| self.get(&m.name).and_then(|d| d.merge_order()))
            .collect();
        let lin = self.linear();
        let mut w = lin.weight.f_to_kind(Kind::Float)?.f_detach()?;
        let mut b = lin
            .bias
            .as_ref()
            .map(|b| b.f_to_kind(Kind::Float).and_then(|b| b.f_detach()))
            .transpose()?;
        let mut steps = Vec::new();
        for e in todo {
            let k = e.delta.merge_order().expect("checked above");
            let refused = match k {
                MergeOrder::Normalizing => !done.is_empty(),
                MergeOrder::Scale => done.iter().any(|d| *d != MergeOrder::Scale),
                MergeOrder::Additive => false,
            };
            if refused {
                return Err(Error::adapter_state(format!(
                    "{path}: merging '{}' ({}) after other merged adapters on this layer would not reproduce the unmerged forward; unmerge first",
                    e.name,
                    e.delta.kind()
                )));
            }
            let f = e.delta.fold(&w, b.as_ref())?;
            if safe {
                let bad = check_finite("merge", "weight", &f.weight).is_err()
                    || f.bias
                        .as_ref()
                        .is_some_and(|b| check_finite("merge", "bias", b).is_err());
                if bad {
                    return Err(Error::NonFiniteMerge {
                        adapter: e.name.clone(),
                        path: path.to_owned(),
                    });
                }
            }
            w = f.weight;
            b = f.bias;
            done.push(k);
            steps.push(MergeRecord {
                name: e.name.clone(),
                undo: f.undo,
            });
        }
        Ok(MergePlan {
            result: (!steps.is_empty()).then_some((w, b)),
            steps,
        })
    }

    /// The errors [`AdaptedLinear::merge`] would give, with no side effect.
    pub fn check_merge(&self, path: &str, names: &[String], safe: bool) -> Result<()> {
        self.plan_merge(path, names, safe).map(|_| ())
    }

    /// Fold the held deltas among `names` into the weights; returns how many.
    /// `path` names the layer in errors.
    pub fn merge(&mut self, path: &str, names: &[String], safe: bool) -> Result<usize> {
        let plan = self.plan_merge(path, names, safe)?;
        let n = plan.steps.len();
        if let Some((w, b)) = plan.result {
            self.write_base(&w, b.as_ref())?;
        }
        self.merged.extend(plan.steps);
        Ok(n)
    }

    /// Undo every merge, last first; returns how many.
    pub fn unmerge_all(&mut self, path: &str) -> Result<usize> {
        let mut n = 0;
        while let Some(rec) = self.merged.pop() {
            let Some(d) = self.get(&rec.name) else {
                return Err(Error::adapter_state(format!(
                    "{path}: merged adapter '{}' vanished",
                    rec.name
                )));
            };
            let lin = self.linear();
            let w = lin.weight.f_to_kind(Kind::Float)?.f_detach()?;
            let b = lin
                .bias
                .as_ref()
                .map(|b| b.f_to_kind(Kind::Float))
                .transpose()?;
            let (w, b) = d.unfold(&w, b.as_ref(), rec.undo.as_ref())?;
            if check_finite("unmerge", "weight", &w).is_err() {
                self.merged.push(rec);
                return Err(Error::adapter_state(format!(
                    "{path}: cannot unmerge: the result is not finite (a scaling or normalising factor is 0)"
                )));
            }
            self.write_base(&w, b.as_ref())?;
            n += 1;
        }
        Ok(n)
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

/// Folds computed but not yet written.
struct MergePlan {
    steps: Vec<MergeRecord>,
    result: Option<(Tensor, Option<Tensor>)>,
}

impl Module for AdaptedLinear {
    fn kind(&self) -> &'static str {
        "AdaptedLinear"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let lin = self.linear();
        if xs.dim() == 0 || xs.size().last() != Some(&lin.in_features()) {
            return Err(Error::shape(
                "AdaptedLinear",
                format!("[*, {}]", lin.in_features()),
                xs.size(),
            ));
        }
        if let Some(mb) = ctx
            .get::<MixedBatch>()
            .filter(|_| self.enabled && !self.entries.is_empty())
        {
            return self.forward_mixed(xs, ctx, mb);
        }
        let live = self.live();
        if live.is_empty() {
            return ctx.call("", self.base.as_ref(), xs);
        }
        if let Some(views) = live
            .iter()
            .map(|e| e.delta.low_rank())
            .collect::<Option<Vec<_>>>()
        {
            return self.forward_low_rank(xs, &views, ctx.train);
        }
        self.forward_stages(xs, ctx, &live)
    }

    fn params(&self) -> Vec<(&str, &Tensor)> {
        let mut v = Vec::new();
        for e in &self.entries {
            v.extend(e.names.iter().map(String::as_str).zip(e.delta.tensors()));
        }
        v
    }

    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let mut v = Vec::new();
        for Entry { names, delta, .. } in &mut self.entries {
            v.extend(names.iter().map(String::as_str).zip(delta.tensors_mut()));
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

/// Paths of the `Linear` layers, plain or adapted, deduplicated, in model order.
pub fn linear_paths<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (p, m) in model.named_modules() {
        if (is::<Linear>(m) || is::<AdaptedLinear>(m)) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The `Linear` paths matching `patterns`; an error naming some paths when none does.
pub fn resolve_targets<M: ModuleExt + ?Sized>(
    model: &M,
    patterns: &[String],
) -> Result<Vec<String>> {
    if patterns.is_empty() {
        return Err(Error::config(
            "target_modules is empty; name the Linear layers to adapt (e.g. [\"query\", \"value\"])",
        ));
    }
    let all = linear_paths(model);
    let hits: Vec<String> = all
        .iter()
        .filter(|p| matches_any(p, patterns))
        .cloned()
        .collect();
    if hits.is_empty() {
        return Err(Error::NoTarget {
            patterns: patterns.to_vec(),
            kind: "Linear",
            examples: all.into_iter().take(8).collect(),
        });
    }
    Ok(hits)
}

/// The base `Linear` at `path`, adapted or not.
pub fn base_linear<'a, M: ModuleExt + ?Sized>(model: &'a M, path: &str) -> Result<&'a Linear> {
    let m = model.get(path)?;
    if let Some(l) = downcast_ref::<Linear>(m) {
        return Ok(l);
    }
    if let Some(h) = downcast_ref::<AdaptedLinear>(m) {
        return Ok(h.linear());
    }
    Err(Error::module(
        path,
        format!("holds a {}, not a Linear", m.kind()),
    ))
}

/// The base `Linear` at `path`, mutably.
pub fn base_linear_mut<'a, M: ModuleExt + ?Sized>(
    model: &'a mut M,
    path: &str,
) -> Result<&'a mut Linear> {
    let slot = model.slot_mut(path)?;
    let kind = slot.kind();
    if is::<Linear>(slot.as_ref()) {
        return Ok(downcast_mut::<Linear>(slot.as_mut()).expect("checked"));
    }
    if let Some(h) = downcast_mut::<AdaptedLinear>(slot.as_mut()) {
        return Ok(h.linear_mut());
    }
    Err(Error::module(path, format!("holds a {kind}, not a Linear")))
}

/// Every [`AdaptedLinear`] with its path, in model order.
pub fn hosts<M: ModuleExt + ?Sized>(model: &M) -> Vec<(String, &AdaptedLinear)> {
    model
        .named_modules()
        .into_iter()
        .filter_map(|(p, m)| downcast_ref::<AdaptedLinear>(m).map(|h| (p, h)))
        .collect()
}

/// Every delta name on the model's adapted linear layers, in first-seen order.
pub fn adapter_names<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, h) in hosts(model) {
        for (n, _) in h.deltas() {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_owned());
            }
        }
    }
    out
}

/// Put delta `name` on the `Linear` at `path`, wrapping it first if needed.
/// On an error the slot is as it was.
pub fn insert<M: ModuleExt + ?Sized>(
    model: &mut M,
    path: &str,
    name: &str,
    delta: Box<dyn LinearDelta>,
) -> Result<()> {
    let slot = model.slot_mut(path)?;
    if let Some(h) = downcast_mut::<AdaptedLinear>(slot.as_mut()) {
        return h.add(name, delta);
    }
    let old = std::mem::replace(slot, Box::new(Identity));
    match AdaptedLinear::wrap(old) {
        Ok(mut h) => match h.add(name, delta) {
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
            Err(e.within(path))
        }
    }
}

/// Put the plain `Linear` back wherever a host holds no delta and no merge;
/// returns how many layers were unwrapped.
pub fn unwrap_empty_hosts<M: ModuleExt + ?Sized>(model: &mut M) -> Result<usize> {
    let mut n = 0;
    model.for_each_slot_mut(&mut |_, slot| {
        if downcast_ref::<AdaptedLinear>(slot.as_ref())
            .is_some_and(|h| h.entries.is_empty() && h.merged.is_empty())
        {
            let old = std::mem::replace(slot, Box::new(Identity));
            *slot = match downcast_box::<AdaptedLinear>(old) {
                Ok(h) => h.into_inner(),
                Err(old) => old,
            };
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}

/// Make exactly the parameters named in `keep` (full names), plus those
/// matching the globs in `also` (e.g. `classifier.*`), trainable; freeze
/// everything else. Returns how many tensors are trainable.
pub fn mark_only_trainable<M: ModuleExt + ?Sized>(
    model: &mut M,
    keep: &[String],
    also: &[&str],
) -> usize {
    let mut n = 0;
    let _ = model.for_each_param_mut(&mut |name, t| {
        let on = keep.iter().any(|k| k == name)
            || also.iter().any(|g| crate::module::glob_match(g, name));
        if t.requires_grad() != on {
            *t = t.detach().set_requires_grad(on);
        }
        n += on as usize;
        Ok(())
    });
    n
}
