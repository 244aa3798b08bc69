//! Learning-rate schedules with linear warm-up, the multipliers of Hugging Face
//! transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup`
//! (`num_cycles = 0.5`, `min_lr_rate = 0`). At optimiser step `s` (0-based,
//! counted before the step, as `LambdaLR` does), with `w` warm-up and `n`
//! total steps:
//!
//! ```text
//! s < w:     s / max(1, w)                                         (all kinds)
//! Constant:  1
//! Linear:    max(0, (n − s) / max(1, n − w))
//! Cosine:    max(0, ½ (1 + cos(π · 2 · 0.5 · (s − w) / max(1, n − w))))
//! ```
//!
//! As in transformers, a warm-up makes the very first step's rate 0, and the
//! cosine curve rises again past `n` (it is not clamped at the end).
//! [`WarmupStart::FirstStep`] shifts the warm-up by one step, `(s + 1) / w`,
//! so that no step is wasted at rate 0 (the m2mKD recipe's warm-up).

use crate::error::{Error, Result};

/// The shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// Where the warm-up ramp starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WarmupStart {
    /// Step `s` of the warm-up at `s / w`: the first step's rate is 0
    /// (transformers' `get_*_schedule_with_warmup`).
    #[default]
    Zero,
    /// Step `s` at `(s + 1) / w`: the first step already moves the weights.
    FirstStep,
}

/// A learning-rate multiplier per optimiser step (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LrSchedule {
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: ScheduleKind,
    pub warmup_start: WarmupStart,
}

impl LrSchedule {
    /// A checked schedule: `warmup_steps <= total_steps`.
    pub fn new(kind: ScheduleKind, warmup_steps: u64, total_steps: u64) -> Result<Self> {
        let s = Self {
            warmup_steps,
            total_steps,
            kind,
            warmup_start: WarmupStart::Zero,
        };
        s.validate()?;
        Ok(s)
    }

    /// The same schedule with its warm-up starting as `start` says.
    pub fn with_warmup_start(mut self, start: WarmupStart) -> Self {
        self.warmup_start = start;
        self
    }

    pub fn constant(warmup_steps: u64, total_steps: u64) -> Result<Self> {
        Self::new(ScheduleKind::Constant, warmup_steps, total_steps)
    }

    pub fn linear(warmup_steps: u64, total_steps: u64) -> Result<Self> {
        Self::new(ScheduleKind::Linear, warmup_steps, total_steps)
    }

    pub fn cosine(warmup_steps: u64, total_steps: u64) -> Result<Self> {
        Self::new(ScheduleKind::Cosine, warmup_steps, total_steps)
    }

    /// Warm-up over a fraction of the total steps (Hugging Face's `warmup_ratio`:
    /// `ceil(total · ratio)`), `ratio` in `[0, 1]`.
    pub fn with_warmup_ratio(kind: ScheduleKind, ratio: f64, total_steps: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(Error::invalid(format!(
                "LrSchedule: warmup ratio must be in [0, 1], got {ratio}"
            )));
        }
        Self::new(
            kind,
            (total_steps as f64 * ratio).ceil() as u64,
            total_steps,
        )
    }

    pub fn validate(&self) -> Result<()> {
        if self.warmup_steps > self.total_steps {
            return Err(Error::invalid(format!(
                "LrSchedule: warmup_steps ({}) exceeds total_steps ({})",
                self.warmup_steps, self.total_steps
            )));
        }
        Ok(())
    }

    /// The multiplier of the base learning rate at optimiser step `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps, self.total_steps);
        if step < w {
            let ramp = match self.warmup_start {
                WarmupStart::Zero => s,
                WarmupStart::FirstStep => s + 1.0,
            };
            return ramp / (w.max(1) as f64);
        }
        let after = n.saturating_sub(w).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((n as f64 - s) / after).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w as f64) / after;
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate at `step` for base rate `base_lr`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURE: &str = include_str!("../../tests/fixtures/train/schedule.json");

    /// Every step up to total + 2 of eight schedules against transformers
    /// (scripts/train_reference.py).
    #[test]
    fn matches_transformers() {
        let fx: Value = serde_json::from_str(FIXTURE).unwrap();
        let mut worst = 0.0f64;
        let mut n = 0;
        for case in fx["cases"].as_array().unwrap() {
            let kind = match case["kind"].as_str().unwrap() {
                "constant" => ScheduleKind::Constant,
                "linear" => ScheduleKind::Linear,
                "cosine" => ScheduleKind::Cosine,
                k => panic!("unknown kind {k}"),
            };
            let s = LrSchedule::new(
                kind,
                case["warmup"].as_u64().unwrap(),
                case["total"].as_u64().unwrap(),
            )
            .unwrap();
            for (step, want) in case["factors"].as_array().unwrap().iter().enumerate() {
                let (got, want) = (s.factor(step as u64), want.as_f64().unwrap());
                let err = (got - want).abs();
                assert!(err <= 1e-12, "{s:?} step {step}: {got} vs {want}");
                worst = worst.max(err);
                n += 1;
            }
        }
        eprintln!("schedules vs transformers: {n} values, max abs err {worst:e}");
    }

    #[test]
    fn formulas_at_a_few_steps() {
        let lin = LrSchedule::linear(2, 10).unwrap();
        assert_eq!(lin.factor(0), 0.0);
        assert_eq!(lin.factor(1), 0.5);
        assert_eq!(lin.factor(2), 1.0);
        assert_eq!(lin.factor(6), 0.5);
        assert_eq!(lin.factor(10), 0.0);
        assert_eq!(lin.factor(50), 0.0);
        assert_eq!(lin.lr(2e-5, 6), 1e-5);
        let cos = LrSchedule::cosine(0, 4).unwrap();
        assert!((cos.factor(2) - 0.5).abs() < 1e-15);
        assert!(cos.factor(4).abs() < 1e-15);
        let c = LrSchedule::constant(0, 0).unwrap();
        assert_eq!(c.factor(0), 1.0);
        let r = LrSchedule::with_warmup_ratio(ScheduleKind::Linear, 0.1, 95).unwrap();
        assert_eq!(r.warmup_steps, 10);
    }

    /// The shifted warm-up: `(s + 1) / w` during warm-up, the same curve after.
    #[test]
    fn warmup_from_the_first_step() {
        let base = LrSchedule::cosine(4, 12).unwrap();
        let s = base.with_warmup_start(WarmupStart::FirstStep);
        let ramp: Vec<f64> = (0..4).map(|i| s.factor(i)).collect();
        assert_eq!(ramp, vec![0.25, 0.5, 0.75, 1.0]);
        for step in 4..=12 {
            assert_eq!(s.factor(step), base.factor(step), "step {step}");
        }
        assert_eq!(base.factor(0), 0.0);
    }

    #[test]
    fn warmup_longer_than_training_is_an_error() {
        let e = LrSchedule::cosine(11, 10).unwrap_err().to_string();
        assert!(
            e.contains("warmup_steps (11) exceeds total_steps (10)"),
            "{e}"
        );
        assert!(LrSchedule::with_warmup_ratio(ScheduleKind::Linear, 1.5, 10).is_err());
        let raw = LrSchedule {
            warmup_steps: 3,
            total_steps: 1,
            kind: ScheduleKind::Linear,
            warmup_start: WarmupStart::Zero,
        };
        assert!(raw.validate().is_err());
    }
}
