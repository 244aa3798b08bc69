//! Merging LoRA adapters or full weight deltas, per layer (docs/orthogonal-merge.md,
//! Method, part 1 step 4 and part 2; PEFT `add_weighted_adapter` and `utils/merge_utils.py`).
//!
//! With task deltas `ΔW_t` (a LoRA pair gives `ΔW_t = s_t B_t A_t`), weights
//! `w_t` and a global `λ`, the merged change of a layer is
//!
//! ```text
//! sum            Σ_t ΔW_t                                 (the orthogonal merge; w = λ = 1)
//! linear         λ Σ_t w_t ΔW_t                            (task arithmetic; w < 0 negates)
//! cat            A = rows(λ w_t s_t A_t), B = cols(B_t), s = 1:  BA = λ Σ_t w_t ΔW_t exactly, rank Σ r_t
//! svd            linear, then the best rank-r factors (r = svd_rank or max r_t)
//! magnitude_prune λ Σ_t w_t prune_ρ(ΔW_t)
//! ties           λ · TIES(ΔW_1..T; ρ, election)
//! dare_linear    λ Σ_t w_t m_t ⊙ ΔW_t / ρ
//! dare_ties      λ · TIES steps (ii)–(iii) on m_t ⊙ ΔW_t / ρ
//! least_squares  (Σ_t w_t ΔW_t G_t)(Σ_t G_t + λ_r I)⁻¹      (needs features, [`merge_with_features`])
//! ```
//!
//! Any full-delta result can be truncated to LoRA factors (`low_rank`, PEFT's
//! `*_svd` types). With `factorwise` (PEFT's default for LoRA inputs with
//! `linear`/`ties`/`dare_*`/`magnitude_prune`), the operator is applied to
//! the `A`s and the `B`s separately, weighting `A_t` by `sign(w_t s_t)√|w_t s_t|`
//! and `B_t` by `√|w_t s_t|`; ranks must be equal, and the result has the
//! cross terms `B_i A_j` (peft #3004, #1155), which is why it is off by default.
//!
//! A sum or linear merge of LoRA inputs is one GEMM, `B_cat · A_cat`, and its
//! SVD comes from the factors ([`crate::svd::truncated_svd_factored`]).
//! DARE masks of layer `L` are drawn from `seed ⊕ FNV(L)` in task order, so a
//! layer's masks do not depend on which other layers are merged.
//!
//! Tasks that do not change a layer are left out of that layer's merge
//! (for least squares they count with `ΔW = 0`, since their features still
//! constrain the layer). Before merging, [`check_tasks`] rejects shapes that
//! differ between tasks, orthogonal adapters made from different
//! registries or claiming one bin, and adapters trained on different base
//! models; [`check_against_model`] checks the tasks against the model they
//! will be applied to.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Kind, Tensor};

use crate::adapter::{add_to_layer, frobenius};
use crate::dare::dare_streamed;
use crate::delta::{Delta, LoraFactors, TaskDelta};
use crate::error::{Error, Result};
use crate::interference::{InterferenceReport, interference};
use crate::lsq::{Features, least_squares};
use crate::prune::{check_density, magnitude_prune_one};
use crate::svd::{truncated_svd, truncated_svd_factored};
use crate::target::{base_linear, name_seed};
use crate::ties::{SignMethod, ties};

/// How tasks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `Σ_t ΔW_t`: the orthogonal merge.
    #[default]
    Sum,
    /// Task arithmetic `λ Σ_t w_t ΔW_t`.
    Linear,
    /// LoRA concatenation, exact, rank `Σ r_t`.
    Cat,
    /// Task arithmetic truncated to rank `r` by SVD.
    Svd,
    MagnitudePrune,
    Ties,
    DareLinear,
    DareTies,
    /// Closed-form least squares on recorded features.
    LeastSquares,
}

impl Method {
    pub const ALL: [Method; 9] = [
        Method::Sum,
        Method::Linear,
        Method::Cat,
        Method::Svd,
        Method::MagnitudePrune,
        Method::Ties,
        Method::DareLinear,
        Method::DareTies,
        Method::LeastSquares,
    ];

    /// The snake_case name (`"dare_ties"`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Sum => "sum",
            Method::Linear => "linear",
            Method::Cat => "cat",
            Method::Svd => "svd",
            Method::MagnitudePrune => "magnitude_prune",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::LeastSquares => "least_squares",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown merge method '{s}' (one of: {})",
                    Self::ALL.map(|m| m.name()).join(", ")
                ))
            })
    }
}

/// A merge's settings. Defaults follow docs/orthogonal-merge.md, Method, part 2:
/// `λ = 1`, density 0.2, `total` election, fp32, no SVD clamp, no factor-wise LoRA merging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MergeConfig {
    pub method: Method,
    /// `w_t`, one per task; `None` means 1 each.
    pub weights: Option<Vec<f64>>,
    /// `λ`, on the merged task vector.
    pub lambda: f64,
    /// `ρ`, the fraction of entries kept (TIES, magnitude pruning, DARE).
    pub density: f64,
    pub majority_sign: SignMethod,
    /// Seed of DARE's masks.
    pub seed: u64,
    /// Truncate the result to LoRA factors by SVD (PEFT's `*_svd`); implied by `Svd`.
    pub low_rank: bool,
    /// Rank of the SVD result; `None` = the largest input rank.
    pub svd_rank: Option<i64>,
    /// Clamp the SVD factors at this quantile of their entries.
    pub svd_clamp: Option<f64>,
    /// Least squares: `λ_r = ridge · tr(Σ G)/in` (relative to the features' scale).
    pub ridge: f64,
    /// Apply the operator to LoRA's `A`s and `B`s separately (PEFT's default for LoRA).
    pub factorwise: bool,
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            method: Method::Sum,
            weights: None,
            lambda: 1.0,
            density: 0.2,
            majority_sign: SignMethod::Total,
            seed: 0,
            low_rank: false,
            svd_rank: None,
            svd_clamp: None,
            ridge: 1e-3,
            factorwise: false,
        }
    }
}

impl MergeConfig {
    pub fn new(method: Method) -> Self {
        Self {
            method,
            ..Self::default()
        }
    }

    pub fn with_weights(mut self, w: &[f64]) -> Self {
        self.weights = Some(w.to_vec());
        self
    }

    pub fn with_density(mut self, d: f64) -> Self {
        self.density = d;
        self
    }

    pub fn with_lambda(mut self, l: f64) -> Self {
        self.lambda = l;
        self
    }

    pub fn with_seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }

    pub fn with_sign(mut self, s: SignMethod) -> Self {
        self.majority_sign = s;
        self
    }

    pub fn with_svd_rank(mut self, r: i64) -> Self {
        self.svd_rank = Some(r);
        self
    }

    fn weights_for(&self, n: usize) -> Result<Vec<f64>> {
        let w = match &self.weights {
            Some(w) => w.clone(),
            None => vec![1.0; n],
        };
        if w.len() != n {
            return Err(Error::mismatch(format!(
                "{} merge weights for {n} tasks",
                w.len()
            )));
        }
        if let Some(x) = w.iter().find(|x| !x.is_finite()) {
            return Err(Error::config(format!(
                "merge weights must be finite, got {x}"
            )));
        }
        Ok(w)
    }

    fn validate(&self, n: usize) -> Result<Vec<f64>> {
        let w = self.weights_for(n)?;
        if !self.lambda.is_finite() {
            return Err(Error::config(format!(
                "lambda must be finite, got {}",
                self.lambda
            )));
        }
        if self.method == Method::Sum && (self.lambda != 1.0 || w.iter().any(|&x| x != 1.0)) {
            return Err(Error::config(
                "the sum merge takes weight 1 per task and λ = 1; use Method::Linear for weights",
            ));
        }
        match self.method {
            Method::MagnitudePrune | Method::Ties => check_density(self.density)?,
            Method::DareLinear | Method::DareTies
                if self.density.is_nan() || self.density <= 0.0 =>
            {
                return Err(Error::config(format!(
                    "DARE density must be in (0, 1], got {}",
                    self.density
                )));
            }
            _ => {}
        }
        if self.factorwise
            && !matches!(
                self.method,
                Method::Linear
                    | Method::Ties
                    | Method::DareLinear
                    | Method::DareTies
                    | Method::MagnitudePrune
            )
        {
            return Err(Error::config(format!(
                "factor-wise merging applies to linear, ties, dare_linear, dare_ties and magnitude_prune, not {}",
                self.method.name()
            )));
        }
        if self.svd_rank.is_some_and(|r| r <= 0) {
            return Err(Error::config("svd_rank must be >= 1"));
        }
        if self.ridge.is_nan() || self.ridge < 0.0 {
            return Err(Error::config(format!(
                "ridge must be >= 0, got {}",
                self.ridge
            )));
        }
        Ok(w)
    }
}

/// One layer's merged change.
#[derive(Debug)]
pub enum MergedDelta {
    Full(Tensor),
    Lora(LoraFactors),
}

impl MergedDelta {
    /// `ΔW` in f32.
    pub fn weight(&self) -> Result<Tensor> {
        match self {
            MergedDelta::Full(t) => Ok(t.f_to_kind(Kind::Float)?),
            MergedDelta::Lora(l) => l.delta_weight(),
        }
    }

    pub fn rank(&self) -> Option<i64> {
        match self {
            MergedDelta::Full(_) => None,
            MergedDelta::Lora(l) => Some(l.rank()),
        }
    }
}

/// The merged change of every layer.
#[derive(Debug)]
pub struct Merged {
    pub method: Method,
    pub layers: BTreeMap<String, MergedDelta>,
}

impl Merged {
    /// As a task, e.g. to save LoRA-form results or merge them further.
    pub fn to_task(&self, name: &str) -> TaskDelta {
        let mut t = TaskDelta::new(name);
        for (l, d) in &self.layers {
            let d = match d {
                MergedDelta::Full(w) => Delta::Full(w.shallow_clone()),
                MergedDelta::Lora(f) => Delta::Lora(f.shallow_clone()),
            };
            t.layers.insert(l.clone(), d);
        }
        t
    }
}

const NORM_RTOL: f64 = 1e-4;

fn norms_differ(a: f64, b: f64) -> bool {
    (a - b).abs() > NORM_RTOL * a.abs().max(b.abs()).max(1e-12)
}

/// Reject task sets that cannot be merged: no tasks, duplicate names, a
/// layer whose shape differs between tasks, orthogonal adapters from
/// different registries or sharing a bin, different base models.
pub fn check_tasks(tasks: &[TaskDelta]) -> Result<()> {
    if tasks.is_empty() {
        return Err(Error::config("nothing to merge: no tasks"));
    }
    for (i, t) in tasks.iter().enumerate() {
        if let Some(u) = tasks[..i].iter().find(|u| u.name == t.name) {
            return Err(Error::config(format!("two tasks are named '{}'", u.name)));
        }
    }
    let mut shapes: BTreeMap<&str, ((i64, i64), &str)> = BTreeMap::new();
    for t in tasks {
        for (l, d) in &t.layers {
            let s = d.shape();
            match shapes.get(l.as_str()) {
                Some((s0, who)) if *s0 != s => {
                    return Err(Error::mismatch(format!(
                        "layer '{l}': task '{who}' changes a [{}, {}] weight but task '{}' a [{}, {}] one (different models?)",
                        s0.0, s0.1, t.name, s.0, s.1
                    )));
                }
                Some(_) => {}
                None => {
                    shapes.insert(l, (s, &t.name));
                }
            }
        }
    }
    let metas: Vec<(&str, &crate::delta::AdapterMeta)> = tasks
        .iter()
        .filter_map(|t| t.meta.as_ref().map(|m| (t.name.as_str(), m)))
        .collect();
    for (i, (na, ma)) in metas.iter().enumerate() {
        for (nb, mb) in &metas[..i] {
            if let (Some(a), Some(b)) = (&ma.orthogonal, &mb.orthogonal) {
                if a.spec != b.spec {
                    return Err(Error::mismatch(format!(
                        "orthogonal adapters '{nb}' ({:?}) and '{na}' ({:?}) were not made from one registry (basis, seed, rank and frozen side must agree)",
                        b.spec, a.spec
                    )));
                }
                if a.bin == b.bin {
                    return Err(Error::mismatch(format!(
                        "orthogonal adapters '{nb}' and '{na}' both hold bin {}: their bases collide",
                        a.bin
                    )));
                }
            }
            for (l, &x) in &ma.base_norms {
                if let Some(&y) = mb.base_norms.get(l)
                    && norms_differ(x, y)
                {
                    return Err(Error::mismatch(format!(
                        "adapters '{nb}' and '{na}' were trained on different base models: layer '{l}' has ‖W0‖ = {y:.6} for one and {x:.6} for the other"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Check that every layer the tasks change is a `Linear` of the same shape
/// in `model`, and that the base norms the adapters recorded match it.
pub fn check_against_model<M: ModuleExt + ?Sized>(model: &M, tasks: &[TaskDelta]) -> Result<()> {
    for t in tasks {
        for (l, d) in &t.layers {
            let lin = base_linear(model, l).map_err(|e| {
                Error::mismatch(format!(
                    "task '{}' changes '{l}', which the model lacks: {e}",
                    t.name
                ))
            })?;
            let (o, i) = d.shape();
            if (lin.out_features(), lin.in_features()) != (o, i) {
                return Err(Error::mismatch(format!(
                    "task '{}' changes '{l}' as a [{o}, {i}] weight, but the model's is [{}, {}]",
                    t.name,
                    lin.out_features(),
                    lin.in_features()
                )));
            }
            if let Some(&x) = t.meta.as_ref().and_then(|m| m.base_norms.get(l)) {
                let y = frobenius(&lin.weight)?;
                if norms_differ(x, y) {
                    return Err(Error::mismatch(format!(
                        "task '{}' was trained on another base model: layer '{l}' has ‖W0‖ = {y:.6} here but {x:.6} in the adapter",
                        t.name
                    )));
                }
            }
        }
    }
    Ok(())
}

fn layer_names(tasks: &[TaskDelta]) -> Vec<String> {
    let mut v: Vec<String> = tasks
        .iter()
        .flat_map(|t| t.layers.keys().cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn all_lora<'a>(items: &[(&'a Delta, f64)]) -> Option<Vec<(&'a LoraFactors, f64)>> {
    items
        .iter()
        .map(|(d, w)| match d {
            Delta::Lora(l) => Some((l, *w)),
            Delta::Full(_) => None,
        })
        .collect()
}

/// `B_cat = [B_1 … B_T]`, `A_cat = [c_1 A_1; …; c_T A_T]` with `c_t = λ w_t s_t`.
fn concat(loras: &[(&LoraFactors, f64)], lambda: f64) -> Result<(Tensor, Tensor)> {
    let dev = loras[0].0.b.device();
    let bs = loras
        .iter()
        .map(|(l, _)| Ok(l.b.f_to_kind(Kind::Float)?.f_to_device(dev)?))
        .collect::<Result<Vec<_>>>()?;
    let as_ = loras
        .iter()
        .map(|(l, w)| {
            Ok(l.a
                .f_to_kind(Kind::Float)?
                .f_to_device(dev)?
                .f_mul_scalar(lambda * w * l.scale)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::f_cat(&bs, 1)?, Tensor::f_cat(&as_, 0)?))
}

fn svd_rank(cfg: &MergeConfig, items: &[(&Delta, f64)], layer: &str) -> Result<i64> {
    cfg.svd_rank
        .or_else(|| items.iter().filter_map(|(d, _)| d.rank()).max())
        .ok_or_else(|| {
            Error::config(format!(
                "layer '{layer}': truncating full deltas by SVD needs svd_rank (no input has a LoRA rank)"
            ))
        })
}

fn finish(
    cfg: &MergeConfig,
    items: &[(&Delta, f64)],
    layer: &str,
    full: Tensor,
) -> Result<MergedDelta> {
    if cfg.low_rank || cfg.method == Method::Svd {
        let r = svd_rank(cfg, items, layer)?;
        Ok(MergedDelta::Lora(truncated_svd(&full, r, cfg.svd_clamp)?))
    } else {
        Ok(MergedDelta::Full(full))
    }
}

/// The operators on same-shape tensors, with task `t`'s tensor made by
/// `get(t)` when needed, so that few are alive at once.
fn merge_full(
    cfg: &MergeConfig,
    w: &[f64],
    seed: u64,
    get: &dyn Fn(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = w.len();
    let accumulate = |f: &dyn Fn(Tensor) -> Result<Tensor>| -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for (t, &wt) in w.iter().enumerate() {
            let x = f(get(t)?.f_to_kind(Kind::Float)?)?.f_mul_scalar(wt as f32 as f64)?;
            match &mut acc {
                None => acc = Some(x),
                Some(a) => {
                    if a.size() != x.size() {
                        return Err(Error::mismatch(format!(
                            "task tensor {t} has shape {:?} but task tensor 0 has {:?}",
                            x.size(),
                            a.size()
                        )));
                    }
                    let _ = a.f_add_(&x)?;
                }
            }
        }
        acc.ok_or_else(|| Error::config("nothing to merge"))
    };
    Ok(match cfg.method {
        Method::Linear | Method::Sum | Method::Svd => accumulate(&|x| Ok(x))?,
        Method::MagnitudePrune => accumulate(&|x| magnitude_prune_one(&x, cfg.density))?,
        Method::Ties => {
            let trimmed = (0..n)
                .map(|t| magnitude_prune_one(&get(t)?.f_to_kind(Kind::Float)?, cfg.density))
                .collect::<Result<Vec<_>>>()?;
            ties(&trimmed, w, 1.0, cfg.majority_sign)?
        }
        Method::DareLinear => dare_streamed(n, w, cfg.density, seed, None, get)?,
        Method::DareTies => dare_streamed(n, w, cfg.density, seed, Some(cfg.majority_sign), get)?,
        Method::Cat | Method::LeastSquares => unreachable!("handled by the caller"),
    })
}

fn merge_layer(cfg: &MergeConfig, layer: &str, items: &[(&Delta, f64)]) -> Result<MergedDelta> {
    let lam = cfg.lambda;
    let loras = all_lora(items);
    match cfg.method {
        Method::Sum | Method::Linear | Method::Svd if loras.is_some() && !cfg.factorwise => {
            let (b, a) = concat(loras.as_ref().expect("checked"), lam)?;
            if cfg.low_rank || cfg.method == Method::Svd {
                let r = svd_rank(cfg, items, layer)?;
                Ok(MergedDelta::Lora(truncated_svd_factored(
                    &b,
                    &a,
                    r,
                    cfg.svd_clamp,
                )?))
            } else {
                Ok(MergedDelta::Full(b.f_mm(&a)?))
            }
        }
        Method::Cat => {
            let loras = loras.ok_or_else(|| {
                Error::mismatch(format!(
                    "layer '{layer}': cat needs LoRA factors, but a task gives a full delta"
                ))
            })?;
            let (b, a) = concat(&loras, lam)?;
            if cfg.low_rank {
                let r = svd_rank(cfg, items, layer)?;
                return Ok(MergedDelta::Lora(truncated_svd_factored(
                    &b,
                    &a,
                    r,
                    cfg.svd_clamp,
                )?));
            }
            Ok(MergedDelta::Lora(LoraFactors::new(a, b, 1.0)?))
        }
        Method::LeastSquares => Err(Error::config(
            "least_squares needs recorded features: use merge_with_features",
        )),
        _ if cfg.factorwise => {
            let loras = loras.ok_or_else(|| {
                Error::mismatch(format!("layer '{layer}': factor-wise merging needs LoRA factors, but a task gives a full delta"))
            })?;
            let r0 = loras[0].0.rank();
            if let Some((l, _)) = loras.iter().find(|(l, _)| l.rank() != r0) {
                return Err(Error::mismatch(format!(
                    "layer '{layer}': factor-wise merging needs equal ranks, got {r0} and {} (use cat or svd)",
                    l.rank()
                )));
            }
            let dev = loras[0].0.a.device();
            let mut wa = Vec::new();
            let mut wb = Vec::new();
            for (l, w) in &loras {
                let ws = w * l.scale;
                let root = ws.abs().sqrt();
                wa.push(if ws >= 0.0 { root } else { -root });
                wb.push(root);
            }
            let a_s = loras
                .iter()
                .map(|(l, _)| Ok(l.a.f_to_kind(Kind::Float)?.f_to_device(dev)?))
                .collect::<Result<Vec<_>>>()?;
            let b_s = loras
                .iter()
                .map(|(l, _)| Ok(l.b.f_to_kind(Kind::Float)?.f_to_device(dev)?))
                .collect::<Result<Vec<_>>>()?;
            let a = merge_full(
                cfg,
                &wa,
                name_seed(cfg.seed, &[layer, "dare", "lora_A"]),
                &|t| Ok(a_s[t].shallow_clone()),
            )?;
            let b = merge_full(
                cfg,
                &wb,
                name_seed(cfg.seed, &[layer, "dare", "lora_B"]),
                &|t| Ok(b_s[t].shallow_clone()),
            )?;
            Ok(MergedDelta::Lora(LoraFactors::new(
                a.f_mul_scalar(lam)?,
                b,
                1.0,
            )?))
        }
        _ => {
            let dev = match items[0].0 {
                Delta::Lora(l) => l.a.device(),
                Delta::Full(t) => t.device(),
            };
            let w: Vec<f64> = items.iter().map(|(_, w)| *w).collect();
            let get = |t: usize| -> Result<Tensor> { Ok(items[t].0.weight()?.f_to_device(dev)?) };
            let mut full = merge_full(cfg, &w, name_seed(cfg.seed, &[layer, "dare"]), &get)?;
            if lam != 1.0 {
                full = full.f_mul_scalar(lam)?;
            }
            finish(cfg, items, layer, full)
        }
    }
}

/// Merge `tasks` layer by layer (every method but least squares).
pub fn merge(tasks: &[TaskDelta], cfg: &MergeConfig) -> Result<Merged> {
    check_tasks(tasks)?;
    let w = cfg.validate(tasks.len())?;
    let mut layers = BTreeMap::new();
    for layer in layer_names(tasks) {
        let items: Vec<(&Delta, f64)> = tasks
            .iter()
            .zip(&w)
            .filter_map(|(t, &w)| t.layers.get(&layer).map(|d| (d, w)))
            .collect();
        let m = merge_layer(cfg, &layer, &items)?;
        layers.insert(layer, m);
    }
    Ok(Merged {
        method: cfg.method,
        layers,
    })
}

/// Least-squares merge: `features[t]` holds task `t`'s recorded Grams.
pub fn merge_with_features(
    tasks: &[TaskDelta],
    features: &[Features],
    cfg: &MergeConfig,
) -> Result<Merged> {
    check_tasks(tasks)?;
    let w = cfg.validate(tasks.len())?;
    if features.len() != tasks.len() {
        return Err(Error::mismatch(format!(
            "{} feature sets for {} tasks",
            features.len(),
            tasks.len()
        )));
    }
    let mut layers = BTreeMap::new();
    for layer in layer_names(tasks) {
        let shape = tasks
            .iter()
            .find_map(|t| t.layers.get(&layer).map(Delta::shape))
            .expect("layer from a task");
        let dev = tasks
            .iter()
            .find_map(|t| t.layers.get(&layer).map(|d| d.weight().map(|w| w.device())))
            .expect("layer from a task")?;
        let mut deltas = Vec::new();
        let mut grams = Vec::new();
        for (t, f) in tasks.iter().zip(features) {
            let g = f.layers.get(&layer).ok_or_else(|| {
                Error::mismatch(format!(
                    "least squares: no features recorded for layer '{layer}' of task '{}'",
                    t.name
                ))
            })?;
            deltas.push(match t.layers.get(&layer) {
                Some(d) => d.weight()?.f_to_device(dev)?,
                None => Tensor::f_zeros([shape.0, shape.1], (Kind::Float, dev))?,
            });
            grams.push(g.mean()?);
        }
        let inp = shape.1 as f64;
        let trace: f64 = grams
            .iter()
            .map(|g| Ok(g.f_trace()?.double_value(&[])))
            .sum::<Result<f64>>()?;
        let ridge = cfg.ridge * trace / inp;
        let mut full = least_squares(&deltas, &grams, &w, ridge)?;
        if cfg.lambda != 1.0 {
            full = full.f_mul_scalar(cfg.lambda)?;
        }
        let items: Vec<(&Delta, f64)> = tasks
            .iter()
            .zip(&w)
            .filter_map(|(t, &w)| t.layers.get(&layer).map(|d| (d, w)))
            .collect();
        let m = if cfg.low_rank {
            finish(cfg, &items, &layer, full)?
        } else {
            MergedDelta::Full(full)
        };
        layers.insert(layer, m);
    }
    Ok(Merged {
        method: Method::LeastSquares,
        layers,
    })
}

/// `W += ΔW` for every merged layer of `model` (all layers are checked
/// first, so a mismatch changes nothing). Returns the number of layers.
pub fn apply_merged<M: ModuleExt + ?Sized>(model: &mut M, merged: &Merged) -> Result<usize> {
    apply_scaled(model, merged, 1.0)
}

/// Undo [`apply_merged`] (`W −= ΔW`, up to rounding).
pub fn unapply_merged<M: ModuleExt + ?Sized>(model: &mut M, merged: &Merged) -> Result<usize> {
    apply_scaled(model, merged, -1.0)
}

fn apply_scaled<M: ModuleExt + ?Sized>(
    model: &mut M,
    merged: &Merged,
    factor: f64,
) -> Result<usize> {
    let mut ws = Vec::new();
    for (l, d) in &merged.layers {
        let lin = base_linear(model, l)?;
        let w = d.weight()?;
        if w.size() != lin.weight.size() {
            return Err(Error::mismatch(format!(
                "layer '{l}': merged delta {:?} but the model's weight is {:?}",
                w.size(),
                lin.weight.size()
            )));
        }
        ws.push((l.clone(), w));
    }
    for (l, w) in &ws {
        let w = if factor == 1.0 {
            w.shallow_clone()
        } else {
            w.f_mul_scalar(factor)?
        };
        add_to_layer(model, l, &w)?;
    }
    Ok(ws.len())
}

/// What [`merge_adapters_into`] did.
#[derive(Debug)]
pub struct MergeReport {
    pub tasks: Vec<String>,
    pub merged: Merged,
    pub interference: InterferenceReport,
}

/// Read the PEFT adapter folders `dirs`, check them against `model` and
/// each other, report their interference, merge them with `cfg` and add
/// the result to `model`'s weights.
pub fn merge_adapters_into<M: ModuleExt + ?Sized, P: AsRef<Path>>(
    model: &mut M,
    dirs: &[P],
    cfg: &MergeConfig,
) -> Result<MergeReport> {
    let tasks = dirs
        .iter()
        .map(|d| Ok(crate::peft_io::read_adapter(d, None)?.task))
        .collect::<Result<Vec<_>>>()?;
    check_tasks(&tasks)?;
    check_against_model(model, &tasks)?;
    let report = interference(&tasks)?;
    let merged = merge(&tasks, cfg)?;
    apply_merged(model, &merged)?;
    Ok(MergeReport {
        tasks: tasks.iter().map(|t| t.name.clone()).collect(),
        merged,
        interference: report,
    })
}
