//! Truncated SVD of a merged delta back to LoRA factors (PEFT
//! `add_weighted_adapter(combination_type="svd" | "*_svd")`, after kohya-ss
//! `svd_merge_lora.py`; docs/orthogonal-merge.md, Method, part 2 step 8):
//!
//! ```text
//! ΔW = U S Vᵀ,   B = U_r S_r,   A = V_rᵀ,   s = 1   (PEFT sets α = r)
//! ‖ΔW − BA‖_F = √(Σ_{j>r} σ_j²)                      (Eckart–Young)
//! clamp c: h = quantile_c(entries of B and A), B, A clamped to [−h, h]
//! ```
//!
//! When `ΔW = B_cat A_cat` is known in factored form (a weighted sum of LoRA
//! adapters, `R = Σ r_t` columns), the SVD is computed from two thin QRs and
//! an `R × R` SVD instead of the `out × in` one:
//!
//! ```text
//! B_cat = Q_b R_b,   A_catᵀ = Q_a R_a,   R_b R_aᵀ = U' S V'ᵀ   ⇒   ΔW = (Q_b U') S (Q_a V')ᵀ
//! ```
//!
//! which is exact (the same singular values and subspaces) and costs
//! `O((out + in) R² + R³)`. Singular vectors are unique only up to sign
//! (and rotation within repeated singular values); `B·A` is what is compared.

use tensor_core::tch::{Kind, Tensor};

use crate::delta::LoraFactors;
use crate::error::{Error, Result};

fn check_rank(rank: i64, max: i64) -> Result<i64> {
    if rank <= 0 {
        return Err(Error::config(format!("SVD rank must be >= 1, got {rank}")));
    }
    Ok(rank.min(max))
}

fn clamp_factors(b: Tensor, a: Tensor, clamp: Option<f64>) -> Result<(Tensor, Tensor)> {
    let Some(q) = clamp else {
        return Ok((b, a));
    };
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::config(format!(
            "svd_clamp must be a quantile in [0, 1], got {q}"
        )));
    }
    let dist = Tensor::f_cat(&[b.f_reshape([-1])?, a.f_reshape([-1])?], 0)?;
    let hi = dist
        .f_quantile_scalar(q, None::<i64>, false, "linear")?
        .double_value(&[]);
    Ok((b.f_clamp(-hi, hi)?, a.f_clamp(-hi, hi)?))
}

/// Rank-`rank` factors of `delta` `[out, in]` (f32): `B = U_r S_r`, `A = V_rᵀ`, scale 1.
pub fn truncated_svd(delta: &Tensor, rank: i64, clamp: Option<f64>) -> Result<LoraFactors> {
    if delta.dim() != 2 {
        return Err(Error::mismatch(format!(
            "SVD needs an [out, in] delta, got {:?}",
            delta.size()
        )));
    }
    let s = delta.size();
    let r = check_rank(rank, s[0].min(s[1]))?;
    let d = delta.f_to_kind(Kind::Float)?;
    let (u, sv, v) = d.f_svd(true, true)?;
    let vh = v.f_transpose(0, 1)?;
    let b = u
        .f_narrow(1, 0, r)?
        .f_mul(&sv.f_narrow(0, 0, r)?.f_unsqueeze(0)?)?;
    let a = vh.f_narrow(0, 0, r)?.f_contiguous()?;
    let (b, a) = clamp_factors(b, a, clamp)?;
    LoraFactors::new(a, b, 1.0)
}

/// Rank-`rank` factors of `b_cat · a_cat` (`[out, R] · [R, in]`) without forming it.
pub fn truncated_svd_factored(
    b_cat: &Tensor,
    a_cat: &Tensor,
    rank: i64,
    clamp: Option<f64>,
) -> Result<LoraFactors> {
    let (sb, sa) = (b_cat.size(), a_cat.size());
    if sb.len() != 2 || sa.len() != 2 || sb[1] != sa[0] {
        return Err(Error::mismatch(format!(
            "factored SVD needs B [out, R] and A [R, in]; got {sb:?} and {sa:?}"
        )));
    }
    let (out, big_r, inp) = (sb[0], sb[1], sa[1]);
    if big_r > out.min(inp) {
        let d = b_cat
            .f_to_kind(Kind::Float)?
            .f_mm(&a_cat.f_to_kind(Kind::Float)?)?;
        return truncated_svd(&d, rank, clamp);
    }
    let r = check_rank(rank, big_r)?;
    let (qb, rb) = Tensor::f_linalg_qr(&b_cat.f_to_kind(Kind::Float)?, "reduced")?;
    let (qa, ra) =
        Tensor::f_linalg_qr(&a_cat.f_to_kind(Kind::Float)?.f_transpose(0, 1)?, "reduced")?;
    let m = rb.f_mm(&ra.f_transpose(0, 1)?)?;
    let (u, sv, v) = m.f_svd(true, true)?;
    let vh = v.f_transpose(0, 1)?;
    let u = qb.f_mm(&u.f_narrow(1, 0, r)?)?;
    let b = u.f_mul(&sv.f_narrow(0, 0, r)?.f_unsqueeze(0)?)?;
    let a = vh.f_narrow(0, 0, r)?.f_mm(&qa.f_transpose(0, 1)?)?;
    let (b, a) = clamp_factors(b, a, clamp)?;
    LoraFactors::new(a, b, 1.0)
}

/// `√(Σ_{j>r} σ_j²)`: the Frobenius error of the best rank-`r` approximation.
pub fn truncation_error(delta: &Tensor, rank: i64) -> Result<f64> {
    let (_, sv, _) = delta.f_to_kind(Kind::Double)?.f_svd(true, false)?;
    let n = sv.size()[0];
    if rank >= n {
        return Ok(0.0);
    }
    Ok(sv
        .f_narrow(0, rank, n - rank)?
        .f_square()?
        .f_sum(Kind::Double)?
        .f_sqrt()?
        .double_value(&[]))
}
