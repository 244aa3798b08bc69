//! Orthogonal adapters in a real model (a tiny random BERT from model-zoo):
//! PEFT names, zero start, only the trained factor learns, removal restores
//! the model, ⟨ΔW_i, ΔW_j⟩_F = 0, summing keeps each concept's output on its
//! own input subspace, PEFT-style files round-trip and are checked against
//! the base model, merging saved adapters equals running them together,
//! least squares on recorded features.

mod common;

use common::{batch, fake_train, is_wrapped, max_abs, run, scaled, tiny_bert, tiny_config};
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use orthogonal_merge::{
    AdapterConfig, BasisKind, Error, FrozenSide, MergeConfig, Method, Registry, SaveOptions,
    adapter_names, add_lora, add_orthogonal, apply_merged, interference, load_adapter,
    load_saved_modules, mark_only_trainable, merge, merge_adapters_into, merge_and_unload,
    merge_with_features, read_adapter, record_features, remove_adapter, save_adapter,
    set_adapters_enabled, task_delta, unapply_merged,
};
use tensor_core::DType;
use tensor_core::module::{Context, Module, ModuleExt};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, device, tolerances, with_seed};

const Q: &str = "encoder.layer.0.attention.self.query";

fn registry<M: ModuleExt>(
    model: &M,
    side: FrozenSide,
    targets: &[&str],
    concepts: &[&str],
) -> Registry {
    let mut r = Registry::for_model(model, targets, BasisKind::QrBins, 11, 4, side).unwrap();
    for c in concepts {
        r.claim(c).unwrap();
    }
    r
}

#[test]
fn adapters_have_peft_names_start_at_zero_and_train_one_factor() {
    let mut m = tiny_bert(0);
    let (ids, mask) = batch();
    let base = run(&m, &ids, &mask);
    let names0: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let reg = registry(&m, FrozenSide::Output, &["query", "value"], &["a", "b"]);
    let rep = add_orthogonal(&mut m, "a", &reg, &AdapterConfig::new(&["query", "value"])).unwrap();
    assert_eq!(rep.paths.len(), 4);
    assert_eq!(rep.trainable, 4 * 4 * 16);
    // The adapted layers keep the module contract.
    tensor_core::contract::check_contract(&mut m).unwrap();
    assert_eq!(rep.frozen, 4 * 16 * 4);
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&format!("{Q}.weight")));
    assert!(names.contains(&format!("{Q}.lora_A.a.weight")));
    assert!(names.contains(&format!("{Q}.lora_B.a.weight")));
    // Exact on any device: the adapted forward adds an exact zero to the same matmul.
    assert_eq!(
        max_abs(&run(&m, &ids, &mask), &base),
        0.0,
        "a zero trained factor changes nothing"
    );
    // Only the trained factor (A, with the output side frozen) and the globs are trainable.
    let n = mark_only_trainable(&mut m, &[], &["embeddings.word_embeddings.*"]);
    assert_eq!(n, 4 + 1);
    let trainable: Vec<String> = m
        .trainable_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(trainable.contains(&format!("{Q}.lora_A.a.weight")));
    assert!(!trainable.contains(&format!("{Q}.lora_B.a.weight")));
    // The gradient reaches A and never the frozen basis, even when a glob marks it trainable.
    m.set_trainable("*.lora_B.*", true);
    let mut ctx = Context::train();
    ctx.attention_mask = Some(mask.shallow_clone());
    let y = m.forward(&ids, &mut ctx).unwrap();
    (y * Tensor::from(0.5f32))
        .square()
        .sum(Kind::Float)
        .backward();
    for (n, t) in m.named_parameters() {
        if n.contains(".lora_A.a.") {
            assert!(
                t.grad().defined() && t.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0,
                "{n}"
            );
        }
        if n.contains(".lora_B.a.") {
            assert!(!t.grad().defined(), "{n}: the frozen basis got a gradient");
        }
    }
    // The frozen factor is the registry's bin (bases are computed on the host).
    let lin = m.get_as::<orthogonal_merge::AdaptedLinear>(Q).unwrap();
    let want = reg.spec.block(Q, 16, 0, Kind::Float, Device::Cpu).unwrap();
    assert_close(
        &lin.get_as::<orthogonal_merge::OrthoAdapter>("a").unwrap().b,
        &want,
        0.0,
        0.0,
    );
    // Removing the adapter restores the model.
    remove_adapter(&mut m, "a").unwrap();
    assert!(!is_wrapped(&m, Q));
    let back: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(back, names0);
}

#[test]
fn plain_lora_control_trains_both_factors() {
    let mut m = tiny_bert(0);
    add_lora(
        &mut m,
        "ctl",
        4,
        &AdapterConfig::new(&["value"]).with_alpha(8.0),
    )
    .unwrap();
    assert_eq!(mark_only_trainable(&mut m, &["ctl"], &[]), 4);
    let t = task_delta(&m, "ctl").unwrap();
    assert!(t.meta.as_ref().unwrap().orthogonal.is_none());
    let orthogonal_merge::Delta::Lora(l) = &t.layers["encoder.layer.1.attention.self.value"] else {
        panic!()
    };
    assert_eq!(l.scale, 2.0);
    assert!(l.a.abs().max().double_value(&[]) > 0.0);
    assert_eq!(l.b.abs().max().double_value(&[]), 0.0);
}

#[test]
fn orthogonal_deltas_do_not_interfere() {
    let mut m = tiny_bert(0);
    let targets = ["query", "key", "value", "dense"];
    let reg = registry(&m, FrozenSide::Output, &targets, &["a", "b", "c"]);
    for (i, c) in ["a", "b", "c"].iter().enumerate() {
        add_orthogonal(&mut m, c, &reg, &AdapterConfig::new(&targets)).unwrap();
        fake_train(&mut m, c, 100 * i as u64);
    }
    let tasks: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|c| task_delta(&m, c).unwrap())
        .collect();
    let rep = interference(&tasks).unwrap();
    assert_eq!(rep.layers.len(), 12);
    assert!(rep.mean_abs_cosine() < 1e-6, "{rep}");
    assert!(rep.max_abs_cosine().unwrap().3 < 1e-5, "{rep}");
    // The frozen (output) sides are orthogonal; the trained input sides are not.
    assert!(rep.mean_output_overlap().unwrap() < 1e-10, "{rep}");
    assert!(rep.mean_input_overlap().unwrap() > 0.05, "{rep}");
    // Plain LoRA adapters with random factors do interfere.
    let mut p = tiny_bert(0);
    for (i, c) in ["x", "y"].iter().enumerate() {
        add_lora(
            &mut p,
            c,
            4,
            &AdapterConfig {
                seed: i as u64,
                ..AdapterConfig::new(&targets)
            },
        )
        .unwrap();
        fake_train(&mut p, c, 7 + i as u64);
    }
    let plain: Vec<_> = ["x", "y"]
        .iter()
        .map(|c| task_delta(&p, c).unwrap())
        .collect();
    let rp = interference(&plain).unwrap();
    assert!(rp.mean_output_overlap().unwrap() > 0.1, "{rp}");
    assert!(rp.to_string().contains("x") && rp.to_string().contains("mean |cos|"));
}

#[test]
fn the_orthogonal_sum_keeps_each_concept_on_its_input_subspace() {
    // Input side frozen: ΔW_j B_i = 0, so W x for x ∈ span(B_i) is W0 x + ΔW_i x.
    let dev = device();
    let (atol, rtol) = tolerances(DType::F32, dev);
    let mut m = tiny_bert(0);
    let targets = ["query", "value", "intermediate.dense", "output.dense"];
    let concepts = ["a", "b", "c"];
    let reg = registry(&m, FrozenSide::Input, &targets, &concepts);
    for (i, c) in concepts.iter().enumerate() {
        add_orthogonal(
            &mut m,
            c,
            &reg,
            &AdapterConfig::new(&targets).with_alpha(8.0),
        )
        .unwrap();
        fake_train(&mut m, c, 1000 + i as u64);
    }
    let tasks: Vec<_> = concepts
        .iter()
        .map(|c| task_delta(&m, c).unwrap())
        .collect();
    let merged = merge(&tasks, &MergeConfig::new(Method::Sum)).unwrap();
    let mut plain = tiny_bert(0);
    let w0: Vec<(String, Tensor)> = tasks[0]
        .layers
        .keys()
        .map(|l| {
            (
                l.clone(),
                orthogonal_merge::target::base_linear(&plain, l)
                    .unwrap()
                    .weight
                    .copy(),
            )
        })
        .collect();
    // PEFT's suffix rule: "output.dense" also matches attention.output.dense.
    assert_eq!(apply_merged(&mut plain, &merged).unwrap(), 10);
    for (l, w0) in &w0 {
        let w = &orthogonal_merge::target::base_linear(&plain, l)
            .unwrap()
            .weight;
        let n = w.size()[1];
        for (i, c) in concepts.iter().enumerate() {
            let bi = reg
                .spec
                .block(l, n, reg.bin(c).unwrap(), Kind::Float, dev)
                .unwrap();
            let x = bi.mm(&common::randn(&[4, 5], i as u64)); // 5 inputs in span(B_i)
            let alone = w0.mm(&x) + tasks[i].layers[l].weight().unwrap().mm(&x);
            assert_close(&w.mm(&x), &alone, atol, rtol);
        }
    }
    // Undoing the merge restores the base (up to rounding).
    unapply_merged(&mut plain, &merged).unwrap();
    for (l, w0) in &w0 {
        let w = &orthogonal_merge::target::base_linear(&plain, l)
            .unwrap()
            .weight;
        assert_close(w, w0, 1e-6, 1e-5);
    }
}

#[test]
fn files_round_trip_and_are_checked_against_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, mask) = batch();
    let clf = |seed| {
        with_seed(seed, || {
            SequenceClassifier::new(tiny_bert(0), 3, Pooling::Mean)
        })
        .unwrap()
    };
    let mut m = clf(1);
    // Built on the model that is trained (paths `bert.encoder.…`).
    let reg = registry(&m, FrozenSide::Output, &["query", "value"], &["a"]);
    add_orthogonal(
        &mut m,
        "a",
        &reg,
        &AdapterConfig::new(&["query", "value"]).with_alpha(2.0),
    )
    .unwrap();
    fake_train(&mut m, "a", 5);
    let want = run(&m, &ids, &mask);
    let opts = SaveOptions {
        modules_to_save: vec!["classifier".into()],
        base_model_name_or_path: Some("tiny".into()),
    };
    save_adapter(&m, "a", dir.path(), &opts).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 2.0);
    assert_eq!(cfg["modular_orthogonal"]["concept"], "a");
    assert_eq!(cfg["modular_orthogonal"]["orthogonal"]["bin"], 0);
    assert_eq!(
        cfg["modular_orthogonal"]["orthogonal"]["frozen_side"],
        "output"
    );
    assert_eq!(cfg["modular_orthogonal"]["orthogonal"]["basis"], "qr_bins");
    let st = tensor_core::io::SafetensorsFile::open(dir.path().join("adapter_model.safetensors"))
        .unwrap();
    assert!(st.contains(&format!("base_model.model.bert.{Q}.lora_A.weight")));
    assert!(st.contains("base_model.model.classifier.weight"));
    // Into a fresh classifier (another head): same outputs once the head is copied.
    let mut fresh = clf(2);
    let rep = load_adapter(&mut fresh, "a", dir.path()).unwrap();
    assert_eq!(rep.paths.len(), 4);
    let file = read_adapter(dir.path(), None).unwrap();
    assert_eq!(file.task.name, "a");
    assert_eq!(load_saved_modules(&mut fresh, &file).unwrap(), 2);
    // Exact on any device: the same weights (bitwise, through the file) and the same kernels.
    assert_eq!(max_abs(&run(&fresh, &ids, &mask), &want), 0.0);
    // The loaded adapter keeps its basis frozen.
    mark_only_trainable(&mut fresh, &[], &[]);
    let tr: Vec<String> = fresh
        .trainable_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(tr.iter().all(|n| n.contains(".lora_A.a.")), "{tr:?}");
    // A NaN or Inf in either factor (or in a saved module) is refused by the
    // reader, naming the file and the tensor, before any merge sees it.
    for (key, poison) in [
        (format!("base_model.model.bert.{Q}.lora_A.weight"), f64::NAN),
        (
            format!("base_model.model.bert.{Q}.lora_B.weight"),
            f64::INFINITY,
        ),
        ("base_model.model.classifier.weight".to_owned(), f64::NAN),
    ] {
        let bad = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join("adapter_config.json"),
            bad.path().join("adapter_config.json"),
        )
        .unwrap();
        let w = bad.path().join("adapter_model.safetensors");
        let mut tensors =
            tensor_core::io::load(dir.path().join("adapter_model.safetensors"), Device::Cpu)
                .unwrap();
        for (k, t) in tensors.iter_mut() {
            if *k == key {
                *t = t.index_fill(0, &Tensor::from_slice(&[0i64]), poison);
            }
        }
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tensor_core::io::save(&w, &refs, None).unwrap();
        let e = read_adapter(bad.path(), None).unwrap_err().to_string();
        assert!(
            e.contains("adapter_model.safetensors") && e.contains(&key) && e.contains("non-finite"),
            "{e}"
        );
    }
    // target_modules must name exactly the modules the file adapts.
    let cfg_text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    for (edit, needle) in [
        ("add", "matches none of the modules"),
        ("drop", "which target_modules"),
    ] {
        let bad = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join("adapter_model.safetensors"),
            bad.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
        let list = cfg["target_modules"].as_array_mut().unwrap();
        if edit == "add" {
            list.push("nonexistent".into());
        } else {
            list.remove(0);
        }
        std::fs::write(bad.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = read_adapter(bad.path(), None).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(needle),
            "{edit}: {e}"
        );
    }
    // Loading twice under one name, into another base, or into other shapes fails clearly.
    assert!(matches!(
        load_adapter(&mut fresh, "a", dir.path()),
        Err(Error::Tensor(tensor_core::Error::DuplicateAdapter(_)))
    ));
    let mut other = with_seed(9, || {
        SequenceClassifier::new(tiny_bert(9), 3, Pooling::Mean)
    })
    .unwrap();
    let e = load_adapter(&mut other, "a", dir.path()).unwrap_err();
    assert!(e.to_string().contains("another base model"), "{e}");
    assert!(
        adapter_names(&other).is_empty(),
        "a failed load changes nothing"
    );
    let mut c = tiny_config();
    c.hidden_size = 8;
    c.intermediate_size = 16;
    // Refused on shapes alone: nothing is computed.
    let mut narrow = with_seed(31, || {
        SequenceClassifier::new(
            BertModel::new(c, false, Device::Cpu).unwrap(),
            3,
            Pooling::Mean,
        )
    })
    .unwrap();
    let e = load_adapter(&mut narrow, "a", dir.path()).unwrap_err();
    assert!(
        matches!(e, Error::Mismatch(_)) && e.to_string().contains("[16, 16]"),
        "{e}"
    );
}

#[test]
fn merging_saved_adapters_equals_running_them_together() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, mask) = batch();
    let targets = ["query", "key", "value", "dense"];
    let mut m = tiny_bert(0);
    let reg = registry(&m, FrozenSide::Output, &targets, &["a", "b", "c"]);
    for (i, c) in ["a", "b", "c"].iter().enumerate() {
        add_orthogonal(&mut m, c, &reg, &AdapterConfig::new(&targets)).unwrap();
        fake_train(&mut m, c, 50 + i as u64);
        save_adapter(&m, c, dir.path().join(c), &SaveOptions::default()).unwrap();
    }
    let together = run(&m, &ids, &mask);
    // Folding them into the weights gives the same.
    let mut folded = tiny_bert(0);
    for c in ["a", "b", "c"] {
        load_adapter(&mut folded, c, dir.path().join(c)).unwrap();
    }
    assert!(max_abs(&run(&folded, &ids, &mask), &together) < scaled(1e-5));
    assert_eq!(merge_and_unload(&mut folded).unwrap(), 12);
    assert!(!is_wrapped(&folded, Q));
    assert!(max_abs(&run(&folded, &ids, &mask), &together) < scaled(1e-5));
    // merge_adapters_into a fresh base: the same, with an interference report.
    let mut fresh = tiny_bert(0);
    let dirs: Vec<_> = ["a", "b", "c"].iter().map(|c| dir.path().join(c)).collect();
    let rep = merge_adapters_into(&mut fresh, &dirs, &MergeConfig::new(Method::Sum)).unwrap();
    assert_eq!(rep.tasks, vec!["a", "b", "c"]);
    assert!(rep.interference.mean_abs_cosine() < 1e-6);
    assert!(max_abs(&run(&fresh, &ids, &mask), &together) < scaled(1e-5));
    // Disabling adapters gives the base back (exactly, on any device: the base forward itself).
    set_adapters_enabled(&mut m, false).unwrap();
    assert_eq!(
        max_abs(&run(&m, &ids, &mask), &run(&tiny_bert(0), &ids, &mask)),
        0.0
    );
}

#[test]
fn adding_errors_name_the_problem() {
    let mut m = tiny_bert(0);
    let reg = registry(&m, FrozenSide::Output, &["query"], &["a"]);
    let e = add_orthogonal(&mut m, "zz", &reg, &AdapterConfig::new(&["query"])).unwrap_err();
    assert!(matches!(e, Error::UnknownConcept { .. }), "{e}");
    let e = add_orthogonal(&mut m, "a", &reg, &AdapterConfig::new(&["nothing"])).unwrap_err();
    assert!(
        matches!(e, Error::Tensor(tensor_core::Error::NoTarget { .. }))
            && e.to_string().contains("attention.self.query"),
        "{e}"
    );
    add_orthogonal(&mut m, "a", &reg, &AdapterConfig::new(&["query"])).unwrap();
    assert!(matches!(
        add_orthogonal(&mut m, "a", &reg, &AdapterConfig::new(&["query"])),
        Err(Error::Tensor(tensor_core::Error::DuplicateAdapter(_)))
    ));
    assert!(matches!(
        remove_adapter(&mut m, "zz"),
        Err(Error::Tensor(tensor_core::Error::UnknownAdapter { .. }))
    ));
    assert!(add_lora(&mut m, "b", 0, &AdapterConfig::new(&["query"])).is_err());
}

#[test]
fn least_squares_on_recorded_features() {
    let (ids, mask) = batch();
    let targets = ["query", "value"];
    let mut m = tiny_bert(0);
    let reg = registry(&m, FrozenSide::Output, &targets, &["a", "b"]);
    for (i, c) in ["a", "b"].iter().enumerate() {
        add_orthogonal(&mut m, c, &reg, &AdapterConfig::new(&targets)).unwrap();
        fake_train(&mut m, c, 70 + i as u64);
    }
    let tasks: Vec<_> = ["a", "b"]
        .iter()
        .map(|c| task_delta(&m, c).unwrap())
        .collect();
    // Features of the base model's inputs to each target (padding excluded).
    let mut base = tiny_bert(0);
    let names0: Vec<String> = base
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let feats = record_features(&mut base, &targets, |model| {
        let _ = run(model, &ids, &mask);
        Ok(())
    })
    .unwrap();
    assert_eq!(
        names0,
        base.named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    );
    let g = &feats.layers[Q];
    assert_eq!(g.count, 30);
    assert_eq!(g.xtx.size(), [16, 16]);
    // Equal features for both tasks and a tiny ridge: on the recorded inputs,
    // least squares acts as ½(ΔW_a + ΔW_b) (the LayerNorm output has zero mean,
    // so G is singular along the ones direction, where the ridge decides).
    let grams: Vec<(String, Tensor)> = feats
        .layers
        .iter()
        .map(|(l, g)| (l.clone(), g.mean().unwrap()))
        .collect();
    let f2 = record_features(&mut base, &targets, |model| {
        let _ = run(model, &ids, &mask);
        Ok(())
    })
    .unwrap();
    let cfg = MergeConfig {
        ridge: 1e-9,
        ..MergeConfig::new(Method::LeastSquares)
    };
    let ls = merge_with_features(&tasks, &[feats, f2], &cfg).unwrap();
    let lin = merge(
        &tasks,
        &MergeConfig::new(Method::Linear).with_weights(&[0.5, 0.5]),
    )
    .unwrap();
    for (l, g) in &grams {
        let diff = (ls.layers[l].weight().unwrap() - lin.layers[l].weight().unwrap())
            .to_kind(Kind::Double);
        let on_data = diff.mm(g).abs().max().double_value(&[]);
        assert!(on_data < scaled(1e-6), "{l}: {on_data:e}");
    }
    let e = merge_with_features(&tasks, &[], &cfg).unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
}

#[test]
fn a_registry_built_on_another_model_type_is_refused() {
    // Bases depend on layer paths: a registry of `encoder.…` paths does not
    // fit a classifier whose layers are `bert.encoder.…`.
    let bert = tiny_bert(0);
    let reg = registry(&bert, FrozenSide::Output, &["query"], &["a"]);
    let mut clf = with_seed(30, || {
        SequenceClassifier::new(tiny_bert(0), 2, Pooling::Mean)
    })
    .unwrap();
    let e = add_orthogonal(&mut clf, "a", &reg, &AdapterConfig::new(&["query"])).unwrap_err();
    assert!(e.to_string().contains("not in the registry"), "{e}");
    assert!(adapter_names(&clf).is_empty());
}

#[test]
fn saved_heads_must_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = with_seed(30, || {
        SequenceClassifier::new(tiny_bert(0), 3, Pooling::Mean)
    })
    .unwrap();
    let reg = registry(&m, FrozenSide::Output, &["query"], &["a"]);
    add_orthogonal(&mut m, "a", &reg, &AdapterConfig::new(&["query"])).unwrap();
    let opts = SaveOptions {
        modules_to_save: vec!["classifier".into()],
        ..SaveOptions::default()
    };
    save_adapter(&m, "a", dir.path(), &opts).unwrap();
    let file = read_adapter(dir.path(), None).unwrap();
    // A model without a classifier: a clear error, nothing changed.
    let mut bare = tiny_bert(0);
    let e = load_saved_modules(&mut bare, &file).unwrap_err();
    assert!(e.to_string().contains("classifier."), "{e}");
    // A head of another size: a shape error.
    let mut two = with_seed(30, || {
        SequenceClassifier::new(tiny_bert(0), 2, Pooling::Mean)
    })
    .unwrap();
    assert!(load_saved_modules(&mut two, &file).is_err());
}
