//! Updating a brick: ROME's rank-one locate-then-edit of an FFN output
//! matrix (Meng et al. 2022, arXiv 2202.05262, Eq. 2; survey §3.4).
//!
//! With keys `k ∈ R^{d_ff}` (the FFN's hidden activations), their second
//! moment `C = E[k kᵀ]` (estimated as `KᵀK / n + λ I`), a key `k*` and a
//! target value `v*`:
//!
//! `u = C⁻¹ k*`, `W' = W + (v* − W k*) uᵀ / (uᵀ k*)`.
//!
//! Then `W' k* = v*` exactly, and any key moves by
//! `‖(W' − W) k‖ = ‖v* − W k*‖ · |uᵀk| / |uᵀk*|`: keys with `uᵀk = 0` keep
//! their value, and keys typical under `C` move little
//! (`E[(uᵀk)²] = uᵀ C u = uᵀk*`).

use tensor_core::layers::{FeedForward, FfnPart};
use tensor_core::tch::{self, Device, Kind, Tensor};

use crate::error::{Error, Result, check_finite};

/// `C = KᵀK / n + damping · I` from keys `[n, d_ff]`, in f64.
pub fn key_second_moment(keys: &Tensor, damping: f64) -> Result<Tensor> {
    let s = keys.size();
    if s.len() != 2 || s[0] == 0 {
        return Err(Error::mismatch(
            "key_second_moment keys",
            "[n > 0, d_ff]",
            format!("{s:?}"),
        ));
    }
    if !(damping >= 0.0 && damping.is_finite()) {
        return Err(Error::config(format!(
            "damping {damping} must be finite and >= 0"
        )));
    }
    check_finite("keys", keys)?;
    let k = keys.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
    let c = k
        .f_transpose(0, 1)?
        .f_matmul(&k)?
        .f_div_scalar(s[0] as f64)?;
    Ok(c.f_add(&Tensor::f_eye(s[1], (Kind::Double, Device::Cpu))?.f_mul_scalar(damping)?)?)
}

/// A rank-one edit `Δ = (v* − W k*) uᵀ / (uᵀ k*)`.
#[derive(Debug)]
pub struct RankOneEdit {
    /// `[d_out, d_in]`, f64.
    pub delta: Tensor,
    /// `u = C⁻¹ k*`, f64.
    pub u: Tensor,
    /// `uᵀ k*`.
    pub denominator: f64,
    /// `‖v* − W k*‖`.
    pub residual_norm: f64,
}

impl RankOneEdit {
    /// `‖Δ k‖` for each key of `keys [n, d_in]`.
    pub fn change_on(&self, keys: &Tensor) -> Result<Vec<f64>> {
        let k = keys.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
        let n = k
            .f_matmul(&self.delta.f_transpose(0, 1)?)?
            .f_norm_scalaropt_dim(2, [1], false)?;
        let len = n.size()[0] as usize;
        let mut v = vec![0f64; len];
        n.f_copy_data(&mut v, len)?;
        Ok(v)
    }
}

/// The ROME edit of `w [d_out, d_in]` mapping `k_star [d_in]` to `v_star [d_out]` under key covariance `c [d_in, d_in]`.
pub fn rank_one_edit(
    w: &Tensor,
    c: &Tensor,
    k_star: &Tensor,
    v_star: &Tensor,
) -> Result<RankOneEdit> {
    let ws = w.size();
    if ws.len() != 2 {
        return Err(Error::mismatch(
            "rank_one_edit W",
            "[d_out, d_in]",
            format!("{ws:?}"),
        ));
    }
    let (d_out, d_in) = (ws[0], ws[1]);
    if c.size() != [d_in, d_in] {
        return Err(Error::mismatch(
            "rank_one_edit C",
            format!("[{d_in}, {d_in}]"),
            format!("{:?}", c.size()),
        ));
    }
    if k_star.size() != [d_in] {
        return Err(Error::mismatch(
            "rank_one_edit k*",
            format!("[{d_in}]"),
            format!("{:?}", k_star.size()),
        ));
    }
    if v_star.size() != [d_out] {
        return Err(Error::mismatch(
            "rank_one_edit v*",
            format!("[{d_out}]"),
            format!("{:?}", v_star.size()),
        ));
    }
    for (what, t) in [("W", w), ("C", c), ("k*", k_star), ("v*", v_star)] {
        check_finite(&format!("rank_one_edit {what}"), t)?;
    }
    let f64cpu = |t: &Tensor| -> Result<Tensor> {
        Ok(t.f_detach()?
            .f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?)
    };
    let (w, c, k, v) = (f64cpu(w)?, f64cpu(c)?, f64cpu(k_star)?, f64cpu(v_star)?);
    let u = Tensor::f_linalg_solve(&c, &k.f_unsqueeze(1)?, true)
        .map_err(|e| Error::config(format!("C is singular (add damping): {e}")))?
        .f_squeeze_dim(1)?;
    let denominator = u.f_dot(&k)?.f_double_value(&[])?;
    let scale = u.f_norm()?.f_double_value(&[])? * k.f_norm()?.f_double_value(&[])?;
    if !denominator.is_finite() || denominator.abs() <= 1e-12 * scale.max(1e-300) {
        return Err(Error::config(format!(
            "uᵀk* = {denominator:e}: the key is (numerically) orthogonal to C⁻¹k*, no rank-one edit maps it"
        )));
    }
    let residual = v.f_sub(&w.f_mv(&k)?)?;
    let residual_norm = residual.f_norm()?.f_double_value(&[])?;
    let delta = residual.f_outer(&u)?.f_div_scalar(denominator)?;
    Ok(RankOneEdit {
        delta,
        u,
        denominator,
        residual_norm,
    })
}

/// Edit an FFN so that the hidden key `k_star` produces the FFN output
/// `target` (bias included): `W_O += Δ` with `v* = target − b_O`.
pub fn edit_ffn(
    ffn: &mut FeedForward,
    c: &Tensor,
    k_star: &Tensor,
    target: &Tensor,
) -> Result<RankOneEdit> {
    let v_star = match ffn.b2()? {
        Some(b) => target.f_sub(
            &b.f_detach()?
                .f_to_kind(target.kind())?
                .f_to_device(target.device())?,
        )?,
        None => target.shallow_clone(),
    };
    let edit = rank_one_edit(ffn.w2()?, c, k_star, &v_star)?;
    let down = ffn.linear_mut(FfnPart::Down)?;
    tch::no_grad(|| -> Result<()> {
        let d = edit
            .delta
            .f_to_kind(down.weight.kind())?
            .f_to_device(down.weight.device())?;
        let _ = down.weight.f_add_(&d)?;
        Ok(())
    })?;
    Ok(edit)
}
