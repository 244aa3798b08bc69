//! Apply EMoE to a model and fold it back: steps 1–8 of EMoE (Qiu et al.
//! 2023, "Unlocking Emergent Modularity in LLMs";
//! docs/emergent-split.md, Method, part 1) over chosen layers; MoEfication
//! (Zhang et al. 2022) splits through the same entry point with given labels.
//!
//! For each chosen `FeedForward` (found by type through `ModuleExt::find`,
//! e.g. `encoder.layer.7.(ffn)`): split its neurons (`a: [d_ff] → [N]`, by
//! k-means, a baseline, or cached labels: `labels_from_file`), permute them
//! into blocks, and replace the slot with an [`EmoeFfn`] computing
//! `y = Σ_{e ∈ top-k} g_e act(W1_e x + b1_e) W2_eᵀ + b2`.
//! [`fold_back`] replaces every `EmoeFfn` by the dense `FeedForward`
//! `W2 act(W1 x + b1) + b2` with `π⁻¹` applied (EMoE step 8: drop the
//! selection; `b2` is kept as is when it is added once, or becomes
//! `k · mean_e b2_e` under the Tutel bookkeeping, `fold_b2 = k_mean`).
//!
//! [`EmoeConfig`] holds every open choice of docs/emergent-split.md, Method, part 1
//! (the gate's, the split's and `labels_from_file`) and reads from / writes to JSON.
//!
//! Layers are named by index, the last all-digit segment of the FFN's path
//! (`encoder.layer.7.(ffn)` → 7, `h.3.(ffn)` → 3), or chosen by a predicate on
//! the path. All splits are computed before any slot is replaced, so a
//! failure leaves the model unchanged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tensor_core::layers::FeedForward;
use tensor_core::module::{downcast_ref, is};
use tensor_core::{Module, ModuleExt};

use crate::error::{Error, Result};
use crate::gate::GateConfig;
use crate::kmeans::{KMeansConfig, KMeansSolver, objective};
use crate::labels::LabelFile;
use crate::moe_ffn::{ComputePath, EmoeFfn};
use crate::regularise::Regularisers;
use crate::split::{
    ExpertSplit, SplitMethod, contiguous_split, key_vectors, kmeans_split, random_split,
};

/// How each layer's neurons are split. JSON: `{"kmeans": {...}}` (every
/// field optional), `{"random": {"seed": 0}}` or `"contiguous"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitStrategy {
    /// Balanced k-means on the normalised keys (EMoE's default: seed 0, at
    /// most 1000 iterations), with [`KMeansConfig`]'s restarts, solver and
    /// polish.
    #[serde(rename = "kmeans")]
    KMeans {
        #[serde(default)]
        seed: u64,
        #[serde(default = "default_max_iters")]
        max_iters: usize,
        #[serde(default = "default_n_init")]
        n_init: usize,
        /// The spec's `kmeans_solver`.
        #[serde(default)]
        kmeans_solver: KMeansSolver,
        #[serde(default = "default_true")]
        swap_refine: bool,
    },
    Random {
        #[serde(default)]
        seed: u64,
    },
    Contiguous,
}

fn default_max_iters() -> usize {
    KMeansConfig::new(1).max_iters
}

fn default_n_init() -> usize {
    KMeansConfig::new(1).n_init
}

fn default_true() -> bool {
    true
}

impl Default for SplitStrategy {
    /// k-means with [`KMeansConfig::new`]'s defaults.
    fn default() -> Self {
        let d = KMeansConfig::new(1);
        SplitStrategy::KMeans {
            seed: d.seed,
            max_iters: d.max_iters,
            n_init: d.n_init,
            kmeans_solver: d.kmeans_solver,
            swap_refine: d.swap_refine,
        }
    }
}

impl SplitStrategy {
    /// The [`KMeansConfig`] of a k-means strategy for `N` experts.
    pub fn kmeans_config(&self, num_experts: usize) -> Option<KMeansConfig> {
        match *self {
            SplitStrategy::KMeans {
                seed,
                max_iters,
                n_init,
                kmeans_solver,
                swap_refine,
            } => Some(KMeansConfig {
                seed,
                max_iters,
                n_init,
                kmeans_solver,
                swap_refine,
                ..KMeansConfig::new(num_experts)
            }),
            _ => None,
        }
    }
}

/// What [`convert`] builds; JSON-serialisable (only `gate.num_experts` and
/// `gate.top_k` are required).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmoeConfig {
    /// `N`, `k`, weights, noise, bias term, select signal, refresh momentum, `b2`.
    pub gate: GateConfig,
    #[serde(default)]
    pub split: SplitStrategy,
    #[serde(default)]
    pub compute: ComputePath,
    /// The spec's `labels_from_file`: take every converted layer's split
    /// from this `.json` / `.safetensors` file ([`crate::labels`]) instead of
    /// `split`; a layer missing from it is an error.
    #[serde(default)]
    pub labels_from_file: Option<PathBuf>,
    /// The Tutel-path extras (expert dropout, CV² loss, capacity with
    /// priority routing); absent from JSON: the reference's
    /// [`Regularisers::tutel`].
    #[serde(default)]
    pub regularisers: Regularisers,
}

impl EmoeConfig {
    /// EMoE's defaults for encoder models: k-means split (seed 0), hard
    /// top-k, Tutel noise `1/N` in training, sparse inference.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            gate: GateConfig::new(num_experts, top_k),
            split: SplitStrategy::default(),
            compute: ComputePath::Auto,
            labels_from_file: None,
            regularisers: Regularisers::tutel(),
        }
    }

    /// [`Self::new`] without the Tutel-path extras (plain avg-k).
    pub fn plain(num_experts: usize, top_k: usize) -> Self {
        Self {
            regularisers: Regularisers::none(),
            ..Self::new(num_experts, top_k)
        }
    }

    /// Parse and validate a JSON object.
    pub fn from_json(s: &str) -> Result<Self> {
        let c: Self =
            serde_json::from_str(s).map_err(|e| Error::config(format!("EMoE config JSON: {e}")))?;
        c.gate.validate()?;
        c.regularisers.validate()?;
        Ok(c)
    }
}

/// One converted layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    pub path: String,
    pub layer: Option<usize>,
    pub d_ff: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub method: SplitMethod,
    /// k-means objective of the split on the normalised keys.
    pub objective: f64,
    /// The same objective for a random balanced split (seed 0), for comparison.
    pub random_objective: f64,
    pub kmeans_iterations: usize,
}

/// What [`convert`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConvertReport {
    pub layers: Vec<LayerReport>,
}

/// The layer index in a module path: its last all-digit segment.
pub fn layer_index(path: &str) -> Option<usize> {
    path.split('.')
        .rev()
        .find(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
}

/// The reference implementation's placement for encoder fine-tuning: one
/// converted FFN in the upper half, never the last layer: BERT-base's layer
/// 10 of 12 (0-based), scaled to other depths as `round(10 · L / 12)`
/// clamped to `[L / 2, L - 2]` (`L - 2` winning when they cross): `L = 12` → `[10]`, `6` → `[4]`, `24` → `[20]`.
/// Models of fewer than 2 layers get their last layer.
pub fn reference_layers(num_layers: usize) -> Vec<usize> {
    if num_layers < 2 {
        return num_layers.checked_sub(1).into_iter().collect();
    }
    let scaled = (10.0 * num_layers as f64 / 12.0).round() as usize;
    let hi = num_layers - 2;
    vec![scaled.clamp((num_layers / 2).min(hi), hi)]
}

/// An alternative placement, every other layer of the last half, ending at
/// the last layer: `num_layers = 12` → `[7, 9, 11]`, `6` → `[3, 5]`.
pub fn every_other_in_last_half(num_layers: usize) -> Vec<usize> {
    let start = num_layers / 2;
    (start..num_layers)
        .filter(|i| (num_layers - 1 - i).is_multiple_of(2))
        .collect()
}

/// Paths of every dense `FeedForward` in `model`.
pub fn ffn_paths<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    model.find(&mut |_, m| is::<FeedForward>(m))
}

/// Paths of every `EmoeFfn` in `model`.
pub fn emoe_paths<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    model.find(&mut |_, m| is::<EmoeFfn>(m))
}

fn split_for(ffn: &FeedForward, cfg: &EmoeConfig) -> Result<ExpertSplit> {
    let n = cfg.gate.num_experts;
    let d_ff = ffn.d_ff()? as usize;
    match cfg.split {
        SplitStrategy::KMeans { .. } => kmeans_split(
            ffn,
            &cfg.split.kmeans_config(n).expect("a k-means strategy"),
        ),
        SplitStrategy::Random { seed } => random_split(d_ff, n, seed),
        SplitStrategy::Contiguous => contiguous_split(d_ff, n),
    }
}

/// Convert the FFNs whose layer index is in `layers` (every one must match
/// at least one FFN).
pub fn convert<M: ModuleExt + ?Sized>(
    model: &mut M,
    layers: &[usize],
    cfg: &EmoeConfig,
) -> Result<ConvertReport> {
    let all = ffn_paths(model);
    for &l in layers {
        if !all.iter().any(|p| layer_index(p) == Some(l)) {
            return Err(Error::UnknownLayer {
                layer: l,
                available: all.clone(),
            });
        }
    }
    convert_where(
        model,
        &mut |p| layer_index(p).is_some_and(|i| layers.contains(&i)),
        cfg,
    )
}

/// Convert the FFNs whose path satisfies `pred`.
pub fn convert_where<M: ModuleExt + ?Sized>(
    model: &mut M,
    pred: &mut dyn FnMut(&str) -> bool,
    cfg: &EmoeConfig,
) -> Result<ConvertReport> {
    let paths: Vec<String> = ffn_paths(model).into_iter().filter(|p| pred(p)).collect();
    match &cfg.labels_from_file {
        Some(file) => {
            let labels = LabelFile::load(file)?;
            let n = cfg.gate.num_experts;
            convert_paths_with(model, &paths, cfg, &mut |path, ffn| {
                labels.split_for(path, ffn.d_ff()? as usize, n)
            })
        }
        None => convert_paths_with(model, &paths, cfg, &mut |_, ffn| split_for(ffn, cfg)),
    }
}

/// Convert the FFNs at `paths` with splits from `split` (e.g. MoEfication's
/// co-activation split from profiled activations, or labels from a file).
pub fn convert_paths_with<M: ModuleExt + ?Sized>(
    model: &mut M,
    paths: &[String],
    cfg: &EmoeConfig,
    split: &mut dyn FnMut(&str, &FeedForward) -> Result<ExpertSplit>,
) -> Result<ConvertReport> {
    cfg.gate.validate()?;
    cfg.regularisers.validate()?;
    let mut built = Vec::with_capacity(paths.len());
    let mut report = ConvertReport::default();
    for path in paths {
        let m = model.get(path)?;
        let ffn = downcast_ref::<FeedForward>(m).ok_or_else(|| Error::WrongModule {
            path: path.clone(),
            found: m.kind().to_owned(),
            expected: "FeedForward",
        })?;
        let s = split(path, ffn)?;
        let mut e = EmoeFfn::from_ffn(ffn, &s, cfg.gate.clone())?;
        e.path = cfg.compute;
        e.regularisers = cfg.regularisers;
        let keys = crate::kmeans::normalize_rows(&key_vectors(ffn)?)?;
        let n = s.num_experts;
        report.layers.push(LayerReport {
            path: path.clone(),
            layer: layer_index(path),
            d_ff: s.d_ff(),
            num_experts: n,
            top_k: cfg.gate.top_k,
            method: s.method,
            objective: match s.objective {
                Some(o) if s.method == SplitMethod::KMeans => o,
                _ => objective(&keys, &s.labels, n)?,
            },
            random_objective: objective(&keys, &random_split(s.d_ff(), n, 0)?.labels, n)?,
            kmeans_iterations: s.history.len(),
        });
        built.push((path.clone(), e));
    }
    for (path, e) in built {
        model.replace(&path, Box::new(e))?;
    }
    Ok(report)
}

/// Recompute every `EmoeFfn`'s gate from its current weights; call after
/// each optimiser step. Returns how many gates were refreshed.
pub fn refresh_gates<M: ModuleExt + ?Sized>(model: &mut M) -> Result<usize> {
    let paths = emoe_paths(model);
    for p in &paths {
        model.get_as_mut::<EmoeFfn>(p)?.refresh_gate()?;
    }
    Ok(paths.len())
}

/// Replace every `EmoeFfn` by its dense `FeedForward` (permutation undone,
/// current weights, trainability kept). Returns the folded paths.
pub fn fold_back<M: ModuleExt + ?Sized>(model: &mut M) -> Result<Vec<String>> {
    let paths = emoe_paths(model);
    let mut dense = Vec::with_capacity(paths.len());
    for p in &paths {
        dense.push(model.get_as::<EmoeFfn>(p)?.to_dense(true)?);
    }
    for (p, d) in paths.iter().zip(dense) {
        model.replace(p, Box::new(d) as Box<dyn Module>)?;
    }
    Ok(paths)
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    #[test]
    fn reference_placement_is_one_upper_layer_never_the_last() {
        assert_eq!(reference_layers(12), vec![10]);
        assert_eq!(reference_layers(6), vec![4]);
        assert_eq!(reference_layers(24), vec![20]);
        assert_eq!(reference_layers(2), vec![0]);
        assert_eq!(reference_layers(1), vec![0]);
        assert!(reference_layers(0).is_empty());
        for l in 2..64 {
            let r = reference_layers(l)[0];
            assert!(r >= (l / 2).min(l - 2) && r <= l - 2, "{l}: {r}");
        }
        assert_eq!(every_other_in_last_half(12), vec![7, 9, 11]);
    }
}
