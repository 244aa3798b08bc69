//! The optimiser of every m2mKD run (module distillation, meta and
//! end-to-end training): AdamW (libtorch's `torch::optim::AdamW`, the same
//! update as `torch.optim.AdamW`) with no weight decay on biases and norms,
//! a warm-up then cosine / linear / constant schedule, and gradient-norm
//! clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! The paper's recipe: AdamW, weight decay 0.05, cosine with warm-up,
//! clipping at 1 for end-to-end training. model-zoo has its own training
//! kit; this crate may depend only on tensor-core, hence this small one.
//!
//! Schedule factor at step `s` of `S` with `W` warm-up steps:
//! `s / W` during warm-up, then `½(1 + cos(π p))` (cosine), `1 − p`
//! (linear) or 1 (constant), `p = (s − W) / (S − W)`.

use serde::{Deserialize, Serialize};
use tensor_core::module::glob_match;
use tensor_core::tch::{COptimizer, Kind, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub schedule: Schedule,
    /// Share of the steps spent warming up.
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub clip_norm: Option<f64>,
    /// Glob patterns of parameters without weight decay.
    pub no_decay: Vec<String>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.1,
            clip_norm: Some(1.0),
            no_decay: vec!["*bias".into(), "*LayerNorm*".into(), "*norm*".into()],
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && (0.0..1.0).contains(&self.warmup_ratio)
            && self.clip_norm.is_none_or(|c| c.is_finite() && c > 0.0);
        if ok {
            Ok(())
        } else {
            Err(Error::config(format!(
                "optimiser: need lr > 0, weight_decay >= 0, betas and warmup_ratio in [0, 1), eps > 0, clip_norm > 0; got {self:?}"
            )))
        }
    }

    /// The schedule's factor at `step` (0-based) of `total`.
    pub fn factor(&self, step: u64, total: u64) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).round() as u64;
        if step < warmup {
            return (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let p = ((step - warmup) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Schedule::Linear => 1.0 - p,
            Schedule::Constant => 1.0,
        }
    }
}

/// AdamW over named parameters, stepping through a schedule of `total` steps.
#[derive(Debug)]
pub struct Optimizer {
    opt: COptimizer,
    params: Vec<Tensor>,
    config: OptimConfig,
    total: u64,
    step: u64,
}

impl Optimizer {
    /// Group 0 decays, group 1 (names matching `no_decay`) does not.
    pub fn new(named: Vec<(String, Tensor)>, config: OptimConfig, total: u64) -> Result<Self> {
        config.validate()?;
        if named.is_empty() {
            return Err(Error::config(
                "the optimiser was given no trainable parameters",
            ));
        }
        if total == 0 {
            return Err(Error::config("the number of steps must be positive"));
        }
        let mut opt = COptimizer::adamw(
            config.lr,
            config.beta1,
            config.beta2,
            config.weight_decay,
            config.eps,
            false,
        )?;
        let (mut decay, mut plain) = (Vec::new(), Vec::new());
        for (name, t) in &named {
            if config.no_decay.iter().any(|p| glob_match(p, name)) {
                plain.push(t.shallow_clone());
            } else {
                decay.push(t.shallow_clone());
            }
        }
        // Group 0 must exist before group 1 can be addressed.
        let groups: Vec<(Vec<Tensor>, f64)> = [(decay, config.weight_decay), (plain, 0.0)]
            .into_iter()
            .filter(|(g, _)| !g.is_empty())
            .collect();
        for (gi, (g, _)) in groups.iter().enumerate() {
            for t in g {
                opt.add_parameters(t, gi)?;
            }
        }
        for (gi, (_, wd)) in groups.iter().enumerate() {
            opt.set_weight_decay_group(gi, *wd)?;
        }
        let params = named.into_iter().map(|(_, t)| t).collect();
        Ok(Self {
            opt,
            params,
            config,
            total,
            step: 0,
        })
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(self.opt.zero_grad()?)
    }

    /// Clip, set the scheduled learning rate, update. Returns the gradient
    /// norm before clipping.
    pub fn step(&mut self) -> Result<f64> {
        let norm = clip_grad_norm(&self.params, self.config.clip_norm)?;
        let lr = self.config.lr * self.config.factor(self.step, self.total);
        self.opt.set_learning_rate(lr)?;
        self.opt.step()?;
        self.step += 1;
        Ok(norm)
    }

    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.config.lr * self.config.factor(self.step, self.total)
    }
}

/// Global L2 norm of the gradients; scaled by `max / (norm + 1e-6)` when above `max`.
pub fn clip_grad_norm(params: &[Tensor], max: Option<f64>) -> Result<f64> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sq = grads
        .iter()
        .map(|g| g.f_square()?.f_sum(Kind::Float))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let norm = Tensor::f_stack(&sq, 0)?
        .f_sum(Kind::Float)?
        .f_sqrt()?
        .double_value(&[]);
    if !norm.is_finite() {
        return Err(Error::NonFinite {
            what: "the gradient norm".into(),
        });
    }
    if let Some(m) = max
        && norm > m
    {
        let c = m / (norm + 1e-6);
        tensor_core::tch::no_grad(|| -> Result<()> {
            for mut g in grads {
                let _ = g.f_mul_scalar_(c)?;
            }
            Ok(())
        })?;
    }
    Ok(norm)
}
