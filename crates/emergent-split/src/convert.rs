//! Apply EMoE to a model and fold it back: steps 1–8 of EMoE (Qiu et al.
//! 2023, "Emergent Modularity in Pre-trained Transformers", §3.1 of
//! METHODS.md) over chosen layers; MoEfication (Zhang et al. 2022) splits
//! through the same entry point with given labels.
//!
//! For each chosen `FeedForward` (found by type through `ModuleExt::find`,
//! e.g. `encoder.layer.7.(ffn)`): split its neurons (`a: [d_ff] → [N]`),
//! permute them into blocks, and replace the slot with an [`EmoeFfn`]
//! computing `y = Σ_{e ∈ top-k} g_e act(W1_e x + b1_e) W2_eᵀ + b2`.
//! [`fold_back`] replaces every `EmoeFfn` by the dense `FeedForward`
//! `W2 act(W1 x + b1) + b2` with `π⁻¹` applied (EMoE step 8: drop the
//! selection; `b2` is kept as is because it is added once).
//!
//! Layers are named by index, the last all-digit segment of the FFN's path
//! (`encoder.layer.7.(ffn)` → 7, `h.3.(ffn)` → 3), or chosen by a predicate on
//! the path. All splits are computed before any slot is replaced, so a
//! failure leaves the model unchanged.

use tensor_core::layers::FeedForward;
use tensor_core::module::{downcast_ref, is};
use tensor_core::{Module, ModuleExt};

use crate::error::{Error, Result};
use crate::gate::GateConfig;
use crate::kmeans::{KMeansConfig, objective};
use crate::moe_ffn::{ComputePath, EmoeFfn};
use crate::split::{
    ExpertSplit, SplitMethod, contiguous_split, key_vectors, kmeans_split, random_split,
};

/// How each layer's neurons are split.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitStrategy {
    /// Balanced k-means on the normalised keys (EMoE's default: seed 0, at most 1000 iterations).
    KMeans {
        seed: u64,
        max_iters: usize,
    },
    Random {
        seed: u64,
    },
    Contiguous,
}

/// What [`convert`] builds.
#[derive(Debug, Clone, PartialEq)]
pub struct EmoeConfig {
    /// `N`, `k`, weights, noise, bias term.
    pub gate: GateConfig,
    pub split: SplitStrategy,
    pub compute: ComputePath,
}

impl EmoeConfig {
    /// EMoE's defaults for encoder models: k-means split (seed 0), hard
    /// top-k, Tutel noise `1/N` in training, sparse inference.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            gate: GateConfig::new(num_experts, top_k),
            split: SplitStrategy::KMeans {
                seed: 0,
                max_iters: 1000,
            },
            compute: ComputePath::Auto,
        }
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

/// EMoE's placement, every other layer of the last half, ending at the
/// last layer: `num_layers = 12` → `[7, 9, 11]`, `6` → `[3, 5]`.
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
        SplitStrategy::KMeans { seed, max_iters } => kmeans_split(
            ffn,
            &KMeansConfig {
                seed,
                max_iters,
                ..KMeansConfig::new(n)
            },
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
    convert_paths_with(model, &paths, cfg, &mut |_, ffn| split_for(ffn, cfg))
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
