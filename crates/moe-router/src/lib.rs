//! # moe-router
//!
//! Sparse mixture-of-experts on libtorch: routers, capacity-bounded and
//! dropless dispatch, the auxiliary losses, and ModuleFormer's attention
//! experts with stick-breaking attention.
//!
//! - **Routing and losses**: Switch Transformer (Fedus et al., arXiv
//!   2101.03961), ST-MoE (arXiv 2202.08906), noisy top-k (Shazeer et al.,
//!   arXiv 1701.06538), Expert Choice (arXiv 2202.09368), Hash Layers
//!   (arXiv 2106.04426), DeepSpeed-MoE, Tutel, MegaBlocks dMoE (arXiv 2211.15841);
//! - **ModuleFormer**: Shen et al., "ModuleFormer: Modularity Emerges from
//!   Mixture-of-Experts" (arXiv 2306.04640), `IBM/ModuleFormer`;
//!   stick-breaking attention: Tan et al. (arXiv 2410.17980).
//!
//! Specification: `docs/moe-router.md` (Method). Files in reading order:
//! 1. [`error`]: what can be wrong (`k ∉ 1..=E`, bad shapes, missing ids), as errors;
//! 2. [`config`]: [`RouterConfig`], every open point as a JSON field with the spec's default;
//! 3. [`router`]: logits (linear, MLP, cosine, hash, fixed), jitter and
//!    noise, softmax/sigmoid top-k with sampling, weight modes, expert
//!    choice; the [`Routing`] result; per-expert statistics on every call;
//! 4. [`capacity`]: capacity formulas, slots by position or priority, on the device;
//! 5. [`losses`]: balance (Switch/DeepSpeed/MegaBlocks), z-loss, CV²,
//!    ModuleFormer's MI loss (with accumulation), load concentration;
//! 6. [`moe`]: [`MoeLayer`], stacked experts (GELU or SwiGLU), a chunked
//!    padded kernel (capacity: no host sync; dropless: one), `tensor_core::grouped`,
//!    the device grouped GEMM (`torch._grouped_mm`, dropless with no host
//!    sync; the default for bf16 on CUDA), expert choice, and the dense masked
//!    reference; a [`tensor_core::Module`] that replaces a `FeedForward` slot;
//! 7. [`stick_breaking`]: stick-breaking attention in log space, `O(T²)`,
//!    MF/SB variants, remainder options; the `O(T³)` reference;
//! 8. [`moa`]: [`MixtureOfAttention`], per-expert query/output projections
//!    over shared keys and values;
//! 9. [`block`]: [`moduleformer_block`] (pre-LN MoA + MoE FFN on `tensor-core`'s `PreNormBlock`), slots named as GPT-2's;
//! 10. [`extend`]: grow a trained MoE FFN or MoA with new (masked) experts,
//!     freeze the old ones, prune the experts a dataset does not use.
//!
//! Padding tokens (`ctx.attention_mask`) are not dispatched and are left out
//! of every auxiliary loss and statistic ([`router::token_mask`]).
//!
//! ```no_run
//! use moe_router::{MoeConfig, MoeLayer, RouterConfig};
//! use tensor_core::tch::{Device, Kind, Tensor};
//! use tensor_core::{Context, Module, ModuleExt};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 8 experts of width 256, top-2, capacity factor 1.25 (no host sync).
//! let mut router = RouterConfig::new(8, 2);
//! router.capacity_factor = 1.25;
//! let moe = MoeLayer::new(MoeConfig::new(64, 256, router), Device::Cpu)?;
//! let x = Tensor::randn([4, 32, 64], (Kind::Float, Device::Cpu));
//! let mut ctx = Context::train();
//! let y = moe.forward(&x, &mut ctx)?; // [4, 32, 64]
//! let loss = y.square().mean(Kind::Float) + ctx.aux_loss_total(Device::Cpu)?;
//! loss.backward();
//! // In a model: model.replace("h.3.mlp.(ffn)", Box::new(moe))?;
//! # Ok(()) }
//! ```

pub mod block;
pub mod capacity;
pub mod config;
pub mod error;
pub mod extend;
pub mod losses;
pub mod moa;
pub mod moe;
pub mod router;
pub mod stick_breaking;
pub mod takeover;

pub use block::{ModuleFormerConfig, moduleformer_block};
pub use config::{
    BalanceVariant, CapacityRule, CvVariance, DropPolicy, GateType, LoadEstimator, Noise,
    RouterConfig, RoutingMode, ScoreFn, WeightMode,
};
pub use error::{Error, Result};
pub use extend::{
    attention_expert_usage, expert_usage, expert_usage_masked, grow_attention_experts,
    grow_experts, prune_attention_experts, prune_experts, unmask_attention_experts, unmask_experts,
};
pub use losses::{MiAccumulator, add_aux_losses, add_aux_losses_masked, flush_mi_losses};
pub use moa::{KvCache, MixtureOfAttention, MoaConfig};
pub use moe::{DroplessKernel, ExpertActivation, ExpertWeights, MoeConfig, MoeLayer, MoePath};
pub use router::{RouteIds, Router, Routing, token_mask};
pub use stick_breaking::{
    SbOutput, SbRemainder, SbVariant, stick_breaking_attention, stick_breaking_naive,
    stick_breaking_weights,
};
pub use takeover::{SharedExpertMoe, moe_layer_from, take_over_sparse_blocks};
