//! Dynamic loss scaling for f16 training (Micikevicius et al., "Mixed
//! Precision Training", ICLR 2018), computed as `torch.amp.GradScaler`:
//!
//! ```text
//! backward of  S · loss                        (small f16 gradients stay representable)
//! g ← g / S;   inf ← any(!isfinite(g))          unscale, check
//! inf:  skip the optimiser step,  S ← S · backoff,  growth counter ← 0
//! else: step;  counter += 1;  counter = interval ⇒ S ← S · growth, counter ← 0
//! ```
//!
//! Defaults are PyTorch's: `S₀ = 2¹⁶`, growth 2, backoff 0.5, interval 2000.
//! Unscaling, the check and the scale update (`_amp_update_scale_`) are
//! device ops; deciding whether to skip the step reads one boolean back
//! (one host synchronisation per step, as PyTorch's `GradScaler.step` does).
//! bf16 has f32's exponent range and needs no scaling: use
//! [`GradScaler::disabled`], which makes every call a pass-through.

use crate::TchResultExt;
use crate::tch::{self, Device, Kind, Tensor};

use super::optim::AdamW;
use crate::error::{Error, Result};

/// Settings of [`GradScaler`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Dynamic loss scaler (see the module docs).
#[derive(Debug)]
pub struct GradScaler {
    config: ScalerConfig,
    enabled: bool,
    /// `[1]` f32 on the device.
    scale: Tensor,
    /// `[1]` i32 on the device: successful steps since the last change.
    growth_tracker: Tensor,
    skipped: u64,
}

impl GradScaler {
    pub fn new(config: ScalerConfig, device: Device) -> Result<Self> {
        let ok = config.init_scale.is_finite()
            && config.init_scale > 0.0
            && config.growth_factor > 1.0
            && config.backoff_factor > 0.0
            && config.backoff_factor < 1.0
            && config.growth_interval > 0;
        if !ok {
            return Err(Error::invalid(format!(
                "GradScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval > 0; got {config:?}"
            )));
        }
        Ok(Self {
            scale: Tensor::f_full([1], config.init_scale, (Kind::Float, device))
                .op("GradScaler")?,
            growth_tracker: Tensor::f_zeros([1], (Kind::Int, device)).op("GradScaler")?,
            config,
            enabled: true,
            skipped: 0,
        })
    }

    /// A scaler that does nothing (bf16 or f32 training).
    pub fn disabled(device: Device) -> Result<Self> {
        let mut s = Self::new(ScalerConfig::default(), device)?;
        s.enabled = false;
        Ok(s)
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The current scale `S` (reads it back: a host sync; for logging).
    pub fn scale_value(&self) -> f64 {
        if self.enabled {
            self.scale.double_value(&[0])
        } else {
            1.0
        }
    }

    /// Optimiser steps skipped because of non-finite gradients.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// `S · loss`, to call backward on.
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        if !self.enabled {
            return Ok(loss.shallow_clone());
        }
        let op = "GradScaler::scale";
        let s = self
            .scale
            .f_to_kind(loss.kind())
            .and_then(|s| s.f_reshape([]))
            .op(op)?;
        loss.f_mul(&s).op(op)
    }

    /// Unscale the optimiser's gradients in place and return the device
    /// flag "some gradient is not finite" (`[1]` f32, 1.0 or 0.0).
    pub fn unscale(&self, opt: &AdamW) -> Result<Tensor> {
        let dev = self.scale.device();
        let mut found = Tensor::f_zeros([1], (Kind::Float, dev)).op("GradScaler::unscale")?;
        if !self.enabled {
            return Ok(found);
        }
        let inv = self.scale.f_reciprocal().op("GradScaler::unscale")?;
        tch::no_grad(|| -> Result<()> {
            for (name, p) in opt.named_parameters() {
                let mut g = p.f_grad().op(name)?;
                if !g.defined() {
                    continue;
                }
                let inv_g = inv.f_to_kind(g.kind()).op(name)?;
                let _ = g.f_mul_(&inv_g).op(name)?;
                let bad = g
                    .f_isfinite()
                    .and_then(|t| t.f_logical_not())
                    .and_then(|t| t.f_any())
                    .and_then(|t| t.f_to_kind(Kind::Float))
                    .and_then(|t| t.f_reshape([1]))
                    .op(name)?;
                found = found.f_maximum(&bad).op(name)?;
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Unscale, then run `opt.step()` unless a gradient is not finite, then
    /// update the scale. Returns whether the step ran.
    pub fn step(&mut self, opt: &mut AdamW) -> Result<bool> {
        if !self.enabled {
            opt.step()?;
            return Ok(true);
        }
        let found = self.unscale(opt)?;
        let stepped = found.double_value(&[0]) == 0.0;
        if stepped {
            opt.step()?;
        } else {
            self.skipped += 1;
        }
        let c = &self.config;
        let _ = tch::no_grad(|| {
            self.scale.f_internal_amp_update_scale_(
                &self.growth_tracker,
                &found,
                c.growth_factor,
                c.backoff_factor,
                c.growth_interval,
            )
        })
        .op("GradScaler::update")?;
        Ok(stepped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::device;
    use crate::train::AdamWConfig;

    /// A parameter on the test device.
    fn param(v: &[f32], kind: Kind) -> Tensor {
        Tensor::from_slice(v)
            .to_device(device())
            .to_kind(kind)
            .set_requires_grad(true)
    }

    #[test]
    fn finite_gradients_are_unscaled_and_the_step_runs() {
        let p = param(&[1.0, -2.0], Kind::Half);
        let mut opt =
            AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig::new(0.1)).unwrap();
        // (3 · 2¹⁶ would overflow f16's 65504: the case the scaler exists for, tested below.)
        let cfg = ScalerConfig {
            init_scale: 1024.0,
            ..ScalerConfig::default()
        };
        let mut sc = GradScaler::new(cfg, device()).unwrap();
        // loss = Σ 3 p: the true gradient is 3.
        let loss = p.to_kind(Kind::Float).sum(Kind::Float) * 3.0;
        sc.scale(&loss).unwrap().backward();
        let scaled = p.grad().to_kind(Kind::Float);
        assert_eq!(scaled.double_value(&[0]), 3.0 * 1024.0);
        let found = sc.unscale(&opt).unwrap();
        assert_eq!(found.double_value(&[0]), 0.0);
        assert_eq!(p.grad().to_kind(Kind::Float).double_value(&[0]), 3.0);
        // Re-scale so `step` can unscale once more.
        let _ = p.grad().f_mul_scalar_(1024.0).unwrap();
        let before = p.to_kind(Kind::Float);
        assert!(sc.step(&mut opt).unwrap());
        let after = p.to_kind(Kind::Float);
        // AdamW's first step moves each weight by lr = 0.1 against the gradient's sign.
        let moved = (&before - &after).abs().max().double_value(&[]);
        assert!((moved - 0.1).abs() < 2e-3, "{moved}");
        assert_eq!(sc.skipped_steps(), 0);
        assert_eq!(sc.scale_value(), 1024.0);
    }

    #[test]
    fn an_overflow_skips_the_step_and_halves_the_scale_and_growth_doubles_it() {
        let p = param(&[1.0, 2.0], Kind::Float);
        let mut opt =
            AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig::new(0.1)).unwrap();
        let cfg = ScalerConfig {
            growth_interval: 2,
            ..ScalerConfig::default()
        };
        let mut sc = GradScaler::new(cfg, device()).unwrap();
        let loss = (p.get(0) * f64::INFINITY) + p.get(1);
        sc.scale(&loss).unwrap().backward();
        let before = p.copy();
        assert!(!sc.step(&mut opt).unwrap());
        assert_eq!(p, before, "a skipped step leaves the weights alone");
        assert_eq!(sc.skipped_steps(), 1);
        assert_eq!(sc.scale_value(), 32768.0);
        assert_eq!(opt.step_count(), 0);
        for _ in 0..2 {
            opt.zero_grad().unwrap();
            sc.scale(&p.sum(Kind::Float)).unwrap().backward();
            assert!(sc.step(&mut opt).unwrap());
        }
        assert_eq!(
            sc.scale_value(),
            65536.0,
            "two good steps at interval 2 double S"
        );
    }

    #[test]
    fn bad_settings_are_errors_and_disabled_is_a_pass_through() {
        // A refused setting and a pass-through: nothing is computed, the host suffices.
        let bad = ScalerConfig {
            backoff_factor: 1.5,
            ..ScalerConfig::default()
        };
        assert!(
            GradScaler::new(bad, Device::Cpu)
                .unwrap_err()
                .to_string()
                .contains("backoff")
        );
        let sc = GradScaler::disabled(Device::Cpu).unwrap();
        let l = Tensor::from(2.5f32);
        assert_eq!(sc.scale(&l).unwrap().double_value(&[]), 2.5);
        assert_eq!(sc.scale_value(), 1.0);
    }
}
