//! moe-router (issue 5): the MoE FFN and stick-breaking attention, forward +
//! backward, against PyTorch (`reference/moe_router.py`).
//!
//! - `moe_e16k2`, `moe_e64k8`: our [`MoeLayer`] (linear router, softmax
//!   top-k renormalised, balance + z losses, dropless) with
//!   d = 384, 8192 tokens, and a d_ff = 1536 FFN's width split over the
//!   experts (expert width 1536 / E: 96 for E = 16, 24 for E = 64); the
//!   PyTorch reference is the per-expert Python loop (Mixtral/fairseq style:
//!   `where(top_i == e)`, one matmul pair per expert, `index_add_`).
//!   Dropless, padded to the largest expert group (one host sync).
//! - `moe_e16k2_grouped`, `moe_e64k8_grouped`: the same with
//!   `DroplessKernel::Grouped` (`tensor_core::grouped`, one matmul per expert), no PyTorch pair.
//! - `moe_e16k2_cf1`, `moe_e64k8_cf1`: the same layer with capacity factor 1
//!   (the no-host-sync padded path; tokens over capacity are dropped), no
//!   PyTorch pair.
//! - `dense_equiv_e16k2`, `dense_equiv_e64k8`: a dense GELU FFN with the same
//!   active FLOPs, d_ff_dense = k · 1536 / E = 192 in both cases, ours and PyTorch's.
//! - `sb_t512`, `sb_t1024`: stick-breaking attention (SB variant, remainder
//!   added to the current value), batch 1, 4 heads of 64; ours is the `O(T²)`
//!   log-space form, PyTorch's the `O(T³)` triangular-matmul form of
//!   `shawntan/stickbreaking-attention/sb_ref.py`.
//!
//! Every case times forward + backward (gradients w.r.t. the input and all
//! parameters, `autograd.grad`-style, nothing accumulated).

use criterion::criterion_main;
use moe_router::{
    DroplessKernel, MoeConfig, MoeLayer, RouterConfig, SbVariant, stick_breaking_attention,
};
use tensor_core::prelude::*;
use tensor_core::testing::{randn_seeded, with_seed};

const TOKENS: i64 = 8192;
const D: i64 = 384;
const FF: i64 = 1536;

fn leaf(shape: &[i64], seed: u64, scale: f64) -> Tensor {
    (randn_seeded(shape, seed, Device::Cpu).unwrap() * scale).set_requires_grad(true)
}

fn moe_case(e: usize, k: usize, cf: f64, kernel: DroplessKernel) -> (MoeLayer, Tensor, Tensor) {
    let mut rc = RouterConfig::new(e, k).dropless();
    rc.capacity_factor = cf;
    let mut config = MoeConfig::new(D, FF / e as i64, rc);
    config.dropless_kernel = kernel;
    let moe = with_seed(1, || MoeLayer::new(config, Device::Cpu)).unwrap();
    let x = leaf(&[TOKENS, D], 2, 1.0);
    let r = randn_seeded(&[TOKENS, D], 3, Device::Cpu).unwrap();
    (moe, x, r)
}

fn moe_step(moe: &MoeLayer, x: &Tensor, r: &Tensor) -> Vec<Tensor> {
    let mut ctx = Context::train();
    let y = moe.forward(x, &mut ctx).unwrap();
    let loss = (y * r).sum(Kind::Float) + ctx.aux_loss_total(Device::Cpu).unwrap();
    let mut inputs: Vec<Tensor> = moe
        .trainable_parameters()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    inputs.push(x.shallow_clone());
    Tensor::run_backward(&[loss], &inputs, false, false)
}

fn benches() {
    let mut c = modular_benches::criterion();
    let mut g = c.benchmark_group("moe_router");

    for (e, k) in [(16usize, 2usize), (64, 8)] {
        let (moe, x, r) = moe_case(e, k, 0.0, DroplessKernel::Padded);
        g.bench_function(format!("moe_e{e}k{k}/rust"), |b| {
            b.iter(|| moe_step(&moe, &x, &r))
        });
        let (moe, x, r) = moe_case(e, k, 0.0, DroplessKernel::Grouped);
        g.bench_function(format!("moe_e{e}k{k}_grouped/rust"), |b| {
            b.iter(|| moe_step(&moe, &x, &r))
        });
        let (moe, x, r) = moe_case(e, k, 1.0, DroplessKernel::Padded);
        g.bench_function(format!("moe_e{e}k{k}_cf1/rust"), |b| {
            b.iter(|| moe_step(&moe, &x, &r))
        });

        let f = k as i64 * FF / e as i64;
        let w1 = leaf(&[f, D], 4, 0.05);
        let w2 = leaf(&[D, f], 5, 0.05);
        g.bench_function(format!("dense_equiv_e{e}k{k}/rust"), |b| {
            b.iter(|| {
                let y = x
                    .linear::<Tensor>(&w1, None)
                    .gelu("none")
                    .linear::<Tensor>(&w2, None);
                let loss = (y * &r).sum(Kind::Float);
                Tensor::run_backward(&[loss], &[&w1, &w2, &x], false, false)
            })
        });
    }

    for t in [512i64, 1024] {
        let q = leaf(&[1, 4, t, 64], 6, 1.0);
        let k = leaf(&[1, 4, t, 64], 7, 1.0);
        let v = leaf(&[1, 4, t, 64], 8, 1.0);
        let r = randn_seeded(&[1, 4, t, 64], 9, Device::Cpu).unwrap();
        g.bench_function(format!("sb_t{t}/rust"), |b| {
            b.iter(|| {
                let o = stick_breaking_attention(&q, &k, &v, SbVariant::Sb, true, None).unwrap();
                let loss = (o.out * &r).sum(Kind::Float);
                Tensor::run_backward(&[loss], &[&q, &k, &v], false, false)
            })
        });
    }
    g.finish();
    c.final_summary();
}

criterion_main!(benches);
