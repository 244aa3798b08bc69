//! Classification metrics with scikit-learn's semantics, on class ids
//! (`predictions`, `labels`):
//!
//! - accuracy: `mean(pred == label)` (`accuracy_score`);
//! - confusion matrix `C[i][j]`: examples of true class `labels[i]` predicted
//!   as `labels[j]`, over the sorted union of the classes seen in either
//!   array (`confusion_matrix`);
//! - macro-F1: the unweighted mean over that union of
//!   `F1_c = 2 TP / (2 TP + FP + FN)`, 0 when the denominator is 0
//!   (`f1_score(average='macro', zero_division=0)`);
//! - Matthews correlation, multiclass (Gorodkin 2004, `matthews_corrcoef`):
//!   with `t_k`/`p_k` the true/predicted counts of class `k`, `c` the correct
//!   and `s` all examples,
//!   `MCC = (c·s − Σ t_k p_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))`, and 0 when
//!   the denominator is 0 (e.g. everything in one class).

use std::collections::BTreeMap;

use crate::TchResultExt;
use crate::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

fn check(op: &str, predictions: &[i64], labels: &[i64]) -> Result<()> {
    if predictions.len() != labels.len() {
        return Err(Error::invalid(format!(
            "{op}: {} predictions but {} labels",
            predictions.len(),
            labels.len()
        )));
    }
    if predictions.is_empty() {
        return Err(Error::invalid(format!("{op}: no examples")));
    }
    Ok(())
}

/// Fraction of predictions equal to their label.
pub fn accuracy(predictions: &[i64], labels: &[i64]) -> Result<f64> {
    check("accuracy", predictions, labels)?;
    let correct = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(correct as f64 / labels.len() as f64)
}

/// Counts of (true class, predicted class) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    /// The classes, sorted: the union of those in the labels and predictions.
    pub classes: Vec<i64>,
    /// `counts[i][j]`: examples of class `classes[i]` predicted as `classes[j]`.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    pub fn new(predictions: &[i64], labels: &[i64]) -> Result<Self> {
        check("confusion_matrix", predictions, labels)?;
        let index: BTreeMap<i64, usize> = {
            let mut all: Vec<i64> = predictions.iter().chain(labels).copied().collect();
            all.sort_unstable();
            all.dedup();
            all.into_iter().enumerate().map(|(i, c)| (c, i)).collect()
        };
        let k = index.len();
        let mut counts = vec![vec![0u64; k]; k];
        for (p, l) in predictions.iter().zip(labels) {
            counts[index[l]][index[p]] += 1;
        }
        Ok(Self {
            classes: index.into_keys().collect(),
            counts,
        })
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Examples per true class (row sums).
    pub fn true_counts(&self) -> Vec<u64> {
        self.counts.iter().map(|r| r.iter().sum()).collect()
    }

    /// Examples per predicted class (column sums).
    pub fn predicted_counts(&self) -> Vec<u64> {
        (0..self.classes.len())
            .map(|j| self.counts.iter().map(|r| r[j]).sum())
            .collect()
    }

    pub fn correct(&self) -> u64 {
        (0..self.classes.len()).map(|i| self.counts[i][i]).sum()
    }

    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / self.total() as f64
    }

    /// F1 of each class, in `classes` order (0 where undefined).
    pub fn f1_per_class(&self) -> Vec<f64> {
        let (t, p) = (self.true_counts(), self.predicted_counts());
        (0..self.classes.len())
            .map(|i| {
                let tp = self.counts[i][i];
                let denom = t[i] + p[i]; // = 2 TP + FP + FN
                if denom == 0 {
                    0.0
                } else {
                    2.0 * tp as f64 / denom as f64
                }
            })
            .collect()
    }

    pub fn macro_f1(&self) -> f64 {
        let f1 = self.f1_per_class();
        f1.iter().sum::<f64>() / f1.len() as f64
    }

    pub fn mcc(&self) -> f64 {
        let (t, p) = (self.true_counts(), self.predicted_counts());
        let s = self.total() as i128;
        let c = self.correct() as i128;
        let dot = |a: &[u64], b: &[u64]| -> i128 {
            a.iter().zip(b).map(|(&x, &y)| x as i128 * y as i128).sum()
        };
        let cov_ytyp = c * s - dot(&t, &p);
        let cov_ypyp = s * s - dot(&p, &p);
        let cov_ytyt = s * s - dot(&t, &t);
        if cov_ypyp == 0 || cov_ytyt == 0 {
            return 0.0;
        }
        cov_ytyp as f64 / ((cov_ytyt * cov_ypyp) as f64).sqrt()
    }
}

/// Unweighted mean of the per-class F1 over the classes seen in either array.
pub fn macro_f1(predictions: &[i64], labels: &[i64]) -> Result<f64> {
    Ok(ConfusionMatrix::new(predictions, labels)?.macro_f1())
}

/// Matthews correlation coefficient (multiclass), in `[-1, 1]`.
pub fn matthews_corrcoef(predictions: &[i64], labels: &[i64]) -> Result<f64> {
    Ok(ConfusionMatrix::new(predictions, labels)?.mcc())
}

pub fn confusion_matrix(predictions: &[i64], labels: &[i64]) -> Result<ConfusionMatrix> {
    ConfusionMatrix::new(predictions, labels)
}

/// Accuracy, macro-F1 and MCC together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassificationMetrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub mcc: f64,
    pub examples: usize,
}

impl ClassificationMetrics {
    pub fn new(predictions: &[i64], labels: &[i64]) -> Result<Self> {
        let cm = ConfusionMatrix::new(predictions, labels)?;
        Ok(Self {
            accuracy: cm.accuracy(),
            macro_f1: cm.macro_f1(),
            mcc: cm.mcc(),
            examples: labels.len(),
        })
    }
}

impl std::fmt::Display for ClassificationMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accuracy {:.4}  macro-F1 {:.4}  MCC {:.4}  ({} examples)",
            self.accuracy, self.macro_f1, self.mcc, self.examples
        )
    }
}

/// Class ids from a tensor of any integer dtype and device (flattened), or
/// the argmax over the last dimension when `t` holds floating-point scores.
pub fn class_ids(t: &Tensor) -> Result<Vec<i64>> {
    let kind = t.f_kind().op("class_ids")?;
    let ids = if crate::device::is_float(kind) {
        t.f_argmax(-1, false).op("class_ids")?
    } else if kind == Kind::Bool {
        return Err(Error::invalid(
            "class_ids: got a bool tensor, not class ids",
        ));
    } else {
        t.shallow_clone()
    };
    let flat = ids
        .f_to_kind(Kind::Int64)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_flatten(0, -1))
        .op("class_ids")?;
    Vec::<i64>::try_from(&flat).op("class_ids")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURE: &str = include_str!("../../tests/fixtures/train/metrics.json");

    fn ints(v: &Value) -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    }

    /// Nine fixed cases (degenerate ones included) against scikit-learn
    /// (scripts/train_reference.py).
    #[test]
    fn matches_sklearn() {
        let fx: Value = serde_json::from_str(FIXTURE).unwrap();
        let mut worst = 0.0f64;
        for case in fx["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let (p, l) = (ints(&case["preds"]), ints(&case["labels"]));
            for (what, got, want) in [
                ("accuracy", accuracy(&p, &l).unwrap(), &case["accuracy"]),
                ("macro_f1", macro_f1(&p, &l).unwrap(), &case["macro_f1"]),
                ("mcc", matthews_corrcoef(&p, &l).unwrap(), &case["mcc"]),
            ] {
                let want = want.as_f64().unwrap();
                let err = (got - want).abs();
                assert!(err <= 1e-12, "{name} {what}: {got} vs sklearn {want}");
                worst = worst.max(err);
            }
            let cm = confusion_matrix(&p, &l).unwrap();
            assert_eq!(cm.classes, ints(&case["confusion_labels"]), "{name}");
            let want: Vec<Vec<u64>> = case["confusion"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| ints(r).into_iter().map(|x| x as u64).collect())
                .collect();
            assert_eq!(cm.counts, want, "{name}");
        }
        eprintln!("metrics vs sklearn: max abs err {worst:e}");
    }

    #[test]
    fn degenerate_cases() {
        // Everything one class: MCC is defined as 0, F1 of that class is 1.
        let m = ClassificationMetrics::new(&[2, 2, 2], &[2, 2, 2]).unwrap();
        assert_eq!((m.accuracy, m.macro_f1, m.mcc), (1.0, 1.0, 0.0));
        // Constant predictions: MCC 0.
        assert_eq!(
            matthews_corrcoef(&[0, 0, 0, 0], &[0, 1, 1, 0]).unwrap(),
            0.0
        );
        // Perfect binary: MCC 1; swapped: -1.
        assert_eq!(
            matthews_corrcoef(&[0, 1, 0, 1], &[0, 1, 0, 1]).unwrap(),
            1.0
        );
        assert_eq!(
            matthews_corrcoef(&[1, 0, 1, 0], &[0, 1, 0, 1]).unwrap(),
            -1.0
        );
        let cm = confusion_matrix(&[1, 1, 0], &[0, 1, 0]).unwrap();
        assert_eq!(cm.counts, vec![vec![1, 1], vec![0, 1]]);
        assert_eq!(cm.true_counts(), vec![2, 1]);
        assert_eq!(cm.predicted_counts(), vec![1, 2]);
        assert!(format!("{m}").contains("MCC 0.0000"));
    }

    #[test]
    fn bad_input_is_an_error() {
        let e = accuracy(&[1, 2], &[1]).unwrap_err().to_string();
        assert!(e.contains("2 predictions but 1 labels"), "{e}");
        assert!(
            macro_f1(&[], &[])
                .unwrap_err()
                .to_string()
                .contains("no examples")
        );
        assert!(matthews_corrcoef(&[1], &[]).is_err());
        assert!(class_ids(&Tensor::from_slice(&[true, false])).is_err());
    }

    #[test]
    fn class_ids_from_scores_and_ids() {
        // Scores and ids on the test device, the ids read back to the host.
        let dev = crate::testing::device();
        let scores = Tensor::from_slice(&[0.1f32, 0.9, 0.8, 0.2, 0.3, 0.7])
            .reshape([3, 2])
            .to_device(dev);
        assert_eq!(class_ids(&scores).unwrap(), vec![1, 0, 1]);
        let ids = Tensor::from_slice(&[3i32, 1, 2]).to_device(dev);
        assert_eq!(class_ids(&ids).unwrap(), vec![3, 1, 2]);
    }
}
