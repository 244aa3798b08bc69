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
//! - `moe_e16k2_grouped_device`, `moe_e64k8_grouped_device`: the same with
//!   `DroplessKernel::GroupedDevice` (`torch._grouped_mm` with the group
//!   offsets on the device; on the CPU libtorch's fallback), no PyTorch pair.
//! - `moe_e16k2_cf1`, `moe_e64k8_cf1`: the same layer with capacity factor 1
//!   (the no-host-sync padded path; tokens over capacity are dropped), no
//!   PyTorch pair.
//! - `moe_e16k2_onechunk`, `moe_e64k8_onechunk`: the default dropless
//!   layer with `chunk_bytes = 0` (all experts in one padded buffer, the
//!   kernel before chunking), no PyTorch pair.
//! - `moe_e16k2_router_only`, `moe_e64k8_router_only`: the layer's router
//!   alone (logits, softmax, top-k, balance + z losses, statistics), forward
//!   + backward, no PyTorch pair: its share of the layer's time.
//! - `moe_e16k2_experts_only`, `moe_e64k8_experts_only`: the expert FFNs
//!   alone on rows already gathered in expert order (exact group sizes, no
//!   padding, no gather, no scatter, no gates: `grouped_linear_device`, i.e.
//!   one `mm` per expert on the CPU), forward + backward w.r.t. the rows and
//!   both weights, no PyTorch pair. With `router_only` it bounds what any
//!   dispatch built from libtorch's unfused ops can reach; the rest of the
//!   layer's time is dispatch (gathers, scatter-adds, their gradients, padding).
//! - `dense_equiv_e16k2`, `dense_equiv_e64k8`: a dense GELU FFN with the same
//!   active FLOPs, d_ff_dense = k · 1536 / E = 192 in both cases, ours and PyTorch's.
//! - `sb_t512`, `sb_t1024`: stick-breaking attention (SB variant, remainder
//!   added to the current value), batch 1, 4 heads of 64; ours is the `O(T²)`
//!   log-space form, PyTorch's the `O(T³)` triangular-matmul form of
//!   `shawntan/stickbreaking-attention/sb_ref.py`.
//!
//! Every case times forward + backward (gradients w.r.t. the input and all
//! parameters, `autograd.grad`-style, nothing accumulated).
//!
//! After the timings, each MoE/dense case runs once more in a fresh process
//! (`MOE_ROUTER_PEAK=CASE`) that prints its peak memory: the growth of the
//! resident set (`VmHWM` after one cold forward + backward minus `VmRSS`
//! before it, Linux) as `# moe_router/CASE/rust peak +X MiB`. The reference
//! script prints the same for PyTorch (and `torch.cuda.max_memory_allocated`
//! on CUDA).

use moe_router::{
    DroplessKernel, MoeConfig, MoeLayer, RouterConfig, SbVariant, add_aux_losses_masked,
    stick_breaking_attention,
};
use tensor_core::grouped::{Dispatch, grouped_linear_device};
use tensor_core::prelude::*;
use tensor_core::testing::{randn_seeded, with_seed};

const TOKENS: i64 = 8192;
const D: i64 = 384;
const FF: i64 = 1536;

fn leaf(shape: &[i64], seed: u64, scale: f64) -> Tensor {
    (randn_seeded(shape, seed, Device::Cpu).unwrap() * scale).set_requires_grad(true)
}

fn moe_case(
    e: usize,
    k: usize,
    cf: f64,
    kernel: DroplessKernel,
    chunk_bytes: i64,
) -> (MoeLayer, Tensor, Tensor) {
    let mut rc = RouterConfig::new(e, k).dropless();
    rc.capacity_factor = cf;
    let mut config = MoeConfig::new(D, FF / e as i64, rc);
    config.dropless_kernel = kernel;
    config.chunk_bytes = chunk_bytes;
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

/// The router alone: route, losses, forward + backward w.r.t. its weights and `x`.
fn router_step(moe: &MoeLayer, x: &Tensor, rg: &Tensor) -> Vec<Tensor> {
    let mut ctx = Context::train();
    let routing = moe.router.route_masked(x, None, &mut ctx).unwrap();
    add_aux_losses_masked(&moe.router.config, &routing, None, &mut ctx).unwrap();
    let loss = (&routing.gates * rg).sum(Kind::Float) + ctx.aux_loss_total(Device::Cpu).unwrap();
    let mut inputs: Vec<Tensor> = moe
        .router
        .params()
        .into_iter()
        .map(|(_, t)| t.shallow_clone())
        .collect();
    inputs.push(x.shallow_clone());
    Tensor::run_backward(&[loss], &inputs, false, false)
}

/// The experts alone on `x`'s rows in expert order (this routing's exact
/// groups): `(rows leaf [T k, d], dispatch, loss weights [T k, d])`.
fn experts_case(moe: &MoeLayer, x: &Tensor) -> (Tensor, Dispatch, Tensor) {
    let (disp, xs) = tch::no_grad(|| {
        let routing = moe
            .router
            .route_masked(x, None, &mut Context::eval())
            .unwrap();
        let disp = Dispatch::new(&routing.experts, moe.num_experts()).unwrap();
        let xs = disp.permute(x).unwrap();
        (disp, xs)
    });
    let r = randn_seeded(&xs.size(), 10, Device::Cpu).unwrap();
    (xs.detach().set_requires_grad(true), disp, r)
}

fn experts_step(moe: &MoeLayer, xs: &Tensor, disp: &Dispatch, r: &Tensor) -> Vec<Tensor> {
    let w = &moe.experts;
    let h = grouped_linear_device(xs, disp, &w.w1, None)
        .unwrap()
        .gelu("none");
    let y = grouped_linear_device(&h, disp, &w.w2, None).unwrap();
    Tensor::run_backward(
        &[(y * r).sum(Kind::Float)],
        &[xs, &w.w1, &w.w2],
        false,
        false,
    )
}

fn dense_case(e: usize, k: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let f = k as i64 * FF / e as i64;
    let w1 = leaf(&[f, D], 4, 0.05);
    let w2 = leaf(&[D, f], 5, 0.05);
    let x = leaf(&[TOKENS, D], 2, 1.0);
    let r = randn_seeded(&[TOKENS, D], 3, Device::Cpu).unwrap();
    (w1, w2, x, r)
}

fn dense_step(w1: &Tensor, w2: &Tensor, x: &Tensor, r: &Tensor) -> Vec<Tensor> {
    let y = x
        .linear::<Tensor>(w1, None)
        .gelu("none")
        .linear::<Tensor>(w2, None);
    let loss = (y * r).sum(Kind::Float);
    Tensor::run_backward(&[loss], &[w1, w2, x], false, false)
}

/// The MoE cases: `(name, E, k, capacity factor, kernel, chunk bytes)`.
fn moe_cases() -> Vec<(String, usize, usize, f64, DroplessKernel, i64)> {
    let mut v = Vec::new();
    for (e, k) in [(16usize, 2usize), (64, 8)] {
        let chunk = moe_router::moe::DEFAULT_CHUNK_BYTES;
        v.push((
            format!("moe_e{e}k{k}"),
            e,
            k,
            0.0,
            DroplessKernel::Padded,
            chunk,
        ));
        v.push((
            format!("moe_e{e}k{k}_onechunk"),
            e,
            k,
            0.0,
            DroplessKernel::Padded,
            0,
        ));
        v.push((
            format!("moe_e{e}k{k}_grouped"),
            e,
            k,
            0.0,
            DroplessKernel::Grouped,
            chunk,
        ));
        v.push((
            format!("moe_e{e}k{k}_grouped_device"),
            e,
            k,
            0.0,
            DroplessKernel::GroupedDevice,
            chunk,
        ));
        v.push((
            format!("moe_e{e}k{k}_cf1"),
            e,
            k,
            1.0,
            DroplessKernel::Padded,
            chunk,
        ));
    }
    v
}

/// `(VmRSS, VmHWM)` in KiB.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One cold forward + backward of `case` in this (fresh) process; prints the peak RSS growth.
fn peak_child(case: &str) {
    let mut step: Option<Box<dyn Fn() -> Vec<Tensor>>> = None;
    for (name, e, k, cf, kernel, chunk) in moe_cases() {
        if name == case {
            let (moe, x, r) = moe_case(e, k, cf, kernel, chunk);
            step = Some(Box::new(move || moe_step(&moe, &x, &r)));
        }
    }
    for (e, k) in [(16usize, 2usize), (64, 8)] {
        if case == format!("dense_equiv_e{e}k{k}") {
            let (w1, w2, x, r) = dense_case(e, k);
            step = Some(Box::new(move || dense_step(&w1, &w2, &x, &r)));
        }
    }
    let Some(step) = step else { return };
    // Reset the peak to the current RSS (Linux >= 4.0), then run once.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (base, _) = rss();
    let grads = step();
    let (_, hwm) = rss();
    drop(grads);
    println!(
        "# moe_router/{case}/rust peak +{:.1} MiB over {:.1} MiB (one cold forward + backward)",
        hwm.saturating_sub(base) as f64 / 1024.0,
        base as f64 / 1024.0
    );
}

fn benches() {
    let mut c = modular_benches::criterion();
    let mut g = c.benchmark_group("moe_router");

    for (name, e, k, cf, kernel, chunk) in moe_cases() {
        let (moe, x, r) = moe_case(e, k, cf, kernel, chunk);
        g.bench_function(format!("{name}/rust"), |b| {
            b.iter(|| moe_step(&moe, &x, &r))
        });
        if name.ends_with("_cf1") {
            // The default (dropless) layer's router and experts, apart.
            let (moe, x, _) = moe_case(e, k, 0.0, DroplessKernel::Padded, 0);
            let rg = randn_seeded(&[TOKENS, k as i64], 11, Device::Cpu).unwrap();
            g.bench_function(format!("moe_e{e}k{k}_router_only/rust"), |b| {
                b.iter(|| router_step(&moe, &x, &rg))
            });
            let (xs, disp, rs) = experts_case(&moe, &x);
            g.bench_function(format!("moe_e{e}k{k}_experts_only/rust"), |b| {
                b.iter(|| experts_step(&moe, &xs, &disp, &rs))
            });
            let (w1, w2, x, r) = dense_case(e, k);
            g.bench_function(format!("dense_equiv_e{e}k{k}/rust"), |b| {
                b.iter(|| dense_step(&w1, &w2, &x, &r))
            });
        }
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
    // Peak memory, one fresh process per case (only when benchmarking, not
    // in `cargo test`'s one-iteration mode or `--list`).
    if !std::env::args().any(|a| a == "--bench") || std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut names: Vec<String> = moe_cases()
        .into_iter()
        .map(|c| c.0)
        .filter(|n| !n.ends_with("_grouped"))
        .collect();
    names.extend([
        "dense_equiv_e16k2".to_owned(),
        "dense_equiv_e64k8".to_owned(),
    ]);
    if let Ok(exe) = std::env::current_exe() {
        for case in names {
            if let Ok(out) = std::process::Command::new(&exe)
                .env("MOE_ROUTER_PEAK", &case)
                .output()
            {
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
}

fn main() {
    match std::env::var("MOE_ROUTER_PEAK") {
        Ok(case) => peak_child(&case),
        Err(_) => benches(),
    }
}
