//! configurable-bricks: parity with scikit-learn, exact invariants of the
//! brick operations, and clear errors on bad input. Small shapes, seeded.

use std::path::PathBuf;

use configurable_bricks::analysis::{perturbation_matrix, sparsity_curve};
use configurable_bricks::combine::{BrickDelta, apply_delta, task_arithmetic};
use configurable_bricks::edit::{edit_ffn, key_second_moment, rank_one_edit};
use configurable_bricks::grow::{GrownFfn, grow_ffn};
use configurable_bricks::mask::{HiddenMask, install_masks, masked_mut, remove_masks};
use configurable_bricks::partition::{PartitionConfig, coactivation_partition};
use configurable_bricks::profile::{ProfileBatch, ffn_sites};
use configurable_bricks::route::{
    ActivationRouter, BrickLibrary, RouterConfig, brick_activation, routing_recall,
};
use configurable_bricks::sets::{partition_by_function, random_overlap_baseline};
use configurable_bricks::*;
use tensor_core::DType;
use tensor_core::layers::{Activation, FeedForward, FfnNames, Linear};
use tensor_core::module::{Context, Module, ModuleExt, Sequential};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::{
    assert_close, device, randint_seeded, randn_seeded, tolerances, with_seed,
};

/// `(atol, rtol)`: the CPU bounds for a result compared with one computed
/// another way (a hand-worked value, a formula, another module), loosened on
/// the test device as [`tolerances`] loosens f32 there (10x on CUDA).
fn scaled(atol: f64, rtol: f64) -> (f64, f64) {
    let k = tolerances(DType::F32, device()).0 / DType::F32.tolerances().0;
    (atol * k, rtol * k)
}

#[track_caller]
fn close(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    let (atol, rtol) = scaled(atol, rtol);
    assert_close(actual, expected, atol, rtol);
}

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ap_sklearn.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

// ---------------------------------------------------------------- attribution

#[test]
fn ap_matches_sklearn_on_every_fixture_case() {
    let fx = fixture();
    for (i, c) in fx["binary"].as_array().unwrap().iter().enumerate() {
        let scores = f64s(&c["scores"]);
        let labels: Vec<bool> = f64s(&c["labels"]).iter().map(|&l| l == 1.0).collect();
        let ap = average_precision(&scores, &labels).unwrap();
        let want = c["ap"].as_f64().unwrap();
        assert!(
            (ap - want).abs() < 1e-12,
            "case {i}: ours {ap}, sklearn {want}"
        );
    }
}

#[test]
fn ap_worked_examples_from_the_spec() {
    let s = [0.9, 0.8, 0.7, 0.6];
    let ap = |l: [bool; 4]| average_precision(&s, &l).unwrap();
    assert!((ap([true, false, true, false]) - 0.833_333_333_333_333_4).abs() < 1e-12);
    assert!((ap([false, true, false, true]) - 0.5).abs() < 1e-12);
    assert!((ap([true, true, false, false]) - 1.0).abs() < 1e-12);
}

#[test]
fn func_scores_match_sklearn_matrix_plain_and_symmetric() {
    let fx = fixture();
    let m = &fx["matrix"];
    let rows: Vec<Vec<f64>> = m["profile"].as_array().unwrap().iter().map(f64s).collect();
    let (n, k) = (rows.len() as i64, rows[0].len() as i64);
    let flat: Vec<f64> = rows.concat();
    // On the test device; FuncScore reads it back to the host in f64 (by
    // design), so the values, and the 1e-12 bound, do not depend on it.
    let profile = Tensor::from_slice(&flat).view([n, k]).to_device(device());
    let labels: Vec<usize> = f64s(&m["labels"]).iter().map(|&l| l as usize).collect();
    let nf = m["functions"].as_u64().unwrap() as usize;
    let names: Vec<String> = (0..nf).map(|f| format!("f{f}")).collect();
    for (sym, key) in [(false, "ap"), (true, "ap_symmetric")] {
        let s = func_scores(
            &profile,
            &labels,
            &names,
            &AttributionConfig { ap_symmetric: sym },
        )
        .unwrap();
        let want: Vec<Vec<f64>> = m[key].as_array().unwrap().iter().map(f64s).collect();
        for (neuron, row) in want.iter().enumerate() {
            for (f, w) in row.iter().enumerate() {
                let got = s.get(neuron, f);
                assert!(
                    (got - w).abs() < 1e-12,
                    "{key} neuron {neuron} f{f}: {got} vs {w}"
                );
            }
        }
    }
}

#[test]
fn ap_and_func_scores_reject_bad_input() {
    let e = average_precision(&[0.1, 0.2], &[false, false]).unwrap_err();
    assert!(e.to_string().contains("positive"), "{e}");
    let e = average_precision(&[0.1, 0.2], &[true]).unwrap_err();
    assert!(e.to_string().contains("labels"), "{e}");
    let e = average_precision(&[0.1, f64::NAN], &[true, false]).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    let names = vec!["a".to_string(), "b".to_string()];
    // Rejected before any computation: the CPU will do.
    let p = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    let e = func_scores(&p, &[0, 1], &names, &AttributionConfig::default()).unwrap_err();
    assert!(e.to_string().contains("3 labels"), "{e}");
    let e = func_scores(&p, &[0, 0, 0], &names, &AttributionConfig::default()).unwrap_err();
    assert!(e.to_string().contains("'a' has 3 of 3"), "{e}");
    let e = func_scores(&p, &[0, 1, 5], &names, &AttributionConfig::default()).unwrap_err();
    assert!(e.to_string().contains("label"), "{e}");
}

// ---------------------------------------------------------------- sets

fn two_sites() -> Vec<FfnSite> {
    vec![
        FfnSite {
            path: "0".into(),
            d_ff: 40,
            offset: 0,
        },
        FfnSite {
            path: "1".into(),
            d_ff: 60,
            offset: 40,
        },
    ]
}

#[test]
fn overlap_identity_disjoint_and_random_baseline() {
    let a: NeuronSet = vec![1, 5, 9];
    let b: NeuronSet = vec![2, 6];
    let o = overlap_matrix(&[a.clone(), b, a], OverlapFormula::OverSize).unwrap();
    assert_eq!(o[0][0], 1.0);
    assert_eq!(o[0][1], 0.0);
    assert_eq!(o[0][2], 1.0);
    let sites = two_sites();
    // 5% per layer: 2 + 3 neurons per set.
    let sets = vec![vec![0, 1, 40, 41, 42], vec![5, 6, 50, 51, 52]];
    let r = random_overlap_baseline(
        &sets,
        &sites,
        TopScope::PerLayer,
        OverlapFormula::OverSize,
        4000,
        7,
    )
    .unwrap();
    assert!((r[0][1] - 0.05).abs() < 0.005, "random overlap {}", r[0][1]);
    assert!((r[0][0] - 1.0).abs() < 1e-9);
    assert!(overlap_matrix(&[vec![3, 1]], OverlapFormula::Jaccard).is_err());
}

#[test]
fn functional_sets_take_top_fraction_per_layer_and_drop_residents() {
    let sites = two_sites();
    let functions = vec!["x".to_string(), "y".to_string()];
    // f0 prefers low indices, f1 high; neuron 39 and 99 top both.
    let mut scores = Vec::new();
    for n in 0..100usize {
        let (a, b) = if n == 39 || n == 99 {
            (1e3, 1e3)
        } else {
            (-(n as f64), n as f64)
        };
        scores.extend([a, b]);
    }
    let fs = FuncScores {
        functions,
        neurons: 100,
        scores,
    };
    let keep = SetConfig {
        resident_rule: ResidentRule::None,
        ..SetConfig::default()
    };
    let sets = functional_sets(&fs, &sites, &keep, None).unwrap();
    assert_eq!(sets[0], vec![0, 39, 40, 41, 99]);
    assert_eq!(sets[1], vec![38, 39, 97, 98, 99]);
    let sets = functional_sets(&fs, &sites, &SetConfig::default(), None).unwrap();
    assert_eq!(sets[0], vec![0, 40, 41]);
    assert_eq!(sets[1], vec![38, 97, 98]);
    let owner = partition_by_function(&fs, &sets).unwrap();
    assert_eq!(owner[0], Some(0));
    assert_eq!(owner[98], Some(1));
    assert_eq!(owner[50], None);
    let bad = SetConfig {
        top_fraction: 0.0,
        ..SetConfig::default()
    };
    assert!(
        functional_sets(&fs, &sites, &bad, None)
            .unwrap_err()
            .to_string()
            .contains("top_fraction")
    );
    let on = SetConfig {
        resident_rule: ResidentRule::InEverySetOrAlwaysOn { fraction: 0.1 },
        ..SetConfig::default()
    };
    assert!(
        functional_sets(&fs, &sites, &on, None)
            .unwrap_err()
            .to_string()
            .contains("mean indicator")
    );
}

// ---------------------------------------------------------------- profiling

/// `x [B, T, 2]` -> ReLU FFN with hand-set keys -> a second FFN, on the test device.
fn toy_model() -> Sequential {
    let dev = device();
    let w1 = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0])
        .view([3, 2])
        .to_device(dev);
    let w2 = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 0.0, 1.0, -1.0])
        .view([2, 3])
        .to_device(dev);
    let f1 =
        FeedForward::from_weights(w1, None, None, w2, None, Activation::Relu, FfnNames::bert())
            .unwrap();
    let f2 = with_seed(3, || {
        FeedForward::new(2, 4, Activation::Gelu, FfnNames::bert(), dev)
    })
    .unwrap();
    Sequential::new().push(f1).push(f2)
}

/// `[B, T]` int64 masks on the test device.
fn tokens(v: &[i64]) -> Tensor {
    Tensor::from_slice(v).view([2, 3]).to_device(device())
}

fn toy_input() -> (Tensor, Tensor) {
    let x = Tensor::from_slice(&[
        1.0f32, -2.0, 3.0, 1.0, 100.0, 100.0, -1.0, 2.0, 0.5, 0.5, 7.0, 7.0,
    ])
    .view([2, 3, 2])
    .to_device(device());
    (x, tokens(&[1, 1, 0, 1, 1, 0]))
}

#[test]
fn profiling_a_hand_set_ffn_gives_the_masked_token_means() {
    let model = toy_model();
    let prof = Profiler::new(&model, ProfileConfig::default()).unwrap();
    assert_eq!(
        prof.sites
            .iter()
            .map(|s| (s.path.as_str(), s.d_ff, s.offset))
            .collect::<Vec<_>>(),
        [("0", 3, 0), ("1", 4, 3)]
    );
    let (x, mask) = toy_input();
    let p = prof.profile_batch(&model, &x, &mask, None).unwrap();
    assert_eq!(p.size(), [2, 7]);
    // Example 0, tokens (1,-2) and (3,1): relu -> (1,0,0) and (3,1,4); mean (2, .5, 2).
    // Example 1, tokens (-1,2) and (.5,.5): (0,2,1) and (.5,.5,1); mean (.25, 1.25, 1).
    let want = Tensor::from_slice(&[2.0f32, 0.5, 2.0, 0.25, 1.25, 1.0]).view([2, 3]);
    close(&p.narrow(1, 0, 3), &want, 1e-6, 1e-6);
    // Scope: only the first token of each example (the "prompt").
    let cfg = ProfileConfig {
        token_scope: TokenScope::Scoped,
        ..ProfileConfig::default()
    };
    let prof = Profiler::new(&model, cfg).unwrap();
    let scope = tokens(&[1, 0, 1, 1, 0, 1]);
    let p = prof.profile_batch(&model, &x, &mask, Some(&scope)).unwrap();
    let want = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 2.0, 1.0]).view([2, 3]);
    close(&p.narrow(1, 0, 3), &want, 1e-6, 1e-6);
    // Output magnitude: |a_n| * ||W_O[:, n]|| with column norms (1, sqrt 5, 1).
    let cfg = ProfileConfig {
        indicator: Indicator::OutputMagnitude,
        ..ProfileConfig::default()
    };
    let prof = Profiler::new(&model, cfg).unwrap();
    let p = prof.profile_batch(&model, &x, &mask, None).unwrap();
    let want = Tensor::from_slice(&[2.0f32, 0.5 * 5f32.sqrt(), 2.0]).view([1, 3]);
    close(&p.narrow(0, 0, 1).narrow(1, 0, 3), &want, 1e-5, 1e-5);
}

#[test]
fn profiling_rejects_bad_masks_and_patterns() {
    let model = toy_model();
    let prof = Profiler::new(&model, ProfileConfig::default()).unwrap();
    let (x, mask) = toy_input();
    let e = prof
        .profile_batch(&model, &x, &mask, Some(&mask))
        .unwrap_err();
    assert!(e.to_string().contains("token_scope"), "{e}");
    let empty = tokens(&[1, 1, 0, 0, 0, 0]);
    let e = prof.profile_batch(&model, &x, &empty, None).unwrap_err();
    assert!(e.to_string().contains("example 1"), "{e}");
    let e = prof
        .profile_batch(&model, &x, &mask.narrow(1, 0, 2), None)
        .unwrap_err();
    assert!(e.to_string().contains("activation"), "{e}");
    let e = Profiler::new(
        &model,
        ProfileConfig {
            ffn_pattern: "encoder.*".into(),
            ..ProfileConfig::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("encoder.*"), "{e}");
}

#[test]
fn profile_file_round_trips_and_failures_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let model = toy_model();
    let prof = Profiler::new(&model, ProfileConfig::default()).unwrap();
    let (x, mask) = toy_input();
    let functions = vec!["a".to_string(), "b".to_string()];
    let batches = || {
        (0..3).map(|i| {
            Ok(ProfileBatch {
                input: x.shallow_clone() + i as f64,
                attention_mask: mask.shallow_clone(),
                scope: None,
            })
        })
    };
    let labels = [0, 1, 1, 0, 0, 1];
    let run = |b: &ProfileBatch, ctx: &mut Context| model.forward(&b.input, ctx);
    let sum = profile_corpus(&prof, batches(), &labels, &functions, &path, false, run).unwrap();
    assert_eq!((sum.examples, sum.neurons), (6, 7));
    let p = Profile::open(&path).unwrap();
    assert_eq!(p.labels, labels);
    assert_eq!(p.functions, functions);
    let direct: Vec<Tensor> = batches()
        .map(|b| {
            let b = b.unwrap();
            prof.profile_batch(&model, &b.input, &b.attention_mask, None)
                .unwrap()
        })
        .collect();
    assert_close(&p.matrix().unwrap(), &Tensor::cat(&direct, 0), 0.0, 0.0);
    // Too few examples: an error, and the old file stays as it was.
    let e = profile_corpus(
        &prof,
        batches().take(2),
        &labels,
        &functions,
        &path,
        false,
        run,
    )
    .unwrap_err();
    assert!(e.to_string().contains("6 examples"), "{e}");
    assert_eq!(Profile::open(&path).unwrap().labels, labels);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A truncated file is refused when opened.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 9]).unwrap();
    assert!(Profile::open(&cut).is_err());
}

// ---------------------------------------------------------------- masks and analyses

fn outputs(model: &dyn Module, x: &Tensor, mask: &Tensor) -> Tensor {
    let mut ctx = Context::eval().with_mask(mask.shallow_clone());
    tch::no_grad(|| model.forward(x, &mut ctx)).unwrap()
}

#[test]
fn masks_zero_nothing_everything_and_empty_bricks_change_nothing() {
    let mut model = toy_model();
    let sites = ffn_sites(&model, "*").unwrap();
    let (x, mask) = toy_input();
    let clean = outputs(&model, &x, &mask);
    install_masks(&mut model, &sites).unwrap();
    assert_close(&outputs(&model, &x, &mask), &clean, 0.0, 0.0);
    for s in &sites {
        masked_mut(&mut model, &s.path)
            .unwrap()
            .set(HiddenMask::LowestFraction {
                fraction: 0.0,
                indicator: Indicator::Activation,
            })
            .unwrap();
    }
    assert_close(&outputs(&model, &x, &mask), &clean, 0.0, 0.0);
    // 100% of the last layer: its output is its bias b2.
    masked_mut(&mut model, "1")
        .unwrap()
        .set(HiddenMask::LowestFraction {
            fraction: 1.0,
            indicator: Indicator::Activation,
        })
        .unwrap();
    // The masked FFNs keep the module contract.
    tensor_core::contract::check_contract(&mut model).unwrap();
    let y = outputs(&model, &x, &mask);
    let b2 = model
        .get_as::<configurable_bricks::mask::MaskedFfn>("1")
        .unwrap()
        .ffn()
        .b2()
        .unwrap()
        .unwrap()
        .detach();
    assert_close(&y, &b2.expand([2, 3, 2], false), 1e-7, 0.0);
    let e = masked_mut(&mut model, "0")
        .unwrap()
        .set(HiddenMask::Fixed(Tensor::ones(
            [5],
            (Kind::Float, device()),
        )))
        .unwrap_err();
    assert!(e.to_string().contains("[3]"), "{e}");
    remove_masks(&mut model, &sites).unwrap();
    assert!(model.get_as::<FeedForward>("0").is_ok());

    // Perturbation: an empty brick changes nothing; a real one does.
    let functions = vec!["p".to_string(), "q".to_string()];
    let eval = |m: &dyn Module| -> configurable_bricks::Result<Vec<f64>> {
        let y = outputs(m, &x, &mask);
        let l0 = (y.get(0) - 3.0)
            .square()
            .mean(Kind::Double)
            .double_value(&[]);
        let l1 = (y.get(1) + 2.0)
            .square()
            .mean(Kind::Double)
            .double_value(&[]);
        Ok(vec![l0, l1])
    };
    let p = perturbation_matrix(
        &mut model,
        &sites,
        &functions,
        &[vec![], vec![0, 1, 2, 3]],
        eval,
    )
    .unwrap();
    assert_eq!(p.pruned[0], p.base);
    assert_eq!(p.delta_percent(0, 1), 0.0);
    assert_ne!(p.pruned[1], p.base);
    assert!(
        model.get_as::<FeedForward>("1").is_ok(),
        "masks removed after the analysis"
    );
    let curve = sparsity_curve(
        &mut model,
        &sites,
        &[0.0, 0.5, 1.0],
        Indicator::Activation,
        2,
        eval,
    )
    .unwrap();
    assert_eq!(curve[0].losses, p.base);
    assert!(perturbation_matrix(&mut model, &sites, &functions, &[vec![]], eval).is_err());
    assert!(
        perturbation_matrix(&mut model, &sites, &functions, &[vec![], vec![999]], eval)
            .unwrap_err()
            .to_string()
            .contains("999")
    );
    // zeroed_losses: the empty set reproduces the intact losses, any length of losses.
    let per = zeroed_losses(&mut model, &sites, &[vec![], vec![0, 1, 2, 3]], eval).unwrap();
    assert_eq!(per[0], p.base);
    assert_eq!(per[1], p.pruned[1]);
    assert!(model.get_as::<FeedForward>("1").is_ok(), "masks removed");
    let mut calls = 0;
    let ragged = zeroed_losses(&mut model, &sites, &[vec![], vec![0]], |_m: &dyn Module| {
        calls += 1;
        Ok(vec![1.0; calls])
    });
    assert!(ragged.unwrap_err().to_string().contains("set 1"));
    let nan = zeroed_losses(&mut model, &sites, &[vec![]], |_m: &dyn Module| {
        Ok(vec![f64::NAN])
    });
    assert!(nan.is_err());
    assert!(
        model.get_as::<FeedForward>("1").is_ok(),
        "masks removed after an error"
    );
}

// ---------------------------------------------------------------- ROME

#[test]
fn rank_one_edit_maps_the_key_and_barely_moves_other_keys() {
    let (d_in, d_out) = (64, 8);
    let dev = device();
    let mix =
        randn_seeded(&[d_in, d_in], 11, dev).unwrap() / 8.0 + Tensor::eye(d_in, (Kind::Float, dev));
    let keys = randn_seeded(&[4096, d_in], 12, dev).unwrap().matmul(&mix);
    let held_out = randn_seeded(&[500, d_in], 13, dev).unwrap().matmul(&mix);
    let c = key_second_moment(&keys, 1e-6).unwrap();
    let w = randn_seeded(&[d_out, d_in], 14, dev).unwrap();
    let k_star = held_out.get(0);
    let v_star = randn_seeded(&[d_out], 15, dev).unwrap() * 5.0;
    let edit = rank_one_edit(&w, &c, &k_star, &v_star).unwrap();
    // The edit is solved on the host in f64 (by design): check it there,
    // on host copies of the very values it read.
    let host = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let w2 = host(&w) + &edit.delta;
    assert_close(&w2.mv(&host(&k_star)), &host(&v_star), 1e-9, 1e-9);
    // A key with uᵀk = 0 maps exactly as before.
    let r = host(&held_out.get(1));
    let u = &edit.u;
    let k_perp = &r - u * (u.dot(&r) / u.dot(u));
    assert_close(
        &edit.delta.mv(&k_perp),
        &Tensor::zeros([d_out], (Kind::Double, Device::Cpu)),
        1e-9,
        0.0,
    );
    // Unrelated keys: RMS of ‖Δk‖ / ‖v* − W k*‖ below 0.25 (theory: ≈ 1/√d_in = 0.125).
    let moved = edit.change_on(&held_out.narrow(0, 1, 499)).unwrap();
    let rms = (moved
        .iter()
        .map(|m| (m / edit.residual_norm).powi(2))
        .sum::<f64>()
        / moved.len() as f64)
        .sqrt();
    assert!(rms < 0.25, "unrelated keys moved by {rms} of the edit");
    // On an FFN: the edited hidden key produces the target output (bias included).
    let mut ffn = with_seed(16, || {
        FeedForward::new(d_out, d_in, Activation::Gelu, FfnNames::bert(), dev)
    })
    .unwrap();
    let target = Tensor::from_slice(&[1.0f32, -1.0, 2.0, 0.0, 0.5, 3.0, -2.0, 1.0]).to_device(dev);
    edit_ffn(&mut ffn, &c, &k_star, &target).unwrap();
    let down = ffn.w2().unwrap().shallow_clone();
    let b2 = ffn.b2().unwrap().unwrap().shallow_clone();
    close(&(down.mv(&k_star) + b2).detach(), &target, 1e-4, 1e-4);
    // Bad shapes and a singular edit are errors.
    assert!(
        rank_one_edit(&w, &c, &v_star, &v_star)
            .unwrap_err()
            .to_string()
            .contains("k*")
    );
    let zero = Tensor::zeros([d_in], (Kind::Float, dev));
    assert!(
        rank_one_edit(&w, &c, &zero, &v_star)
            .unwrap_err()
            .to_string()
            .contains("orthogonal")
    );
}

// ---------------------------------------------------------------- growth

#[test]
fn growing_leaves_outputs_unchanged_and_trains_only_new_neurons() {
    let dev = device();
    for gated in [false, true] {
        let ffn = with_seed(21, || {
            if gated {
                FeedForward::gated(6, 10, Activation::Silu, FfnNames::llama(), dev)
            } else {
                FeedForward::new(6, 10, Activation::Gelu, FfnNames::bert(), dev)
            }
        })
        .unwrap();
        let mut model = Sequential::new().push(ffn);
        let x = randn_seeded(&[3, 5, 6], 22, dev).unwrap();
        let mask = Tensor::ones([3, 5], (Kind::Int64, dev));
        let before = outputs(&model, &x, &mask);
        grow_ffn(&mut model, "0", 4, 23).unwrap();
        assert_close(&outputs(&model, &x, &mask), &before, 0.0, 0.0);
        let trainable: Vec<String> = model
            .trainable_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            trainable.iter().all(|n| n.contains("grown_")),
            "{trainable:?}"
        );
        tensor_core::contract::check_contract(&mut model).unwrap();
        let grown = model.get_as::<GrownFfn>("0").unwrap();
        close(
            &outputs(&grown.widened().unwrap(), &x, &mask),
            &before,
            1e-6,
            1e-5,
        );
        // After a step on the new neurons the widened FFN still equals the grown one.
        let mut ctx = Context::train();
        let loss = model
            .forward(&x, &mut ctx)
            .unwrap()
            .square()
            .sum(Kind::Float);
        let params: Vec<Tensor> = model
            .trainable_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let grads = Tensor::run_backward(&[loss], &params, false, false);
        assert!(
            grads
                .last()
                .unwrap()
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
        tch::no_grad(|| {
            for (p, g) in params.iter().zip(&grads) {
                let _ = p.shallow_clone().f_sub_(&(g * 0.1)).unwrap();
            }
        });
        let grown = model.get_as::<GrownFfn>("0").unwrap();
        let after = outputs(&model, &x, &mask);
        assert!((&after - &before).abs().max().double_value(&[]) > 0.0);
        close(
            &outputs(&grown.widened().unwrap(), &x, &mask),
            &after,
            1e-5,
            1e-4,
        );
    }
    let mut model = Sequential::new().push(with_seed(0, || Linear::new(2, 2, true, dev)).unwrap());
    let e = grow_ffn(&mut model, "0", 3, 0).unwrap_err();
    assert!(e.to_string().contains("FeedForward"), "{e}");
    assert!(model.get_as::<Linear>("0").is_ok(), "slot restored");
}

// ---------------------------------------------------------------- partition, routing, retrieval

#[test]
fn coactivation_partition_recovers_planted_bricks() {
    let dev = device();
    let latent = randn_seeded(&[300, 3], 31, dev).unwrap();
    let noise = randn_seeded(&[300, 12], 32, dev).unwrap() * 0.1;
    let planted: Vec<i64> = vec![2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2];
    let act = latent.index_select(1, &Tensor::from_slice(&planted).to_device(dev)) + noise;
    let p = coactivation_partition(
        &act,
        &PartitionConfig {
            bricks: 3,
            max_iter: 20,
            seed: 1,
        },
    )
    .unwrap();
    for i in 0..12 {
        for j in 0..12 {
            assert_eq!(
                p.brick_of[i] == p.brick_of[j],
                planted[i] == planted[j],
                "neurons {i},{j}"
            );
        }
    }
    assert!(
        coactivation_partition(
            &act,
            &PartitionConfig {
                bricks: 5,
                ..PartitionConfig::default()
            }
        )
        .unwrap_err()
        .to_string()
        .contains("divide")
    );
}

#[test]
fn activation_router_beats_random_routing_and_drives_a_routed_mask() {
    let dev = device();
    let ffn = with_seed(41, || {
        FeedForward::new(16, 64, Activation::Relu, FfnNames::bert(), dev)
    })
    .unwrap();
    let x = randn_seeded(&[2048, 16], 42, dev).unwrap();
    let h = tch::no_grad(|| ffn.hidden(&x, &mut Context::eval())).unwrap();
    let brick_of = Tensor::arange(64, (Kind::Int64, dev)).divide_scalar_mode(8, "floor");
    let s = brick_activation(&h, &brick_of, 8).unwrap();
    let cfg = RouterConfig {
        hidden: 32,
        top_k: 2,
        steps: 300,
        batch_size: 256,
        lr: 1e-2,
        seed: 3,
    };
    let router = ActivationRouter::fit(&x.narrow(0, 0, 1536), &s.narrow(0, 0, 1536), &cfg).unwrap();
    let (xt, st) = (x.narrow(0, 1536, 512), s.narrow(0, 1536, 512));
    let ours = routing_recall(&router.route(&xt, 2).unwrap(), &st).unwrap();
    let random = routing_recall(&randint_seeded(8, &[512, 2], 5, dev).unwrap(), &st).unwrap();
    assert!(
        ours > random + 0.15,
        "router recall {ours} vs random {random}"
    );
    let mut model = Sequential::new().push(ffn);
    let sites = ffn_sites(&model, "*").unwrap();
    install_masks(&mut model, &sites).unwrap();
    let m = masked_mut(&mut model, "0").unwrap();
    assert!(
        m.set(HiddenMask::Routed {
            router: ActivationRouter::fit(
                &x,
                &s,
                &RouterConfig {
                    steps: 1,
                    ..cfg.clone()
                }
            )
            .unwrap(),
            brick_of: brick_of.shallow_clone(),
            top_k: 9
        })
        .is_err()
    );
    m.set(HiddenMask::Routed {
        router,
        brick_of,
        top_k: 8,
    })
    .unwrap();
    let tokens = Tensor::ones([512], (Kind::Int64, dev));
    let all = outputs(&model, &xt, &tokens);
    remove_masks(&mut model, &sites).unwrap();
    close(&all, &outputs(&model, &xt, &tokens), 1e-6, 1e-5);
}

#[test]
fn retrieval_finds_the_nearest_signature() {
    let dev = device();
    let centres = randn_seeded(&[3, 32], 51, dev).unwrap() * 3.0;
    let mut lib = BrickLibrary::new();
    for (i, name) in ["math", "code", "prose"].iter().enumerate() {
        let ex = centres.get(i as i64).unsqueeze(0)
            + randn_seeded(&[20, 32], 52 + i as u64, dev).unwrap();
        lib.add(name, &ex).unwrap();
    }
    let q = centres.get(1).unsqueeze(0) + randn_seeded(&[1, 32], 60, dev).unwrap() * 0.5;
    let hits = lib.retrieve(&q, 2).unwrap();
    assert_eq!(lib.names[hits[0][0].0], "code");
    assert!(hits[0][0].1 > hits[0][1].1);
    assert!(lib.retrieve(&q, 4).is_err());
    assert!(
        lib.similarity(&Tensor::zeros([1, 31], (Kind::Float, dev)))
            .unwrap_err()
            .to_string()
            .contains("[q, 32]")
    );
    assert!(lib.add("math", &centres).is_err());
    assert!(BrickLibrary::new().retrieve(&q, 1).is_err());
}

// ---------------------------------------------------------------- combination

#[test]
fn task_arithmetic_adds_and_negates_bricks() {
    let dev = device();
    let make =
        |seed| Sequential::new().push(with_seed(seed, || Linear::new(4, 3, true, dev)).unwrap());
    let base = make(1);
    let (t1, t2) = (make(2), make(3));
    let d1 = BrickDelta::between("one", &base, &t1).unwrap();
    let d2 = BrickDelta::between("two", &base, &t2).unwrap();
    let param = |m: &Sequential| m.named_parameters()[0].1.detach();
    let mut m = make(1);
    task_arithmetic(&mut m, &[(&d1, 1.0)]).unwrap();
    close(&param(&m), &param(&t1), 1e-6, 1e-6);
    task_arithmetic(&mut m, &[(&d1, -1.0), (&d2, 0.5)]).unwrap();
    let want = param(&base) + (param(&t2) - param(&base)) * 0.5;
    close(&param(&m), &want, 1e-6, 1e-6);
    let soup = BrickDelta::soup("soup", &[&d1, &d2], &[0.25, 0.75]).unwrap();
    let mut m = make(1);
    apply_delta(&mut m, &soup, 1.0).unwrap();
    close(
        &param(&m),
        &(param(&t1) * 0.25 + param(&t2) * 0.75),
        1e-6,
        1e-6,
    );
    assert!(
        BrickDelta::soup("bad", &[&d1, &d2], &[0.5, 0.6])
            .unwrap_err()
            .to_string()
            .contains("sum to 1")
    );
    let other = Sequential::new().push(with_seed(4, || Linear::new(5, 3, true, dev)).unwrap());
    assert!(BrickDelta::between("x", &base, &other).is_err());
    let mut renamed = BrickDelta::weighted_sum("r", &[&d1], &[1.0]).unwrap();
    let t = renamed.tensors.remove("0.weight").unwrap();
    renamed.tensors.insert("nope.weight".into(), t);
    assert!(
        apply_delta(&mut m, &renamed, 1.0)
            .unwrap_err()
            .to_string()
            .contains("nope.weight")
    );
}
