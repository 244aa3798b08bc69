//! One module's distillation step on CUDA (docs/gpu.md), against the same step on
//! the CPU. Skipped (passes, printing why) when CUDA is not available.

mod common;

use common::*;
use m2mkd::{
    Boundaries, Hybrid, HybridOptions, KdConfig, LossRegistry, LossTerm, OptimConfig, Optimizer,
    distil_step, split_into_modular,
};
use tensor_core::prelude::*;
use tensor_core::tch;

fn hybrid(device: Device) -> Hybrid {
    let (mut t, tw) = split_into_modular(teacher(3, 8, 1), &Boundaries::new(vec![1, 1, 1]))
        .unwrap()
        .into_modules();
    let (mut s, _) = student(3, 4, 1, true, 2).into_modules();
    // Seeded: the stitches (width 4 to 8) are drawn, and both devices must
    // start from the same ones.
    let mut h = tensor_core::testing::with_seed(5, || {
        Hybrid::new(
            meta(3, 8, 3).replica().unwrap(),
            1,
            Some((t.swap_remove(1), tw[1])),
            s.swap_remove(1),
            4,
            HybridOptions::default(),
            Device::Cpu,
        )
    })
    .unwrap();
    h.to_device(device).unwrap();
    h
}

#[test]
fn distil_step_on_cuda_matches_cpu() {
    if !tch::Cuda::is_available() {
        eprintln!("CUDA not available: check not run");
        return;
    }
    let gpu = Device::Cuda(0);
    let registry = LossRegistry::with_builtins(&KdConfig::default());
    let terms = [LossTerm::new("m2mkd", 1.0)];
    let optim = OptimConfig {
        clip_norm: None,
        ..OptimConfig::default()
    };
    let b = batch(0);
    let bg = m2mkd::Batch::new(b.input.to_device(gpu), b.targets.to_device(gpu))
        .with_mask(b.mask.as_ref().unwrap().to_device(gpu));
    let (hc, hg) = (hybrid(Device::Cpu), hybrid(gpu));
    let mut oc = Optimizer::new(hc.trainable_parameters(), optim.clone(), 10).unwrap();
    let mut og = Optimizer::new(hg.trainable_parameters(), optim.clone(), 10).unwrap();
    let lc = distil_step(&hc, &mut oc, &b, &registry, &terms).unwrap();
    let lg = distil_step(&hg, &mut og, &bg, &registry, &terms).unwrap();
    let rel = (lc.loss - lg.loss).abs() / lc.loss.abs();
    let mut worst = 0.0f64;
    for ((n, c), (_, g)) in hc.named_parameters().iter().zip(hg.named_parameters()) {
        let g = g.to_device(Device::Cpu);
        let d = (c - &g).abs().max().double_value(&[]);
        worst = worst.max(d);
        assert!(d < 1e-4, "{n}: max abs difference {d}");
    }
    assert!(rel < 1e-4, "loss {} (CPU) vs {} (CUDA)", lc.loss, lg.loss);
    // Median step time on the GPU after a warm-up.
    let mut times = Vec::new();
    for i in 0..30 {
        tch::Cuda::synchronize(0);
        let t = std::time::Instant::now();
        distil_step(&hg, &mut og, &bg, &registry, &terms).unwrap();
        tch::Cuda::synchronize(0);
        if i >= 5 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "| check | value |\n|---|---|\n| loss CPU / CUDA | {:.6} / {:.6} (rel {:.1e}) |\n| max param diff after step | {:.2e} |\n| CUDA step median (toy MoE module, batch 8x6) | {:.3} ms |",
        lc.loss,
        lg.loss,
        rel,
        worst,
        1e3 * times[times.len() / 2]
    );
}
