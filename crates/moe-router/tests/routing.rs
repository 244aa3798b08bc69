//! Routers, capacity and the auxiliary losses (docs/moe-router.md, Method, part 1 tests).

mod common;

use common::{dev, randn64, to_vec, to_vec_i64};
use moe_router::capacity::{assign_slots, capacity};
use moe_router::config::*;
use moe_router::losses::*;
use moe_router::router::{RouteIds, Router};
use tensor_core::Context;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, with_seed};

const D: i64 = 8;

/// Initialised on the CPU (the same values on every device), then moved to the test device.
fn router(config: RouterConfig, seed: u64) -> Router {
    let mut r = with_seed(seed, || Router::new(D, config, Device::Cpu)).unwrap();
    for (_, p) in r.params_mut() {
        *p = p.to_device(dev()).detach().set_requires_grad(true);
    }
    r
}

fn x(t: i64, seed: u64) -> Tensor {
    randn64(&[t, D], seed).to_kind(Kind::Float)
}

#[test]
fn config_defaults_and_json_round_trip() {
    let c = RouterConfig::default();
    assert_eq!(c.capacity_factor, 1.0);
    assert_eq!(c.jitter_eps, 0.01);
    assert_eq!(c.noise_std, 1.0);
    assert_eq!(c.mlp_hidden, 256);
    assert_eq!(c.balance_weight, 1e-2);
    assert_eq!(c.z_loss_weight, 1e-3);
    assert_eq!(c.expert_choice_capacity, 2.0);
    assert_eq!(c.min_capacity, 8);
    let mut c2 = RouterConfig::moduleformer(16, 2);
    c2.drop_policy = DropPolicy::Priority;
    c2.noise = Noise::Gumbel;
    let back = RouterConfig::from_json(&c2.to_json().unwrap()).unwrap();
    assert_eq!(back, c2);
    // Partial JSON takes the defaults.
    let p = RouterConfig::from_json(r#"{"num_experts": 4, "top_k": 1, "gate": "mlp"}"#).unwrap();
    assert_eq!((p.num_experts, p.top_k, p.gate), (4, 1, GateType::Mlp));
    assert_eq!(p.capacity_factor, 1.0);
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    for (e, k) in [(4, 0), (4, 5), (0, 1)] {
        assert!(RouterConfig::new(e, k).validate().is_err());
    }
    let mut c = RouterConfig::new(4, 2);
    c.capacity_factor = -1.0;
    assert!(Router::new(D, c, dev()).is_err());
    let mut c = RouterConfig::new(4, 2);
    c.sample_topk = 3;
    assert!(c.validate().is_err());
    assert!(RouterConfig::from_json("{\"top_k\": \"two\"}").is_err());
    let r = router(RouterConfig::new(4, 2), 0);
    let mut ctx = Context::eval();
    assert!(
        r.route(&Tensor::zeros([3, D + 1], (Kind::Float, dev())), &mut ctx)
            .is_err()
    );
    assert!(
        r.route(&Tensor::zeros([3, D], (Kind::Int64, dev())), &mut ctx)
            .is_err()
    );
    // Hash routing without ids.
    let mut c = RouterConfig::new(4, 1);
    c.gate = GateType::Hash;
    let h = router(c, 0);
    let err = h.route(&x(3, 1), &mut ctx).unwrap_err();
    assert!(err.to_string().contains("RouteIds"), "{err}");
}

#[test]
fn softmax_topk_invariants_and_weight_modes() {
    let t = 32;
    let xs = x(t, 2);
    for mode in [
        WeightMode::Raw,
        WeightMode::Renorm,
        WeightMode::Pnorm,
        WeightMode::Hard,
    ] {
        let mut c = RouterConfig::new(6, 3).dropless();
        c.weight_mode = mode;
        let r = router(c, 3);
        let mut ctx = Context::eval();
        let ro = r.route(&xs, &mut ctx).unwrap();
        // Rows of p sum to 1.
        assert_close(
            &ro.probs.sum_dim_intlist(-1, false, None),
            &Tensor::ones([t], (Kind::Float, dev())),
            1e-5,
            1e-4,
        );
        // Chosen experts are distinct, and top-k of p = top-k of logits.
        let e = to_vec_i64(&ro.experts);
        for row in e.chunks(3) {
            let mut s = row.to_vec();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 3);
        }
        let (_, by_logit) = ro.logits.topk(3, -1, true, true);
        assert_eq!(to_vec_i64(&by_logit), e);
        let top_p = ro.probs.gather(1, &ro.experts, false);
        match mode {
            WeightMode::Raw => assert_close(&ro.gates, &top_p, 1e-6, 1e-5),
            WeightMode::Renorm | WeightMode::Pnorm => {
                // pnorm with q = 1 is renorm; both sum to 1 and equal softmax over chosen logits.
                let chosen = ro
                    .logits
                    .gather(1, &ro.experts, false)
                    .softmax(-1, Kind::Float);
                assert_close(&ro.gates, &chosen, 1e-5, 1e-4);
                assert_close(
                    &ro.gates.sum_dim_intlist(-1, false, None),
                    &Tensor::ones([t], (Kind::Float, dev())),
                    1e-5,
                    1e-4,
                );
            }
            WeightMode::Hard => assert_close(&ro.gates, &ro.gates.ones_like(), 0.0, 0.0),
        }
    }
    // pnorm with q = 2: unit L2 norm.
    let mut c = RouterConfig::new(6, 3).dropless();
    c.weight_mode = WeightMode::Pnorm;
    c.pnorm_p = 2.0;
    let ro = router(c, 3).route(&xs, &mut Context::eval()).unwrap();
    let n = ro.gates.square().sum_dim_intlist(-1, false, None);
    assert_close(&n, &n.ones_like(), 1e-5, 1e-4);
}

#[test]
fn mlp_cosine_sigmoid_gates() {
    let xs = x(16, 4);
    for gate in [GateType::Mlp, GateType::Cosine] {
        let mut c = RouterConfig::new(5, 2).dropless();
        c.gate = gate;
        c.mlp_hidden = 12;
        c.cosine_dim = 6;
        let r = router(c, 5);
        let ro = r.route(&xs, &mut Context::eval()).unwrap();
        assert_eq!(ro.logits.size(), [16, 5]);
        assert!(
            r.params()
                .iter()
                .all(|(n, t)| n.starts_with("router.") && t.requires_grad())
        );
    }
    let mut c = RouterConfig::new(5, 2).dropless();
    c.score = ScoreFn::Sigmoid;
    c.weight_mode = WeightMode::Raw;
    let ro = router(c, 6).route(&xs, &mut Context::eval()).unwrap();
    assert_close(
        &ro.gates,
        &ro.logits.sigmoid().gather(1, &ro.experts, false),
        1e-6,
        1e-5,
    );
    let s = ro.probs.sum_dim_intlist(-1, false, None);
    assert_close(&s, &s.ones_like(), 1e-5, 1e-4);
}

#[test]
fn noise_jitter_and_sampling_only_in_training() {
    let xs = x(64, 7);
    let mut c = RouterConfig::new(8, 2).dropless();
    c.noise = Noise::Gaussian;
    c.jitter = true;
    c.sample_topk = 1;
    let r = router(c.clone(), 8);
    let clean = r.route(&xs, &mut Context::eval()).unwrap();
    let again = r.route(&xs, &mut Context::eval()).unwrap();
    assert_eq!(to_vec_i64(&clean.experts), to_vec_i64(&again.experts));
    assert!(clean.noisy_logits.is_none());
    let a = with_seed(1, || r.route(&xs, &mut Context::train()).unwrap());
    let b = with_seed(1, || r.route(&xs, &mut Context::train()).unwrap());
    assert_eq!(
        to_vec_i64(&a.experts),
        to_vec_i64(&b.experts),
        "seeded training draws repeat"
    );
    assert!(a.noisy_logits.is_some());
    assert_ne!(to_vec_i64(&a.experts), to_vec_i64(&clean.experts));
    // Sampled top-k: the first choice is the argmax of the (noisy) scores, the two are distinct.
    let e = to_vec_i64(&a.experts);
    let arg = to_vec_i64(&a.probs.argmax(-1, false));
    for (t, row) in e.chunks(2).enumerate() {
        assert_ne!(row[0], row[1]);
        assert_eq!(row[0], arg[t]);
    }
    // Gumbel noise changes the choice too, and never in eval.
    c.noise = Noise::Gumbel;
    c.jitter = false;
    c.sample_topk = 0;
    let g = router(c, 8);
    let tr = with_seed(2, || g.route(&xs, &mut Context::train()).unwrap());
    assert_ne!(to_vec_i64(&tr.experts), to_vec_i64(&clean.experts));
    assert_eq!(
        to_vec_i64(&g.route(&xs, &mut Context::eval()).unwrap().experts),
        to_vec_i64(&clean.experts)
    );
}

#[test]
fn capacity_formulas() {
    let mut c = RouterConfig::new(8, 2);
    assert_eq!(capacity(&c, 64, true), Some(16)); // ⌈1·2·64/8⌉
    assert_eq!(capacity(&c, 8, true), Some(8)); // max(2, 8), clamped to T = 8
    c.eval_capacity_factor = Some(2.0);
    assert_eq!(capacity(&c, 64, false), Some(32));
    c.capacity_rule = CapacityRule::Fairseq;
    assert_eq!(capacity(&c, 60, true), Some(16)); // 2⌈60/8⌉
    assert_eq!(capacity(&c, 60, false), Some(15)); // ⌈0.25·60⌉
    c.capacity_rule = CapacityRule::Megablocks;
    c.capacity_factor = 1.5;
    assert_eq!(capacity(&c, 64, true), Some(24));
    assert_eq!(capacity(&c.clone().dropless(), 64, true), None);
}

#[test]
fn capacity_is_never_exceeded_and_drops_follow_the_policy() {
    let t = 40;
    let xs = x(t, 9);
    for policy in [DropPolicy::Position, DropPolicy::Priority] {
        let mut c = RouterConfig::new(4, 2);
        c.capacity_factor = 0.5;
        c.min_capacity = 0;
        c.drop_policy = policy;
        c.renorm_after_drop = policy == DropPolicy::Priority;
        let r = router(c, 10);
        let mut ctx = Context::eval();
        let ro = r.route(&xs, &mut ctx).unwrap();
        let cap = ro.capacity.unwrap();
        assert_eq!(cap, 10);
        let load = to_vec(&ro.load().unwrap());
        assert!(load.iter().all(|&l| l <= cap as f64), "{load:?}");
        let kept = to_vec(&ro.kept.to_kind(Kind::Double));
        let gates = to_vec(&ro.gates);
        let e = to_vec_i64(&ro.experts);
        assert!(kept.contains(&0.0), "something must be dropped at cf 0.5");
        for i in 0..kept.len() {
            if kept[i] == 0.0 {
                assert_eq!(gates[i], 0.0, "dropped assignments contribute 0");
            }
        }
        let p = to_vec(&ro.probs.gather(1, &ro.experts, false));
        for ex in 0..4 {
            let idx: Vec<usize> = (0..e.len()).filter(|&i| e[i] == ex).collect();
            match policy {
                DropPolicy::Priority => {
                    let min_kept = idx
                        .iter()
                        .filter(|&&i| kept[i] == 1.0)
                        .map(|&i| p[i])
                        .fold(f64::INFINITY, f64::min);
                    let max_drop = idx
                        .iter()
                        .filter(|&&i| kept[i] == 0.0)
                        .map(|&i| p[i])
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert!(
                        min_kept >= max_drop,
                        "expert {ex}: kept {min_kept} < dropped {max_drop}"
                    );
                }
                DropPolicy::Position => {
                    // Rank j·T + t: a kept assignment never comes after a dropped one.
                    let rank = |i: usize| (i % 2) * t as usize + i / 2;
                    let last_kept = idx
                        .iter()
                        .filter(|&&i| kept[i] == 1.0)
                        .map(|&i| rank(i))
                        .max();
                    let first_drop = idx
                        .iter()
                        .filter(|&&i| kept[i] == 0.0)
                        .map(|&i| rank(i))
                        .min();
                    if let (Some(a), Some(b)) = (last_kept, first_drop) {
                        assert!(a < b);
                    }
                }
            }
        }
        // Statistics were recorded on the device.
        let names: Vec<&str> = ctx.stats().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["expert_load", "expert_importance", "dropped_fraction"]
        );
        let dropped = ctx.stats()[2].1.double_value(&[]);
        let expect = kept.iter().filter(|&&k| k == 0.0).count() as f64 / kept.len() as f64;
        assert!((dropped - expect).abs() < 1e-6);
        if policy == DropPolicy::Priority {
            // renorm_after_drop: a token with a kept assignment has gates summing to 1.
            let s = to_vec(&ro.gates.sum_dim_intlist(-1, false, None));
            for v in s {
                assert!(v == 0.0 || (v - 1.0).abs() < 1e-5, "{v}");
            }
        }
    }
}

#[test]
fn assign_slots_small_example() {
    // 3 tokens, top-1, all to expert 0, capacity 2: tokens 0, 1 kept by position;
    // by priority the two most probable.
    let e = on_dev(&[0i64, 0, 0]).view([3, 1]);
    let p = on_dev(&[0.2f32, 0.9, 0.5]).view([3, 1]);
    let (k, s) = assign_slots(&e, &p, 2, 2, DropPolicy::Position).unwrap();
    assert_eq!(to_vec(&k.to_kind(Kind::Double)), [1.0, 1.0, 0.0]);
    assert_eq!(to_vec_i64(&s), [0, 1, 2]);
    let (k, s) = assign_slots(&e, &p, 2, 2, DropPolicy::Priority).unwrap();
    assert_eq!(to_vec(&k.to_kind(Kind::Double)), [0.0, 1.0, 1.0]);
    assert_eq!(to_vec_i64(&s), [2, 0, 1]);
    assert!(assign_slots(&e, &p, 2, 0, DropPolicy::Position).is_err());
}

#[test]
fn expert_choice_takes_exactly_c_tokens_each() {
    let t = 20;
    let mut c = RouterConfig::new(5, 1);
    c.routing = RoutingMode::ExpertChoice;
    let r = router(c, 11);
    let ro = r.route(&x(t, 12), &mut Context::eval()).unwrap();
    let cap = ro.capacity.unwrap();
    assert_eq!(cap, 8); // ⌈20·2/5⌉
    let per_expert = ro.kept.to_kind(Kind::Float).sum_dim_intlist(0, false, None);
    assert_eq!(to_vec(&per_expert), vec![cap as f64; 5]);
    let (tokens, gates) = ro.expert_choice.as_ref().unwrap();
    assert_eq!(tokens.size(), [5, cap]);
    // The gates are S_te at the chosen tokens.
    let s = ro.probs.tr().gather(1, tokens, false);
    assert_close(gates, &s, 0.0, 0.0);
}

#[test]
fn hash_and_fixed_routing() {
    let ids = on_dev(&[0i64, 1, 2, 3, 1000, 7, 7, 123456]);
    for (gate, seed) in [(GateType::Hash, 3u64), (GateType::Fixed, 0)] {
        let mut c = RouterConfig::new(4, 2);
        c.gate = gate;
        c.seed = seed;
        c.weight_mode = WeightMode::Hard;
        let r = router(c, 0);
        let mut ctx = Context::eval();
        ctx.insert(RouteIds(ids.shallow_clone()));
        let ro = r.route(&x(8, 13), &mut ctx).unwrap();
        let e = to_vec_i64(&ro.experts);
        assert!(e.iter().all(|&v| (0..4).contains(&v)));
        for row in e.chunks(2) {
            assert_eq!((row[0] + 1) % 4, row[1]);
        }
        assert_eq!(e[10], e[12], "same id, same experts");
        if gate == GateType::Fixed {
            assert_eq!(&e[..8], &[0, 1, 1, 2, 2, 3, 3, 0]);
        }
        let again = r.route(&x(8, 14), &mut ctx).unwrap();
        assert_eq!(to_vec_i64(&again.experts), e, "depends only on the ids");
    }
    // A different seed gives a different hash.
    let route = |seed| {
        let mut c = RouterConfig::new(16, 1);
        c.gate = GateType::Hash;
        c.seed = seed;
        let mut ctx = Context::eval();
        ctx.insert(RouteIds(Tensor::arange(64, (Kind::Int64, dev()))));
        to_vec_i64(&router(c, 0).route(&x(64, 1), &mut ctx).unwrap().experts)
    };
    assert_ne!(route(1), route(2));
    assert_eq!(route(1), route(1));
}

#[test]
fn aux_losses_are_added_in_training_only() {
    let mut c = RouterConfig::new(4, 2);
    c.cv_weight = 0.01;
    c.mi_weight = 0.1;
    c.concentration_weight = 0.1;
    let r = router(c.clone(), 15);
    let xs = x(16, 16);
    let ro = r.route(&xs, &mut Context::eval()).unwrap();
    let mut ev = Context::eval();
    add_aux_losses(&c, &ro, &mut ev).unwrap();
    assert!(ev.aux_losses().is_empty());
    let mut tr = Context::train();
    add_aux_losses(&c, &ro, &mut tr).unwrap();
    let names: Vec<&str> = tr.aux_losses().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "balance_loss",
            "z_loss",
            "cv_loss",
            "mi_loss",
            "concentration_loss"
        ]
    );
    let bal = balance_loss(&ro.probs, &ro.experts, c.balance_variant, 1).unwrap();
    assert_close(&tr.aux_losses()[0].1, &(bal * 0.01), 1e-7, 1e-5);
    // Gradient reaches the router.
    let total = tr.aux_loss_total(dev()).unwrap();
    total.backward();
    assert!(
        r.params()[0]
            .1
            .grad()
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            > 0.0
    );
}

/// Probability rows on the test device.
fn p(rows: &[&[f64]]) -> Tensor {
    let e = rows[0].len() as i64;
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, e])
        .to_device(dev())
}

/// Values on the test device.
fn on_dev<T: tensor_core::tch::kind::Element>(v: &[T]) -> Tensor {
    Tensor::from_slice(v).to_device(dev())
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn balance_loss_values() {
    let probs = p(&[&[0.8, 0.2], &[0.6, 0.4]]);
    let top1 = probs.argmax(-1, true);
    let l = balance_loss(&probs, &top1, BalanceVariant::SwitchTop1, 1).unwrap();
    assert!((scalar(&l) - 1.4).abs() < 1e-12);
    // Uniform routing gives 1 in every variant; collapsed gives E (top-1).
    let e = 4;
    let uni = Tensor::full([8, e], 0.25, (Kind::Double, dev()));
    let spread = on_dev(&[0i64, 1, 2, 3, 0, 1, 2, 3]).view([8, 1]);
    let spread2 = Tensor::cat(&[spread.shallow_clone(), (&spread + 1).remainder(4)], 1);
    for v in [
        BalanceVariant::SwitchTop1,
        BalanceVariant::DeepspeedTopk,
        BalanceVariant::Megablocks,
    ] {
        assert!((scalar(&balance_loss(&uni, &spread, v, 1).unwrap()) - 1.0).abs() < 1e-12);
        assert!((scalar(&balance_loss(&uni, &spread2, v, 1).unwrap()) - 1.0).abs() < 1e-12);
    }
    assert!(
        (scalar(&balance_loss(&uni, &spread2, BalanceVariant::Megablocks, 4).unwrap()) - 0.25)
            .abs()
            < 1e-12
    );
    let onehot = Tensor::zeros([8, e], (Kind::Double, dev())).index_fill(1, &on_dev(&[0i64]), 1.0);
    let all0 = Tensor::zeros([8, 1], (Kind::Int64, dev()));
    let collapsed = balance_loss(&onehot, &all0, BalanceVariant::SwitchTop1, 1).unwrap();
    assert!((scalar(&collapsed) - e as f64).abs() < 1e-12);
    assert!(
        balance_loss(
            &uni,
            &Tensor::zeros([3, 1], (Kind::Int64, dev())),
            BalanceVariant::SwitchTop1,
            1
        )
        .is_err()
    );
}

#[test]
fn z_loss_and_cv_values() {
    let z = z_loss(&Tensor::zeros([3, 2], (Kind::Double, dev()))).unwrap();
    assert!((scalar(&z) - 0.480453).abs() < 1e-6);
    assert!(scalar(&z_loss(&randn64(&[5, 3], 1)).unwrap()) >= 0.0);
    let bal = on_dev(&[3.0f64, 3.0, 3.0, 3.0]);
    assert_eq!(
        scalar(&cv_squared(&bal, CvVariance::Unbiased).unwrap()),
        0.0
    );
    let skew = on_dev(&[12.0f64, 0.0, 0.0, 0.0]);
    // Biased Var = 27, Mean² = 9 → 3; unbiased 36/9 = 4.
    assert!((scalar(&cv_squared(&skew, CvVariance::Biased).unwrap()) - 3.0).abs() < 1e-9);
    assert!((scalar(&cv_squared(&skew, CvVariance::Unbiased).unwrap()) - 4.0).abs() < 1e-9);
    let uni = Tensor::full([8, 4], 0.25, (Kind::Double, dev()));
    assert!(
        scalar(
            &importance_load_cv2(
                &uni,
                &Tensor::full([4], 4.0, (Kind::Double, dev())),
                CvVariance::Unbiased
            )
            .unwrap()
        )
        .abs()
            < 1e-12
    );
    // Smooth load: Φ-estimates in [0, T] summing to about k T when the noise is small.
    let clean = randn64(&[50, 4], 2);
    let noisy = &clean + randn64(&[50, 4], 3) * 0.01;
    let sl = smooth_load(&clean, &noisy, 0.01, 2).unwrap();
    assert!((scalar(&sl.sum(Kind::Double)) - 100.0).abs() < 5.0);
}

#[test]
fn mutual_information_loss_values_and_extremes() {
    let probs = p(&[
        &[0.7, 0.2, 0.1],
        &[0.1, 0.8, 0.1],
        &[0.3, 0.3, 0.4],
        &[0.25, 0.25, 0.5],
    ]);
    let l = scalar(&mutual_information_loss(&probs, None).unwrap());
    assert!((l - -0.196607).abs() < 1e-6, "{l}");
    // Equal rows: 0. One-hot balanced: −log E.
    let same = p(&[&[0.5, 0.3, 0.2], &[0.5, 0.3, 0.2]]);
    assert!(scalar(&mutual_information_loss(&same, None).unwrap()).abs() < 1e-7);
    let eye = Tensor::eye(3, (Kind::Double, dev()));
    let m = scalar(&mutual_information_loss(&eye, None).unwrap());
    assert!((m + 3f64.ln()).abs() < 1e-6, "{m}");
    // From logits via log-softmax: always in [−log E, 0].
    for seed in 0..5 {
        let logits = randn64(&[7, 5], seed) * 3.0;
        let pr = logits.softmax(-1, Kind::Double);
        let ls = logits.log_softmax(-1, Kind::Double);
        let v = scalar(&mutual_information_loss(&pr, Some(&ls)).unwrap());
        assert!(v <= 1e-9 && v >= -(5f64.ln()) - 1e-9, "{v}");
    }
    // The accumulator over two calls equals one call on both halves.
    let mut acc = MiAccumulator::default();
    acc.add(&probs.narrow(0, 0, 2), None).unwrap();
    acc.add(&probs.narrow(0, 2, 2), None).unwrap();
    assert_eq!(acc.count(), 4);
    assert!((scalar(&acc.loss().unwrap()) - l).abs() < 1e-12);
    acc.clear();
    assert!(acc.loss().is_err());
}

#[test]
fn mi_accumulation_through_the_context() {
    let mut c = RouterConfig::new(4, 2).dropless();
    c.mi_weight = 0.5;
    c.mi_accumulate = true;
    let r = router(c.clone(), 17);
    let mut ctx = Context::train();
    let xa = x(6, 18);
    let xb = x(6, 19);
    for xs in [&xa, &xb] {
        let ro = r.route(xs, &mut ctx).unwrap();
        add_aux_losses(&c, &ro, &mut ctx).unwrap();
    }
    assert!(ctx.aux_losses().iter().all(|(n, _)| !n.contains("mi_loss")));
    assert_eq!(flush_mi_losses(&mut ctx).unwrap(), 1);
    let (name, got) = ctx
        .aux_losses()
        .iter()
        .find(|(n, _)| n.contains("mi_loss"))
        .unwrap();
    assert_eq!(name, "mi_loss");
    let both = Tensor::cat(&[xa, xb], 0);
    let ro = r.route(&both, &mut Context::eval()).unwrap();
    let expect = mutual_information_loss(&ro.probs, ro.log_probs.as_ref()).unwrap() * 0.5;
    assert_close(got, &expect, 1e-6, 1e-5);
    assert_eq!(flush_mi_losses(&mut ctx).unwrap(), 0);
}

#[test]
fn load_concentration_extremes() {
    let uni = Tensor::full([6, 4], 0.25, (Kind::Double, dev()));
    assert!((scalar(&load_concentration(&uni).unwrap()) - 4f64.ln()).abs() < 1e-6);
    let one = Tensor::zeros([6, 4], (Kind::Double, dev())).index_fill(1, &on_dev(&[2i64]), 1.0);
    assert!(scalar(&load_concentration(&one).unwrap()).abs() < 1e-6);
}
