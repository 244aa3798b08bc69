//! Lookup table: row `i` of `weight: [num, dim]` for each index `i`.

use tch::{Device, Kind, Tensor};

use super::param;
use crate::error::{Error, Result, TchResultExt};
use crate::module::{Context, Module};

#[derive(Debug, Module)]
#[module(kind = "Embedding", forward = forward_impl)]
pub struct Embedding {
    #[param]
    pub weight: Tensor,
}

impl Embedding {
    /// `N(0, 1)` rows, as PyTorch initialises `nn.Embedding`.
    pub fn new(num: i64, dim: i64, device: Device) -> Result<Self> {
        if num <= 0 || dim <= 0 {
            return Err(Error::config(format!(
                "Embedding: need num > 0 and dim > 0, got num={num}, dim={dim}"
            )));
        }
        let w = Tensor::f_randn([num, dim], (Kind::Float, device)).op("Embedding::new")?;
        Ok(Self { weight: param(w) })
    }

    pub fn from_weight(weight: Tensor) -> Result<Self> {
        if weight.dim() != 2 {
            return Err(Error::shape(
                "Embedding weight",
                "[num, dim]",
                weight.size(),
            ));
        }
        Ok(Self {
            weight: param(weight.detach()),
        })
    }

    pub fn num(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn dim(&self) -> i64 {
        self.weight.size()[1]
    }
}

impl Embedding {
    /// `xs`: integer indices of any shape; returns `[..., dim]`.
    fn forward_impl(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
        match xs.kind() {
            Kind::Int64 | Kind::Int => {}
            k => {
                return Err(Error::DType {
                    op: "Embedding".into(),
                    expected: "int64 or int32 indices".into(),
                    actual: k,
                });
            }
        }
        Tensor::f_embedding(&self.weight, xs, -1, false, false).op("Embedding")
    }
}
