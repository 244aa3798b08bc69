//! Controls for the survey's functional sets (§4): what a set of the same
//! shape does when it is *not* chosen by FuncScore, and what FuncScore looks
//! like when the labels carry no information.
//!
//! - [`matched_random_sets`]: for each `S_f`, a uniform random set with the
//!   same number of neurons in every group (each FFN for `TopScope::PerLayer`,
//!   the whole model for `Global`). Zeroing it measures how much any
//!   `|S_f|` neurons matter.
//! - [`matched_top_sets`]: for each `S_f`, the neurons with the highest
//!   `value` (for example the mean indicator over all examples), again with
//!   `S_f`'s count per group. Zeroing it measures how much the busiest
//!   neurons matter, whatever their functionality.
//! - [`func_score_null`]: the label-permutation null of FuncScore. The
//!   functionality labels are shuffled across examples (the profile is kept),
//!   FuncScore is recomputed, and a statistic of the top neurons is recorded
//!   per permutation; the observed statistic is compared with that
//!   distribution by the permutation p-value `(1 + #{null ≥ obs}) / (1 + K)`.
//!
//! A functional set is *specific* when zeroing it hurts its functionality
//! more than both controls do.

use tensor_core::rng::SplitMix64;
use tensor_core::tch::Tensor;

use crate::attribution::{AttributionConfig, FuncScores, func_scores};
use crate::error::{Error, Result, check_finite_slice};
use crate::profile::FfnSite;
use crate::sets::{NeuronSet, TopScope};

/// `[start, end)` of each group of neurons a set is matched within.
pub fn groups(sites: &[FfnSite], scope: TopScope) -> Vec<(usize, usize)> {
    match scope {
        TopScope::Global => vec![(0, sites.iter().map(|s| s.d_ff as usize).sum())],
        TopScope::PerLayer => sites
            .iter()
            .map(|s| (s.offset as usize, (s.offset + s.d_ff) as usize))
            .collect(),
    }
}

fn check_in_range(sets: &[NeuronSet], groups: &[(usize, usize)]) -> Result<()> {
    let end = groups.iter().map(|g| g.1).max().unwrap_or(0);
    for (i, s) in sets.iter().enumerate() {
        if let Some(&n) = s.iter().find(|&&n| n >= end) {
            return Err(Error::mismatch(
                format!("neuron set {i}"),
                format!("neuron indices below {end} (the profiled neurons)"),
                n,
            ));
        }
    }
    Ok(())
}

/// `set`'s number of neurons in each group.
fn counts(set: &NeuronSet, groups: &[(usize, usize)]) -> Vec<usize> {
    groups
        .iter()
        .map(|&(a, b)| set.iter().filter(|&&n| n >= a && n < b).count())
        .collect()
}

/// One uniform random set per input set, with the same count in every group
/// (sorted indices). The draw is reproducible from `rng`'s state.
pub fn matched_random_sets(
    sets: &[NeuronSet],
    sites: &[FfnSite],
    scope: TopScope,
    rng: &mut SplitMix64,
) -> Result<Vec<NeuronSet>> {
    let groups = groups(sites, scope);
    check_in_range(sets, &groups)?;
    Ok(sets
        .iter()
        .map(|s| {
            let mut out = Vec::with_capacity(s.len());
            for (&(a, b), k) in groups.iter().zip(counts(s, &groups)) {
                let mut pool: Vec<usize> = (a..b).collect();
                // Partial Fisher–Yates: the first k are a uniform k-subset.
                for i in 0..k {
                    let j = i + rng.below((pool.len() - i) as u64) as usize;
                    pool.swap(i, j);
                }
                out.extend_from_slice(&pool[..k]);
            }
            out.sort_unstable();
            out
        })
        .collect())
}

/// One set per input set: in every group, the `k` neurons with the highest
/// `values` (ties to the lower index), where `k` is the input set's count in
/// that group. `values` has one finite entry per profiled neuron.
pub fn matched_top_sets(
    sets: &[NeuronSet],
    sites: &[FfnSite],
    scope: TopScope,
    values: &[f64],
) -> Result<Vec<NeuronSet>> {
    let groups = groups(sites, scope);
    let total = groups.iter().map(|g| g.1).max().unwrap_or(0);
    if values.len() != total {
        return Err(Error::mismatch(
            "matched_top_sets values",
            format!("{total} values (one per profiled neuron)"),
            values.len(),
        ));
    }
    check_finite_slice("matched_top_sets values", values)?;
    check_in_range(sets, &groups)?;
    let ranked: Vec<Vec<usize>> = groups
        .iter()
        .map(|&(a, b)| {
            let mut idx: Vec<usize> = (a..b).collect();
            idx.sort_by(|&x, &y| values[y].total_cmp(&values[x]).then(x.cmp(&y)));
            idx
        })
        .collect();
    Ok(sets
        .iter()
        .map(|s| {
            let mut out: Vec<usize> = ranked
                .iter()
                .zip(counts(s, &groups))
                .flat_map(|(r, k)| r[..k].iter().copied())
                .collect();
            out.sort_unstable();
            out
        })
        .collect())
}

/// The label-permutation null of a FuncScore statistic.
#[derive(Debug, Clone, PartialEq)]
pub struct NullDistribution {
    /// The statistic under the true labels, one per functionality.
    pub observed: Vec<f64>,
    /// `null[k][f]`: the statistic under the `k`-th permutation.
    pub null: Vec<Vec<f64>>,
}

impl NullDistribution {
    /// `(1 + #{k : null[k][f] ≥ observed[f]}) / (1 + K)`.
    pub fn p_value(&self, f: usize) -> f64 {
        let hits = self
            .null
            .iter()
            .filter(|row| row[f] >= self.observed[f])
            .count();
        (1 + hits) as f64 / (1 + self.null.len()) as f64
    }

    /// The `q`-quantile (0..=1, nearest rank) of the null for functionality `f`.
    pub fn quantile(&self, f: usize, q: f64) -> f64 {
        let mut v: Vec<f64> = self.null.iter().map(|row| row[f]).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
    }

    pub fn null_mean(&self, f: usize) -> f64 {
        self.null.iter().map(|row| row[f]).sum::<f64>() / self.null.len().max(1) as f64
    }
}

/// FuncScore under `permutations` shuffles of `labels` (seeded), reduced by
/// `statistic` to one number per functionality, beside the same statistic
/// under the true labels. `profile` is `[examples, neurons]` as for
/// [`func_scores`].
pub fn func_score_null(
    profile: &Tensor,
    labels: &[usize],
    functions: &[String],
    config: &AttributionConfig,
    permutations: usize,
    seed: u64,
    statistic: impl Fn(&FuncScores) -> Result<Vec<f64>>,
) -> Result<NullDistribution> {
    if permutations == 0 {
        return Err(Error::config(
            "func_score_null needs at least one permutation",
        ));
    }
    let stat = |s: &FuncScores| -> Result<Vec<f64>> {
        let v = statistic(s)?;
        if v.len() != functions.len() {
            return Err(Error::mismatch(
                "func_score_null statistic",
                format!("{} values (one per functionality)", functions.len()),
                v.len(),
            ));
        }
        Ok(v)
    };
    let observed = stat(&func_scores(profile, labels, functions, config)?)?;
    let mut rng = SplitMix64::new(seed);
    let mut shuffled = labels.to_vec();
    let mut null = Vec::with_capacity(permutations);
    for _ in 0..permutations {
        rng.shuffle(&mut shuffled);
        null.push(stat(&func_scores(profile, &shuffled, functions, config)?)?);
    }
    Ok(NullDistribution { observed, null })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_core::tch::{Device, Kind};

    fn sites() -> Vec<FfnSite> {
        (0..3)
            .map(|i| FfnSite {
                path: format!("layer{i}"),
                offset: 10 * i,
                d_ff: 10,
            })
            .collect()
    }

    #[test]
    fn random_sets_keep_per_layer_counts_and_are_reproducible() {
        let sets = vec![vec![0, 1, 12, 25, 26, 27], vec![9, 19, 29]];
        let s = sites();
        let a =
            matched_random_sets(&sets, &s, TopScope::PerLayer, &mut SplitMix64::new(3)).unwrap();
        let b =
            matched_random_sets(&sets, &s, TopScope::PerLayer, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(a, b);
        let g = groups(&s, TopScope::PerLayer);
        for (x, r) in sets.iter().zip(&a) {
            assert_eq!(counts(x, &g), counts(r, &g));
            let mut d = r.clone();
            d.dedup();
            assert_eq!(d.len(), r.len(), "no neuron twice");
        }
        let global =
            matched_random_sets(&sets, &s, TopScope::Global, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(global[0].len(), 6);
        assert!(global[0].iter().all(|&n| n < 30));
        let bad = matched_random_sets(&[vec![30]], &s, TopScope::PerLayer, &mut SplitMix64::new(0));
        assert!(bad.unwrap_err().to_string().contains("neuron set 0"));
    }

    #[test]
    fn random_sets_are_uniform_within_a_layer() {
        // One neuron per layer, many draws: every neuron of layer 0 is hit.
        let s = sites();
        let mut rng = SplitMix64::new(7);
        let mut hits = [0usize; 10];
        for _ in 0..2000 {
            let r = matched_random_sets(&[vec![4]], &s, TopScope::PerLayer, &mut rng).unwrap();
            hits[r[0][0]] += 1;
        }
        assert!(hits.iter().all(|&h| (140..=260).contains(&h)), "{hits:?}");
    }

    #[test]
    fn top_sets_take_the_highest_values_per_layer() {
        let s = sites();
        let values: Vec<f64> = (0..30).map(|n| ((n * 7) % 30) as f64).collect();
        let sets = vec![vec![0, 1, 20]];
        let t = matched_top_sets(&sets, &s, TopScope::PerLayer, &values).unwrap();
        // Layer 0: values 0,7,14,21,28,5,12,19,26,3 -> best two at 4 (28), 8 (26).
        // Layer 2: values at 20..30 are 20,27,4,11,18,25,2,9,16,23 -> best at 21 (27).
        assert_eq!(t, vec![vec![4, 8, 21]]);
        assert!(matched_top_sets(&sets, &s, TopScope::PerLayer, &values[..29]).is_err());
        let mut nan = values.clone();
        nan[3] = f64::NAN;
        assert!(matched_top_sets(&sets, &s, TopScope::PerLayer, &nan).is_err());
    }

    #[test]
    fn permutation_null_separates_informative_from_random_labels() {
        // 40 examples, 2 functionalities; neuron 0 encodes the label, the rest are noise.
        let n = 40i64;
        let labels: Vec<usize> = (0..n as usize).map(|i| i % 2).collect();
        tensor_core::tch::manual_seed(0);
        let noise = Tensor::rand([n, 5], (Kind::Float, Device::Cpu));
        let signal =
            Tensor::from_slice(&labels.iter().map(|&l| l as f32).collect::<Vec<_>>()).unsqueeze(1);
        let p = Tensor::cat(&[signal, noise], 1);
        let names = vec!["a".to_string(), "b".to_string()];
        let best = |s: &FuncScores| -> Result<Vec<f64>> {
            Ok((0..2)
                .map(|f| s.column(f).into_iter().fold(f64::MIN, f64::max))
                .collect())
        };
        let cfg = AttributionConfig::default();
        let d = func_score_null(&p, &labels, &names, &cfg, 19, 1, best).unwrap();
        assert_eq!(d.null.len(), 19);
        assert!(
            (d.observed[1] - 1.0).abs() < 1e-12,
            "neuron 0 ranks b perfectly"
        );
        assert!((d.p_value(1) - 1.0 / 20.0).abs() < 1e-12);
        assert!(d.quantile(1, 0.5) < 0.9);
        // Same seed, same null.
        let e = func_score_null(&p, &labels, &names, &cfg, 19, 1, best).unwrap();
        assert_eq!(d, e);
        // Without the signal column the observed maximum is an ordinary draw.
        let q = p.narrow(1, 1, 5);
        let r = func_score_null(&q, &labels, &names, &cfg, 19, 1, best).unwrap();
        assert!(r.p_value(1) > 0.05, "{}", r.p_value(1));
        assert!(func_score_null(&p, &labels, &names, &cfg, 0, 1, best).is_err());
    }
}
