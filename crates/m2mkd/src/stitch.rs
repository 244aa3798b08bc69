//! Stitch layers (m2mKD §3.2): trainable maps between the meta model's width
//! and a student module's width, on the student side only.
//!
//! - V-MoE students: `pre = Linear_{d_m -> d_s}(LN(h))` before the module's
//!   first block, `post = Linear_{d_s -> d_m}(LN(h))` after its last block
//!   ([`StitchKind::LayerNormLinear`], the default here);
//! - NAC students: plain `Linear` maps ([`StitchKind::Linear`]).
//!
//! Module 0 reads the raw input, so it has no `pre`; the last module uses
//! its own head, so it has no `post`. [`StitchPolicy`] says when stitches
//! exist: only when widths differ (`Auto`, the default), always, or never
//! (then a width mismatch is an error).

use serde::{Deserialize, Serialize};
use tensor_core::layers::{LayerNorm, Linear};
use tensor_core::tch::{self, Device, Tensor};
use tensor_core::{Context, Module, Slot};

use crate::error::Result;
use crate::stage::check_width;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StitchKind {
    /// `Linear(LN(h))` (the V-MoE student's stitches).
    #[default]
    LayerNormLinear,
    /// `Linear(h)` (the NAC student's stitches).
    Linear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StitchPolicy {
    /// Stitches only where the student's width differs from the meta width.
    #[default]
    Auto,
    /// Stitches on every student module (except module 0's `pre` and the last's `post`).
    Always,
    /// No stitches: a width mismatch is an error.
    Never,
}

/// One stitch: `Linear(LN?(h))`, children named `LayerNorm` and `linear`.
#[derive(Debug, Module)]
#[module(kind = "Stitch", forward = forward_impl)]
pub struct Stitch {
    #[child(name = "LayerNorm")]
    pub norm: Option<Slot>,
    #[child]
    pub linear: Slot,
    input: i64,
    output: i64,
}

impl Stitch {
    /// A fresh stitch `input -> output` (LayerNorm 1/0, PyTorch's Linear init).
    pub fn new(kind: StitchKind, input: i64, output: i64, device: Device) -> Result<Self> {
        let norm: Option<Slot> = match kind {
            StitchKind::LayerNormLinear => {
                Some(Box::new(LayerNorm::new(input, 1e-6, true, device)?))
            }
            StitchKind::Linear => None,
        };
        Ok(Self {
            norm,
            linear: Box::new(Linear::new(input, output, true, device)?),
            input,
            output,
        })
    }

    /// A `Linear` stitch that starts as the identity (`W = I`, `b = 0`);
    /// for self-distillation checks and for stitches between equal widths.
    pub fn identity(width: i64, device: Device) -> Result<Self> {
        // The random init is overwritten; drawing it under the seed lock
        // keeps it out of any other thread's seeded draws.
        let mut s = tensor_core::seed::with_seed_lock(|| {
            Self::new(StitchKind::Linear, width, width, device)
        })?;
        let lin = tensor_core::module::downcast_mut::<Linear>(s.linear.as_mut())
            .expect("Stitch::new puts a Linear in the slot");
        tch::no_grad(|| -> Result<()> {
            lin.weight
                .f_copy_(&Tensor::f_eye(width, (lin.weight.kind(), device))?)?;
            if let Some(b) = &mut lin.bias {
                let _ = b.f_zero_()?;
            }
            Ok(())
        })?;
        Ok(s)
    }

    pub fn input_width(&self) -> i64 {
        self.input
    }

    pub fn output_width(&self) -> i64 {
        self.output
    }
}

impl Stitch {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        check_width("Stitch input", xs, self.input)?;
        let h = match &self.norm {
            Some(n) => ctx.call("LayerNorm", n.as_ref(), xs)?,
            None => xs.shallow_clone(),
        };
        ctx.call("linear", self.linear.as_ref(), &h)
    }
}

/// A student module with the stitches it was distilled with:
/// `post(module(pre(h)))`. The module sits under the transparent name `""`,
/// so its parameters keep the names they had without stitches, and the
/// stitches sit beside them as `stitch_pre.*` / `stitch_post.*`.
#[derive(Debug, Module)]
#[module(kind = "Stitched", forward = forward_impl)]
pub struct Stitched {
    #[child(name = "stitch_pre")]
    pub pre: Option<Slot>,
    #[child(name = "")]
    pub module: Slot,
    #[child(name = "stitch_post")]
    pub post: Option<Slot>,
}

impl Stitched {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let mut h = match &self.pre {
            Some(p) => ctx.call("stitch_pre", p.as_ref(), xs)?,
            None => xs.shallow_clone(),
        };
        h = ctx.call("", self.module.as_ref(), &h)?;
        if let Some(p) = &self.post {
            h = ctx.call("stitch_post", p.as_ref(), &h)?;
        }
        Ok(h)
    }
}
