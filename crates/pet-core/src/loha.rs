//! LoHa: the low-rank Hadamard product (Hyeon-Woo et al., "FedPara:
//! Low-Rank Hadamard Product for Communication-Efficient Federated
//! Learning", ICLR 2022, arXiv 2108.06098), as PEFT (`tuners/loha/layer.py`)
//! computes it on a `Linear`.
//!
//! ```text
//! ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a ∈ R^{out×r},  W1b, W2b ∈ R^{r×in}
//! y  = x Wᵀ + b + x ΔWᵀ,             s = α / r
//! ```
//!
//! Two rank-`r` factors multiplied element-wise give `ΔW` a rank of up to
//! `r²` for `2r(out + in)` parameters, twice LoRA's at the same `r`.
//! PEFT's initialisation: `W1a`, `W1b`, `W2a` Kaiming-uniform (`a = √5`,
//! so `U(±1/√fan_in)`), `W2b = 0`, so the model is unchanged at step 0.
//! While training, `rank_dropout` drops rows of `ΔW` (the kept rows are
//! rescaled by the inverse of the kept fraction) and `module_dropout` skips
//! the whole adapter for a batch; both default to 0.
//!
//! The change is additive and folds into `W`; it has no low-rank view, so
//! in a mixed-adapter batch it is computed once and masked to its own rows.
//! PEFT's file keys are `<module>.hada_w1_a` ... `<module>.hada_w2_b`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tensor_core::adapt::{DeltaInput, Folded, LinearDelta, MergeOrder};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{AddReport, add_linear_adapters, base_linear, check_new_name, linear_targets};
use crate::target::{module_seed, param, uniform};

/// LoHa's configuration (PEFT's field names and defaults: `r = 8`, `α = 8`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LohaConfig {
    pub r: i64,
    pub alpha: f64,
    /// Probability of dropping a row of `ΔW` while training.
    pub rank_dropout: f64,
    /// Probability of skipping the adapter for a whole batch while training.
    pub module_dropout: f64,
    /// `Linear` layers to adapt (PEFT's suffix rule or globs).
    pub target_modules: Vec<String>,
    /// Per-module rank, by the same matching rule (the longest key wins).
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module `α`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Seed of the initialisation (mixed with each module's path).
    pub seed: u64,
}

impl Default for LohaConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            target_modules: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            seed: 0,
        }
    }
}

impl LohaConfig {
    /// PEFT's defaults on the given targets.
    pub fn new(r: i64, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            alpha,
            target_modules: targets.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 || self.rank_pattern.values().any(|r| *r <= 0) {
            return Err(Error::config(format!(
                "LoHa rank r must be >= 1 (r = {}, rank_pattern {:?})",
                self.r, self.rank_pattern
            )));
        }
        for (what, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(format!(
                    "LoHa {what} must be in [0, 1), got {p}"
                )));
            }
        }
        if !self.alpha.is_finite() || self.alpha_pattern.values().any(|a| !a.is_finite()) {
            return Err(Error::config("LoHa alpha must be finite"));
        }
        if self.target_modules.is_empty() {
            return Err(Error::config(
                "LoHa target_modules is empty; name the Linear layers to adapt (e.g. [\"query\", \"value\"])",
            ));
        }
        Ok(())
    }

    /// Rank and `α` for the module at `path`.
    pub fn rank_alpha(&self, path: &str) -> (i64, f64) {
        tensor_core::adapt::rank_alpha(
            path,
            self.r,
            self.alpha,
            &self.rank_pattern,
            &self.alpha_pattern,
        )
    }
}

/// One LoHa adapter on one `Linear`.
#[derive(Debug)]
pub struct Loha {
    /// `[out, r]`
    pub w1a: Tensor,
    /// `[r, in]`
    pub w1b: Tensor,
    /// `[out, r]`
    pub w2a: Tensor,
    /// `[r, in]`
    pub w2b: Tensor,
    /// `s = α / r`
    pub scale: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
}

impl Loha {
    /// PEFT's initialisation for a base weight `w: [out, in]` at `path`.
    pub fn init(cfg: &LohaConfig, path: &str, adapter: &str, w: &Tensor) -> Result<Self> {
        let (out, inp) = (w.size()[0], w.size()[1]);
        let (r, alpha) = cfg.rank_alpha(path);
        let seed = module_seed(cfg.seed, &[path, adapter, "loha"]);
        let dev = w.device();
        let (br, bi) = (1.0 / (r as f64).sqrt(), 1.0 / (inp as f64).sqrt());
        let kind = w.kind();
        let p = |t: Tensor| -> Result<Tensor> { Ok(param(t.f_to_kind(kind)?)) };
        Ok(Self {
            w1a: p(uniform(&[out, r], br, seed, dev)?)?,
            w1b: p(uniform(&[r, inp], bi, seed ^ 1, dev)?)?,
            w2a: p(uniform(&[out, r], br, seed ^ 2, dev)?)?,
            w2b: p(Tensor::f_zeros([r, inp], (Kind::Float, dev))?)?,
            scale: alpha / r as f64,
            rank_dropout: cfg.rank_dropout,
            module_dropout: cfg.module_dropout,
        })
    }

    /// An adapter from PEFT's four factors, checked against the base `w`.
    pub fn from_weights(factors: [Tensor; 4], scale: f64, w: &Tensor, what: &str) -> Result<Self> {
        let (out, inp) = (w.size()[0], w.size()[1]);
        let [w1a, w1b, w2a, w2b] = factors;
        let r = w1a.size().get(1).copied().unwrap_or(0);
        let want = [[out, r], [r, inp], [out, r], [r, inp]];
        for ((t, want), key) in [&w1a, &w1b, &w2a, &w2b].into_iter().zip(want).zip([
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
        ]) {
            if t.size() != want || r == 0 {
                return Err(Error::config(format!(
                    "{what}: LoHa factor {key} has shape {:?}; a base weight {:?} needs {want:?}",
                    t.size(),
                    w.size()
                )));
            }
        }
        let on = |t: Tensor| -> Result<Tensor> {
            Ok(param(t.f_to_kind(w.kind())?.f_to_device(w.device())?))
        };
        let loha = Self {
            w1a: on(w1a)?,
            w1b: on(w1b)?,
            w2a: on(w2a)?,
            w2b: on(w2b)?,
            scale,
            rank_dropout: 0.0,
            module_dropout: 0.0,
        };
        tensor_core::error::check_finite(what, "LoHa ΔW", &loha.delta_weight()?)?;
        Ok(loha)
    }

    pub fn rank(&self) -> i64 {
        self.w1a.size()[1]
    }

    /// `ΔW = s · (W1a W1b) ⊙ (W2a W2b)`, in the factors' dtype, with the graph.
    pub fn delta_weight_live(&self) -> Result<Tensor> {
        Ok(self
            .w1a
            .f_matmul(&self.w1b)?
            .f_mul(&self.w2a.f_matmul(&self.w2b)?)?
            .f_mul_scalar(self.scale)?)
    }

    /// `ΔW` in f32, detached.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self
            .delta_weight_live()?
            .f_detach()?
            .f_to_kind(Kind::Float)?)
    }
}

impl LinearDelta for Loha {
    fn kind(&self) -> &'static str {
        "LoHa"
    }

    fn param_names(&self, name: &str) -> Vec<String> {
        ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
            .map(|k| format!("{k}.{name}"))
            .to_vec()
    }

    fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.w1a, &self.w1b, &self.w2a, &self.w2b]
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.w1a, &mut self.w1b, &mut self.w2a, &mut self.w2b]
    }

    fn additive(&self, io: &DeltaInput<'_>) -> tensor_core::Result<Option<Tensor>> {
        if io.train && self.module_dropout > 0.0 {
            let u = Tensor::f_rand([1], (Kind::Float, tensor_core::tch::Device::Cpu))?;
            if u.f_double_value(&[0])? <= self.module_dropout {
                return Ok(None);
            }
        }
        let mut dw = self.delta_weight_live()?;
        if io.train && self.rank_dropout > 0.0 {
            let rows = dw.size()[0];
            let keep = Tensor::f_rand([rows], (Kind::Float, tensor_core::tch::Device::Cpu))?
                .f_gt(self.rank_dropout)?
                .f_to_kind(dw.kind())?
                .f_to_device(dw.device())?;
            let keep = keep.f_div(&keep.f_mean(None)?)?;
            dw = dw.f_mul(&keep.f_unsqueeze(1)?)?;
        }
        Ok(Some(
            io.x.f_linear::<&Tensor>(&dw.f_to_kind(io.x.kind())?, None)?,
        ))
    }

    fn merge_order(&self) -> Option<MergeOrder> {
        Some(MergeOrder::Additive)
    }

    fn fold(&self, w: &Tensor, b: Option<&Tensor>) -> tensor_core::Result<Folded> {
        Ok(Folded {
            weight: w.f_add(&self.delta_weight()?)?,
            bias: b.map(Tensor::shallow_clone),
            undo: None,
        })
    }

    fn unfold(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        _undo: Option<&Tensor>,
    ) -> tensor_core::Result<(Tensor, Option<Tensor>)> {
        Ok((
            w.f_sub(&self.delta_weight()?)?,
            b.map(Tensor::shallow_clone),
        ))
    }
}

/// Add a LoHa adapter named `name` to every `Linear` matching `cfg.target_modules`.
pub fn add_loha<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &LohaConfig,
) -> Result<AddReport> {
    cfg.validate()?;
    check_new_name(model, name)?;
    let mut built: Vec<(String, Box<dyn LinearDelta>)> = Vec::new();
    for p in linear_targets(model, &cfg.target_modules)? {
        let w = &base_linear(model, &p)?.weight;
        built.push((p.clone(), Box::new(Loha::init(cfg, &p, name, w)?)));
    }
    add_linear_adapters(model, name, built)
}
