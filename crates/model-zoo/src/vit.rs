//! # ViT: a Vision Transformer for image classification
//!
//! Dosovitskiy et al. (2021), *An Image is Worth 16x16 Words: Transformers for
//! Image Recognition at Scale*. An image `x: [C, H, W]` is cut into `N =
//! (H/p)(W/p)` non-overlapping `p x p` patches, each linearly embedded (a
//! convolution with kernel = stride = `p`), a learned class token is
//! prepended and learned positions are added; a pre-LN Transformer encoder
//! follows, and a linear classifier reads the class token:
//!
//! ```text
//! z_0   = [x_cls; x_1 E; ...; x_N E] + E_pos                 (+ dropout, training only)
//! z'_l  = z_{l-1} + MSA(LN_before(z_{l-1}))                  (pre-LN residual blocks)
//! z_l   = z'_l + MLP(LN_after(z'_l))
//! MSA   = softmax(Q K^T / sqrt(d_head)) V per head, W_o on the concatenation
//! MLP(u)= W_2 gelu(W_1 u + b_1) + b_2
//! y     = classifier(LN(z_L)[class token])                   (logits [B, num_labels])
//! ```
//!
//! **Names.** The module tree carries Hugging Face's ViT names:
//! `embeddings.cls_token`, `embeddings.position_embeddings`,
//! `embeddings.patch_embeddings.projection.{weight,bias}`,
//! `encoder.layer.N.{layernorm_before, attention.attention.{query,key,value},
//! attention.output.dense, layernorm_after, intermediate.dense, output.dense}`,
//! `layernorm`, `classifier`. `ViTForImageClassification` files store all but
//! `classifier.*` under `vit.`; loading strips that prefix (and ignores a
//! `pooler` or `mask_token`), [`VitModel::hf_state_dict`] adds it back. The
//! attention is `tensor-core`'s [`Attention`] and the MLP its [`FeedForward`]
//! under the label `(ffn)`, so `encoder.layer.N.(ffn)` addresses the MLP while
//! its weights are `encoder.layer.N.intermediate.dense.weight`.

use std::path::Path;

use serde_json::{Map, Value, json};
use tensor_core::layers::{
    Activation, Attention, AttentionConfig, AttentionNames, BlockNames, FeedForward, FfnNames,
    LayerNorm, Linear, PreNormBlock,
};
use tensor_core::module::{Context, Module, ModuleExt, Slot};
use tensor_core::tch::{Device, Kind, Reduction, Tensor};
use tensor_core::{Error as TensorError, Result as TensorResult, TchResultExt};

use crate::bert::dropout;
use crate::config::{Checks, JsonConfig};
use crate::loading::{self, Checkpoint, Layout};
use crate::{Error, Result};

/// The path that in-memory (not file-backed) configs report in errors.
const IN_MEMORY: &str = "(in-memory VitConfig)";

/// Hyper-parameters of a ViT classifier, as Hugging Face's `config.json` names them.
/// `Default` is ViT-Base/16 at 224 px with two labels; shrink it with struct
/// update syntax: `VitConfig { image_size: 8, patch_size: 2, ..Default::default() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Height and width of the (square) input images.
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub layer_norm_eps: f64,
    pub num_labels: i64,
    /// `gelu` (ViT), `gelu_new`, `relu`, `silu`.
    pub hidden_act: String,
    /// Dropout after the embeddings, attention output and MLP (training only).
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities (training only).
    pub attention_probs_dropout_prob: f64,
    /// Biases on the query/key/value projections.
    pub qkv_bias: bool,
    /// Standard deviation of the from-scratch initialisation.
    pub initializer_range: f64,
}

impl Default for VitConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            layer_norm_eps: 1e-12,
            num_labels: 2,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            qkv_bias: true,
            initializer_range: 0.02,
        }
    }
}

impl VitConfig {
    /// Read a Hugging Face ViT `config.json` (`model_type` must be `vit`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&JsonConfig::read(path)?)
    }

    /// Parse `config.json` text; `path` is only used in error messages.
    pub fn from_json_str(path: impl AsRef<Path>, text: &str) -> Result<Self> {
        Self::from_json(&JsonConfig::parse(path, text)?)
    }

    /// From a parsed `config.json`.
    pub fn from_json(j: &JsonConfig) -> Result<Self> {
        j.expect_model_type(&["vit"])?;
        let d = Self::default();
        let from_map = j.object_len("id2label")?;
        let num_labels = match (j.opt_i64("num_labels")?, from_map) {
            (Some(n), Some(m)) if n as usize != m => {
                return Err(Error::config(
                    &j.path,
                    "num_labels",
                    format!("{n} disagrees with the {m} entries of id2label"),
                ));
            }
            (Some(n), _) => n,
            (None, Some(m)) => m as i64,
            (None, None) => d.num_labels,
        };
        let c = Self {
            image_size: j.square_or("image_size", d.image_size)?,
            patch_size: j.square_or("patch_size", d.patch_size)?,
            num_channels: j.i64_or("num_channels", d.num_channels)?,
            hidden_size: j.i64("hidden_size")?,
            num_hidden_layers: j.i64("num_hidden_layers")?,
            num_attention_heads: j.i64("num_attention_heads")?,
            intermediate_size: j.i64("intermediate_size")?,
            layer_norm_eps: j.f64_or("layer_norm_eps", d.layer_norm_eps)?,
            num_labels,
            hidden_act: j.str_or("hidden_act", &d.hidden_act)?.to_owned(),
            hidden_dropout_prob: j.f64_or("hidden_dropout_prob", d.hidden_dropout_prob)?,
            attention_probs_dropout_prob: j.f64_or(
                "attention_probs_dropout_prob",
                d.attention_probs_dropout_prob,
            )?,
            qkv_bias: j.bool_or("qkv_bias", d.qkv_bias)?,
            initializer_range: j.f64_or("initializer_range", d.initializer_range)?,
        };
        c.validate_at(&j.path)?;
        Ok(c)
    }

    /// The config as a Hugging Face `config.json` object (`ViTForImageClassification`).
    pub fn to_json(&self) -> Value {
        let id2label: Map<String, Value> = (0..self.num_labels)
            .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
            .collect();
        let label2id: Map<String, Value> = (0..self.num_labels)
            .map(|i| (format!("LABEL_{i}"), json!(i)))
            .collect();
        json!({
            "architectures": ["ViTForImageClassification"],
            "model_type": "vit",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "qkv_bias": self.qkv_bias,
            "initializer_range": self.initializer_range,
            "encoder_stride": self.patch_size,
            "id2label": id2label,
            "label2id": label2id,
            "dtype": "float32",
        })
    }

    /// Patches per image, `(image_size / patch_size)^2`.
    pub fn num_patches(&self) -> i64 {
        if self.patch_size > 0 {
            (self.image_size / self.patch_size).pow(2)
        } else {
            0
        }
    }

    /// The MLP's non-linearity.
    pub fn activation(&self) -> Result<Activation> {
        Checks(Path::new(IN_MEMORY)).activation("hidden_act", &self.hidden_act)
    }

    /// Check sizes and probabilities; errors name the offending key.
    pub fn validate(&self) -> Result<()> {
        self.validate_at(Path::new(IN_MEMORY))
    }

    fn validate_at(&self, path: &Path) -> Result<()> {
        let check = Checks(path);
        check.positive(&[
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_labels", self.num_labels),
        ])?;
        check.divisible(
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        )?;
        check.divisible(
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )?;
        check.positive_float("layer_norm_eps", self.layer_norm_eps)?;
        check.probabilities(&[
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ])?;
        check.non_negative("initializer_range", self.initializer_range)?;
        check.activation("hidden_act", &self.hidden_act)?;
        Ok(())
    }
}

/// `N(0, std)` values clipped to `±2 std` (the truncated normal of ViT's init).
fn trunc_normal(shape: &[i64], std: f64, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_randn(shape, (Kind::Float, device))
        .and_then(|t| t.f_clamp(-2.0, 2.0))
        .and_then(|t| t.f_mul_scalar(std))
        .op("ViT init")?)
}

fn zeros(shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_zeros(shape, (Kind::Float, device)).op("ViT init")?)
}

fn linear(inp: i64, out: i64, bias: bool, std: f64, device: Device) -> Result<Linear> {
    let b = if bias {
        Some(zeros(&[out], device)?)
    } else {
        None
    };
    Ok(Linear::from_weights(
        trunc_normal(&[out, inp], std, device)?,
        b,
    )?)
}

/// 2-D convolution without padding: `weight [out, in, kh, kw]`, `bias [out]`,
/// the same `stride` both ways. ViT's patch embedding uses kernel = stride = patch.
#[derive(Debug, Module)]
#[module(kind = "Conv2d", forward = forward_impl)]
pub struct Conv2d {
    #[param]
    pub weight: Tensor,
    #[param]
    pub bias: Option<Tensor>,
    pub stride: i64,
}

impl Conv2d {
    /// From existing tensors (made trainable); shapes are checked.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, stride: i64) -> Result<Self> {
        let ws = weight.size();
        if ws.len() != 4 {
            return Err(TensorError::shape("Conv2d weight", "[out, in, kh, kw]", ws).into());
        }
        if let Some(b) = &bias
            && b.size() != [ws[0]]
        {
            return Err(TensorError::shape("Conv2d bias", format!("[{}]", ws[0]), b.size()).into());
        }
        if stride <= 0 {
            return Err(Error::invalid(format!(
                "Conv2d: stride must be positive, got {stride}"
            )));
        }
        Ok(Self {
            weight: weight.detach().set_requires_grad(true),
            bias: bias.map(|b| b.detach().set_requires_grad(true)),
            stride,
        })
    }
}

impl Conv2d {
    /// `[B, in, H, W] -> [B, out, (H - kh)/stride + 1, (W - kw)/stride + 1]`.
    fn forward_impl(&self, xs: &Tensor, _ctx: &mut Context) -> TensorResult<Tensor> {
        let (s, w) = (xs.size(), self.weight.size());
        if s.len() != 4 || s[1] != w[1] || s[2] < w[2] || s[3] < w[3] {
            return Err(TensorError::shape(
                "Conv2d",
                format!("[batch, {}, >= {}, >= {}]", w[1], w[2], w[3]),
                s,
            ));
        }
        xs.f_conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [0, 0],
            [1, 1],
            1,
        )
        .op("Conv2d")
    }
}

/// Images `[B, C, S, S]` to patch embeddings `[B, N, d]` through `projection`
/// (a [`Conv2d`] with kernel = stride = patch size).
#[derive(Debug, Module)]
#[module(kind = "VitPatchEmbeddings", forward = forward_impl)]
pub struct VitPatchEmbeddings {
    #[child]
    pub projection: Slot,
    pub image_size: i64,
    pub num_channels: i64,
    pub hidden_size: i64,
}

impl VitPatchEmbeddings {
    fn forward_impl(&self, images: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let s = images.size();
        let (c, n) = (self.num_channels, self.image_size);
        if s.len() != 4 || s[0] < 1 || s[1] != c || s[2] != n || s[3] != n {
            return Err(TensorError::shape(
                "ViT images",
                format!("[batch, {c}, {n}, {n}] (num_channels, image_size, image_size)"),
                s,
            ));
        }
        if !matches!(
            images.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(TensorError::DType {
                op: "ViT images".into(),
                expected: "a floating-point tensor".into(),
                actual: images.kind(),
            });
        }
        let p = ctx.call("projection", self.projection.as_ref(), images)?;
        let ps = p.size();
        if ps.len() != 4 || ps[1] != self.hidden_size {
            return Err(TensorError::shape(
                "ViT projection output",
                format!("[batch, {}, h, w]", self.hidden_size),
                ps,
            ));
        }
        p.f_flatten(2, 3)
            .and_then(|t| t.f_transpose(1, 2))
            .op("ViT patches")
    }
}

/// `[cls; patches] + positions`: `cls_token [1, 1, d]`,
/// `position_embeddings [1, N + 1, d]`, then dropout (training only).
#[derive(Debug, Module)]
#[module(kind = "VitEmbeddings", forward = forward_impl)]
pub struct VitEmbeddings {
    #[param]
    pub cls_token: Tensor,
    #[param]
    pub position_embeddings: Tensor,
    #[child]
    pub patch_embeddings: Slot,
    pub dropout: f64,
}

impl VitEmbeddings {
    fn forward_impl(&self, images: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let patches = ctx.call("patch_embeddings", self.patch_embeddings.as_ref(), images)?;
        let (ps, pos) = (patches.size(), self.position_embeddings.size());
        if ps.len() != 3 || pos.len() != 3 || ps[1] + 1 != pos[1] || ps[2] != pos[2] {
            return Err(TensorError::shape(
                "ViT patch embeddings",
                format!(
                    "[batch, {}, {}] to fit position_embeddings {pos:?}",
                    pos[1] - 1,
                    pos[2]
                ),
                ps,
            ));
        }
        let op = "ViT embeddings";
        let cls = self
            .cls_token
            .f_expand([ps[0], 1, ps[2]], false)
            .and_then(|c| c.f_to_kind(patches.kind()))
            .op(op)?;
        let z = Tensor::f_cat(&[cls, patches], 1)
            .and_then(|z| z.f_add(&self.position_embeddings))
            .op(op)?;
        dropout(z, self.dropout, ctx.train, "ViT embeddings dropout")
    }
}

/// Attention projection names inside a ViT layer's `attention` slot:
/// `attention.{query,key,value}` and `output.dense`.
pub fn vit_attention_names() -> AttentionNames {
    AttentionNames {
        query: "attention.query".into(),
        key: "attention.key".into(),
        value: "attention.value".into(),
        output: "output.dense".into(),
    }
}

/// One pre-LN encoder layer, `tensor-core`'s [`PreNormBlock`] with ViT's
/// names (kind `VitLayer`):
/// `z' = z + drop(attention(layernorm_before(z)))`, `z' + ffn(layernorm_after(z'))`.
/// The attention is an [`Attention`] with [`vit_attention_names`]; the FFN
/// a [`FeedForward`] with [`FfnNames::bert`] (`intermediate.dense`,
/// `output.dense`) under the label `(ffn)`, the block's `mlp` slot.
pub fn vit_layer(config: &VitConfig, device: Device) -> Result<PreNormBlock> {
    let (d, std) = (config.hidden_size, config.initializer_range);
    let mut acfg = AttentionConfig::new(d, config.num_attention_heads);
    acfg.dropout = config.attention_probs_dropout_prob;
    acfg.bias = config.qkv_bias;
    let mut attention = Attention::new(acfg, vit_attention_names(), device)?;
    attention.query = Box::new(linear(d, d, config.qkv_bias, std, device)?);
    attention.key = Box::new(linear(d, d, config.qkv_bias, std, device)?);
    attention.value = Box::new(linear(d, d, config.qkv_bias, std, device)?);
    attention.output = Box::new(linear(d, d, true, std, device)?);
    let i = config.intermediate_size;
    let mut ffn = FeedForward::from_weights(
        trunc_normal(&[i, d], std, device)?,
        Some(zeros(&[i], device)?),
        None,
        trunc_normal(&[d, i], std, device)?,
        Some(zeros(&[d], device)?),
        config.activation()?,
        FfnNames::bert(),
    )?;
    ffn.dropout = config.hidden_dropout_prob;
    let eps = config.layer_norm_eps;
    Ok(PreNormBlock::new(
        BlockNames::vit(),
        Box::new(LayerNorm::new(d, eps, true, device)?),
        Box::new(attention),
        Box::new(LayerNorm::new(d, eps, true, device)?),
        Box::new(ffn),
    )
    .with_dropout(config.hidden_dropout_prob))
}

/// A ViT image classifier: `embeddings`, `encoder.layer.0 ..`, `layernorm`,
/// `classifier` on the class token.
///
/// As a [`Module`], `forward` maps images `[B, C, S, S]` (float) to logits
/// `[B, num_labels]`. ViT has no padding: `ctx.attention_mask` is set aside
/// during the call (and restored), so a mask meant for another model cannot
/// reach the attention layers.
#[derive(Debug, Module)]
#[module(kind = "VitModel", forward = forward_impl)]
pub struct VitModel {
    config: VitConfig,
    #[child]
    embeddings: Slot,
    #[children(names = "layer_names")]
    layers: Vec<Slot>,
    layer_names: Vec<String>,
    #[child]
    layernorm: Slot,
    #[child]
    classifier: Slot,
}

impl VitModel {
    /// A freshly initialised model (truncated-normal weights with std
    /// `initializer_range`, zero biases, LayerNorms at 1 and 0).
    pub fn new(config: VitConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let (d, std) = (config.hidden_size, config.initializer_range);
        let (p, c) = (config.patch_size, config.num_channels);
        let projection = Conv2d::from_weights(
            trunc_normal(&[d, c, p, p], std, device)?,
            Some(zeros(&[d], device)?),
            p,
        )?;
        let embeddings = VitEmbeddings {
            cls_token: trunc_normal(&[1, 1, d], std, device)?.set_requires_grad(true),
            position_embeddings: trunc_normal(&[1, config.num_patches() + 1, d], std, device)?
                .set_requires_grad(true),
            patch_embeddings: Box::new(VitPatchEmbeddings {
                projection: Box::new(projection),
                image_size: config.image_size,
                num_channels: c,
                hidden_size: d,
            }),
            dropout: config.hidden_dropout_prob,
        };
        let mut layers = Vec::new();
        for _ in 0..config.num_hidden_layers {
            layers.push(Box::new(vit_layer(&config, device)?) as Slot);
        }
        let layer_names = (0..config.num_hidden_layers)
            .map(|i| format!("encoder.layer.{i}"))
            .collect();
        let layernorm = LayerNorm::new(d, config.layer_norm_eps, true, device)?;
        let classifier = linear(d, config.num_labels, true, std, device)?;
        Ok(Self {
            config,
            embeddings: Box::new(embeddings),
            layers,
            layer_names,
            layernorm: Box::new(layernorm),
            classifier: Box::new(classifier),
        })
    }

    /// Load a Hugging Face ViT folder: `config.json` and `model.safetensors`
    /// (`ViTForImageClassification` keys). Errors name the file and the key.
    pub fn from_folder(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        loading::expect_folder(dir, "ViT")?;
        let config = VitConfig::from_file(dir.join("config.json"))?;
        let mut model = Self::new(config, device)?;
        model.load_safetensors(dir.join("model.safetensors"))?;
        Ok(model)
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        loading::device_of(self)
    }

    /// Copy a ViT checkpoint's tensors into this model. Every parameter must
    /// be present with this config's shape; keys may carry `vit.`; `pooler.*`
    /// and `embeddings.mask_token` are ignored, any other unknown key is an error.
    pub fn load_safetensors(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let file = loading::open_weights(path.as_ref(), "ViT")?;
        let c = &self.config;
        let about = Checkpoint {
            model: "ViT",
            config: format!(
                "num_hidden_layers {}, image_size {}, patch_size {}, num_channels {}, \
                 hidden_size {}, intermediate_size {}, num_labels {}",
                c.num_hidden_layers,
                c.image_size,
                c.patch_size,
                c.num_channels,
                c.hidden_size,
                c.intermediate_size,
                c.num_labels
            ),
            prefix: "vit.",
        };
        let key_to_name = |key: &str| {
            let name = loading::strip_optional_prefix(key, "vit.");
            let ignored = name.starts_with("pooler.") || name == "embeddings.mask_token";
            (!ignored).then(|| name.to_owned())
        };
        loading::load_checkpoint(self, &file, &about, key_to_name, |_| Layout::AsIs)
    }

    /// The parameters under `ViTForImageClassification`'s keys (`vit.` before
    /// all but `classifier.*`), detached.
    pub fn hf_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_parameters()
            .into_iter()
            .map(|(n, t)| {
                let t = t.f_detach().op(&n)?;
                let key = if n.starts_with("classifier.") {
                    n
                } else {
                    format!("vit.{n}")
                };
                Ok((key, t))
            })
            .collect()
    }

    /// Write `config.json` and `model.safetensors` (`ViTForImageClassification`
    /// layout) into `dir`, which is created if needed.
    pub fn save_folder(&self, dir: impl AsRef<Path>) -> Result<()> {
        let tensors = self.hf_state_dict()?;
        loading::save_folder(dir.as_ref(), &self.config.to_json(), &tensors)
    }

    /// The model's parts in forward order, `(embeddings, layers, layernorm,
    /// classifier)`, for composing them with other modules (m2mKD's stages
    /// take the embeddings, the layers, and a head of the final LayerNorm
    /// and the classifier on the class token).
    pub fn into_parts(self) -> (Slot, Vec<Slot>, Slot, Slot) {
        (
            self.embeddings,
            self.layers,
            self.layernorm,
            self.classifier,
        )
    }

    /// Encoder output after the final `layernorm`: `[B, N + 1, hidden]`
    /// (position 0 is the class token).
    pub fn hidden_states(&self, images: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        Ok(self.encode(images, ctx)?)
    }

    /// `images [B, C, S, S] -> logits [B, num_labels]`.
    pub fn logits(&self, images: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        Ok(ctx.call("", self, images)?)
    }

    /// Mean cross-entropy of the logits against `labels [B]` (i64 in `0..num_labels`).
    pub fn loss(&self, images: &Tensor, labels: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let b = images.size().first().copied().unwrap_or(0);
        if labels.size() != [b] || !matches!(labels.kind(), Kind::Int64 | Kind::Int) {
            return Err(TensorError::shape(
                "ViT loss labels",
                format!("[{b}] int64 class ids"),
                labels.size(),
            )
            .into());
        }
        let op = "ViT loss labels";
        let lo = labels.f_min().and_then(|m| m.f_int64_value(&[])).op(op)?;
        let hi = labels.f_max().and_then(|m| m.f_int64_value(&[])).op(op)?;
        if lo < 0 || hi >= self.config.num_labels {
            return Err(Error::invalid(format!(
                "ViT loss: labels must be in 0..{} (num_labels), got values in {lo}..={hi}",
                self.config.num_labels
            )));
        }
        let logits = self.logits(images, ctx)?;
        let labels = labels.f_to_kind(Kind::Int64).op("ViT loss")?;
        Ok(logits
            .f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0)
            .op("ViT loss")?)
    }

    fn encode(&self, images: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let saved = ctx.attention_mask.take();
        let r = self.encode_inner(images, ctx);
        ctx.attention_mask = saved;
        r
    }

    fn encode_inner(&self, images: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let mut h = ctx.call("embeddings", self.embeddings.as_ref(), images)?;
        for (name, layer) in self.layer_names.iter().zip(&self.layers) {
            h = ctx.call(name, layer.as_ref(), &h)?;
        }
        ctx.call("layernorm", self.layernorm.as_ref(), &h)
    }
}

impl VitModel {
    /// `images [B, C, S, S] -> logits [B, num_labels]` from the class token.
    fn forward_impl(&self, images: &Tensor, ctx: &mut Context) -> TensorResult<Tensor> {
        let h = self.encode(images, ctx)?;
        let cls = h.f_select(1, 0).op("ViT class token")?;
        ctx.call("classifier", self.classifier.as_ref(), &cls)
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
    use tensor_core::testing::{closeness, device, randn_seeded, slack, with_seed};

    fn fixture() -> PathBuf {
        fixtures::folder("tiny-vit")
    }

    /// The fixture model on the test device.
    fn load() -> VitModel {
        VitModel::from_folder(fixture(), device()).unwrap()
    }

    /// A seeded model initialised on the CPU, so that the seed gives the same
    /// weights on every device, then moved to the test device.
    fn seeded(seed: u64, config: VitConfig) -> VitModel {
        let mut model = with_seed(seed, || VitModel::new(config, Device::Cpu)).unwrap();
        model.to_device(device()).unwrap();
        model
    }

    #[test]
    fn parity_with_transformers() {
        let model = load();
        let e = fixtures::expected(&fixture());
        let px = e["pixel_values"].to_device(device());
        let (logits, hidden) = no_grad(|| {
            (
                model.logits(&px, &mut Context::eval()).unwrap(),
                model.hidden_states(&px, &mut Context::eval()).unwrap(),
            )
        });
        assert_eq!(logits.size(), [2, 5]);
        let atol = 1e-4 * slack();
        let c = closeness(&logits, &e["logits"], atol, 0.0).unwrap();
        println!("vit logits max abs err: {:e}", c.max_abs);
        assert!(c.ok, "{c:?}");
        let c = closeness(&hidden, &e["hidden"], atol, 0.0).unwrap();
        println!("vit hidden max abs err: {:e}", c.max_abs);
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn parameter_names_equal_hf_keys() {
        let mut model = load();
        let report = tensor_core::contract::check_contract(&mut model).unwrap();
        assert!(report.parameters > 0, "{report:?}");
        let file = SafetensorsFile::open(fixture().join("model.safetensors")).unwrap();
        let mut keys = file.names();
        keys.sort();
        let mut ours: Vec<String> = model
            .hf_state_dict()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        ours.sort();
        assert_eq!(ours, keys);
        let names: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for n in [
            "embeddings.cls_token",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias",
            "encoder.layer.0.layernorm_before.weight",
            "encoder.layer.0.attention.attention.query.weight",
            "encoder.layer.0.attention.attention.key.bias",
            "encoder.layer.0.attention.attention.value.weight",
            "encoder.layer.0.attention.output.dense.weight",
            "encoder.layer.1.layernorm_after.bias",
            "encoder.layer.1.intermediate.dense.weight",
            "encoder.layer.1.output.dense.bias",
            "layernorm.weight",
            "classifier.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
        assert!(is::<Attention>(
            model.get("encoder.layer.0.attention").unwrap()
        ));
        assert!(is::<Linear>(
            model
                .get("encoder.layer.1.attention.attention.query")
                .unwrap()
        ));
        assert!(is::<Linear>(
            model.get("encoder.layer.1.output.dense").unwrap()
        ));
        let ffn = model
            .get_as::<FeedForward>("encoder.layer.1.(ffn)")
            .unwrap();
        assert_eq!(ffn.w1().unwrap().size(), [64, 32]);
        assert!(is::<Conv2d>(
            model.get("embeddings.patch_embeddings.projection").unwrap()
        ));
    }

    #[test]
    fn save_and_reload_round_trip() {
        let model = load();
        let dir = tempfile::tempdir().unwrap();
        model.save_folder(dir.path()).unwrap();
        let again = VitModel::from_folder(dir.path(), device()).unwrap();
        assert_eq!(again.config(), model.config());
        assert_eq!(again.device(), device());
        // The files compared on the host.
        let original = SafetensorsFile::open(fixture().join("model.safetensors")).unwrap();
        let saved = SafetensorsFile::open(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(saved.names(), original.names());
        for k in original.names() {
            let (a, b) = (
                saved.load(&k, Device::Cpu).unwrap(),
                original.load(&k, Device::Cpu).unwrap(),
            );
            assert!(a.equal(&b), "{k}");
        }
    }

    #[test]
    fn shape_errors_are_clear() {
        let model = load();
        let mut ctx = Context::eval();
        let cases: [(&[i64], &str); 4] = [
            (&[2, 1, 16, 16], "[batch, 3, 16, 16]"),
            (&[2, 3, 8, 8], "[batch, 3, 16, 16]"),
            (&[3, 16, 16], "[batch, 3, 16, 16]"),
            (&[0, 3, 16, 16], "[batch, 3, 16, 16]"),
        ];
        for (shape, want) in cases {
            let x = Tensor::zeros(shape, (Kind::Float, device()));
            let e = model.logits(&x, &mut ctx).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("ViT images"),
                "{shape:?}: {e}"
            );
            assert!(
                e.contains("embeddings.patch_embeddings"),
                "error names the module: {e}"
            );
        }
        let ints = Tensor::zeros([1, 3, 16, 16], (Kind::Int64, device()));
        assert!(model.logits(&ints, &mut ctx).is_err());
        // A stale text mask in the context does not reach ViT's attention.
        let mut masked = Context::eval().with_mask(Tensor::ones([2, 7], (Kind::Int64, device())));
        let x = fixtures::expected(&fixture())["pixel_values"].to_device(device());
        let y = no_grad(|| model.logits(&x, &mut masked)).unwrap();
        assert_eq!(y.size(), [2, 5]);
        assert!(masked.attention_mask.is_some());
        // An out-of-range label must be caught before it reaches the device
        // (on CUDA it would be a device-side assert in the loss).
        let labels = Tensor::from_slice(&[0i64, 5]).to_device(device());
        assert!(model.loss(&x, &labels, &mut ctx).is_err());
        let labels = Tensor::from_slice(&[0i64, 1, 2]).to_device(device());
        assert!(model.loss(&x, &labels, &mut ctx).is_err());
    }

    #[test]
    fn config_parsing_and_validation() {
        // Checks of config.json and the weights file, before any compute: on the host.
        let c = VitConfig::from_file(fixture().join("config.json")).unwrap();
        assert_eq!(
            (
                c.image_size,
                c.patch_size,
                c.num_channels,
                c.hidden_size,
                c.num_labels
            ),
            (16, 4, 3, 32, 5)
        );
        assert_eq!(c.num_patches(), 16);
        let dir = tempfile::tempdir().unwrap();
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("patch_size".into(), json!(5));
        });
        let e = VitConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("'patch_size'") && e.contains("divisible"),
            "{e}"
        );
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("model_type".into(), json!("gpt2"));
        });
        let e = VitConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("'model_type'") && e.contains("unknown architecture"),
            "{e}"
        );
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("num_attention_heads".into(), json!(3));
        });
        let e = VitConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("'num_attention_heads'"), "{e}");
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("image_size".into(), json!([16, 16]));
            m.insert("num_labels".into(), json!(5));
        });
        assert_eq!(VitConfig::from_file(&p).unwrap().image_size, 16);
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("num_labels".into(), json!(4));
        });
        let e = VitConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("'num_labels'") && e.contains("id2label"), "{e}");
        let p = fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("hidden_act".into(), json!("wiggle"));
        });
        let e = VitConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("'hidden_act'"), "{e}");
        let e = VitConfig::from_file(dir.path().join("nope.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.json") && e.contains("missing"), "{e}");
        let bad = VitConfig {
            image_size: 10,
            patch_size: 4,
            ..VitConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("'patch_size'")
        );
        assert!(VitModel::new(bad, Device::Cpu).is_err());

        // Missing tensor and mismatched shapes name the file and key.
        fixtures::write_config(&fixture(), dir.path(), |_| {});
        let all = io::load(fixture().join("model.safetensors"), Device::Cpu).unwrap();
        let kept: Vec<(&str, &Tensor)> = all
            .iter()
            .filter(|(n, _)| n != "classifier.bias")
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        io::save(dir.path().join("model.safetensors"), &kept, None).unwrap();
        let e = VitModel::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("'classifier.bias'"),
            "{e}"
        );
        std::fs::copy(
            fixture().join("model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        fixtures::write_config(&fixture(), dir.path(), |m| {
            m.insert("patch_size".into(), json!(8));
        });
        let e = VitModel::from_folder(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("projection.weight"),
            "{e}"
        );
    }

    /// SGD with momentum under `no_grad`.
    fn sgd(params: &[(String, Tensor)], velocity: &mut [Tensor], lr: f64, momentum: f64) {
        no_grad(|| {
            for ((_, p), v) in params.iter().zip(velocity.iter_mut()) {
                let mut p = p.shallow_clone();
                let g = p.grad();
                if g.defined() {
                    *v = &*v * momentum + &g;
                    let _ = p.f_sub_(&(&*v * lr)).unwrap();
                }
                p.zero_grad();
            }
        });
    }

    #[test]
    fn training_on_a_separable_synthetic_task_lowers_the_loss() {
        let config = VitConfig {
            image_size: 8,
            patch_size: 4,
            num_channels: 2,
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 32,
            num_labels: 2,
            // A wider init than ViT-Base's 0.02 gets a tiny model off the
            // plateau of plain SGD quickly.
            initializer_range: 0.2,
            ..VitConfig::default()
        };
        let model = seeded(3, config);
        let dev = device();
        // Class 1 images are brighter in the left half, class 0 in the right half.
        let x = randn_seeded(&[64, 2, 8, 8], 5, dev).unwrap() * 0.5;
        let labels = Tensor::arange(64, (Kind::Int64, dev)).remainder(2);
        let sign = (labels.to_kind(Kind::Float) * 2.0 - 1.0).view([64, 1, 1, 1]);
        let left = Tensor::cat(
            &[
                Tensor::ones([1, 1, 8, 4], (Kind::Float, dev)),
                -Tensor::ones([1, 1, 8, 4], (Kind::Float, dev)),
            ],
            3,
        );
        let x = x + sign * left;
        // AdamW: SGD with momentum stalls for some initialisations.
        let mut opt = tensor_core::train::AdamW::new(
            model.trainable_parameters(),
            tensor_core::train::AdamWConfig::new(1e-2),
        )
        .unwrap();
        let mut losses = Vec::new();
        for _ in 0..30 {
            let loss = model.loss(&x, &labels, &mut Context::train()).unwrap();
            losses.push(loss.double_value(&[]));
            loss.backward();
            opt.step().unwrap();
            opt.zero_grad().unwrap();
        }
        println!("vit synthetic: loss {:.3} -> {:.3}", losses[0], losses[29]);
        assert!(losses[29] < 0.3 * losses[0], "{losses:?}");
    }

    #[test]
    fn training_from_scratch_on_real_digits() {
        let train = crate::data::digits("train").unwrap();
        let test = crate::data::digits("test").unwrap();
        // Loaded on the host, trained on the test device.
        let dev = device();
        let (x, y, tx, ty) = (
            train.images.to_device(dev),
            train.labels.to_device(dev),
            test.images.to_device(dev),
            test.labels.to_device(dev),
        );
        let config = VitConfig {
            image_size: 8,
            patch_size: 2,
            num_channels: 1,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            num_labels: 10,
            initializer_range: 0.2,
            ..VitConfig::default()
        };
        // Pixels 0..1, standardised with the train set's rough mean and spread.
        let (x, tx) = ((&x - 0.3) / 0.4, (&tx - 0.3) / 0.4);
        let model = seeded(11, config);
        let params = model.trainable_parameters();
        let mut velocity: Vec<Tensor> = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let n = x.size()[0];
        let batch = 64;
        let mut losses = Vec::new();
        let start = std::time::Instant::now();
        for epoch in 0..6 {
            // Drawn on the CPU: the same batches on every device.
            let order = with_seed(100 + epoch, || {
                Tensor::randperm(n, (Kind::Int64, Device::Cpu))
            })
            .to_device(dev);
            for i in 0..n / batch {
                let idx = order.narrow(0, i * batch, batch);
                let (bx, by) = (x.index_select(0, &idx), y.index_select(0, &idx));
                let loss = model.loss(&bx, &by, &mut Context::train()).unwrap();
                losses.push(loss.double_value(&[]));
                loss.backward();
                sgd(&params, &mut velocity, 0.02, 0.9);
            }
        }
        let logits = no_grad(|| model.logits(&tx, &mut Context::eval())).unwrap();
        let acc = logits
            .argmax(-1, false)
            .eq_tensor(&ty)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let k = 10;
        let head: f64 = losses[..k].iter().sum::<f64>() / k as f64;
        let tail: f64 = losses[losses.len() - k..].iter().sum::<f64>() / k as f64;
        println!(
            "vit digits: {} steps in {:.2?}, loss {head:.3} -> {tail:.3}, test accuracy {acc:.3}",
            losses.len(),
            start.elapsed()
        );
        assert!(tail < 0.5 * head, "loss did not fall: {head} -> {tail}");
        assert!(acc > 0.8, "test accuracy {acc}");
    }
}
