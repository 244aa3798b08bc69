//! orthogonal-merge: merging 8 LoRA adapters (r = 8, s = 2) on every Linear
//! of a MiniLM-shaped encoder (6 layers × {query, key, value,
//! attention.output.dense, intermediate.dense, output.dense}, d = 384,
//! d_ff = 1536; 36 layers), one case per method, against PEFT 0.21.2's
//! `peft.utils.merge_utils` per layer on the same deltas
//! (`reference/orthogonal_merge.py`).
//!
//! The adapters' factors are random (`A`, `B` ~ N(0, 1) drawn by libtorch's
//! CPU generator from per-tensor seeds, `B` scaled by 0.01), not trained, and
//! the reference draws the same values (`torch.manual_seed` per tensor), so
//! both sides merge identical deltas. Timed: from the LoRA factors to the
//! merged change of all 36 layers, `ΔW_t = s·B_t A_t` included (PEFT's
//! `get_delta_weight`). Weights `w = [1, 0.5, 1, 0.5, 1, 0.5, 1, -0.5]`
//! (the last one a negation) except for `sum`; density 0.2 for
//! magnitude pruning and TIES, 0.1 for DARE; `svd` truncates to rank 8.
//!
//! Peak memory: each case is also run once in a fresh child process
//! (`ORTHOGONAL_MERGE_PEAK=CASE`), which prints the growth of its peak RSS
//! over the RSS after building the inputs.

use std::hint::black_box;
use std::time::Instant;

use orthogonal_merge::{Delta, LoraFactors, MergeConfig, Method, TaskDelta, merge};
use tensor_core::tch::{self, Device};
use tensor_core::testing::randn_seeded;

const ADAPTERS: usize = 8;
const RANK: i64 = 8;
const SCALE: f64 = 2.0;
const D: i64 = 384;
const FF: i64 = 1536;
const WEIGHTS: [f64; ADAPTERS] = [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, -0.5];

/// `(path, out, in)` of the 36 Linear layers, in model order.
fn layers() -> Vec<(String, i64, i64)> {
    let mut v = Vec::new();
    for l in 0..6 {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", D, D),
            ("attention.self.key", D, D),
            ("attention.self.value", D, D),
            ("attention.output.dense", D, D),
            ("intermediate.dense", FF, D),
            ("output.dense", D, FF),
        ] {
            v.push((format!("{p}.{name}"), out, inp));
        }
    }
    v
}

/// Adapter `t`'s factors on layer `li`: seeds `1000·t + 10·li` (A) and `+1` (B).
fn tasks(device: Device) -> Vec<TaskDelta> {
    (0..ADAPTERS)
        .map(|t| {
            let mut task = TaskDelta::new(&format!("a{t}"));
            for (li, (path, out, inp)) in layers().into_iter().enumerate() {
                let seed = (1000 * t + 10 * li) as u64;
                let a = randn_seeded(&[RANK, inp], seed, device).unwrap();
                let b = randn_seeded(&[out, RANK], seed + 1, device).unwrap() * 0.01;
                task.layers
                    .insert(path, Delta::Lora(LoraFactors::new(a, b, SCALE).unwrap()));
            }
            task
        })
        .collect()
}

fn cases() -> Vec<(&'static str, MergeConfig)> {
    let w = |m: Method| MergeConfig::new(m).with_weights(&WEIGHTS);
    vec![
        ("sum", MergeConfig::new(Method::Sum)),
        ("linear", w(Method::Linear)),
        ("cat", w(Method::Cat)),
        ("svd", w(Method::Svd).with_svd_rank(RANK)),
        (
            "magnitude_prune",
            w(Method::MagnitudePrune).with_density(0.2),
        ),
        ("ties", w(Method::Ties).with_density(0.2)),
        (
            "dare_linear",
            w(Method::DareLinear).with_density(0.1).with_seed(0),
        ),
        (
            "dare_ties",
            w(Method::DareTies).with_density(0.1).with_seed(0),
        ),
    ]
}

fn run(tasks: &[TaskDelta], cfg: &MergeConfig, device: Device) {
    let m = tch::no_grad(|| merge(tasks, cfg).unwrap());
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    black_box(m);
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

fn peak_child(case: &str) {
    let device = tensor_core::best();
    let tasks = tasks(device);
    let (_, cfg) = cases()
        .into_iter()
        .find(|(c, _)| *c == case)
        .expect("known case");
    // Reset the peak to the current RSS (Linux >= 4.0), then run once.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (base, _) = rss();
    let t = Instant::now();
    run(&tasks, &cfg, device);
    let secs = t.elapsed().as_secs_f64();
    let (_, hwm) = rss();
    println!(
        "# orthogonal_merge/{case}/rust peak +{:.1} MiB over {:.1} MiB of inputs and runtime (first run {:.3} s)",
        (hwm.saturating_sub(base)) as f64 / 1024.0,
        base as f64 / 1024.0,
        secs
    );
}

fn benches() {
    let device = tensor_core::best();
    let mut c = modular_benches::criterion();
    let tasks = tasks(device);
    let mut g = c.benchmark_group("orthogonal_merge");
    g.sample_size(10);
    for (case, cfg) in cases() {
        g.bench_function(format!("{case}/rust"), |b| {
            b.iter(|| run(&tasks, &cfg, device))
        });
    }
    g.finish();
    c.final_summary();
    drop(tasks);
    // Peak memory, one fresh process per case.
    if let Ok(exe) = std::env::current_exe() {
        for (case, _) in cases() {
            if let Ok(out) = std::process::Command::new(&exe)
                .env("ORTHOGONAL_MERGE_PEAK", case)
                .output()
            {
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
}

fn main() {
    match std::env::var("ORTHOGONAL_MERGE_PEAK") {
        Ok(case) => peak_child(&case),
        Err(_) => benches(),
    }
}
