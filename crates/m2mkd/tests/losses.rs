//! The losses of eq. 2 against PyTorch (fixture from
//! `scripts/kd_reference.py`), the spec's test vector, and their invariants,
//! computed on the test device (`MODULAR_TEST_DEVICE`).

use std::sync::Arc;

use m2mkd::loss::{DistilLoss, LossInputs, cross_entropy, hidden_mse};
use m2mkd::{Error, KdConfig, KdType, KlNorm, LossRegistry, LossTerm, kd_soft, m2mkd_loss};
use proptest::prelude::*;
use serde_json::Value;
use tensor_core::prelude::*;
use tensor_core::testing::{assert_close, randn_seeded, tolerances};

/// The device the losses are computed on.
fn dev() -> Device {
    tensor_core::testing::device()
}

/// Values on the test device.
fn on_dev<T: tensor_core::tch::kind::Element>(v: &[T]) -> Tensor {
    Tensor::from_slice(v).to_device(dev())
}

/// A `[B, C]` fixture matrix (f32), on the CPU.
fn tensor2(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let (b, c) = (rows.len() as i64, rows[0].len() as i64);
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_slice(&flat).reshape([b, c])
}

#[test]
fn matches_pytorch_m2mkd_loss_and_gradient() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kd_reference.json"
    ))
    .unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    // PyTorch's values were computed on the CPU: 10x looser for f32 on CUDA.
    let (a0, r0) = DType::F32.tolerances();
    let (a1, r1) = tolerances(DType::F32, dev());
    let (atol, rtol) = (1e-6 * a1 / a0, 1e-4 * r1 / r0);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let zs = tensor2(&c["zs"]).to_device(dev()).set_requires_grad(true);
        let zt = tensor2(&c["zt"]).to_device(dev());
        let y = if c["y"].is_null() {
            tensor2(&c["y_soft"]).to_device(dev())
        } else {
            let v: Vec<i64> = serde_json::from_value(c["y"].clone()).unwrap();
            on_dev(&v)
        };
        let cfg = KdConfig {
            alpha: c["alpha"].as_f64().unwrap(),
            tau: c["tau"].as_f64().unwrap(),
            kd_type: serde_json::from_value(c["kd_type"].clone()).unwrap(),
            kl_norm: serde_json::from_value(c["kl_norm"].clone()).unwrap(),
            label_smoothing: c["label_smoothing"].as_f64().unwrap(),
        };
        let out = m2mkd_loss(&zs, &zt, &y, &cfg).unwrap();
        for (what, got, key) in [
            ("kd", &out.kd, "kd"),
            ("ce", &out.ce, "ce"),
            ("total", &out.total, "total"),
        ] {
            let want = c[key].as_f64().unwrap();
            let got = got.double_value(&[]);
            assert!(
                (got - want).abs() <= atol + rtol * want.abs(),
                "{name} {what}: ours {got}, PyTorch {want}"
            );
        }
        out.total.backward();
        assert_close(&zs.grad(), &tensor2(&c["grad_zs"]), atol, rtol);
    }
}

#[test]
fn spec_test_vector() {
    let zs = on_dev(&[1.0f32, 0.0, -1.0, 0.2, 0.1, 0.0]).reshape([2, 3]);
    let zt = on_dev(&[2.0f32, 0.5, -1.0, 0.0, 0.3, 0.1]).reshape([2, 3]);
    let bc = kd_soft(&zs, &zt, 1.0, KlNorm::SumOverBc)
        .unwrap()
        .double_value(&[]);
    let bm = kd_soft(&zs, &zt, 1.0, KlNorm::BatchMean)
        .unwrap()
        .double_value(&[]);
    assert!((bc - 0.008981).abs() < 5e-7, "{bc}");
    assert!((bm - 0.026944).abs() < 5e-7, "{bm}");
}

/// Seeded logits on the test device.
fn logits(b: i64, c: i64, seed: u64, scale: f64) -> Tensor {
    randn_seeded(&[b, c], seed, dev()).unwrap() * scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// KD is zero for identical logits at any τ, so L = (1 − α)·CE.
    #[test]
    fn kd_zero_at_equal_logits(b in 1i64..9, c in 2i64..12, seed in 0u64..1000, tau in 0.25f64..8.0, alpha in 0.0f64..1.0) {
        let z = logits(b, c, seed, 3.0);
        let y = tensor_core::testing::randint_seeded(c, &[b], seed + 1, dev()).unwrap();
        for norm in [KlNorm::SumOverBc, KlNorm::BatchMean] {
            let kd = kd_soft(&z, &z, tau, norm).unwrap().double_value(&[]);
            prop_assert!(kd.abs() < 1e-6, "kd = {kd}");
        }
        let cfg = KdConfig { alpha, tau, ..KdConfig::default() };
        let l = m2mkd_loss(&z, &z, &y, &cfg).unwrap();
        let ce = cross_entropy(&z, &y, 0.0).unwrap().double_value(&[]);
        prop_assert!((l.total.double_value(&[]) - (1.0 - alpha) * ce).abs() < 1e-5);
    }

    /// KD is positive when the distributions differ, and `sum_over_BC = batchmean / C`.
    #[test]
    fn kd_positive_and_norms_related(b in 1i64..9, c in 2i64..12, seed in 0u64..1000, tau in 0.25f64..8.0) {
        let zs = logits(b, c, seed, 2.0);
        let zt = logits(b, c, seed + 7, 2.0);
        let bc = kd_soft(&zs, &zt, tau, KlNorm::SumOverBc).unwrap().double_value(&[]);
        let bm = kd_soft(&zs, &zt, tau, KlNorm::BatchMean).unwrap().double_value(&[]);
        prop_assert!(bc > 0.0 && bm > 0.0, "{bc} {bm}");
        prop_assert!((bc - bm / c as f64).abs() <= 1e-6 * (1.0 + bm.abs()));
        // A constant shift per row does not change the distributions: what
        // is left is f32 rounding of the log-softmax, which eq. 2's τ² scales
        // up (seen: 1.6e-5 at τ = 7.7, C = 8).
        let shifted = &zs + logits(b, 1, seed + 9, 5.0);
        let z = kd_soft(&zs, &shifted, tau, KlNorm::BatchMean).unwrap().double_value(&[]);
        prop_assert!(z.abs() < 2e-6 * tau.max(1.0).powi(2), "{z} at tau = {tau}");
    }
}

#[test]
fn hard_variant_is_ce_on_teacher_argmax() {
    let zs = logits(6, 4, 1, 1.0);
    let zt = logits(6, 4, 2, 1.0);
    let cfg = KdConfig {
        kd_type: KdType::Hard,
        alpha: 1.0,
        ..KdConfig::default()
    };
    let y = on_dev(&[0i64, 1, 2, 3, 0, 1]);
    let l = m2mkd_loss(&zs, &zt, &y, &cfg).unwrap().total;
    let want = cross_entropy(&zs, &zt.argmax(-1, false), 0.0).unwrap();
    assert_close(&l, &want, 1e-7, 0.0);
}

#[test]
fn bad_inputs_are_errors() {
    let zs = logits(4, 3, 1, 1.0);
    let y = on_dev(&[0i64, 1, 2, 0]);
    let e = kd_soft(&zs, &logits(4, 5, 2, 1.0), 1.0, KlNorm::SumOverBc).unwrap_err();
    assert!(e.to_string().contains("teacher logits"), "{e}");
    let e = kd_soft(&zs, &zs, 0.0, KlNorm::SumOverBc).unwrap_err();
    assert!(e.to_string().contains("tau"), "{e}");
    let ids = on_dev(&[1i64, 2, 3, 4]).reshape([2, 2]);
    assert!(kd_soft(&ids, &ids, 1.0, KlNorm::SumOverBc).is_err());
    let bad_alpha = KdConfig {
        alpha: 1.5,
        ..KdConfig::default()
    };
    let e = m2mkd_loss(&zs, &zs, &y, &bad_alpha).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let e = cross_entropy(&zs, &on_dev(&[0i64, 1]), 0.0).unwrap_err();
    assert!(e.to_string().contains("targets"), "{e}");
    let e = hidden_mse(&logits(2, 3, 1, 1.0), &logits(2, 4, 1, 1.0), None).unwrap_err();
    assert!(e.to_string().contains("hidden"), "{e}");
}

#[test]
fn hidden_mse_counts_only_masked_tokens() {
    let hs = randn_seeded(&[2, 3, 4], 1, dev()).unwrap();
    let ht = hs.copy();
    // Differences only on padded positions are ignored.
    let _ = ht.narrow(1, 2, 1).fill_(100.0);
    let mask = on_dev(&[1i64, 1, 0, 1, 1, 0]).reshape([2, 3]);
    let v = hidden_mse(&hs, &ht, Some(&mask)).unwrap().double_value(&[]);
    assert!(v.abs() < 1e-12, "{v}");
    let unmasked = hidden_mse(&hs, &ht, None).unwrap().double_value(&[]);
    assert!(unmasked > 1.0);
}

/// A user loss: squared distance between the logits.
#[derive(Debug)]
struct LogitL2;

impl DistilLoss for LogitL2 {
    fn compute(&self, x: &LossInputs<'_>) -> m2mkd::Result<Tensor> {
        let zt = x.teacher_logits.unwrap();
        Ok((x.student_logits - zt).square().mean(Kind::Float))
    }
}

#[test]
fn registry_names_losses_and_takes_user_losses() {
    let mut r = LossRegistry::with_builtins(&KdConfig::default());
    assert_eq!(
        r.names(),
        ["ce", "hidden_mse", "kd_hard", "kd_soft", "m2mkd"]
    );
    let e = r.check(&[LossTerm::new("l2", 1.0)]).unwrap_err();
    assert!(
        e.to_string().contains("unknown loss 'l2'") && e.to_string().contains("m2mkd"),
        "{e}"
    );
    r.register("l2", Arc::new(LogitL2));
    let zs = logits(3, 4, 1, 1.0);
    let zt = logits(3, 4, 2, 1.0);
    let y = on_dev(&[0i64, 1, 2]);
    let inputs = LossInputs {
        student_logits: &zs,
        teacher_logits: Some(&zt),
        targets: &y,
        student_hidden: None,
        teacher_hidden: None,
        mask: None,
    };
    let terms = [LossTerm::new("m2mkd", 1.0), LossTerm::new("l2", 0.5)];
    let (total, parts) = r.combine(&terms, &inputs).unwrap();
    let want = m2mkd_loss(&zs, &zt, &y, &KdConfig::default())
        .unwrap()
        .total
        + (&zs - &zt).square().mean(Kind::Float) * 0.5;
    assert_close(&total, &want, 1e-7, 1e-6);
    assert_eq!(parts.len(), 2);
    // A loss that needs the teacher says so when there is none.
    let no_teacher = LossInputs {
        teacher_logits: None,
        ..inputs
    };
    let e = r.combine(&terms[..1], &no_teacher).unwrap_err();
    assert!(e.to_string().contains("needs teacher logits"), "{e}");
    let e = r.check(&[LossTerm::new("ce", f64::NAN)]).unwrap_err();
    assert!(e.to_string().contains("weight"), "{e}");
}
