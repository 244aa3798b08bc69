//! The demo's steps in fast mode (what `cargo xtask demo` runs, with tiny
//! budgets) and `modular distill` end to end, on the packaged
//! all-MiniLM-L6-v2 and the project's data.

mod common;

use tensor_core::tch::Tensor;

use common::{expect, json, reviews, s};

/// The number after `key` in `text` (e.g. `"max |err| "` -> 1.9e-6).
fn number_after(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no '{key}' in\n{text}"))
        + key.len()..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e'))
        .collect();
    num.trim_end_matches('.')
        .parse()
        .unwrap_or_else(|e| panic!("'{num}' after '{key}': {e}"))
}

#[test]
fn demo_fast_runs_every_step_and_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let (stdout, _) = expect(&["demo", "--fast", "--out", s(&out)], 0);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for step in [
        "embed + rank",
        "EMoE split, 6 FFNs x 16 experts",
        "tune: LoRA",
        "tune: VL-PET middle-Y",
        "orthogonal adapters x2, summed",
        "functional bricks",
        "m2mKD: MiniLM -> 3 MoE modules",
    ] {
        assert!(stdout.contains(step), "step '{step}' missing:\n{stdout}");
        assert!(
            report.contains(&format!("| {step}")),
            "report lacks '{step}':\n{report}"
        );
    }
    // Exact invariants the steps check on the real model.
    assert!(number_after(&report, "8 grouped experts = dense FFN (max \\|err\\| ") < 1e-4);
    assert!(
        number_after(
            &report,
            "with all 16 experts the embeddings equal the dense model's (max |err| "
        ) < 1e-4
    );
    assert!(
        number_after(&report, "\\|cos\\| between deltas ") < 1e-5,
        "orthogonal deltas"
    );
    // The bricks step: 8 train examples per functionality, five functionalities.
    assert!(
        report.contains("Bricks: 40 examples x 9216 FFN neurons"),
        "{report}"
    );
    for svg in [
        "accuracy.svg",
        "emoe_objective.svg",
        "bricks_perturbation.svg",
    ] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert!(report.contains(&format!("]({svg})")), "report links {svg}");
    }
    assert!(out.join("bricks_profile.safetensors").is_file());
}

#[test]
fn distill_writes_modules_student_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("train.jsonl"), reviews(48, 0)).unwrap();
    std::fs::write(data.join("validation.jsonl"), reviews(8, 100)).unwrap();
    std::fs::write(data.join("test_id.jsonl"), reviews(16, 200)).unwrap();
    std::fs::write(data.join("test_ood.jsonl"), reviews(12, 300)).unwrap();
    let out = tmp.path().join("student");
    let args = [
        "distill",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--modules",
        "2",
        "--student-width",
        "64",
        "--experts",
        "2",
        "--steps",
        "4",
        "--teacher-steps",
        "2",
        "--meta-steps",
        "1",
        "--incubate-steps",
        "1",
        "--batch",
        "8",
        "--max-len",
        "12",
        "--baselines",
        "--quiet",
    ];
    let (stdout, _) = expect(&args, 0);
    assert!(stdout.contains("module 1 distilled 2 steps"), "{stdout}");
    let doc = json(&out.join("distill.json"));
    assert_eq!(doc["format"], "modular-distill");
    assert_eq!(doc["divided_depths"], serde_json::json!([3, 3]));
    assert_eq!(doc["options"]["distil_steps"], 2);
    for k in [
        "teacher",
        "meta",
        "student_assembled",
        "student",
        "baseline_scratch",
        "baseline_logit_kd",
    ] {
        let acc = doc[k]["test"]["accuracy"]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {doc}"));
        assert!((0.0..=1.0).contains(&acc), "{k}");
        assert_eq!(doc[k]["test"]["examples"], 16, "{k}");
        assert_eq!(doc[k]["test_ood"]["examples"], 12, "{k}");
    }
    assert_eq!(doc["modules"].as_array().unwrap().len(), 2);
    // Every distilled module holds its stitches (widths 64 <-> 384): the
    // first module (embeddings) only the one out, the last only the one in.
    for (i, side, shape) in [
        (0, "stitch_post.", [384, 64]),
        (1, "stitch_pre.", [64, 384]),
    ] {
        let t =
            Tensor::read_safetensors(out.join(format!("modules/module_{i}.safetensors"))).unwrap();
        assert!(
            t.iter()
                .any(|(n, w)| n.starts_with(side) && w.size() == shape),
            "module {i}: no {side}* of shape {shape:?} in {:?}",
            t.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
        );
    }
    // The student: every parameter saved, the count in distill.json.
    let student = Tensor::read_safetensors(out.join("student.safetensors")).unwrap();
    let total: i64 = student.iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(doc["student_model"]["params"].as_i64(), Some(total));
    // moe-router's MoeLayer keeps its experts stacked: `experts.w1` is [E, ...].
    assert!(
        student
            .iter()
            .any(|(n, t)| n.ends_with("experts.w1") && t.size()[0] == 2),
        "MoE experts saved: {:?}",
        student.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn distill_names_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (out_s, _) = expect(&["distill", "--help"], 0);
    assert!(out_s.contains("usage: modular distill") && out_s.contains("examples:"));
    let (_, err) = expect(&["distill", "--out", s(&out)], 2);
    assert!(err.contains("missing --data"), "{err}");
    let (_, err) = expect(
        &[
            "distill",
            "--data",
            "d",
            "--out",
            s(&out),
            "--student-width",
            "30",
        ],
        2,
    );
    assert!(
        err.contains("--student-width 30") && err.contains("multiple of"),
        "{err}"
    );
    let (_, err) = expect(
        &["distill", "--data", "d", "--out", s(&out), "--experts", "1"],
        2,
    );
    assert!(err.contains("--experts"), "{err}");
    // Step counts are checked alike in every command: at least 1.
    for flag in [
        "--teacher-steps",
        "--meta-steps",
        "--incubate-steps",
        "--steps",
    ] {
        let (_, err) = expect(&["distill", "--data", "d", "--out", s(&out), flag, "0"], 2);
        assert!(err.contains(&format!("{flag} must be at least 1")), "{err}");
    }
    let (_, err) = expect(
        &["distill", "--data", "d", "--out", s(&out), "--steps", "1"],
        2,
    );
    assert!(err.contains("--steps"), "{err}");
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, reviews(20, 0)).unwrap();
    let (_, err) = expect(
        &[
            "distill",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--modules",
            "7",
        ],
        2,
    );
    assert!(
        err.contains("--modules 7") && err.contains("6 layers"),
        "{err}"
    );
    let (_, err) = expect(
        &[
            "distill",
            "--data",
            s(&tmp.path().join("none")),
            "--out",
            s(&out),
        ],
        1,
    );
    assert!(err.contains("does not exist"), "{err}");
    std::fs::write(&data, "{\"text\": \"ok\", \"label\": 1}\nnot json\n").unwrap();
    let (_, err) = expect(&["distill", "--data", s(&data), "--out", s(&out)], 1);
    assert!(
        err.contains("d.jsonl") && err.contains('2'),
        "names the file and line: {err}"
    );
    assert!(!out.exists());
}
