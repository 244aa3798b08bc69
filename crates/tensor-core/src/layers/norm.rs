//! Layer normalisation over the last dimension:
//! `y = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance).

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
