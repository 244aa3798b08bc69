//! Fixtures shared by the `modular` integration tests: running the built
//! binary, a word-level `tokenizer.json`, and a random tiny BERT folder.
// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use model_zoo::bert::BertModel;
use model_zoo::config::BertConfig;
use serde_json::Value;
use tensor_core::io;
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Device, Tensor};
use tensor_core::testing::with_seed;

/// The tokenizer's words (ids 4.., after `[PAD] [UNK] [CLS] [SEP]`).
pub const WORDS: &[&str] = &[
    "good", "great", "fine", "nice", "fun", "bad", "awful", "poor", "boring", "dull", "movie",
    "film", "the", "a", "was", "is", "very", "plot", "acting", "story",
];

pub fn modular(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modular"))
        .args(args)
        .env_remove("MODULAR_MODEL_DIR")
        // Tiny inputs: one intra-op thread is faster than a pool on a shared machine.
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run modular")
}

/// Run and expect exit code `code`; returns (stdout, stderr).
pub fn expect(args: &[&str], code: i32) -> (String, String) {
    let o = modular(args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(code),
        "modular {args:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    (out, err)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// No `.name.tmp-*` folder may be left beside an output after a run.
pub fn no_temp_left(parent: &Path) {
    for e in std::fs::read_dir(parent).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".tmp-"), "temporary output left behind: {n}");
    }
}

/// A word-level `tokenizer.json` (BERT normaliser and pre-tokeniser,
/// `[CLS] … [SEP]`) over [`WORDS`].
pub fn tokenizer_json() -> String {
    let special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    let vocab: Vec<String> = special
        .iter()
        .chain(WORDS)
        .enumerate()
        .map(|(i, w)| format!("\"{w}\":{i}"))
        .collect();
    let added: Vec<String> = special
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                r#"{{"id":{i},"content":"{w}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
            )
        })
        .collect();
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{}],
"normalizer":{{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true}},
"pre_tokenizer":{{"type":"BertPreTokenizer"}},
"post_processor":{{"type":"TemplateProcessing",
 "single":[{{"SpecialToken":{{"id":"[CLS]","type_id":0}}}},{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"[SEP]","type_id":0}}}}],
 "pair":[{{"SpecialToken":{{"id":"[CLS]","type_id":0}}}},{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"[SEP]","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":1}}}},{{"SpecialToken":{{"id":"[SEP]","type_id":1}}}}],
 "special_tokens":{{"[CLS]":{{"id":"[CLS]","ids":[2],"tokens":["[CLS]"]}},"[SEP]":{{"id":"[SEP]","ids":[3],"tokens":["[SEP]"]}}}}}},
"decoder":null,
"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"[UNK]"}}}}"#,
        added.join(","),
        vocab.join(",")
    )
}

/// A random 2-layer BERT (d `hidden`, d_ff 32, vocab 32, 64 positions)
/// saved as a model folder with its tokenizer.
pub fn tiny_model(dir: &Path, seed: u64, hidden: i64) -> BertModel {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        r#"{{"model_type":"bert","vocab_size":32,"hidden_size":{hidden},"num_hidden_layers":2,"num_attention_heads":2,"intermediate_size":32,"max_position_embeddings":64,"type_vocab_size":2,"layer_norm_eps":1e-12,"hidden_dropout_prob":0.0,"attention_probs_dropout_prob":0.0}}"#
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    let cfg = BertConfig::read(dir.join("config.json")).unwrap();
    let model = with_seed(seed, || BertModel::new(cfg, false, Device::Cpu)).unwrap();
    let params = model.named_parameters();
    let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    io::save(dir.join("model.safetensors"), &refs, None).unwrap();
    model
}

/// `n` lines of two-class reviews made of the tokenizer's words.
pub fn reviews(n: usize, offset: usize) -> String {
    let pos = ["good", "great", "fine", "nice", "fun"];
    let neg = ["bad", "awful", "poor", "boring", "dull"];
    (0..n)
        .map(|i| {
            let j = i + offset;
            let (w, label) = if j.is_multiple_of(2) {
                (pos[j % 5], 1)
            } else {
                (neg[j % 5], 0)
            };
            format!("{{\"text\": \"the movie was very {w}\", \"label\": {label}}}\n")
        })
        .collect()
}
