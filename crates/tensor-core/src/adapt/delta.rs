//! [`LinearDelta`]: what one adapter does to one frozen `Linear`
//! `y = x Wᵀ + b`, `W ∈ R^{out×in}`. The trait is open: a method crate adds
//! an adapter kind by implementing it, with no change to the host or to any
//! other kind.
//!
//! A delta acts at up to three stages (docs/tensor-core.md, "Adapted linear
//! layers"):
//!
//! ```text
//! x̃ = x ⊙ u            input_scale()   u ∈ R^{in}
//! h = (x̃ Wᵀ + b) ⊙ v    output_scale()  v ∈ R^{out}
//! y = h + c(x, h)       additive()      (any shape-preserving change)
//! ```
//!
//! and may fold into the weights: `fold` maps `(W, b)` to `(W', b')` in f32
//! with an optional undo tensor, `unfold` inverts it. Folding reproduces
//! the unmerged forward only in the order scale → normalising → additive
//! ([`MergeOrder`]); the host enforces it.

use std::any::Any;
use std::fmt::Debug;

use tch::Tensor;

use crate::error::Result;
use crate::layers::Linear;

/// A plain low-rank change `c = s · Dropout(x) Aᵀ Bᵀ`, `ΔW = s·BA`.
/// Factors that must not train are handed over detached.
#[derive(Debug)]
pub struct LowRank {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

/// Where a delta's fold must come relative to the others on one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MergeOrder {
    /// Rescales rows or columns of `W` (IA3): first, and only after other scales.
    Scale,
    /// Renormalises `W` (DoRA): only onto a layer with nothing merged.
    Normalizing,
    /// Adds to `W` (LoRA and its relatives): last.
    Additive,
}

/// The result of folding one delta into `(W, b)`.
#[derive(Debug)]
pub struct Folded {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// What `unfold` needs beyond the delta itself (DoRA's `m/‖W + sBA‖`).
    pub undo: Option<Tensor>,
}

/// What the additive stage sees.
pub struct DeltaInput<'a> {
    /// The layer input (before any input scaling).
    pub x: &'a Tensor,
    /// The base output after the scaling stages, bias included.
    pub h: &'a Tensor,
    /// `x̃ Wᵀ` without the bias, computed when some live delta asks for it
    /// ([`LinearDelta::needs_base_nobias`]).
    pub base_nobias: Option<&'a Tensor>,
    /// The frozen base layer.
    pub linear: &'a Linear,
    /// `[batch, seq]` padding mask of the forward pass, if any.
    pub attention_mask: Option<&'a Tensor>,
    /// Training mode (dropout on).
    pub train: bool,
}

/// One adapter kind's change to a `Linear`. Every method has a default
/// except the parameter lists and [`LinearDelta::kind`], so a kind states
/// only the stages it uses.
pub trait LinearDelta: Any + Debug + Send {
    /// The kind's name in messages (`"LoRA"`, `"IA3"`, ...).
    fn kind(&self) -> &'static str;

    /// Parameter names under the host for adapter `name`, in the order of
    /// [`LinearDelta::tensors`] (PEFT's in-memory layout, e.g.
    /// `lora_A.<name>.weight`).
    fn param_names(&self, name: &str) -> Vec<String>;

    fn tensors(&self) -> Vec<&Tensor>;

    fn tensors_mut(&mut self) -> Vec<&mut Tensor>;

    /// Parameters it adds.
    fn param_count(&self) -> i64 {
        self.tensors().iter().map(|t| t.numel() as i64).sum()
    }

    /// `u ∈ R^{in}` of the input-scale stage.
    fn input_scale(&self) -> Option<&Tensor> {
        None
    }

    /// `v ∈ R^{out}` of the output-scale stage.
    fn output_scale(&self) -> Option<&Tensor> {
        None
    }

    /// The plain low-rank view, when the whole change is `s·x AᵀBᵀ`.
    fn low_rank(&self) -> Option<LowRank> {
        None
    }

    /// Does [`LinearDelta::additive`] read [`DeltaInput::base_nobias`]?
    fn needs_base_nobias(&self) -> bool {
        false
    }

    /// The additive change `c(x, h)`, or `None` for a pure scaling delta.
    /// The default computes the low-rank view's change.
    fn additive(&self, io: &DeltaInput<'_>) -> Result<Option<Tensor>> {
        let Some(l) = self.low_rank() else {
            return Ok(None);
        };
        let x = if io.train && l.dropout > 0.0 {
            io.x.f_dropout(l.dropout, true)?
        } else {
            io.x.shallow_clone()
        };
        Ok(Some(
            x.f_linear::<&Tensor>(&l.a, None)?
                .f_linear::<&Tensor>(&l.b, None)?
                .f_mul_scalar(l.scale)?,
        ))
    }

    /// `Some(order)` when the change folds into the weights; `None` when it
    /// depends on the input (bottlenecks, gates).
    fn merge_order(&self) -> Option<MergeOrder> {
        self.low_rank().map(|_| MergeOrder::Additive)
    }

    /// `(W, b)` (f32, detached) with this change folded in. The default
    /// adds the low-rank view's `s·BA`.
    fn fold(&self, w: &Tensor, b: Option<&Tensor>) -> Result<Folded> {
        let l = self.low_rank().ok_or_else(|| not_foldable(self.kind()))?;
        Ok(Folded {
            weight: w.f_add(&low_rank_weight(&l)?)?,
            bias: b.map(Tensor::shallow_clone),
            undo: None,
        })
    }

    /// The inverse of [`LinearDelta::fold`], given its undo tensor.
    fn unfold(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        _undo: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let l = self.low_rank().ok_or_else(|| not_foldable(self.kind()))?;
        Ok((
            w.f_sub(&low_rank_weight(&l)?)?,
            b.map(Tensor::shallow_clone),
        ))
    }

    /// Why it cannot join a mixed-adapter batch, if it cannot.
    fn unmixable(&self) -> Option<&'static str> {
        None
    }
}

/// `s·BA` of a low-rank view, in f32, detached.
pub fn low_rank_weight(l: &LowRank) -> Result<Tensor> {
    let b = l.b.f_detach()?.f_to_kind(tch::Kind::Float)?;
    let a = l.a.f_detach()?.f_to_kind(tch::Kind::Float)?;
    Ok(b.f_matmul(&a)?.f_mul_scalar(l.scale)?)
}

fn not_foldable(kind: &str) -> crate::Error {
    crate::Error::AdapterState(format!(
        "a {kind} delta cannot be folded into the weights: its change depends on the input"
    ))
}

/// `delta` as its concrete type, if it is one.
pub fn downcast_delta<T: LinearDelta>(delta: &dyn LinearDelta) -> Option<&T> {
    (delta as &dyn Any).downcast_ref::<T>()
}

/// `delta` as its concrete type, mutably, if it is one.
pub fn downcast_delta_mut<T: LinearDelta>(delta: &mut dyn LinearDelta) -> Option<&mut T> {
    (delta as &mut dyn Any).downcast_mut::<T>()
}
