//! The dropless MoE FFN through the device grouped GEMM
//! (`DroplessKernel::GroupedDevice`, `torch._grouped_mm`; libtorch's
//! fallback on the CPU and for f32 on CUDA): values and gradients (input,
//! router, experts) equal the dense masked reference path and the padded
//! kernel (f32, 1e-5 / 1e-4 on the CPU, 10x on CUDA; `_grouped_mm` takes no
//! f64), padding tokens stay out, frozen experts work, `Auto` picks the
//! padded kernel on the CPU, and shapes the grouped GEMM cannot take are
//! errors, not panics.

mod common;

use common::{dev, grads, leaf, seeded, to_vec, to_vec_i64, trainable};
use moe_router::capacity::expert_counts;
use moe_router::config::{RouterConfig, WeightMode};
use moe_router::extend::{grow_experts, unmask_experts};
use moe_router::moe::{DroplessKernel, ExpertActivation, MoeConfig, MoeLayer, MoePath};
use proptest::prelude::*;
use tensor_core::DType;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, closeness, randn_seeded, tolerances, with_seed};
use tensor_core::{Context, Module, ModuleExt};

/// f32 widths in multiples of 4 (16-byte rows).
const D: i64 = 8;
const FF: i64 = 12;

/// `(atol, rtol)` for f32 kernels compared with each other on the test device.
fn tol() -> (f64, f64) {
    tolerances(DType::F32, dev())
}

/// `N(0, 1)` f32 values (seeded) on the test device.
fn randn32(shape: &[i64], seed: u64) -> Tensor {
    randn_seeded(shape, seed, dev()).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn layer(
    e: usize,
    k: usize,
    d: i64,
    ff: i64,
    act: ExpertActivation,
    bias: bool,
    mode: WeightMode,
    kernel: DroplessKernel,
    seed: u64,
) -> MoeLayer {
    let mut rc = RouterConfig::new(e, k).dropless();
    rc.weight_mode = mode;
    let mut c = MoeConfig::new(d, ff, rc);
    c.activation = act;
    c.bias = bias;
    c.dropless_kernel = kernel;
    seeded(seed, || MoeLayer::new(c, Device::Cpu).unwrap())
}

/// Values and gradients of `m`'s sparse path (its dropless kernel) vs
/// `reference`'s path on the same routing; `Err` with the first mismatch.
fn compare(m: &MoeLayer, x0: &Tensor, seed: u64, reference: MoePath) -> Result<(), String> {
    let x = leaf(x0.shallow_clone());
    let r = randn32(&x.size(), seed + 1);
    let routing = m.router.route(&x, &mut Context::eval()).unwrap();
    let ours = m.compute(&x, &routing, MoePath::Sparse).unwrap();
    let expected = m.compute(&x, &routing, reference).unwrap();
    let (atol, rtol) = tol();
    let c = closeness(&ours, &expected, atol, rtol).unwrap();
    if !c.ok {
        return Err(format!("values: {c:?}"));
    }
    let mut inputs = trainable(m);
    inputs.push(x.shallow_clone());
    for (i, (a, b)) in grads(&ours, &r, &inputs)
        .iter()
        .zip(&grads(&expected, &r, &inputs))
        .enumerate()
    {
        let c = closeness(a, b, atol, rtol).unwrap();
        if !c.ok {
            return Err(format!("gradient {i}: {c:?}"));
        }
    }
    Ok(())
}

#[test]
fn grouped_device_equals_dense_values_and_gradients() {
    for (act, bias) in [
        (ExpertActivation::Gelu, true),
        (ExpertActivation::SwiGlu, false),
        (ExpertActivation::SwiGlu, true),
        (ExpertActivation::GeluTanh, false),
        (ExpertActivation::Relu, true),
    ] {
        for mode in [WeightMode::Renorm, WeightMode::Raw, WeightMode::Hard] {
            let m = layer(
                4,
                2,
                D,
                FF,
                act,
                bias,
                mode,
                DroplessKernel::GroupedDevice,
                1,
            );
            let x = randn32(&[11, D], 2);
            compare(&m, &x, 3, MoePath::Dense).unwrap_or_else(|e| panic!("{act:?} {mode:?}: {e}"));
            // The router receives gradient through the gates (unless hard).
            let xl = leaf(x);
            let (y, _) = m.forward_with_routing(&xl, &mut Context::eval()).unwrap();
            let g = grads(&y, &randn32(&[11, D], 4), &trainable(&m));
            let router_grad = g[0].abs().sum(Kind::Double).double_value(&[]);
            assert_eq!(
                router_grad > 0.0,
                mode != WeightMode::Hard,
                "{act:?} {mode:?}"
            );
            // Every expert weight receives gradient.
            for t in &g[1..] {
                assert!(t.abs().sum(Kind::Double).double_value(&[]) > 0.0);
            }
        }
    }
}

#[test]
fn grouped_device_through_the_module_trains_router_and_experts() {
    let m = layer(
        6,
        2,
        D,
        FF,
        ExpertActivation::Gelu,
        true,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        5,
    );
    let x = randn32(&[3, 7, D], 6);
    // The padded kernel on the same weights and routing (evaluation: no noise).
    let mut p = layer(
        6,
        2,
        D,
        FF,
        ExpertActivation::Gelu,
        true,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        5,
    );
    let y_eval = p.forward(&x, &mut Context::eval()).unwrap();
    p.config.dropless_kernel = DroplessKernel::Padded;
    let (atol, rtol) = tol();
    assert_close(
        &y_eval,
        &p.forward(&x, &mut Context::eval()).unwrap(),
        atol,
        rtol,
    );
    let mut ctx = Context::train();
    let y = m.forward(&x, &mut ctx).unwrap();
    assert_eq!(y.size(), [3, 7, D]);
    let loss = y.square().mean(Kind::Float) + ctx.aux_loss_total(dev()).unwrap();
    loss.backward();
    for (n, p) in m.named_parameters() {
        assert!(
            p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{n}"
        );
    }
}

#[test]
fn padding_tokens_are_not_dispatched_whatever_their_features() {
    let am = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 1, 1, 1, 1, 0])
        .view([2, 5])
        .to_device(dev());
    let (atol, rtol) = tol();
    let pad = am.view([-1]).eq(0).nonzero().view([-1]);
    let real = am.view([-1]).ne(0).nonzero().view([-1]);
    let m = layer(
        4,
        2,
        D,
        FF,
        ExpertActivation::SwiGlu,
        true,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        7,
    );
    let x0 = randn32(&[10, D], 8);
    let run = |x: &Tensor| {
        let x = leaf(x.view([2, 5, D]));
        let mut ctx = Context::eval();
        ctx.attention_mask = Some(am.shallow_clone());
        let y = m.forward(&x, &mut ctx).unwrap().view([10, D]);
        let g = grads(&y, &randn32(&[10, D], 9), &[x.shallow_clone()]);
        (y, g[0].view([10, D]))
    };
    let (y, gx) = run(&x0);
    assert_eq!(
        y.index_select(0, &pad)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]),
        0.0
    );
    assert_eq!(
        gx.index_select(0, &pad)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]),
        0.0
    );
    // The real tokens alone give the same outputs.
    let yr = m
        .forward(&x0.index_select(0, &real), &mut Context::eval())
        .unwrap();
    assert_close(&y.index_select(0, &real), &yr, atol, rtol);
    // Padding features of any (finite) size change nothing: the sorted rows
    // of padding assignments read a zero row and land in a row that is cut off.
    let noise = randn32(&[10, D], 10) * am.view([-1, 1]).eq(0).to_kind(Kind::Float) * 1e3;
    let (y2, gx2) = run(&(&x0 + noise));
    assert_eq!(
        y2.index_select(0, &pad)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]),
        0.0
    );
    assert_close(
        &y2.index_select(0, &real),
        &y.index_select(0, &real),
        atol,
        rtol,
    );
    assert_close(&gx2, &gx, atol, rtol);
}

#[test]
fn frozen_experts_after_growing_work_with_the_grouped_gemm() {
    let mut m = layer(
        4,
        2,
        D,
        FF,
        ExpertActivation::Gelu,
        true,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        10,
    );
    let x = randn32(&[12, D], 11);
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    with_seed(12, || grow_experts(&mut m, 2, true, true)).unwrap();
    let after = m.forward(&x, &mut Context::eval()).unwrap();
    let (atol, rtol) = tol();
    assert_close(&after, &before, atol, rtol);
    unmask_experts(&mut m);
    compare(&m, &(&x * 3.0), 13, MoePath::Dense).unwrap();
    let (y, _) = m
        .forward_with_routing(&(&x * 3.0), &mut Context::train())
        .unwrap();
    y.square().sum(Kind::Float).backward();
    assert!(!m.frozen.as_ref().unwrap().w1.grad().defined());
}

#[test]
fn bf16_grouped_device_matches_dense_within_bf16_tolerance() {
    let mut m = layer(
        8,
        2,
        16,
        32,
        ExpertActivation::Gelu,
        true,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        14,
    );
    m.to_kind(Kind::BFloat16).unwrap();
    let x = randn32(&[64, 16], 15).to_kind(Kind::BFloat16);
    let routing = m.router.route(&x, &mut Context::eval()).unwrap();
    let ours = m.compute(&x, &routing, MoePath::Sparse).unwrap();
    let dense = m.compute(&x, &routing, MoePath::Dense).unwrap();
    let rel = (&ours - &dense)
        .to_kind(Kind::Double)
        .norm()
        .double_value(&[])
        / dense.to_kind(Kind::Double).norm().double_value(&[]);
    assert!(rel < 1e-2, "{rel}");
}

#[test]
fn auto_picks_the_padded_kernel_on_the_cpu_and_the_config_round_trips() {
    let c = MoeConfig::new(D, FF, RouterConfig::new(4, 2).dropless());
    assert_eq!(c.dropless_kernel, DroplessKernel::Auto);
    // The CPU is the point: Auto's choice there.
    let m = with_seed(16, || MoeLayer::new(c, Device::Cpu).unwrap());
    for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
        let x = Tensor::zeros([2, D], (kind, Device::Cpu));
        assert_eq!(m.dropless_kernel_for(&x), DroplessKernel::Padded);
    }
    let mut c = MoeConfig::new(D, FF, RouterConfig::new(4, 2).dropless());
    c.dropless_kernel = DroplessKernel::GroupedDevice;
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains("\"grouped_device\""), "{json}");
    assert_eq!(serde_json::from_str::<MoeConfig>(&json).unwrap(), c);
    // Old configs without the field get the automatic choice.
    let old: MoeConfig = serde_json::from_str(r#"{"d_model": 8, "d_ff": 12}"#).unwrap();
    assert_eq!(old.dropless_kernel, DroplessKernel::Auto);
}

#[test]
fn shapes_the_grouped_gemm_cannot_take_are_errors() {
    // d_ff = 6: f32 rows of 24 bytes.
    let m = layer(
        4,
        2,
        D,
        6,
        ExpertActivation::Gelu,
        false,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        17,
    );
    let x = randn32(&[5, D], 18);
    let msg = m.forward(&x, &mut Context::eval()).unwrap_err().to_string();
    assert!(
        msg.contains("d_ff (6)") && msg.contains("multiples of 4"),
        "{msg}"
    );
    assert!(m.grouped_device_fits(Kind::Float).is_err());
    // In bf16 the same layer needs multiples of 8: d_model = 12 fails there, not in f32.
    let m = layer(
        4,
        2,
        12,
        16,
        ExpertActivation::Gelu,
        false,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        17,
    );
    assert!(m.grouped_device_fits(Kind::Float).is_ok());
    let msg = m
        .grouped_device_fits(Kind::BFloat16)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("d_model (12)") && msg.contains("multiples of 8"),
        "{msg}"
    );
    // f64: `_grouped_mm` has no f64 kernel.
    let mut m = layer(
        4,
        2,
        D,
        FF,
        ExpertActivation::Gelu,
        false,
        WeightMode::Renorm,
        DroplessKernel::GroupedDevice,
        17,
    );
    m.to_kind(Kind::Double).unwrap();
    let msg = m
        .forward(&x.to_kind(Kind::Double), &mut Context::eval())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("f32, bf16 or f16"), "{msg}");
    // Auto with unaligned widths is not affected (it never picks the grouped GEMM then).
    let mut m = layer(
        4,
        2,
        D,
        6,
        ExpertActivation::Gelu,
        false,
        WeightMode::Renorm,
        DroplessKernel::Auto,
        17,
    );
    assert!(m.forward(&x, &mut Context::eval()).is_ok());
    m.config.dropless_kernel = DroplessKernel::Padded;
    assert!(m.forward(&x, &mut Context::eval()).is_ok());
}

#[test]
fn device_counts_equal_bincount() {
    let host = Tensor::from_slice(&[3i64, 0, 1, 3, 3, 0, 4, 1]).view([4, 2]);
    let idx = host.to_device(dev());
    let c = expert_counts("test", &idx, None, 6, Kind::Int64).unwrap();
    assert_eq!(to_vec_i64(&c), [2, 2, 0, 3, 1, 0]);
    let w = Tensor::from_slice(&[1.0f64, 0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.0])
        .view([4, 2])
        .to_device(dev());
    let c = expert_counts("test", &idx, Some(&w), 6, Kind::Double).unwrap();
    let b = idx.view([-1]).bincount(Some(w.view([-1])), 6);
    assert_eq!(to_vec(&c), to_vec(&b));
    // Out of range on the CPU: an error, not a panic (on CUDA it would be a
    // device-side assert that breaks the process's CUDA context).
    assert!(expert_counts("test", &host, None, 4, Kind::Int64).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// For random T, E, k, widths, activation, biases and weight mode: every
    /// token has k distinct experts, nothing is dropped (loads sum to T k),
    /// and the grouped GEMM equals the dense masked path and the padded
    /// kernel in values and gradients (x, router, experts).
    #[test]
    fn grouped_device_invariants_over_shapes(
        t in 1i64..20,
        e in 1usize..9,
        k_frac in 0.0f64..1.0,
        d4 in 1i64..4,
        f4 in 1i64..4,
        act in 0usize..4,
        bias in any::<bool>(),
        mode in 0usize..3,
        seed in 0u64..1000,
    ) {
        let k = 1 + ((k_frac * e as f64) as usize).min(e - 1);
        let act = [
            ExpertActivation::Gelu,
            ExpertActivation::GeluTanh,
            ExpertActivation::Relu,
            ExpertActivation::SwiGlu,
        ][act];
        let mode = [WeightMode::Renorm, WeightMode::Raw, WeightMode::Hard][mode];
        let (d, ff) = (4 * d4, 4 * f4);
        let mut m = layer(e, k, d, ff, act, bias, mode, DroplessKernel::GroupedDevice, seed);
        let x = randn32(&[t, d], seed + 1);
        let ro = m.router.route(&x, &mut Context::eval()).unwrap();
        prop_assert_eq!(ro.experts.size(), vec![t, k as i64]);
        for row in to_vec_i64(&ro.experts).chunks(k) {
            let mut s = row.to_vec();
            s.sort();
            s.dedup();
            prop_assert_eq!(s.len(), k);
        }
        let load: f64 = to_vec(&ro.load().unwrap()).iter().sum();
        prop_assert_eq!(load, (t * k as i64) as f64);
        if let Err(msg) = compare(&m, &x, seed + 2, MoePath::Dense) {
            prop_assert!(false, "vs dense: {}", msg);
        }
        // The padded kernel (another layer with the same weights).
        let yd = m.compute(&x, &ro, MoePath::Sparse).unwrap();
        m.config.dropless_kernel = DroplessKernel::Padded;
        let yp = m.compute(&x, &ro, MoePath::Sparse).unwrap();
        let (atol, rtol) = tol();
        let c = closeness(&yd, &yp, atol, rtol).unwrap();
        prop_assert!(c.ok, "vs padded: {:?}", c);
    }
}
