//! `modular generate` on the tiny Llama fixture (made by
//! `crates/model-zoo/scripts/make_decoder_fixtures.py`): the completions are
//! transformers' greedy ones, a single prompt streams, bad inputs are named,
//! and per-prompt LoRA adapters in one batch give each prompt what its
//! adapter alone gives.

mod common;

use std::path::PathBuf;

use common::{expect, s};
use model_zoo::llama::{GenerateOptions, LlamaForCausalLM};
use model_zoo::tokenizer::TextTokenizer;
use pet_core::{LoraConfig, LoraInit};
use serde_json::Value;
use tensor_core::tch::{Device, Kind};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model-zoo/tests/fixtures/tiny-llama")
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn completions_are_transformers_greedy_ones() {
    let want: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("generate.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    let text: String = want
        .iter()
        .map(|w| format!("{}\n", serde_json::json!({"prompt": w["prompt"]})))
        .collect();
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("out.jsonl");
    let m = fixture();
    expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-new-tokens",
            "8",
            "--batch",
            "2",
        ],
        0,
    );
    let got = lines(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["prompt"], w["prompt"]);
        assert_eq!(g["tokens"], w["tokens"], "{g}");
        assert_eq!(g["completion"], w["completion"], "{g}");
    }
    // One prompt streams its continuation to stdout.
    let (stdout, _) = expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "the cat sat",
            "--max-new-tokens",
            "8",
        ],
        0,
    );
    assert_eq!(stdout.trim_end(), want[0]["completion"].as_str().unwrap());
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture();
    let data = dir.path().join("p.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    let (_, err) = expect(&["generate", "--model", s(&m), "--data", s(&data)], 1);
    assert!(err.contains("p.jsonl:2") && err.contains("prompt"), "{err}");
    std::fs::write(&data, "{\"prompt\": \"a\", \"adapter\": \"x\"}\n").unwrap();
    let (_, err) = expect(&["generate", "--model", s(&m), "--data", s(&data)], 1);
    assert!(err.contains("adapter 'x'"), "{err}");
    expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "a",
            "--data",
            s(&data),
        ],
        2,
    );
    expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "a",
            "--top-p",
            "0.9",
        ],
        2,
    );
    let (_, err) = expect(&["generate", "--model", s(dir.path()), "--prompt", "a"], 1);
    assert!(err.contains("config.json"), "{err}");
}

/// Two LoRA adapters and the base model, one prompt each, in one batch:
/// every row equals generating with its own adapter alone.
#[test]
fn per_prompt_adapters_share_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture();
    let targets = ["q_proj", "v_proj", "gate_proj", "down_proj"];
    let mut model = LlamaForCausalLM::from_folder(&m, Device::Cpu).unwrap();
    for (name, seed) in [("a", 1), ("b", 2)] {
        let mut cfg = LoraConfig::new(4, 16.0, &targets);
        cfg.init = LoraInit::Random;
        cfg.seed = seed;
        pet_core::add_lora(&mut model, name, &cfg).unwrap();
        pet_core::save_adapter(&model, name, dir.path().join(name)).unwrap();
    }
    let prompts = ["the cat sat", "rust is", "we read books at"];
    let adapters = ["a", "b", pet_core::BASE];
    let data = dir.path().join("p.jsonl");
    let text: String = prompts
        .iter()
        .zip(adapters)
        .map(|(p, a)| {
            let a = if a == pet_core::BASE {
                Value::Null
            } else {
                a.into()
            };
            format!("{}\n", serde_json::json!({"prompt": p, "adapter": a}))
        })
        .collect();
    std::fs::write(&data, text).unwrap();
    let spec = format!(
        "a={},b={}",
        s(&dir.path().join("a")),
        s(&dir.path().join("b"))
    );
    let (stdout, _) = expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--adapters",
            &spec,
            "--max-new-tokens",
            "6",
        ],
        0,
    );
    let got = lines(&stdout);
    let tok = TextTokenizer::for_decoder(m.join("tokenizer.json"), 96, Some(0)).unwrap();
    let opts = GenerateOptions::greedy(model.config(), 6);
    for ((p, a), g) in prompts.iter().zip(adapters).zip(&got) {
        let enc = tok.encode_batch(&[p], Device::Cpu).unwrap();
        let out = if a == pet_core::BASE {
            pet_core::with_adapters_disabled(&mut model, |m| {
                Ok(m.generate(&enc.input_ids, Some(&enc.attention_mask), &opts)
                    .unwrap())
            })
            .unwrap()
        } else {
            pet_core::set_adapter(&mut model, &[a]).unwrap();
            model
                .generate(&enc.input_ids, Some(&enc.attention_mask), &opts)
                .unwrap()
        };
        let t = enc.input_ids.size()[1];
        let new: Vec<i64> = Vec::try_from(
            out.narrow(1, t, out.size()[1] - t)
                .flatten(0, -1)
                .to_kind(Kind::Int64),
        )
        .unwrap();
        let end = new
            .iter()
            .position(|t| opts.stop_tokens.contains(t))
            .map_or(new.len(), |p| p + 1);
        assert_eq!(
            g["tokens"],
            serde_json::json!(new[..end]),
            "prompt '{p}' with adapter {a}"
        );
    }
    // The adapters change the text: rows a and b differ from the base model's.
    let base = &got[2]["tokens"];
    assert!(got[0]["tokens"] != *base || got[1]["tokens"] != *base);
    // One prompt with --adapter: the same tokens as its line in the batch, written to --out.
    let out = dir.path().join("one.jsonl");
    expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            prompts[1],
            "--adapter",
            "b",
            "--adapters",
            &spec,
            "--max-new-tokens",
            "6",
            "--out",
            s(&out),
        ],
        0,
    );
    let one = lines(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(one[0]["tokens"], got[1]["tokens"]);
    assert_eq!(one[0]["adapter"], "b");
    expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--adapter",
            "b",
            "--adapters",
            &spec,
        ],
        2,
    );
}

fn corpus(n: usize) -> String {
    let words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"];
    let mut x: u64 = 7;
    let mut out = String::new();
    for i in 0..n {
        let mut line = Vec::new();
        for _ in 0..8 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            line.push(words[(x >> 33) as usize % words.len()]);
        }
        out.push_str(&format!(
            "{}\n",
            serde_json::json!({"text": line.join(" "), "label": i % 2})
        ));
    }
    out
}

/// `split`, `tune`, `merge` and `profile` on decoder folders.
#[test]
fn split_tune_merge_profile_take_decoder_folders() {
    let dir = tempfile::tempdir().unwrap();
    let fx = |n: &str| fixture().parent().unwrap().join(n);
    // split: the permuted dense decoder computes what the source did.
    let out = dir.path().join("split");
    expect(
        &[
            "split",
            "--model",
            s(&fx("tiny-mistral")),
            "--out",
            s(&out),
            "--experts",
            "4",
            "--layers",
            "all",
            "--quiet",
        ],
        0,
    );
    let (a, b) = (
        LlamaForCausalLM::from_folder(fx("tiny-mistral"), Device::Cpu).unwrap(),
        LlamaForCausalLM::from_folder(&out, Device::Cpu).unwrap(),
    );
    let ids = tensor_core::tch::Tensor::from_slice(&[1i64, 5, 9, 13, 40, 7]).view([1, 6]);
    let (la, lb) = (a.logits(&ids, None).unwrap(), b.logits(&ids, None).unwrap());
    tensor_core::testing::assert_close(&lb, &la, 1e-5, 1e-5);
    let (_, err) = expect(
        &[
            "split",
            "--model",
            s(&fx("tiny-mixtral")),
            "--out",
            s(&dir.path().join("x")),
            "--quiet",
        ],
        1,
    );
    assert!(err.contains("already a sparse"), "{err}");
    let (_, err) = expect(
        &[
            "split",
            "--model",
            s(&fx("tiny-llama")),
            "--out",
            s(&dir.path().join("y")),
            "--quiet",
        ],
        1,
    );
    assert!(err.contains("gate projection"), "{err}");
    // tune: LoRA on the next-token loss lowers the held-out loss; the folder
    // is a PEFT adapter that generate and merge take.
    let data = dir.path().join("c.jsonl");
    std::fs::write(&data, corpus(40)).unwrap();
    let m = fixture();
    let tuned = dir.path().join("lm");
    expect(
        &[
            "tune",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&tuned),
            "--epochs",
            "3",
            "--lr",
            "1e-2",
            "--batch",
            "8",
            "--quiet",
        ],
        0,
    );
    let t = common::json(&tuned.join("tune.json"));
    assert!(
        t["held_out_loss_after"].as_f64().unwrap() < t["held_out_loss_before"].as_f64().unwrap(),
        "{t}"
    );
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"the cat\", \"adapter\": \"lm\"}\n").unwrap();
    let spec = format!("lm={}", s(&tuned));
    expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--data",
            s(&prompts),
            "--adapters",
            &spec,
            "--max-new-tokens",
            "4",
        ],
        0,
    );
    let merged = dir.path().join("merged");
    expect(
        &[
            "merge",
            s(&tuned),
            s(&tuned),
            "--out",
            s(&merged),
            "--method",
            "cat",
            "--model",
            s(&m),
            "--quiet",
        ],
        0,
    );
    assert!(merged.join("adapter_config.json").is_file());
    // profile: the decoder's FFNs, with labels.
    let prof = dir.path().join("prof");
    expect(
        &[
            "profile",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&prof),
            "--quiet",
        ],
        0,
    );
    assert!(prof.join("bricks.json").is_file());
}

/// `--chat` renders the folder's chat template (as transformers does) and
/// continues the assistant's turn with transformers' greedy tokens, from a
/// prompt with `--system` or from a `messages` line.
#[test]
fn chat_prompts_use_the_folders_template() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("chat.json")).unwrap())
            .unwrap();
    let m = fixture();
    let system = want["messages"][0]["content"].as_str().unwrap();
    let user = want["messages"][1]["content"].as_str().unwrap();
    let (stdout, _) = expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--chat",
            "--system",
            system,
            "--prompt",
            user,
            "--max-new-tokens",
            "6",
        ],
        0,
    );
    assert_eq!(stdout.trim_end(), want["completion"].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.jsonl");
    std::fs::write(
        &data,
        format!("{}\n", serde_json::json!({"messages": want["messages"]})),
    )
    .unwrap();
    let (stdout, _) = expect(
        &[
            "generate",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--max-new-tokens",
            "6",
        ],
        0,
    );
    let got = lines(&stdout);
    assert_eq!(got[0]["tokens"], want["tokens"]);
    // No template in the folder: a clear error.
    let (_, err) = expect(
        &[
            "generate",
            "--model",
            s(&fixture().parent().unwrap().join("tiny-qwen2")),
            "--chat",
            "--prompt",
            "a",
        ],
        1,
    );
    assert!(err.contains("chat template"), "{err}");
}
