//! Functional attribution: FuncScore(n, f) = AP(P[:, n], y_f) (survey §4,
//! following Zhang et al. 2023, `thunlp/Modularity-Analysis`
//! `NeuronPredictivity/ap_calculation.py`).
//!
//! Average precision exactly as scikit-learn's `average_precision_score`:
//! rank the examples by score, descending; every *distinct* score is one
//! threshold (tied examples enter together), and
//!
//! `AP = Σ_k (R_k − R_{k−1}) · P_k`, with `P_k = TP_k / (TP_k + FP_k)`,
//! `R_k = TP_k / #positives`, `R_0 = 0`.
//!
//! `ap_symmetric` takes `max(AP(y), AP(1 − y))` as the Zhang et al. code
//! does; it is off by default because with one functionality against the
//! rest, AP(1 − y) has a chance level near `1 − 1/F`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, check_finite_slice};

/// Average precision of `scores` against binary `labels` (scikit-learn's
/// definition, ties handled as one threshold).
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Result<f64> {
    if scores.len() != labels.len() {
        return Err(Error::mismatch(
            "average_precision labels",
            format!("{} labels (one per score)", scores.len()),
            labels.len(),
        ));
    }
    check_finite_slice("average_precision scores", scores)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let positives = labels.iter().filter(|&&l| l).count();
    ap_sorted(&order, |i| scores[i], |i| labels[i], positives)
}

/// AP over examples already ranked by `order` (descending score).
fn ap_sorted(
    order: &[usize],
    score: impl Fn(usize) -> f64,
    label: impl Fn(usize) -> bool,
    positives: usize,
) -> Result<f64> {
    if positives == 0 {
        return Err(Error::config(
            "average precision needs at least one positive example (recall is undefined)",
        ));
    }
    let total = positives as f64;
    let (mut tp, mut fp, mut prev_tp, mut ap) = (0usize, 0usize, 0usize, 0.0f64);
    for (r, &i) in order.iter().enumerate() {
        if label(i) {
            tp += 1;
        } else {
            fp += 1;
        }
        // A threshold ends where the next score differs (or at the last example).
        let last = r + 1 == order.len() || score(order[r + 1]) != score(i);
        if last && tp > prev_tp {
            ap += (tp - prev_tp) as f64 / total * (tp as f64 / (tp + fp) as f64);
            prev_tp = tp;
        }
    }
    Ok(ap)
}

/// Options of the attribution step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct AttributionConfig {
    /// `max(AP(y), AP(1 − y))` instead of `AP(y)` (default false).
    pub ap_symmetric: bool,
}

/// FuncScore for every neuron and functionality: `scores[n * F + f]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FuncScores {
    pub functions: Vec<String>,
    pub neurons: usize,
    pub scores: Vec<f64>,
}

impl FuncScores {
    pub fn get(&self, neuron: usize, function: usize) -> f64 {
        self.scores[neuron * self.functions.len() + function]
    }

    /// The scores of one functionality over all neurons.
    pub fn column(&self, function: usize) -> Vec<f64> {
        let f = self.functions.len();
        (0..self.neurons)
            .map(|n| self.scores[n * f + function])
            .collect()
    }

    /// The index of a functionality by name.
    pub fn function_index(&self, name: &str) -> Result<usize> {
        self.functions
            .iter()
            .position(|f| f == name)
            .ok_or_else(|| Error::Unknown {
                what: "functionality".into(),
                name: name.into(),
                known: self.functions.clone(),
            })
    }

    /// `[neurons, F]` float64 tensor.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&self.scores)?
            .f_view([self.neurons as i64, self.functions.len() as i64])?)
    }
}

/// FuncScore(n, f) for every column `n` of `profile` (`[examples, neurons]`,
/// any float dtype and device) and every functionality `f`, where
/// `labels[i]` is example `i`'s functionality index into `functions`.
/// Each neuron's ranking is sorted once and shared by all functionalities.
pub fn func_scores(
    profile: &Tensor,
    labels: &[usize],
    functions: &[String],
    config: &AttributionConfig,
) -> Result<FuncScores> {
    let size = profile.size();
    if size.len() != 2 {
        return Err(Error::mismatch(
            "func_scores profile",
            "a [examples, neurons] matrix",
            format!("shape {size:?}"),
        ));
    }
    let (n, m) = (size[0] as usize, size[1] as usize);
    if labels.len() != n {
        return Err(Error::mismatch(
            "func_scores labels",
            format!("{n} labels (one per profiled example)"),
            labels.len(),
        ));
    }
    let nf = functions.len();
    if nf == 0 {
        return Err(Error::config("func_scores: no functionalities given"));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= nf) {
        return Err(Error::mismatch(
            "func_scores label",
            format!("an index below {nf} ({})", functions.join(", ")),
            bad,
        ));
    }
    let positives: Vec<usize> = (0..nf)
        .map(|f| labels.iter().filter(|&&l| l == f).count())
        .collect();
    if let Some(f) = (0..nf).find(|&f| positives[f] == 0 || positives[f] == n) {
        return Err(Error::config(format!(
            "functionality '{}' has {} of {n} examples: AP needs positives and negatives",
            functions[f], positives[f]
        )));
    }
    // Column-major host copy: each neuron's column is contiguous.
    let cols = profile
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)?
        .f_transpose(0, 1)?
        .f_contiguous()?;
    let mut data = vec![0f64; n * m];
    cols.f_copy_data(&mut data, n * m)?;
    check_finite_slice("func_scores profile", &data)?;
    let symmetric = config.ap_symmetric;
    let per_neuron: Vec<Result<Vec<f64>>> = data
        .par_chunks(n.max(1))
        .map(|col| {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| col[b].total_cmp(&col[a]));
            (0..nf)
                .map(|f| {
                    let ap = ap_sorted(&order, |i| col[i], |i| labels[i] == f, positives[f])?;
                    if symmetric {
                        let anti =
                            ap_sorted(&order, |i| col[i], |i| labels[i] != f, n - positives[f])?;
                        Ok(ap.max(anti))
                    } else {
                        Ok(ap)
                    }
                })
                .collect()
        })
        .collect();
    let mut scores = Vec::with_capacity(m * nf);
    for r in per_neuron {
        scores.extend(r?);
    }
    Ok(FuncScores {
        functions: functions.to_vec(),
        neurons: m,
        scores,
    })
}
