//! `modular profile` end to end: the built binary on a random tiny BERT
//! folder and JSONL corpora made here, its files checked against
//! configurable-bricks run directly (profile, FuncScores, functional sets,
//! overlap), plus malformed inputs and their exit codes (1: the work failed,
//! 2: a malformed command line).

mod common;

use std::path::Path;

use common::{expect, json, no_temp_left, s, tiny_model};
use configurable_bricks::{
    AttributionConfig, OverlapFormula, Profile, ProfileConfig, Profiler, ResidentRule, SetConfig,
    TopScope, func_scores, functional_sets, overlap_matrix,
};
use model_zoo::bert::BertModel;
use model_zoo::tokenizer::TextTokenizer;
use tensor_core::io::SafetensorsFile;
use tensor_core::tch::{Device, Kind};

/// Label names as the command sorts them.
const LABELS: [&str; 3] = ["neg", "pos", "story"];

/// `n` labelled lines of varied lengths (so batches pad): line `i` has label
/// `LABELS[(i + 1) % 3]`, i.e. pos, story, neg, pos, ...
fn corpus(n: usize) -> (String, Vec<String>, Vec<usize>) {
    let words: [&[&str]; 3] = [
        &["bad", "awful", "poor", "boring", "dull"],
        &["good", "great", "fine", "nice", "fun"],
        &["plot", "acting", "story", "film", "movie"],
    ];
    let (mut lines, mut texts, mut labels) = (String::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let l = (i + 1) % 3;
        let extra = vec!["very"; i % 4].join(" ");
        let text = format!(
            "the movie was {extra} {} {}",
            words[l][i % 5],
            words[l][(i + 2) % 5]
        );
        lines.push_str(&format!(
            "{{\"text\": \"{text}\", \"label\": \"{}\"}}\n",
            LABELS[l]
        ));
        texts.push(text);
        labels.push(l);
    }
    (lines, texts, labels)
}

fn run_ok(args: &[&str]) -> String {
    expect(args, 0).0
}

#[test]
fn profile_writes_what_the_library_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("tiny");
    tiny_model(&model_dir, 11, 16);
    let data = tmp.path().join("data.jsonl");
    let (lines, texts, labels) = corpus(30);
    std::fs::write(&data, lines).unwrap();
    let out = tmp.path().join("prof");
    let args = [
        "profile",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--model",
        s(&model_dir),
        "--batch",
        "7",
        "--max-len",
        "16",
        "--top-fraction",
        "0.1",
        "--quiet",
    ];
    let stdout = run_ok(&args);
    assert!(stdout.contains("examples/s"), "{stdout}");
    for l in LABELS {
        assert!(stdout.contains(&format!("| {l} | 10 |")), "{stdout}");
    }
    assert!(
        stdout.contains("vs") && stdout.contains("random"),
        "{stdout}"
    );
    no_temp_left(tmp.path());

    // The saved profile equals a direct Profiler run on the same texts, in
    // one batch (other padding) on the same model.
    let profile = Profile::open(out.join("profile.safetensors")).unwrap();
    assert_eq!(profile.labels, labels);
    assert_eq!(profile.functions, LABELS);
    assert_eq!(profile.config, ProfileConfig::default());
    let saved = profile.matrix().unwrap();
    assert_eq!(saved.size(), vec![30, 64]);
    let model = BertModel::from_folder(&model_dir, Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(model_dir.join("tokenizer.json"), 16, 32).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let enc = tok.encode_batch(&refs, Device::Cpu).unwrap();
    let profiler = Profiler::new(&model, ProfileConfig::default()).unwrap();
    assert_eq!(profiler.sites, profile.sites);
    let direct = profiler
        .profile_batch(&model, &enc.input_ids, &enc.attention_mask, None)
        .unwrap();
    let diff = (&saved - &direct).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "saved vs direct profile: max |diff| {diff}");

    // FuncScores: [labels, neurons], exactly the library's AP on the profile.
    let names: Vec<String> = LABELS.iter().map(|l| l.to_string()).collect();
    let scores = func_scores(&saved, &labels, &names, &AttributionConfig::default()).unwrap();
    let file = SafetensorsFile::open(out.join("func_scores.safetensors")).unwrap();
    let (kind, shape) = file.info("func_scores").unwrap();
    assert_eq!((kind, shape), (Kind::Double, vec![3, 64]));
    let t = file.load("func_scores", Device::Cpu).unwrap();
    for f in 0..3 {
        let col = scores.column(f);
        for (n, want) in col.iter().enumerate() {
            assert_eq!(t.double_value(&[f as i64, n as i64]), *want, "f {f} n {n}");
        }
    }
    let meta = file.metadata().unwrap();
    assert_eq!(meta["functions"], r#"["neg","pos","story"]"#);

    // bricks.json: per layer and label the top 10% (round(3.2) = 3 of 32),
    // the library's sets in layer-local indices, and their overlaps.
    let cfg = SetConfig {
        top_fraction: 0.1,
        top_scope: TopScope::PerLayer,
        resident_rule: ResidentRule::None,
    };
    let sets = functional_sets(&scores, &profile.sites, &cfg, None).unwrap();
    let bricks = json(&out.join("bricks.json"));
    assert_eq!(bricks["labels"], serde_json::json!(LABELS));
    let layers = bricks["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (li, layer) in layers.iter().enumerate() {
        assert_eq!(layer["d_ff"], 32);
        let offset = 32 * li;
        let mut local_sets = Vec::new();
        for f in 0..3 {
            let got: Vec<usize> = layer["sets"][f]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.len(), 3, "layer {li} label {f}");
            let want: Vec<usize> = sets[f]
                .iter()
                .filter(|&&n| n >= offset && n < offset + 32)
                .map(|&n| n - offset)
                .collect();
            assert_eq!(got, want, "layer {li} label {f}");
            // Each is the top 3 of that layer's FuncScores for the label.
            let col = &scores.column(f)[offset..offset + 32];
            let min_in = got.iter().map(|&n| col[n]).fold(f64::INFINITY, f64::min);
            let max_out = (0..32)
                .filter(|n| !got.contains(n))
                .map(|n| col[n])
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(min_in >= max_out, "layer {li} label {f}");
            local_sets.push(got);
        }
        let o = overlap_matrix(&local_sets, OverlapFormula::OverSize).unwrap();
        assert_eq!(layer["overlap"], serde_json::json!(o));
        for (f, row) in layer["random_overlap"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for (g, v) in row.as_array().unwrap().iter().enumerate() {
                let v = v.as_f64().unwrap();
                if f == g {
                    assert!((v - 1.0).abs() < 1e-9, "random self-overlap {v}");
                } else {
                    // E|S_f ∩ S_g| / |S_f| = 3 / 32 for random 3-sets.
                    assert!((v - 3.0 / 32.0).abs() < 0.05, "random overlap {v}");
                }
            }
        }
    }
    let whole = overlap_matrix(&sets, OverlapFormula::OverSize).unwrap();
    assert_eq!(bricks["model"]["overlap"], serde_json::json!(whole));

    // profile.json: options, sizes, labels, speed, summary.
    let doc = json(&out.join("profile.json"));
    assert_eq!(doc["examples"], 30);
    assert_eq!(doc["neurons_per_layer"], serde_json::json!([32, 32]));
    assert_eq!(doc["neurons"], 64);
    assert_eq!(doc["labels"], serde_json::json!(LABELS));
    assert_eq!(doc["label_counts"], serde_json::json!([10, 10, 10]));
    assert_eq!(doc["options"]["batch"], 7);
    assert_eq!(doc["options"]["max_len"], 16);
    assert_eq!(doc["options"]["top_fraction"], 0.1);
    assert!(doc["examples_per_second"].as_f64().unwrap() > 0.0);
    assert!(doc["seconds"].as_f64().unwrap() > 0.0);
    let per_label = doc["summary"]["per_label"].as_array().unwrap();
    assert_eq!(per_label.len(), 3);
    for (f, p) in per_label.iter().enumerate() {
        let layer = p["best_layer"].as_u64().unwrap() as usize;
        let col = scores.column(f);
        let mean = |l: usize| col[32 * l..32 * l + 32].iter().sum::<f64>() / 32.0;
        assert!(mean(layer) >= mean(1 - layer), "label {f}");
    }
    let mean_overlap = doc["summary"]["mean_overlap"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean_overlap));

    // An existing output is replaced only with --force.
    let (_, err) = expect(&args, 1);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let mut forced = args.to_vec();
    forced.push("--force");
    run_ok(&forced);
    no_temp_left(tmp.path());
}

#[test]
fn profile_without_labels_or_with_one_label_writes_the_profile_only() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("tiny");
    tiny_model(&model_dir, 12, 16);
    // A dataset folder: its train.jsonl, unlabelled; --limit takes the first 5.
    let folder = tmp.path().join("set");
    std::fs::create_dir(&folder).unwrap();
    let lines: String = (0..9)
        .map(|i| format!("{{\"text\": \"the film was {}\"}}\n", common::WORDS[i]))
        .collect();
    std::fs::write(folder.join("train.jsonl"), lines).unwrap();
    let out = tmp.path().join("p1");
    let stdout = run_ok(&[
        "profile",
        "--data",
        s(&folder),
        "--out",
        s(&out),
        "--model",
        s(&model_dir),
        "--limit",
        "5",
        "--quiet",
    ]);
    assert!(stdout.contains("profile only"), "{stdout}");
    let profile = Profile::open(out.join("profile.safetensors")).unwrap();
    assert_eq!(profile.examples(), 5);
    assert_eq!(profile.neurons(), 64);
    assert!(!out.join("func_scores.safetensors").exists());
    assert!(!out.join("bricks.json").exists());
    let doc = json(&out.join("profile.json"));
    assert_eq!(doc["examples"], 5);
    assert_eq!(doc["labelled"], false);
    assert_eq!(doc["options"]["limit"], 5);
    assert!(doc["data"].as_str().unwrap().ends_with("train.jsonl"));
    assert!(doc["files"]["bricks"].is_null());

    // Integer labels, all the same: profiled under that label, no FuncScores.
    let data = tmp.path().join("one.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"good film\", \"label\": 1}\n\n{\"text\": \"bad film\", \"label\": 1}\n",
    )
    .unwrap();
    let out = tmp.path().join("p2");
    let stdout = run_ok(&[
        "profile",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--model",
        s(&model_dir),
        "--quiet",
    ]);
    assert!(stdout.contains("one label only"), "{stdout}");
    let profile = Profile::open(out.join("profile.safetensors")).unwrap();
    assert_eq!(profile.functions, ["1"]);
    assert_eq!(profile.labels, [0, 0]);
    assert!(!out.join("bricks.json").exists());

    // --label-field picks another field; two values make FuncScores.
    std::fs::write(
        &data,
        "{\"text\": \"good film\", \"kind\": \"b\"}\n{\"text\": \"bad plot\", \"kind\": \"a\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("p3");
    run_ok(&[
        "profile",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--model",
        s(&model_dir),
        "--label-field",
        "kind",
        "--quiet",
    ]);
    let profile = Profile::open(out.join("profile.safetensors")).unwrap();
    assert_eq!(profile.functions, ["a", "b"]);
    assert_eq!(profile.labels, [1, 0]);
    assert_eq!(
        json(&out.join("bricks.json"))["labels"],
        serde_json::json!(["a", "b"])
    );
    no_temp_left(tmp.path());
}

#[test]
fn a_label_field_no_line_has_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("c.jsonl");
    std::fs::write(&data, "{\"text\": \"a b\", \"function\": \"x\"}\n").unwrap();
    let out = tmp.path().join("out");
    let (_, err) = expect(
        &[
            "profile",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--label-field",
            "topic",
        ],
        2,
    );
    assert!(
        err.contains("--label-field 'topic': no line of") && err.contains("c.jsonl"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn profile_help_and_usage_errors_exit_2() {
    let (out, _) = expect(&["profile", "--help"], 0);
    assert!(
        out.contains("usage: modular profile") && out.contains("examples:"),
        "{out}"
    );
    let (out, _) = expect(&["help"], 0);
    assert!(out.contains("modular profile"), "{out}");
    // Checked before any input is read: the paths here do not exist.
    let cases: &[(&[&str], &str)] = &[
        (&["--out", "o"], "missing --data"),
        (&["--data", "d"], "missing --out"),
        (
            &["--top-fraction", "2"],
            "--top-fraction must be in (0, 1], got 2",
        ),
        (&["--top-fraction", "0"], "--top-fraction must be in (0, 1]"),
        (&["--top-fraction", "many"], "--top-fraction 'many'"),
        (&["--batch", "0"], "--batch must be at least 1"),
        (&["--max-len", "1"], "--max-len must be at least 2"),
        (&["--limit", "0"], "--limit must be at least 1"),
        (&["--label-field", "text"], "--label-field 'text'"),
        (&["--frobnicate", "1"], "unknown option '--frobnicate'"),
        (&["stray"], "unexpected argument 'stray'"),
    ];
    for (extra, msg) in cases {
        let mut args = vec!["profile"];
        if !extra.contains(&"--out") && !extra.contains(&"--data") {
            args.extend(["--data", "nowhere.jsonl", "--out", "nowhere"]);
        }
        args.extend(*extra);
        let (_, err) = expect(&args, 2);
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(err.contains("modular profile --help"), "{err}");
    }
    assert!(!Path::new("nowhere").exists());
}

#[test]
fn profile_names_missing_or_malformed_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("tiny");
    tiny_model(&model_dir, 13, 16);
    let out = tmp.path().join("out");
    let data = tmp.path().join("data.jsonl");
    let run = |d: &Path, m: &Path| {
        expect(
            &[
                "profile",
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
    let good = "{\"text\": \"good film\", \"label\": 0}\n";
    let bad_data: &[(String, &str)] = &[
        (format!("{good}not json\n"), "data.jsonl:2: not valid JSON"),
        (
            format!("{good}{{\"label\": 1}}\n"),
            "data.jsonl:2: no 'text' field",
        ),
        (
            format!("{good}\n{{\"text\": 3, \"label\": 1}}\n"),
            "data.jsonl:3: 'text' is not a string",
        ),
        (
            format!("{good}{{\"text\": \"bad\", \"label\": 1.5}}\n"),
            "data.jsonl:2: 'label' is not an integer or a string",
        ),
        (
            format!("{good}{{\"text\": \"bad\"}}\n"),
            "data.jsonl:2: no 'label' field but line 1 has one",
        ),
        (format!("{good}[1, 2]\n"), "data.jsonl:2: not a JSON object"),
        ("\n\n".to_owned(), "data.jsonl: no examples"),
    ];
    for (content, msg) in bad_data {
        std::fs::write(&data, content).unwrap();
        let err = run(&data, &model_dir);
        assert!(err.contains(msg), "{content:?}: {err}");
    }
    std::fs::write(&data, good).unwrap();

    let err = run(&tmp.path().join("none.jsonl"), &model_dir);
    assert!(
        err.contains("none.jsonl") && err.contains("does not exist"),
        "{err}"
    );
    let folder = tmp.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let err = run(&folder, &model_dir);
    assert!(err.contains("has no train.jsonl"), "{err}");

    // Model folders: missing, a file, empty, malformed config, no tokenizer.
    let err = run(&data, &tmp.path().join("absent"));
    assert!(
        err.contains("absent") && err.contains("does not exist"),
        "{err}"
    );
    let err = run(&data, &data);
    assert!(err.contains("is not a folder"), "{err}");
    let err = run(&data, &folder);
    assert!(err.contains("has no config.json"), "{err}");
    let broken = tmp.path().join("broken");
    tiny_model(&broken, 14, 16);
    std::fs::write(broken.join("config.json"), "{\"model_type\": ").unwrap();
    let err = run(&data, &broken);
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    let err = run(&data, &model_dir);
    assert!(err.contains("has no tokenizer.json"), "{err}");

    assert!(!out.exists());
    no_temp_left(tmp.path());
}
