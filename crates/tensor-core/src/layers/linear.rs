//! `y = x W^T + b`, with `W: [out, in]` as PyTorch and Hugging Face store it.

use tch::{Device, Kind, Tensor};

use super::{check_float, check_last_dim, param};
use crate::error::{Error, Result, TchResultExt};
use crate::module::{Context, Module};

#[derive(Debug, Module)]
#[module(kind = "Linear", forward = forward_impl)]
pub struct Linear {
    /// `[out_features, in_features]`
    #[param]
    pub weight: Tensor,
    /// `[out_features]`
    #[param]
    pub bias: Option<Tensor>,
}

impl Linear {
    /// PyTorch's default initialisation: `W, b ~ U(-1/sqrt(in), 1/sqrt(in))`.
    pub fn new(in_features: i64, out_features: i64, bias: bool, device: Device) -> Result<Self> {
        if in_features <= 0 || out_features <= 0 {
            return Err(Error::config(format!(
                "Linear: features must be positive, got in={in_features}, out={out_features}"
            )));
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let opts = (Kind::Float, device);
        let weight = Tensor::f_empty([out_features, in_features], opts)
            .and_then(|mut t| t.f_uniform_(-bound, bound))
            .op("Linear::new")?;
        let bias = if bias {
            Some(
                Tensor::f_empty([out_features], opts)
                    .and_then(|mut t| t.f_uniform_(-bound, bound))
                    .op("Linear::new")?,
            )
        } else {
            None
        };
        Self::from_weights(weight, bias)
    }

    /// Wrap existing tensors (made trainable); shapes are checked.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let ws = weight.size();
        if ws.len() != 2 {
            return Err(Error::shape("Linear weight", "[out, in]", ws));
        }
        if let Some(b) = &bias
            && b.size() != [ws[0]]
        {
            return Err(Error::shape(
                "Linear bias",
                format!("[{}]", ws[0]),
                b.size(),
            ));
        }
        Ok(Self {
            weight: param(weight.detach()),
            bias: bias.map(|b| param(b.detach())),
        })
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
}

impl Linear {
    fn forward_impl(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
        check_last_dim("Linear", xs, self.in_features())?;
        check_float("Linear", xs)?;
        xs.f_linear(&self.weight, self.bias.as_ref()).op("Linear")
    }
}
