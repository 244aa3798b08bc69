//! The ModuleFormer block (docs/moe-router.md, Method, part 2 step 1; Shen et al., arXiv
//! 2306.04640 eqs. 1–2): pre-LN residual sub-layers, attention experts then
//! FFN experts, no positional embedding (stick-breaking attention orders tokens):
//!
//! `h ← h + MoA(LN₁(h))`, `h ← h + MoE_FFN(LN₂(h))`.
//!
//! The slots are named as GPT-2's blocks name them (`ln_1`, `attn`, `ln_2`,
//! `mlp`), so the same paths address the two; conversely a GPT-style decoder
//! built from `tensor-core` modules (model-zoo's `Gpt2Model`) takes the
//! experts by replacement: `model.replace("h.3.attn", Box::new(moa))` and
//! `model.replace("h.3.mlp.(ffn)", Box::new(moe))`. Dropout is 0.

use serde::{Deserialize, Serialize};
use tensor_core::layers::{BlockNames, LayerNorm, PreNormBlock};
use tensor_core::tch::Device;

use crate::error::{Error, Result};
use crate::moa::{MixtureOfAttention, MoaConfig};
use crate::moe::{MoeConfig, MoeLayer};
use crate::stick_breaking::{SbRemainder, SbVariant};

/// Sizes of one ModuleFormer block (MoLM-700M-8B: `d = att_hidden = 1024`,
/// one head, 16 attention and 32 FFN experts, top-2, `d_ff = 2048`, gating 256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModuleFormerConfig {
    pub d_model: i64,
    pub att_hidden: i64,
    pub n_head: i64,
    pub att_experts: usize,
    pub att_top_k: usize,
    pub ffn_experts: usize,
    pub ffn_top_k: usize,
    /// Hidden width of each FFN expert (`ffd_hidden`).
    pub d_ff: i64,
    /// Hidden units of the MLP gates (256).
    pub gating_size: i64,
    pub variant: SbVariant,
    pub remainder: SbRemainder,
    pub layer_norm_eps: f64,
    /// Weight of the MI loss on both routers (0, the released value).
    pub mi_weight: f64,
}

impl Default for ModuleFormerConfig {
    fn default() -> Self {
        Self {
            d_model: 1024,
            att_hidden: 1024,
            n_head: 1,
            att_experts: 16,
            att_top_k: 2,
            ffn_experts: 32,
            ffn_top_k: 2,
            d_ff: 2048,
            gating_size: 256,
            variant: SbVariant::Mf,
            remainder: SbRemainder::None,
            layer_norm_eps: 1e-5,
            mi_weight: 0.0,
        }
    }
}

impl ModuleFormerConfig {
    pub fn moa(&self) -> MoaConfig {
        let mut c = MoaConfig::new(
            self.d_model,
            self.att_hidden,
            self.n_head,
            self.att_experts,
            self.att_top_k,
        );
        c.router.mlp_hidden = self.gating_size;
        c.router.mi_weight = self.mi_weight;
        c.variant = self.variant;
        c.remainder = self.remainder;
        c
    }

    pub fn moe(&self) -> MoeConfig {
        let mut c =
            MoeConfig::moduleformer(self.d_model, self.d_ff, self.ffn_experts, self.ffn_top_k);
        c.router.mlp_hidden = self.gating_size;
        c.router.mi_weight = self.mi_weight;
        c
    }
}

/// The block: `tensor-core`'s [`PreNormBlock`] with GPT-2's part names
/// (kind `ModuleFormerBlock`): `h + MoA(LN₁ h)`, then `+ MoE(LN₂ ·)`;
/// input `[B, T, d]`.
pub fn moduleformer_block(config: &ModuleFormerConfig, device: Device) -> Result<PreNormBlock> {
    if config.layer_norm_eps.is_nan() || config.layer_norm_eps <= 0.0 {
        return Err(Error::config("layer_norm_eps must be > 0"));
    }
    let d = config.d_model;
    Ok(PreNormBlock::new(
        BlockNames::gpt2_named("ModuleFormerBlock"),
        Box::new(LayerNorm::new(d, config.layer_norm_eps, true, device)?),
        Box::new(MixtureOfAttention::new(config.moa(), device)?),
        Box::new(LayerNorm::new(d, config.layer_norm_eps, true, device)?),
        Box::new(MoeLayer::new(config.moe(), device)?),
    ))
}
