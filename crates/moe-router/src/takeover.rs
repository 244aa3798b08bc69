//! Taking over a pretrained model's sparse MoE blocks (Mixtral, Qwen-MoE:
//! `tensor_core::layers::SparseMoeBlock`) as this crate's [`MoeLayer`], so
//! that its losses, capacity, growing and pruning apply to them
//! (docs/moe-router.md, "Pretrained MoE decoders").
//!
//! The block's router `W_r` becomes the linear gate with softmax scores;
//! its experts `(W1, W3, W2)` (gate, up, down projections) become the
//! SwiGLU experts `(w_gate, w1, w2)`; the top-k weights are renormalised
//! (`renorm`) when the block renormalises them and kept as the softmax
//! probabilities (`raw`) otherwise. Routing stays dropless (capacity factor
//! 0) until the user changes it, so the taken-over layer computes what the
//! block did. A Qwen-MoE shared expert and its sigmoid gate stay as they are,
//! beside the layer ([`SharedExpertMoe`]).

use tensor_core::layers::{Activation, SparseMoeBlock};
use tensor_core::module::{Context, Identity, Module, ModuleExt, Slot, downcast_box, is};
use tensor_core::tch::Tensor;

use crate::config::{GateType, RouterConfig, ScoreFn, WeightMode};
use crate::error::{Error, Result};
use crate::moe::{DroplessKernel, ExpertActivation, ExpertWeights, MoeConfig, MoeLayer};
use crate::router::GateParams;

/// A routed [`MoeLayer`] plus a shared expert added to every token,
/// `y = moe(x) + σ(w_s · x) · shared(x)` (Qwen-MoE).
#[derive(Debug, Module)]
#[module(kind = "SharedExpertMoe", forward = forward_impl)]
pub struct SharedExpertMoe {
    #[child(name = "")]
    pub moe: Slot,
    #[child(name = "shared_expert")]
    pub shared: Slot,
    #[child(name = "shared_expert_gate")]
    pub shared_gate: Option<Slot>,
}

impl SharedExpertMoe {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let y = ctx.call("", self.moe.as_ref(), xs)?;
        let s = ctx.call("shared_expert", self.shared.as_ref(), xs)?;
        let s = match &self.shared_gate {
            Some(g) => s.f_mul(
                &ctx.call("shared_expert_gate", g.as_ref(), xs)?
                    .f_sigmoid()?,
            )?,
            None => s,
        };
        Ok(y.f_add(&s)?)
    }
}

/// The [`MoeLayer`] computing what `block`'s routed experts compute
/// (weights copied, dropless), and the block's shared parts.
pub fn moe_layer_from(block: &SparseMoeBlock) -> Result<MoeLayer> {
    if block.activation != Activation::Silu {
        return Err(Error::config(format!(
            "{}: only SiLU-gated (SwiGLU) experts can be taken over, this block uses {:?}",
            block.names.kind, block.activation
        )));
    }
    let (e, f, d) = {
        let s = block.w1.size();
        (s[0], s[1], s[2])
    };
    let router_w = block
        .gate
        .params()
        .into_iter()
        .find(|(n, _)| *n == "weight")
        .map(|(_, w)| w.shallow_clone())
        .ok_or_else(|| Error::config("the block's router has no 'weight'"))?;
    let router = RouterConfig {
        num_experts: e as usize,
        top_k: block.top_k as usize,
        gate: GateType::Linear,
        score: ScoreFn::Softmax,
        weight_mode: if block.norm_topk_prob {
            WeightMode::Renorm
        } else {
            WeightMode::Raw
        },
        capacity_factor: 0.0,
        ..RouterConfig::default()
    };
    let config = MoeConfig {
        activation: ExpertActivation::SwiGlu,
        bias: false,
        dropless_kernel: DroplessKernel::Auto,
        ..MoeConfig::new(d, f, router)
    };
    let device = block.w1.device();
    let mut layer = tensor_core::seed::with_seed_lock(|| MoeLayer::new(config, device))?;
    let copy = |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.copy().set_requires_grad(true)) };
    layer.router.params = GateParams::Linear {
        weight: copy(&router_w)?,
    };
    layer.experts = ExpertWeights {
        w1: copy(&block.w3)?,
        w_gate: Some(copy(&block.w1)?),
        w2: copy(&block.w2)?,
        b1: None,
        b2: None,
    };
    Ok(layer)
}

/// Replace every [`SparseMoeBlock`] of `model` by a [`MoeLayer`] (inside a
/// [`SharedExpertMoe`] when the block has a shared expert); returns their
/// paths. The model computes what it did.
pub fn take_over_sparse_blocks<M: ModuleExt + ?Sized>(model: &mut M) -> Result<Vec<String>> {
    let paths = model.find(&mut |_, m| is::<SparseMoeBlock>(m));
    for p in &paths {
        let layer = moe_layer_from(model.get_as::<SparseMoeBlock>(p)?)?;
        let slot = model.slot_mut(p)?;
        let old = std::mem::replace(slot, Box::new(Identity));
        let block = match downcast_box::<SparseMoeBlock>(old) {
            Ok(b) => b,
            Err(old) => {
                *slot = old;
                return Err(Error::config(format!("{p}: no longer a sparse MoE block")));
            }
        };
        let b = *block;
        *slot = match b.shared {
            Some(shared) => Box::new(SharedExpertMoe {
                moe: Box::new(layer),
                shared,
                shared_gate: b.shared_gate,
            }),
            None => Box::new(layer),
        };
    }
    Ok(paths)
}
