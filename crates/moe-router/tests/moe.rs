//! The MoE layer: sparse paths (capacity, dropless, expert choice) against
//! the dense masked reference and a per-token loop, in values and gradients
//! (f64, 1e-10; 1e-8 on CUDA, whose `index_add` sums in no fixed order);
//! invariants over random shapes (proptest).

mod common;

use common::{
    atomics_tol, dev, grads, leaf, randn64, seeded, seeded_f64, to_vec, to_vec_i64, trainable,
};
use moe_router::config::{DropPolicy, RouterConfig, RoutingMode, WeightMode};
use moe_router::moe::{DroplessKernel, ExpertActivation, MoeConfig, MoeLayer, MoePath};
use proptest::prelude::*;
use tensor_core::DType;
use tensor_core::layers::{Activation, FeedForward, FfnNames};
use tensor_core::module::Sequential;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, tolerances, with_seed};
use tensor_core::{Context, Module, ModuleExt};

const D: i64 = 6;
const FF: i64 = 5;

fn layer(router: RouterConfig, act: ExpertActivation, bias: bool, seed: u64) -> MoeLayer {
    layer_with(router, act, bias, seed, DroplessKernel::Padded)
}

fn layer_with(
    router: RouterConfig,
    act: ExpertActivation,
    bias: bool,
    seed: u64,
    kernel: DroplessKernel,
) -> MoeLayer {
    let mut c = MoeConfig::new(D, FF, router);
    c.dropless_kernel = kernel;
    c.activation = act;
    c.bias = bias;
    seeded_f64(seed, || MoeLayer::new(c, Device::Cpu).unwrap())
}

/// Sparse vs dense on the same routing: values and gradients w.r.t. x and every parameter.
fn check_against_dense(m: &MoeLayer, t: i64, train: bool, seed: u64) {
    let x = randn64(&[t, D], seed);
    let x = leaf(if seed == 21 { x.abs() + 0.1 } else { x });
    let r = randn64(&[t, D], seed + 1);
    let mut ctx = if train {
        Context::train()
    } else {
        Context::eval()
    };
    let routing = with_seed(seed, || m.router.route(&x, &mut ctx).unwrap());
    let sparse = m.compute(&x, &routing, MoePath::Sparse).unwrap();
    let dense = m.compute(&x, &routing, MoePath::Dense).unwrap();
    let tol = atomics_tol(1e-10);
    assert_close(&sparse, &dense, tol, tol);
    let mut inputs = trainable(m);
    inputs.push(x.shallow_clone());
    let gs = grads(&sparse, &r, &inputs);
    let gd = grads(&dense, &r, &inputs);
    for (a, b) in gs.iter().zip(&gd) {
        assert_close(a, b, tol, tol);
    }
    // The router receives gradient (through the gates) unless gates are hard.
    if m.router.config.weight_mode != WeightMode::Hard {
        assert!(gs[0].abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
}

#[test]
fn dropless_equals_dense_values_and_gradients() {
    for (act, bias) in [
        (ExpertActivation::Gelu, true),
        (ExpertActivation::SwiGlu, false),
        (ExpertActivation::GeluTanh, false),
    ] {
        for mode in [WeightMode::Renorm, WeightMode::Raw] {
            let mut rc = RouterConfig::new(4, 2).dropless();
            rc.weight_mode = mode;
            for kernel in [DroplessKernel::Padded, DroplessKernel::Grouped] {
                check_against_dense(&layer_with(rc.clone(), act, bias, 1, kernel), 11, false, 2);
            }
        }
    }
}

#[test]
fn collapsed_routing_falls_back_to_grouped_and_stays_exact() {
    // Every token picks expert 0 first: padding to the largest group would
    // quadruple the rows, so the padded kernel hands over to the grouped one.
    let m = layer(
        RouterConfig::new(4, 1).dropless(),
        ExpertActivation::Gelu,
        true,
        20,
    );
    tensor_core::tch::no_grad(|| {
        let mut w = m.router.params()[0].1.shallow_clone();
        let _ = w.fill_(0.0);
        let _ = w.get(0).get(0).fill_(1.0);
    });
    let x = randn64(&[8, D], 21).abs() + 0.1;
    let ro = m.router.route(&x, &mut Context::eval()).unwrap();
    assert_eq!(to_vec_i64(&ro.experts), vec![0; 8]);
    check_against_dense(&m, 8, false, 21);
}

#[test]
fn capacity_path_equals_dense_values_and_gradients() {
    for policy in [DropPolicy::Position, DropPolicy::Priority] {
        let mut rc = RouterConfig::new(4, 2);
        rc.capacity_factor = 0.5;
        rc.min_capacity = 0;
        rc.drop_policy = policy;
        let m = layer(rc, ExpertActivation::Gelu, true, 3);
        check_against_dense(&m, 16, true, 4);
        // The padding really dropped something here.
        let x = randn64(&[16, D], 4);
        let ro = m.router.route(&x, &mut Context::train()).unwrap();
        assert!(to_vec(&ro.kept.to_kind(Kind::Double)).contains(&0.0));
    }
}

#[test]
fn expert_choice_equals_dense() {
    let mut rc = RouterConfig::new(3, 1);
    rc.routing = RoutingMode::ExpertChoice;
    rc.expert_choice_capacity = 1.5;
    check_against_dense(&layer(rc, ExpertActivation::Relu, true, 5), 10, false, 6);
}

/// `y_t = Σ_j g_tj f_{e_tj}(x_t)` one token and one expert at a time.
fn per_token_loop(m: &MoeLayer, x: &Tensor, experts: &[i64], gates: &Tensor, k: usize) -> Tensor {
    let w = m.expert_weights().unwrap();
    let t = x.size()[0];
    let mut rows = Vec::new();
    for i in 0..t {
        let xi = x.get(i).unsqueeze(0);
        let mut acc = xi.zeros_like();
        for j in 0..k {
            let e = experts[i as usize * k + j];
            let mut h = xi.matmul(&w.w1.get(e).tr());
            if let Some(b) = &w.b1 {
                h += b.get(e);
            }
            let mut y = h.gelu("none").matmul(&w.w2.get(e).tr());
            if let Some(b) = &w.b2 {
                y += b.get(e);
            }
            acc += y * gates.get(i).get(j as i64);
        }
        rows.push(acc);
    }
    Tensor::cat(&rows, 0)
}

#[test]
fn dispatch_equals_a_per_token_loop_in_values_and_gradients() {
    let m = layer(
        RouterConfig::new(5, 3).dropless(),
        ExpertActivation::Gelu,
        true,
        7,
    );
    let x = leaf(randn64(&[9, D], 8));
    let r = randn64(&[9, D], 9);
    let (y, ro) = m.forward_with_routing(&x, &mut Context::eval()).unwrap();
    let looped = per_token_loop(&m, &x, &to_vec_i64(&ro.experts), &ro.gates, 3);
    let tol = atomics_tol(1e-10);
    assert_close(&y, &looped, tol, tol);
    let mut inputs = trainable(&m);
    inputs.push(x.shallow_clone());
    for (a, b) in grads(&y, &r, &inputs)
        .iter()
        .zip(&grads(&looped, &r, &inputs))
    {
        assert_close(a, b, tol, tol);
    }
}

#[test]
fn dense_reduction_with_all_experts_and_hard_weights() {
    // k = E, hard weights, no drops: y = Σ_e f_e(x).
    let mut rc = RouterConfig::new(3, 3).dropless();
    rc.weight_mode = WeightMode::Hard;
    let m = layer(rc, ExpertActivation::Gelu, false, 10);
    let x = randn64(&[7, D], 11);
    let y = m.forward(&x, &mut Context::eval()).unwrap();
    let w = m.expert_weights().unwrap();
    let mut expect = x.zeros_like();
    for e in 0..3 {
        expect += x
            .matmul(&w.w1.get(e).tr())
            .gelu("none")
            .matmul(&w.w2.get(e).tr());
    }
    let tol = atomics_tol(1e-10);
    assert_close(&y, &expect, tol, tol);
}

#[test]
fn f32_sparse_matches_dense_within_spec_tolerance() {
    let mut c = MoeConfig::new(D, FF, RouterConfig::new(4, 2));
    c.activation = ExpertActivation::SwiGlu;
    let m = seeded(12, || MoeLayer::new(c, Device::Cpu).unwrap());
    let x = randn64(&[3, 4, D], 13).to_kind(Kind::Float);
    let (y, ro) = m.forward_with_routing(&x, &mut Context::eval()).unwrap();
    assert_eq!(y.size(), [3, 4, D]);
    let dense = m.compute(&x.reshape([12, D]), &ro, MoePath::Dense).unwrap();
    let (atol, rtol) = tolerances(DType::F32, dev());
    assert_close(&y.reshape([12, D]), &dense, atol, rtol);
}

#[test]
fn replaces_a_feedforward_slot_and_reports_losses_and_stats() {
    let mut model = seeded(14, || {
        Sequential::new().push_named(
            "h",
            Box::new(
                Sequential::new().push_named(
                    "mlp",
                    Box::new(
                        Sequential::new().push_named(
                            "(ffn)",
                            Box::new(
                                FeedForward::new(
                                    D,
                                    16,
                                    Activation::GeluTanh,
                                    FfnNames::gpt2(),
                                    Device::Cpu,
                                )
                                .unwrap(),
                            ),
                        ),
                    ),
                ),
            ),
        )
    });
    let moe = seeded(15, || {
        MoeLayer::new(MoeConfig::new(D, FF, RouterConfig::new(4, 2)), Device::Cpu).unwrap()
    });
    let old = model.replace("h.mlp.(ffn)", Box::new(moe)).unwrap();
    assert_eq!(old.kind(), "FeedForward");
    let names: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "h.mlp.router.weight",
            "h.mlp.experts.w1",
            "h.mlp.experts.w2"
        ]
    );
    let x = randn64(&[2, 5, D], 16).to_kind(Kind::Float);
    let mut ctx = Context::train();
    let y = model.forward(&x, &mut ctx).unwrap();
    assert_eq!(y.size(), [2, 5, D]);
    let losses: Vec<&str> = ctx.aux_losses().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(losses, ["h.mlp.(ffn).balance_loss", "h.mlp.(ffn).z_loss"]);
    let stats: Vec<&str> = ctx.stats().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(stats[0], "h.mlp.(ffn).expert_load");
    let load = to_vec(&ctx.stats()[0].1);
    assert!(load.iter().sum::<f64>() <= 20.0);
    // The total loss reaches router and experts.
    let loss = y.square().mean(Kind::Float) + ctx.aux_loss_total(dev()).unwrap();
    loss.backward();
    for (n, p) in model.named_parameters() {
        assert!(
            p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{n}"
        );
    }
    // Wrong width: an error naming the layer, not a panic.
    let err = model
        .forward(
            &randn64(&[2, D + 1], 1).to_kind(Kind::Float),
            &mut Context::eval(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("MoeLayer"), "{err}");
    // The config round-trips through JSON.
    let c = MoeConfig::moduleformer(8, 16, 4, 2);
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<MoeConfig>(&json).unwrap(), c);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// For random T, E, k and capacity factor: every token has at most k
    /// distinct kept experts, no expert exceeds C, and sparse = dense.
    #[test]
    fn invariants_over_shapes(t in 1i64..14, e in 1usize..6, k_frac in 0.0f64..1.0, cf_i in 0usize..4, seed in 0u64..1000) {
        let k = 1 + ((k_frac * e as f64) as usize).min(e - 1);
        let mut rc = RouterConfig::new(e, k);
        rc.capacity_factor = [0.0, 0.5, 1.0, 2.0][cf_i];
        rc.min_capacity = 1;
        let m = layer(rc, ExpertActivation::Gelu, true, seed);
        let x = randn64(&[t, D], seed + 1);
        let mut ctx = Context::eval();
        let ro = m.router.route(&x, &mut ctx).unwrap();
        prop_assert_eq!(ro.experts.size(), vec![t, k as i64]);
        let ex = to_vec_i64(&ro.experts);
        let kept = to_vec(&ro.kept.to_kind(Kind::Double));
        for row in ex.chunks(k) {
            let mut s = row.to_vec();
            s.sort();
            s.dedup();
            prop_assert_eq!(s.len(), k);
        }
        if let Some(c) = ro.capacity {
            let load = to_vec(&ro.load().unwrap());
            prop_assert!(load.iter().all(|&l| l <= c as f64));
            prop_assert!(kept.iter().sum::<f64>() <= (c * e as i64) as f64);
        }
        let sparse = m.compute(&x, &ro, MoePath::Sparse).unwrap();
        let dense = m.compute(&x, &ro, MoePath::Dense).unwrap();
        let tol = atomics_tol(1e-10);
        let c = tensor_core::testing::closeness(&sparse, &dense, tol, tol).unwrap();
        prop_assert!(c.ok, "{:?}", c);
    }
}

#[test]
fn expert_chunks_equal_one_buffer_and_dense() {
    // chunk_bytes = 1: every expert is its own chunk; 3 rows of f64: chunks
    // of several experts; 0: one buffer. Capacity and dropless, values and gradients.
    for cf in [0.0, 1.25] {
        for chunk in [1i64, 3 * D * 8, 0] {
            let mut rc = RouterConfig::new(5, 2).dropless();
            rc.capacity_factor = cf;
            let mut c = MoeConfig::new(D, FF, rc);
            c.bias = true;
            c.chunk_bytes = chunk;
            let m = seeded_f64(40, || MoeLayer::new(c, Device::Cpu).unwrap());
            check_against_dense(&m, 17, false, 41);
            check_against_dense(&m, 1, false, 42);
        }
    }
}
