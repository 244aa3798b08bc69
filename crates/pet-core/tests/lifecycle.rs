//! The adapter lifecycle on a real (tiny, random) BERT: identity at
//! initialisation, merge = unmerged forward, unmerge restores the base,
//! several active adapters add, safe merge refuses NaN, delete/unload give
//! the plain model back, mixed batches equal per-adapter runs.

mod common;

use common::{Inputs, base_model, max_abs, run, run_mixed, scaled};
use pet_core::{
    Error, Ia3Config, LoraConfig, LoraInit, adapter_names, add_ia3, add_lora, delete_adapter,
    disable_adapters, enable_adapters, mark_only_adapters_trainable, merge_adapter,
    merge_and_unload, set_adapter, trainable_report, unmerge_adapter,
};
use tensor_core::ModuleExt;
use tensor_core::tch::{self, Tensor};
use tensor_core::testing::{device, randn_seeded, with_seed};

/// Two computations done differently, on the CPU (scaled on CUDA by `scaled`).
const TOL: f64 = 1e-5;

fn lora(r: i64, targets: &[&str], init: LoraInit, seed: u64) -> LoraConfig {
    let mut c = LoraConfig::new(r, 2.0 * r as f64, targets);
    c.init = init;
    c.seed = seed;
    c
}

fn weights(m: &dyn tensor_core::Module) -> Vec<(String, Tensor)> {
    m.named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

fn randomise_ia3(m: &mut dyn tensor_core::Module, seed: u64) {
    with_seed(seed, || {
        m.for_each_param_mut(&mut |n, t| {
            if n.contains("ia3_l") {
                tch::no_grad(|| t.copy_(&(t.rand_like() + 0.5)));
            }
            Ok(())
        })
        .unwrap()
    });
}

#[test]
fn adapters_at_initialisation_leave_outputs_unchanged() {
    let inp = Inputs::load();
    let mut m = base_model();
    let base = run(&m, &inp.ids, &inp.mask);
    add_lora(
        &mut m,
        "lora",
        &lora(4, &["query", "value"], LoraInit::Kaiming, 0),
    )
    .unwrap();
    // Exact on any device: the same kernels plus an exact zero (and below, times an exact one).
    assert!(
        run(&m, &inp.ids, &inp.mask).equal(&base),
        "zero-B LoRA changed the output"
    );
    let mut dora = lora(4, &["key", "dense"], LoraInit::Kaiming, 1);
    dora.use_dora = true;
    add_lora(&mut m, "dora", &dora).unwrap();
    set_adapter(&mut m, &["dora"]).unwrap();
    let e = max_abs(&run(&m, &inp.ids, &inp.mask), &base);
    assert!(e < scaled(1e-6), "DoRA at init: {e:e}");
    add_ia3(
        &mut m,
        "ia3",
        &Ia3Config {
            target_modules: vec!["key".into(), "value".into(), "output.dense".into()],
            feedforward_modules: vec!["layer.0.output.dense".into()],
        },
    )
    .unwrap();
    set_adapter(&mut m, &["ia3"]).unwrap();
    assert!(
        run(&m, &inp.ids, &inp.mask).equal(&base),
        "IA3 = 1 changed the output"
    );
}

#[test]
fn merge_equals_unmerged_and_unmerge_restores_the_base() {
    let inp = Inputs::load();
    let mut m = base_model();
    let w0 = weights(&m);
    let plain = run(&m, &inp.ids, &inp.mask);
    add_lora(
        &mut m,
        "a",
        &lora(4, &["query", "value"], LoraInit::Random, 1),
    )
    .unwrap();
    let mut d = lora(2, &["query", "intermediate.dense"], LoraInit::Random, 2);
    d.use_dora = true;
    add_lora(&mut m, "dora", &d).unwrap();
    add_ia3(
        &mut m,
        "ia3",
        &Ia3Config {
            target_modules: vec!["value".into(), "output.dense".into()],
            feedforward_modules: vec!["0.output.dense".into()],
        },
    )
    .unwrap();
    randomise_ia3(&mut m, 3);
    // DoRA's magnitude away from ‖W‖ so the factor is not 1.
    m.for_each_param_mut(&mut |n, t| {
        if n.contains("lora_magnitude_vector") {
            tch::no_grad(|| t.copy_(&(&*t * 1.3)));
        }
        Ok(())
    })
    .unwrap();
    for names in [&["a"][..], &["dora"], &["ia3"], &["a", "dora", "ia3"]] {
        set_adapter(&mut m, names).unwrap();
        let unmerged = run(&m, &inp.ids, &inp.mask);
        assert!(max_abs(&unmerged, &plain) > 1e-3, "{names:?} does nothing");
        merge_adapter(&mut m, &[], true).unwrap();
        let merged = run(&m, &inp.ids, &inp.mask);
        let e = max_abs(&merged, &unmerged);
        assert!(e < scaled(TOL), "{names:?}: merged vs unmerged {e:e}");
        assert!(unmerge_adapter(&mut m).unwrap() > 0);
        for ((n, t0), (_, t1)) in w0.iter().zip(
            weights(&m)
                .iter()
                .filter(|(n, _)| w0.iter().any(|(k, _)| k == n)),
        ) {
            let e = max_abs(t0, t1);
            assert!(e < scaled(1e-6), "{names:?}: unmerge left {n} off by {e:e}");
        }
    }
}

#[test]
fn several_active_adapters_add_their_changes() {
    let inp = Inputs::load();
    let mut m = base_model();
    let base = run(&m, &inp.ids, &inp.mask);
    add_lora(&mut m, "a", &lora(4, &["query"], LoraInit::Random, 1)).unwrap();
    add_lora(&mut m, "b", &lora(2, &["query"], LoraInit::Random, 2)).unwrap();
    // Compare layer outputs (the adapted Linear itself), where deltas add exactly.
    let q = "encoder.layer.0.attention.self.query";
    let x = randn_seeded(&[3, 5, 32], 0, device()).unwrap();
    let out = |m: &model_zoo::bert::BertModel| {
        let mut ctx = tensor_core::Context::eval();
        m.get(q).unwrap().forward(&x, &mut ctx).unwrap()
    };
    set_adapter(&mut m, &["a"]).unwrap();
    let ya = out(&m);
    set_adapter(&mut m, &["b"]).unwrap();
    let yb = out(&m);
    set_adapter(&mut m, &["a", "b"]).unwrap();
    let yab = out(&m);
    disable_adapters(&mut m).unwrap();
    let y0 = out(&m);
    // Exact on any device: disabled adapters leave the base forward itself.
    assert!(
        run(&m, &inp.ids, &inp.mask).equal(&base),
        "disabled adapters changed the output"
    );
    enable_adapters(&mut m).unwrap();
    let e = max_abs(&yab, &(&ya + &yb - &y0));
    assert!(e < scaled(TOL), "base + Δa + Δb: {e:e}");
}

#[test]
fn safe_merge_refuses_nan_and_leaves_every_weight_untouched() {
    let mut m = base_model();
    add_lora(
        &mut m,
        "a",
        &lora(4, &["query", "value"], LoraInit::Random, 1),
    )
    .unwrap();
    let w0 = weights(&m);
    m.for_each_param_mut(&mut |n, t| {
        if n == "encoder.layer.1.attention.self.value.lora_B.a.weight" {
            tch::no_grad(|| {
                let _ = t.fill_(f64::NAN);
            });
        }
        Ok(())
    })
    .unwrap();
    let e = merge_adapter(&mut m, &["a"], true).unwrap_err();
    assert!(
        matches!(&e, Error::Tensor(tensor_core::Error::NonFiniteMerge { path, .. }) if path.contains("layer.1")),
        "{e}"
    );
    for ((n, a), (_, b)) in w0.iter().zip(weights(&m)) {
        if !n.contains("lora_") {
            assert!(a.equal(&b), "{n} changed by a refused merge");
        }
    }
    assert!(pet_core::merged_adapters(&m).is_empty());
}

#[test]
fn lifo_unmerge_delete_and_unload() {
    let inp = Inputs::load();
    let mut m = base_model();
    let names0: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let base = run(&m, &inp.ids, &inp.mask);
    add_lora(&mut m, "a", &lora(4, &["query"], LoraInit::Random, 1)).unwrap();
    add_lora(
        &mut m,
        "b",
        &lora(4, &["query", "key"], LoraInit::Random, 2),
    )
    .unwrap();
    set_adapter(&mut m, &["a", "b"]).unwrap();
    let both = run(&m, &inp.ids, &inp.mask);
    merge_adapter(&mut m, &["a"], true).unwrap();
    merge_adapter(&mut m, &["b"], true).unwrap();
    assert_eq!(pet_core::merged_adapters(&m), vec!["a", "b"]);
    assert!(max_abs(&run(&m, &inp.ids, &inp.mask), &both) < scaled(TOL));
    // A merged adapter cannot be deleted, disabled or used in a mixed batch
    // (refused before any tensor is made).
    assert!(matches!(delete_adapter(&mut m, "a"), Err(Error::State(_))));
    assert!(disable_adapters(&mut m).is_err());
    assert!(pet_core::mixed_batch(&m, &["a"], tch::Device::Cpu).is_err());
    unmerge_adapter(&mut m).unwrap();
    delete_adapter(&mut m, "a").unwrap();
    assert_eq!(adapter_names(&m), vec!["b"]);
    delete_adapter(&mut m, "b").unwrap();
    let names1: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names0, names1,
        "deleting every adapter gives the plain module tree back"
    );
    assert!(max_abs(&run(&m, &inp.ids, &inp.mask), &base) < scaled(1e-6));
    // merge_and_unload: plain Linear layers computing the adapted function.
    add_lora(&mut m, "c", &lora(4, &["value"], LoraInit::Random, 3)).unwrap();
    let with_c = run(&m, &inp.ids, &inp.mask);
    merge_and_unload(&mut m, true).unwrap();
    assert!(adapter_names(&m).is_empty());
    let names2: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names0, names2);
    assert!(max_abs(&run(&m, &inp.ids, &inp.mask), &with_c) < scaled(TOL));
}

#[test]
fn mixed_batch_rows_equal_single_adapter_runs() {
    let inp = Inputs::load();
    let mut m = base_model();
    add_lora(
        &mut m,
        "a",
        &lora(4, &["query", "value"], LoraInit::Random, 1),
    )
    .unwrap();
    add_lora(
        &mut m,
        "b",
        &lora(2, &["value", "intermediate.dense"], LoraInit::Random, 2),
    )
    .unwrap();
    add_ia3(
        &mut m,
        "c",
        &Ia3Config {
            target_modules: vec!["key".into(), "output.dense".into()],
            feedforward_modules: vec!["1.output.dense".into()],
        },
    )
    .unwrap();
    randomise_ia3(&mut m, 4);
    let mut gated = lora(4, &["key"], LoraInit::Random, 5);
    gated.gate = Some(pet_core::GateConfig::new(pet_core::Granularity::MiddleX));
    add_lora(&mut m, "g", &gated).unwrap();
    // Four copies of the two fixture rows, each naming an adapter or the base.
    let ids = Tensor::cat(&[&inp.ids, &inp.ids, &inp.ids, &inp.ids, &inp.ids], 0);
    let mask = Tensor::cat(&[&inp.mask, &inp.mask, &inp.mask, &inp.mask, &inp.mask], 0);
    let names = [
        "a", "b", "__base__", "c", "g", "a", "c", "__base__", "b", "g",
    ];
    let mixed = run_mixed(&m, &ids, &mask, &names);
    for (i, n) in names.iter().enumerate() {
        let single = if *n == "__base__" {
            disable_adapters(&mut m).unwrap();
            let y = run(&m, &ids, &mask);
            enable_adapters(&mut m).unwrap();
            y
        } else {
            set_adapter(&mut m, &[n]).unwrap();
            run(&m, &ids, &mask)
        };
        let e = max_abs(&mixed.get(i as i64), &single.get(i as i64));
        assert!(e < scaled(TOL), "row {i} ({n}): {e:e}");
    }
    // Unknown names are refused before the forward (and before any tensor is made).
    let e = pet_core::mixed_batch(&m, &["a", "zzz"], tch::Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("zzz"), "{e}");
}

#[test]
fn trainable_report_and_freezing() {
    let mut m = base_model();
    let total0 = m.param_count().total;
    let rep = add_lora(
        &mut m,
        "a",
        &lora(4, &["query", "value"], LoraInit::Kaiming, 0),
    )
    .unwrap();
    // 2 layers × 2 targets × (4·32 + 32·4)
    assert_eq!(rep.params, 2 * 2 * (4 * 32 + 32 * 4));
    assert_eq!(rep.paths.len(), 4);
    mark_only_adapters_trainable(&mut m, &[], &[]);
    let r = trainable_report(&m);
    assert_eq!(r.trainable, rep.params);
    assert_eq!(r.total, total0 + rep.params);
    assert_eq!(r.per_adapter["a"], rep.params);
    assert!((r.percent() - 100.0 * rep.params as f64 / (total0 + rep.params) as f64).abs() < 1e-12);
    assert!(r.to_string().contains("trainable%"));
    for (n, t) in m.named_parameters() {
        assert_eq!(t.requires_grad(), n.contains(".lora_"), "{n}");
    }
}

#[test]
fn bad_configs_are_clear_errors() {
    let mut m = base_model();
    let e = add_lora(&mut m, "a", &LoraConfig::new(0, 8.0, &["query"])).unwrap_err();
    assert!(e.to_string().contains("rank"), "{e}");
    let e = add_lora(&mut m, "a", &LoraConfig::new(4, 8.0, &["qurey"])).unwrap_err();
    assert!(
        matches!(&e, Error::Tensor(tensor_core::Error::NoTarget { .. }))
            && e.to_string().contains("attention.self.query"),
        "{e}"
    );
    let e = add_lora(&mut m, "a.b", &LoraConfig::new(4, 8.0, &["query"])).unwrap_err();
    assert!(e.to_string().contains("'.'"), "{e}");
    add_lora(&mut m, "a", &LoraConfig::new(4, 8.0, &["query"])).unwrap();
    assert!(matches!(
        add_lora(&mut m, "a", &LoraConfig::new(4, 8.0, &["value"])),
        Err(Error::Tensor(tensor_core::Error::DuplicateAdapter(_)))
    ));
    let e = set_adapter(&mut m, &["nope"]).unwrap_err();
    assert!(
        e.to_string().contains("nope") && e.to_string().contains("a"),
        "{e}"
    );
    let mut cfg = LoraConfig::new(4, 8.0, &["query"]);
    cfg.rank_pattern.insert("value".into(), 0);
    assert!(add_lora(&mut m, "b", &cfg).is_err());
    let mut cfg = LoraConfig::new(4, 8.0, &["query"]);
    cfg.dropout = 1.5;
    assert!(add_lora(&mut m, "b", &cfg).is_err());
    // A LoRA on a non-Linear path is refused with the module named.
    assert!(adapter_names(&m) == vec!["a"]);
}

#[test]
fn gradients_reach_only_trainable_adapter_parameters() {
    let inp = Inputs::load();
    let mut m = base_model();
    add_lora(
        &mut m,
        "a",
        &lora(4, &["query", "value"], LoraInit::Kaiming, 0),
    )
    .unwrap();
    mark_only_adapters_trainable(&mut m, &[], &[]);
    let mut ctx = tensor_core::Context::train();
    ctx.attention_mask = Some(inp.mask.shallow_clone());
    let y = tensor_core::Module::forward(&m, &inp.ids, &mut ctx).unwrap();
    y.pow_tensor_scalar(2).sum(None).backward();
    for (n, t) in m.named_parameters() {
        let g = t.grad();
        if n.contains("lora_A") {
            // B = 0 at init, so A's gradient is 0 (as in PEFT) while B's is not.
            assert!(g.defined());
        } else if n.contains("lora_B") {
            assert!(
                g.abs().sum(None).double_value(&[]) > 0.0,
                "{n} has no gradient"
            );
        } else {
            assert!(!g.defined(), "frozen {n} got a gradient");
        }
    }
}

/// Every wrapper pet-core puts into a model (LoRA, DoRA, IA3 on one
/// `Linear`; bottleneck and VL-PET sites) keeps the module contract, and
/// unloading gives back the plain tree.
#[test]
fn adapted_models_keep_the_module_contract() {
    use tensor_core::contract::check_contract;
    let mut m = base_model();
    let plain = check_contract(&mut m).unwrap();
    add_lora(
        &mut m,
        "a",
        &lora(4, &["query", "value"], LoraInit::Random, 1),
    )
    .unwrap();
    let mut dora = lora(2, &["query"], LoraInit::Random, 2);
    dora.use_dora = true;
    add_lora(&mut m, "d", &dora).unwrap();
    add_ia3(
        &mut m,
        "i",
        &Ia3Config {
            target_modules: vec!["key".into(), "output.dense".into()],
            feedforward_modules: vec!["layer.0.output.dense".into()],
        },
    )
    .unwrap();
    let adapters = pet_core::bottleneck::AdapterConfig {
        r: 8,
        target_modules: vec!["(ffn)".into()],
        ..Default::default()
    };
    pet_core::add_adapter(&mut m, "b", &adapters, 32).unwrap();
    let adapted = check_contract(&mut m).unwrap();
    assert!(adapted.parameters > plain.parameters, "{adapted:?}");
    assert!(adapted.modules > plain.modules, "{adapted:?}");
    pet_core::delete_adapter(&mut m, "b").unwrap();
    merge_and_unload(&mut m, true).unwrap();
    assert_eq!(check_contract(&mut m).unwrap(), plain);

    let mut v = base_model();
    let mut cfg = pet_core::VlPetConfig::with_granularity(pet_core::Granularity::MiddleY);
    cfg.r = 8;
    cfg.heads = 4;
    pet_core::apply_vlpet(&mut v, "vl", &cfg, 32).unwrap();
    assert!(check_contract(&mut v).unwrap().parameters > plain.parameters);
}
