//! DARE, "drop and rescale" (Yu, Yu, Yu, Huang, Li, "Language Models are
//! Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
//! ICML 2024, arXiv 2311.03099), as PEFT computes it (`utils/merge_utils.py`:
//! `random_pruning`, `dare_linear`, `dare_ties`; docs/orthogonal-merge.md, Method, part 2
//! step 4):
//!
//! ```text
//! m_t ~ Bernoulli(ρ) per entry,   τ̃_t = m_t ⊙ τ_t / ρ
//! dare_linear: Σ_t w_t τ̃_t
//! dare_ties:   TIES steps (ii)–(iii) on τ̃_t
//! ```
//!
//! **Masks.** PEFT draws `m_t = torch.bernoulli(torch.full_like(τ_t, ρ))`
//! for t = 1..T in order from torch's global generator. [`dare_masks`] makes
//! the same calls on libtorch's CPU generator after seeding it, so
//! `dare_masks(shape, T, ρ, s)` equals PEFT's masks after
//! `torch.manual_seed(s)` (same libtorch), and the same masks can be given
//! to [`dare_linear`] / [`dare_ties`] explicitly. Masks are drawn on the CPU
//! and moved to the tensors' device, so they do not depend on it.
//! `ρ ≥ 1` keeps the tensors unchanged (no rescale), as PEFT; `ρ ≤ 0` is an
//! error (PEFT would divide by zero).

use tensor_core::seed::with_seed;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::prune::{check_same_shape, check_weights};
use crate::ties::{SignMethod, disjoint_merge, majority_sign};

fn check_dare_density(density: f64) -> Result<()> {
    if density.is_nan() || density <= 0.0 {
        return Err(Error::config(format!(
            "DARE density must be in (0, 1], got {density} (it divides by the density)"
        )));
    }
    Ok(())
}

/// `count` Bernoulli(ρ) masks of `shape` (f32, CPU), drawn in order after seeding with `seed`.
pub fn dare_masks(shape: &[i64], count: usize, density: f64, seed: u64) -> Result<Vec<Tensor>> {
    check_dare_density(density)?;
    with_seed(seed, || -> Result<Vec<Tensor>> {
        let p = Tensor::f_full(shape, density, (Kind::Float, Device::Cpu))?;
        (0..count).map(|_| Ok(p.f_bernoulli()?)).collect()
    })
}

/// DARE on tasks produced one at a time by `get(t)` (so that only one
/// mask and one delta are alive at once), with the masks [`dare_masks`]
/// would draw from `seed`: `ties = None` gives `dare_linear`, else `dare_ties`.
pub(crate) fn dare_streamed(
    n: usize,
    weights: &[f64],
    density: f64,
    seed: u64,
    ties: Option<SignMethod>,
    get: &dyn Fn(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    check_weights(n, weights)?;
    check_dare_density(density)?;
    if density >= 1.0 {
        let ts = (0..n).map(get).collect::<Result<Vec<_>>>()?;
        return match ties {
            None => crate::ops::weighted_sum(&ts, weights),
            Some(m) => disjoint_merge(&ts, weights, &majority_sign(&ts, m)?),
        };
    }
    with_seed(seed, || -> Result<Tensor> {
        let mut p: Option<Tensor> = None;
        let mut acc: Option<Tensor> = None;
        let mut kept = Vec::new();
        for (t, &w) in weights.iter().enumerate() {
            let x = get(t)?.f_to_kind(Kind::Float)?;
            let p = match &p {
                Some(p) => p,
                None => p.insert(Tensor::f_full(
                    x.size(),
                    density,
                    (Kind::Float, Device::Cpu),
                )?),
            };
            if p.size() != x.size() {
                return Err(Error::mismatch(format!(
                    "task tensor {t} has shape {:?} but task tensor 0 has {:?}",
                    x.size(),
                    p.size()
                )));
            }
            let m = p.f_bernoulli()?.f_to_device(x.device())?;
            match ties {
                None => {
                    // acc += (w/ρ) · τ ⊙ m
                    let xs = x.f_mul_scalar((w as f32 / density as f32) as f64)?;
                    match &mut acc {
                        None => acc = Some(xs.f_mul(&m)?),
                        Some(a) => {
                            let _ = a.f_addcmul_(&xs, &m)?;
                        }
                    }
                }
                Some(_) => kept.push(x.f_mul(&m)?.f_div_scalar(density as f32 as f64)?),
            }
        }
        match ties {
            None => Ok(acc.expect("n >= 1")),
            Some(method) => disjoint_merge(&kept, weights, &majority_sign(&kept, method)?),
        }
    })
}

/// `m ⊙ τ / ρ` (unchanged for `ρ ≥ 1`).
pub fn drop_and_rescale(t: &Tensor, mask: &Tensor, density: f64) -> Result<Tensor> {
    check_dare_density(density)?;
    let t = t.f_to_kind(Kind::Float)?;
    if density >= 1.0 {
        return Ok(t);
    }
    if mask.size() != t.size() {
        return Err(Error::mismatch(format!(
            "DARE mask of shape {:?} for a tensor of shape {:?}",
            mask.size(),
            t.size()
        )));
    }
    let m = mask.f_to_kind(Kind::Float)?.f_to_device(t.device())?;
    Ok(t.f_mul(&m)?.f_div_scalar(density as f32 as f64)?)
}

fn rescaled(tensors: &[Tensor], masks: &[Tensor], density: f64) -> Result<Vec<Tensor>> {
    if masks.len() != tensors.len() {
        return Err(Error::mismatch(format!(
            "{} DARE masks for {} task tensors",
            masks.len(),
            tensors.len()
        )));
    }
    tensors
        .iter()
        .zip(masks)
        .map(|(t, m)| drop_and_rescale(t, m, density))
        .collect()
}

/// `Σ_t w_t · m_t ⊙ τ_t / ρ` (PEFT `dare_linear` on the given masks).
pub fn dare_linear(
    tensors: &[Tensor],
    weights: &[f64],
    density: f64,
    masks: &[Tensor],
) -> Result<Tensor> {
    check_weights(tensors.len(), weights)?;
    check_same_shape(tensors)?;
    let r = rescaled(tensors, masks, density)?;
    crate::ops::weighted_sum(&r, weights)
}

/// Sign election and disjoint mean on `m_t ⊙ τ_t / ρ` (PEFT `dare_ties` on the given masks).
pub fn dare_ties(
    tensors: &[Tensor],
    weights: &[f64],
    density: f64,
    masks: &[Tensor],
    method: SignMethod,
) -> Result<Tensor> {
    check_weights(tensors.len(), weights)?;
    check_same_shape(tensors)?;
    let r = rescaled(tensors, masks, density)?;
    let sign = majority_sign(&r, method)?;
    disjoint_merge(&r, weights, &sign)
}
