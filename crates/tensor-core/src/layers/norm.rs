//! Normalisation over the last dimension. Layer normalisation:
//! `y = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance);
//! RMS normalisation (Llama-family decoders): `y = weight ⊙ x / sqrt(mean(x²) + eps)`.

use tch::{Device, Kind, Tensor};

use super::{check_float, check_last_dim, param};
use crate::error::{Error, Result, TchResultExt};
use crate::module::{Context, Module};

#[derive(Debug, Module)]
#[module(kind = "LayerNorm", forward = forward_impl)]
pub struct LayerNorm {
    #[param]
    pub weight: Tensor,
    #[param]
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    /// Weight 1, bias 0.
    pub fn new(dim: i64, eps: f64, bias: bool, device: Device) -> Result<Self> {
        if dim <= 0 || eps.is_nan() || eps <= 0.0 {
            return Err(Error::config(format!(
                "LayerNorm: need dim > 0 and eps > 0, got dim={dim}, eps={eps}"
            )));
        }
        let weight = Tensor::f_ones([dim], (Kind::Float, device)).op("LayerNorm::new")?;
        let bias = if bias {
            Some(Tensor::f_zeros([dim], (Kind::Float, device)).op("LayerNorm::new")?)
        } else {
            None
        };
        Ok(Self {
            weight: param(weight),
            bias: bias.map(param),
            eps,
        })
    }

    pub fn dim(&self) -> i64 {
        self.weight.size()[0]
    }
}

impl LayerNorm {
    fn forward_impl(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
        let d = self.dim();
        check_last_dim("LayerNorm", xs, d)?;
        check_float("LayerNorm", xs)?;
        xs.f_layer_norm([d], Some(&self.weight), self.bias.as_ref(), self.eps, true)
            .op("LayerNorm")
    }
}

/// Root-mean-square normalisation over the last dimension (Zhang and
/// Sennrich 2019), as Llama-family decoders compute it:
/// `y = weight ⊙ (x / sqrt(mean(x²) + eps))`, the statistics in f32 and the
/// normalised value cast back to the input's dtype before the weight
/// multiplies it. No bias, no mean subtraction.
#[derive(Debug, Module)]
#[module(kind = "RmsNorm", forward = forward_impl)]
pub struct RmsNorm {
    #[param]
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// Weight 1.
    pub fn new(dim: i64, eps: f64, device: Device) -> Result<Self> {
        if dim <= 0 || eps.is_nan() || eps <= 0.0 {
            return Err(Error::config(format!(
                "RmsNorm: need dim > 0 and eps > 0, got dim={dim}, eps={eps}"
            )));
        }
        let weight = Tensor::f_ones([dim], (Kind::Float, device)).op("RmsNorm::new")?;
        Ok(Self {
            weight: param(weight),
            eps,
        })
    }

    pub fn dim(&self) -> i64 {
        self.weight.size()[0]
    }

    fn forward_impl(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
        check_last_dim("RmsNorm", xs, self.dim())?;
        check_float("RmsNorm", xs)?;
        let op = "RmsNorm";
        let x = xs.f_to_kind(Kind::Float).op(op)?;
        let var = x
            .f_square()
            .and_then(|s| s.f_mean_dim(-1, true, Kind::Float))
            .op(op)?;
        let normed = x
            .f_mul(
                &var.f_add_scalar(self.eps)
                    .and_then(|v| v.f_rsqrt())
                    .op(op)?,
            )
            .and_then(|n| n.f_to_kind(xs.kind()))
            .op(op)?;
        self.weight.f_mul(&normed).op(op)
    }
}
