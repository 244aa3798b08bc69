//! Multi-head scaled dot-product attention, self or cross, with padding and
//! causal masks:
//!
//! `Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V`, per head, where
//! `M` is 0 where a query may attend a key and the dtype's minimum elsewhere.
//! A key is hidden when the key-padding mask says 0, or (causal) when it is
//! later than the query. A query that may see no key at all gets a uniform
//! average instead of NaN.
//!
//! Self-attention reads keys from its input and the padding mask from
//! `ctx.attention_mask`; cross-attention reads both from `ctx.memory` and
//! `ctx.memory_mask`.

use tch::{Device, Kind, Tensor};

use super::{Linear, check_float};
use crate::error::{Error, Result, TchResultExt};
use crate::module::{Context, Module, Slot};

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub d_model: i64,
    pub num_heads: i64,
    /// Per-head width; `d_model / num_heads` unless set.
    pub head_dim: i64,
    pub causal: bool,
    /// Keys and values come from `ctx.memory`.
    pub cross: bool,
    /// Dropout on the attention probabilities, training only.
    pub dropout: f64,
    pub bias: bool,
}

impl AttentionConfig {
    pub fn new(d_model: i64, num_heads: i64) -> Self {
        Self {
            d_model,
            num_heads,
            head_dim: if num_heads > 0 {
                d_model / num_heads
            } else {
                0
            },
            causal: false,
            cross: false,
            dropout: 0.0,
            bias: true,
        }
    }

    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn cross(mut self, cross: bool) -> Self {
        self.cross = cross;
        self
    }

    pub fn validate(&self) -> Result<()> {
        if self.d_model <= 0 || self.num_heads <= 0 || self.head_dim <= 0 {
            return Err(Error::config(format!(
                "Attention: d_model, num_heads, head_dim must be positive, got {self:?}"
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!(
                "Attention: dropout {} not in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// Slot names of the four projections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionNames {
    pub query: String,
    pub key: String,
    pub value: String,
    pub output: String,
}

impl AttentionNames {
    /// BERT: `self.query`, `self.key`, `self.value`, `output.dense`.
    pub fn bert() -> Self {
        Self {
            query: "self.query".into(),
            key: "self.key".into(),
            value: "self.value".into(),
            output: "output.dense".into(),
        }
    }
    /// BART/LLaMA style: `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    pub fn proj() -> Self {
        Self {
            query: "q_proj".into(),
            key: "k_proj".into(),
            value: "v_proj".into(),
            output: "out_proj".into(),
        }
    }
}

#[derive(Debug, Module)]
#[module(kind = "Attention", forward = forward_impl)]
pub struct Attention {
    #[child(name_expr = "self.names.query.as_str()")]
    pub query: Slot,
    #[child(name_expr = "self.names.key.as_str()")]
    pub key: Slot,
    #[child(name_expr = "self.names.value.as_str()")]
    pub value: Slot,
    #[child(name_expr = "self.names.output.as_str()")]
    pub output: Slot,
    pub config: AttentionConfig,
    pub names: AttentionNames,
}

impl Attention {
    pub fn new(config: AttentionConfig, names: AttentionNames, device: Device) -> Result<Self> {
        config.validate()?;
        let (d, inner, b) = (
            config.d_model,
            config.num_heads * config.head_dim,
            config.bias,
        );
        Ok(Self {
            query: Box::new(Linear::new(d, inner, b, device)?),
            key: Box::new(Linear::new(d, inner, b, device)?),
            value: Box::new(Linear::new(d, inner, b, device)?),
            output: Box::new(Linear::new(inner, d, b, device)?),
            config,
            names,
        })
    }

    /// `[B, T, H*D] -> [B, H, T, D]`
    fn heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (h, d) = (self.config.num_heads, self.config.head_dim);
        let s = xs.size();
        if s.len() != 3 || s[2] != h * d {
            return Err(Error::shape(
                "Attention projection",
                format!("[batch, seq, {}]", h * d),
                s,
            ));
        }
        xs.f_view([s[0], s[1], h, d])
            .and_then(|t| t.f_transpose(1, 2))
            .op("Attention heads")
    }

    /// The additive mask `[B or 1, 1, Tq, Tk]`, or `None` when nothing is hidden.
    fn mask(
        &self,
        key_mask: Option<&Tensor>,
        b: i64,
        tq: i64,
        tk: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Option<Tensor>> {
        let mut allowed: Option<Tensor> = None;
        if let Some(m) = key_mask {
            if m.size() != [b, tk] {
                return Err(Error::shape(
                    "Attention mask",
                    format!("[{b}, {tk}]"),
                    m.size(),
                ));
            }
            let keep = m
                .f_ne(0)
                .op("Attention mask")?
                .f_view([b, 1, 1, tk])
                .op("Attention mask")?;
            allowed = Some(keep);
        }
        if self.config.causal {
            // Query i (of the last tq positions) sees keys j <= i + (tk - tq).
            let causal = Tensor::f_ones([tq, tk], (Kind::Bool, device))
                .and_then(|t| t.f_tril(tk - tq))
                .op("Attention causal mask")?;
            allowed = Some(match allowed {
                Some(a) => a.f_logical_and(&causal).op("Attention mask")?,
                None => causal.f_view([1, 1, tq, tk]).op("Attention mask")?,
            });
        }
        let Some(allowed) = allowed else {
            return Ok(None);
        };
        let min = hidden_key_bias(kind);
        let zeros = Tensor::f_zeros([1], (kind, device)).op("Attention mask")?;
        Ok(Some(
            zeros
                .f_masked_fill(&allowed.f_logical_not()?, min)
                .op("Attention mask")?,
        ))
    }
}

/// The additive bias that hides a key in attention scores of dtype `kind`:
/// the dtype's most negative finite value, so a query that sees no key at
/// all averages uniformly instead of producing NaN.
pub fn hidden_key_bias(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535e38,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

impl Attention {
    /// `xs: [batch, seq, d_model] -> [batch, seq, d_model]`.
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let s = xs.size();
        if s.len() != 3 || s[2] != self.config.d_model {
            return Err(Error::shape(
                "Attention",
                format!("[batch, seq, {}]", self.config.d_model),
                s,
            ));
        }
        check_float("Attention", xs)?;
        let (b, tq) = (s[0], s[1]);
        let (source, key_mask) = if self.config.cross {
            let mem = ctx
                .memory
                .as_ref()
                .ok_or_else(|| {
                    Error::config("cross-attention needs ctx.memory (the encoder states)")
                })?
                .shallow_clone();
            let ms = mem.size();
            if ms.len() != 3 || ms[0] != b || ms[2] != self.config.d_model {
                return Err(Error::shape(
                    "cross-attention memory",
                    format!("[{b}, seq, {}]", self.config.d_model),
                    ms,
                ));
            }
            (mem, ctx.memory_mask.as_ref().map(Tensor::shallow_clone))
        } else {
            (
                xs.shallow_clone(),
                ctx.attention_mask.as_ref().map(Tensor::shallow_clone),
            )
        };
        let tk = source.size()[1];
        let q = self.heads(&ctx.call(&self.names.query, self.query.as_ref(), xs)?)?;
        let k = self.heads(&ctx.call(&self.names.key, self.key.as_ref(), &source)?)?;
        let v = self.heads(&ctx.call(&self.names.value, self.value.as_ref(), &source)?)?;
        let mask = self.mask(key_mask.as_ref(), b, tq, tk, q.kind(), q.device())?;
        let p = if ctx.train { self.config.dropout } else { 0.0 };
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            p,
            false,
            None,
            false,
        )
        .op("scaled_dot_product_attention")?;
        let merged = out
            .f_transpose(1, 2)
            .and_then(|t| t.f_reshape([b, tq, self.config.num_heads * self.config.head_dim]))
            .op("Attention merge heads")?;
        ctx.call(&self.names.output, self.output.as_ref(), &merged)
    }
}
