//! TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging:
//! Resolving Interference When Merging Models", NeurIPS 2023, arXiv
//! 2306.01708), as PEFT computes it (`utils/merge_utils.py`: `ties`,
//! `calculate_majority_sign_mask`, `disjoint_merge`; docs/orthogonal-merge.md, Method,
//! part 2 step 3):
//!
//! ```text
//! (i)   τ̂_t = prune_ρ(τ_t)                                   (magnitude trim)
//! (ii)  σ = sign(Σ_t τ̂_t)            (total)
//!       σ = sign(Σ_t sign(τ̂_t))      (frequency),   a zero sum counts as +1
//! (iii) τ_m = Σ_t [sign τ̂_t = σ] · w_t τ̂_t / max(1, Σ_t [sign τ̂_t = σ])
//! ```
//!
//! The vote uses the unweighted trimmed tensors and zero entries never agree
//! (their sign is 0), as in PEFT. The same election and disjoint mean serve
//! DARE-TIES ([`crate::dare`]).

use serde::{Deserialize, Serialize};
use tensor_core::tch::{Kind, Tensor};

use crate::error::Result;
use crate::prune::{check_same_shape, check_weights, magnitude_prune_one};

/// How the sign of each entry is elected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SignMethod {
    /// `sign(Σ_t τ̂_t)`: mass decides (PEFT's default).
    #[default]
    Total,
    /// `sign(Σ_t sign τ̂_t)`: the count decides.
    Frequency,
}

/// The elected sign `σ ∈ {−1, +1}` per entry, f32.
pub fn majority_sign(tensors: &[Tensor], method: SignMethod) -> Result<Tensor> {
    check_same_shape(tensors)?;
    let mut s = tensors[0].f_to_kind(Kind::Float)?;
    s = match method {
        SignMethod::Total => s.copy(),
        SignMethod::Frequency => s.f_sign()?,
    };
    for t in &tensors[1..] {
        let t = t.f_to_kind(Kind::Float)?;
        let _ = match method {
            SignMethod::Total => s.f_add_(&t)?,
            SignMethod::Frequency => s.f_add_(&t.f_sign()?)?,
        };
    }
    // where(S >= 0, 1, -1)
    Ok(s.f_ge(0.0)?
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(2.0)?
        .f_sub_scalar(1.0)?)
}

/// `Σ_t [sign τ_t = σ] w_t τ_t / max(1, Σ_t [sign τ_t = σ])`.
pub fn disjoint_merge(tensors: &[Tensor], weights: &[f64], sign: &Tensor) -> Result<Tensor> {
    check_weights(tensors.len(), weights)?;
    check_same_shape(tensors)?;
    let mut num: Option<Tensor> = None;
    let mut count: Option<Tensor> = None;
    for (t, &w) in tensors.iter().zip(weights) {
        let t = t.f_to_kind(Kind::Float)?;
        let agree = t.f_sign()?.f_eq_tensor(sign)?.f_to_kind(Kind::Float)?;
        let term = t.f_mul_scalar(w as f32 as f64)?.f_mul(&agree)?;
        match (&mut num, &mut count) {
            (Some(n), Some(c)) => {
                let _ = n.f_add_(&term)?;
                let _ = c.f_add_(&agree)?;
            }
            _ => {
                num = Some(term);
                count = Some(agree);
            }
        }
    }
    let (num, count) = (
        num.expect("checked non-empty"),
        count.expect("checked non-empty"),
    );
    Ok(num.f_div(&count.f_clamp_min(1.0)?)?)
}

/// TIES: trim to density `ρ`, elect signs, disjoint mean (PEFT `ties`).
pub fn ties(
    tensors: &[Tensor],
    weights: &[f64],
    density: f64,
    method: SignMethod,
) -> Result<Tensor> {
    check_weights(tensors.len(), weights)?;
    check_same_shape(tensors)?;
    let trimmed = tensors
        .iter()
        .map(|t| magnitude_prune_one(&t.f_to_kind(Kind::Float)?, density))
        .collect::<Result<Vec<_>>>()?;
    let sign = majority_sign(&trimmed, method)?;
    disjoint_merge(&trimmed, weights, &sign)
}
