//! The grouped expert primitive against a per-expert reference: outputs and
//! gradients on random shapes (proptest), capacity drops in token order, the
//! stable sort and its counts, and bad inputs as errors.

use proptest::prelude::*;
use tch::{Kind, Tensor};
use tensor_core::DType;
use tensor_core::grouped::{
    Dispatch, grouped_linear, grouped_linear_device, grouped_linear_padded,
};
use tensor_core::testing::{assert_close, device, randint_seeded, randn_seeded, tolerances};

use crate::scaled;

/// The bounds for a result against the per-token reference (a different
/// order of operations): f32's, looser on CUDA.
fn tol() -> (f64, f64) {
    tolerances(DType::F32, device())
}

struct Case {
    x: Tensor,
    idx: Tensor,
    gates: Tensor,
    w: Tensor,
    b: Tensor,
}

/// Values drawn identically on every device, then on the test device.
fn case(n: i64, k: i64, e: i64, din: i64, dout: i64, seed: u64) -> Case {
    let dev = device();
    let leaf = |t: Tensor| t.set_requires_grad(true);
    Case {
        x: leaf(randn_seeded(&[n, din], seed, dev).unwrap()),
        idx: randint_seeded(e, &[n, k], seed + 1, dev).unwrap(),
        gates: leaf(
            randn_seeded(&[n, k], seed + 2, dev)
                .unwrap()
                .softmax(-1, Kind::Float)
                .detach(),
        ),
        w: leaf(randn_seeded(&[e, dout, din], seed + 3, dev).unwrap()),
        b: leaf(randn_seeded(&[e, dout], seed + 4, dev).unwrap()),
    }
}

/// `y_t = Σ_j g_tj (W_e x_t + b_e)`, token by token, on the case's device.
fn reference(c: &Case) -> Tensor {
    let (n, k) = (c.idx.size()[0], c.idx.size()[1]);
    let rows: Vec<Tensor> = (0..n)
        .map(|t| {
            let mut acc = Tensor::zeros([c.w.size()[1]], (Kind::Float, c.x.device()));
            for j in 0..k {
                let e = c.idx.int64_value(&[t, j]);
                let y = c.x.get(t).matmul(&c.w.get(e).tr()) + c.b.get(e);
                acc += y * c.gates.get(t).get(j);
            }
            acc
        })
        .collect();
    Tensor::stack(&rows, 0)
}

fn grouped(c: &Case) -> Tensor {
    let d = Dispatch::new(&c.idx, c.w.size()[0]).unwrap();
    let xs = d.permute(&c.x).unwrap();
    let y = grouped_linear(&xs, &d.counts_host().unwrap(), &c.w, Some(&c.b)).unwrap();
    d.unpermute(&y, Some(&c.gates)).unwrap()
}

fn grads(c: &Case, out: &Tensor) -> Vec<Tensor> {
    let probe = randn_seeded(&out.size(), 77, out.device()).unwrap();
    Tensor::run_backward(
        &[(out * probe).sum(Kind::Float)],
        &[&c.x, &c.w, &c.b, &c.gates],
        false,
        false,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn grouped_equals_per_token_reference(n in 1i64..24, k in 1i64..4, e in 1i64..7, din in 1i64..12, dout in 1i64..12, seed in 0u64..10_000) {
        let c = case(n, k, e, din, dout, seed);
        let ours = grouped(&c);
        let expected = reference(&c);
        let (atol, rtol) = tol();
        assert_close(&ours, &expected, atol, rtol);
        for (g_ours, g_ref) in grads(&c, &ours).iter().zip(grads(&c, &expected).iter()) {
            assert_close(g_ours, g_ref, atol, rtol);
        }
    }

    #[test]
    fn device_grouped_gemm_equals_per_token_reference(n in 1i64..24, k in 1i64..4, e in 1i64..7, din in 1i64..4, dout in 1i64..4, seed in 0u64..10_000) {
        // 16-byte rows: f32 widths in multiples of 4.
        let c = case(n, k, e, 4 * din, 4 * dout, seed);
        let d = Dispatch::new(&c.idx, e).unwrap();
        let xs = d.permute(&c.x).unwrap();
        let y = grouped_linear_device(&xs, &d, &c.w, Some(&c.b)).unwrap();
        let ours = d.unpermute(&y, Some(&c.gates)).unwrap();
        let expected = reference(&c);
        let (atol, rtol) = tol();
        assert_close(&ours, &expected, atol, rtol);
        for (g_ours, g_ref) in grads(&c, &ours).iter().zip(grads(&c, &expected).iter()) {
            assert_close(g_ours, g_ref, atol, rtol);
        }
    }

    #[test]
    fn padded_with_enough_capacity_equals_grouped(n in 1i64..24, k in 1i64..3, e in 1i64..6, seed in 0u64..10_000) {
        let c = case(n, k, e, 5, 4, seed);
        let d = Dispatch::new(&c.idx, e).unwrap();
        let xs = d.permute(&c.x).unwrap();
        let (y, kept) = grouped_linear_padded(&xs, &d, &c.w, Some(&c.b), n * k).unwrap();
        prop_assert!(bool::try_from(kept.all()).unwrap());
        let ours = d.unpermute(&y, Some(&c.gates)).unwrap();
        let (atol, rtol) = tol();
        assert_close(&ours, &reference(&c), atol, rtol);
        for (g_ours, g_ref) in grads(&c, &ours).iter().zip(grads(&c, &reference(&c)).iter()) {
            assert_close(g_ours, g_ref, atol, rtol);
        }
    }
}

#[test]
fn capacity_drops_the_overflow_in_token_order() {
    let (n, e, cap) = (10, 3, 2);
    let c = case(n, 1, e, 4, 3, 5);
    let d = Dispatch::new(&c.idx, e).unwrap();
    let xs = d.permute(&c.x).unwrap();
    let (y, kept) = grouped_linear_padded(&xs, &d, &c.w, Some(&c.b), cap).unwrap();
    let counts = d.counts_host().unwrap();
    let kept_total = kept.sum(Kind::Int64).int64_value(&[]);
    assert_eq!(kept_total, counts.iter().map(|&c| c.min(cap)).sum::<i64>());
    // Kept rows equal the uncapped result; dropped rows are zero.
    let full = grouped_linear(&xs, &counts, &c.w, Some(&c.b)).unwrap();
    let keep_f = kept.to_kind(Kind::Float).unsqueeze(1);
    let (atol, rtol) = scaled(1e-6, 1e-5);
    assert_close(&y, &(&full * &keep_f), atol, rtol);
    // The first `cap` tokens of each expert (in token order) are the kept ones.
    let experts: Vec<i64> = Vec::try_from(&d.expert).unwrap();
    let kept: Vec<bool> = Vec::try_from(&kept).unwrap();
    let mut seen = vec![0; e as usize];
    for (ex, k) in experts.iter().zip(kept) {
        assert_eq!(k, seen[*ex as usize] < cap);
        seen[*ex as usize] += 1;
    }
}

#[test]
fn sort_is_stable_and_counts_match() {
    let idx = Tensor::from_slice(&[2i64, 0, 1, 0, 2, 2])
        .view([3, 2])
        .to_device(device());
    let d = Dispatch::new(&idx, 4).unwrap();
    assert_eq!(d.counts_host().unwrap(), [2, 1, 3, 0]);
    assert_eq!(Vec::<i64>::try_from(&d.order).unwrap(), [1, 3, 2, 0, 4, 5]);
    assert_eq!(Vec::<i64>::try_from(&d.token).unwrap(), [0, 1, 1, 0, 2, 2]);
}

#[test]
fn bad_inputs_are_errors() {
    let dev = device();
    let ids = |v: &[i64], shape: &[i64]| Tensor::from_slice(v).view(shape).to_device(dev);
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, dev));
    let e = Dispatch::new(&ids(&[0, 5], &[2, 1]), 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_experts"), "{e}");
    assert!(Dispatch::new(&ids(&[0, 1], &[2]), 3).is_err());
    assert!(Dispatch::new(&zeros(&[2, 1]), 3).is_err());
    let d = Dispatch::new(&ids(&[0, 1], &[2, 1]), 2).unwrap();
    assert!(d.permute(&zeros(&[3, 4])).is_err());
    let w = zeros(&[2, 3, 4]);
    let xs = zeros(&[2, 4]);
    assert!(grouped_linear(&xs, &[1, 2], &w, None).is_err());
    assert!(grouped_linear(&xs, &[2], &w, None).is_err());
    assert!(grouped_linear(&zeros(&[2, 5]), &[1, 1], &w, None).is_err());
    assert!(grouped_linear_padded(&xs, &d, &w, None, 0).is_err());
    let y = grouped_linear(&xs, &[1, 1], &w, None).unwrap();
    assert!(d.unpermute(&y, Some(&zeros(&[2, 2]))).is_err());
}

#[test]
fn device_grouped_gemm_rejects_unaligned_widths_and_mismatched_experts() {
    let c = case(6, 2, 3, 5, 4, 1);
    let d = Dispatch::new(&c.idx, 3).unwrap();
    let xs = d.permute(&c.x).unwrap();
    let err = grouped_linear_device(&xs, &d, &c.w, Some(&c.b))
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 4"), "{err}");
    let d4 = Dispatch::new(&c.idx, 4).unwrap();
    let c8 = case(6, 2, 3, 8, 4, 1);
    let xs8 = d4.permute(&c8.x).unwrap();
    let err = grouped_linear_device(&xs8, &d4, &c8.w, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 expert weights for 4 experts"), "{err}");
}
