//! Functional sets and their overlap (survey §4, "Functional sets" and
//! "Overlap").
//!
//! `S_f` = the top `top_fraction` of neurons by FuncScore(·, f), per layer
//! or over the whole model (`top_scope`), minus resident neurons
//! (`resident_rule`: those in every functionality's set, or always on).
//!
//! `O(f, g) = |S_f ∩ S_g| / |S_f|` (`OverlapFormula::OverSize`, the default:
//! its random baseline is the top fraction, 0.05 for 5%), or Jaccard
//! `|S_f ∩ S_g| / |S_f ∪ S_g|`. The survey does not state its formula.
//!
//! Partition by function (docs/configurable-bricks.md, Method step 6): each
//! neuron of some set goes to the functionality where its FuncScore is highest
//! among the sets holding it.

use serde::{Deserialize, Serialize};
use tensor_core::rng::SplitMix64;

use crate::attribution::FuncScores;
use crate::error::{Error, Result};
use crate::profile::FfnSite;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TopScope {
    /// The top fraction of each FFN's neurons.
    #[default]
    PerLayer,
    /// The top fraction of all profiled neurons.
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResidentRule {
    /// Keep every selected neuron.
    None,
    /// Drop neurons that are in every functionality's set.
    #[default]
    InEverySet,
    /// Also drop the `fraction` of neurons with the highest mean indicator over all examples.
    InEverySetOrAlwaysOn { fraction: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverlapFormula {
    /// `|S_f ∩ S_g| / |S_f|`
    #[default]
    OverSize,
    /// `|S_f ∩ S_g| / |S_f ∪ S_g|`
    Jaccard,
}

/// Open points of the functional sets (JSON-serialisable).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SetConfig {
    pub top_fraction: f64,
    pub top_scope: TopScope,
    pub resident_rule: ResidentRule,
}

impl Default for SetConfig {
    fn default() -> Self {
        Self {
            top_fraction: 0.05,
            top_scope: TopScope::PerLayer,
            resident_rule: ResidentRule::InEverySet,
        }
    }
}

/// A set of neurons by global index (sorted, distinct).
pub type NeuronSet = Vec<usize>;

/// Indices of the `k` largest values (ties to the lower index), sorted ascending.
fn top_k(values: &[(usize, f64)], k: usize) -> Vec<usize> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out: Vec<usize> = v.into_iter().take(k).map(|(i, _)| i).collect();
    out.sort_unstable();
    out
}

fn count_for(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).round() as usize).clamp(1, n)
}

/// `S_f` for every functionality. `neuron_means` (mean indicator per
/// neuron over all examples) is needed by `InEverySetOrAlwaysOn` only.
pub fn functional_sets(
    scores: &FuncScores,
    sites: &[FfnSite],
    config: &SetConfig,
    neuron_means: Option<&[f64]>,
) -> Result<Vec<NeuronSet>> {
    if !(config.top_fraction > 0.0 && config.top_fraction <= 1.0) {
        return Err(Error::config(format!(
            "top_fraction {} must be in (0, 1]",
            config.top_fraction
        )));
    }
    let total: i64 = sites.iter().map(|s| s.d_ff).sum();
    if total as usize != scores.neurons {
        return Err(Error::mismatch(
            "functional_sets sites",
            format!("{} neurons (the scores')", scores.neurons),
            total,
        ));
    }
    let nf = scores.functions.len();
    let mut sets: Vec<NeuronSet> = (0..nf)
        .map(|f| {
            let col: Vec<(usize, f64)> = scores.column(f).into_iter().enumerate().collect();
            match config.top_scope {
                TopScope::Global => top_k(&col, count_for(config.top_fraction, col.len())),
                TopScope::PerLayer => {
                    let mut out = Vec::new();
                    for s in sites {
                        let (a, b) = (s.offset as usize, (s.offset + s.d_ff) as usize);
                        out.extend(top_k(&col[a..b], count_for(config.top_fraction, b - a)));
                    }
                    out
                }
            }
        })
        .collect();
    let mut resident = vec![false; scores.neurons];
    match config.resident_rule {
        ResidentRule::None => {}
        ResidentRule::InEverySet | ResidentRule::InEverySetOrAlwaysOn { .. } => {
            let mut count = vec![0usize; scores.neurons];
            for s in &sets {
                for &n in s {
                    count[n] += 1;
                }
            }
            for (r, c) in resident.iter_mut().zip(count) {
                *r = c == nf;
            }
        }
    }
    if let ResidentRule::InEverySetOrAlwaysOn { fraction } = config.resident_rule {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::config(format!(
                "always-on fraction {fraction} must be in [0, 1]"
            )));
        }
        let means = neuron_means.ok_or_else(|| {
            Error::config(
                "resident_rule in_every_set_or_always_on needs the neurons' mean indicator",
            )
        })?;
        if means.len() != scores.neurons {
            return Err(Error::mismatch("neuron_means", scores.neurons, means.len()));
        }
        let k = (fraction * means.len() as f64).round() as usize;
        let all: Vec<(usize, f64)> = means.iter().copied().enumerate().collect();
        for n in top_k(&all, k) {
            resident[n] = true;
        }
    }
    for s in &mut sets {
        s.retain(|&n| !resident[n]);
    }
    Ok(sets)
}

fn intersection(a: &[usize], b: &[usize]) -> usize {
    let (mut i, mut j, mut c) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                c += 1;
                i += 1;
                j += 1;
            }
        }
    }
    c
}

fn check_set(s: &[usize]) -> Result<()> {
    if s.windows(2).all(|w| w[0] < w[1]) {
        Ok(())
    } else {
        Err(Error::config(
            "a neuron set must be sorted and without repeats",
        ))
    }
}

/// `O[f][g]` for all pairs of sets (an empty `S_f` gives a row of zeros).
pub fn overlap_matrix(sets: &[NeuronSet], formula: OverlapFormula) -> Result<Vec<Vec<f64>>> {
    for s in sets {
        check_set(s)?;
    }
    Ok(sets
        .iter()
        .map(|a| {
            sets.iter()
                .map(|b| {
                    let i = intersection(a, b) as f64;
                    let denom = match formula {
                        OverlapFormula::OverSize => a.len() as f64,
                        OverlapFormula::Jaccard => (a.len() + b.len()) as f64 - i,
                    };
                    if denom == 0.0 { 0.0 } else { i / denom }
                })
                .collect()
        })
        .collect())
}

/// Mean overlap matrix of random sets with the same sizes (per layer when
/// the sets were chosen per layer), over `trials` seeded draws.
pub fn random_overlap_baseline(
    sets: &[NeuronSet],
    sites: &[FfnSite],
    scope: TopScope,
    formula: OverlapFormula,
    trials: usize,
    seed: u64,
) -> Result<Vec<Vec<f64>>> {
    if trials == 0 {
        return Err(Error::config(
            "random_overlap_baseline needs at least one trial",
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let nf = sets.len();
    let mut acc = vec![vec![0.0; nf]; nf];
    for _ in 0..trials {
        let random = crate::controls::matched_random_sets(sets, sites, scope, &mut rng)?;
        let o = overlap_matrix(&random, formula)?;
        for f in 0..nf {
            for g in 0..nf {
                acc[f][g] += o[f][g] / trials as f64;
            }
        }
    }
    Ok(acc)
}

/// Each neuron's functionality (`None` if in no set): a shared neuron goes
/// to the set where its FuncScore is highest.
pub fn partition_by_function(
    scores: &FuncScores,
    sets: &[NeuronSet],
) -> Result<Vec<Option<usize>>> {
    if sets.len() != scores.functions.len() {
        return Err(Error::mismatch(
            "partition_by_function sets",
            format!("{} sets (one per functionality)", scores.functions.len()),
            sets.len(),
        ));
    }
    let mut owner: Vec<Option<usize>> = vec![None; scores.neurons];
    for (f, s) in sets.iter().enumerate() {
        check_set(s)?;
        for &n in s {
            if n >= scores.neurons {
                return Err(Error::mismatch(
                    "neuron set",
                    format!("indices below {}", scores.neurons),
                    n,
                ));
            }
            owner[n] = match owner[n] {
                Some(g) if scores.get(n, g) >= scores.get(n, f) => Some(g),
                _ => Some(f),
            };
        }
    }
    Ok(owner)
}
