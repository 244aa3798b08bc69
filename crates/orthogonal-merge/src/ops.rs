//! Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic",
//! arXiv 2212.04089; PEFT `task_arithmetic`; docs/orthogonal-merge.md, Method,
//! part 2 step 1), the weighted sum every other operator ends with:
//!
//! ```text
//! τ_m = Σ_t w_t τ_t        (a negative w_t subtracts task t)
//! ```
//!
//! Computed in f32 as PEFT does (`w_t` cast to f32, products summed in task
//! order), accumulating in place instead of stacking the tasks.

use tensor_core::tch::{Kind, Tensor};

use crate::error::Result;
use crate::prune::{check_same_shape, check_weights};

/// `Σ_t w_t τ_t` in f32.
pub fn weighted_sum(tensors: &[Tensor], weights: &[f64]) -> Result<Tensor> {
    check_weights(tensors.len(), weights)?;
    check_same_shape(tensors)?;
    let mut acc = tensors[0]
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(weights[0] as f32 as f64)?;
    for (t, &w) in tensors.iter().zip(weights).skip(1) {
        let term = t.f_to_kind(Kind::Float)?.f_mul_scalar(w as f32 as f64)?;
        let _ = acc.f_add_(&term)?;
    }
    Ok(acc)
}

/// PEFT's `task_arithmetic`: the same as [`weighted_sum`].
pub fn task_arithmetic(tensors: &[Tensor], weights: &[f64]) -> Result<Tensor> {
    weighted_sum(tensors, weights)
}
