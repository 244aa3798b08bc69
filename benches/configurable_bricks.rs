//! configurable-bricks (issue 9): activation profiling of all-MiniLM-L6-v2
//! on the CPU in f32, batch 32 × 128 tokens (a quarter of the batch padded
//! to half length), against a PyTorch forward-hook reference
//! (`reference/configurable_bricks.py`, Hugging Face transformers).
//!
//! - `profile_32x128`: one forward pass with [`Profiler`] reducing each of
//!   the 6 FFNs' `[32, 128, 1536]` activations to the per-example mean |a|
//!   over non-padding tokens, `[32, 9216]` (throughput: 32 examples per
//!   iteration); the reference registers a forward hook on every
//!   `BertIntermediate` doing the same reduction.
//! - `forward_32x128`: the same forward without hooks, for the overhead.
//!
//! Memory: what profiling keeps per batch is the `[32, 9216]` f32 rows
//! (1.2 MB); the process's peak resident set after the runs is printed
//! (`VmHWM`) beside the reference's `ru_maxrss`.

use configurable_bricks::{ProfileConfig, Profiler};
use criterion::{Throughput, criterion_main};
use model_zoo::bert::BertModel;
use model_zoo::source::ModelSource;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::randint_seeded;

const B: i64 = 32;
const T: i64 = 128;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn benches() {
    let mut c = modular_benches::criterion();
    let src = ModelSource::packaged_default().expect("run `cargo xtask setup`");
    let model = BertModel::from_folder(&src.dir, Device::Cpu).unwrap();
    let ids = randint_seeded(29000, &[B, T], 1, Device::Cpu).unwrap() + 1000;
    let mask = Tensor::ones([B, T], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(0, 0, B / 4).narrow(1, T / 2, T / 2).fill_(0);
    let profiler = Profiler::new(&model, ProfileConfig::default()).unwrap();

    let mut g = c.benchmark_group("configurable_bricks");
    g.sample_size(10);
    g.throughput(Throughput::Elements(B as u64));
    g.bench_function("profile_32x128/rust", |b| {
        b.iter(|| profiler.profile_batch(&model, &ids, &mask, None).unwrap())
    });
    g.bench_function("forward_32x128/rust", |b| {
        b.iter(|| tch::no_grad(|| model.encode(&ids, &mask, false).unwrap()))
    });
    g.finish();
    println!(
        "configurable_bricks/profile_32x128 memory: rows kept per batch {:.2} MiB, process peak RSS {:.0} MiB",
        (B * profiler.neurons() * 4) as f64 / (1 << 20) as f64,
        peak_rss_mib()
    );
    c.final_summary();
}

criterion_main!(benches);
