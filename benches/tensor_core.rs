//! tensor-core's hot paths at MiniLM sizes (batch 32 x 128 tokens, d_model 384,
//! d_ff 1536, 12 heads), against the same computation in PyTorch
//! (`reference/tensor_core.py`).

use criterion::criterion_main;
use tensor_core::grouped::{Dispatch, grouped_linear, grouped_linear_padded};
use tensor_core::prelude::*;
use tensor_core::tch;
use tensor_core::testing::{randint_seeded, randn_seeded, with_seed};

const TOKENS: i64 = 32 * 128;
const D: i64 = 384;
const FF: i64 = 1536;
const E: i64 = 8;
const K: i64 = 2;

struct Moe {
    x: Tensor,
    idx: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

fn moe() -> Moe {
    let dev = Device::Cpu;
    let f = FF / E;
    Moe {
        x: randn_seeded(&[TOKENS, D], 1, dev).unwrap(),
        idx: randint_seeded(E, &[TOKENS, K], 2, dev).unwrap(),
        gates: randn_seeded(&[TOKENS, K], 3, dev)
            .unwrap()
            .softmax(-1, Kind::Float),
        w1: randn_seeded(&[E, f, D], 4, dev).unwrap() * 0.05,
        b1: randn_seeded(&[E, f], 5, dev).unwrap() * 0.05,
        w2: randn_seeded(&[E, D, f], 6, dev).unwrap() * 0.05,
        b2: randn_seeded(&[E, D], 7, dev).unwrap() * 0.05,
    }
}

/// Top-2 of 8 experts: dispatch, grouped up-projection, GELU, grouped
/// down-projection, weighted combine.
fn moe_forward(m: &Moe, capacity: Option<i64>) -> Tensor {
    let d = Dispatch::new(&m.idx, E).unwrap();
    let xs = d.permute(&m.x).unwrap();
    let y = match capacity {
        None => {
            let counts = d.counts_host().unwrap();
            let h = grouped_linear(&xs, &counts, &m.w1, Some(&m.b1))
                .unwrap()
                .gelu("none");
            grouped_linear(&h, &counts, &m.w2, Some(&m.b2)).unwrap()
        }
        Some(c) => {
            let (h, _) = grouped_linear_padded(&xs, &d, &m.w1, Some(&m.b1), c).unwrap();
            let (y, _) = grouped_linear_padded(&h.gelu("none"), &d, &m.w2, Some(&m.b2), c).unwrap();
            y
        }
    };
    d.unpermute(&y, Some(&m.gates)).unwrap()
}

fn benches() {
    let mut c = modular_benches::criterion();
    let _guard = tch::no_grad_guard();
    let m = moe();
    let mut g = c.benchmark_group("tensor_core");
    g.bench_function("moe_top2_of_8/rust", |b| b.iter(|| moe_forward(&m, None)));
    // Capacity factor 1.25 (Switch's default): no host sync, some tokens dropped.
    let cap = (1.25 * (TOKENS * K) as f64 / E as f64).ceil() as i64;
    g.bench_function("moe_top2_of_8_capacity/rust", |b| {
        b.iter(|| moe_forward(&m, Some(cap)))
    });

    let ffn = with_seed(8, || {
        FeedForward::new(D, FF, Activation::Gelu, FfnNames::bert(), Device::Cpu)
    })
    .unwrap();
    let x3 = randn_seeded(&[32, 128, D], 9, Device::Cpu).unwrap();
    g.bench_function("ffn/rust", |b| {
        b.iter(|| ffn.forward(&x3, &mut Context::eval()).unwrap())
    });

    let att = with_seed(10, || {
        Attention::new(
            AttentionConfig::new(D, 12),
            AttentionNames::bert(),
            Device::Cpu,
        )
    })
    .unwrap();
    // A quarter of the batch padded to half length, as in real batches.
    let mask = Tensor::ones([32, 128], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(0, 0, 8).narrow(1, 64, 64).fill_(0);
    g.bench_function("self_attention/rust", |b| {
        b.iter(|| {
            att.forward(&x3, &mut Context::eval().with_mask(mask.shallow_clone()))
                .unwrap()
        })
    });
    g.finish();
    c.final_summary();
}

criterion_main!(benches);
