//! Converting a small model built from tensor-core layers (BERT-like paths
//! `encoder.layer.N.(ffn)`), tuning it, and folding it back.

use emergent_split::convert::{
    EmoeConfig, SplitStrategy, convert, convert_paths_with, convert_where, emoe_paths,
    every_other_in_last_half, ffn_paths, fold_back, layer_index, refresh_gates,
};
use emergent_split::error::Error;
use emergent_split::labels::save_labels;
use emergent_split::moe_ffn::{ComputePath, EmoeFfn};
use emergent_split::split::{ExpertSplit, SplitMethod, coactivation_split};
use emergent_split::{FoldB2, GateConfig, KMeansSolver, SelectSignal};
use tensor_core::layers::{Activation, FeedForward, FfnNames, LayerNorm, Linear};
use tensor_core::module::Sequential;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{closeness, device, randn_seeded, tolerances, with_seed};
use tensor_core::{Context, DType, Module, ModuleExt};

const D: i64 = 16;
const DFF: i64 = 64;

/// `encoder.layer.i` = [attention.output.dense (Linear), (ffn), output.LayerNorm].
fn model(layers: usize, gated: bool, seed: u64) -> Sequential {
    build(layers, gated, seed, DFF)
}

/// A plain model whose FFNs have `d_ff` neurons.
fn model_dff(layers: usize, seed: u64, d_ff: i64) -> Sequential {
    build(layers, false, seed, d_ff)
}

/// Built on the test device ([`device`]).
fn build(layers: usize, gated: bool, seed: u64, dff: i64) -> Sequential {
    let dev = device();
    with_seed(seed, || {
        let mut enc = Sequential::new();
        for i in 0..layers {
            let ffn = if gated {
                FeedForward::gated(D, dff, Activation::Silu, FfnNames::llama(), dev)
            } else {
                FeedForward::new(D, dff, Activation::Gelu, FfnNames::bert(), dev)
            }
            .unwrap();
            let layer = Sequential::new()
                .push_named(
                    "attention.output.dense",
                    Box::new(Linear::new(D, D, true, dev).unwrap()),
                )
                .push_named("(ffn)", Box::new(ffn))
                .push_named(
                    "output.LayerNorm",
                    Box::new(LayerNorm::new(D, 1e-12, true, dev).unwrap()),
                );
            enc = enc.push_named(&i.to_string(), Box::new(layer));
        }
        Sequential::new().push_named("encoder.layer", Box::new(enc))
    })
}

fn names(m: &dyn Module) -> Vec<String> {
    m.named_parameters().into_iter().map(|(n, _)| n).collect()
}

fn run(m: &dyn Module, x: &Tensor) -> Tensor {
    m.forward(x, &mut Context::eval()).unwrap()
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    closeness(a, b, 0.0, 0.0).unwrap().max_abs
}

/// A CPU bound for a result compared with one computed another way (the
/// dense model, before folding), loosened on the test device as
/// [`tolerances`] loosens f32 there.
fn scaled(bound: f64) -> f64 {
    bound * tolerances(DType::F32, device()).0 / DType::F32.tolerances().0
}

fn set_top_k_all(m: &mut dyn Module, k: Option<usize>) {
    for p in emoe_paths(m) {
        let e = m.get_as_mut::<EmoeFfn>(&p).unwrap();
        let k = k.unwrap_or(e.num_experts());
        e.set_top_k(k).unwrap();
    }
}

#[test]
fn layer_selection_helpers() {
    assert_eq!(layer_index("encoder.layer.7.(ffn)"), Some(7));
    assert_eq!(layer_index("h.11.(ffn)"), Some(11));
    assert_eq!(layer_index("(ffn)"), None);
    assert_eq!(every_other_in_last_half(12), vec![7, 9, 11]);
    assert_eq!(every_other_in_last_half(6), vec![3, 5]);
    assert_eq!(every_other_in_last_half(1), vec![0]);
    let m = model(4, false, 0);
    assert_eq!(
        ffn_paths(&m),
        (0..4)
            .map(|i| format!("encoder.layer.{i}.(ffn)"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn convert_chosen_layers_keeps_names_and_all_experts_keep_outputs() {
    for gated in [false, true] {
        let mut m = model(6, gated, 1);
        let before_names = names(&m);
        let x = randn_seeded(&[2, 5, D], 2, device()).unwrap();
        let dense = run(&m, &x);
        let layers = every_other_in_last_half(6);
        let r = convert(&mut m, &layers, &EmoeConfig::new(8, 2)).unwrap();
        // The expert FFNs keep the module contract.
        tensor_core::contract::check_contract(&mut m).unwrap();
        assert_eq!(r.layers.len(), 2);
        assert_eq!(r.layers[0].path, "encoder.layer.3.(ffn)");
        for l in &r.layers {
            assert_eq!(l.method, SplitMethod::KMeans);
            assert!(l.objective < l.random_objective, "{l:?}");
            assert!(l.kmeans_iterations >= 1);
        }
        assert_eq!(
            emoe_paths(&m),
            vec!["encoder.layer.3.(ffn)", "encoder.layer.5.(ffn)"]
        );
        assert_eq!(ffn_paths(&m).len(), 4);
        assert_eq!(names(&m), before_names);
        // k < N changes the output; k = N restores it, on the sparse path (eval).
        assert!(max_err(&run(&m, &x), &dense) > 1e-4);
        set_top_k_all(&mut m, None);
        assert!(max_err(&run(&m, &x), &dense) <= scaled(1e-5));
    }
}

#[test]
fn checkpoints_load_into_the_converted_model() {
    let dense = model(4, false, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let params = dense.named_parameters();
    let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tensor_core::io::save(&file, &refs, None).unwrap();

    let mut m = model(4, false, 99); // different weights
    convert(
        &mut m,
        &[1, 3],
        &EmoeConfig {
            split: SplitStrategy::Contiguous,
            ..EmoeConfig::new(4, 4)
        },
    )
    .unwrap();
    // Read on the CPU; `load_named` moves each value to its parameter's device.
    let missing = m
        .load_named(&tensor_core::io::load(&file, Device::Cpu).unwrap(), true)
        .unwrap();
    assert!(missing.is_empty());
    refresh_gates(&mut m).unwrap();
    let x = randn_seeded(&[7, D], 4, device()).unwrap();
    // Contiguous split = identity permutation, so the dense checkpoint is the split model's checkpoint.
    assert!(max_err(&run(&m, &x), &run(&dense, &x)) <= scaled(1e-5));
}

#[test]
fn fold_back_after_tuning_reproduces_the_tuned_model() {
    for fold_b2 in [FoldB2::Shared, FoldB2::KMean] {
        fold_back_case(fold_b2);
    }
}

/// Tune through the masked path, then fold: with every expert selected the
/// dense model computes what the tuned one did, for either `b2` bookkeeping.
fn fold_back_case(fold_b2: FoldB2) {
    let mut m = model(4, false, 5);
    let original: Vec<(String, Tensor)> = m
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let mut cfg = EmoeConfig {
        compute: ComputePath::Auto,
        ..EmoeConfig::new(8, 2)
    };
    cfg.gate.fold_b2 = fold_b2;
    convert(&mut m, &[2, 3], &cfg).unwrap();

    // Folding an untuned split returns the original weights (exactly when
    // b2 is shared; up to the rounding of k * (b2 / k) otherwise).
    {
        let mut copy = model(4, false, 5);
        convert(&mut copy, &[2, 3], &cfg).unwrap();
        assert_eq!(fold_back(&mut copy).unwrap().len(), 2);
        for ((n1, a), (n2, b)) in original.iter().zip(copy.named_parameters()) {
            assert_eq!(n1, &n2);
            match fold_b2 {
                FoldB2::Shared => assert!(a.equal(&b), "{n1} changed"),
                FoldB2::KMean => assert!(max_err(a, &b) <= 1e-6, "{n1} changed"),
            }
        }
    }

    // A few SGD steps through the masked (training) path, refreshing gates after each.
    let x = randn_seeded(&[4, 6, D], 6, device()).unwrap();
    let target = randn_seeded(&[4, 6, D], 7, device()).unwrap();
    for step in 0..3 {
        let mut ctx = Context::train();
        let y = with_seed(step, || m.forward(&x, &mut ctx).unwrap());
        let loss = y.f_sub(&target).unwrap().square().mean(Kind::Float);
        loss.backward();
        tensor_core::tch::no_grad(|| {
            for (_, mut p) in m.trainable_parameters() {
                let g = p.grad();
                if g.defined() {
                    let _ = p.f_sub_(&g.f_mul_scalar(0.1).unwrap()).unwrap();
                    p.zero_grad();
                }
            }
        });
        assert_eq!(refresh_gates(&mut m).unwrap(), 2);
    }
    let w_now = m.get("encoder.layer.2.(ffn)").unwrap().named_parameters()[0]
        .1
        .copy();
    let w_orig = original
        .iter()
        .find(|(n, _)| n == "encoder.layer.2.intermediate.dense.weight")
        .unwrap()
        .1
        .copy();
    assert!(!w_now.equal(&w_orig), "tuning changed nothing");

    set_top_k_all(&mut m, None);
    let tuned = run(&m, &x);
    let folded = fold_back(&mut m).unwrap();
    assert_eq!(
        folded,
        vec!["encoder.layer.2.(ffn)", "encoder.layer.3.(ffn)"]
    );
    assert!(emoe_paths(&m).is_empty());
    assert_eq!(ffn_paths(&m).len(), 4);
    assert_eq!(
        names(&m),
        original.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
    );
    assert!(m.named_parameters().iter().all(|(_, t)| t.requires_grad()));
    let dense = run(&m, &x);
    assert!(
        max_err(&dense, &tuned) <= scaled(1e-5),
        "{}",
        max_err(&dense, &tuned)
    );
}

#[test]
fn bad_requests_are_errors_and_leave_the_model_unchanged() {
    let mut m = model(4, false, 8);
    let x = randn_seeded(&[3, D], 9, device()).unwrap();
    let before = run(&m, &x);
    assert!(matches!(
        convert(&mut m, &[7], &EmoeConfig::new(4, 1)),
        Err(Error::UnknownLayer { layer: 7, .. })
    ));
    // N = 5 does not divide 64: nothing is converted.
    assert!(matches!(
        convert(&mut m, &[0, 1], &EmoeConfig::new(5, 1)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        convert(&mut m, &[0], &EmoeConfig::new(4, 0)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        convert(&mut m, &[0], &EmoeConfig::new(4, 5)),
        Err(Error::Config(_))
    ));
    let r = convert_paths_with(
        &mut m,
        &["encoder.layer.0.attention.output.dense".to_owned()],
        &EmoeConfig::new(4, 1),
        &mut |_, _| unreachable!(),
    );
    assert!(matches!(r, Err(Error::WrongModule { .. })));
    let r = convert_paths_with(
        &mut m,
        &["encoder.layer.9.(ffn)".to_owned()],
        &EmoeConfig::new(4, 1),
        &mut |_, _| unreachable!(),
    );
    assert!(matches!(r, Err(Error::Tensor(_))), "{r:?}");
    assert!(emoe_paths(&m).is_empty());
    assert!(max_err(&run(&m, &x), &before) == 0.0);
    // No EmoeFfn: folding is a no-op.
    assert!(fold_back(&mut m).unwrap().is_empty());
}

#[test]
fn moefication_coactivation_split_through_convert() {
    // Profile layer 1's hidden activations, split by co-activation, convert.
    let mut m = model(2, false, 10);
    let x = randn_seeded(&[64, D], 11, device()).unwrap();
    let path = "encoder.layer.1.(ffn)".to_owned();
    let acts = {
        let ffn = m.get_as::<FeedForward>(&path).unwrap();
        ffn.hidden(&x, &mut Context::eval()).unwrap()
    };
    let r = convert_paths_with(
        &mut m,
        std::slice::from_ref(&path),
        &EmoeConfig::new(4, 4),
        &mut |_, _| coactivation_split(&acts, 4, 0),
    )
    .unwrap();
    assert_eq!(r.layers[0].method, SplitMethod::CoActivation);
    let e = m.get_as::<EmoeFfn>(&path).unwrap();
    assert_eq!(e.split().method, SplitMethod::CoActivation);
    // Predicate selection.
    let r = convert_where(
        &mut m,
        &mut |p| p.contains(".0."),
        &EmoeConfig {
            split: SplitStrategy::Random { seed: 3 },
            ..EmoeConfig::new(2, 1)
        },
    )
    .unwrap();
    assert_eq!(r.layers.len(), 1);
    assert_eq!(r.layers[0].method, SplitMethod::Random);
}

#[test]
fn labels_from_file_reproduce_a_cached_split() {
    // Split with k-means, cache the labels, convert a fresh copy from the file.
    let mut a = model(4, false, 12);
    let cfg = EmoeConfig::new(8, 2);
    convert(&mut a, &[1, 3], &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in ["labels.json", "labels.safetensors"] {
        let file = dir.path().join(name);
        let splits: Vec<(String, ExpertSplit)> = emoe_paths(&a)
            .into_iter()
            .map(|p| {
                let s = a.get_as::<EmoeFfn>(&p).unwrap().split().clone();
                (layer_index(&p).unwrap().to_string(), s)
            })
            .collect();
        let refs: Vec<(String, &ExpertSplit)> =
            splits.iter().map(|(k, s)| (k.clone(), s)).collect();
        save_labels(&file, &refs).unwrap();

        // Through the JSON config, as a run would read it.
        let json = format!(
            r#"{{"gate": {{"num_experts": 8, "top_k": 2}}, "split": "contiguous", "labels_from_file": {}}}"#,
            serde_json::to_string(&file).unwrap()
        );
        let from_file = EmoeConfig::from_json(&json).unwrap();
        assert_eq!(from_file.labels_from_file.as_deref(), Some(file.as_path()));
        let mut b = model(4, false, 12);
        let r = convert(&mut b, &[1, 3], &from_file).unwrap();
        assert!(r.layers.iter().all(|l| l.method == SplitMethod::FromFile));
        for p in emoe_paths(&a) {
            let (ea, eb) = (
                a.get_as::<EmoeFfn>(&p).unwrap(),
                b.get_as::<EmoeFfn>(&p).unwrap(),
            );
            assert_eq!(ea.split().labels, eb.split().labels);
            assert_eq!(ea.permutation(), eb.permutation());
        }
        let x = randn_seeded(&[5, D], 13, device()).unwrap();
        assert_eq!(max_err(&run(&a, &x), &run(&b, &x)), 0.0);

        // A layer the file does not hold: an error naming it, the model untouched.
        let mut c = model(4, false, 12);
        let before = run(&c, &x);
        let e = convert(&mut c, &[0, 1], &from_file).unwrap_err();
        assert!(matches!(e, Error::Labels { .. }), "{e}");
        assert!(e.to_string().contains("layer 0"), "{e}");
        assert!(emoe_paths(&c).is_empty());
        assert_eq!(max_err(&run(&c, &x), &before), 0.0);

        // The wrong N or d_ff.
        let mut wrong_n = from_file.clone();
        wrong_n.gate = GateConfig::new(4, 2);
        assert!(matches!(
            convert(&mut c, &[1], &wrong_n),
            Err(Error::Labels { .. })
        ));
        let mut wide = model_dff(4, 12, 2 * DFF);
        assert!(matches!(
            convert(&mut wide, &[1], &from_file),
            Err(Error::Labels { .. })
        ));
    }
}

#[test]
fn emoe_config_json_round_trip_and_defaults() {
    let c = EmoeConfig::from_json(r#"{"gate": {"num_experts": 16, "top_k": 4}}"#).unwrap();
    assert_eq!(c, EmoeConfig::new(16, 4));
    assert_eq!(c.split, SplitStrategy::default());
    assert_eq!(
        c.split.kmeans_config(16).unwrap(),
        emergent_split::KMeansConfig::new(16)
    );
    let json = r#"{
        "gate": {"num_experts": 8, "top_k": 2, "select_signal": "up", "weight_mode": "renorm",
                 "fold_b2": "k_mean", "gate_refresh_momentum": 0.1},
        "split": {"kmeans": {"seed": 3, "n_init": 2, "kmeans_solver": "greedy_balanced", "swap_refine": false}},
        "compute": "masked"
    }"#;
    let c = EmoeConfig::from_json(json).unwrap();
    assert_eq!(c.gate.select_signal, SelectSignal::Up);
    assert_eq!(c.gate.fold_b2, FoldB2::KMean);
    assert_eq!(c.compute, ComputePath::Masked);
    let k = c.split.kmeans_config(8).unwrap();
    assert_eq!(
        (k.seed, k.n_init, k.kmeans_solver, k.swap_refine),
        (3, 2, KMeansSolver::GreedyBalanced, false)
    );
    assert_eq!(k.max_iters, 1000);
    let back = EmoeConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    for s in [r#""contiguous""#, r#"{"random": {"seed": 4}}"#] {
        let c = EmoeConfig::from_json(&format!(
            r#"{{"gate": {{"num_experts": 4, "top_k": 1}}, "split": {s}}}"#
        ))
        .unwrap();
        assert!(c.split.kmeans_config(4).is_none());
    }
    // Every open point takes effect through convert.
    let mut m = model(2, false, 14);
    let r = convert(&mut m, &[1], &c).unwrap();
    assert_eq!(r.layers[0].method, SplitMethod::KMeans);
    let e = m.get_as::<EmoeFfn>("encoder.layer.1.(ffn)").unwrap();
    assert_eq!(e.router.config, c.gate);
    assert!(e.expert_bias.is_some());
    assert!(EmoeConfig::from_json(r#"{"gate": {"num_experts": 4, "top_k": 5}}"#).is_err());
    assert!(
        EmoeConfig::from_json(r#"{"gate": {"num_experts": 4, "top_k": 1}, "split": "metis"}"#)
            .is_err()
    );
}
