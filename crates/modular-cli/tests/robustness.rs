//! The loaders under random damage (proptest, deterministic seeds): a tiny
//! BERT folder's `model.safetensors` and `config.json`, a PEFT LoRA folder's
//! `adapter_model.safetensors` and `adapter_config.json`, and a JSONL file
//! are truncated, bit-flipped, given other dtypes and shapes, other values
//! or missing keys. Every case must end in an error or in a model whose
//! outputs are finite: never a panic, never a silent NaN. Each property
//! prints how many cases it ran and how they ended.

mod common;

use std::path::Path;

use model_zoo::bert::BertModel;
use model_zoo::data::{MAX_LABELS, load_jsonl};
use pet_core::{LoraConfig, add_lora, load_adapter, save_adapter};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;
use tensor_core::module::{Context, Module};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::with_seed;

use common::{reviews, tiny_model};

const CASES: u32 = 256;

fn runner() -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}

/// How the cases of one property ended.
#[derive(Default, Debug)]
struct Tally {
    refused: u32,
    loaded: u32,
}

fn report(what: &str, t: &std::cell::RefCell<Tally>) {
    let t = t.borrow();
    eprintln!(
        "robustness: {what}: {} cases, {} refused with an error, {} loaded with finite outputs",
        t.refused + t.loaded,
        t.refused,
        t.loaded
    );
}

/// A damaged file: what to do to its bytes.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(f64),
    FlipHeader(f64, u8),
    FlipData(f64, u8),
    Dtype(usize, &'static str),
    Shape(usize, Vec<u64>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0).prop_map(Damage::Truncate),
        (0.0..1.0, 0u8..8).prop_map(|(p, b)| Damage::FlipHeader(p, b)),
        (0.0..1.0, 0u8..8).prop_map(|(p, b)| Damage::FlipData(p, b)),
        (
            0usize..64,
            prop::sample::select(vec![
                "F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "I8"
            ])
        )
            .prop_map(|(i, d)| Damage::Dtype(i, d)),
        (0usize..64, prop::collection::vec(0u64..40, 0..4)).prop_map(|(i, s)| Damage::Shape(i, s)),
    ]
}

/// `bytes` (a safetensors file) with `d` applied.
fn apply(bytes: &[u8], d: &Damage) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header_len;
    let mut out = bytes.to_vec();
    let at = |p: f64, lo: usize, hi: usize| lo + ((hi - lo) as f64 * p) as usize % (hi - lo).max(1);
    match d {
        Damage::Truncate(p) => out.truncate(at(*p, 0, bytes.len())),
        Damage::FlipHeader(p, b) => out[at(*p, 0, data_start)] ^= 1 << b,
        Damage::FlipData(p, b) => {
            if data_start < bytes.len() {
                out[at(*p, data_start, bytes.len())] ^= 1 << b;
            }
        }
        Damage::Dtype(i, _) | Damage::Shape(i, _) => {
            let mut header: serde_json::Map<String, Value> =
                serde_json::from_slice(&bytes[8..data_start]).unwrap();
            let names: Vec<String> = header
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let name = &names[i % names.len()];
            let entry = header.get_mut(name).unwrap();
            match d {
                Damage::Dtype(_, dt) => entry["dtype"] = Value::from(*dt),
                Damage::Shape(_, s) => entry["shape"] = Value::from(s.clone()),
                _ => unreachable!(),
            }
            let mut h = serde_json::to_vec(&header).unwrap();
            while !h.len().is_multiple_of(8) {
                h.push(b' ');
            }
            out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(&bytes[data_start..]);
        }
    }
    out
}

/// A config value replaced (or the key removed: `None`).
fn value() -> impl Strategy<Value = Option<Value>> {
    prop::sample::select(vec![
        None,
        Some(Value::from(0)),
        Some(Value::from(-1)),
        Some(Value::from(1)),
        Some(Value::from(3)),
        Some(Value::from(2.5)),
        Some(Value::from(1e6)),
        // An integer that would ask for tens of gigabytes if believed.
        Some(Value::from(1_000_000_000i64)),
        Some(Value::from(1e300)),
        Some(Value::from("x")),
        Some(Value::Null),
        Some(Value::from(true)),
        Some(Value::Array(vec![])),
        Some(Value::from(vec!["nonexistent"])),
    ])
}

fn edit_json(path: &Path, key_index: usize, v: &Option<Value>) {
    let mut doc: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let keys: Vec<String> = doc.keys().cloned().collect();
    let key = &keys[key_index % keys.len()];
    match v {
        None => {
            doc.remove(key);
        }
        Some(v) => {
            doc.insert(key.clone(), v.clone());
        }
    }
    std::fs::write(path, serde_json::to_string(&doc).unwrap()).unwrap();
}

fn ids() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[2i64, 16, 14, 4, 3, 2, 15, 9, 3, 0]).view([2, 5]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    (ids, mask)
}

/// The encoder's output on a fixed batch must be finite.
fn finite_forward(m: &dyn Module) -> bool {
    let (ids, mask) = ids();
    let mut ctx = Context::eval();
    ctx.attention_mask = Some(mask);
    match tensor_core::tch::no_grad(|| m.forward(&ids, &mut ctx)) {
        Ok(y) => y.isfinite().all().int64_value(&[]) == 1,
        // A forward that refuses (e.g. a bad config caught late) is an error, not garbage.
        Err(_) => true,
    }
}

/// Copy `src`'s files into a fresh folder inside `tmp`.
fn copy_dir(src: &Path, tmp: &Path, name: &str) -> std::path::PathBuf {
    let d = tmp.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
    }
    d
}

#[test]
fn damaged_model_folders_are_refused_or_load_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_model(&base, 3, 16);
    let weights = std::fs::read(base.join("model.safetensors")).unwrap();
    let tally = std::cell::RefCell::new(Tally::default());
    let check = |dir: &Path| -> Result<(), TestCaseError> {
        match BertModel::from_folder(dir, Device::Cpu) {
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("model.safetensors") || msg.contains("config.json"),
                    "an error that names no file: {msg}"
                );
                prop_assert!(!msg.contains("frame #"), "{msg}");
                tally.borrow_mut().refused += 1;
            }
            Ok(m) => {
                prop_assert!(finite_forward(&m), "loaded, but the output is not finite");
                tally.borrow_mut().loaded += 1;
            }
        }
        Ok(())
    };
    runner()
        .run(&damage(), |d| {
            let dir = copy_dir(&base, tmp.path(), "case");
            std::fs::write(dir.join("model.safetensors"), apply(&weights, &d)).unwrap();
            check(&dir)
        })
        .unwrap();
    report("model.safetensors", &tally);
    let tally_cfg = std::cell::RefCell::new(Tally::default());
    runner()
        .run(&(0usize..64, value()), |(k, v)| {
            let dir = copy_dir(&base, tmp.path(), "case");
            edit_json(&dir.join("config.json"), k, &v);
            let before = (tally.borrow().refused, tally.borrow().loaded);
            check(&dir)?;
            let after = (tally.borrow().refused, tally.borrow().loaded);
            let mut t = tally_cfg.borrow_mut();
            t.refused += after.0 - before.0;
            t.loaded += after.1 - before.1;
            Ok(())
        })
        .unwrap();
    report("config.json", &tally_cfg);
}

#[test]
fn damaged_adapter_folders_are_refused_or_load_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let model = tiny_model(&base, 4, 16);
    let adapter = tmp.path().join("adapter");
    {
        let mut m = model;
        let cfg = LoraConfig::new(2, 4.0, &["query", "value"]);
        add_lora(&mut m, "a", &cfg).unwrap();
        // A non-zero B, so the adapter changes the output.
        for (n, p) in tensor_core::ModuleExt::named_parameters(&m) {
            if n.contains("lora_B") {
                let _ = tensor_core::tch::no_grad(|| p.shallow_clone().fill_(0.05));
            }
        }
        save_adapter(&m, "a", &adapter).unwrap();
    }
    let fresh = || with_seed(4, || BertModel::from_folder(&base, Device::Cpu)).unwrap();
    let st = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    for (what, strategy) in [("adapter_model.safetensors", 0), ("adapter_config.json", 1)] {
        let tally = std::cell::RefCell::new(Tally::default());
        let case = |dir: &Path| -> Result<(), TestCaseError> {
            let mut m = fresh();
            match load_adapter(&mut m, "x", dir) {
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(
                        msg.contains("adapter_model.safetensors")
                            || msg.contains("adapter_config.json")
                            || msg.contains("not found"),
                        "an error that names no file: {msg}"
                    );
                    prop_assert!(!msg.contains("frame #"), "{msg}");
                    tally.borrow_mut().refused += 1;
                }
                Ok(_) => {
                    prop_assert!(finite_forward(&m), "loaded, but the output is not finite");
                    tally.borrow_mut().loaded += 1;
                }
            }
            Ok(())
        };
        if strategy == 0 {
            runner()
                .run(&damage(), |d| {
                    let dir = copy_dir(&adapter, tmp.path(), "case");
                    std::fs::write(dir.join("adapter_model.safetensors"), apply(&st, &d)).unwrap();
                    case(&dir)
                })
                .unwrap();
        } else {
            runner()
                .run(&(0usize..64, value()), |(k, v)| {
                    let dir = copy_dir(&adapter, tmp.path(), "case");
                    edit_json(&dir.join("adapter_config.json"), k, &v);
                    case(&dir)
                })
                .unwrap();
        }
        report(what, &tally);
    }
}

#[test]
fn damaged_jsonl_is_refused_at_its_line_or_reads_sane_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("d.jsonl");
    let good = reviews(12, 0).into_bytes();
    let tally = std::cell::RefCell::new(Tally::default());
    let edits = prop::collection::vec((0.0..1.0f64, any::<u8>(), 0u8..3), 1..4);
    runner()
        .run(&edits, |edits| {
            let mut b = good.clone();
            for (p, byte, op) in edits {
                let i = ((b.len() as f64) * p) as usize % b.len().max(1);
                match op {
                    0 => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ => b.truncate(i.max(1)),
                }
            }
            std::fs::write(&path, &b).unwrap();
            match load_jsonl(&path) {
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("d.jsonl"), "{msg}");
                    tally.borrow_mut().refused += 1;
                }
                Ok(rows) => {
                    prop_assert!(rows.iter().all(|r| (0..MAX_LABELS).contains(&r.label)));
                    tally.borrow_mut().loaded += 1;
                }
            }
            Ok(())
        })
        .unwrap();
    report("JSONL", &tally);
}
