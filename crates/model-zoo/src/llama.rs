//! # Llama-family decoders: Llama, Mistral, Qwen2, Qwen3
//!
//! The pre-norm decoder-only Transformer of Touvron et al. (2023), *LLaMA:
//! Open and Efficient Foundation Language Models*, with the variations its
//! descendants ship. For token ids `x_1..x_T` and positions `p_t`:
//!
//! ```text
//! h_0     = E[x_t]
//! a_l     = h_{l-1} + Attn_l(RMSNorm_1(h_{l-1}))
//! h_l     = a_l + MLP_l(RMSNorm_2(a_l))
//! RMSNorm(u) = w ⊙ u / sqrt(mean(u²) + eps)
//! MLP(u)  = W_down (silu(W_gate u) ⊙ W_up u)                      (SwiGLU)
//! Attn(u) = W_o concat_i softmax(q_i k_{g(i)}ᵀ / sqrt(d_h) + M) v_{g(i)}
//! q_i = R(p_t) W_q,i u,  k_j = R(p_t) W_k,j u,  v_j = W_v,j u      (RoPE)
//! logits  = RMSNorm_f(h_L) W_lmᵀ                                  (W_lm = E when tied)
//! ```
//!
//! - **Grouped-query attention**: `H` query heads share `H_kv` key/value
//!   heads, query head `i` reading key/value head `g(i) = i / (H / H_kv)`.
//! - **RoPE**: `R(p)` rotates the pairs `(u_j, u_{j + d_h/2})` of a head by
//!   `p·θ_j`, `θ_j = base^{-2j/d_h}`. Scaling variants change `θ_j`:
//!   `linear` divides every `θ_j` by a factor; `llama3` (Llama 3.1) divides
//!   the low-frequency band (wavelength above `L/low_freq_factor`, `L` the
//!   original context) by the factor, keeps the high-frequency band (below
//!   `L/high_freq_factor`) and interpolates smoothly in between; `yarn`
//!   (Qwen2/Qwen3 long context) ramps between interpolated and kept
//!   dimensions by their rotation count over `L` and scales cos and sin.
//! - **Family options**: q/k/v (and o) biases (Llama's `attention_bias`;
//!   always on q/k/v for Qwen2), MLP biases (`mlp_bias`), an RMSNorm on every
//!   query and key head before RoPE (Qwen3's `q_norm` / `k_norm`), an explicit
//!   `head_dim`, a tied or untied LM head, Mistral's sliding window (key `j`
//!   is visible to query `i` when `i − window < j ≤ i`).
//! - **Masks and positions**: `M` hides later keys, keys outside the window
//!   and padding keys (`ctx.attention_mask`, 1 = token) with the dtype's
//!   minimum. Positions follow the mask, `p_t = (number of tokens up to t) − 1`
//!   (1 on padding), which is what Hugging Face's `generate` uses, so left- and
//!   right-padded rows give the same logits as unpadded ones.
//! - **KV cache**: during decoding each attention appends its keys and
//!   values to a [`KvCache`] in the forward context, and `ctx.attention_mask`
//!   covers the cached and the new positions.
//!
//! Names are Hugging Face's, so every sub-module is reachable by its
//! checkpoint path: `model.embed_tokens`, `model.layers.3.self_attn.q_proj`,
//! `model.layers.3.mlp.gate_proj` (the MLP is a `tensor-core` gated
//! [`FeedForward`]), `model.layers.3.input_layernorm`, `model.norm`,
//! `lm_head`. The decoder layer is `tensor-core`'s [`PreNormBlock`].

use std::path::Path;

use serde_json::Value;
use tensor_core::layers::{
    Activation, BlockNames, Embedding, FeedForward, FfnNames, Linear, MoeNames, PreNormBlock,
    RmsNorm, SparseMoeBlock, hidden_key_bias,
};
use tensor_core::module::{Context, Module, ModuleExt, Slot};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::{Error as TensorError, Result as TensorResult, TchResultExt};

use crate::config::{Checks, JsonConfig};
use crate::loading::{self, Checkpoint, Layout};
use crate::{Error, Result};

/// The architectures this file loads (`model_type` in `config.json`).
pub const MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe"];

/// Which member of the family a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Mistral's attention with sparse MoE blocks (`block_sparse_moe`).
    Mixtral,
    /// Qwen2's attention with sparse MoE blocks and a shared expert (`mlp`).
    Qwen2Moe,
}

/// The sparse MoE blocks of a Mixtral or Qwen-MoE decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub num_experts: i64,
    /// Experts per token.
    pub top_k: i64,
    /// Renormalise the chosen experts' probabilities (Mixtral: always).
    pub norm_topk_prob: bool,
    /// Hidden width of each routed expert.
    pub expert_size: i64,
    /// Hidden width of the shared expert (Qwen-MoE).
    pub shared_expert_size: Option<i64>,
    /// Layers that keep a dense MLP (Qwen-MoE's `mlp_only_layers`).
    pub dense_layers: Vec<i64>,
    /// Every `sparse_step`-th layer is sparse (Qwen-MoE's `decoder_sparse_step`).
    pub sparse_step: i64,
}

impl MoeSpec {
    /// Is layer `layer` a sparse MoE block?
    pub fn is_sparse(&self, layer: i64) -> bool {
        !self.dense_layers.contains(&layer) && (layer + 1) % self.sparse_step.max(1) == 0
    }
}

/// How RoPE's frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `θ_j = base^{-2j/d_h}`.
    Default,
    /// Every `θ_j` divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling (module docs).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (Peng et al. 2023, arXiv 2309.00071; Qwen2/Qwen3's long-context
    /// setting): dimensions rotating fewer than `beta_slow` times over the
    /// original context are interpolated (`θ_j / factor`), those rotating more
    /// than `beta_fast` times are kept, with a linear ramp in between; cos and
    /// sin are multiplied by `attention_factor` (`0.1 ln(factor) + 1` by default).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

/// Hyper-parameters of a Llama-family decoder, from Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Biases on `q_proj`, `k_proj`, `v_proj`.
    pub qkv_bias: bool,
    /// Bias on `o_proj`.
    pub o_bias: bool,
    /// Biases on `gate_proj`, `up_proj`, `down_proj`.
    pub mlp_bias: bool,
    /// Qwen3's RMSNorm on every query and key head.
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Mistral's attention window, in tokens.
    pub sliding_window: Option<i64>,
    pub hidden_act: Activation,
    pub bos_token_id: Option<i64>,
    /// Stop tokens (`eos_token_id`, a number or a list).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The sparse MoE blocks, for Mixtral and Qwen-MoE.
    pub moe: Option<MoeSpec>,
}

impl LlamaConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&JsonConfig::read(path)?)
    }

    /// Read Hugging Face's keys; RoPE from `rope_parameters` (transformers
    /// 5) or from `rope_theta` + `rope_scaling` (earlier files).
    pub fn from_json(j: &JsonConfig) -> Result<Self> {
        let family = match j.expect_model_type(MODEL_TYPES)?.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            _ => Family::Qwen3,
        };
        let hidden_size = j.positive("hidden_size")?;
        let heads = j.positive("num_attention_heads")?;
        let kv_heads = j.i64_or("num_key_value_heads", heads)?;
        let head_dim = match j.opt_i64("head_dim")? {
            Some(h) => h,
            None => hidden_size / heads.max(1),
        };
        let (rope_theta, rope_scaling) = rope(j)?;
        let attention_bias = j.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Qwen2Moe => (j.bool_or("qkv_bias", true)?, false),
            Family::Llama => (attention_bias, attention_bias),
            Family::Mistral | Family::Mixtral => (false, false),
            Family::Qwen3 => (attention_bias, attention_bias),
        };
        let moe = match family {
            Family::Mixtral => Some(MoeSpec {
                num_experts: j.positive("num_local_experts")?,
                top_k: j.positive("num_experts_per_tok")?,
                norm_topk_prob: true,
                expert_size: j.positive("intermediate_size")?,
                shared_expert_size: None,
                dense_layers: Vec::new(),
                sparse_step: 1,
            }),
            Family::Qwen2Moe => Some(MoeSpec {
                num_experts: j.positive("num_experts")?,
                top_k: j.positive("num_experts_per_tok")?,
                norm_topk_prob: j.bool_or("norm_topk_prob", false)?,
                expert_size: j.positive("moe_intermediate_size")?,
                shared_expert_size: match j.opt_i64("shared_expert_intermediate_size")? {
                    Some(0) | None => None,
                    Some(n) => Some(n),
                },
                dense_layers: match j.value.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
                    Some(v) => {
                        return Err(Error::config(
                            &j.path,
                            "mlp_only_layers",
                            format!("expected a list of layer indices, got {v}"),
                        ));
                    }
                },
                sparse_step: j.i64_or("decoder_sparse_step", 1)?,
            }),
            _ => None,
        };
        if let Some(m) = &moe
            && m.top_k > m.num_experts
        {
            return Err(Error::config(
                &j.path,
                "num_experts_per_tok",
                format!(
                    "{} experts per token, but only {} experts",
                    m.top_k, m.num_experts
                ),
            ));
        }
        if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe)
            && j.bool_or("use_sliding_window", false)?
        {
            return Err(Error::config(
                &j.path,
                "use_sliding_window",
                "sliding-window layers of Qwen2/Qwen3 are not supported",
            ));
        }
        let sliding_window = match family {
            Family::Mistral | Family::Mixtral => j.opt_i64("sliding_window")?,
            _ => None,
        };
        let eos_token_ids = match j.value.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
            Some(v) => {
                return Err(Error::config(
                    &j.path,
                    "eos_token_id",
                    format!("expected an integer or a list of integers, got {v}"),
                ));
            }
        };
        let c = Self {
            family,
            vocab_size: j.positive("vocab_size")?,
            hidden_size,
            intermediate_size: j.positive("intermediate_size")?,
            num_hidden_layers: j.positive("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: j.i64_or("max_position_embeddings", 2048)?,
            rms_norm_eps: j.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias: j.bool_or("mlp_bias", false)?,
            qk_norm: family == Family::Qwen3,
            tie_word_embeddings: j.bool_or("tie_word_embeddings", false)?,
            sliding_window,
            hidden_act: j.activation("hidden_act", "silu")?,
            bos_token_id: j.opt_i64("bos_token_id")?,
            eos_token_ids,
            pad_token_id: j.opt_i64("pad_token_id")?,
            moe,
        };
        c.validate_at(&j.path)?;
        Ok(c)
    }

    fn validate_at(&self, path: &Path) -> Result<()> {
        let ch = Checks(path);
        ch.positive(&[
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        ch.divisible(
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        )?;
        if self.head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                "head_dim",
                format!(
                    "RoPE rotates pairs, so head_dim must be even, got {}",
                    self.head_dim
                ),
            ));
        }
        ch.positive_float("rms_norm_eps", self.rms_norm_eps)?;
        ch.positive_float("rope_theta", self.rope_theta)?;
        if let Some(w) = self.sliding_window
            && w <= 0
        {
            return Err(Error::config(
                path,
                "sliding_window",
                format!("must be >= 1, got {w}"),
            ));
        }
        Ok(())
    }

    /// Parameters this config implies (for messages and size checks).
    pub fn param_count(&self) -> i64 {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        let attn = d * h * hd * 2 + d * kv * hd * 2;
        let mlp = 3 * d * f;
        let per_layer = attn + mlp + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * per_layer + d + head
    }
}

/// RoPE's base and scaling from a config.
fn rope(j: &JsonConfig) -> Result<(f64, RopeScaling)> {
    let (params, key) = match j.value.get("rope_parameters") {
        Some(Value::Object(m)) => (Some(m.clone()), "rope_parameters"),
        _ => match j.value.get("rope_scaling") {
            Some(Value::Object(m)) => (Some(m.clone()), "rope_scaling"),
            _ => (None, "rope_scaling"),
        },
    };
    let theta_default = j.f64_or("rope_theta", 10000.0)?;
    let Some(p) = params else {
        return Ok((theta_default, RopeScaling::Default));
    };
    let num = |k: &str| -> Result<f64> {
        p.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::config(&j.path, format!("{key}.{k}"), "missing number"))
    };
    let theta = p
        .get("rope_theta")
        .and_then(Value::as_f64)
        .unwrap_or(theta_default);
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        "yarn" => {
            let orig = num("original_max_position_embeddings")?;
            let factor = match p.get("factor").and_then(Value::as_f64) {
                Some(f) => f,
                None => j.f64_or("max_position_embeddings", 2048.0)? / orig,
            };
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let opt = |k: &str| p.get(k).and_then(Value::as_f64);
            let attention_factor = match (
                opt("attention_factor"),
                opt("mscale"),
                opt("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                    mscale(factor, m) / mscale(factor, ma)
                }
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast: opt("beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: opt("beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                attention_factor,
                truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }
        }
        other => {
            return Err(Error::config(
                &j.path,
                format!("{key}.rope_type"),
                format!(
                    "RoPE scaling '{other}' is not supported (default, linear, llama3 and yarn are)"
                ),
            ));
        }
    };
    if let Some(f) = p.get("partial_rotary_factor").and_then(Value::as_f64)
        && f != 1.0
    {
        return Err(Error::config(
            &j.path,
            format!("{key}.partial_rotary_factor"),
            format!("partial rotary embeddings ({f}) are not supported"),
        ));
    }
    Ok((theta, scaling))
}

/// `θ_j` for a head of width `head_dim`, computed in f32 as the reference does.
fn inv_freq(config: &LlamaConfig, device: Device) -> TensorResult<Tensor> {
    let op = "RoPE frequencies";
    let d = config.head_dim;
    let expo = Tensor::f_arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
        .and_then(|t| t.f_to_kind(Kind::Float))
        .and_then(|t| t.f_div_scalar(d as f64))
        .op(op)?;
    let base = Tensor::f_full([1], config.rope_theta, (Kind::Float, Device::Cpu)).op(op)?;
    let inv = base.f_pow(&expo).and_then(|p| p.f_reciprocal()).op(op)?;
    let inv = match &config.rope_scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv.f_div_scalar(*factor).op(op)?,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = inv
                .f_reciprocal()
                .and_then(|r| r.f_mul_scalar(2.0 * std::f64::consts::PI))
                .op(op)?;
            let scaled = inv.f_div_scalar(*factor).op(op)?;
            let low = wavelen.f_gt(low_wavelen).op(op)?;
            let inv_l = scaled.f_where_self(&low, &inv).op(op)?;
            let smooth = wavelen
                .f_reciprocal()
                .and_then(|r| r.f_mul_scalar(*old))
                .and_then(|r| r.f_sub_scalar(*low_freq_factor))
                .and_then(|r| r.f_div_scalar(high_freq_factor - low_freq_factor))
                .op(op)?;
            let smoothed = smooth
                .f_neg()
                .and_then(|s| s.f_add_scalar(1.0))
                .and_then(|s| s.f_mul(&inv_l.f_div_scalar(*factor)?))
                .and_then(|a| a.f_add(&smooth.f_mul(&inv_l)?))
                .op(op)?;
            let medium = wavelen
                .f_lt(high_wavelen)
                .and_then(|a| a.f_logical_not())
                .and_then(|a| a.f_logical_and(&wavelen.f_gt(low_wavelen)?.f_logical_not()?))
                .op(op)?;
            smoothed.f_where_self(&medium, &inv_l).op(op)?
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            let base = config.rope_theta;
            let dim = d as f64;
            // The dimension that completes `rot` rotations over the original context.
            let corr = |rot: f64| {
                dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
            };
            let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let ramp = Tensor::f_arange(d / 2, (Kind::Float, Device::Cpu))
                .and_then(|a| a.f_sub_scalar(low))
                .and_then(|a| a.f_div_scalar(high - low))
                .and_then(|a| a.f_clamp(0.0, 1.0))
                .op(op)?;
            let keep = ramp.f_neg().and_then(|r| r.f_add_scalar(1.0)).op(op)?;
            let interp = inv.f_div_scalar(*factor).op(op)?;
            interp
                .f_mul(&keep.f_neg().and_then(|k| k.f_add_scalar(1.0))?)
                .and_then(|a| a.f_add(&inv.f_mul(&keep)?))
                .op(op)?
        }
    };
    inv.f_to_device(device).op(op)
}

/// The factor RoPE's cos and sin are multiplied by (YaRN's attention factor; else 1).
fn rope_attention_scaling(config: &LlamaConfig) -> f64 {
    match config.rope_scaling {
        RopeScaling::Yarn {
            attention_factor, ..
        } => attention_factor,
        _ => 1.0,
    }
}

/// RoPE's frequencies `θ_j` (f32, `[head_dim / 2]`) and the factor on cos and sin.
#[derive(Debug)]
pub struct Rope {
    pub inv_freq: Tensor,
    pub scaling: f64,
}

impl Rope {
    pub fn new(config: &LlamaConfig, device: Device) -> TensorResult<Self> {
        Ok(Self {
            inv_freq: inv_freq(config, device)?,
            scaling: rope_attention_scaling(config),
        })
    }
}

/// `[cos, sin]` of shape `[B, T, head_dim]` for positions `[B, T]`.
fn rope_tables(
    inv_freq: &Tensor,
    scaling: f64,
    positions: &Tensor,
    kind: Kind,
) -> TensorResult<(Tensor, Tensor)> {
    let op = "RoPE tables";
    let freqs = positions
        .f_to_kind(Kind::Float)
        .and_then(|p| p.f_unsqueeze(-1))
        .and_then(|p| p.f_mul(&inv_freq.f_view([1, 1, -1])?))
        .op(op)?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1).op(op)?;
    let (mut cos, mut sin) = (emb.f_cos().op(op)?, emb.f_sin().op(op)?);
    if scaling != 1.0 {
        cos = cos.f_mul_scalar(scaling).op(op)?;
        sin = sin.f_mul_scalar(scaling).op(op)?;
    }
    let cos = cos.f_to_kind(kind).op(op)?;
    let sin = sin.f_to_kind(kind).op(op)?;
    Ok((cos, sin))
}

/// `x·cos + rotate_half(x)·sin` for `x: [B, H, T, d_h]`, tables `[B, T, d_h]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> TensorResult<Tensor> {
    let op = "RoPE";
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, half).op(op)?;
    let x2 = x.f_narrow(3, half, half).op(op)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg().op(op)?, &x1], 3).op(op)?;
    let (c, s) = (cos.f_unsqueeze(1).op(op)?, sin.f_unsqueeze(1).op(op)?);
    x.f_mul(&c)
        .and_then(|a| a.f_add(&rotated.f_mul(&s)?))
        .op(op)
}

/// What every attention of one forward pass shares: the RoPE tables of the
/// new positions and the attention bias `[B, 1, T, S]` over all `S` cached
/// and new keys. The model puts it into the context for its layers. When
/// nothing is padded and no window cuts in, there is no bias: the attention
/// is plainly causal (`causal`, a prompt) or sees every key (one new token
/// after the cache), which lets libtorch pick its fused kernels.
#[derive(Debug)]
pub struct DecoderStep {
    pub cos: Tensor,
    pub sin: Tensor,
    pub bias: Option<Tensor>,
    pub causal: bool,
}

/// Keys and values of the positions seen so far, per layer, `[B, H_kv, S, d_h]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
        }
    }

    /// Cached positions (0 when empty).
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append this step's keys and values of layer `layer`; returns all of them.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> TensorResult<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| TensorError::invalid(format!("KvCache has no layer {layer}")))?;
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (
                Tensor::f_cat(&[&pk, &k], 2).op("KvCache")?,
                Tensor::f_cat(&[&pv, &v], 2).op("KvCache")?,
            ),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}

/// Causal self-attention with grouped key/value heads, RoPE, optional
/// per-head q/k RMSNorm, and the KV cache.
#[derive(Debug, Module)]
#[module(kind = "LlamaAttention", forward = forward_impl)]
pub struct LlamaAttention {
    #[child]
    pub q_proj: Slot,
    #[child]
    pub k_proj: Slot,
    #[child]
    pub v_proj: Slot,
    #[child]
    pub o_proj: Slot,
    #[child]
    pub q_norm: Option<Slot>,
    #[child]
    pub k_norm: Option<Slot>,
    pub layer: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
}

impl LlamaAttention {
    pub fn new(config: &LlamaConfig, layer: usize, device: Device) -> Result<Self> {
        let c = config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let lin = |i, o, b| -> Result<Slot> { Ok(Box::new(Linear::new(i, o, b, device)?)) };
        let norm = || -> Result<Option<Slot>> {
            Ok(if c.qk_norm {
                Some(Box::new(RmsNorm::new(hd, c.rms_norm_eps, device)?))
            } else {
                None
            })
        };
        Ok(Self {
            q_proj: lin(d, c.num_attention_heads * hd, c.qkv_bias)?,
            k_proj: lin(d, c.num_key_value_heads * hd, c.qkv_bias)?,
            v_proj: lin(d, c.num_key_value_heads * hd, c.qkv_bias)?,
            o_proj: lin(c.num_attention_heads * hd, d, c.o_bias)?,
            q_norm: norm()?,
            k_norm: norm()?,
            layer,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `[B, T, n·d_h]` → `[B, T, n, d_h]`, the head norm, → `[B, n, T, d_h]`.
    fn heads(
        &self,
        x: &Tensor,
        n: i64,
        norm: Option<(&str, &Slot)>,
        ctx: &mut Context,
    ) -> TensorResult<Tensor> {
        let s = x.size();
        let x = x
            .f_view([s[0], s[1], n, self.head_dim])
            .op("LlamaAttention heads")?;
        let x = match norm {
            Some((name, m)) => ctx.call(name, m.as_ref(), &x)?,
            None => x,
        };
        x.f_transpose(1, 2).op("LlamaAttention heads")
    }

    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let s = xs.size();
        if s.len() != 3 {
            return Err(TensorError::shape(
                "LlamaAttention",
                "[batch, seq, hidden]",
                s,
            ));
        }
        let (b, t) = (s[0], s[1]);
        let (cos, sin, bias, causal) = match ctx.get::<DecoderStep>() {
            Some(st) => (
                st.cos.shallow_clone(),
                st.sin.shallow_clone(),
                st.bias.as_ref().map(Tensor::shallow_clone),
                st.causal,
            ),
            None => {
                return Err(TensorError::invalid(
                    "LlamaAttention needs the step's RoPE tables and mask: run it inside a LlamaModel, \
                     or after a LlamaEmbedStage in the same context",
                ));
            }
        };
        let q = ctx.call("q_proj", self.q_proj.as_ref(), xs)?;
        let k = ctx.call("k_proj", self.k_proj.as_ref(), xs)?;
        let v = ctx.call("v_proj", self.v_proj.as_ref(), xs)?;
        let q = self.heads(
            &q,
            self.num_heads,
            self.q_norm.as_ref().map(|m| ("q_norm", m)),
            ctx,
        )?;
        let k = self.heads(
            &k,
            self.num_kv_heads,
            self.k_norm.as_ref().map(|m| ("k_norm", m)),
            ctx,
        )?;
        let v = self.heads(&v, self.num_kv_heads, None, ctx)?;
        let q = apply_rope(&q, &cos, &sin)?;
        let k = apply_rope(&k, &cos, &sin)?;
        let (k, v) = match ctx.get_mut::<KvCache>() {
            Some(cache) => cache.append(self.layer, k, v)?,
            None => (k, v),
        };
        // Grouped-query attention: libtorch reads key/value head g(i) for query head i.
        let gqa = self.num_heads != self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let bias = bias
            .map(|b| b.f_to_kind(q.kind()))
            .transpose()
            .op("LlamaAttention mask")?;
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            bias.as_ref(),
            0.0,
            causal,
            scale,
            gqa,
        )
        .op("LlamaAttention scaled_dot_product_attention")?;
        let merged = out
            .f_transpose(1, 2)
            .and_then(|o| o.f_reshape([b, t, self.num_heads * self.head_dim]))
            .op("LlamaAttention merge heads")?;
        ctx.call("o_proj", self.o_proj.as_ref(), &merged)
    }
}

/// A decoder layer's part names (`model.layers.N.*`).
pub const LAYER_NAMES: BlockNames = BlockNames {
    kind: "LlamaDecoderLayer",
    norm_1: "input_layernorm",
    attn: "self_attn",
    norm_2: "post_attention_layernorm",
    mlp: "mlp",
};

/// Mixtral's layer names: the MoE block is `block_sparse_moe`.
pub const MIXTRAL_LAYER_NAMES: BlockNames = BlockNames {
    kind: "MixtralDecoderLayer",
    mlp: "block_sparse_moe",
    ..LAYER_NAMES
};

/// A SwiGLU [`FeedForward`] `d -> f -> d` (`gate_proj`, `up_proj`, `down_proj`).
fn swiglu(d: i64, f: i64, bias: bool, act: Activation, device: Device) -> Result<FeedForward> {
    let lin = |i, o| -> Result<Slot> { Ok(Box::new(Linear::new(i, o, bias, device)?)) };
    Ok(FeedForward {
        up: lin(d, f)?,
        gate: Some(lin(d, f)?),
        down: lin(f, d)?,
        activation: act,
        names: FfnNames::llama(),
        dropout: 0.0,
    })
}

/// The sparse MoE block of a Mixtral or Qwen-MoE layer, PyTorch's `Linear`
/// initialisation per expert.
fn moe_block(c: &LlamaConfig, m: &MoeSpec, device: Device) -> Result<SparseMoeBlock> {
    let (d, e, f) = (c.hidden_size, m.num_experts, m.expert_size);
    let uniform = |shape: &[i64], fan_in: i64| -> Result<Tensor> {
        let b = 1.0 / (fan_in as f64).sqrt();
        Ok(Tensor::f_empty(shape, (Kind::Float, device))
            .and_then(|mut t| t.f_uniform_(-b, b))
            .map(|t| t.detach().set_requires_grad(true))
            .op("moe_block")?)
    };
    let names = if c.family == Family::Mixtral {
        MoeNames::mixtral()
    } else {
        MoeNames::qwen_moe()
    };
    let shared: Option<Slot> = match m.shared_expert_size {
        Some(s) => Some(Box::new(swiglu(d, s, false, c.hidden_act, device)?)),
        None => None,
    };
    let shared_gate: Option<Slot> = match m.shared_expert_size {
        Some(_) => Some(Box::new(Linear::new(d, 1, false, device)?)),
        None => None,
    };
    Ok(SparseMoeBlock {
        names,
        gate: Box::new(Linear::new(d, e, false, device)?),
        w1: uniform(&[e, f, d], d)?,
        w3: uniform(&[e, f, d], d)?,
        w2: uniform(&[e, d, f], f)?,
        shared,
        shared_gate,
        top_k: m.top_k,
        norm_topk_prob: m.norm_topk_prob,
        activation: c.hidden_act,
    })
}

/// One decoder layer: `tensor-core`'s pre-norm block with RMSNorms, the
/// attention above and a SwiGLU [`FeedForward`] (`gate_proj`, `up_proj`,
/// `down_proj`), or a sparse MoE block on the MoE families' sparse layers.
pub fn llama_layer(config: &LlamaConfig, layer: usize, device: Device) -> Result<PreNormBlock> {
    let c = config;
    let d = c.hidden_size;
    let mlp: Slot = match &c.moe {
        Some(m) if m.is_sparse(layer as i64) => Box::new(moe_block(c, m, device)?),
        _ => Box::new(swiglu(
            d,
            c.intermediate_size,
            c.mlp_bias,
            c.hidden_act,
            device,
        )?),
    };
    let names = if c.family == Family::Mixtral {
        MIXTRAL_LAYER_NAMES
    } else {
        LAYER_NAMES
    };
    Ok(PreNormBlock::new(
        names,
        Box::new(RmsNorm::new(d, c.rms_norm_eps, device)?),
        Box::new(LlamaAttention::new(c, layer, device)?),
        Box::new(RmsNorm::new(d, c.rms_norm_eps, device)?),
        mlp,
    ))
}

/// The decoder stack (`model.*`): embeddings, layers, the final RMSNorm.
/// Its forward maps token ids `[B, T]` to hidden states `[B, T, d]`.
#[derive(Debug, Module)]
#[module(kind = "LlamaModel", forward = forward_impl)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    #[child]
    pub embed_tokens: Slot,
    #[children(names = "layer_names")]
    pub layers: Vec<Slot>,
    layer_names: Vec<String>,
    #[child]
    pub norm: Slot,
    rope: Rope,
}

impl LlamaModel {
    pub fn new(config: LlamaConfig, device: Device) -> Result<Self> {
        let c = &config;
        let embed = Embedding::from_weight(
            Tensor::f_zeros([c.vocab_size, c.hidden_size], (Kind::Float, device))
                .op("LlamaModel::new")?,
        )?;
        let n = c.num_hidden_layers as usize;
        let layers = (0..n)
            .map(|i| Ok(Box::new(llama_layer(c, i, device)?) as Slot))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Box::new(embed),
            layers,
            layer_names: (0..n).map(|i| format!("layers.{i}")).collect(),
            norm: Box::new(RmsNorm::new(c.hidden_size, c.rms_norm_eps, device)?),
            rope: Rope::new(c, device)?,
            config,
        })
    }

    /// Positions `[B, T]` of the `T` new tokens: from the mask over all `S`
    /// positions (`cumsum − 1`, 1 on padding), else `past..past + T`.
    fn positions(
        mask: Option<&Tensor>,
        b: i64,
        t: i64,
        past: i64,
        device: Device,
    ) -> TensorResult<Tensor> {
        let op = "LlamaModel positions";
        match mask {
            Some(m) => {
                let m = m
                    .f_to_device(device)
                    .and_then(|m| m.f_to_kind(Kind::Int64))
                    .op(op)?;
                let p = m
                    .f_cumsum(1, Kind::Int64)
                    .and_then(|c| c.f_sub_scalar(1))
                    .and_then(|c| c.f_masked_fill(&m.f_eq(0)?, 1))
                    .op(op)?;
                let s = p.size()[1];
                p.f_narrow(1, s - t, t).op(op)
            }
            None => Tensor::f_arange_start(past, past + t, (Kind::Int64, device))
                .and_then(|a| a.f_unsqueeze(0))
                .and_then(|a| a.f_expand([b, t], false))
                .op(op),
        }
    }

    /// The additive bias `[B, 1, T, S]`: 0 where query `past + i` may see key
    /// `j` (causal, inside the window, not padding), the dtype's minimum elsewhere.
    fn bias(
        window: Option<i64>,
        mask: Option<&Tensor>,
        b: i64,
        t: i64,
        past: i64,
        kind: Kind,
        device: Device,
    ) -> TensorResult<Tensor> {
        let op = "LlamaModel mask";
        let s = past + t;
        let q = Tensor::f_arange_start(past, s, (Kind::Int64, device))
            .and_then(|a| a.f_view([t, 1]))
            .op(op)?;
        let k = Tensor::f_arange(s, (Kind::Int64, device))
            .and_then(|a| a.f_view([1, s]))
            .op(op)?;
        let mut allowed = k.f_le_tensor(&q).op(op)?;
        if let Some(w) = window {
            let inside = k.f_gt_tensor(&q.f_sub_scalar(w).op(op)?).op(op)?;
            allowed = allowed.f_logical_and(&inside).op(op)?;
        }
        let mut allowed = allowed.f_view([1, 1, t, s]).op(op)?;
        if let Some(m) = mask {
            let keep = m
                .f_to_device(device)
                .and_then(|m| m.f_ne(0))
                .and_then(|m| m.f_view([b, 1, 1, s]))
                .op(op)?;
            allowed = allowed.f_logical_and(&keep).op(op)?;
        }
        Tensor::f_zeros([1], (kind, device))
            .and_then(|z| z.f_masked_fill(&allowed.f_logical_not()?, hidden_key_bias(kind)))
            .op(op)
    }

    /// The step's RoPE tables and attention bias for token ids of size
    /// `ids [B, T]` embedded as `h`, the cache length and mask read from `ctx`.
    fn step(
        rope: &Rope,
        window: Option<i64>,
        ids: &[i64],
        h: &Tensor,
        ctx: &Context,
    ) -> TensorResult<DecoderStep> {
        let (b, t) = (ids[0], ids[1]);
        let past = ctx.get::<KvCache>().map_or(0, KvCache::len);
        let mask = ctx.attention_mask.as_ref().map(Tensor::shallow_clone);
        if let Some(m) = &mask
            && m.size() != [b, past + t]
        {
            return Err(TensorError::shape(
                "LlamaModel attention_mask (cached and new positions)",
                format!("[{b}, {}]", past + t),
                m.size(),
            ));
        }
        let device = h.device();
        let pos = Self::positions(mask.as_ref(), b, t, past, device)?;
        let (cos, sin) = rope_tables(&rope.inv_freq, rope.scaling, &pos, h.kind())?;
        // One host read per forward: is anything padded?
        let padded = match &mask {
            Some(m) => {
                m.f_eq(0)
                    .and_then(|z| z.f_any())
                    .and_then(|a| a.f_int64_value(&[]))
                    .op("LlamaModel mask")?
                    != 0
            }
            None => false,
        };
        let windowed = window.is_some_and(|w| w < past + t);
        if !padded && !windowed && (past == 0 || t == 1) {
            return Ok(DecoderStep {
                cos,
                sin,
                bias: None,
                causal: past == 0 && t > 1,
            });
        }
        let bias = Self::bias(window, mask.as_ref(), b, t, past, h.kind(), device)?;
        Ok(DecoderStep {
            cos,
            sin,
            bias: Some(bias),
            causal: false,
        })
    }

    fn forward_impl(&self, input_ids: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let s = input_ids.size();
        if s.len() != 2 {
            return Err(TensorError::shape(
                "LlamaModel input_ids",
                "[batch, seq]",
                s,
            ));
        }
        let h = ctx.call("embed_tokens", self.embed_tokens.as_ref(), input_ids)?;
        let step = Self::step(&self.rope, self.config.sliding_window, &s, &h, ctx)?;
        let before = ctx.insert(step);
        let mut out = Ok(h);
        for (name, layer) in self.layer_names.iter().zip(&self.layers) {
            out = out.and_then(|h| ctx.call(name, layer.as_ref(), &h));
        }
        match before {
            Some(st) => {
                ctx.insert(st);
            }
            None => {
                ctx.remove::<DecoderStep>();
            }
        }
        ctx.call("norm", self.norm.as_ref(), &out?)
    }
}

/// A decoder with its language-model head (`LlamaForCausalLM` and the
/// Mistral/Qwen equivalents). Its forward maps token ids `[B, T]` to logits
/// `[B, T, vocab]`; the head is the input embedding when tied.
#[derive(Debug, Module)]
#[module(kind = "LlamaForCausalLM", forward = forward_impl)]
pub struct LlamaForCausalLM {
    /// What the model was built from (the `model` slot may later hold a wrapper).
    pub config: LlamaConfig,
    #[child]
    pub model: Slot,
    #[child]
    pub lm_head: Option<Slot>,
}

impl LlamaForCausalLM {
    pub fn new(config: LlamaConfig, device: Device) -> Result<Self> {
        let lm_head: Option<Slot> = if config.tie_word_embeddings {
            None
        } else {
            Some(Box::new(Linear::new(
                config.hidden_size,
                config.vocab_size,
                false,
                device,
            )?))
        };
        Ok(Self {
            model: Box::new(LlamaModel::new(config.clone(), device)?),
            config,
            lm_head,
        })
    }

    /// Load a Hugging Face folder: `config.json` and `model.safetensors`, or
    /// the shards `model.safetensors.index.json` lists. f16/bf16 weights are
    /// kept in their dtype on a GPU and upcast to f32 on the CPU.
    pub fn from_folder(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        loading::expect_folder(dir, "Llama-family")?;
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let files = loading::open_folder_weights(dir, "Llama-family")?;
        // The initial values are overwritten: draw them under the seed lock,
        // so they never land inside another thread's seeded draws.
        let mut model = tensor_core::seed::with_seed_lock(|| Self::new(config, device))?;
        model.load_shards(&files)?;
        if device.is_cuda()
            && let Some(kind) = checkpoint_half_kind(&files)?
        {
            model.to_kind(kind)?;
        }
        Ok(model)
    }

    /// The decoder stack, unless its slot was replaced by another module.
    pub fn decoder(&self) -> Option<&LlamaModel> {
        tensor_core::module::downcast_ref::<LlamaModel>(self.model.as_ref())
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Copy a checkpoint's tensors in: every parameter once with the shape
    /// the config implies; `lm_head.weight` is ignored when tied, and the
    /// `rotary_emb.inv_freq` buffers of older files always.
    pub fn load_safetensors(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let file = loading::open_weights(path.as_ref(), "Llama-family")?;
        self.load_shards(std::slice::from_ref(&file))
    }

    /// [`LlamaForCausalLM::load_safetensors`] over the shards of one checkpoint.
    pub fn load_shards(&mut self, files: &[tensor_core::io::SafetensorsFile]) -> Result<()> {
        let c = self.config();
        let tied = c.tie_word_embeddings;
        let about = Checkpoint {
            model: "Llama-family decoder",
            config: format!(
                "{:?}, {} layers, hidden {}, {} heads / {} kv heads of {}, vocab {}",
                c.family,
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.vocab_size
            ),
            prefix: "",
        };
        loading::load_checkpoint_stacked(
            self,
            files,
            &about,
            |key| {
                if key.ends_with("rotary_emb.inv_freq") || (tied && key == "lm_head.weight") {
                    None
                } else {
                    Some(key.to_owned())
                }
            },
            |_| Layout::AsIs,
            expert_row,
        )
    }

    fn forward_impl(&self, input_ids: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let h = ctx.call("model", self.model.as_ref(), input_ids)?;
        match &self.lm_head {
            Some(head) => ctx.call("lm_head", head.as_ref(), &h),
            None => {
                let w = self
                    .model
                    .get("embed_tokens")?
                    .params()
                    .first()
                    .map(|(_, w)| w.shallow_clone())
                    .ok_or_else(|| TensorError::invalid("embed_tokens has no weight"))?;
                h.f_matmul(&w.f_transpose(0, 1).op("tied lm_head")?)
                    .op("tied lm_head")
            }
        }
    }

    /// The mean next-token loss of `input_ids [B, T]` under `attention_mask`
    /// ([`crate::lm::next_token_loss`]) and the number of positions it
    /// averages; `train` turns dropout on.
    pub fn lm_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let mut ctx = if train {
            Context::train()
        } else {
            Context::eval()
        };
        ctx.attention_mask = attention_mask.map(Tensor::shallow_clone);
        let logits = ctx.call("", self, input_ids)?;
        crate::lm::next_token_loss(&logits, input_ids, attention_mask)
    }

    /// Logits `[B, T, vocab]` of `input_ids [B, T]` under `attention_mask`.
    pub fn logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let mut ctx = Context::eval();
        ctx.attention_mask = attention_mask.map(Tensor::shallow_clone);
        Ok(ctx.call("", self, input_ids)?)
    }

    /// Continue every row of `input_ids [B, T]` (left-padded, with
    /// `attention_mask`) by up to `opts.max_new_tokens` tokens, through the
    /// KV cache. Returns `[B, T + n]`; a row that produced a stop token is
    /// continued with `opts.pad_token_id`, and generation ends when every
    /// row has stopped.
    pub fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        opts: &GenerateOptions,
    ) -> Result<Tensor> {
        self.generate_with(
            input_ids,
            attention_mask,
            opts,
            Context::eval(),
            &mut |_| Ok(()),
        )
    }

    /// [`LlamaForCausalLM::generate`] in a forward context the caller
    /// prepared (e.g. with a per-row adapter choice, pet-core's mixed
    /// batch), calling `on_step` with each step's new tokens `[B]` (for
    /// streaming).
    pub fn generate_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        opts: &GenerateOptions,
        mut ctx: Context,
        on_step: &mut dyn FnMut(&Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        opts.validate()?;
        let s = input_ids.size();
        if s.len() != 2 || s[1] == 0 {
            return Err(TensorError::shape("generate input_ids", "[batch, seq >= 1]", s).into());
        }
        let device = crate::loading::device_of(self);
        let b = s[0];
        let op = "generate";
        tch::no_grad(|| -> Result<Tensor> {
            let ids = input_ids.f_to_device(device).op(op)?;
            let mut mask = match attention_mask {
                Some(m) => m.f_to_device(device).op(op)?,
                None => Tensor::f_ones([b, s[1]], (Kind::Int64, device)).op(op)?,
            };
            if mask.size() != s {
                return Err(TensorError::shape(
                    "generate attention_mask",
                    format!("{s:?}"),
                    mask.size(),
                )
                .into());
            }
            ctx.train = false;
            ctx.insert(KvCache::new(self.config().num_hidden_layers as usize));
            ctx.attention_mask = Some(mask.shallow_clone());
            let mut logits = ctx.call("", self, &ids)?;
            let mut out = ids;
            let stops = Tensor::from_slice(&opts.stop_tokens)
                .f_to_device(device)
                .op(op)?;
            let mut running = Tensor::f_ones([b], (Kind::Bool, device)).op(op)?;
            let pad = Tensor::f_full([b], opts.pad_token_id, (Kind::Int64, device)).op(op)?;
            for step in 0..opts.max_new_tokens {
                let last = logits.f_select(1, -1).op(op)?;
                let next = opts.sampling.choose(&last, step as u64)?;
                let next = next.f_where_self(&running, &pad).op(op)?;
                out = Tensor::f_cat(&[&out, &next.f_unsqueeze(1).op(op)?], 1).op(op)?;
                on_step(&next)?;
                if !opts.stop_tokens.is_empty() {
                    let stopped = Tensor::f_isin(&next, &stops, false, false).op(op)?;
                    running = running
                        .f_logical_and(&stopped.f_logical_not().op(op)?)
                        .op(op)?;
                    let any = running.f_any().and_then(|a| a.f_int64_value(&[])).op(op)?;
                    if any == 0 {
                        break;
                    }
                }
                if step + 1 == opts.max_new_tokens {
                    break;
                }
                let one = Tensor::f_ones([b, 1], (mask.kind(), device)).op(op)?;
                mask = Tensor::f_cat(&[&mask, &one], 1).op(op)?;
                ctx.attention_mask = Some(mask.shallow_clone());
                logits = ctx.call("", self, &next.f_unsqueeze(1).op(op)?)?;
            }
            Ok(out)
        })
    }
}

/// A per-expert checkpoint key as a row of a stacked parameter:
/// `….experts.{i}.{w}.weight` → (`….experts.{w}`, `i`) (Mixtral's `w1`/`w2`/`w3`,
/// Qwen-MoE's `gate_proj`/`up_proj`/`down_proj`).
fn expert_row(key: &str) -> Option<(String, i64)> {
    let (head, rest) = key.rsplit_once(".experts.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: i64 = i.parse().ok()?;
    let w = tail.strip_suffix(".weight")?;
    (!w.contains('.')).then(|| (format!("{head}.experts.{w}"), i))
}

/// The half-precision dtype the checkpoint's floating weights are stored
/// in, when they all are (f16 or bf16).
fn checkpoint_half_kind(files: &[tensor_core::io::SafetensorsFile]) -> Result<Option<Kind>> {
    let mut kinds = Vec::new();
    for f in files {
        for n in f.names() {
            let (k, _) = f.info(&n)?;
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
    }
    Ok(match kinds.as_slice() {
        [Kind::Half] => Some(Kind::Half),
        [Kind::BFloat16] => Some(Kind::BFloat16),
        _ => None,
    })
}

/// The embedding stage of a decoder taken apart into stages
/// ([`LlamaForCausalLM::into_stages`], for m2mKD's module split): embeds the
/// token ids and leaves the step's RoPE tables and attention bias in the
/// context, for the decoder layers that follow in this or a later module.
#[derive(Debug, Module)]
#[module(kind = "LlamaEmbedStage", forward = forward_impl)]
pub struct LlamaEmbedStage {
    #[child]
    pub embed_tokens: Slot,
    rope: Rope,
    sliding_window: Option<i64>,
}

impl LlamaEmbedStage {
    fn forward_impl(&self, input_ids: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let s = input_ids.size();
        if s.len() != 2 {
            return Err(TensorError::shape(
                "LlamaEmbedStage input_ids",
                "[batch, seq]",
                s,
            ));
        }
        let h = ctx.call("embed_tokens", self.embed_tokens.as_ref(), input_ids)?;
        let step = LlamaModel::step(&self.rope, self.sliding_window, &s, &h, ctx)?;
        ctx.insert(step);
        Ok(h)
    }
}

/// The head stage of a decoder taken apart into stages: the final RMSNorm
/// and the LM head (the input embedding when tied).
#[derive(Debug, Module)]
#[module(kind = "LlamaHeadStage", forward = forward_impl)]
pub struct LlamaHeadStage {
    #[child]
    pub norm: Slot,
    #[child]
    pub lm_head: Option<Slot>,
    /// The input embedding `[vocab, d]` when the head is tied to it.
    tied: Option<Tensor>,
}

impl LlamaHeadStage {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let h = ctx.call("norm", self.norm.as_ref(), xs)?;
        match (&self.lm_head, &self.tied) {
            (Some(head), _) => ctx.call("lm_head", head.as_ref(), &h),
            (None, Some(w)) => h
                .f_matmul(&w.f_transpose(0, 1).op("tied lm_head")?)
                .op("tied lm_head"),
            (None, None) => Err(TensorError::invalid("LlamaHeadStage has no LM head")),
        }
    }
}

impl LlamaForCausalLM {
    /// Take the decoder apart as `(embedding stage, decoder layers, head
    /// stage, hidden width)`: running them in order in one context computes
    /// the model's logits. m2mKD splits a teacher given this way into modules.
    pub fn into_stages(self) -> Result<(Slot, Vec<Slot>, Slot, i64)> {
        let Self { model, lm_head, .. } = self;
        let m = tensor_core::module::downcast_box::<LlamaModel>(model).map_err(|_| {
            Error::invalid("into_stages: the model slot no longer holds a LlamaModel")
        })?;
        let LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            rope,
            ..
        } = *m;
        let tied = if lm_head.is_none() {
            let w = embed_tokens
                .params()
                .first()
                .map(|(_, w)| w.shallow_clone())
                .ok_or_else(|| Error::invalid("into_stages: embed_tokens has no weight"))?;
            Some(w)
        } else {
            None
        };
        let embed = LlamaEmbedStage {
            embed_tokens,
            rope,
            sliding_window: config.sliding_window,
        };
        let head = LlamaHeadStage {
            norm,
            lm_head,
            tied,
        };
        Ok((Box::new(embed), layers, Box::new(head), config.hidden_size))
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the
    /// `top_k` most likely tokens and then to the smallest set whose
    /// probability reaches `top_p` (transformers' order), seeded per step.
    Sample {
        temperature: f64,
        top_k: Option<i64>,
        top_p: Option<f64>,
        seed: u64,
    },
}

impl Sampling {
    /// The next token of every row of `logits [B, vocab]`: `[B]` int64.
    pub fn choose(&self, logits: &Tensor, step: u64) -> Result<Tensor> {
        let op = "sampling";
        match self {
            Sampling::Greedy => Ok(logits.f_argmax(-1, false).op(op)?),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            } => {
                let mut l = logits
                    .f_to_kind(Kind::Float)
                    .and_then(|l| l.f_div_scalar(*temperature))
                    .op(op)?;
                let v = l.size()[1];
                if let Some(k) = top_k
                    && *k < v
                {
                    let (top, _) = l.f_topk(*k, -1, true, true).op(op)?;
                    let kth = top.f_narrow(1, k - 1, 1).op(op)?;
                    l = l
                        .f_masked_fill(&l.f_lt_tensor(&kth)?, f64::NEG_INFINITY)
                        .op(op)?;
                }
                if let Some(p) = top_p
                    && *p < 1.0
                {
                    let (sorted, idx) = l.f_sort(-1, false).op(op)?;
                    let cum = sorted
                        .f_softmax(-1, Kind::Float)
                        .and_then(|s| s.f_cumsum(-1, Kind::Float))
                        .op(op)?;
                    let remove = cum.f_le(1.0 - p).op(op)?;
                    // Keep at least the most likely token (the last one, ascending).
                    let last = remove.size()[1] - 1;
                    let _ = remove
                        .f_narrow(1, last, 1)
                        .and_then(|mut r| r.f_fill_(0))
                        .op(op)?;
                    let remove = remove.f_scatter(1, &idx, &remove.shallow_clone()).op(op)?;
                    l = l.f_masked_fill(&remove, f64::NEG_INFINITY).op(op)?;
                }
                let probs = l.f_softmax(-1, Kind::Float).op(op)?;
                let draw = tensor_core::seed::with_seed(seed.wrapping_add(step), || {
                    probs.f_to_device(Device::Cpu)?.f_multinomial(1, false)
                })
                .op(op)?;
                Ok(draw
                    .f_squeeze_dim(1)
                    .and_then(|d| d.f_to_device(logits.device()))
                    .op(op)?)
            }
        }
    }
}

/// What [`LlamaForCausalLM::generate`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: i64,
    pub sampling: Sampling,
    /// Tokens that end a row (the config's `eos_token_id` by default).
    pub stop_tokens: Vec<i64>,
    /// What a stopped row is continued with.
    pub pad_token_id: i64,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, stopping at the config's
    /// end-of-sequence tokens, padding with its pad token (else 0).
    pub fn greedy(config: &LlamaConfig, max_new_tokens: i64) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::Greedy,
            stop_tokens: config.eos_token_ids.clone(),
            pad_token_id: config.pad_token_id.unwrap_or(0),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens < 1 {
            return Err(Error::invalid(format!(
                "generate: max_new_tokens must be >= 1, got {}",
                self.max_new_tokens
            )));
        }
        if let Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } = &self.sampling
        {
            if !(temperature.is_finite() && *temperature > 0.0) {
                return Err(Error::invalid(format!(
                    "generate: temperature must be > 0, got {temperature}"
                )));
            }
            if top_k.is_some_and(|k| k < 1) {
                return Err(Error::invalid("generate: top_k must be >= 1"));
            }
            if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                return Err(Error::invalid("generate: top_p must be in (0, 1]"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::loading::fixtures;
    use tensor_core::contract::{check_contract, check_keys};
    use tensor_core::io::SafetensorsFile;
    use tensor_core::module::ModuleExt;
    use tensor_core::tch::no_grad;
    use tensor_core::testing::{closeness, device, slack};

    const FAMILIES: [&str; 6] = [
        "tiny-llama",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-mistral",
        "tiny-mixtral",
        "tiny-qwen2moe",
    ];

    fn fixture(name: &str) -> PathBuf {
        fixtures::folder(name)
    }

    fn load(name: &str) -> LlamaForCausalLM {
        LlamaForCausalLM::from_folder(fixture(name), device()).unwrap()
    }

    /// Logits at the token positions of every row (padding positions carry no meaning).
    fn token_logits(logits: &Tensor, mask: &Tensor) -> Tensor {
        let keep = mask.to_device(logits.device()).ne(0).unsqueeze(-1);
        logits.masked_select(&keep).to_device(Device::Cpu)
    }

    #[test]
    fn logits_match_transformers_with_left_and_right_padding() {
        for name in FAMILIES {
            let model = load(name);
            let e = fixtures::expected(&fixture(name));
            let ids = e["input_ids"].to_device(device());
            let mask = e["attention_mask"].to_device(device());
            let logits = no_grad(|| model.logits(&ids, Some(&mask))).unwrap();
            let c = closeness(
                &token_logits(&logits, &mask),
                &token_logits(&e["logits"], &e["attention_mask"]),
                1e-4 * slack(),
                0.0,
            )
            .unwrap();
            println!(
                "{name}: logits max abs err vs transformers = {:e}",
                c.max_abs
            );
            assert!(c.ok, "{name}: {c:?}");
        }
    }

    #[test]
    fn greedy_generation_equals_transformers_token_for_token() {
        for name in FAMILIES {
            let model = load(name);
            let e = fixtures::expected(&fixture(name));
            let mut opts = GenerateOptions::greedy(model.config(), 8);
            opts.stop_tokens.clear(); // the reference ran without a stop token
            let out = model
                .generate(&e["gen_input_ids"], Some(&e["gen_attention_mask"]), &opts)
                .unwrap();
            let want = &e["gen_output"];
            assert_eq!(
                Vec::<i64>::try_from(out.to_device(Device::Cpu).flatten(0, -1)).unwrap(),
                Vec::<i64>::try_from(want.flatten(0, -1)).unwrap(),
                "{name}"
            );
            // Row 0 alone, unpadded: prompt and decoding without any mask.
            let one = model
                .generate(&e["gen_input_ids"].narrow(0, 0, 1), None, &opts)
                .unwrap();
            assert!(
                one.to_device(Device::Cpu).equal(&want.narrow(0, 0, 1)),
                "{name}: unpadded row"
            );
        }
    }

    /// Decoding through the cache, one token at a time, gives the logits
    /// of one full forward pass (left padding included).
    #[test]
    fn kv_cache_steps_equal_one_full_forward() {
        for name in ["tiny-llama", "tiny-mistral"] {
            let model = load(name);
            let e = fixtures::expected(&fixture(name));
            let ids = e["input_ids"].to_device(device());
            let mask = e["attention_mask"].to_device(device());
            let full = no_grad(|| model.logits(&ids, Some(&mask))).unwrap();
            let t = ids.size()[1];
            let mut ctx = Context::eval();
            ctx.insert(KvCache::new(model.config().num_hidden_layers as usize));
            let mut steps = Vec::new();
            for i in 0..t {
                ctx.attention_mask = Some(mask.narrow(1, 0, i + 1));
                let l = no_grad(|| ctx.call("", &model, &ids.narrow(1, i, 1))).unwrap();
                steps.push(l);
            }
            assert_eq!(ctx.get::<KvCache>().unwrap().len(), t);
            let stepped = Tensor::cat(&steps, 1);
            let c = closeness(
                &token_logits(&stepped, &mask),
                &token_logits(&full, &mask),
                1e-5 * slack(),
                1e-5,
            )
            .unwrap();
            assert!(c.ok, "{name}: {c:?}");
        }
    }

    #[test]
    fn names_are_the_checkpoint_keys_and_the_contract_holds() {
        for name in FAMILIES {
            let mut model = load(name);
            check_contract(&mut model).unwrap();
            let file = SafetensorsFile::open(fixture(name).join("model.safetensors")).unwrap();
            let ignore: &[&str] = if model.config().tie_word_embeddings {
                &["lm_head.weight"]
            } else {
                &[]
            };
            // Per-expert keys name rows of the stacked expert parameters.
            let mut keys: Vec<String> = file
                .names()
                .into_iter()
                .map(|k| expert_row(&k).map_or(k, |(n, _)| n))
                .collect();
            keys.sort();
            keys.dedup();
            check_keys(&model, &keys, ignore).unwrap();
            assert!(model.get("model.layers.1.self_attn.q_proj").is_ok());
            if model.config().moe.is_none() {
                assert!(model.get("model.layers.1.mlp.gate_proj").is_ok());
            }
        }
        let q3 = load("tiny-qwen3");
        assert!(q3.get("model.layers.0.self_attn.q_norm").is_ok());
        assert_eq!(q3.config().head_dim, 16);
        let q2 = load("tiny-qwen2");
        assert!(q2.lm_head.is_none() && q2.config().qkv_bias && !q2.config().o_bias);
        let mx = load("tiny-mixtral");
        let moe = mx
            .get_as::<SparseMoeBlock>("model.layers.1.block_sparse_moe")
            .unwrap();
        assert_eq!(
            (moe.num_experts(), moe.top_k, moe.norm_topk_prob),
            (4, 2, true)
        );
        assert_eq!(moe.w1.size(), [4, 48, 32]);
        let qm = load("tiny-qwen2moe");
        let moe = qm.get_as::<SparseMoeBlock>("model.layers.0.mlp").unwrap();
        assert!(moe.shared.is_some() && !moe.norm_topk_prob);
        assert!(
            qm.get_as::<FeedForward>("model.layers.1.mlp").is_ok(),
            "mlp_only_layers stay dense"
        );
    }

    #[test]
    fn seeded_sampling_repeats_and_narrow_filters_are_greedy() {
        let model = load("tiny-qwen3");
        let e = fixtures::expected(&fixture("tiny-qwen3"));
        let (ids, mask) = (&e["gen_input_ids"], &e["gen_attention_mask"]);
        let run = |sampling: Sampling| {
            let opts = GenerateOptions {
                max_new_tokens: 6,
                sampling,
                stop_tokens: vec![],
                pad_token_id: 0,
            };
            model
                .generate(ids, Some(mask), &opts)
                .unwrap()
                .to_device(Device::Cpu)
        };
        let sample = |seed, top_k, top_p| Sampling::Sample {
            temperature: 1.5,
            top_k,
            top_p,
            seed,
        };
        let a = run(sample(7, None, None));
        assert!(
            a.equal(&run(sample(7, None, None))),
            "same seed, same tokens"
        );
        assert!(!a.equal(&run(sample(8, None, None))) || !a.equal(&run(sample(9, None, None))));
        let greedy = run(Sampling::Greedy);
        assert!(
            run(sample(3, Some(1), None)).equal(&greedy),
            "top_k = 1 is greedy"
        );
        assert!(
            run(sample(3, None, Some(1e-9))).equal(&greedy),
            "a tiny top_p is greedy"
        );
    }

    #[test]
    fn stop_tokens_end_rows_and_pad_them() {
        let model = load("tiny-qwen2");
        let e = fixtures::expected(&fixture("tiny-qwen2"));
        let want = &e["gen_output"];
        // Stop at row 0's second generated token: row 0 is padded after it,
        // row 1 runs on until it stops too or the budget ends.
        let stop = want.int64_value(&[0, 7]);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            sampling: Sampling::Greedy,
            stop_tokens: vec![stop],
            pad_token_id: 0,
        };
        let out = model
            .generate(&e["gen_input_ids"], Some(&e["gen_attention_mask"]), &opts)
            .unwrap()
            .to_device(Device::Cpu);
        assert_eq!(out.int64_value(&[0, 7]), stop);
        for j in 8..out.size()[1] {
            assert_eq!(
                out.int64_value(&[0, j]),
                0,
                "row 0 is padded after its stop token"
            );
        }
        assert!(
            GenerateOptions {
                max_new_tokens: 0,
                ..opts.clone()
            }
            .validate()
            .is_err()
        );
    }

    /// A checkpoint split over two shards with an index loads to the same
    /// model; an index naming a shard that lacks the tensor is an error
    /// naming the shard.
    #[test]
    fn sharded_checkpoints_load() {
        let src = fixture("tiny-qwen3");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let all = tensor_core::io::load(src.join("model.safetensors"), Device::Cpu).unwrap();
        let (a, b): (Vec<_>, Vec<_>) = all.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        let mut map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", &a),
            ("model-00002-of-00002.safetensors", &b),
        ] {
            let refs: Vec<(&str, &Tensor)> =
                part.iter().map(|(_, (n, t))| (n.as_str(), t)).collect();
            tensor_core::io::save(dir.path().join(file), &refs, None).unwrap();
            for (_, (n, _)) in part.iter() {
                map.insert(n.clone(), file.into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let e = fixtures::expected(&src);
        let ids = e["input_ids"].to_device(device());
        let mask = e["attention_mask"].to_device(device());
        let sharded = LlamaForCausalLM::from_folder(dir.path(), device()).unwrap();
        let whole = load("tiny-qwen3");
        let (x, y) = no_grad(|| {
            (
                sharded.logits(&ids, Some(&mask)).unwrap(),
                whole.logits(&ids, Some(&mask)).unwrap(),
            )
        });
        assert!(x.equal(&y));
        // The index points a tensor at the wrong shard.
        let (k0, _) = &a[0].1;
        map.insert(k0.clone(), "model-00002-of-00002.safetensors".into());
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let err = LlamaForCausalLM::from_folder(dir.path(), device())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model-00002-of-00002.safetensors") && err.contains(k0.as_str()),
            "{err}"
        );
    }

    /// A bf16 checkpoint loads on the CPU upcast to f32 (the values are the
    /// bf16 ones), and its logits follow the f32 model's within bf16 rounding.
    #[test]
    fn half_precision_checkpoints_upcast_on_the_cpu() {
        let src = fixture("tiny-mistral");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let all = tensor_core::io::load(src.join("model.safetensors"), Device::Cpu).unwrap();
        let half: Vec<(String, Tensor)> = all
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::BFloat16)))
            .collect();
        let refs: Vec<(&str, &Tensor)> = half.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tensor_core::io::save(dir.path().join("model.safetensors"), &refs, None).unwrap();
        assert_eq!(
            checkpoint_half_kind(&loading::open_folder_weights(dir.path(), "t").unwrap()).unwrap(),
            Some(Kind::BFloat16)
        );
        let m = LlamaForCausalLM::from_folder(dir.path(), Device::Cpu).unwrap();
        let (n, w) = &m.named_parameters()[1];
        assert_eq!(w.kind(), Kind::Float, "{n}");
        let want = half
            .iter()
            .find(|(k, _)| k == n)
            .unwrap()
            .1
            .to_kind(Kind::Float);
        assert!(w.equal(&want), "{n} holds the bf16 values");
        let e = fixtures::expected(&src);
        let ids = e["input_ids"].narrow(0, 0, 1);
        let got = no_grad(|| m.logits(&ids, None)).unwrap();
        let c = closeness(&got, &e["logits"].narrow(0, 0, 1), 0.1, 0.05).unwrap();
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn bad_configs_name_the_key() {
        let base = || {
            let text = std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap();
            serde_json::from_str::<Value>(&text).unwrap()
        };
        let err = |v: Value| {
            LlamaConfig::from_json(&JsonConfig::from_value("config.json", v).unwrap())
                .unwrap_err()
                .to_string()
        };
        let mut v = base();
        v["rope_parameters"]["rope_type"] = "longrope".into();
        assert!(err(v).contains("rope_type"));
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        assert!(err(v).contains("num_key_value_heads"));
        let mut v = base();
        v["model_type"] = "gemma".into();
        assert!(err(v).contains("model_type"));
        let mut v = base();
        v["head_dim"] = 7.into();
        assert!(err(v).contains("head_dim"));
        // A config from another model: the weights do not fit and the error names a tensor.
        let dir = tempfile::tempdir().unwrap();
        let mut v = base();
        v["intermediate_size"] = 40.into();
        std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
        std::fs::copy(
            fixture("tiny-llama").join("model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let e = LlamaForCausalLM::from_folder(dir.path(), Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("mlp"), "{e}");
    }
}
