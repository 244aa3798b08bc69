//! `modular eval`, `predict` and `embed` end to end on the packaged
//! all-MiniLM-L6-v2 and slices of the project's sentiment data: eval
//! reproduces the accuracy `tune` printed (LoRA on a dataset folder, VL-PET
//! on one file split as tune splits it), predict agrees with eval, embed
//! writes what the library's sentence encoder computes, and bad inputs get
//! exit codes 1 / 2 with the file or flag named.

mod common;

use std::path::Path;

use model_zoo::bert::SentenceEncoder;
use model_zoo::source::ModelSource;
use serde_json::Value;
use tensor_core::io;
use tensor_core::tch::{Device, Tensor};

use common::{expect, json, no_temp_left, s};

/// The first `n` lines of the project's `data/sentiment_domains/{file}`.
fn lines(file: &str, n: usize) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/sentiment_domains")
        .join(file);
    let text = std::fs::read_to_string(p).unwrap();
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// The number after `key` on stdout.
fn after(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no '{key}' in\n{text}"))
        + key.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn set<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no set '{name}' in {doc}"))
}

#[test]
fn eval_reproduces_tune_and_predict_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("train.jsonl"), lines("train.jsonl", 64)).unwrap();
    std::fs::write(data.join("validation.jsonl"), lines("validation.jsonl", 40)).unwrap();
    std::fs::write(data.join("test_id.jsonl"), lines("test_id.jsonl", 40)).unwrap();
    std::fs::write(data.join("test_ood.jsonl"), lines("test_ood.jsonl", 30)).unwrap();
    let common = [
        "--epochs",
        "1",
        "--batch",
        "16",
        "--max-len",
        "32",
        "--quiet",
        "--lr",
        "2e-3",
    ];

    // LoRA on a dataset folder: validation, test_id and test_ood reproduced exactly.
    let lora = tmp.path().join("lora");
    let mut args = vec!["tune", "--data", s(&data), "--out", s(&lora)];
    args.extend(common);
    let (tuned, _) = expect(&args, 0);
    let rec = json(&lora.join("tune.json"));
    let (text, _) = expect(&["eval", s(&lora)], 0);
    for (name, key) in [
        ("validation", "accuracy validation "),
        ("test_id", "accuracy test_id    "),
        ("test_ood", "accuracy test_ood   "),
    ] {
        let printed = after(&tuned, key);
        let again = after(&text, &format!("accuracy {name:<10} "));
        assert_eq!(
            printed, again,
            "{name}: tune printed {printed}, eval {again}\n{text}"
        );
    }
    let (doc, _) = expect(&["eval", s(&lora), "--data", s(&data), "--json"], 0);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for name in ["validation", "test_id", "test_ood"] {
        let key = if name == "test_id" { "test" } else { name };
        assert_eq!(set(&doc, name)["accuracy"], rec[key]["accuracy"], "{name}");
        assert_eq!(set(&doc, name)["mcc"], rec[key]["mcc"], "{name}");
    }
    let cm = &set(&doc, "test_id")["confusion"]["counts"];
    let total: u64 = cm
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(total, 40);

    // predict: one line per input, probabilities summing to 1, and the same
    // accuracy as eval on that file.
    let test = data.join("test_id.jsonl");
    let out = tmp.path().join("pred.jsonl");
    expect(
        &["predict", s(&lora), "--data", s(&test), "--out", s(&out)],
        0,
    );
    let preds: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gold = model_zoo::data::load_jsonl(&test).unwrap();
    assert_eq!(preds.len(), gold.len());
    let mut right = 0;
    for (p, g) in preds.iter().zip(&gold) {
        let probs: Vec<f64> = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 2);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(p["text"], g.text.as_str());
        right += usize::from(p["label"].as_i64().unwrap() == g.label);
    }
    assert_eq!(
        right as f64 / gold.len() as f64,
        set(&doc, "test_id")["accuracy"].as_f64().unwrap()
    );
    // Standard output carries the same lines.
    let (stdout, _) = expect(&["predict", s(&lora), "--data", s(&test)], 0);
    assert_eq!(stdout, std::fs::read_to_string(&out).unwrap());

    // VL-PET on one file, split 90 / 10 by tune's seed: eval without --data
    // scores the same held-out tenth.
    let file = tmp.path().join("all.jsonl");
    std::fs::write(&file, lines("train.jsonl", 80)).unwrap();
    let vl = tmp.path().join("vl");
    let mut args = vec![
        "tune",
        "--data",
        s(&file),
        "--out",
        s(&vl),
        "--method",
        "vlpet",
        "--rank",
        "8",
        "--seed",
        "3",
    ];
    args.extend(common);
    let (tuned, _) = expect(&args, 0);
    let (text, _) = expect(&["eval", s(&vl)], 0);
    assert_eq!(
        after(&tuned, "accuracy validation "),
        after(&text, "accuracy validation "),
        "{tuned}\n{text}"
    );

    // Bad inputs.
    let (_, err) = expect(&["eval", s(&data)], 1);
    assert!(err.contains("has no tune.json"), "{err}");
    let (_, err) = expect(&["eval"], 2);
    assert!(err.contains("no tuned folder given"), "{err}");
    let three = tmp.path().join("three.jsonl");
    std::fs::write(
        &three,
        "{\"text\": \"fine\", \"label\": 0}\n{\"text\": \"odd\", \"label\": 2}\n",
    )
    .unwrap();
    let (_, err) = expect(&["eval", s(&lora), "--data", s(&three)], 1);
    assert!(
        err.contains("three.jsonl: example 2 has label 2") && err.contains("2 classes"),
        "{err}"
    );
    let (_, err) = expect(&["predict", s(&lora)], 2);
    assert!(err.contains("missing --data"), "{err}");
    let (_, err) = expect(
        &["predict", s(&lora), "--data", s(&test), "--out", s(&test)],
        2,
    );
    assert!(err.contains("would overwrite the input --data"), "{err}");
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in std::fs::read_dir(&lora).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(broken.join("head.safetensors"), b"not a safetensors file").unwrap();
    let (_, err) = expect(&["eval", s(&broken)], 1);
    assert!(err.contains("head.safetensors"), "{err}");
    no_temp_left(tmp.path());
}

#[test]
fn embed_writes_the_sentence_encoders_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("texts.jsonl");
    std::fs::write(&data, lines("test_ood.jsonl", 70)).unwrap();
    let st = tmp.path().join("e.safetensors");
    let (stdout, _) = expect(
        &[
            "embed",
            "--data",
            s(&data),
            "--out",
            s(&st),
            "--batch",
            "32",
        ],
        0,
    );
    assert!(
        stdout.contains("70 embeddings of width 384 (L2-normalised)"),
        "{stdout}"
    );
    let got = io::load(&st, Device::Cpu).unwrap();
    assert_eq!(got.len(), 1);
    let e = &got[0].1;
    assert_eq!(e.size(), [70, 384]);
    // The library's encoder on the same batches.
    let source = ModelSource::packaged_default().unwrap();
    let enc = SentenceEncoder::from_folder(&source.dir, Device::Cpu).unwrap();
    let texts = model_zoo::data::load_texts(&data).unwrap();
    let parts: Vec<Tensor> = texts
        .chunks(32)
        .map(|c| {
            enc.embed(&c.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap()
        })
        .collect();
    let want = Tensor::cat(&parts, 0);
    assert!(e.allclose(&want, 0.0, 1e-6, false));
    let norms = e.norm_scalaropt_dim(2, [1], false);
    assert!(norms.allclose(
        &Tensor::ones([70], (norms.kind(), Device::Cpu)),
        1e-5,
        1e-5,
        false
    ));
    // JSONL: the same rows.
    let jl = tmp.path().join("e.jsonl");
    expect(
        &[
            "embed",
            "--data",
            s(&data),
            "--out",
            s(&jl),
            "--batch",
            "32",
        ],
        0,
    );
    let rows: Vec<Value> = std::fs::read_to_string(&jl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 70);
    let row: Vec<f32> = rows[5]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert!(Tensor::from_slice(&row).allclose(&e.get(5), 0.0, 1e-6, false));
    // Bad inputs.
    let (_, err) = expect(&["embed", "--data", s(&data), "--out", "x.txt"], 2);
    assert!(
        err.contains("name a .safetensors or a .jsonl file"),
        "{err}"
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"txt\": \"no\"}\n").unwrap();
    let (_, err) = expect(
        &[
            "embed",
            "--data",
            s(&bad),
            "--out",
            s(&tmp.path().join("b.safetensors")),
        ],
        1,
    );
    assert!(
        err.contains("bad.jsonl:2") && err.contains("no 'text' field"),
        "{err}"
    );
    no_temp_left(tmp.path());
}
