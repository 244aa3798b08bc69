//! Magnitude pruning of task vectors (TIES-Merging's trim step, Yadav et
//! al., arXiv 2306.01708; PEFT `utils/merge_utils.py`
//! `magnitude_based_pruning` / `magnitude_prune`; docs/orthogonal-merge.md,
//! Method, part 2 step 2).
//!
//! ```text
//! k = ⌊ρ · numel⌋            (as PEFT: int(density * numel), in f64)
//! prune_ρ(τ) = τ ⊙ 1[the k entries of largest |τ|]
//! magnitude_prune(τ_1..τ_T) = Σ_t w_t · prune_ρ(τ_t)
//! ```
//!
//! `ρ ≥ 1` keeps the tensor unchanged (PEFT warns and does the same); `ρ < 0`
//! is an error. The `k` entries are chosen by libtorch's `topk` (unsorted,
//! the same selection as PEFT's sorted call), so ties at the threshold are
//! broken as PEFT breaks them.
//!
//! On the CPU, large f32 tensors take a faster exact route: the `k`-th
//! largest `|τ|` is found by a two-pass radix select on the bit patterns
//! (for non-negative floats the order of the bits is the order of the
//! values), and the entries `≥` it are kept. When exactly `k` entries are
//! `≥` the threshold (always, unless non-zero values tie at it) this is the
//! same set as `topk`'s; otherwise `topk` decides, as above.

use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Reject densities PEFT rejects (and NaN).
pub fn check_density(density: f64) -> Result<()> {
    if density.is_nan() || density < 0.0 {
        return Err(Error::config(format!(
            "density must be in [0, 1], got {density}"
        )));
    }
    Ok(())
}

/// Reject weights that do not match the tensors, or are not finite.
pub fn check_weights(n: usize, weights: &[f64]) -> Result<()> {
    if n == 0 {
        return Err(Error::config("nothing to merge: no task tensors"));
    }
    if weights.len() != n {
        return Err(Error::mismatch(format!(
            "{} weights for {n} task tensors",
            weights.len()
        )));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::config(format!(
            "merge weights must be finite, got {w}"
        )));
    }
    Ok(())
}

/// Same shape for every task tensor.
pub fn check_same_shape(tensors: &[Tensor]) -> Result<()> {
    if let Some(first) = tensors.first() {
        let s = first.size();
        if let Some((i, t)) = tensors.iter().enumerate().find(|(_, t)| t.size() != s) {
            return Err(Error::mismatch(format!(
                "task tensor {i} has shape {:?} but task tensor 0 has {s:?}",
                t.size()
            )));
        }
    }
    Ok(())
}

/// Number of entries kept at density `ρ`: `⌊ρ · numel⌋`.
pub fn kept(numel: i64, density: f64) -> i64 {
    ((density * numel as f64) as i64).clamp(0, numel)
}

/// Keep the `⌊ρ·numel⌋` entries of largest magnitude, zero the rest.
pub fn magnitude_prune_one(t: &Tensor, density: f64) -> Result<Tensor> {
    check_density(density)?;
    if density >= 1.0 {
        return Ok(t.shallow_clone());
    }
    let numel = t.numel() as i64;
    let k = kept(numel, density);
    let flat = t.f_reshape([-1])?;
    if k == 0 {
        return Ok(t.f_zeros_like()?);
    }
    if k == numel {
        return Ok(t.shallow_clone());
    }
    if t.device() == Device::Cpu && t.kind() == Kind::Float && numel >= RADIX_MIN {
        let v = Vec::<f32>::try_from(&flat)?;
        if let Some(kept) = radix_prune(&v, k as usize) {
            return Ok(Tensor::f_from_slice(&kept)?.f_reshape(t.size().as_slice())?);
        }
    }
    let (_, idx) = flat.f_abs()?.f_topk(k, 0, true, false)?;
    let out = flat
        .f_zeros_like()?
        .f_scatter(0, &idx, &flat.f_gather(0, &idx, false)?)?;
    Ok(out.f_reshape(t.size().as_slice())?)
}

/// Below this many entries `topk` is as fast as the radix route.
const RADIX_MIN: i64 = 4096;

/// `v` with all but its `k` largest-magnitude entries zeroed, if exactly `k`
/// entries reach the `k`-th largest magnitude; `None` when values tie there.
fn radix_prune(v: &[f32], k: usize) -> Option<Vec<f32>> {
    let mag = |x: f32| x.to_bits() & 0x7fff_ffff;
    // Pass 1: the high 16 bits.
    let mut hist = vec![0usize; 1 << 16];
    for &x in v {
        hist[(mag(x) >> 16) as usize] += 1;
    }
    let (mut above, mut hi) = (0usize, 0usize);
    for b in (0..hist.len()).rev() {
        if above + hist[b] >= k {
            hi = b;
            break;
        }
        above += hist[b];
    }
    // Pass 2: the low 16 bits inside that bin.
    hist.iter_mut().for_each(|h| *h = 0);
    for &x in v {
        let m = mag(x);
        if (m >> 16) as usize == hi {
            hist[(m & 0xffff) as usize] += 1;
        }
    }
    let need = k - above;
    let (mut cum, mut lo) = (0usize, 0usize);
    for b in (0..hist.len()).rev() {
        cum += hist[b];
        if cum >= need {
            lo = b;
            break;
        }
    }
    if cum != need {
        return None; // ties at the threshold: let topk choose
    }
    let thr = ((hi as u32) << 16) | lo as u32;
    Some(
        v.iter()
            .map(|&x| if mag(x) >= thr { x } else { 0.0 })
            .collect(),
    )
}

/// `Σ_t w_t · prune_ρ(τ_t)` (PEFT `magnitude_prune`), in f32.
pub fn magnitude_prune(tensors: &[Tensor], weights: &[f64], density: f64) -> Result<Tensor> {
    check_weights(tensors.len(), weights)?;
    check_same_shape(tensors)?;
    let pruned = tensors
        .iter()
        .map(|t| magnitude_prune_one(&t.f_to_kind(Kind::Float)?, density))
        .collect::<Result<Vec<_>>>()?;
    crate::ops::weighted_sum(&pruned, weights)
}
