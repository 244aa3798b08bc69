//! The Gram matrix `G = X Xᵀ` of the key vectors, in f64, for the balanced
//! k-means of EMoE step 1 (Qiu et al. 2023, "Unlocking Emergent
//! Modularity in LLMs"; docs/emergent-split.md, Method, part 1):
//! `G[i][j] = x_i · x_j`.
//!
//! [`crate::kmeans`] works on `G` alone (centroid dot products, norms and the
//! objective are sums of its entries), so this is the only `O(n² d)` step of
//! a whole multi-start run. It is computed here rather than through libtorch
//! so that it stays single-threaded per task under rayon (libtorch's own
//! thread pool oversubscribes a shared machine): tiles of 4 × 3 dot products
//! over the lower triangle, rows split across rayon's threads, then mirrored.
//! On x86-64 with AVX2 and FMA (checked at run time) the tile uses 256-bit
//! fused multiply-adds; elsewhere a portable 4-accumulator loop. Both round
//! differently, so `G` may differ in the last bits between machines.

use rayon::prelude::*;

/// Rows per tile.
const ROWS: usize = 4;
/// Columns per tile.
const COLS: usize = 3;
/// Rows per parallel task and per cache block.
const BLOCK: usize = 32;

/// `G = X Xᵀ` for row-major `x: [n, d]`; exactly symmetric.
pub(crate) fn gram(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    assert_eq!(x.len(), n * d, "gram: x must be [n, d]");
    let mut g = vec![0f64; n * n];
    if n == 0 {
        return g;
    }
    let simd = simd_available();
    // Lower triangle, one block of BLOCK rows per task; the columns in
    // blocks of BLOCK rows too, so both stay in cache while their tiles run.
    g.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(blk, out)| {
            let i0 = blk * BLOCK;
            let rows = out.len() / n;
            for jb in (0..i0 + rows).step_by(BLOCK) {
                for ii in (0..rows).step_by(ROWS) {
                    let i = i0 + ii;
                    let ri = ROWS.min(rows - ii);
                    let j_end = (jb + BLOCK).min(i + ri);
                    let mut j = jb;
                    while j < j_end {
                        let rj = COLS.min(j_end - j);
                        tile(x, d, i, ri, j, rj, &mut out[ii * n..], n, simd);
                        j += rj;
                    }
                }
            }
        });
    // Mirror: G[i][j] = G[j][i] for j > i, in cache-sized blocks.
    const B: usize = 64;
    for ib in (0..n).step_by(B) {
        for jb in (ib..n).step_by(B) {
            for i in ib..(ib + B).min(n) {
                for j in jb.max(i + 1)..(jb + B).min(n) {
                    g[i * n + j] = g[j * n + i];
                }
            }
        }
    }
    g
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[(i − i0) n + j] = x_i · x_j` for `i ∈ i0..i0+ri`, `j ∈ j0..j0+rj`.
#[allow(clippy::too_many_arguments)]
fn tile(
    x: &[f64],
    d: usize,
    i0: usize,
    ri: usize,
    j0: usize,
    rj: usize,
    out: &mut [f64],
    n: usize,
    simd: bool,
) {
    let row = |i: usize| &x[i * d..(i + 1) * d];
    #[cfg(target_arch = "x86_64")]
    if simd && ri == ROWS && rj == COLS {
        let a = [row(i0), row(i0 + 1), row(i0 + 2), row(i0 + 3)];
        let b = [row(j0), row(j0 + 1), row(j0 + 2)];
        // SAFETY: AVX2 and FMA were detected at run time (`simd`).
        let v = unsafe { tile_avx2(a, b) };
        for (r, vr) in v.iter().enumerate() {
            out[r * n + j0..r * n + j0 + COLS].copy_from_slice(vr);
        }
        return;
    }
    let _ = simd;
    for r in 0..ri {
        for c in 0..rj {
            out[r * n + j0 + c] = dot(row(i0 + r), row(j0 + c));
        }
    }
}

/// Portable dot product with four partial sums.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..4 {
            s[l] += x[l] * y[l];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        t += x * y;
    }
    t
}

/// A 4 × 3 tile of dot products with 256-bit FMAs (4 lanes of f64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(a: [&[f64]; ROWS], b: [&[f64]; COLS]) -> [[f64; COLS]; ROWS] {
    use std::arch::x86_64::*;
    let d = a[0].len();
    let mut acc = [[_mm256_setzero_pd(); COLS]; ROWS];
    let mut q = 0;
    while q + 4 <= d {
        // SAFETY: q + 4 <= d = the length of every row.
        let (b0, b1, b2) = unsafe {
            (
                _mm256_loadu_pd(b[0].as_ptr().add(q)),
                _mm256_loadu_pd(b[1].as_ptr().add(q)),
                _mm256_loadu_pd(b[2].as_ptr().add(q)),
            )
        };
        for r in 0..ROWS {
            // SAFETY: as above.
            let av = unsafe { _mm256_loadu_pd(a[r].as_ptr().add(q)) };
            acc[r][0] = _mm256_fmadd_pd(av, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_pd(av, b1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_pd(av, b2, acc[r][2]);
        }
        q += 4;
    }
    let mut out = [[0f64; COLS]; ROWS];
    for r in 0..ROWS {
        for c in 0..COLS {
            let mut lanes = [0f64; 4];
            // SAFETY: `lanes` holds 4 f64.
            unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), acc[r][c]) };
            let mut s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
            for t in q..d {
                s += a[r][t] * b[c][t];
            }
            out[r][c] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_core::rng::SplitMix64;

    #[test]
    fn gram_matches_naive_dot_products() {
        for (n, d) in [(1, 1), (5, 3), (9, 7), (13, 16), (8, 384)] {
            let mut rng = SplitMix64::new(n as u64 * 31 + d as u64);
            let x: Vec<f64> = (0..n * d).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
            let g = gram(&x, n, d);
            for i in 0..n {
                for j in 0..n {
                    let want: f64 = (0..d).map(|q| x[i * d + q] * x[j * d + q]).sum();
                    assert!((g[i * n + j] - want).abs() <= 1e-12 * (1.0 + want.abs()));
                    assert_eq!(g[i * n + j], g[j * n + i]);
                }
            }
        }
        assert!(gram(&[], 0, 4).is_empty());
    }
}
