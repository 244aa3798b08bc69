//! pet-core's and orthogonal-merge's adapters on one model: both are delta
//! kinds of tensor-core's one adapted-linear host, so they coexist on a
//! layer, serve one mixed batch, merge through one lifecycle, and save and
//! load through the one PEFT format, each crate reading the other's files.

use orthogonal_merge::{self as om, BasisKind, FrozenSide, Registry};
use pet_core::{BASE, Ia3Config, LoraConfig, LoraInit, MixedBatch};
use tensor_core::layers::Linear;
use tensor_core::module::{Context, Module, ModuleExt, Sequential};
use tensor_core::seed::randn_seeded;
use tensor_core::tch::{self, Device, Tensor};
use tensor_core::testing::assert_close;

const D: i64 = 8;

fn rand(shape: &[i64], seed: u64) -> Tensor {
    randn_seeded(shape, seed, Device::Cpu).unwrap()
}

/// `query` and `value` projections, as a BERT layer names them.
fn model() -> Sequential {
    let lin = |s| Linear::from_weights(rand(&[D, D], s), Some(rand(&[D], s + 1))).unwrap();
    Sequential::new()
        .push_named("query", Box::new(lin(1)))
        .push_named("value", Box::new(lin(3)))
}

fn run(m: &Sequential, x: &Tensor) -> Tensor {
    m.forward(x, &mut Context::eval()).unwrap()
}

/// LoRA "p" and IA3 "i" from pet-core, orthogonal "o" from orthogonal-merge
/// (its trained factor set away from zero, as training would).
fn adapted() -> Sequential {
    let mut m = model();
    let mut cfg = LoraConfig::new(2, 4.0, &["query", "value"]);
    cfg.init = LoraInit::Random;
    pet_core::add_lora(&mut m, "p", &cfg).unwrap();
    let ia3 = Ia3Config {
        target_modules: vec!["value".into()],
        feedforward_modules: vec![],
    };
    pet_core::add_ia3(&mut m, "i", &ia3).unwrap();
    let mut reg = Registry::for_model(
        &m,
        &["query", "value"],
        BasisKind::QrBins,
        7,
        2,
        FrozenSide::Input,
    )
    .unwrap();
    reg.claim("o").unwrap();
    om::add_orthogonal(
        &mut m,
        "o",
        &reg,
        &om::AdapterConfig::new(&["query", "value"]),
    )
    .unwrap();
    let mut seed = 50;
    tch::no_grad(|| {
        m.for_each_param_mut(&mut |n, t| {
            if n.contains(".lora_B.o.") || n.contains(".ia3_l.") {
                seed += 1;
                t.copy_(&(rand(&t.size(), seed) * 0.5 + if n.contains("ia3") { 1.0 } else { 0.0 }));
            }
            Ok(())
        })
        .unwrap()
    });
    m
}

#[test]
fn one_layer_carries_both_crates_adapters_in_one_mixed_batch() {
    let mut m = adapted();
    assert_eq!(pet_core::adapter_names(&m), ["p", "o", "i"]);
    let names = ["o", "p", BASE, "i", "o", "p"];
    let x = rand(&[names.len() as i64, 3, D], 9);
    let mut ctx = Context::eval();
    ctx.insert(MixedBatch::new(&names, Device::Cpu).unwrap());
    let got = m.forward(&x, &mut ctx).unwrap();
    for (i, n) in names.iter().enumerate() {
        let xi = x.narrow(0, i as i64, 1);
        let want = if *n == BASE {
            pet_core::with_adapters_disabled(&mut m, |m| Ok(run(m, &xi))).unwrap()
        } else {
            pet_core::set_adapter(&mut m, &[n]).unwrap();
            run(&m, &xi)
        };
        assert_close(&got.narrow(0, i as i64, 1), &want, 1e-5, 1e-5);
    }
}

#[test]
fn one_lifecycle_merges_both_crates_adapters() {
    let mut m = adapted();
    pet_core::set_adapter(&mut m, &["i", "p", "o"]).unwrap();
    let x = rand(&[4, D], 11);
    let unmerged = run(&m, &x);
    let w0 = m
        .get_as::<pet_core::AdaptedLinear>("value")
        .unwrap()
        .linear()
        .weight
        .copy();
    assert_eq!(pet_core::merge_adapter(&mut m, &[], true).unwrap(), 5);
    assert_close(&run(&m, &x), &unmerged, 1e-5, 1e-5);
    pet_core::unmerge_adapter(&mut m).unwrap();
    let w = &m
        .get_as::<pet_core::AdaptedLinear>("value")
        .unwrap()
        .linear()
        .weight;
    assert_close(w, &w0, 1e-5, 1e-5);
}

#[test]
fn each_crate_reads_the_others_files() {
    let m = adapted();
    let dir = tempfile::tempdir().unwrap();
    // orthogonal-merge's adapter, written by pet-core: a plain LoRA file
    // orthogonal-merge reads back as the same task.
    pet_core::save_adapter(&m, "o", dir.path().join("o")).unwrap();
    let file = om::read_adapter(dir.path().join("o"), None).unwrap();
    let want = om::task_delta(&m, "o").unwrap();
    for (p, d) in &want.layers {
        let om::Delta::Lora(w) = d else {
            unreachable!()
        };
        let om::Delta::Lora(g) = &file.task.layers[p] else {
            panic!("{p}: not LoRA")
        };
        assert_close(
            &g.delta_weight().unwrap(),
            &w.delta_weight().unwrap(),
            1e-6,
            1e-6,
        );
    }
    // pet-core's LoRA, written by orthogonal-merge, loads into pet-core on
    // a fresh model and computes what it did.
    om::save_adapter(&m, "p", dir.path().join("p"), &om::SaveOptions::default()).unwrap();
    let mut fresh = model();
    pet_core::load_adapter(&mut fresh, "p", dir.path().join("p")).unwrap();
    let mut src = adapted();
    pet_core::set_adapter(&mut src, &["p"]).unwrap();
    let x = rand(&[2, D], 13);
    assert_close(&run(&fresh, &x), &run(&src, &x), 1e-5, 1e-5);
    // IA3 has no low-rank view: orthogonal-merge refuses it by kind.
    let e =
        om::save_adapter(&m, "i", dir.path().join("i"), &om::SaveOptions::default()).unwrap_err();
    assert!(e.to_string().contains("IA3"), "{e}");
}
