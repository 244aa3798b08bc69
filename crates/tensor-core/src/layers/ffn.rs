//! Position-wise feed-forward network.
//!
//! Plain: `FFN(x) = W2 act(W1 x + b1) + b2`. Gated (SwiGLU, GeGLU):
//! `FFN(x) = W2 (act(W_g x) ⊙ (W1 x + b1)) + b2`. `W1: [d_ff, d_model]`
//! (its rows are the "keys" that expert splits cluster), `W2: [d_model, d_ff]`
//! (its columns the "values"). The three projections sit in slots named as
//! the checkpoint names them ([`FfnNames`]), so LoRA can wrap them and
//! an expert split can read them.

use std::str::FromStr;

use tch::{Device, Tensor};

use super::{Linear, check_last_dim};
use crate::error::{Error, Result, TchResultExt};
use crate::module::{Context, Module, Slot, downcast_mut, downcast_ref};

/// Element-wise non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x Φ(x)` with the exact normal CDF (BERT's `gelu`).
    Gelu,
    /// The tanh approximation (GPT-2's `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    /// `x σ(x)` (a.k.a. swish); the gate of SwiGLU.
    Silu,
}

impl Activation {
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => xs.f_gelu("none"),
            Activation::GeluTanh => xs.f_gelu("tanh"),
            Activation::Relu => xs.f_relu(),
            Activation::Silu => xs.f_silu(),
        }
        .op("activation")
    }
}

impl FromStr for Activation {
    type Err = Error;
    /// Hugging Face `hidden_act` / `activation_function` values.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::config(format!(
                "unknown activation '{other}' (known: gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
            ))),
        }
    }
}

/// Slot names of the projections, relative to the FFN's own path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfnNames {
    pub up: String,
    pub gate: Option<String>,
    pub down: String,
}

impl FfnNames {
    /// BERT: `intermediate.dense`, `output.dense`.
    pub fn bert() -> Self {
        Self {
            up: "intermediate.dense".into(),
            gate: None,
            down: "output.dense".into(),
        }
    }
    /// GPT-2: `c_fc`, `c_proj`.
    pub fn gpt2() -> Self {
        Self {
            up: "c_fc".into(),
            gate: None,
            down: "c_proj".into(),
        }
    }
    /// LLaMA-style SwiGLU: `up_proj`, `gate_proj`, `down_proj`.
    pub fn llama() -> Self {
        Self {
            up: "up_proj".into(),
            gate: Some("gate_proj".into()),
            down: "down_proj".into(),
        }
    }
}

/// Which projection of a [`FeedForward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnPart {
    /// `W1, b1`
    Up,
    /// `W_g` (gated FFNs only)
    Gate,
    /// `W2, b2`
    Down,
}

#[derive(Debug, Module)]
#[module(kind = "FeedForward", forward = forward_impl)]
pub struct FeedForward {
    #[child(name_expr = "self.names.up.as_str()")]
    pub up: Slot,
    #[child(name_expr = "self.names.gate.as_deref().unwrap_or(\"gate\")")]
    pub gate: Option<Slot>,
    #[child(name_expr = "self.names.down.as_str()")]
    pub down: Slot,
    pub activation: Activation,
    pub names: FfnNames,
    /// Dropout on the output, in training only.
    pub dropout: f64,
}

impl FeedForward {
    /// A freshly initialised plain FFN `d_model -> d_ff -> d_model`.
    pub fn new(
        d_model: i64,
        d_ff: i64,
        activation: Activation,
        names: FfnNames,
        device: Device,
    ) -> Result<Self> {
        if names.gate.is_some() {
            return Err(Error::config(
                "FeedForward::new builds a plain FFN; use FeedForward::gated for SwiGLU",
            ));
        }
        Ok(Self {
            up: Box::new(Linear::new(d_model, d_ff, true, device)?),
            gate: None,
            down: Box::new(Linear::new(d_ff, d_model, true, device)?),
            activation,
            names,
            dropout: 0.0,
        })
    }

    /// A freshly initialised gated FFN (SwiGLU with `Activation::Silu`), without biases as in LLaMA.
    pub fn gated(
        d_model: i64,
        d_ff: i64,
        activation: Activation,
        names: FfnNames,
        device: Device,
    ) -> Result<Self> {
        if names.gate.is_none() {
            return Err(Error::config(
                "FeedForward::gated needs FfnNames with a gate name",
            ));
        }
        Ok(Self {
            up: Box::new(Linear::new(d_model, d_ff, false, device)?),
            gate: Some(Box::new(Linear::new(d_model, d_ff, false, device)?)),
            down: Box::new(Linear::new(d_ff, d_model, false, device)?),
            activation,
            names,
            dropout: 0.0,
        })
    }

    /// From explicit weights: `w1: [d_ff, d_model]`, `w2: [d_model, d_ff]`, optional gate `[d_ff, d_model]`.
    pub fn from_weights(
        w1: Tensor,
        b1: Option<Tensor>,
        gate: Option<Tensor>,
        w2: Tensor,
        b2: Option<Tensor>,
        activation: Activation,
        names: FfnNames,
    ) -> Result<Self> {
        let (s1, s2) = (w1.size(), w2.size());
        if s1.len() != 2 || s2.len() != 2 || s1[0] != s2[1] || s1[1] != s2[0] {
            return Err(Error::shape(
                "FeedForward::from_weights w2",
                format!(
                    "[d_model, d_ff] = {:?} for w1 {:?}",
                    s1.iter().rev().collect::<Vec<_>>(),
                    s1
                ),
                s2,
            ));
        }
        if gate.is_some() != names.gate.is_some() {
            return Err(Error::config(
                "FeedForward::from_weights: a gate weight needs a gate name and vice versa",
            ));
        }
        let gate = match gate {
            Some(g) => {
                if g.size() != s1 {
                    return Err(Error::shape(
                        "FeedForward::from_weights gate",
                        format!("{s1:?}"),
                        g.size(),
                    ));
                }
                Some(Box::new(Linear::from_weights(g, None)?) as Slot)
            }
            None => None,
        };
        Ok(Self {
            up: Box::new(Linear::from_weights(w1, b1)?),
            gate,
            down: Box::new(Linear::from_weights(w2, b2)?),
            activation,
            names,
            dropout: 0.0,
        })
    }

    fn slot(&self, part: FfnPart) -> Option<&Slot> {
        match part {
            FfnPart::Up => Some(&self.up),
            FfnPart::Gate => self.gate.as_ref(),
            FfnPart::Down => Some(&self.down),
        }
    }

    /// The projection as a plain `Linear` (an error if it is absent or wrapped).
    pub fn linear(&self, part: FfnPart) -> Result<&Linear> {
        let slot = self.slot(part).ok_or_else(|| {
            Error::module("FeedForward", format!("{part:?}: this FFN has no gate"))
        })?;
        downcast_ref::<Linear>(slot.as_ref()).ok_or_else(|| {
            Error::module(
                "FeedForward",
                format!(
                    "{part:?} holds a {}, not a plain Linear (unwrap or merge it first)",
                    slot.kind()
                ),
            )
        })
    }

    pub fn linear_mut(&mut self, part: FfnPart) -> Result<&mut Linear> {
        let slot = match part {
            FfnPart::Up => Some(&mut self.up),
            FfnPart::Gate => self.gate.as_mut(),
            FfnPart::Down => Some(&mut self.down),
        }
        .ok_or_else(|| Error::module("FeedForward", format!("{part:?}: this FFN has no gate")))?;
        let kind = slot.kind();
        downcast_mut::<Linear>(slot.as_mut()).ok_or_else(|| {
            Error::module(
                "FeedForward",
                format!("{part:?} holds a {kind}, not a plain Linear (unwrap or merge it first)"),
            )
        })
    }

    /// `W1: [d_ff, d_model]`
    pub fn w1(&self) -> Result<&Tensor> {
        Ok(&self.linear(FfnPart::Up)?.weight)
    }
    pub fn b1(&self) -> Result<Option<&Tensor>> {
        Ok(self.linear(FfnPart::Up)?.bias.as_ref())
    }
    /// `W2: [d_model, d_ff]`
    pub fn w2(&self) -> Result<&Tensor> {
        Ok(&self.linear(FfnPart::Down)?.weight)
    }
    pub fn b2(&self) -> Result<Option<&Tensor>> {
        Ok(self.linear(FfnPart::Down)?.bias.as_ref())
    }
    /// `W_g: [d_ff, d_model]` of a gated FFN.
    pub fn gate_weight(&self) -> Result<&Tensor> {
        Ok(&self.linear(FfnPart::Gate)?.weight)
    }
    /// `b_g: [d_ff]` of a gated FFN whose gate projection has a bias
    /// (Llama's `mlp_bias`); the formula above then reads `act(W_g x + b_g)`.
    pub fn gate_bias(&self) -> Result<Option<&Tensor>> {
        Ok(self.linear(FfnPart::Gate)?.bias.as_ref())
    }

    pub fn d_model(&self) -> Result<i64> {
        Ok(self.w1()?.size()[1])
    }

    pub fn d_ff(&self) -> Result<i64> {
        Ok(self.w1()?.size()[0])
    }

    /// The hidden activation `act(W1 x + b1)` (gated: `act(W_g x) ⊙ (W1 x + b1)`),
    /// offered to the context's sink as `act`.
    pub fn hidden(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        if let Ok(d) = self.d_model() {
            check_last_dim("FeedForward", xs, d)?;
        }
        let up = ctx.call(&self.names.up, self.up.as_ref(), xs)?;
        let h = match (&self.gate, &self.names.gate) {
            (Some(g), Some(name)) => {
                let g = ctx.call(name, g.as_ref(), xs)?;
                self.activation
                    .apply(&g)?
                    .f_mul(&up)
                    .op("FeedForward gate")?
            }
            _ => self.activation.apply(&up)?,
        };
        ctx.record("act", &h)?;
        Ok(h)
    }
}

impl FeedForward {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let h = self.hidden(xs, ctx)?;
        let y = ctx.call(&self.names.down, self.down.as_ref(), &h)?;
        if ctx.train && self.dropout > 0.0 {
            y.f_dropout(self.dropout, true).op("FeedForward dropout")
        } else {
            Ok(y)
        }
    }
}
