//! Building blocks with Hugging Face parameter names.
//!
//! Each layer owns its parameters as plain tensors (`requires_grad` set when
//! trainable), names them as checkpoints do (`weight`, `bias`), checks the
//! shapes of what it is given and returns `Result` from `forward`.

mod attention;
mod block;
mod embedding;
mod ffn;
mod linear;
mod moe;
mod norm;

pub use attention::{Attention, AttentionConfig, AttentionNames, hidden_key_bias};
pub use block::{BlockNames, PreNormBlock};
pub use embedding::Embedding;
pub use ffn::{Activation, FeedForward, FfnNames, FfnPart};
pub use linear::Linear;
pub use moe::{MoeNames, SparseMoeBlock};
pub use norm::{LayerNorm, RmsNorm};

use tch::Tensor;

use crate::error::{Error, Result};

/// A new trainable parameter (a leaf tensor with `requires_grad`).
pub(crate) fn param(t: Tensor) -> Tensor {
    t.set_requires_grad(true)
}

/// Check that the last dimension of `xs` is `dim`.
pub(crate) fn check_last_dim(op: &str, xs: &Tensor, dim: i64) -> Result<()> {
    let size = xs.size();
    match size.last() {
        Some(&d) if d == dim => Ok(()),
        _ => Err(Error::shape(op, format!("[*, {dim}]"), size)),
    }
}

/// Check that `xs` is floating point.
pub(crate) fn check_float(op: &str, xs: &Tensor) -> Result<()> {
    let k = xs.kind();
    if crate::device::is_float(k) {
        Ok(())
    } else {
        Err(Error::DType {
            op: op.into(),
            expected: "a floating-point tensor".into(),
            actual: k,
        })
    }
}
