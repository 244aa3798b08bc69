//! Stick-breaking attention in log space with `O(T²)` memory (docs/moe-router.md,
//! Method, part 2 steps 4–6; ModuleFormer, arXiv 2306.04640 eq. 3; Tan et al.,
//! "Scaling Stick-Breaking Attention", arXiv 2410.17980 eqs. 1–3,
//! `shawntan/stickbreaking-attention` `sb_ref.py`).
//!
//! Per head, with logits `l_ij = q_i·k_j / √d_h` and `β_ij = σ(l_ij)`:
//! - **MF** (ModuleFormer, [`SbVariant::Mf`]): `A_ij = β_ij Π_{k=j+1..i} (1 − β_ik)` for `j ≤ i`;
//! - **SB** (Tan et al., `attend_current = false`, [`SbVariant::Sb`]):
//!   `A_ij = β_ij Π_{k=j+1..i−1} (1 − β_ik)` for `j < i`, `A_ii = 0`;
//! - `o_i = Σ_j A_ij v_j` (no renormalisation), `rem_i = 1 − Σ_j A_ij ∈ [0, 1]`.
//!
//! **Log space.** `log β = logsigmoid(l)` and `log(1 − β) = logsigmoid(−l) = −softplus(l)`, so
//!
//! `log A_ij = logsigmoid(l_ij) + Σ_{k>j, k visible to i} logsigmoid(−l_ik)`,
//!
//! where the sum is an exclusive *reverse* cumulative sum along the keys of
//! the masked `logsigmoid(−l)` (keys after `i` — or at `i` for SB — and
//! padding keys contribute 0, and their `log β` is `−∞`). Every tensor is
//! `[..., T_q, T_k]`: `O(T²)` memory and time per head, instead of the
//! `O(T³)` triangular matmul of `sb_ref.py` or the `[T, T, T]` product of
//! [`stick_breaking_naive`] (the test reference). Autograd differentiates
//! the log-space form (the reverse cumsum's adjoint is a cumsum).
//!
//! **Remainder** ([`SbRemainder`]): `none` (ModuleFormer); `add_current_value`,
//! `o_i += rem_i v_i` (the reference test of `stickbreaking-attention`);
//! `add_head_bias`, `o_i += rem_i b_head`, then GroupNorm and the output
//! projection (dolomite-engine; applied in [`crate::moa`]).
//!
//! Queries may be the last `T_q ≤ T_k` positions (incremental decoding):
//! query `i` sits at key position `i + T_k − T_q`.

use serde::{Deserialize, Serialize};
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// MF (attend to the current token) or SB (do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SbVariant {
    /// ModuleFormer: the diagonal is included.
    #[default]
    Mf,
    /// Tan et al. with `attend_current = false`: `A_ii = 0`.
    Sb,
}

/// What happens to the leftover weight `rem_i = 1 − Σ_j A_ij`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SbRemainder {
    /// Dropped (ModuleFormer).
    #[default]
    None,
    /// `o_i += rem_i v_i`.
    AddCurrentValue,
    /// `o_i += rem_i b_head`, then GroupNorm (in the mixture of attention heads).
    AddHeadBias,
}

/// Output of [`stick_breaking_attention`].
#[derive(Debug)]
pub struct SbOutput {
    /// `[..., T_q, d_v]`
    pub out: Tensor,
    /// `[..., T_q]`: `1 − Σ_j A_ij`.
    pub rem: Tensor,
}

fn check_logits(op: &str, logits: &Tensor) -> Result<(i64, i64)> {
    let s = logits.size();
    if s.len() < 2 {
        return Err(Error::shape(op, "logits [..., T_q, T_k]", s));
    }
    let (tq, tk) = (s[s.len() - 2], s[s.len() - 1]);
    if tq > tk {
        return Err(Error::shape(
            op,
            "T_q <= T_k (queries are the last T_q positions)",
            s,
        ));
    }
    Ok((tq, tk))
}

/// `[T_q, T_k]` bool: key `j` is visible to query `i` (causal; `j < i` for SB).
fn causal_visible(
    tq: i64,
    tk: i64,
    variant: SbVariant,
    device: tensor_core::tch::Device,
) -> Result<Tensor> {
    let off = tk - tq;
    let diag = match variant {
        SbVariant::Mf => off,
        SbVariant::Sb => off - 1,
    };
    Ok(Tensor::f_ones([tq, tk], (Kind::Bool, device))?.f_tril(diag)?)
}

fn visible(logits: &Tensor, variant: SbVariant, key_mask: Option<&Tensor>) -> Result<Tensor> {
    let (tq, tk) = check_logits("stick_breaking", logits)?;
    let mut vis = causal_visible(tq, tk, variant, logits.device())?;
    if let Some(m) = key_mask {
        let ms = m.size();
        if ms.last() != Some(&tk) {
            return Err(Error::shape(
                "stick_breaking key_mask",
                format!("[..., {tk}] broadcastable to the logits"),
                ms,
            ));
        }
        vis = vis.f_logical_and(&m.f_ne(0)?)?;
    }
    Ok(vis)
}

/// `log A: [..., T_q, T_k]` (`−∞` where `A = 0`) from `logits: [..., T_q, T_k]`,
/// in `O(T²)`. `key_mask` (non-zero = token) broadcasts against the logits
/// (e.g. `[B, 1, 1, T_k]` for `[B, H, T_q, T_k]`).
pub fn stick_breaking_log_weights(
    logits: &Tensor,
    variant: SbVariant,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let vis = visible(logits, variant, key_mask)?;
    let hidden = vis.f_logical_not()?;
    let log_beta = logits
        .f_log_sigmoid()?
        .f_masked_fill(&hidden, f64::NEG_INFINITY)?;
    let log_keep = logits
        .f_neg()?
        .f_log_sigmoid()?
        .f_masked_fill(&hidden, 0.0)?;
    // Σ_{k ≥ j} by a reverse cumsum, then exclusive: Σ_{k > j}.
    let after = log_keep
        .f_flip([-1i64].as_slice())?
        .f_cumsum(-1, None)?
        .f_flip([-1i64].as_slice())?
        .f_sub(&log_keep)?;
    Ok(log_beta.f_add(&after)?)
}

/// `A = exp(log A)`: rows sum to at most 1.
pub fn stick_breaking_weights(
    logits: &Tensor,
    variant: SbVariant,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(stick_breaking_log_weights(logits, variant, key_mask)?.f_exp()?)
}

/// The `O(T³)` reference in product form: `A_ij = β_ij Π_{k ∈ (j, i]} (1 − β_ik)`
/// (`(j, i)` for SB), building a `[..., T_q, T_k, T_k]` tensor. Tests only.
pub fn stick_breaking_naive(logits: &Tensor, variant: SbVariant) -> Result<Tensor> {
    let (tq, tk) = check_logits("stick_breaking_naive", logits)?;
    let dev = logits.device();
    let vis = causal_visible(tq, tk, variant, dev)?; // [i, k]
    let beta = logits.f_sigmoid()?;
    let keep = beta.f_neg()?.f_add_scalar(1.0)?; // [..., i, k]
    // M[i, j, k] = k > j and k visible to i.
    let ar = Tensor::f_arange(tk, (Kind::Int64, dev))?;
    let after = ar.f_unsqueeze(0)?.f_gt_tensor(&ar.f_unsqueeze(1)?)?; // [j, k]
    let m = vis.f_unsqueeze(1)?.f_logical_and(&after.f_unsqueeze(0)?)?; // [i, j, k]
    let ones = keep.f_ones_like()?.f_unsqueeze(-2)?;
    let factors = keep.f_unsqueeze(-2)?.f_where_self(&m, &ones)?; // [..., i, j, k]
    let prod = factors.f_prod_dim_int(-1, false, None)?;
    let a = beta.f_mul(&prod)?;
    Ok(a.f_masked_fill(&vis.f_logical_not()?, 0.0)?)
}

/// Stick-breaking attention: `q: [..., T_q, d_h]`, `k: [..., T_k, d_h]`,
/// `v: [..., T_k, d_v]` (leading dimensions broadcast, so shared keys can be
/// `[B, 1, H, T, d]` against per-expert queries `[B, k, H, T, d]`).
/// Half-precision inputs are computed in f32. `add_current_value` applies
/// that remainder option.
pub fn stick_breaking_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    variant: SbVariant,
    add_current_value: bool,
    key_mask: Option<&Tensor>,
) -> Result<SbOutput> {
    const OP: &str = "stick_breaking_attention";
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if qs.len() < 2 || ks.len() < 2 || vs.len() < 2 {
        return Err(Error::shape(OP, "q, k, v [..., T, d]", qs));
    }
    let dh = qs[qs.len() - 1];
    if ks[ks.len() - 1] != dh || ks[ks.len() - 2] != vs[vs.len() - 2] {
        return Err(Error::shape(
            OP,
            format!("k [..., T_k, {dh}] and v [..., T_k, d_v] with the same T_k"),
            ks,
        ));
    }
    let work = match q.kind() {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        other => other,
    };
    let logits = q
        .f_to_kind(work)?
        .f_matmul(&k.f_to_kind(work)?.f_transpose(-2, -1)?)?
        .f_mul_scalar(1.0 / (dh as f64).sqrt())?;
    let (tq, tk) = check_logits(OP, &logits)?;
    let a = stick_breaking_weights(&logits, variant, key_mask)?;
    let vw = v.f_to_kind(work)?;
    let mut out = a.f_matmul(&vw)?;
    let rem = a
        .f_sum_dim_intlist(-1, false, None)?
        .f_neg()?
        .f_add_scalar(1.0)?;
    if add_current_value {
        let cur = vw.f_narrow(-2, tk - tq, tq)?;
        out = out.f_add(&rem.f_unsqueeze(-1)?.f_mul(&cur)?)?;
    }
    Ok(SbOutput {
        out: out.f_to_kind(v.kind())?,
        rem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_key_is_sigmoid() {
        let l = Tensor::from_slice(&[0.3f64])
            .view([1, 1])
            .to_device(tensor_core::testing::device());
        let a = stick_breaking_weights(&l, SbVariant::Mf, None).unwrap();
        assert!((a.double_value(&[0, 0]) - 1.0 / (1.0 + (-0.3f64).exp())).abs() < 1e-15);
        let a = stick_breaking_weights(&l, SbVariant::Sb, None).unwrap();
        assert_eq!(a.double_value(&[0, 0]), 0.0);
    }

    #[test]
    fn more_queries_than_keys_is_an_error() {
        // A shape error: nothing is computed, the CPU will do.
        let l = Tensor::zeros([3, 2], (Kind::Double, tensor_core::tch::Device::Cpu));
        assert!(stick_breaking_weights(&l, SbVariant::Mf, None).is_err());
        assert!(stick_breaking_naive(&l, SbVariant::Mf).is_err());
    }
}
