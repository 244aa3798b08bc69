//! Gradient clipping by global L2 norm, as `torch.nn.utils.clip_grad_norm_`
//! (`norm_type=2`):
//!
//! ```text
//! total = ‖(‖g_1‖₂, …, ‖g_k‖₂)‖₂          over the parameters that have a gradient
//! coef  = min(1, max_norm / (total + 1e-6))
//! g_i  ← g_i · coef                        in place, on the device
//! ```
//!
//! It returns `total` (the norm before clipping), which costs one host
//! synchronisation. Unlike PyTorch's default (`error_if_nonfinite=False`), a
//! NaN or infinite total is an error and the gradients are left unchanged.

use crate::TchResultExt;
use crate::tch::{self, Kind, Tensor};

use crate::error::{Error, Result};

/// Scale the gradients of `params` so that their global L2 norm is at most
/// `max_norm` (> 0); returns the norm before clipping. Parameters without a
/// gradient are ignored; with none at all the result is 0.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::invalid(format!(
            "clip_grad_norm: max_norm must be finite and > 0, got {max_norm}"
        )));
    }
    let Some((total, total_host, mut grads)) = total_norm(params, "clip_grad_norm")? else {
        return Ok(0.0);
    };
    tch::no_grad(|| -> Result<()> {
        // coef computed on the device in the norm's dtype, exactly as torch does.
        let coef = total
            .f_add_scalar(1e-6)
            .and_then(|d| d.f_reciprocal())
            .and_then(|r| r.f_mul_scalar(max_norm))
            .and_then(|c| c.f_clamp_max(1.0))
            .op("clip_grad_norm")?;
        for g in &mut grads {
            let c = coef.f_to_device(g.device()).op("clip_grad_norm")?;
            g.f_mul_(&c).map(drop).op("clip_grad_norm")?;
        }
        Ok(())
    })?;
    Ok(total_host)
}

/// The global L2 norm of the gradients of `params`, computed as
/// [`clip_grad_norm`] computes it, without changing them (0 when none has a
/// gradient; NaN or Inf is an error).
pub fn grad_norm(params: &[Tensor]) -> Result<f64> {
    Ok(total_norm(params, "grad_norm")?.map_or(0.0, |(_, host, _)| host))
}

/// The total norm on the device and on the host, and the defined gradients;
/// `None` when no parameter has a gradient.
fn total_norm(params: &[Tensor], op: &str) -> Result<Option<(Tensor, f64, Vec<Tensor>)>> {
    let mut grads = Vec::new();
    for p in params {
        let g = p.f_grad().op(op)?;
        if g.defined() {
            grads.push(g);
        }
    }
    let Some(first) = grads.first() else {
        return Ok(None);
    };
    let device = first.device();
    // Per-tensor norms in the gradients' dtype (as torch), promoted to f64 only
    // when gradients of different precisions are mixed.
    let kinds: Vec<Kind> = grads.iter().map(Tensor::kind).collect();
    let norm_kind = if kinds.iter().all(|&k| k == kinds[0]) {
        kinds[0]
    } else if kinds.contains(&Kind::Double) {
        Kind::Double
    } else {
        Kind::Float
    };
    let total = tch::no_grad(|| -> Result<Tensor> {
        let norms = grads
            .iter()
            .map(|g| {
                g.f_norm()
                    .and_then(|n| n.f_to_device(device))
                    .and_then(|n| n.f_to_kind(norm_kind))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .op(op)?;
        Tensor::f_stack(&norms, 0).and_then(|s| s.f_norm()).op(op)
    })?;
    let total_host = total.f_double_value(&[]).op(op)?;
    if !total_host.is_finite() {
        return Err(Error::invalid(format!(
            "{op}: the total gradient norm is {total_host} (NaN or Inf gradients); \
             gradients left unchanged"
        )));
    }
    Ok(Some((total, total_host, grads)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tch::Device;
    use crate::testing::{closeness, device};
    use serde_json::Value;

    use crate::testing::slack;

    const FIXTURE: &str = include_str!("../../tests/fixtures/train/clip.json");

    use crate::train::test_fixtures::floats;

    /// Params whose gradients are exactly `grads` (loss = Σ p·g).
    fn with_grads(fx: &Value, device: Device) -> Vec<Tensor> {
        let shapes = fx["shapes"].as_array().unwrap();
        let grads = fx["grads"].as_array().unwrap();
        let mut params = Vec::new();
        let mut loss = Tensor::zeros([], (Kind::Float, device));
        for (s, g) in shapes.iter().zip(grads) {
            let shape: Vec<i64> = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            let p = Tensor::zeros(shape.as_slice(), (Kind::Float, device)).set_requires_grad(true);
            let g = Tensor::from_slice(&floats(g))
                .reshape(shape.as_slice())
                .to_device(device);
            loss += (&p * g).sum(Kind::Float);
            params.push(p);
        }
        loss.backward();
        params
    }

    #[test]
    fn matches_torch_clip_grad_norm() {
        let device = device();
        let fx: Value = serde_json::from_str(FIXTURE).unwrap();
        let (mut worst_norm, mut worst_grad) = (0.0f64, 0.0f64);
        for case in fx["cases"].as_array().unwrap() {
            let params = with_grads(&fx, device);
            let max_norm = case["max_norm"].as_f64().unwrap();
            let total = clip_grad_norm(&params, max_norm).unwrap();
            let want = case["total_norm"].as_f64().unwrap();
            let err = (total - want).abs();
            assert!(
                err <= 1e-5 * slack() * want.max(1.0),
                "total norm {total} vs {want}"
            );
            worst_norm = worst_norm.max(err);
            for (p, c) in params.iter().zip(case["clipped"].as_array().unwrap()) {
                let expected = Tensor::from_slice(&floats(c))
                    .reshape(p.size())
                    .to_device(device);
                let cl = closeness(&p.grad(), &expected, 1e-6 * slack(), 0.0).unwrap();
                assert!(cl.ok, "max_norm {max_norm}: max abs err {:e}", cl.max_abs);
                worst_grad = worst_grad.max(cl.max_abs);
            }
        }
        eprintln!(
            "clip_grad_norm vs torch on {device:?}: norm abs err {worst_norm:e}, grad max abs err {worst_grad:e}"
        );
    }

    #[test]
    fn clipped_norm_is_max_norm() {
        let p = Tensor::zeros([4], (Kind::Float, device())).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0]).to_device(device()))
            .sum(Kind::Float)
            .backward();
        // Measuring alone changes nothing.
        let measured = grad_norm(std::slice::from_ref(&p)).unwrap();
        assert!((measured - 5.0).abs() < 1e-6);
        assert_eq!(p.grad().double_value(&[1]), 4.0);
        let total = clip_grad_norm(std::slice::from_ref(&p), 1.0).unwrap();
        assert_eq!(total, measured);
        let after = p.grad().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn non_finite_and_bad_input_are_errors() {
        let dev = device();
        let p = Tensor::zeros([2], (Kind::Float, dev)).set_requires_grad(true);
        (&p * Tensor::from_slice(&[f32::NAN, 1.0]).to_device(dev))
            .sum(Kind::Float)
            .backward();
        let e = clip_grad_norm(std::slice::from_ref(&p), 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NaN or Inf"), "{e}");
        // gradients untouched
        assert_eq!(p.grad().double_value(&[1]), 1.0);

        let q = Tensor::zeros([2], (Kind::Float, dev)).set_requires_grad(true);
        (&q * Tensor::from_slice(&[f32::INFINITY, 1.0]).to_device(dev))
            .sum(Kind::Float)
            .backward();
        assert!(
            clip_grad_norm(std::slice::from_ref(&q), 1.0)
                .unwrap_err()
                .to_string()
                .contains("inf")
        );

        assert!(
            clip_grad_norm(&[], 0.0)
                .unwrap_err()
                .to_string()
                .contains("max_norm")
        );
        assert!(clip_grad_norm(&[], f64::NAN).is_err());
        // no gradients at all: nothing to clip
        let r = Tensor::zeros([2], (Kind::Float, dev)).set_requires_grad(true);
        assert_eq!(clip_grad_norm(&[r], 1.0).unwrap(), 0.0);
    }
}
