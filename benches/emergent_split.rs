//! emergent-split (issue 6): splitting all six all-MiniLM-L6-v2 FFNs
//! (W1: 1536 x 384) into 16 and 64 experts with our balanced k-means, against
//! PyPI's `k-means-constrained` on the same L2-normalised keys; and the sparse
//! EMoE FFN forward (N = 16, top-4, only the selected experts computed) at
//! 8192 tokens, against PyTorch's *dense* FFN of the same size, with our dense
//! `FeedForward` alongside (`reference/emergent_split.py`).

use std::time::Duration;

use criterion::criterion_main;
use emergent_split::kmeans::{KMeansConfig, balanced_kmeans, normalize_rows};
use emergent_split::split::kmeans_split;
use emergent_split::{ComputePath, EmoeFfn, GateConfig};
use model_zoo::source::ModelSource;
use tensor_core::io::SafetensorsFile;
use tensor_core::prelude::*;
use tensor_core::tch;
use tensor_core::testing::{randn_seeded, with_seed};

const TOKENS: i64 = 8192;
const D: i64 = 384;
const FF: i64 = 1536;

/// The six MiniLM key matrices W1, `[1536, 384]` f32.
fn minilm_w1() -> Vec<Tensor> {
    let src = ModelSource::packaged_default().expect("run `cargo xtask setup`");
    let f = SafetensorsFile::open(src.dir.join("model.safetensors")).unwrap();
    (0..6)
        .map(|layer| {
            let name = format!("encoder.layer.{layer}.intermediate.dense.weight");
            let name = if f.contains(&name) {
                name
            } else {
                format!("bert.{name}")
            };
            f.load(&name, Device::Cpu).unwrap()
        })
        .collect()
}

/// EMoE step 1 for every layer: normalise the keys, balanced k-means (seed 0).
fn split_all(w1: &[Tensor], n: usize) -> f64 {
    w1.iter()
        .map(|w| {
            let x = normalize_rows(w).unwrap();
            balanced_kmeans(&x, &KMeansConfig::new(n))
                .unwrap()
                .objective
        })
        .sum()
}

fn benches() {
    let mut c = modular_benches::criterion();
    let _guard = tch::no_grad_guard();
    let mut g = c.benchmark_group("emergent_split");

    // One iteration is ~1-3 s: ten samples of one iteration each.
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(5));
    let w1 = minilm_w1();
    for n in [16usize, 64] {
        g.bench_function(format!("split_minilm_n{n}/rust"), |b| {
            b.iter(|| split_all(&w1, n))
        });
    }

    // MiniLM-sized FFN (384 -> 1536 -> 384, GELU), seeded.
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let ffn = with_seed(8, || {
        FeedForward::new(D, FF, Activation::Gelu, FfnNames::bert(), Device::Cpu)
    })
    .unwrap();
    let x = randn_seeded(&[TOKENS, D], 9, Device::Cpu).unwrap();
    g.bench_function("dense_ffn_8192/rust", |b| {
        b.iter(|| ffn.forward(&x, &mut Context::eval()).unwrap())
    });

    let split = kmeans_split(&ffn, &KMeansConfig::new(16)).unwrap();
    let mut emoe = EmoeFfn::from_ffn(&ffn, &split, GateConfig::new(16, 4)).unwrap();
    emoe.path = ComputePath::Sparse;
    g.bench_function("sparse_ffn_n16_k4/rust", |b| {
        b.iter(|| emoe.forward(&x, &mut Context::eval()).unwrap())
    });
    g.finish();
    c.final_summary();
}

criterion_main!(benches);
