//! The `modular` user subcommands end to end: the built binary on tiny
//! inputs made here (a random 2-layer BERT with a word-level tokenizer,
//! LoRA adapter folders written by orthogonal-merge, JSONL data), checked
//! against the libraries' own results, plus malformed inputs and their exit
//! codes (1: the work failed, 2: a malformed command line).

mod common;

use std::path::Path;

use emergent_split::EmoeConfig;
use emergent_split::convert::convert;
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use orthogonal_merge::{
    Delta, LoraFactors, MergeConfig, MergedDelta, Method, SaveOptions, TaskDelta, merge,
    read_adapter, save_task,
};
use tensor_core::io;
use tensor_core::module::{Context, Module, ModuleExt};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::randn_seeded;

use common::{expect, json, no_temp_left, reviews, s, tiny_model};

fn ids_and_mask() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[2i64, 16, 10, 18, 4, 3, 2, 9, 20, 5, 8, 3]).view([2, 6]);
    let mask = Tensor::ones([2, 6], (Kind::Int64, Device::Cpu));
    (ids, mask)
}

fn forward(model: &dyn Module) -> Tensor {
    let (ids, mask) = ids_and_mask();
    let mut ctx = Context::eval();
    ctx.attention_mask = Some(mask);
    tch::no_grad(|| model.forward(&ids, &mut ctx).unwrap())
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn randn(shape: &[i64], seed: u64) -> Tensor {
    randn_seeded(shape, seed, Device::Cpu).unwrap()
}

const QUERY: &str = "encoder.layer.0.attention.self.query";
const VALUE: &str = "encoder.layer.1.attention.self.value";

/// A LoRA task of rank `r` on two layers of the tiny model.
fn lora_task(name: &str, r: i64, d: i64, seed: u64) -> TaskDelta {
    let f = |s: u64| {
        Delta::Lora(LoraFactors::new(randn(&[r, d], s), randn(&[d, r], s + 1), 0.5).unwrap())
    };
    TaskDelta::new(name)
        .with(QUERY, f(seed))
        .with(VALUE, f(seed + 10))
}

fn write_adapter(dir: &Path, task: &TaskDelta) {
    save_task(task, dir, &[], &SaveOptions::default()).unwrap();
}

#[test]
fn help_and_usage_errors_exit_2() {
    for cmd in ["split", "merge", "tune", "inspect"] {
        let (out, _) = expect(&[cmd, "--help"], 0);
        assert!(
            out.contains(&format!("usage: modular {cmd}")) && out.contains("examples:"),
            "{out}"
        );
    }
    let (out, _) = expect(&["help"], 0);
    assert!(out.contains("modular split") && out.contains("modular inspect"));
    let (_, err) = expect(&["frobnicate"], 2);
    assert!(err.contains("unknown command 'frobnicate'"), "{err}");

    // Each subcommand's flags are checked before any input is read.
    let (_, err) = expect(&["split", "--model", "m"], 2);
    assert!(err.contains("missing --out"), "{err}");
    let (_, err) = expect(&["split", "--out", "o", "--frobnicate", "1"], 2);
    assert!(err.contains("unknown option '--frobnicate'"), "{err}");
    let (_, err) = expect(&["split", "--out", "o", "--experts", "many"], 2);
    assert!(err.contains("--experts 'many'"), "{err}");
    let (_, err) = expect(&["merge", "a", "b", "--out", "o", "--method", "nope"], 2);
    assert!(
        err.contains("unknown merge method 'nope'") && err.contains("dare_ties"),
        "{err}"
    );
    let (_, err) = expect(&["merge", "a", "b", "--out", "o", "--weights", "1,x"], 2);
    assert!(err.contains("--weights '1,x': item 'x'"), "{err}");
    let (_, err) = expect(
        &["tune", "--data", "d", "--out", "o", "--method", "prefix"],
        2,
    );
    assert!(err.contains("unknown method 'prefix'"), "{err}");
    let (_, err) = expect(&["inspect"], 2);
    assert!(err.contains("no folder given"), "{err}");
    // Alike in every command: learning rates, repeated list entries.
    for lr in ["0", "-1", "nan", "3"] {
        let (_, err) = expect(&["tune", "--data", "d", "--out", "o", "--lr", lr], 2);
        assert!(err.contains("--lr must be a number in (0, 1]"), "{err}");
    }
    for (flag, v, msg) in [
        ("--lr", "0", "--lr must be a number in (0, 1]"),
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--frobnicate", "1", "unknown option '--frobnicate'"),
    ] {
        let (_, err) = expect(&["finetune", flag, v], 2);
        assert!(err.contains(msg), "{err}");
    }
    let (_, err) = expect(&["split", "--out", "o", "--layers", "4,2,4"], 2);
    assert!(err.contains("--layers: 4 is given twice"), "{err}");
}

#[test]
fn outputs_may_not_overwrite_inputs_and_density_zero_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model, 6, 16);
    // split --out onto its own model folder.
    let (_, err) = expect(&["split", "--model", s(&model), "--out", s(&model)], 2);
    assert!(err.contains("would overwrite the input --model"), "{err}");
    // tune --out inside its data folder.
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for f in ["train.jsonl", "validation.jsonl", "test_id.jsonl"] {
        std::fs::write(data.join(f), reviews(8, 0)).unwrap();
    }
    let (_, err) = expect(
        &[
            "tune",
            "--data",
            s(&data),
            "--out",
            s(&data.join("run")),
            "--model",
            s(&model),
        ],
        2,
    );
    assert!(err.contains("would overwrite the input --data"), "{err}");
    // merge --out onto one of the adapters; density 0 warns and still runs.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_adapter(&a, &lora_task("a", 2, 16, 1));
    write_adapter(&b, &lora_task("b", 2, 16, 2));
    let (_, err) = expect(&["merge", s(&a), s(&b), "--out", s(&b)], 2);
    assert!(
        err.contains("would overwrite the input ADAPTER_DIR"),
        "{err}"
    );
    let out = tmp.path().join("merged");
    let (_, err) = expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--method",
            "ties",
            "--density",
            "0",
            "--quiet",
        ],
        0,
    );
    assert!(err.contains("warning: --density 0 keeps no entry"), "{err}");
    no_temp_left(tmp.path());
}

#[test]
fn split_writes_the_same_dense_model_and_rebuildable_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tiny");
    let original = tiny_model(&src, 7, 16);
    let out = tmp.path().join("split");
    let (stdout, _) = expect(
        &[
            "split",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--experts",
            "4",
            "--top-k",
            "2",
            "--layers",
            "0,1",
            "--seed",
            "3",
            "--n-init",
            "2",
            "--quiet",
        ],
        0,
    );
    assert!(
        stdout.contains("objective") && stdout.contains("| 0 | 32 | 4 x 8 | 2 |"),
        "{stdout}"
    );
    no_temp_left(tmp.path());
    assert!(out.join("tokenizer.json").is_file());

    // Permuting hidden neurons leaves the dense function unchanged.
    let permuted = BertModel::from_folder(&out, Device::Cpu).unwrap();
    let (a, b) = (forward(&original), forward(&permuted));
    assert!(max_abs(&a, &b) < 1e-5, "{}", max_abs(&a, &b));

    // The written weights are the source's rows in the recorded order.
    let doc = json(&out.join("emoe.json"));
    assert_eq!(doc["num_experts"], 4);
    assert_eq!(doc["top_k"], 2);
    let layers = doc["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        let perm: Vec<i64> = l["permutation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..32).collect::<Vec<_>>());
        let i = l["layer"].as_u64().unwrap();
        let name = format!("encoder.layer.{i}.intermediate.dense.weight");
        let src_w = io::load(src.join("model.safetensors"), Device::Cpu)
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let out_w = io::load(out.join("model.safetensors"), Device::Cpu)
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let idx = Tensor::from_slice(&perm);
        assert!(src_w.index_select(0, &idx).equal(&out_w), "layer {i}");
        assert!(l["objective"].as_f64().unwrap() <= l["random_objective"].as_f64().unwrap());
    }

    // emoe_config on the permuted weights gives the k-means experts of the
    // source: the same split model, the same outputs.
    let cfg = EmoeConfig::from_json(&doc["emoe_config"].to_string()).unwrap();
    let mut rebuilt = permuted;
    convert(&mut rebuilt, &[0, 1], &cfg).unwrap();
    let kcfg = EmoeConfig {
        split: serde_json::from_value(doc["split"].clone()).unwrap(),
        ..cfg.clone()
    };
    let mut direct = original;
    convert(&mut direct, &[0, 1], &kcfg).unwrap();
    let (a, b) = (forward(&direct), forward(&rebuilt));
    assert!(max_abs(&a, &b) < 1e-5, "{}", max_abs(&a, &b));

    let (stdout, _) = expect(&["inspect", s(&out)], 0);
    assert!(
        stdout.contains("model folder")
            && stdout.contains("experts (emoe.json)")
            && stdout.contains("| 1 | encoder.layer.1.(ffn) | 32 | 4 | 2 | 8 |"),
        "{stdout}"
    );

    // An existing output is kept unless --force.
    let (_, err) = expect(
        &["split", "--model", s(&src), "--out", s(&out), "--quiet"],
        1,
    );
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    expect(
        &[
            "split",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--experts",
            "8",
            "--top-k",
            "2",
            "--force",
            "--quiet",
        ],
        0,
    );
    assert_eq!(json(&out.join("emoe.json"))["num_experts"], 8);
    // Default layers for 2 layers: the reference placement, never the last = [0].
    assert_eq!(
        json(&out.join("emoe.json"))["layers_split"],
        serde_json::json!([0])
    );
    no_temp_left(tmp.path());
}

#[test]
fn split_names_missing_or_malformed_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = tmp.path().join("nowhere");
    let (_, err) = expect(&["split", "--model", s(&missing), "--out", s(&out)], 1);
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (_, err) = expect(&["split", "--model", s(&empty), "--out", s(&out)], 1);
    assert!(err.contains("has no config.json"), "{err}");
    let src = tmp.path().join("tiny");
    tiny_model(&src, 1, 16);
    let (_, err) = expect(
        &[
            "split",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--experts",
            "5",
            "--top-k",
            "1",
        ],
        2,
    );
    assert!(
        err.contains("--experts 5 does not divide") && err.contains("32"),
        "{err}"
    );
    let (_, err) = expect(
        &[
            "split",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--experts",
            "4",
            "--top-k",
            "8",
        ],
        2,
    );
    assert!(
        err.contains("--top-k 8 is larger than --experts 4"),
        "{err}"
    );
    let (_, err) = expect(
        &[
            "split",
            "--model",
            s(&src),
            "--out",
            s(&out),
            "--layers",
            "0,7",
        ],
        2,
    );
    assert!(err.contains("layer 7 does not exist"), "{err}");
    // A corrupt weights file: an error naming it, no output.
    std::fs::write(src.join("model.safetensors"), b"not a safetensors file").unwrap();
    let (_, err) = expect(&["split", "--model", s(&src), "--out", s(&out)], 1);
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(!out.exists());
    no_temp_left(tmp.path());
}

#[test]
fn merge_writes_what_the_library_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model, 2, 16);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ta, tb) = (lora_task("a", 4, 16, 11), lora_task("b", 4, 16, 21));
    write_adapter(&a, &ta);
    write_adapter(&b, &tb);

    // TIES gives full deltas: merged_deltas.safetensors, as merge() computes.
    let out = tmp.path().join("ties");
    let (stdout, _) = expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--method",
            "ties",
            "--density",
            "0.5",
            "--weights",
            "1,0.5",
            "--model",
            s(&model),
            "--quiet",
        ],
        0,
    );
    assert!(
        stdout.contains("interference of 2 tasks") && stdout.contains("full deltas"),
        "{stdout}"
    );
    let tasks = vec![
        read_adapter(&a, None).unwrap().task,
        read_adapter(&b, None).unwrap().task,
    ];
    let cfg = MergeConfig::new(Method::Ties)
        .with_density(0.5)
        .with_weights(&[1.0, 0.5]);
    let want = merge(&tasks, &cfg).unwrap();
    let got: Vec<(String, Tensor)> =
        io::load(out.join("merged_deltas.safetensors"), Device::Cpu).unwrap();
    assert_eq!(got.len(), 2);
    for (l, t) in &got {
        let MergedDelta::Full(w) = &want.layers[l] else {
            panic!("ties gives full deltas")
        };
        assert!(t.equal(w), "{l}");
    }
    let doc = json(&out.join("merge.json"));
    assert_eq!(doc["result"], "full_deltas");
    assert_eq!(doc["config"]["method"], "ties");
    let (stdout, _) = expect(&["inspect", s(&out)], 0);
    assert!(
        stdout.contains("merge result") && stdout.contains("merged_deltas.safetensors"),
        "{stdout}"
    );

    // cat is exact in LoRA form: a PEFT folder whose ΔW is the sum.
    let out = tmp.path().join("cat");
    let (stdout, _) = expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--method",
            "cat",
            "--quiet",
        ],
        0,
    );
    assert!(stdout.contains("PEFT LoRA folder, rank 8"), "{stdout}");
    let merged = read_adapter(&out, None).unwrap().task;
    for l in [QUERY, VALUE] {
        let sum = ta.layers[l].weight().unwrap() + tb.layers[l].weight().unwrap();
        let got = merged.layers[l].weight().unwrap();
        assert!(max_abs(&sum, &got) < 1e-5, "{l}");
    }
    let (stdout, _) = expect(&["inspect", s(&out)], 0);
    assert!(
        stdout.contains("PEFT adapter (LORA)") && stdout.contains("rank 8 on 2 layer(s)"),
        "{stdout}"
    );

    // svd with a rank: LoRA factors of that rank.
    let out = tmp.path().join("svd");
    expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--method",
            "svd",
            "--svd-rank",
            "3",
            "--quiet",
        ],
        0,
    );
    let merged = read_adapter(&out, None).unwrap().task;
    assert!(merged.layers.values().all(|d| d.rank() == Some(3)));
}

#[test]
fn merge_names_missing_or_malformed_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    write_adapter(&a, &lora_task("a", 4, 16, 1));
    let out = tmp.path().join("out");
    let missing = tmp.path().join("gone");
    let (_, err) = expect(&["merge", s(&a), s(&missing), "--out", s(&out)], 1);
    assert!(
        err.contains("gone") && err.contains("does not exist"),
        "{err}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (_, err) = expect(&["merge", s(&a), s(&empty), "--out", s(&out)], 1);
    assert!(err.contains("has no adapter_config.json"), "{err}");
    // A truncated weights file.
    let bad = tmp.path().join("bad");
    write_adapter(&bad, &lora_task("bad", 4, 16, 5));
    std::fs::write(
        bad.join("adapter_model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    let (_, err) = expect(&["merge", s(&a), s(&bad), "--out", s(&out)], 1);
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    // A NaN in one factor, an Inf in the other, integer factors: refused at
    // the file, before any merge or SVD (no libtorch frames on screen).
    for (name, poison) in [
        ("nan", Some(f64::NAN)),
        ("inf", Some(f64::INFINITY)),
        ("int", None),
    ] {
        let dir = tmp.path().join(name);
        write_adapter(&dir, &lora_task(name, 4, 16, 7));
        let w = dir.join("adapter_model.safetensors");
        let mut tensors = io::load(&w, Device::Cpu).unwrap();
        let which = if name == "inf" { "lora_B" } else { "lora_A" };
        let (key, t) = tensors.iter_mut().find(|(k, _)| k.contains(which)).unwrap();
        let key = key.clone();
        *t = match poison {
            Some(v) => t.index_fill(0, &Tensor::from_slice(&[0i64]), v),
            None => t.to_kind(Kind::Int),
        };
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        io::save(&w, &refs, None).unwrap();
        for method in ["ties", "svd"] {
            let (_, err) = expect(
                &[
                    "merge",
                    s(&a),
                    s(&dir),
                    "--out",
                    s(&out),
                    "--method",
                    method,
                ],
                1,
            );
            assert!(
                err.contains("adapter_model.safetensors") && err.contains(&key),
                "{err}"
            );
            assert!(!err.contains("frame #"), "{err}");
        }
    }
    // Shapes that disagree between adapters.
    let wide = tmp.path().join("wide");
    write_adapter(&wide, &lora_task("wide", 4, 24, 3));
    let (_, err) = expect(&["merge", s(&a), s(&wide), "--out", s(&out)], 1);
    assert!(err.contains(QUERY), "{err}");
    // A base model the adapters do not fit.
    let b = tmp.path().join("b");
    write_adapter(&b, &lora_task("b", 4, 16, 9));
    let model = tmp.path().join("tiny24");
    tiny_model(&model, 3, 24);
    let (_, err) = expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--model",
            s(&model),
        ],
        1,
    );
    assert!(
        err.contains("do not fit the model") && err.contains("[24, 24]"),
        "{err}"
    );
    let (_, err) = expect(
        &["merge", s(&a), s(&b), "--out", s(&out), "--weights", "1"],
        2,
    );
    assert!(err.contains("1 weights for 2 adapters"), "{err}");
    // A config the library rejects is a usage error.
    let (_, err) = expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--method",
            "sum",
            "--weights",
            "2,1",
        ],
        2,
    );
    assert!(err.contains("sum merge takes weight 1"), "{err}");
    let (_, err) = expect(
        &[
            "merge",
            s(&a),
            s(&b),
            "--out",
            s(&out),
            "--method",
            "ties",
            "--density",
            "1.5",
        ],
        2,
    );
    assert!(err.contains("density"), "{err}");
    assert!(!out.exists());
    no_temp_left(tmp.path());
}

#[test]
fn tune_lora_saves_a_peft_folder_that_merges_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model, 4, 16);
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, reviews(40, 0)).unwrap();
    let mut outs = Vec::new();
    for seed in ["0", "1"] {
        let out = tmp.path().join(format!("lora{seed}"));
        let (stdout, _) = expect(
            &[
                "tune",
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--model",
                s(&model),
                "--rank",
                "4",
                "--train-limit",
                "16",
                "--batch",
                "8",
                "--max-len",
                "16",
                "--seed",
                seed,
                "--quiet",
            ],
            0,
        );
        assert!(stdout.contains("accuracy validation"), "{stdout}");
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "head.safetensors",
            "tune.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let doc = json(&out.join("tune.json"));
        assert_eq!(doc["train_examples"], 16);
        assert_eq!(doc["validation"]["examples"], 4);
        assert_eq!(doc["num_labels"], 2);
        let acc = doc["validation"]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        outs.push(out);
    }
    no_temp_left(tmp.path());

    // pet-core loads the adapter back into the classifier it was trained on,
    // and the head has the classifier's shape.
    let bert = BertModel::from_folder(&model, Device::Cpu).unwrap();
    let mut clf = SequenceClassifier::new(bert, 2, Pooling::Mean).unwrap();
    pet_core::load_adapter(&mut clf, "task", &outs[0]).unwrap();
    let head = io::load(outs[0].join("head.safetensors"), Device::Cpu).unwrap();
    let w = head.iter().find(|(n, _)| n == "classifier.weight").unwrap();
    assert_eq!(w.1.size(), vec![2, 16]);
    let task = read_adapter(&outs[0], None).unwrap().task;
    assert!(
        task.layers
            .contains_key("bert.encoder.layer.0.attention.self.query")
            && task.layers.values().all(|d| d.rank() == Some(4)),
        "{:?}",
        task.layers.keys()
    );

    // Two tuned adapters merge, checked against the base model.
    let merged = tmp.path().join("merged");
    let (stdout, _) = expect(
        &[
            "merge",
            s(&outs[0]),
            s(&outs[1]),
            "--out",
            s(&merged),
            "--method",
            "dare_ties",
            "--density",
            "0.5",
            "--low-rank",
            "--model",
            s(&model),
            "--quiet",
        ],
        0,
    );
    assert!(stdout.contains("PEFT LoRA folder"), "{stdout}");
    let (stdout, _) = expect(&["inspect", s(&outs[0])], 0);
    assert!(
        stdout.contains("PEFT adapter (LORA)")
            && stdout.contains("tuning run")
            && stdout.contains("classifier.weight [2, 16]"),
        "{stdout}"
    );
}

#[test]
fn tune_vlpet_on_a_dataset_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model, 5, 16);
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("train.jsonl"), reviews(24, 0)).unwrap();
    std::fs::write(data.join("validation.jsonl"), reviews(6, 1)).unwrap();
    std::fs::write(data.join("test_id.jsonl"), reviews(8, 2)).unwrap();
    std::fs::write(data.join("test_ood.jsonl"), reviews(5, 3)).unwrap();
    let out = tmp.path().join("vl");
    let (stdout, _) = expect(
        &[
            "tune",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--model",
            s(&model),
            "--method",
            "vlpet",
            "--rank",
            "4",
            "--granularity",
            "middle-x",
            "--train-limit",
            "16",
            "--batch",
            "8",
            "--max-len",
            "16",
            "--quiet",
        ],
        0,
    );
    assert!(stdout.contains("accuracy test_id"), "{stdout}");
    assert!(stdout.contains("accuracy test_ood"), "{stdout}");
    let doc = json(&out.join("tune.json"));
    assert_eq!(doc["method"], "vlpet");
    assert_eq!(doc["test"]["examples"], 8);
    assert_eq!(doc["test_ood"]["examples"], 5);
    let cfg = json(&out.join("vlpet_config.json"));
    assert_eq!(cfg["vlpet"]["r"], 4);
    let saved = io::load(out.join("vlpet_model.safetensors"), Device::Cpu).unwrap();
    assert_eq!(saved.len() as u64, cfg["tensors"].as_u64().unwrap());
    assert!(saved.iter().any(|(n, _)| n == "classifier.weight"));
    let (stdout, _) = expect(&["inspect", s(&out)], 0);
    assert!(stdout.contains("VL-PET adapter"), "{stdout}");
}

#[test]
fn tune_names_missing_or_malformed_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model, 6, 16);
    let out = tmp.path().join("out");
    let data = tmp.path().join("data.jsonl");
    std::fs::write(
        &data,
        format!(
            "{}{{\"text\": \"good\", \"label\": \"yes\"}}\n",
            reviews(2, 0)
        ),
    )
    .unwrap();
    let run = |d: &Path, m: &Path| {
        expect(
            &[
                "tune",
                "--data",
                s(d),
                "--out",
                s(&out),
                "--model",
                s(m),
                "--quiet",
            ],
            1,
        )
        .1
    };
    let err = run(&data, &model);
    assert!(
        err.contains("data.jsonl:3") && err.contains("'label'"),
        "{err}"
    );
    std::fs::write(&data, "{\"text\": \"good\", \"label\": 1}\nnot json\n").unwrap();
    let err = run(&data, &model);
    assert!(
        err.contains("data.jsonl:2") && err.contains("not valid JSON"),
        "{err}"
    );
    let err = run(&tmp.path().join("none.jsonl"), &model);
    assert!(
        err.contains("none.jsonl") && err.contains("does not exist"),
        "{err}"
    );
    // Labels that make no sense: one class, ids with gaps, an id that would
    // allocate a huge head (refused at its line, before any allocation).
    let one_class = reviews(10, 0).replace("\"label\": 0", "\"label\": 1");
    std::fs::write(&data, one_class).unwrap();
    let err = run(&data, &model);
    assert!(err.contains("1 distinct label(s) ([1])"), "{err}");
    let gaps = reviews(10, 0).replace("\"label\": 1", "\"label\": 7");
    std::fs::write(&data, gaps).unwrap();
    let err = run(&data, &model);
    assert!(err.contains("6 never occur(s): 1, 2, 3, 4, 5, 6"), "{err}");
    std::fs::write(
        &data,
        format!(
            "{}{{\"text\": \"good\", \"label\": 1000000000000}}\n",
            reviews(4, 0)
        ),
    )
    .unwrap();
    let err = run(&data, &model);
    assert!(
        err.contains("data.jsonl:5") && err.contains("above the largest class id"),
        "{err}"
    );
    let folder = tmp.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("train.jsonl"), reviews(4, 0)).unwrap();
    let err = run(&folder, &model);
    assert!(err.contains("has no validation.jsonl"), "{err}");
    std::fs::write(&data, reviews(10, 0)).unwrap();
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let err = run(&data, &model);
    assert!(err.contains("has no tokenizer.json"), "{err}");
    assert!(!out.exists());
    no_temp_left(tmp.path());
}

#[test]
fn inspect_summarises_a_model_and_refuses_other_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    let m = tiny_model(&model, 8, 16);
    let (stdout, _) = expect(&["inspect", s(&model)], 0);
    let total = m.param_count().total;
    assert!(
        stdout.contains("model folder")
            && stdout.contains(&format!("({total})"))
            && stdout.contains("encoder.layer.*.intermediate.dense.weight")
            && stdout.contains("[32, 16] x2")
            && stdout.contains("tokenizer tokenizer.json"),
        "{stdout}"
    );
    let (stdout, _) = expect(&["inspect", s(&model), "--tensors"], 0);
    assert!(
        stdout.contains("encoder.layer.1.output.dense.weight"),
        "{stdout}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (_, err) = expect(&["inspect", s(&empty)], 1);
    assert!(
        err.contains("is not a model, adapter or split folder"),
        "{err}"
    );
    let (_, err) = expect(&["inspect", s(&tmp.path().join("nope"))], 1);
    assert!(err.contains("does not exist"), "{err}");
}

/// SIGTERM or SIGINT mid-run: the temporary output is removed and the
/// process ends by the signal (the shell's 143 / 130); a stale temporary
/// folder of a dead process is swept by the next run.
#[test]
fn interrupts_leave_nothing_behind_and_keep_the_signal_status() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model, 6, 16);
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, reviews(400, 0)).unwrap();
    let out = tmp.path().join("out");
    let stale = tmp.path().join(".out.tmp-4294967295");
    std::fs::create_dir(&stale).unwrap();
    for (sig, name) in [(15, "TERM"), (2, "INT")] {
        let child = Command::new(env!("CARGO_BIN_EXE_modular"))
            .args([
                "tune",
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--model",
                s(&model),
                "--quiet",
                "--epochs",
                "200",
            ])
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until training is under way (the stale folder is swept first).
        let t0 = std::time::Instant::now();
        while stale.exists() && t0.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let killed = Command::new("kill")
            .args([format!("-{name}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            o.status.signal(),
            Some(sig),
            "{:?}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !stale.exists(),
            "a dead process's temporary folder is swept"
        );
        assert!(!out.exists());
        no_temp_left(tmp.path());
    }
}
