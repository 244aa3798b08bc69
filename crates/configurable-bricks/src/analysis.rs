//! The survey's two ablation analyses (§4), on any model and any loss:
//!
//! - **Perturbation**: zero `S_f` in every profiled FFN and measure the loss
//!   on every functionality `g`: `Δ%(f → g) = (L_pruned(g) − L(g)) / L(g)`
//!   (the survey's ΔPPL% when `L` is perplexity). A dominant diagonal means
//!   each functionality's brick matters most for that functionality.
//! - **Sparsity**: for each token and layer zero the `k%` of neurons with
//!   the lowest indicator and record the loss, for a list of `k`.
//!
//! Both take `eval`, which returns one loss per functionality for the model
//! as it currently is (masks installed): perplexity for an LM, masked-LM
//! loss, or any task loss. The masks are removed afterwards, also on error.
//!
//! [`NormalisedIndicator`] gives the survey's sparsity statistic: the share
//! of (token, neuron) pairs whose indicator, divided by the token's largest
//! in that layer, is below a threshold ("80% below 0.2").

use serde::Serialize;
use tensor_core::module::{ActivationSink, Module};
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result, check_finite_slice};
use crate::mask::{HiddenMask, clear_masks, install_masks, masked_mut, remove_masks, zero_set};
use crate::profile::{FfnSite, Indicator};
use crate::sets::NeuronSet;

/// Losses with one functionality's brick zeroed at a time.
#[derive(Debug, Clone, Serialize)]
pub struct Perturbation {
    pub functions: Vec<String>,
    /// `L(g)` of the intact model.
    pub base: Vec<f64>,
    /// `pruned[f][g] = L(g)` with `S_f` zeroed.
    pub pruned: Vec<Vec<f64>>,
    /// `|S_f|`.
    pub set_sizes: Vec<usize>,
}

impl Perturbation {
    /// `(L_pruned(g) − L(g)) / L(g) · 100`.
    pub fn delta_percent(&self, f: usize, g: usize) -> f64 {
        (self.pruned[f][g] - self.base[g]) / self.base[g] * 100.0
    }

    pub fn delta(&self, f: usize, g: usize) -> f64 {
        self.pruned[f][g] - self.base[g]
    }

    /// For each column `g`: is zeroing `S_g` the most damaging row?
    pub fn diagonal_dominant_columns(&self) -> Vec<bool> {
        let n = self.functions.len();
        (0..n)
            .map(|g| (0..n).all(|f| f == g || self.delta(g, g) > self.delta(f, g)))
            .collect()
    }
}

fn run_with_masks<T>(
    model: &mut dyn Module,
    sites: &[FfnSite],
    body: impl FnOnce(&mut dyn Module) -> Result<T>,
) -> Result<T> {
    install_masks(model, sites)?;
    let out = body(model);
    let removed = remove_masks(model, sites);
    let out = out?;
    removed?;
    Ok(out)
}

fn checked_eval(
    eval: &mut dyn FnMut(&dyn Module) -> Result<Vec<f64>>,
    model: &dyn Module,
    n: usize,
    what: &str,
) -> Result<Vec<f64>> {
    let l = eval(model)?;
    if l.len() != n {
        return Err(Error::mismatch(
            what,
            format!("{n} losses (one per functionality)"),
            l.len(),
        ));
    }
    check_finite_slice(what, &l)?;
    Ok(l)
}

/// The perturbation matrix: `eval` once intact, then once per set zeroed.
pub fn perturbation_matrix(
    model: &mut dyn Module,
    sites: &[FfnSite],
    functions: &[String],
    sets: &[NeuronSet],
    mut eval: impl FnMut(&dyn Module) -> Result<Vec<f64>>,
) -> Result<Perturbation> {
    let nf = functions.len();
    if sets.len() != nf {
        return Err(Error::mismatch(
            "perturbation sets",
            format!("{nf} (one per functionality)"),
            sets.len(),
        ));
    }
    run_with_masks(model, sites, |model| {
        let base = checked_eval(&mut eval, model, nf, "intact losses")?;
        if let Some(g) = base.iter().position(|&l| l <= 0.0) {
            return Err(Error::config(format!(
                "intact loss of '{}' is {} : relative changes need a positive loss",
                functions[g], base[g]
            )));
        }
        let mut pruned = Vec::with_capacity(nf);
        for s in sets {
            zero_set(model, sites, s)?;
            pruned.push(checked_eval(&mut eval, model, nf, "pruned losses")?);
            clear_masks(model, sites)?;
        }
        Ok(Perturbation {
            functions: functions.to_vec(),
            base,
            pruned,
            set_sizes: sets.iter().map(Vec::len).collect(),
        })
    })
}

/// `eval` once with each set zeroed in turn (masks restored between sets
/// and removed afterwards, also on error). Unlike [`perturbation_matrix`],
/// `eval` may return any number of losses (one per example, say), the same
/// number every time; they must be finite. Used for controls and for
/// per-example intervals.
pub fn zeroed_losses(
    model: &mut dyn Module,
    sites: &[FfnSite],
    sets: &[NeuronSet],
    mut eval: impl FnMut(&dyn Module) -> Result<Vec<f64>>,
) -> Result<Vec<Vec<f64>>> {
    run_with_masks(model, sites, |model| {
        let mut out: Vec<Vec<f64>> = Vec::with_capacity(sets.len());
        for (i, s) in sets.iter().enumerate() {
            zero_set(model, sites, s)?;
            let l = eval(model);
            clear_masks(model, sites)?;
            let l = l?;
            let what = format!("losses with set {i} zeroed");
            if let Some(first) = out.first()
                && first.len() != l.len()
            {
                return Err(Error::mismatch(
                    &what,
                    format!("{} losses", first.len()),
                    l.len(),
                ));
            }
            check_finite_slice(&what, &l)?;
            out.push(l);
        }
        Ok(out)
    })
}

/// One point of the sparsity curve.
#[derive(Debug, Clone, Serialize)]
pub struct SparsityPoint {
    pub fraction: f64,
    pub losses: Vec<f64>,
}

/// Loss per functionality with the lowest `fraction` of neurons masked per token, for each fraction.
pub fn sparsity_curve(
    model: &mut dyn Module,
    sites: &[FfnSite],
    fractions: &[f64],
    indicator: Indicator,
    n_functions: usize,
    mut eval: impl FnMut(&dyn Module) -> Result<Vec<f64>>,
) -> Result<Vec<SparsityPoint>> {
    if let Some(f) = fractions.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        return Err(Error::config(format!(
            "sparsity fraction {f} is outside [0, 1]"
        )));
    }
    run_with_masks(model, sites, |model| {
        let mut out = Vec::new();
        for &fraction in fractions {
            for s in sites {
                masked_mut(model, &s.path)?.set(HiddenMask::LowestFraction {
                    fraction,
                    indicator,
                })?;
            }
            out.push(SparsityPoint {
                fraction,
                losses: checked_eval(&mut eval, model, n_functions, "sparsity losses")?,
            });
        }
        Ok(out)
    })
}

/// Sink that accumulates, over non-padding tokens, how many neurons have a
/// normalised indicator `|a_n| / max_m |a_m|` below each threshold.
#[derive(Debug)]
pub struct NormalisedIndicator {
    pub thresholds: Vec<f64>,
    /// `below[i]`: count of (token, neuron) pairs under `thresholds[i]`.
    pub below: Vec<f64>,
    pub total: f64,
    mask: Option<Tensor>,
    pattern: String,
}

impl NormalisedIndicator {
    /// Count activations recorded under keys matching `pattern` (e.g. `*:act`).
    pub fn new(pattern: &str, thresholds: &[f64]) -> Self {
        Self {
            thresholds: thresholds.to_vec(),
            below: vec![0.0; thresholds.len()],
            total: 0.0,
            mask: None,
            pattern: pattern.into(),
        }
    }

    /// The attention mask `[B, T]` of the next forward pass.
    pub fn set_mask(&mut self, mask: &Tensor) {
        self.mask = Some(mask.shallow_clone());
    }

    /// Share of (token, neuron) pairs below each threshold.
    pub fn shares(&self) -> Vec<f64> {
        self.below.iter().map(|b| b / self.total.max(1.0)).collect()
    }
}

impl ActivationSink for NormalisedIndicator {
    fn wants(&self, key: &str) -> bool {
        tensor_core::module::glob_match(&self.pattern, key)
    }
    fn record(&mut self, _key: &str, value: &Tensor) -> tensor_core::Result<()> {
        let a = value.f_detach()?.f_abs()?.f_to_kind(Kind::Float)?;
        let max = a.f_amax(&[-1i64][..], true)?.f_clamp_min(1e-30)?;
        let norm = a.f_div(&max)?;
        let tokens = match &self.mask {
            Some(m) if m.size().len() == 2 && a.size().len() == 3 => m
                .f_to_device(a.device())?
                .f_ne(0)?
                .f_to_kind(Kind::Float)?
                .f_unsqueeze(-1)?,
            _ => a.f_ones_like()?.f_narrow(-1, 0, 1)?,
        };
        let d = *a.size().last().unwrap_or(&1) as f64;
        self.total += tokens.f_sum(Kind::Double)?.f_double_value(&[])? * d;
        for (i, t) in self.thresholds.iter().enumerate() {
            let c = norm
                .f_lt(*t)?
                .f_to_kind(Kind::Float)?
                .f_mul(&tokens)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            self.below[i] += c;
        }
        Ok(())
    }
}
