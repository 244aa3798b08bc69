//! # GPT-2: a causal Transformer decoder
//!
//! Radford et al. (2019), *Language Models are Unsupervised Multitask
//! Learners*, the pre-LayerNorm decoder-only Transformer of Vaswani et al.
//! (2017) with learned absolute positions and a tied output embedding.
//!
//! For token ids `x_1..x_T` (`E` = `wte`, `P` = `wpe`):
//!
//! ```text
//! h_0     = E[x_t] + P[t]                                   (+ dropout, training only)
//! a_l     = h_{l-1} + Attn_l(LN_1(h_{l-1}))                 (pre-LN residual blocks)
//! h_l     = a_l + FFN_l(LN_2(a_l))
//! Attn(u) = W_o concat_i softmax(Q_i K_i^T * s + M) V_i,    [Q K V] = u W_qkv + b_qkv (c_attn)
//! FFN(u)  = W_2 gelu_tanh(W_1 u + b_1) + b_2                (c_fc, c_proj)
//! out     = LN_f(h_L);  logits = out E^T                    (tied embedding)
//! ```
//!
//! `s = 1/sqrt(d_head)` (divided by `l + 1` with `scale_attn_by_inverse_layer_idx`),
//! `M` hides later keys (causal) and padding keys (`ctx.attention_mask`,
//! `[B, T]`, 1 = token), as the dtype's minimum, so a query with no visible key
//! averages uniformly instead of giving NaN. The language-model loss is the
//! shifted next-token cross-entropy `-1/N sum_t log p(x_{t+1} | x_{<=t})` over
//! the positions where both `t` and `t + 1` are tokens.
//!
//! **Names and layouts.** Parameters carry GPT-2's checkpoint names exactly
//! (`wte.weight`, `h.3.attn.c_attn.weight`, `h.3.mlp.c_fc.weight`,
//! `ln_f.bias`). Every projection is a `tensor-core` [`Linear`] with weight
//! `[out, in]` in memory, so LoRA can wrap it and an expert split can read it;
//! GPT-2 checkpoints store these four (`attn.c_attn`, `attn.c_proj`,
//! `mlp.c_fc`, `mlp.c_proj`) as `Conv1D` weights `[in, out]`, so loading
//! transposes exactly those ([`is_conv1d_weight`]) and
//! [`Gpt2Model::gpt2_state_dict`] transposes them back. The MLP is a
//! [`FeedForward`] under the label `(ffn)` inside the `mlp` slot: it is
//! addressed as `h.3.mlp.(ffn)` while its weights stay `h.3.mlp.c_fc.weight`.
//! Loading accepts the `transformer.` prefix of `GPT2LMHeadModel` files and
//! ignores `lm_head.weight` (tied to `wte`) and the `attn.bias` /
//! `attn.masked_bias` buffers of older files.

use std::path::Path;

use serde_json::{Value, json};
use tensor_core::layers::{
    Activation, BlockNames, Embedding, FeedForward, FfnNames, LayerNorm, Linear, PreNormBlock,
};
use tensor_core::module::{Context, Module, ModuleExt, Slot};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::{Error as TensorError, Result as TensorResult, TchResultExt};

use crate::bert::dropout;
use crate::config::{Checks, JsonConfig};
use crate::loading::{self, Checkpoint, Layout};
use crate::{Error, Result};

/// The path that in-memory (not file-backed) configs report in errors.
const IN_MEMORY: &str = "(in-memory Gpt2Config)";

/// Hyper-parameters of a GPT-2 model, as its `config.json` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    /// Longest sequence (rows of `wpe`).
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// FFN width; `4 * n_embd` when `None`.
    pub n_inner: Option<i64>,
    /// `gelu_new` (GPT-2), `gelu`, `relu`, `silu`, ...
    pub activation_function: String,
    pub layer_norm_epsilon: f64,
    /// Dropout after the attention and MLP outputs (training only).
    pub resid_pdrop: f64,
    /// Dropout after the embeddings (training only).
    pub embd_pdrop: f64,
    /// Dropout on the attention probabilities (training only).
    pub attn_pdrop: f64,
    /// Standard deviation of the from-scratch initialisation.
    pub initializer_range: f64,
    /// Scale scores by `1/sqrt(d_head)` (GPT-2: true).
    pub scale_attn_weights: bool,
    /// Also divide the scores of layer `l` by `l + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
}

impl Gpt2Config {
    /// A from-scratch config with GPT-2's defaults for everything but the sizes
    /// (`gelu_new`, eps 1e-5, dropout 0.1, init std 0.02).
    pub fn new(vocab_size: i64, n_positions: i64, n_embd: i64, n_layer: i64, n_head: i64) -> Self {
        Self {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
        }
    }

    /// The same config with every dropout probability set to `p`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.resid_pdrop = p;
        self.embd_pdrop = p;
        self.attn_pdrop = p;
        self
    }

    /// Read a Hugging Face GPT-2 `config.json` (`model_type` must be `gpt2`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&JsonConfig::read(path)?)
    }

    /// Parse `config.json` text; `path` is only used in error messages.
    pub fn from_json_str(path: impl AsRef<Path>, text: &str) -> Result<Self> {
        Self::from_json(&JsonConfig::parse(path, text)?)
    }

    /// From a parsed `config.json`.
    pub fn from_json(j: &JsonConfig) -> Result<Self> {
        j.expect_model_type(&["gpt2"])?;
        if j.bool_or("add_cross_attention", false)? {
            return Err(Error::config(
                &j.path,
                "add_cross_attention",
                "cross-attention GPT-2 blocks are not supported",
            ));
        }
        if !j.bool_or("tie_word_embeddings", true)? {
            return Err(Error::config(
                &j.path,
                "tie_word_embeddings",
                "only GPT-2 with the output embedding tied to wte is supported",
            ));
        }
        let c = Self {
            vocab_size: j.i64("vocab_size")?,
            n_positions: j.i64("n_positions")?,
            n_embd: j.i64("n_embd")?,
            n_layer: j.i64("n_layer")?,
            n_head: j.i64("n_head")?,
            n_inner: j.opt_i64("n_inner")?,
            activation_function: j.str_or("activation_function", "gelu_new")?.to_owned(),
            layer_norm_epsilon: j.f64_or("layer_norm_epsilon", 1e-5)?,
            resid_pdrop: j.f64_or("resid_pdrop", 0.1)?,
            embd_pdrop: j.f64_or("embd_pdrop", 0.1)?,
            attn_pdrop: j.f64_or("attn_pdrop", 0.1)?,
            initializer_range: j.f64_or("initializer_range", 0.02)?,
            scale_attn_weights: j.bool_or("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: j.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        };
        c.validate_at(&j.path)?;
        Ok(c)
    }

    /// The config as a Hugging Face `config.json` object.
    pub fn to_json(&self) -> Value {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": self.activation_function,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "initializer_range": self.initializer_range,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": false,
            "add_cross_attention": false,
            "tie_word_embeddings": true,
            "dtype": "float32",
        })
    }

    /// FFN width (`n_inner`, else `4 * n_embd`).
    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> i64 {
        if self.n_head > 0 {
            self.n_embd / self.n_head
        } else {
            0
        }
    }

    /// The MLP's non-linearity.
    pub fn activation(&self) -> Result<Activation> {
        Checks(Path::new(IN_MEMORY)).activation("activation_function", &self.activation_function)
    }

    /// Check sizes and probabilities; errors name the offending key.
    pub fn validate(&self) -> Result<()> {
        self.validate_at(Path::new(IN_MEMORY))
    }

    fn validate_at(&self, path: &Path) -> Result<()> {
        let check = Checks(path);
        check.positive(&[
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ])?;
        if let Some(n) = self.n_inner {
            check.positive(&[("n_inner", n)])?;
        }
        check.divisible(("n_embd", self.n_embd), ("n_head", self.n_head))?;
        check.positive_float("layer_norm_epsilon", self.layer_norm_epsilon)?;
        check.probabilities(&[
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ])?;
        check.non_negative("initializer_range", self.initializer_range)?;
        check.activation("activation_function", &self.activation_function)?;
        Ok(())
    }
}

/// Is `name` (without a `transformer.` prefix) one of the four GPT-2 weights
/// stored as `Conv1D` `[in, out]`: `h.N.attn.c_attn`, `h.N.attn.c_proj`,
/// `h.N.mlp.c_fc`, `h.N.mlp.c_proj` (`.weight` only)?
pub fn is_conv1d_weight(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("h.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && matches!(
            rest,
            "attn.c_attn.weight" | "attn.c_proj.weight" | "mlp.c_fc.weight" | "mlp.c_proj.weight"
        )
}

/// What a checkpoint key means for the model: its parameter name, or `None`
/// for keys that are deliberately ignored (tied head, attention-mask buffers).
fn checkpoint_key_to_name(key: &str) -> Option<&str> {
    let name = key.strip_prefix("transformer.").unwrap_or(key);
    if name == "lm_head.weight"
        || key == "lm_head.weight"
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
    {
        return None;
    }
    Some(name)
}

/// How a GPT-2 checkpoint stores the parameter `name`: the Conv1D weights
/// ([`is_conv1d_weight`]) transposed, everything else as is.
fn conv1d_layout(name: &str) -> Layout {
    if is_conv1d_weight(name) {
        Layout::Transposed
    } else {
        Layout::AsIs
    }
}

fn randn(shape: &[i64], std: f64, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_randn(shape, (Kind::Float, device))
        .and_then(|t| t.f_mul_scalar(std))
        .op("Gpt2 init")?)
}

fn zeros(shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_zeros(shape, (Kind::Float, device)).op("Gpt2 init")?)
}

/// A `Linear` (`[out, in]`) with GPT-2's init: `N(0, std)` weight, zero bias.
fn gpt2_linear(inp: i64, out: i64, std: f64, device: Device) -> Result<Linear> {
    Ok(Linear::from_weights(
        randn(&[out, inp], std, device)?,
        Some(zeros(&[out], device)?),
    )?)
}

/// The additive attention bias `[B or 1, 1, T, T]`: 0 where query `i` may see
/// key `j` (`j <= i` and key `j` is a token), the dtype's minimum elsewhere.
fn causal_bias(
    mask: Option<&Tensor>,
    b: i64,
    t: i64,
    kind: Kind,
    device: Device,
) -> TensorResult<Tensor> {
    let op = "Gpt2Attention mask";
    let mut allowed = Tensor::f_ones([t, t], (Kind::Bool, device))
        .and_then(|m| m.f_tril(0))
        .and_then(|m| m.f_view([1, 1, t, t]))
        .op(op)?;
    if let Some(m) = mask {
        if m.size() != [b, t] {
            return Err(TensorError::shape(
                "Gpt2Attention attention_mask",
                format!("[{b}, {t}]"),
                m.size(),
            ));
        }
        let keep = m
            .f_to_device(device)
            .and_then(|m| m.f_ne(0))
            .and_then(|m| m.f_view([b, 1, 1, t]))
            .op(op)?;
        allowed = allowed.f_logical_and(&keep).op(op)?;
    }
    let min = tensor_core::layers::hidden_key_bias(kind);
    Tensor::f_zeros([1], (kind, device))
        .and_then(|z| z.f_masked_fill(&allowed.f_logical_not()?, min))
        .op(op)
}

/// GPT-2's causal self-attention with a fused q/k/v projection:
/// `c_attn: d -> 3d` (split into `q, k, v`, then into heads), scaled
/// dot-product attention under the causal and key-padding masks, `c_proj: d -> d`.
#[derive(Debug, Module)]
#[module(kind = "Gpt2Attention", forward = forward_impl)]
pub struct Gpt2Attention {
    /// `Linear [3d, d]`: rows `0..d` give `q`, `d..2d` give `k`, `2d..3d` give `v`.
    #[child]
    pub c_attn: Slot,
    /// `Linear [d, d]`.
    #[child]
    pub c_proj: Slot,
    pub n_embd: i64,
    pub n_head: i64,
    /// Multiplies the scores (`1/sqrt(d_head)` for GPT-2).
    pub scale: f64,
    /// Dropout on the attention probabilities (training only).
    pub attn_dropout: f64,
    /// Dropout on the output (training only).
    pub resid_dropout: f64,
}

impl Gpt2Attention {
    /// Freshly initialised for layer `layer` of `config` (GPT-2 init).
    pub fn new(config: &Gpt2Config, layer: i64, device: Device) -> Result<Self> {
        let d = config.n_embd;
        let std = config.initializer_range;
        let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
        let mut scale = if config.scale_attn_weights {
            1.0 / (config.head_dim() as f64).sqrt()
        } else {
            1.0
        };
        if config.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            c_attn: Box::new(gpt2_linear(d, 3 * d, std, device)?),
            c_proj: Box::new(gpt2_linear(d, d, proj_std, device)?),
            n_embd: d,
            n_head: config.n_head,
            scale,
            attn_dropout: config.attn_pdrop,
            resid_dropout: config.resid_pdrop,
        })
    }

    /// `[B, T, d] -> [B, H, T, d/H]`
    fn heads(&self, xs: &Tensor, b: i64, t: i64) -> TensorResult<Tensor> {
        let hd = self.n_embd / self.n_head;
        xs.f_view([b, t, self.n_head, hd])
            .and_then(|x| x.f_transpose(1, 2))
            .op("Gpt2Attention heads")
    }
}

impl Gpt2Attention {
    /// `xs: [B, T, d] -> [B, T, d]`; the key-padding mask is `ctx.attention_mask`.
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let s = xs.size();
        if s.len() != 3 || s[2] != self.n_embd {
            return Err(TensorError::shape(
                "Gpt2Attention",
                format!("[batch, seq, {}]", self.n_embd),
                s,
            ));
        }
        let (b, t) = (s[0], s[1]);
        let qkv = ctx.call("c_attn", self.c_attn.as_ref(), xs)?;
        if qkv.size() != [b, t, 3 * self.n_embd] {
            return Err(TensorError::shape(
                "Gpt2Attention c_attn output",
                format!("[{b}, {t}, {}]", 3 * self.n_embd),
                qkv.size(),
            ));
        }
        let parts = qkv.f_split(self.n_embd, 2).op("Gpt2Attention split")?;
        let q = self.heads(&parts[0], b, t)?;
        let k = self.heads(&parts[1], b, t)?;
        let v = self.heads(&parts[2], b, t)?;
        let bias = causal_bias(ctx.attention_mask.as_ref(), b, t, q.kind(), q.device())?;
        let p = if ctx.train { self.attn_dropout } else { 0.0 };
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&bias),
            p,
            false,
            self.scale,
            false,
        )
        .op("Gpt2Attention scaled_dot_product_attention")?;
        let merged = out
            .f_transpose(1, 2)
            .and_then(|o| o.f_reshape([b, t, self.n_embd]))
            .op("Gpt2Attention merge heads")?;
        let y = ctx.call("c_proj", self.c_proj.as_ref(), &merged)?;
        dropout(y, self.resid_dropout, ctx.train, "Gpt2Attention dropout")
    }
}

/// GPT-2's `mlp`: holds the [`FeedForward`] (`c_fc`, `c_proj`) under the
/// label `(ffn)`, so `h.N.mlp.(ffn)` addresses the FFN while its weights are
/// named `h.N.mlp.c_fc.weight`.
#[derive(Debug, Module)]
#[module(kind = "Gpt2Mlp", forward = forward_impl)]
pub struct Gpt2Mlp {
    #[child(name = "(ffn)")]
    pub ffn: Slot,
}

impl Gpt2Mlp {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        ctx.call("(ffn)", self.ffn.as_ref(), xs)
    }
}

/// One pre-LN block, `tensor-core`'s [`PreNormBlock`] with GPT-2's names
/// (kind `Gpt2Block`): `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
pub fn gpt2_block(config: &Gpt2Config, layer: i64, device: Device) -> Result<PreNormBlock> {
    let (d, eps) = (config.n_embd, config.layer_norm_epsilon);
    let std = config.initializer_range;
    let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
    let mut ffn = FeedForward::from_weights(
        randn(&[config.inner_dim(), d], std, device)?,
        Some(zeros(&[config.inner_dim()], device)?),
        None,
        randn(&[d, config.inner_dim()], proj_std, device)?,
        Some(zeros(&[d], device)?),
        config.activation()?,
        FfnNames::gpt2(),
    )?;
    ffn.dropout = config.resid_pdrop;
    Ok(PreNormBlock::new(
        BlockNames::gpt2(),
        Box::new(LayerNorm::new(d, eps, true, device)?),
        Box::new(Gpt2Attention::new(config, layer, device)?),
        Box::new(LayerNorm::new(d, eps, true, device)?),
        Box::new(Gpt2Mlp { ffn: Box::new(ffn) }),
    ))
}

/// A GPT-2 decoder: `wte`, `wpe`, blocks `h.0 .. h.{n_layer-1}`, `ln_f`.
///
/// As a [`Module`], `forward` maps token ids `[B, T]` (i64) to the final
/// hidden states `[B, T, n_embd]`, reading the padding mask from
/// `ctx.attention_mask`. [`Gpt2Model::logits`] applies the tied LM head and
/// [`Gpt2Model::lm_loss`] gives the next-token loss.
#[derive(Debug, Module)]
#[module(kind = "Gpt2Model", forward = forward_impl)]
pub struct Gpt2Model {
    config: Gpt2Config,
    #[child]
    wte: Slot,
    #[child]
    wpe: Slot,
    #[children(names = "h_names")]
    h: Vec<Slot>,
    h_names: Vec<String>,
    #[child]
    ln_f: Slot,
}

impl Gpt2Model {
    /// A freshly initialised model (GPT-2 init: `N(0, initializer_range)`
    /// weights, residual projections scaled by `1/sqrt(2 n_layer)`, zero
    /// biases, LayerNorms at 1 and 0).
    pub fn new(config: Gpt2Config, device: Device) -> Result<Self> {
        config.validate()?;
        let (d, std) = (config.n_embd, config.initializer_range);
        let wte = Embedding::from_weight(randn(&[config.vocab_size, d], std, device)?)?;
        let wpe = Embedding::from_weight(randn(&[config.n_positions, d], std, device)?)?;
        let mut h = Vec::new();
        for layer in 0..config.n_layer {
            h.push(Box::new(gpt2_block(&config, layer, device)?) as Slot);
        }
        let h_names = (0..config.n_layer).map(|i| format!("h.{i}")).collect();
        let ln_f = LayerNorm::new(d, config.layer_norm_epsilon, true, device)?;
        Ok(Self {
            config,
            wte: Box::new(wte),
            wpe: Box::new(wpe),
            h,
            h_names,
            ln_f: Box::new(ln_f),
        })
    }

    /// Load a Hugging Face GPT-2 folder: `config.json` and `model.safetensors`
    /// (`GPT2Model` or `GPT2LMHeadModel` keys). Errors name the file and the key.
    pub fn from_folder(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        loading::expect_folder(dir, "GPT-2")?;
        let config = Gpt2Config::from_file(dir.join("config.json"))?;
        let mut model = Self::new(config, device)?;
        model.load_safetensors(dir.join("model.safetensors"))?;
        Ok(model)
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The device of the parameters (that of `wte`).
    pub fn device(&self) -> Device {
        loading::device_of(self)
    }

    /// Copy a GPT-2 checkpoint's tensors into this model. Every parameter must
    /// be present with the shape this config implies (Conv1D weights `[in,
    /// out]`); unknown keys are errors, except `lm_head.weight` and the
    /// `attn.bias` / `attn.masked_bias` buffers. Keys may carry `transformer.`.
    pub fn load_safetensors(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let file = loading::open_weights(path.as_ref(), "GPT-2")?;
        let c = &self.config;
        let about = Checkpoint {
            model: "GPT-2",
            config: format!(
                "n_layer {}, vocab_size {}, n_positions {}, n_embd {}, n_inner {}",
                c.n_layer,
                c.vocab_size,
                c.n_positions,
                c.n_embd,
                c.inner_dim()
            ),
            prefix: "transformer.",
        };
        loading::load_checkpoint(
            self,
            &file,
            &about,
            |key| checkpoint_key_to_name(key).map(str::to_owned),
            conv1d_layout,
        )
    }

    /// The parameters in GPT-2's checkpoint layout: the same names, with the
    /// four Conv1D weights transposed back to `[in, out]` (contiguous, detached).
    pub fn gpt2_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_parameters()
            .into_iter()
            .map(|(n, t)| {
                let t = conv1d_layout(&n).convert(t.f_detach().op(&n)?, &n)?;
                Ok((n, t))
            })
            .collect()
    }

    /// Write `config.json` and `model.safetensors` (GPT-2 layout, no
    /// `transformer.` prefix) into `dir`, which is created if needed;
    /// Hugging Face `GPT2LMHeadModel.from_pretrained` reads the result.
    pub fn save_folder(&self, dir: impl AsRef<Path>) -> Result<()> {
        let tensors = self.gpt2_state_dict()?;
        loading::save_folder(dir.as_ref(), &self.config.to_json(), &tensors)
    }

    /// The input embedding `wte.weight` `[vocab, n_embd]`, also the LM head.
    pub fn wte_weight(&self) -> Result<Tensor> {
        self.wte
            .named_parameters()
            .into_iter()
            .find(|(n, _)| n == "weight")
            .map(|(_, t)| t)
            .ok_or_else(|| Error::invalid("Gpt2Model: the wte slot has no 'weight' parameter"))
    }

    /// Tied LM head: `hidden [B, T, n_embd] -> logits [B, T, vocab]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let d = self.config.n_embd;
        if hidden.dim() < 1 || hidden.size().last() != Some(&d) {
            return Err(
                TensorError::shape("Gpt2 lm_head", format!("[*, {d}]"), hidden.size()).into(),
            );
        }
        let w = self.wte_weight()?;
        Ok(hidden
            .f_matmul(&w.f_transpose(0, 1).op("Gpt2 lm_head")?)
            .op("Gpt2 lm_head")?)
    }

    /// `input_ids [B, T] -> logits [B, T, vocab]` (mask from `ctx.attention_mask`).
    pub fn logits(&self, input_ids: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let hidden = ctx.call("", self, input_ids)?;
        self.lm_head(&hidden)
    }

    /// Mean next-token cross-entropy of `input_ids [B, T]` under
    /// `attention_mask [B, T]` (1 = token; `None`: all tokens). Position `t`
    /// predicts token `t + 1` and counts when both are tokens. A batch with
    /// nothing to predict gives 0. The mask is set in `ctx` for this call
    /// (the caller's own mask is restored); `ctx.train` turns dropout on.
    pub fn lm_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &mut Context,
    ) -> Result<Tensor> {
        let s = input_ids.size();
        if s.len() != 2 || s[1] < 2 {
            return Err(
                TensorError::shape("Gpt2 lm_loss input_ids", "[batch, seq >= 2]", s).into(),
            );
        }
        let saved = std::mem::replace(
            &mut ctx.attention_mask,
            attention_mask.map(Tensor::shallow_clone),
        );
        let logits = self.logits(input_ids, ctx);
        ctx.attention_mask = saved;
        Ok(crate::lm::next_token_loss(&logits?, input_ids, attention_mask)?.0)
    }

    /// Check `input_ids`: `[B, T]` integers, `1 <= T <= n_positions`, ids in `0..vocab`.
    fn check_ids(&self, ids: &Tensor) -> TensorResult<()> {
        let s = ids.size();
        let c = &self.config;
        if s.len() != 2 || s[0] < 1 || s[1] < 1 || s[1] > c.n_positions {
            return Err(TensorError::shape(
                "Gpt2Model input_ids",
                format!("[batch >= 1, 1 <= seq <= n_positions = {}]", c.n_positions),
                s,
            ));
        }
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(TensorError::DType {
                op: "Gpt2Model input_ids".into(),
                expected: "int64 token ids".into(),
                actual: ids.kind(),
            });
        }
        let op = "Gpt2Model input_ids";
        let lo = ids.f_min().and_then(|m| m.f_int64_value(&[])).op(op)?;
        let hi = ids.f_max().and_then(|m| m.f_int64_value(&[])).op(op)?;
        if lo < 0 || hi >= c.vocab_size {
            return Err(TensorError::config(format!(
                "Gpt2Model input_ids: ids must be in 0..{} (vocab_size), got values in {lo}..={hi}",
                c.vocab_size
            )));
        }
        Ok(())
    }
}

impl Gpt2Model {
    /// `input_ids [B, T]` (i64) `-> hidden states [B, T, n_embd]` after `ln_f`.
    fn forward_impl(&self, input_ids: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        self.check_ids(input_ids)?;
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        if let Some(m) = &ctx.attention_mask
            && m.size() != [b, t]
        {
            return Err(TensorError::shape(
                "Gpt2Model attention_mask",
                format!("[{b}, {t}] like input_ids"),
                m.size(),
            ));
        }
        let tok = ctx.call("wte", self.wte.as_ref(), input_ids)?;
        let pos_ids =
            Tensor::f_arange(t, (Kind::Int64, input_ids.device())).op("Gpt2Model positions")?;
        let pos = ctx.call("wpe", self.wpe.as_ref(), &pos_ids)?;
        let mut h = tok.f_add(&pos).op("Gpt2Model embeddings")?;
        h = dropout(h, self.config.embd_pdrop, ctx.train, "Gpt2Model dropout")?;
        for (name, block) in self.h_names.iter().zip(&self.h) {
            h = ctx.call(name, block.as_ref(), &h)?;
        }
        ctx.call("ln_f", self.ln_f.as_ref(), &h)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tensor_core::io::{self, SafetensorsFile};

    use super::*;
    use crate::loading::fixtures;
    use tensor_core::module::is;
    use tensor_core::tch::no_grad;
    use tensor_core::testing::{closeness, device, slack, with_seed};

    fn fixture() -> PathBuf {
        fixtures::folder("tiny-gpt2")
    }

    /// The fixture model on the test device.
    fn load() -> Gpt2Model {
        Gpt2Model::from_folder(fixture(), device()).unwrap()
    }

    /// Token ids (host values) on the test device.
    fn ids_on_device(ids: &[i64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(ids).view(shape).to_device(device())
    }

    #[test]
    fn parity_with_transformers_logits_and_hidden() {
        let model = load();
        let e = fixtures::expected(&fixture());
        let ids = e["input_ids"].to_device(device());
        let mask = e["attention_mask"].to_device(device());
        let mut ctx = Context::eval().with_mask(mask);
        let hidden = no_grad(|| ctx.call("", &model, &ids)).unwrap();
        let logits = no_grad(|| model.lm_head(&hidden)).unwrap();
        let atol = 1e-4 * slack();
        // Rows 0 (full) and 1 (right-padded): every position matches.
        let rows = |t: &Tensor| t.narrow(0, 0, 2);
        let c = closeness(&rows(&logits), &rows(&e["logits"]), atol, 0.0).unwrap();
        println!(
            "gpt2 logits max abs err (rows 0-1, all positions): {:e}",
            c.max_abs
        );
        assert!(c.ok, "{c:?}");
        let c = closeness(&rows(&hidden), &rows(&e["hidden"]), atol, 0.0).unwrap();
        println!("gpt2 hidden max abs err (rows 0-1): {:e}", c.max_abs);
        assert!(c.ok, "{c:?}");
        // Row 2 (left-padded): the token positions match.
        let tokens = e["attention_mask"].get(2).ne(0).nonzero().squeeze_dim(1);
        let a = logits
            .get(2)
            .to_device(Device::Cpu)
            .index_select(0, &tokens);
        let b = e["logits"].get(2).index_select(0, &tokens);
        let c = closeness(&a, &b, atol, 0.0).unwrap();
        println!(
            "gpt2 logits max abs err (left-padded row, tokens): {:e}",
            c.max_abs
        );
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn lm_loss_matches_transformers() {
        let model = load();
        let e = fixtures::expected(&fixture());
        let ids = e["input_ids"].narrow(0, 0, 2).to_device(device());
        let mask = e["attention_mask"].narrow(0, 0, 2).to_device(device());
        let loss = no_grad(|| model.lm_loss(&ids, Some(&mask), &mut Context::eval())).unwrap();
        let (ours, theirs) = (loss.double_value(&[]), e["loss"].double_value(&[]));
        println!("gpt2 lm loss: ours {ours}, transformers {theirs}");
        assert!(
            (ours - theirs).abs() <= 1e-4 * slack(),
            "{ours} vs {theirs}"
        );
    }

    #[test]
    fn causal_later_tokens_do_not_change_earlier_logits() {
        let model = load();
        let ids = ids_on_device(&[5, 17, 3, 88, 42, 9, 61, 2, 70, 33], &[1, 10]);
        let changed = ids.copy();
        let _ = changed.narrow(1, 6, 4).fill_(11);
        let (a, b) = no_grad(|| {
            (
                model.logits(&ids, &mut Context::eval()).unwrap(),
                model.logits(&changed, &mut Context::eval()).unwrap(),
            )
        });
        let c = closeness(&a.narrow(1, 0, 6), &b.narrow(1, 0, 6), 1e-6 * slack(), 0.0).unwrap();
        assert!(c.ok, "earlier positions changed: {c:?}");
        let later = (a.narrow(1, 6, 4) - b.narrow(1, 6, 4)).abs().max();
        assert!(
            later.double_value(&[]) > 1e-3,
            "later positions should change"
        );
    }

    #[test]
    fn parameter_names_equal_checkpoint_keys() {
        let mut model = load();
        let report = tensor_core::contract::check_contract(&mut model).unwrap();
        assert!(report.parameters > 0, "{report:?}");
        let file = SafetensorsFile::open(fixture().join("model.safetensors")).unwrap();
        let mut keys: Vec<String> = file
            .names()
            .into_iter()
            .map(|k| k.strip_prefix("transformer.").unwrap_or(&k).to_owned())
            .collect();
        keys.sort();
        let mut names: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        assert_eq!(names, keys);
        for n in [
            "wte.weight",
            "wpe.weight",
            "h.0.ln_1.weight",
            "h.0.attn.c_attn.weight",
            "h.0.attn.c_attn.bias",
            "h.0.attn.c_proj.weight",
            "h.1.ln_2.bias",
            "h.1.mlp.c_fc.weight",
            "h.1.mlp.c_proj.bias",
            "ln_f.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
        // Projections are Linear [out, in]; the FFN is addressable by label.
        let c_attn = model.get_as::<Linear>("h.1.attn.c_attn").unwrap();
        assert_eq!(c_attn.weight.size(), [96, 32]);
        let ffn = model.get_as::<FeedForward>("h.0.mlp.(ffn)").unwrap();
        assert_eq!(ffn.w1().unwrap().size(), [128, 32]);
        assert!(is::<Linear>(model.get("h.0.mlp.c_proj").unwrap()));
        let ffns = model.find(&mut |_, m| is::<FeedForward>(m));
        assert_eq!(ffns, ["h.0.mlp.(ffn)", "h.1.mlp.(ffn)"]);
    }

    #[test]
    fn conv1d_weights_are_transposed_on_load_and_back_on_save() {
        let model = load();
        let file = SafetensorsFile::open(fixture().join("model.safetensors")).unwrap();
        let stored = file
            .load("transformer.h.0.mlp.c_fc.weight", Device::Cpu)
            .unwrap();
        assert_eq!(stored.size(), [32, 128]);
        let ffn = model.get_as::<FeedForward>("h.0.mlp.(ffn)").unwrap();
        let w1 = ffn.w1().unwrap().to_device(Device::Cpu);
        assert!(w1.equal(&stored.tr()));
        let dir = tempfile::tempdir().unwrap();
        model.save_folder(dir.path()).unwrap();
        let saved = SafetensorsFile::open(dir.path().join("model.safetensors")).unwrap();
        for key in file.names() {
            let Some(name) = checkpoint_key_to_name(&key) else {
                continue;
            };
            let a = saved.load(name, Device::Cpu).unwrap();
            let b = file.load(&key, Device::Cpu).unwrap();
            assert!(a.equal(&b), "{name} differs after save");
        }
        let again = Gpt2Model::from_folder(dir.path(), device()).unwrap();
        assert_eq!(again.config(), model.config());
        let ids = fixtures::expected(&fixture())["input_ids"].to_device(device());
        let (a, b) = no_grad(|| {
            (
                model.logits(&ids, &mut Context::eval()).unwrap(),
                again.logits(&ids, &mut Context::eval()).unwrap(),
            )
        });
        assert!(a.equal(&b));
    }

    #[test]
    fn is_conv1d_weight_matches_exactly_the_four() {
        for n in [
            "h.0.attn.c_attn.weight",
            "h.11.attn.c_proj.weight",
            "h.3.mlp.c_fc.weight",
            "h.3.mlp.c_proj.weight",
        ] {
            assert!(is_conv1d_weight(n), "{n}");
        }
        for n in [
            "h.0.attn.c_attn.bias",
            "h.0.ln_1.weight",
            "wte.weight",
            "h.x.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_fc.weight",
            "h.0.mlp.c_fc.lora_A.weight",
        ] {
            assert!(!is_conv1d_weight(n), "{n}");
        }
        assert_eq!(
            checkpoint_key_to_name("transformer.wte.weight"),
            Some("wte.weight")
        );
        assert_eq!(checkpoint_key_to_name("lm_head.weight"), None);
        assert_eq!(checkpoint_key_to_name("h.0.attn.bias"), None);
        assert_eq!(checkpoint_key_to_name("h.0.attn.masked_bias"), None);
        assert_eq!(
            checkpoint_key_to_name("h.0.attn.c_attn.bias"),
            Some("h.0.attn.c_attn.bias")
        );
    }

    #[test]
    fn training_from_scratch_reduces_lm_loss() {
        let config = Gpt2Config::new(16, 32, 32, 2, 4).with_dropout(0.0);
        // Initialised on the CPU, so that the seed gives the same weights on
        // every device, then moved to the test device.
        let mut model = with_seed(7, || Gpt2Model::new(config, Device::Cpu)).unwrap();
        model.to_device(device()).unwrap();
        let pattern: Vec<i64> = (0..24).map(|i| 1 + (i % 6)).collect();
        let ids = ids_on_device(&pattern, &[1, 24]).repeat([4, 1]);
        let params = model.trainable_parameters();
        assert_eq!(params.len(), model.named_parameters().len());
        // AdamW rather than plain SGD: SGD at a rate that learns in 40 steps
        // diverges for some initialisations, AdamW learns from all we tried.
        let mut opt =
            tensor_core::train::AdamW::new(params, tensor_core::train::AdamWConfig::new(1e-2))
                .unwrap();
        let mut losses = Vec::new();
        for _ in 0..40 {
            let loss = model.lm_loss(&ids, None, &mut Context::train()).unwrap();
            losses.push(loss.double_value(&[]));
            loss.backward();
            opt.step().unwrap();
            opt.zero_grad().unwrap();
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        println!("gpt2 from scratch: loss {first:.3} -> {last:.3}");
        assert!(first > 2.0, "initial loss {first} should be near ln 16");
        assert!(last < 0.5 * first, "loss did not fall: {losses:?}");
    }

    #[test]
    fn dropout_only_in_training() {
        let config = Gpt2Config::new(16, 8, 16, 1, 2).with_dropout(0.5);
        let model = with_seed(1, || Gpt2Model::new(config, device())).unwrap();
        let ids = ids_on_device(&[1, 2, 3, 4], &[1, 4]);
        let e1 = model.logits(&ids, &mut Context::eval()).unwrap();
        let e2 = model.logits(&ids, &mut Context::eval()).unwrap();
        assert!(e1.equal(&e2));
        let t1 = model.logits(&ids, &mut Context::train()).unwrap();
        assert!(!t1.equal(&e1));
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let model = load();
        let mut ctx = Context::eval();
        // Out-of-range ids must be caught before they reach the device (on
        // CUDA an embedding lookup out of range is a device-side assert).
        let too_big = ids_on_device(&[1, 97], &[1, 2]);
        let e = model.logits(&too_big, &mut ctx).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        let negative = ids_on_device(&[-1, 3], &[1, 2]);
        assert!(model.logits(&negative, &mut ctx).is_err());
        let flat = ids_on_device(&[1, 2, 3], &[3]);
        let e = model.logits(&flat, &mut ctx).unwrap_err().to_string();
        assert!(e.contains("input_ids"), "{e}");
        let long = Tensor::zeros([1, 65], (Kind::Int64, device()));
        let e = model.logits(&long, &mut ctx).unwrap_err().to_string();
        assert!(e.contains("n_positions = 64"), "{e}");
        let floats = Tensor::zeros([1, 3], (Kind::Float, device()));
        assert!(model.logits(&floats, &mut ctx).is_err());
        let ids = ids_on_device(&[1, 2, 3], &[1, 3]);
        let mut bad_mask = Context::eval().with_mask(Tensor::ones([1, 4], (Kind::Int64, device())));
        let e = model.logits(&ids, &mut bad_mask).unwrap_err().to_string();
        assert!(e.contains("attention_mask"), "{e}");
        let one = ids_on_device(&[1], &[1, 1]);
        assert!(model.lm_loss(&one, None, &mut ctx).is_err());
    }

    #[test]
    fn config_errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("n_head".into(), json!(5));
        });
        let e = Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("'n_head'"), "{e}");

        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("model_type".into(), json!("bert"));
        });
        let e = Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("config.json")
                && e.contains("'model_type'")
                && e.contains("unknown architecture"),
            "{e}"
        );

        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.remove("n_embd");
        });
        let e = Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("'n_embd'") && e.contains("missing"),
            "{e}"
        );

        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("vocab_size".into(), json!("many"));
        });
        let e = Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("'vocab_size'") && e.contains("integer"), "{e}");

        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("activation_function".into(), json!("swoosh"));
        });
        let e = Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("'activation_function'") && e.contains("swoosh"),
            "{e}"
        );

        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("n_inner".into(), json!(64));
        });
        assert_eq!(Gpt2Config::from_file(&p).unwrap().inner_dim(), 64);

        std::fs::write(&p, "{ not json").unwrap();
        let e = Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("JSON"), "{e}");

        let e = Gpt2Config::new(10, 8, 30, 1, 4)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("'n_head'"), "{e}");
        let e = Gpt2Config::new(0, 8, 32, 1, 4)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("'vocab_size'"), "{e}");
        // Refused before anything is built: the host suffices.
        assert!(Gpt2Model::new(Gpt2Config::new(10, 8, 32, 0, 4), Device::Cpu).is_err());
    }

    #[test]
    fn missing_files_and_tensors_are_named() {
        // Checks of the files and their tensors, done before any compute: on the host.
        let dir = tempfile::tempdir().unwrap();
        let e = Gpt2Model::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && e.contains("missing"), "{e}");

        fixtures::write_config(&fixture(), dir.path(), |_| {});
        let e = Gpt2Model::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("missing"),
            "{e}"
        );

        // One tensor left out.
        let all = io::load(fixture().join("model.safetensors"), Device::Cpu).unwrap();
        let kept: Vec<(&str, &Tensor)> = all
            .iter()
            .filter(|(n, _)| n != "transformer.h.1.ln_1.weight")
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        io::save(dir.path().join("model.safetensors"), &kept, None).unwrap();
        let e = Gpt2Model::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("missing tensor 'h.1.ln_1.weight'"),
            "{e}"
        );

        // A config that does not fit the tensors.
        std::fs::copy(
            fixture().join("model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("vocab_size".into(), json!(98));
        });
        let e = Gpt2Model::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("wte.weight"),
            "{e}"
        );

        // Fewer layers in the config than in the file.
        fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("n_layer".into(), json!(1));
        });
        let e = Gpt2Model::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.1.") && e.contains("not a parameter"), "{e}");

        // Extra buffers and a tied head are ignored.
        fixtures::write_config(&fixture(), dir.path(), |_| {});
        let mut with_extras: Vec<(String, Tensor)> = all
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        with_extras.push((
            "transformer.h.0.attn.bias".into(),
            Tensor::ones([1, 1, 64, 64], (Kind::Float, Device::Cpu)),
        ));
        with_extras.push((
            "lm_head.weight".into(),
            all.iter()
                .find(|(n, _)| n == "transformer.wte.weight")
                .unwrap()
                .1
                .shallow_clone(),
        ));
        let refs: Vec<(&str, &Tensor)> = with_extras.iter().map(|(n, t)| (n.as_str(), t)).collect();
        io::save(dir.path().join("model.safetensors"), &refs, None).unwrap();
        Gpt2Model::from_folder(dir.path(), Device::Cpu).unwrap();
    }
}
