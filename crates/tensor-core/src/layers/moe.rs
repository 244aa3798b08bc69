//! A sparse mixture-of-experts feed-forward block as pretrained MoE
//! decoders ship it (Mixtral: Jiang et al. 2024, arXiv 2401.04088; Qwen-MoE
//! with its shared expert), computed with [`crate::grouped`].
//!
//! For a token `x` with router logits `z = W_r x` (`W_r: [E, d]`):
//!
//! ```text
//! p    = softmax(z)                                  (f32)
//! S, g = top-k of p;   g ← g / Σ g  when normalised   (Mixtral always; Qwen-MoE's norm_topk_prob)
//! y    = Σ_{e∈S} g_e · W2_e (act(W1_e x) ⊙ W3_e x)   (SwiGLU experts)
//!      + σ(w_s · x) · shared(x)                      (Qwen-MoE's shared expert, if any)
//! ```
//!
//! The experts are stacked, `W1, W3: [E, d_ff, d]`, `W2: [E, d, d_ff]`
//! (`tensor_core::grouped`'s `[E, out, in]` layout); the block names them as
//! its checkpoint family does ([`MoeNames`]), and the loader stacks the
//! per-expert checkpoint tensors into them. `moe-router` can take such a
//! block over as its own MoE layer with the router and the experts keeping
//! their values.

use tch::{Kind, Tensor};

use crate::error::{Error, Result, TchResultExt};
use crate::grouped::{Dispatch, grouped_linear};
use crate::layers::Activation;
use crate::module::{Context, Module, Slot};

/// The names of a [`SparseMoeBlock`]'s parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeNames {
    /// What `Module::kind` reports.
    pub kind: &'static str,
    /// The router `Linear [E, d]`.
    pub gate: &'static str,
    /// Stacked `W1` (gate projection), `W3` (up projection), `W2` (down projection).
    pub w1: &'static str,
    pub w3: &'static str,
    pub w2: &'static str,
    /// The shared expert and its gate (Qwen-MoE).
    pub shared: &'static str,
    pub shared_gate: &'static str,
}

impl MoeNames {
    /// Mixtral's `block_sparse_moe`: `gate`, `experts.{i}.w1 / w3 / w2`.
    pub const fn mixtral() -> Self {
        Self {
            kind: "MixtralSparseMoeBlock",
            gate: "gate",
            w1: "experts.w1",
            w3: "experts.w3",
            w2: "experts.w2",
            shared: "shared_expert",
            shared_gate: "shared_expert_gate",
        }
    }

    /// Qwen-MoE's `mlp`: `gate`, `experts.{i}.gate_proj / up_proj / down_proj`,
    /// `shared_expert`, `shared_expert_gate`.
    pub const fn qwen_moe() -> Self {
        Self {
            kind: "Qwen2MoeSparseMoeBlock",
            gate: "gate",
            w1: "experts.gate_proj",
            w3: "experts.up_proj",
            w2: "experts.down_proj",
            shared: "shared_expert",
            shared_gate: "shared_expert_gate",
        }
    }
}

#[derive(Debug, Module)]
#[module(kind_expr = "self.names.kind", forward = forward_impl)]
pub struct SparseMoeBlock {
    pub names: MoeNames,
    /// The router, a bias-free `Linear [E, d]`.
    #[child(name_expr = "self.names.gate")]
    pub gate: Slot,
    /// `[E, d_ff, d]`
    #[param(name_expr = "self.names.w1")]
    pub w1: Tensor,
    /// `[E, d_ff, d]`
    #[param(name_expr = "self.names.w3")]
    pub w3: Tensor,
    /// `[E, d, d_ff]`
    #[param(name_expr = "self.names.w2")]
    pub w2: Tensor,
    #[child(name_expr = "self.names.shared")]
    pub shared: Option<Slot>,
    /// `Linear [1, d]`, the shared expert's sigmoid gate.
    #[child(name_expr = "self.names.shared_gate")]
    pub shared_gate: Option<Slot>,
    pub top_k: i64,
    /// Renormalise the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
    pub activation: Activation,
}

impl SparseMoeBlock {
    pub fn num_experts(&self) -> i64 {
        self.w1.size()[0]
    }

    /// The routing of `x: [N, d]`: chosen experts `[N, k]` and gates `[N, k]` (f32).
    pub fn route(&self, x: &Tensor, ctx: &mut Context) -> Result<(Tensor, Tensor)> {
        let op = "SparseMoeBlock router";
        let z = ctx.call(self.names.gate, self.gate.as_ref(), x)?;
        let p = z.f_softmax(-1, Kind::Float).op(op)?;
        let (mut g, idx) = p.f_topk(self.top_k, -1, true, true).op(op)?;
        if self.norm_topk_prob {
            g = g
                .f_div(&g.f_sum_dim_intlist(-1, true, Kind::Float).op(op)?)
                .op(op)?;
        }
        Ok((idx, g))
    }

    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let op = "SparseMoeBlock";
        let s = xs.size();
        let d = *s.last().unwrap_or(&0);
        if d != self.w1.size()[2] {
            return Err(Error::shape(op, format!("[*, {}]", self.w1.size()[2]), s));
        }
        let x = xs.f_reshape([-1, d]).op(op)?;
        let (idx, g) = self.route(&x, ctx)?;
        let dispatch = Dispatch::new(&idx, self.num_experts())?;
        let counts = dispatch.counts_host()?;
        let xs_sorted = dispatch.permute(&x)?;
        let a = grouped_linear(&xs_sorted, &counts, &self.w1, None)?;
        let u = grouped_linear(&xs_sorted, &counts, &self.w3, None)?;
        let h = self.activation.apply(&a)?.f_mul(&u).op(op)?;
        ctx.record("act", &h)?;
        let y = grouped_linear(&h, &counts, &self.w2, None)?;
        let mut out = dispatch.unpermute(&y, Some(&g.f_to_kind(y.kind()).op(op)?))?;
        if let Some(shared) = &self.shared {
            let sy = ctx.call(self.names.shared, shared.as_ref(), &x)?;
            let sy = match &self.shared_gate {
                Some(sg) => {
                    let w = ctx.call(self.names.shared_gate, sg.as_ref(), &x)?;
                    sy.f_mul(&w.f_sigmoid().op(op)?).op(op)?
                }
                None => sy,
            };
            out = out.f_add(&sy).op(op)?;
        }
        out.f_reshape(s.as_slice()).op(op)
    }
}
