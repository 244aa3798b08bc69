//! Per-layer shared orthogonal bases and their disjoint bins (Po, Yang,
//! Aberman, Wetzstein, "Orthogonal Adaptation for Modular Customization of
//! Diffusion Models", CVPR 2024, arXiv 2312.02432;
//! docs/orthogonal-merge.md, Method, part 1 steps 1–2).
//!
//! For a layer whose frozen side has size `n`:
//!
//! ```text
//! G ∈ R^{n×n},  G_ij ~ N(0, 1)  drawn from (seed, layer name)
//! qr_bins:   G = QR with diag(R) > 0,  Q orthogonal
//! svd_bins:  G = U S Vᵀ,               Q = U (each column's largest entry made positive)
//! gaussian:  Q = G / √n                (near-orthogonal, |cos| = O(1/√n))
//! B_i = Q[:, b_i·r : (b_i+1)·r]        (bin b_i of concept i, r columns)
//! ```
//!
//! so `B_iᵀ B_j = 0` for `b_i ≠ b_j` and `B_iᵀ B_i = I_r` (QR, SVD), and a
//! layer holds at most `⌊n/r⌋` concepts.
//!
//! Independent trainers must regenerate the same `Q`: `G` is drawn by
//! [`tensor_core::rng::SplitMix64`] (Box–Muller, f64, column by column), so it
//! is the same on every platform and does not depend on libtorch's generator.
//! Because Gram–Schmidt is triangular, the first `k` columns of the QR basis
//! depend only on the first `k` columns of `G`: bin `b` needs the reduced QR
//! of an `n × (b+1)·r` matrix, not of `n × n`. The SVD variant needs all of `G`.

use serde::{Deserialize, Serialize};
use tensor_core::rng::SplitMix64;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::target::name_seed;

/// How a layer's basis is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BasisKind {
    /// Q of the QR of a Gaussian (diag(R) > 0): exactly orthogonal.
    #[default]
    QrBins,
    /// U of the SVD of a Gaussian: exactly orthogonal.
    SvdBins,
    /// Scaled Gaussian columns, N(0, 1/n): only near-orthogonal.
    Gaussian,
}

/// Which factor of `ΔW = s·B·A` is the frozen basis block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FrozenSide {
    /// `A = B_iᵀ ∈ R^{r×in}` frozen, `B ∈ R^{out×r}` trained: concept `j`
    /// ignores inputs in `span(B_i)` (`ΔW_j B_i = 0`). The paper's
    /// definition (`ΔW_i = A_i B_iᵀ` with `B_i` fixed, in its notation) and
    /// the default.
    #[default]
    Input,
    /// `B = B_i ∈ R^{out×r}` frozen, `A ∈ R^{r×in}` trained: concepts write
    /// into orthogonal output subspaces. The convention of third-party
    /// re-implementations; an option.
    Output,
}

impl FrozenSide {
    /// Size `n` of the frozen side of a `[out, in]` weight.
    pub fn size(self, out_features: i64, in_features: i64) -> i64 {
        match self {
            FrozenSide::Input => in_features,
            FrozenSide::Output => out_features,
        }
    }
}

/// The seed of `layer`'s basis.
pub fn layer_seed(seed: u64, layer: &str) -> u64 {
    name_seed(seed, &[layer, "orthogonal-basis"])
}

/// `N(0, 1)` values, `count` of them, from `seed` (Box–Muller on SplitMix64).
/// A shorter draw is a prefix of a longer one.
pub fn gaussian_values(count: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(count + 1);
    while out.len() < count {
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = 1.0 - rng.next_f64();
        let u2 = rng.next_f64();
        let rad = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        out.push(rad * c);
        out.push(rad * s);
    }
    out.truncate(count);
    out
}

/// The first `k` columns of the layer's Gaussian `G`, `[n, k]` f64 on the CPU.
pub fn gaussian_columns(n: i64, k: i64, seed: u64) -> Result<Tensor> {
    check_dims(n, k)?;
    let v = gaussian_values((n * k) as usize, seed);
    // Column-major: column j is values [j·n, (j+1)·n).
    Ok(Tensor::f_from_slice(&v)?
        .f_reshape([k, n])?
        .f_transpose(0, 1)?
        .f_contiguous()?)
}

fn check_dims(n: i64, k: i64) -> Result<()> {
    if n <= 0 || k <= 0 || k > n {
        return Err(Error::config(format!(
            "a basis needs 0 < columns <= n; got {k} columns for n = {n}"
        )));
    }
    Ok(())
}

/// The first `k` columns of the basis `Q` of a layer with frozen size `n`,
/// `[n, k]` f64 on the CPU.
pub fn basis_columns(kind: BasisKind, n: i64, k: i64, seed: u64) -> Result<Tensor> {
    check_dims(n, k)?;
    match kind {
        BasisKind::QrBins => {
            let g = gaussian_columns(n, k, seed)?;
            let (q, r) = Tensor::f_linalg_qr(&g, "reduced")?;
            // diag(R) > 0 makes the factorisation unique (a zero counts as +1).
            let d = r.f_diagonal(0, 0, 1)?.f_sign()?;
            let d = d.f_where_scalarother(&d.f_ne(0)?, 1.0)?;
            Ok(q.f_mul(&d.f_unsqueeze(0)?)?)
        }
        BasisKind::SvdBins => {
            let g = gaussian_columns(n, n, seed)?;
            let (u, _, _) = g.f_svd(true, true)?;
            let u = u.f_narrow(1, 0, k)?;
            // The largest |entry| of each column positive (SVD signs are arbitrary).
            let idx = u.f_abs()?.f_argmax(0, true)?;
            let d = u.f_gather(0, &idx, false)?.f_sign()?;
            let d = d.f_where_scalarother(&d.f_ne(0)?, 1.0)?;
            Ok(u.f_mul(&d)?)
        }
        BasisKind::Gaussian => Ok(gaussian_columns(n, k, seed)?.f_div_scalar((n as f64).sqrt())?),
    }
}

/// How many bins of rank `r` a frozen side of size `n` holds: `⌊n/r⌋`.
pub fn capacity(n: i64, rank: i64) -> i64 {
    if rank <= 0 { 0 } else { n / rank }
}

/// What every trainer of one registry shares: the basis kind, the seed,
/// the rank `r` of each bin and which side is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasisSpec {
    #[serde(rename = "basis")]
    pub kind: BasisKind,
    pub seed: u64,
    pub rank: i64,
    pub frozen_side: FrozenSide,
}

impl BasisSpec {
    /// Bin `bin` (`r` columns) of `layer`'s basis for frozen size `n`, `[n, r]` as `dtype` on `device`.
    pub fn block(
        &self,
        layer: &str,
        n: i64,
        bin: i64,
        dtype: Kind,
        device: Device,
    ) -> Result<Tensor> {
        let rank = self.rank;
        if rank <= 0 {
            return Err(Error::config(format!("rank must be >= 1, got {rank}")));
        }
        if bin < 0 || (bin + 1) * rank > n {
            return Err(Error::config(format!(
                "{layer}: bin {bin} of rank {rank} needs {} columns but n = {n} (at most {} bins)",
                (bin + 1) * rank,
                capacity(n, rank)
            )));
        }
        let q = basis_columns(self.kind, n, (bin + 1) * rank, layer_seed(self.seed, layer))?;
        Ok(q.f_narrow(1, bin * rank, rank)?
            .f_contiguous()?
            .f_to_kind(dtype)?
            .f_to_device(device)?)
    }
}

/// The whole basis `Q` `[n, n]` (f64, CPU) of `layer`, e.g. for inspection.
pub fn full_basis(kind: BasisKind, n: i64, seed: u64, layer: &str) -> Result<Tensor> {
    basis_columns(kind, n, n, layer_seed(seed, layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_draw_is_a_prefix() {
        let a = gaussian_values(7, 3);
        let b = gaussian_values(20, 3);
        assert_eq!(a[..], b[..7]);
        let m: f64 = b.iter().sum::<f64>() / 20.0;
        assert!(m.abs() < 1.0);
    }

    #[test]
    fn qr_prefix_property() {
        let small = basis_columns(BasisKind::QrBins, 12, 4, 9).unwrap();
        let big = basis_columns(BasisKind::QrBins, 12, 12, 9).unwrap();
        let d = (small - big.narrow(1, 0, 4)).abs().max().double_value(&[]);
        assert!(d < 1e-12, "{d}");
    }
}
