//! Combination of customised bricks (survey §3.3 "Combination"; task
//! arithmetic, Ilharco et al. 2023, arXiv 2212.04089).
//!
//! A customised brick is a parameter delta `δ = θ_tuned − θ_base` over named
//! parameters (a LoRA merged into its base, a fine-tuned FFN, ...). Then
//!
//! - weighted sum: `δ = Σ_i w_i δ_i` (names absent from a brick count as 0);
//! - task arithmetic: `θ = θ_base + Σ_i λ_i δ_i`, with `λ_i < 0` to negate a
//!   brick's behaviour (detoxification: subtract the "toxic" delta);
//! - model soup: the weighted sum with weights `≥ 0` summing to 1.

use std::collections::BTreeMap;

use tensor_core::module::{Module, ModuleExt};
use tensor_core::tch::{self, Kind, Tensor};

use crate::error::{Error, Result, check_finite};

/// Named parameter deltas.
#[derive(Debug)]
pub struct BrickDelta {
    pub name: String,
    pub tensors: BTreeMap<String, Tensor>,
}

impl BrickDelta {
    /// `tuned − base` for every parameter of `base` whose value differs or is listed in both.
    pub fn between(name: &str, base: &dyn Module, tuned: &dyn Module) -> Result<Self> {
        let theirs: BTreeMap<String, Tensor> = tuned.named_parameters().into_iter().collect();
        let mut tensors = BTreeMap::new();
        for (n, b) in base.named_parameters() {
            let t = theirs.get(&n).ok_or_else(|| Error::Unknown {
                what: "parameter of the tuned model".into(),
                name: n.clone(),
                known: theirs.keys().take(8).cloned().collect(),
            })?;
            if t.size() != b.size() {
                return Err(Error::mismatch(
                    format!("delta of {n}"),
                    format!("{:?}", b.size()),
                    format!("{:?}", t.size()),
                ));
            }
            tensors.insert(n, t.f_detach()?.f_sub(&b.f_detach()?)?);
        }
        Ok(Self {
            name: name.into(),
            tensors,
        })
    }

    /// `Σ_i w_i δ_i` over the union of names.
    pub fn weighted_sum(name: &str, bricks: &[&BrickDelta], weights: &[f64]) -> Result<Self> {
        if bricks.len() != weights.len() || bricks.is_empty() {
            return Err(Error::mismatch(
                "weighted_sum weights",
                format!("{} weights (one per brick, at least one)", bricks.len()),
                weights.len(),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::config(format!(
                "combination weight {w} is not finite"
            )));
        }
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for (b, &w) in bricks.iter().zip(weights) {
            for (n, t) in &b.tensors {
                let scaled = t.f_to_kind(Kind::Float)?.f_mul_scalar(w)?;
                match tensors.get(n) {
                    Some(acc) if acc.size() != t.size() => {
                        return Err(Error::mismatch(
                            format!("brick '{}' parameter {n}", b.name),
                            format!("{:?}", acc.size()),
                            format!("{:?}", t.size()),
                        ));
                    }
                    Some(acc) => {
                        let sum = acc.f_add(&scaled)?;
                        tensors.insert(n.clone(), sum);
                    }
                    None => {
                        tensors.insert(n.clone(), scaled);
                    }
                }
            }
        }
        Ok(Self {
            name: name.into(),
            tensors,
        })
    }

    /// A model soup's delta: weights must be `≥ 0` and sum to 1.
    pub fn soup(name: &str, bricks: &[&BrickDelta], weights: &[f64]) -> Result<Self> {
        let sum: f64 = weights.iter().sum();
        if weights.iter().any(|&w| w < 0.0) || (sum - 1.0).abs() > 1e-6 {
            return Err(Error::config(format!(
                "soup weights must be non-negative and sum to 1 (sum {sum})"
            )));
        }
        Self::weighted_sum(name, bricks, weights)
    }
}

/// `θ += scale · δ` on `model`'s parameters, by name (in place, no gradient).
pub fn apply_delta(model: &mut dyn Module, delta: &BrickDelta, scale: f64) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::config(format!("delta scale {scale} is not finite")));
    }
    for (n, t) in &delta.tensors {
        check_finite(&format!("brick '{}' parameter {n}", delta.name), t)?;
    }
    let names: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    if let Some(missing) = delta.tensors.keys().find(|n| !names.contains(n)) {
        return Err(Error::Unknown {
            what: format!("parameter of brick '{}'", delta.name),
            name: missing.clone(),
            known: names.into_iter().take(8).collect(),
        });
    }
    let mut failure = None;
    tch::no_grad(|| {
        model.for_each_param_mut(&mut |name, p| {
            let Some(d) = delta.tensors.get(name) else {
                return Ok(());
            };
            if d.size() != p.size() {
                failure = Some(Error::mismatch(
                    format!("brick '{}' parameter {name}", delta.name),
                    format!("{:?}", p.size()),
                    format!("{:?}", d.size()),
                ));
                return Ok(());
            }
            let upd = d
                .f_to_device(p.device())?
                .f_to_kind(p.kind())?
                .f_mul_scalar(scale)?;
            let _ = p.f_add_(&upd)?;
            Ok(())
        })
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Task arithmetic: `θ = θ + Σ_i λ_i δ_i` (negative `λ_i` negates brick `i`).
pub fn task_arithmetic(model: &mut dyn Module, bricks: &[(&BrickDelta, f64)]) -> Result<()> {
    let (b, w): (Vec<&BrickDelta>, Vec<f64>) = bricks.iter().copied().unzip();
    let sum = BrickDelta::weighted_sum("task arithmetic", &b, &w)?;
    apply_delta(model, &sum, 1.0)
}
