//! Crosstalk at merge time: on task `i`'s own inputs, how large is the
//! change another task's delta makes, relative to the change task `i`'s
//! delta makes?
//!
//! ```text
//! ρ(j → i) = ‖ΔW_j X_iᵀ‖_F / ‖ΔW_i X_iᵀ‖_F,   ‖ΔW Xᵀ‖²_F = tr(ΔW G ΔWᵀ),  G = X_iᵀ X_i
//! ```
//!
//! where `X_i` are the rows task `i` feeds the layer (recorded by
//! [`crate::lsq::record_features`] as the Gram `G`, so no activation is kept).
//! For a LoRA pair `ΔW = s B A` the trace is `s² tr((BᵀB)(A G Aᵀ))`, an
//! `r × r` product. Summing adapters is lossless for task `i` exactly when
//! every `ρ(j → i)` is 0 on its inputs, whatever the weight-space cosine says:
//! with the **input** side frozen (`A_j = B_jᵀ`) the crosstalk is small when
//! task `i`'s inputs avoid the other tasks' input bins; with the **output**
//! side frozen the tasks write to orthogonal output directions, but task `j`'s
//! trained `A_j` can still read task `i`'s inputs, so `ρ` measures how much it
//! does. Computed in f64.

use std::fmt;

use tensor_core::tch::{Kind, Tensor};

use crate::delta::{Delta, TaskDelta};
use crate::error::{Error, Result};
use crate::lsq::Features;

/// `ρ(from → on)` on one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct CrosstalkStat {
    pub layer: String,
    /// The task whose inputs are used (`i`).
    pub on: usize,
    /// The task whose delta is applied to them (`j ≠ i`).
    pub from: usize,
    /// `‖ΔW_from X_onᵀ‖_F / ‖ΔW_on X_onᵀ‖_F`; `None` when task `on`'s own
    /// change on its inputs is zero (an untrained adapter).
    pub ratio: Option<f64>,
}

/// Every `ρ(j → i)` of a set of tasks, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct CrosstalkReport {
    pub tasks: Vec<String>,
    pub stats: Vec<CrosstalkStat>,
}

impl CrosstalkReport {
    /// Mean `ρ` over layers and ordered pairs (`None` when there is none).
    pub fn mean(&self) -> Option<f64> {
        let v: Vec<f64> = self.stats.iter().filter_map(|s| s.ratio).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Mean `ρ(from → on)` over layers, per ordered pair `(on, from)`.
    pub fn per_pair(&self) -> Vec<(usize, usize, f64)> {
        let n = self.tasks.len();
        let mut out = Vec::new();
        for on in 0..n {
            for from in 0..n {
                let v: Vec<f64> = self
                    .stats
                    .iter()
                    .filter(|s| s.on == on && s.from == from)
                    .filter_map(|s| s.ratio)
                    .collect();
                if !v.is_empty() {
                    out.push((on, from, v.iter().sum::<f64>() / v.len() as f64));
                }
            }
        }
        out
    }
}

impl fmt::Display for CrosstalkReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layers = {
            let mut l: Vec<&str> = self.stats.iter().map(|s| s.layer.as_str()).collect();
            l.dedup();
            l.len()
        };
        writeln!(
            f,
            "crosstalk ‖ΔW_j X_i‖/‖ΔW_i X_i‖ over {layers} layers: mean {}",
            self.mean().map_or("-".to_owned(), |m| format!("{m:.4}"))
        )?;
        for (on, from, m) in self.per_pair() {
            writeln!(
                f,
                "  {:>12} on {:<12} inputs: {m:.4}",
                self.tasks[from], self.tasks[on]
            )?;
        }
        Ok(())
    }
}

/// `tr(ΔW G ΔWᵀ) = ‖ΔW Xᵀ‖²_F` in f64, from the factors where there are some.
pub fn energy(delta: &Delta, gram: &Tensor) -> Result<f64> {
    let g = gram.f_to_kind(Kind::Double)?;
    let (_, inp) = delta.shape();
    if g.size() != [inp, inp] {
        return Err(Error::mismatch(format!(
            "a Gram of shape {:?} for a delta with {inp} inputs",
            g.size()
        )));
    }
    let t = match delta {
        Delta::Lora(l) => {
            let a = l.a.f_to_kind(Kind::Double)?;
            let b = l.b.f_to_kind(Kind::Double)?;
            let btb = b.f_transpose(0, 1)?.f_mm(&b)?;
            let aga = a.f_mm(&g)?.f_mm(&a.f_transpose(0, 1)?)?;
            btb.f_mul(&aga)?.f_sum(Kind::Double)?.double_value(&[]) * l.scale * l.scale
        }
        Delta::Full(w) => {
            let w = w.f_to_kind(Kind::Double)?;
            w.f_mm(&g)?
                .f_mul(&w)?
                .f_sum(Kind::Double)?
                .double_value(&[])
        }
    };
    Ok(t.max(0.0))
}

/// Every `ρ(j → i)` on the layers task `i` has a delta and recorded inputs
/// for; `features[i]` are task `i`'s Grams.
pub fn crosstalk(tasks: &[TaskDelta], features: &[Features]) -> Result<CrosstalkReport> {
    if features.len() != tasks.len() {
        return Err(Error::mismatch(format!(
            "crosstalk: {} feature sets for {} tasks",
            features.len(),
            tasks.len()
        )));
    }
    let mut layers: Vec<&String> = tasks.iter().flat_map(|t| t.layers.keys()).collect();
    layers.sort();
    layers.dedup();
    let mut stats = Vec::new();
    for layer in layers {
        for (i, ti) in tasks.iter().enumerate() {
            let Some(own) = ti.layers.get(layer) else {
                continue;
            };
            let gram = features[i].layers.get(layer).ok_or_else(|| {
                Error::config(format!(
                    "crosstalk: task '{}' has a delta on '{layer}' but no recorded inputs there",
                    ti.name
                ))
            })?;
            let own_energy = energy(own, &gram.xtx)?;
            for (j, tj) in tasks.iter().enumerate() {
                if j == i {
                    continue;
                }
                let Some(other) = tj.layers.get(layer) else {
                    continue;
                };
                let ratio = (own_energy > 0.0)
                    .then(|| energy(other, &gram.xtx).map(|e| (e / own_energy).sqrt()))
                    .transpose()?;
                stats.push(CrosstalkStat {
                    layer: layer.clone(),
                    on: i,
                    from: j,
                    ratio,
                });
            }
        }
    }
    Ok(CrosstalkReport {
        tasks: tasks.iter().map(|t| t.name.clone()).collect(),
        stats,
    })
}
