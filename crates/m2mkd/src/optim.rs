//! The optimiser recipe of every m2mKD run (module distillation, meta and
//! end-to-end training), on the workspace's training kit
//! (`tensor_core::train`): its AdamW (the update of `torch.optim.AdamW`)
//! with no weight decay on biases and norms, its warm-up then cosine /
//! linear / constant schedule, and its gradient-norm clipping (as
//! `torch.nn.utils.clip_grad_norm_`).
//!
//! The paper's recipe: AdamW, weight decay 0.05, cosine with warm-up,
//! clipping at 1 for end-to-end training.
//!
//! Schedule factor at step `s` of `S` with `W = round(warmup_ratio · S)`
//! warm-up steps: `(s + 1) / W` during warm-up (the first step is not
//! spent at rate 0), then `½(1 + cos(π p))` (cosine), `1 − p` (linear) or 1
//! (constant), `p = (s − W) / max(1, S − W)`.

use serde::{Deserialize, Serialize};
use tensor_core::tch::Tensor;
use tensor_core::train::{
    AdamW, AdamWConfig, LrSchedule, ScheduleKind, WarmupStart, clip_grad_norm, grad_norm,
};

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

    /// The kit schedule of a run of `total` steps.
    pub fn schedule(&self, total: u64) -> Result<LrSchedule> {
        let kind = match self.schedule {
            Schedule::Cosine => ScheduleKind::Cosine,
            Schedule::Linear => ScheduleKind::Linear,
            Schedule::Constant => ScheduleKind::Constant,
        };
        // `validate` keeps the ratio below 1, so the warm-up fits in `total`.
        let warmup = (self.warmup_ratio * total as f64).round() as u64;
        Ok(LrSchedule::new(kind, warmup, total)?.with_warmup_start(WarmupStart::FirstStep))
    }

    /// The kit optimiser's settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            betas: (self.beta1, self.beta2),
            eps: self.eps,
            weight_decay: self.weight_decay,
            no_decay: self.no_decay.clone(),
            master_weights: true,
        }
    }
}

/// AdamW over named parameters, stepping through a schedule of `total` steps.
#[derive(Debug)]
pub struct Optimizer {
    adamw: AdamW,
    schedule: LrSchedule,
    clip_norm: Option<f64>,
    params: Vec<Tensor>,
}

impl Optimizer {
    /// Parameters matching `no_decay` get no weight decay.
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
        let adamw = AdamW::new(named, config.adamw())?;
        Ok(Self {
            params: adamw.parameters(),
            schedule: config.schedule(total)?,
            clip_norm: config.clip_norm,
            adamw,
        })
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(self.adamw.zero_grad()?)
    }

    /// Clip, set the scheduled learning rate, update. Returns the gradient
    /// norm before clipping.
    pub fn step(&mut self) -> Result<f64> {
        let norm = match self.clip_norm {
            Some(max) => clip_grad_norm(&self.params, max)?,
            None => grad_norm(&self.params)?,
        };
        self.adamw.set_lr(self.lr())?;
        self.adamw.step()?;
        Ok(norm)
    }

    pub fn steps_done(&self) -> u64 {
        self.adamw.step_count()
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        let step = self.adamw.step_count().min(self.schedule.total_steps);
        self.adamw.base_lr() * self.schedule.factor(step)
    }
}
