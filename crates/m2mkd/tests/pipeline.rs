//! Hybrid networks and the pipeline: what a distillation step may change,
//! self-distillation, assembly, width errors, parallel jobs, MoE students.

mod common;

use common::*;
use m2mkd::{
    Boundaries, DistilConfig, Distillation, Error, Hybrid, HybridOptions, KdConfig, LossRegistry,
    LossTerm, MetaModel, ModularModel, OptimConfig, Optimizer, StitchKind, StitchPolicy, assemble,
    distil_all, distil_step, incubate, load_module, save_module, split_into_modular,
    train_end_to_end,
};
use tensor_core::prelude::*;
use tensor_core::testing::{assert_close, with_seed};

const D: i64 = 8;

fn split_teacher3(seed: u64) -> ModularModel {
    split_into_modular(teacher(3, D, seed), &Boundaries::new(vec![1, 1, 1])).unwrap()
}

fn hybrid(index: usize, student_width: i64, opts: HybridOptions) -> Hybrid {
    let (mut t, tw) = split_teacher3(1).into_modules();
    let (mut s, _) = student(3, student_width, 1, false, 2).into_modules();
    let replica = meta(3, D, 3).replica().unwrap();
    // Stitches and the projection draw their initial weights: under the seed
    // lock, so that they never interleave with another test's seeded draws.
    with_seed(4, || {
        Hybrid::new(
            replica,
            index,
            Some((t.swap_remove(index), tw[index])),
            s.swap_remove(index),
            student_width,
            opts,
            dev(),
        )
    })
    .unwrap()
}

/// `distil_all` of `split_teacher3(1)` into a 3-module student of `width` on `batch_source`.
fn distil3(
    meta: &MetaModel,
    width: i64,
    cfg: &DistilConfig,
    registry: &LossRegistry,
) -> m2mkd::Result<Distillation> {
    distil_all(
        meta,
        split_teacher3(1),
        student(3, width, 1, false, 2),
        &batch_source,
        cfg,
        registry,
    )
}

fn small_optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        warmup_ratio: 0.0,
        ..OptimConfig::default()
    }
}

#[test]
fn a_step_changes_only_the_student_and_its_stitches() {
    let registry = LossRegistry::with_builtins(&KdConfig::default());
    let terms = [
        LossTerm::new("m2mkd", 1.0),
        LossTerm::new("hidden_mse", 0.5),
    ];
    for index in 0..3 {
        let h = hybrid(
            index,
            4,
            HybridOptions {
                hidden_projection: true,
                ..HybridOptions::default()
            },
        );
        assert_eq!(h.pre.is_some(), index > 0, "module 0 reads the raw input");
        assert_eq!(
            h.post.is_some(),
            index < 2,
            "the last module uses its own head"
        );
        let before = snapshot(&h);
        let mut opt = Optimizer::new(h.trainable_parameters(), small_optim(), 10).unwrap();
        // Teacher logits carry no graph.
        let b = device_batch(0);
        let mut ctx = b.context(true);
        let x = h.meta_prefix(&b.input, &mut ctx).unwrap();
        assert!(!x.requires_grad());
        let zt = h.teacher_forward(&x, &mut ctx).unwrap();
        assert!(!zt.logits.requires_grad());
        let out = distil_step(&h, &mut opt, &b, &registry, &terms).unwrap();
        assert!(out.loss.is_finite() && out.grad_norm > 0.0);
        let changed = changed(&before, &snapshot(&h));
        assert!(!changed.is_empty());
        for n in &changed {
            assert!(
                n.starts_with("student.")
                    || n.starts_with("stitch_pre.")
                    || n.starts_with("stitch_post.")
                    || n.starts_with("projection."),
                "module {index}: {n} changed"
            );
        }
        // Every student-side parameter that can receive a gradient moved;
        // nothing on the teacher or meta side even holds a gradient.
        for (n, t) in h.named_parameters() {
            let frozen = n.starts_with("meta.") || n.starts_with("teacher.");
            assert_eq!(t.requires_grad(), !frozen, "{n}");
            if frozen {
                assert!(!t.grad().defined(), "{n} has a gradient");
            }
        }
        if index < 2 {
            assert!(changed.iter().any(|n| n.starts_with("stitch_post.")));
            assert!(changed.iter().any(|n| n.starts_with("projection.")));
        }
    }
}

#[test]
fn hybrid_with_the_teacher_module_equals_the_teacher_hybrid() {
    for index in 0..3 {
        // The same teacher built twice (same seed): the student *is* T_i.
        let (mut t, tw) = split_teacher3(7).into_modules();
        let (mut same, _) = split_teacher3(7).into_modules();
        let h = Hybrid::new(
            meta(3, D, 3).replica().unwrap(),
            index,
            Some((t.swap_remove(index), tw[index])),
            same.swap_remove(index),
            D,
            HybridOptions::default(),
            dev(),
        )
        .unwrap();
        assert!(
            h.pre.is_none() && h.post.is_none(),
            "equal widths: no stitches"
        );
        let b = device_batch(3);
        let mut ctx = b.context(false);
        let x = h.meta_prefix(&b.input, &mut ctx).unwrap();
        let zt = h.teacher_forward(&x, &mut ctx).unwrap().logits;
        let zs = h.student_forward(&x, &mut ctx, false).unwrap().logits;
        assert!(zs.equal(&zt), "module {index}");
        // With identity stitches on both sides, equal up to rounding.
        let (mut student, pre, post, proj, teacher) = h.into_parts();
        assert!(pre.is_none() && post.is_none() && proj.is_none());
        student = Box::new(m2mkd::Stitched {
            pre: (index > 0).then(|| Box::new(m2mkd::Stitch::identity(D, dev()).unwrap()) as Slot),
            module: student,
            post: (index < 2).then(|| Box::new(m2mkd::Stitch::identity(D, dev()).unwrap()) as Slot),
        });
        let mut h2 = Hybrid::new(
            meta(3, D, 3).replica().unwrap(),
            index,
            Some((teacher.unwrap(), D)),
            student,
            D,
            HybridOptions::default(),
            dev(),
        )
        .unwrap();
        // The hybrid (meta replica, stitched student, teacher) keeps the module contract.
        tensor_core::contract::check_contract(&mut h2).unwrap();
        let zs2 = h2.student_forward(&x, &mut ctx, false).unwrap().logits;
        let (atol, rtol) = f32_tol(1e-6, 1e-5);
        assert_close(&zs2, &zt, atol, rtol);
    }
}

#[test]
fn width_mismatch_without_stitches_is_a_clear_error() {
    let (mut t, tw) = split_teacher3(1).into_modules();
    let (mut s, _) = student(3, 4, 1, false, 2).into_modules();
    let e = Hybrid::new(
        meta(3, D, 3).replica().unwrap(),
        1,
        Some((t.swap_remove(1), tw[1])),
        s.swap_remove(1),
        4,
        HybridOptions {
            stitches: StitchPolicy::Never,
            ..HybridOptions::default()
        },
        dev(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::WidthMismatch {
                module: 1,
                width: 4,
                meta: 8,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("enable stitches"), "{e}");
    // A teacher module of another width cannot sit in the meta model.
    let (mut t4, _) = split_into_modular(teacher(3, 4, 1), &Boundaries::new(vec![1, 1, 1]))
        .unwrap()
        .into_modules();
    let (mut s, _) = student(3, D, 1, false, 2).into_modules();
    let e = Hybrid::new(
        meta(3, D, 3).replica().unwrap(),
        0,
        Some((t4.swap_remove(0), 4)),
        s.swap_remove(0),
        D,
        HybridOptions::default(),
        dev(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("teacher width 4"), "{e}");
    // The whole pipeline says the same.
    let cfg = DistilConfig {
        steps: 1,
        stitches: StitchPolicy::Never,
        ..DistilConfig::default()
    };
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let e = distil3(&meta(3, D, 3), 4, &cfg, &registry).unwrap_err();
    assert!(matches!(e, Error::WidthMismatch { .. }), "{e}");
}

fn batch_source(step: u64) -> m2mkd::Result<m2mkd::Batch> {
    Ok(device_batch(step))
}

/// One batch over and over: first and final losses are comparable.
fn fixed_source(_step: u64) -> m2mkd::Result<m2mkd::Batch> {
    Ok(device_batch(0))
}

#[test]
fn unfrozen_meta_and_mismatched_counts_are_errors() {
    let mut m = with_seed(3, || m2mkd::MetaModel::new(3, D, meta_builder(D)).unwrap());
    m.model_mut().to_device(dev()).unwrap();
    let cfg = DistilConfig {
        steps: 1,
        ..DistilConfig::default()
    };
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let e = distil3(&m, D, &cfg, &registry).unwrap_err();
    assert!(e.to_string().contains("frozen"), "{e}");
    m.freeze();
    let e = distil_all(
        &m,
        split_teacher3(1),
        student(2, D, 1, false, 2),
        &batch_source,
        &cfg,
        &registry,
    )
    .unwrap_err();
    assert!(e.to_string().contains("must agree"), "{e}");
}

fn distil_cfg(parallel: bool) -> DistilConfig {
    DistilConfig {
        steps: 12,
        optim: small_optim(),
        parallel,
        hidden_weight: 0.1,
        stitch_kind: StitchKind::LayerNormLinear,
        ..DistilConfig::default()
    }
}

#[test]
fn assembly_loads_every_distilled_module() {
    let cfg = distil_cfg(true);
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let meta3 = meta(3, D, 3);
    let teacher3 = split_teacher3(1);
    let before = snapshot(&teacher3);
    let out = distil_all(
        &meta3,
        teacher3,
        student(3, 4, 2, false, 2),
        &fixed_source,
        &cfg,
        &registry,
    )
    .unwrap();
    assert_eq!(out.modules.len(), 3);
    for m in &out.modules {
        assert!(
            m.report.final_loss < m.report.first_loss,
            "module {}: {:?}",
            m.index,
            m.report
        );
    }
    // The teacher comes back unchanged.
    assert!(changed(&before, &snapshot(&out.teacher)).is_empty());

    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = out
        .modules
        .iter()
        .map(|m| {
            let p = dir.path().join(format!("module{}.safetensors", m.index));
            save_module(m, &p).unwrap();
            p
        })
        .collect();
    // Load every file into a fresh student: each of its parameters comes from a file.
    let mut fresh = student(3, 4, 2, false, 99);
    for (i, p) in paths.iter().enumerate() {
        let (loaded, skipped) = load_module(&mut fresh, i, p).unwrap();
        assert!(loaded > 0);
        assert!(
            skipped.iter().any(|n| n.starts_with("stitch_")),
            "module {i}: {skipped:?}"
        );
    }
    let assembled = assemble(out.modules, false).unwrap();
    let a = snapshot(&assembled);
    let f = snapshot(&fresh);
    assert_eq!(a.len(), f.len());
    assert!(
        changed(&a, &f).is_empty(),
        "loaded files differ from the distilled modules"
    );
    let b = device_batch(0);
    let z = assembled.forward(&b.input, &mut b.context(false)).unwrap();
    assert_eq!(z.size(), [BATCH, CLASSES]);
    // A file for another module, or one lacking a parameter, is refused.
    let e = load_module(&mut fresh, 1, &paths[0]).unwrap_err();
    assert!(e.to_string().contains("holds module 0"), "{e}");
    // File I/O: the tensors are only rewritten to another file.
    let t = tensor_core::io::load(&paths[2], Device::Cpu).unwrap();
    let partial: Vec<(String, &Tensor)> = t.iter().skip(1).map(|(n, t)| (n.clone(), t)).collect();
    let bad = dir.path().join("partial.safetensors");
    tensor_core::io::save(&bad, &partial, None).unwrap();
    let e = load_module(&mut fresh, 2, &bad).unwrap_err();
    assert!(e.to_string().contains("no value for parameter"), "{e}");
}

#[test]
fn assembly_keeps_stitches_or_checks_widths() {
    let cfg = DistilConfig {
        steps: 2,
        ..distil_cfg(false)
    };
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let meta3 = meta(3, D, 3);
    let out = distil3(&meta3, 4, &cfg, &registry).unwrap();
    // Kept stitches: every boundary at the meta width, stitch parameters present.
    let kept = assemble(out.modules, true).unwrap();
    assert_eq!(kept.width(), D);
    assert!(
        kept.named_parameters()
            .iter()
            .any(|(n, _)| n.starts_with("stage.1.stitch_pre."))
    );
    let b = device_batch(1);
    assert_eq!(
        kept.forward(&b.input, &mut b.context(false))
            .unwrap()
            .size(),
        [BATCH, CLASSES]
    );
    // Missing or duplicated modules.
    let out = distil3(&meta3, 4, &cfg, &registry).unwrap();
    let mut mods = out.modules;
    mods.remove(1);
    let e = assemble(mods, false).unwrap_err();
    assert!(e.to_string().contains("module 1 is missing"), "{e}");
}

/// The student has the meta width, so the hybrids need no stitches and the
/// hidden projection starts as the identity. What `distil_all` does draw
/// (the replicas' discarded init, each job's seeding) happens under the seed
/// lock, so the other tests of this binary, drawing from libtorch's global
/// generator on their own threads, cannot change either run.
#[test]
fn parallel_and_sequential_distillation_agree() {
    let registry = LossRegistry::with_builtins(&KdConfig::default());
    let meta3 = meta(3, D, 3);
    let run = |parallel| {
        let cfg = DistilConfig {
            steps: 5,
            ..distil_cfg(parallel)
        };
        let out = distil3(&meta3, D, &cfg, &registry).unwrap();
        snapshot(&assemble(out.modules, true).unwrap())
    };
    let (seq, par) = (run(false), run(true));
    let (atol, rtol) = f32_tol(1e-6, 1e-5);
    for ((n, a), (_, b)) in seq.iter().zip(&par) {
        let c = tensor_core::testing::closeness(b, a, atol, rtol).unwrap();
        assert!(c.ok, "{n}: {c:?}");
    }
}

/// Stitches are drawn under `DistilConfig::seed`, not from whatever state
/// libtorch's global generator is in when `distil_all` starts: two runs
/// entered with the generator in different states end equal (a student
/// narrower than the meta model, so every module has random stitches), and
/// a different config seed gives different stitches; parallel jobs inside
/// `with_seed` finish and agree.
#[test]
fn stitches_start_from_the_config_seed() {
    let registry = LossRegistry::with_builtins(&KdConfig::default());
    let meta3 = meta(3, D, 3);
    let run = |global: u64, seed: u64, parallel: bool| {
        let cfg = DistilConfig {
            steps: 2,
            seed,
            ..distil_cfg(parallel)
        };
        // Held under the seed lock; `distil_all` reseeds inside it.
        with_seed(global, || {
            let out = distil3(&meta3, 4, &cfg, &registry).unwrap();
            assert!(
                out.modules
                    .iter()
                    .all(|m| m.pre.is_some() || m.post.is_some())
            );
            snapshot(&assemble(out.modules, true).unwrap())
        })
    };
    let (a, b, other) = (run(11, 0, false), run(12, 0, false), run(11, 1, false));
    assert!(
        a.iter().any(|(n, _)| n.contains("stitch")),
        "{:?}",
        a.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} depends on the global generator's state");
    }
    assert!(
        a.iter()
            .zip(&other)
            .any(|((n, x), (_, y))| n.contains("stitch") && !x.equal(y)),
        "the config seed must reach the stitches"
    );
    // Parallel jobs started inside `with_seed` seed under its lock (rather
    // than waiting for it forever) and agree with the sequential run.
    let par = run(13, 0, true);
    let (atol, rtol) = f32_tol(1e-6, 1e-5);
    for ((n, x), (_, y)) in a.iter().zip(&par) {
        let c = tensor_core::testing::closeness(y, x, atol, rtol).unwrap();
        assert!(c.ok, "{n}: {c:?}");
    }
}

#[test]
fn moe_students_distil_with_their_balance_loss() {
    let cfg = DistilConfig {
        steps: 15,
        ..distil_cfg(false)
    };
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let meta3 = meta(3, D, 3);
    let (mut t, tw) = split_teacher3(1).into_modules();
    let (mut s, _) = student(3, D, 1, true, 5).into_modules();
    let replica = meta3.replica().unwrap();
    let h = with_seed(6, || {
        Hybrid::new(
            replica,
            1,
            Some((t.swap_remove(1), tw[1])),
            s.swap_remove(1),
            D,
            HybridOptions {
                hidden_projection: true,
                ..HybridOptions::default()
            },
            dev(),
        )
    })
    .unwrap();
    let mut opt = Optimizer::new(h.trainable_parameters(), small_optim(), 5).unwrap();
    let out = distil_step(&h, &mut opt, &device_batch(0), &registry, &cfg.terms()).unwrap();
    assert!(
        out.parts.iter().any(|(n, v)| n == "aux" && *v > 0.0),
        "{:?}",
        out.parts
    );
    let d = distil_all(
        &meta3,
        split_teacher3(1),
        student(3, D, 1, true, 5),
        &fixed_source,
        &cfg,
        &registry,
    )
    .unwrap();
    for m in &d.modules {
        assert!(m.report.final_loss < m.report.first_loss, "{:?}", m.report);
    }
    let s = assemble(d.modules, false).unwrap();
    assert!(s.find(&mut |_, m| m.kind() == "MoeBlock").len() == 3);
}

#[test]
fn incubation_and_end_to_end_training_reduce_their_losses() {
    let cfg = DistilConfig {
        steps: 15,
        ..distil_cfg(false)
    };
    let registry = LossRegistry::with_builtins(&cfg.kd);
    let meta3 = meta(3, D, 3);
    let (teacher, reports) =
        incubate(&meta3, split_teacher3(1), &fixed_source, &cfg, &registry).unwrap();
    for r in &reports {
        assert!(r.final_loss < r.first_loss, "{r:?}");
    }
    assert!(teacher.trainable_parameters().len() == teacher.named_parameters().len());
    // Logit KD end to end from the (incubated) teacher, and plain CE.
    let s = student(3, 4, 1, false, 2);
    let kd = KdConfig::default();
    let r = train_end_to_end(
        &s,
        Some(&teacher),
        &fixed_source,
        20,
        &small_optim(),
        &kd,
        0,
    )
    .unwrap();
    assert!(r.final_loss < r.first_loss, "{r:?}");
    let r = train_end_to_end(&s, None, &batch_source, 20, &small_optim(), &kd, 0).unwrap();
    assert!(r.final_loss.is_finite());
}
