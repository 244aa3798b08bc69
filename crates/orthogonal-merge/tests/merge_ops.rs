//! The tests of docs/orthogonal-merge.md, Method, part 2: one task, identical
//! tasks, pruning counts, DARE's mean, cat vs factor-wise, SVD exactness and
//! error, least squares as λ → 0, merge order, negation; and the errors for
//! mismatched shapes, ranks, bases and base models.

mod common;

use std::collections::BTreeMap;

use common::{full_task, lora_task, randn, scaled};
use orthogonal_merge::basis::BasisSpec;
use orthogonal_merge::dare::drop_and_rescale;
use orthogonal_merge::lsq::least_squares;
use orthogonal_merge::prune::magnitude_prune_one;
use orthogonal_merge::svd::{truncated_svd, truncated_svd_factored, truncation_error};
use orthogonal_merge::{
    AdapterMeta, BasisKind, Delta, Error, FrozenSide, LoraFactors, MergeConfig, MergedDelta,
    Method, OrthoInfo, TaskDelta, interference, merge,
};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, device, randn_seeded};

fn weight(m: &MergedDelta) -> Tensor {
    m.weight().unwrap()
}

#[test]
fn one_task_is_returned_by_every_method() {
    let t = lora_task("a", "l", 6, 9, 3, 0.5, 1);
    let tau = t.layers["l"].weight().unwrap();
    for method in Method::ALL {
        if method == Method::LeastSquares {
            continue;
        }
        let cfg = MergeConfig::new(method).with_density(1.0);
        let m = merge(std::slice::from_ref(&t), &cfg).unwrap();
        assert_close(&weight(&m.layers["l"]), &tau, scaled(1e-5), scaled(1e-5));
    }
}

#[test]
fn identical_tasks_ties_returns_tau_linear_twice() {
    let tau = randn(&[5, 7], 3);
    let tasks = [full_task("a", "l", &tau), full_task("b", "l", &tau)];
    let ties = merge(&tasks, &MergeConfig::new(Method::Ties).with_density(1.0)).unwrap();
    assert_close(&weight(&ties.layers["l"]), &tau, 1e-6, 1e-6);
    let lin = merge(&tasks, &MergeConfig::new(Method::Linear)).unwrap();
    assert_close(&weight(&lin.layers["l"]), &(&tau * 2.0), 1e-6, 1e-6);
    // Negation: a task minus itself is nothing.
    let neg = merge(
        &tasks,
        &MergeConfig::new(Method::Linear).with_weights(&[1.0, -1.0]),
    )
    .unwrap();
    assert_eq!(weight(&neg.layers["l"]).abs().max().double_value(&[]), 0.0);
}

#[test]
fn magnitude_pruning_keeps_floor_density_numel() {
    let t = randn(&[7, 13], 4);
    for d in [0.0, 0.01, 0.2, 0.33, 0.5, 0.77, 0.999] {
        let p = magnitude_prune_one(&t, d).unwrap();
        let nz = p.ne(0.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(nz, (d * 91.0) as i64, "density {d}");
        // The kept entries are the largest ones.
        if nz > 0 {
            let kept_min = p.abs().masked_select(&p.ne(0.0)).min().double_value(&[]);
            let dropped_max = t.abs().masked_select(&p.eq(0.0)).max().double_value(&[]);
            assert!(kept_min >= dropped_max);
        }
    }
}

#[test]
fn dare_mean_over_seeds_approaches_tau() {
    let tau = randn(&[8, 8], 9);
    let n = 1000;
    let mut acc = tau.zeros_like();
    for s in 0..n {
        let m = orthogonal_merge::dare::dare_masks(&[8, 8], 1, 0.5, s).unwrap();
        acc += drop_and_rescale(&tau, &m[0], 0.5).unwrap();
    }
    let mean = acc / n as f64;
    let rel = (&mean - &tau).norm().double_value(&[]) / tau.norm().double_value(&[]);
    assert!(rel < 0.1, "relative error of the mean {rel}");
}

#[test]
fn cat_is_exact_and_factorwise_linear_has_cross_terms() {
    let e = |i: usize| {
        let mut v = [0f32; 2];
        v[i] = 1.0;
        v
    };
    let task = |name: &str, i: usize| {
        let b = Tensor::from_slice(&e(i))
            .reshape([2, 1])
            .to_device(device());
        let a = Tensor::from_slice(&e(i))
            .reshape([1, 2])
            .to_device(device());
        TaskDelta::new(name).with("l", Delta::Lora(LoraFactors::new(a, b, 1.0).unwrap()))
    };
    let tasks = [task("a", 0), task("b", 1)];
    let cat = merge(&tasks, &MergeConfig::new(Method::Cat)).unwrap();
    // Expectations built on the host; products of 0 and 1 are exact on any device.
    assert_close(
        &weight(&cat.layers["l"]),
        &Tensor::eye(2, (Kind::Float, Device::Cpu)),
        0.0,
        0.0,
    );
    let fw = merge(
        &tasks,
        &MergeConfig {
            factorwise: true,
            ..MergeConfig::new(Method::Linear)
        },
    )
    .unwrap();
    assert_close(
        &weight(&fw.layers["l"]),
        &Tensor::ones([2, 2], (Kind::Float, Device::Cpu)),
        1e-6,
        0.0,
    );
}

#[test]
fn cat_equals_the_exact_sum_of_deltas_with_rank_sum() {
    let tasks = [
        lora_task("a", "l", 12, 10, 2, 1.0, 1),
        lora_task("b", "l", 12, 10, 3, 0.5, 3),
        lora_task("c", "l", 12, 10, 1, 4.0, 5),
    ];
    let w = [0.3, -1.0, 2.0];
    let want = tasks
        .iter()
        .zip(w)
        .map(|(t, w)| t.layers["l"].weight().unwrap() * w)
        .reduce(|a, b| a + b)
        .unwrap();
    let cat = merge(&tasks, &MergeConfig::new(Method::Cat).with_weights(&w)).unwrap();
    assert_eq!(cat.layers["l"].rank(), Some(6));
    let tol = scaled(1e-5);
    assert_close(&weight(&cat.layers["l"]), &want, tol, tol);
    let lin = merge(&tasks, &MergeConfig::new(Method::Linear).with_weights(&w)).unwrap();
    assert_close(&weight(&lin.layers["l"]), &want, tol, tol);
}

#[test]
fn svd_is_exact_at_full_rank_and_optimal_below() {
    let b = randn(&[20, 4], 1);
    let a = randn(&[4, 15], 2);
    let d = b.mm(&a);
    let tol = scaled(1e-4);
    let f = truncated_svd(&d, 4, None).unwrap();
    assert_close(&f.delta_weight().unwrap(), &d, tol, tol);
    let f = truncated_svd(&d, 9, None).unwrap();
    assert_eq!(f.rank(), 9);
    assert_close(&f.delta_weight().unwrap(), &d, tol, tol);
    for r in [1, 2, 3] {
        let f = truncated_svd(&d, r, None).unwrap();
        let err = (f.delta_weight().unwrap() - &d)
            .to_kind(Kind::Double)
            .norm()
            .double_value(&[]);
        let want = truncation_error(&d, r).unwrap();
        assert!(
            (err - want).abs() < tol * want.max(1.0),
            "rank {r}: {err} vs {want}"
        );
        // The factored route gives the same product.
        let g = truncated_svd_factored(&b, &a, r, None).unwrap();
        assert_close(
            &g.delta_weight().unwrap(),
            &f.delta_weight().unwrap(),
            tol,
            tol,
        );
    }
    // Clamping bounds the factors' entries.
    let c = truncated_svd(&d, 3, Some(0.9)).unwrap();
    let hi = Tensor::cat(&[c.b.reshape([-1]), c.a.reshape([-1])], 0)
        .abs()
        .max()
        .double_value(&[]);
    let unclamped = truncated_svd(&d, 3, None).unwrap();
    let hi0 = Tensor::cat(&[unclamped.b.reshape([-1]), unclamped.a.reshape([-1])], 0)
        .abs()
        .max()
        .double_value(&[]);
    assert!(hi < hi0);
}

#[test]
fn least_squares_with_equal_deltas_tends_to_the_delta() {
    let d = randn(&[6, 5], 11);
    let x1 = randn(&[40, 5], 12);
    let x2 = randn(&[30, 5], 13) * 3.0;
    let g = |x: &Tensor| {
        x.to_kind(Kind::Double)
            .transpose(0, 1)
            .mm(&x.to_kind(Kind::Double))
            / x.size()[0] as f64
    };
    let deltas = [d.shallow_clone(), d.shallow_clone()];
    let grams = [g(&x1), g(&x2)];
    let mut prev = f64::INFINITY;
    for ridge in [1.0, 1e-2, 1e-6] {
        let w = least_squares(&deltas, &grams, &[1.0, 1.0], ridge).unwrap();
        let err = (&w - &d).abs().max().double_value(&[]);
        assert!(err <= prev + 1e-9, "error must shrink with the ridge");
        prev = err;
    }
    assert!(prev < 1e-5, "{prev}");
    // Rank-deficient features without a ridge are an error asking for one.
    // On the CPU: whether Cholesky flags an exactly singular Gram depends on
    // rounding, and LAPACK's rounding flags this one (cuSOLVER's may not).
    let cpu = Device::Cpu;
    let x = randn_seeded(&[3, 5], 14, cpu).unwrap();
    let deltas = [d.to_device(cpu), d.to_device(cpu)];
    let e = least_squares(&deltas, &[g(&x), g(&x)], &[1.0, 1.0], 0.0).unwrap_err();
    assert!(e.to_string().contains("ridge > 0"), "{e}");
}

#[test]
fn merges_do_not_depend_on_task_order() {
    let tasks: Vec<TaskDelta> = (0..4)
        .map(|i| lora_task(&format!("t{i}"), "l", 9, 7, 2, 1.0, 10 * i))
        .collect();
    let w = [1.0, 0.5, -0.3, 2.0];
    let perm = [2usize, 0, 3, 1];
    let shuffled: Vec<TaskDelta> = perm.iter().map(|&i| tasks[i].shallow_clone()).collect();
    let wp: Vec<f64> = perm.iter().map(|&i| w[i]).collect();
    for method in [
        Method::Sum,
        Method::Linear,
        Method::Ties,
        Method::MagnitudePrune,
        Method::Cat,
    ] {
        let (cfg, cfgp) = if method == Method::Sum {
            (MergeConfig::new(method), MergeConfig::new(method))
        } else {
            (
                MergeConfig::new(method).with_weights(&w).with_density(0.5),
                MergeConfig::new(method).with_weights(&wp).with_density(0.5),
            )
        };
        let a = merge(&tasks, &cfg).unwrap();
        let b = merge(&shuffled, &cfgp).unwrap();
        let tol = scaled(1e-5);
        assert_close(&weight(&a.layers["l"]), &weight(&b.layers["l"]), tol, tol);
    }
}

#[test]
fn tasks_on_different_layers_merge_per_layer() {
    let tasks = [
        lora_task("a", "x", 4, 3, 1, 1.0, 1),
        lora_task("b", "y", 5, 6, 2, 1.0, 2),
    ];
    let m = merge(&tasks, &MergeConfig::new(Method::Ties).with_density(1.0)).unwrap();
    assert_eq!(m.layers.len(), 2);
    assert_close(
        &weight(&m.layers["x"]),
        &tasks[0].layers["x"].weight().unwrap(),
        1e-6,
        1e-6,
    );
    // The report covers layers that two tasks change: none here.
    assert!(interference(&tasks).unwrap().layers.is_empty());
}

fn meta(concept: &str, bin: i64, seed: u64, norm: f64) -> AdapterMeta {
    AdapterMeta {
        concept: concept.to_owned(),
        orthogonal: Some(OrthoInfo {
            spec: BasisSpec {
                kind: BasisKind::QrBins,
                seed,
                rank: 2,
                frozen_side: FrozenSide::Output,
            },
            bin,
        }),
        base_norms: BTreeMap::from([("l".to_owned(), norm)]),
    }
}

#[test]
fn mismatches_are_clear_errors() {
    let cfg = MergeConfig::new(Method::Linear);
    // Shapes.
    let e = merge(
        &[
            lora_task("a", "l", 4, 6, 2, 1.0, 1),
            lora_task("b", "l", 4, 5, 2, 1.0, 2),
        ],
        &cfg,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Mismatch(_)) && e.to_string().contains("layer 'l'"),
        "{e}"
    );
    // Ranks, factor-wise.
    let fw = MergeConfig {
        factorwise: true,
        ..MergeConfig::new(Method::Ties)
    };
    let e = merge(
        &[
            lora_task("a", "l", 4, 6, 2, 1.0, 1),
            lora_task("b", "l", 4, 6, 3, 1.0, 2),
        ],
        &fw,
    )
    .unwrap_err();
    assert!(e.to_string().contains("equal ranks"), "{e}");
    // Full deltas cannot be concatenated.
    let e = merge(
        &[
            full_task("a", "l", &randn(&[4, 6], 1)),
            lora_task("b", "l", 4, 6, 2, 1.0, 2),
        ],
        &MergeConfig::new(Method::Cat),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cat needs LoRA"), "{e}");
    // Same bin, different registries, different base models.
    let with = |t: TaskDelta, m: AdapterMeta| TaskDelta { meta: Some(m), ..t };
    let a = || lora_task("a", "l", 4, 6, 2, 1.0, 1);
    let b = || lora_task("b", "l", 4, 6, 2, 1.0, 2);
    let e = merge(
        &[
            with(a(), meta("a", 0, 1, 3.0)),
            with(b(), meta("b", 0, 1, 3.0)),
        ],
        &cfg,
    )
    .unwrap_err();
    assert!(e.to_string().contains("both hold bin 0"), "{e}");
    let e = merge(
        &[
            with(a(), meta("a", 0, 1, 3.0)),
            with(b(), meta("b", 1, 2, 3.0)),
        ],
        &cfg,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not made from one registry"), "{e}");
    let e = merge(
        &[
            with(a(), meta("a", 0, 1, 3.0)),
            with(b(), meta("b", 1, 1, 3.5)),
        ],
        &cfg,
    )
    .unwrap_err();
    assert!(e.to_string().contains("different base models"), "{e}");
    assert!(
        merge(
            &[
                with(a(), meta("a", 0, 1, 3.0)),
                with(b(), meta("b", 1, 1, 3.0))
            ],
            &cfg
        )
        .is_ok()
    );
    // Configuration.
    let two = [a(), b()];
    assert!(matches!(
        merge(
            &two,
            &MergeConfig::new(Method::Sum).with_weights(&[1.0, 2.0])
        ),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        merge(&two, &cfg.clone().with_weights(&[1.0])),
        Err(Error::Mismatch(_))
    ));
    assert!(matches!(
        merge(&two, &MergeConfig::new(Method::DareTies).with_density(0.0)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        merge(&two, &MergeConfig::new(Method::Ties).with_density(-0.1)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        merge(&two, &MergeConfig::new(Method::LeastSquares)),
        Err(Error::Config(_))
    ));
    assert!(matches!(merge(&[a(), a()], &cfg), Err(Error::Config(_))));
    assert!(merge(&[], &cfg).is_err());
    assert!(Method::parse("dare_ties").is_ok() && Method::parse("nope").is_err());
}

/// The reference selection: libtorch's `topk` on `|τ|`, as PEFT does it.
fn topk_prune(t: &Tensor, k: i64) -> Tensor {
    let flat = t.reshape([-1]);
    let (_, idx) = flat.abs().topk(k, 0, true, true);
    let mask = flat.zeros_like().index_fill(0, &idx, 1.0);
    (flat * mask).reshape(t.size().as_slice())
}

#[test]
fn radix_route_selects_what_topk_selects() {
    // On the CPU: the radix route only serves f32 tensors on the CPU.
    let randn = |shape: &[i64], seed| randn_seeded(shape, seed, Device::Cpu).unwrap();
    // Large enough for the radix route. Continuous values: the same entries.
    let t = randn(&[300, 257], 21);
    for d in [0.05, 0.2, 0.5, 0.93] {
        let k = (d * t.numel() as f64) as i64;
        assert_close(
            &magnitude_prune_one(&t, d).unwrap(),
            &topk_prune(&t, k),
            0.0,
            0.0,
        );
    }
    // Ties at the threshold (rounded values, zeros among them): topk decides,
    // so the kept magnitudes are the same multiset.
    let q = (randn(&[200, 100], 22) * 4.0).round();
    for d in [0.05, 0.2, 0.5, 0.93] {
        let k = (d * q.numel() as f64) as i64;
        let sorted = |x: Tensor| x.abs().reshape([-1]).sort(0, false).0;
        assert_close(
            &sorted(magnitude_prune_one(&q, d).unwrap()),
            &sorted(topk_prune(&q, k)),
            0.0,
            0.0,
        );
    }
}

#[test]
fn model_level_dare_uses_the_per_layer_seeded_masks() {
    use orthogonal_merge::dare::{dare_linear, dare_masks, dare_ties};
    use orthogonal_merge::target::name_seed;
    let ts: Vec<Tensor> = (0..3).map(|i| randn(&[40, 30], 30 + i)).collect();
    let tasks: Vec<TaskDelta> = ts
        .iter()
        .enumerate()
        .map(|(i, t)| full_task(&format!("t{i}"), "enc.q", t))
        .collect();
    let w = [1.0, -0.5, 2.0];
    let masks = dare_masks(&[40, 30], 3, 0.3, name_seed(5, &["enc.q", "dare"])).unwrap();
    let lin = merge(
        &tasks,
        &MergeConfig::new(Method::DareLinear)
            .with_weights(&w)
            .with_density(0.3)
            .with_seed(5),
    )
    .unwrap();
    // The merge streams the tasks (fused multiply-adds): not the same kernels.
    let tol = scaled(1e-5);
    assert_close(
        &weight(&lin.layers["enc.q"]),
        &dare_linear(&ts, &w, 0.3, &masks).unwrap(),
        tol,
        tol,
    );
    let cfg = MergeConfig::new(Method::DareTies)
        .with_weights(&w)
        .with_density(0.3)
        .with_seed(5);
    let dt = merge(&tasks, &cfg).unwrap();
    let want = dare_ties(&ts, &w, 0.3, &masks, orthogonal_merge::SignMethod::Total).unwrap();
    assert_close(&weight(&dt.layers["enc.q"]), &want, tol, tol);
    // Another seed, other masks.
    let other = merge(&tasks, &cfg.clone().with_seed(6)).unwrap();
    assert!(
        (weight(&other.layers["enc.q"]) - weight(&dt.layers["enc.q"]))
            .abs()
            .max()
            .double_value(&[])
            > 0.0
    );
}
