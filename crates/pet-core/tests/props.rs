//! Properties on random shapes and ranks (proptest): merged = unmerged,
//! unmerge restores W, mixed-batch rows = single-adapter runs, zero-B LoRA
//! is the identity. On the test device (`MODULAR_TEST_DEVICE`).

use pet_core::{LoraConfig, LoraInit, add_lora, merge_adapter, set_adapter, unmerge_adapter};
use proptest::prelude::*;
use tensor_core::DType;
use tensor_core::layers::Linear;
use tensor_core::module::{Context, Module, ModuleExt, Sequential};
use tensor_core::tch::{Device, Tensor};
use tensor_core::testing::{assert_close, device, randn_seeded, tolerances, with_seed};

/// Drawn on the CPU (the same weights on every device), then moved to the test device.
fn model(inp: i64, out: i64, seed: u64) -> Sequential {
    let mut m = with_seed(seed, || {
        Sequential::new().push_named(
            "proj",
            Box::new(Linear::new(inp, out, true, Device::Cpu).unwrap()),
        )
    });
    m.to_device(device()).unwrap();
    m
}

fn fwd(m: &dyn Module, x: &Tensor) -> Tensor {
    m.forward(x, &mut Context::eval()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn merge_unmerge_and_mixed(inp in 1i64..24, out in 1i64..24, r1 in 1i64..6, r2 in 1i64..6,
                               batch in 1i64..5, t in 1i64..4, seed in 0u64..1000, rs in any::<bool>()) {
        let dev = device();
        // Merged vs unmerged, mixed vs single: computed differently.
        let (atol, rtol) = tolerances(DType::F32, dev);
        let mut m = model(inp, out, seed);
        let x = randn_seeded(&[batch, t, inp], seed + 1, dev).unwrap();
        let y0 = fwd(&m, &x);
        let mut c1 = LoraConfig::new(r1, 3.0, &["proj"]);
        c1.seed = seed;
        if rs { c1.scaling = pet_core::LoraScaling::Rslora; }
        add_lora(&mut m, "a", &c1).unwrap();
        // Exact on any device: the same matmul plus an exact zero.
        prop_assert!(fwd(&m, &x).equal(&y0));
        let mut c2 = LoraConfig::new(r2, 2.0, &["proj"]);
        c2.init = LoraInit::Random;
        c2.seed = seed + 7;
        add_lora(&mut m, "b", &c2).unwrap();
        // Non-zero B for "a" too.
        m.for_each_param_mut(&mut |n, p| {
            if n.ends_with("lora_B.a.weight") {
                let v = randn_seeded(&p.size(), seed + 2, p.device()).unwrap();
                tensor_core::tch::no_grad(|| p.copy_(&v));
            }
            Ok(())
        }).unwrap();
        set_adapter(&mut m, &["a", "b"]).unwrap();
        let yu = fwd(&m, &x);
        let w0 = m.named_parameters().into_iter().find(|(n, _)| n == "proj.weight").unwrap().1.copy();
        merge_adapter(&mut m, &[], true).unwrap();
        assert_close(&fwd(&m, &x), &yu, 10.0 * atol, rtol);
        unmerge_adapter(&mut m).unwrap();
        let w1 = m.named_parameters().into_iter().find(|(n, _)| n == "proj.weight").unwrap().1.copy();
        // W + ΔW - ΔW: rounding of elementwise ops only, the same on any device.
        assert_close(&w1, &w0, 1e-5, 1e-5);
        // Mixed batch: sample i names a, b or the base.
        let names: Vec<&str> = (0..batch).map(|i| ["a", "b", "__base__"][(i as usize + seed as usize) % 3]).collect();
        let mut ctx = Context::eval();
        ctx.insert(pet_core::mixed_batch(&m, &names, dev).unwrap());
        let ym = m.forward(&x, &mut ctx).unwrap();
        for (i, n) in names.iter().enumerate() {
            let single = if *n == "__base__" { y0.shallow_clone() } else {
                set_adapter(&mut m, &[n]).unwrap();
                fwd(&m, &x)
            };
            assert_close(&ym.get(i as i64), &single.get(i as i64), atol, rtol);
        }
    }
}
