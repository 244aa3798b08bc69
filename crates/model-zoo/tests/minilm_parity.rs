//! Parity of the BERT encoder, the tokenizer and the sentence embeddings with
//! sentence-transformers on the packaged all-MiniLM-L6-v2
//! (fixture: scripts/make_minilm_fixture.py), and the loader's errors on bad
//! model folders. The models compute on `tensor_core::testing::device()`
//! (`MODULAR_TEST_DEVICE`, the CPU by default); fixtures stay on the host.

use std::path::{Path, PathBuf};

use model_zoo::bert::{BertModel, Pooling, SentenceEncoder, SequenceClassifier};
use model_zoo::config::BertConfig;
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use tensor_core::contract::check_contract;
use tensor_core::io::{SafetensorsFile, save};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::{closeness, device, tolerances};
use tensor_core::{DType, ModuleExt, module::is};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sentences() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixture("minilm_sentences.json")).unwrap())
        .unwrap()
}

/// The packaged model on the test device.
fn encoder() -> SentenceEncoder {
    let src =
        ModelSource::packaged_default().expect("cargo xtask setup installs the packaged model");
    SentenceEncoder::from_folder(&src.dir, device()).unwrap()
}

/// The bounds against the sentence-transformers fixture: max abs error and
/// worst row cosine. 10x f32's atol (1e-4 on the CPU, looser on CUDA as
/// `tolerances` says), and a cosine within a tenth of that of 1.
fn fixture_bounds() -> (f64, f64) {
    let atol = 10.0 * tolerances(DType::F32, device()).0;
    (atol, 1.0 - 0.1 * atol)
}

/// Cosine similarity of each row pair (`a` from any device, `b` on the
/// host), and the worst one.
fn min_row_cosine(a: &Tensor, b: &Tensor) -> f64 {
    let cos = Tensor::cosine_similarity(&a.to_device(Device::Cpu), b, -1, 1e-12);
    cos.min().double_value(&[])
}

#[test]
fn sentence_embeddings_match_sentence_transformers() {
    let enc = encoder();
    assert!(enc.normalize);
    assert_eq!(enc.tokenizer.max_len, 256);
    let reference = SafetensorsFile::open(fixture("minilm_reference.safetensors")).unwrap();
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();

    // Tokenizer parity: the same ids and mask as the Python tokenizer
    // (host-side: the tokenizer computes nothing on the device).
    let batch = enc.tokenizer.encode_batch(&refs, Device::Cpu).unwrap();
    let ids = reference.load("input_ids", Device::Cpu).unwrap();
    let mask = reference.load("attention_mask", Device::Cpu).unwrap();
    assert!(
        batch.input_ids.equal(&ids),
        "token ids differ from the Python tokenizer"
    );
    assert!(batch.attention_mask.equal(&mask));

    let ours = enc.embed(&refs).unwrap();
    assert_eq!(ours.device(), device());
    let expected = reference.load("embeddings", Device::Cpu).unwrap();
    let (atol, min_cos) = fixture_bounds();
    let c = closeness(&ours, &expected, atol, 0.0).unwrap();
    let cos = min_row_cosine(&ours, &expected);
    println!(
        "embeddings on {:?}: max abs err {:.3e}, min cosine {cos:.8}",
        device(),
        c.max_abs
    );
    assert!(c.ok, "max abs err {:e}", c.max_abs);
    assert!(cos >= min_cos, "min cosine {cos}");
}

#[test]
fn hidden_states_of_layers_1_3_6_match_transformers() {
    let enc = encoder();
    let reference = SafetensorsFile::open(fixture("minilm_reference.safetensors")).unwrap();
    let ids = reference.load("input_ids", device()).unwrap();
    let mask = reference.load("attention_mask", device()).unwrap();
    let hidden = tch::no_grad(|| enc.model.hidden_states(&ids, &mask)).unwrap();
    assert_eq!(hidden.len(), 7);
    let keep = mask.to_kind(Kind::Bool);
    let (atol, min_cos) = fixture_bounds();
    for layer in [1usize, 3, 6] {
        let ours = hidden[layer]
            .index(&[Some(keep.shallow_clone())])
            .to_device(Device::Cpu);
        let expected = reference
            .load(&format!("hidden.{layer}"), Device::Cpu)
            .unwrap();
        let c = closeness(&ours, &expected, atol, 0.0).unwrap();
        let cos = min_row_cosine(&ours, &expected);
        println!(
            "layer {layer} on {:?}: max abs err {:.3e}, min cosine {cos:.8}",
            device(),
            c.max_abs
        );
        assert!(c.ok, "layer {layer}: max abs err {:e}", c.max_abs);
        assert!(cos >= min_cos, "layer {layer}: min cosine {cos}");
    }
}

#[test]
fn every_submodule_is_reachable_by_its_hugging_face_path() {
    let mut enc = encoder();
    // The module contract holds over the whole encoder, whose names are the
    // checkpoint's keys (below).
    let report = check_contract(&mut enc.model).unwrap();
    assert!(report.modules > 50, "{report:?}");
    let m = &enc.model;
    assert_eq!(
        m.get("encoder.layer.3.attention.self.query")
            .unwrap()
            .kind(),
        "Linear"
    );
    assert_eq!(
        m.get("encoder.layer.3.attention").unwrap().kind(),
        "Attention"
    );
    assert_eq!(
        m.get("encoder.layer.3.(ffn)").unwrap().kind(),
        "FeedForward"
    );
    assert_eq!(
        m.get("encoder.layer.3.intermediate.dense").unwrap().kind(),
        "Linear"
    );
    assert_eq!(
        m.get("encoder.layer.5.output.LayerNorm").unwrap().kind(),
        "LayerNorm"
    );
    assert_eq!(
        m.get("embeddings.word_embeddings").unwrap().kind(),
        "Embedding"
    );
    let ffns = m.find(&mut |_, m| is::<tensor_core::layers::FeedForward>(m));
    assert_eq!(ffns.len(), 6);
    // The parameter names are exactly the checkpoint's keys (bar the position_ids buffer).
    let file =
        SafetensorsFile::open(ModelSource::packaged_default().unwrap().weights_path()).unwrap();
    let mut keys: Vec<String> = file
        .names()
        .into_iter()
        .filter(|k| k != "embeddings.position_ids")
        .collect();
    let mut names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    keys.sort();
    names.sort();
    assert_eq!(names, keys);
    let count = m.param_count();
    assert_eq!(count.total, 22_713_216);
}

#[test]
fn classifier_head_trains_the_right_parameters() {
    let src = ModelSource::packaged_default().unwrap();
    let bert = BertModel::from_folder(&src.dir, device()).unwrap();
    let mut clf = SequenceClassifier::new(bert, 2, Pooling::Mean).unwrap();
    assert!(
        clf.named_parameters()
            .iter()
            .any(|(n, _)| n == "bert.encoder.layer.0.attention.self.query.weight")
    );
    assert!(
        clf.named_parameters()
            .iter()
            .any(|(n, _)| n == "classifier.weight")
    );
    clf.set_trainable("*", false);
    clf.set_trainable("classifier.*", true);
    let tok = TextTokenizer::from_file(src.tokenizer_path(), 64, 30522).unwrap();
    let b = tok
        .encode_batch(&["good movie", "bad film, boring"], device())
        .unwrap();
    let logits = clf.logits(&b.input_ids, &b.attention_mask, true).unwrap();
    assert_eq!(logits.size(), [2, 2]);
    logits
        .cross_entropy_for_logits(&Tensor::from_slice(&[1i64, 0]).to_device(device()))
        .backward();
    for (n, p) in clf.named_parameters() {
        assert_eq!(p.grad().defined(), n.starts_with("classifier."), "{n}");
    }
    // A configuration error: nothing is computed, the host suffices.
    assert!(
        SequenceClassifier::new(
            BertModel::new(BertConfig::minilm_l6(), false, Device::Cpu).unwrap(),
            1,
            Pooling::Mean
        )
        .is_err()
    );
}

/// A small random BERT on the test device, saved as a model folder, to
/// break in various ways.
fn tiny_folder(dir: &Path) -> BertModel {
    let config = r#"{"model_type":"bert","vocab_size":30522,"hidden_size":16,"num_hidden_layers":2,"num_attention_heads":2,"intermediate_size":32,"max_position_embeddings":64,"type_vocab_size":2,"layer_norm_eps":1e-12}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let model = BertModel::new(
        BertConfig::read(dir.join("config.json")).unwrap(),
        true,
        device(),
    )
    .unwrap();
    let params = model.named_parameters();
    let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save(dir.join("model.safetensors"), &refs, None).unwrap();
    model
}

#[test]
fn a_saved_model_loads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let back = BertModel::from_folder(dir.path(), device()).unwrap();
    let ids = Tensor::from_slice(&[101i64, 7592, 2088, 102])
        .view([1, 4])
        .to_device(device());
    let mask = Tensor::ones([1, 4], (Kind::Int64, device()));
    let a = model.encode(&ids, &mask, false).unwrap();
    let b = back.encode(&ids, &mask, false).unwrap();
    assert!(a.equal(&b));
}

#[test]
fn bad_model_folders_give_errors_naming_file_and_key() {
    // Loads that fail on reading the files: the host suffices.
    let dir = tempfile::tempdir().unwrap();
    tiny_folder(dir.path());
    let cfg = dir.path().join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();

    // Missing weights file.
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("moved.safetensors"),
    )
    .unwrap();
    let e = BertModel::from_folder(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    std::fs::rename(
        dir.path().join("moved.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();

    // config.json and the weights disagree on a shape.
    std::fs::write(
        &cfg,
        original.replace("\"intermediate_size\":32", "\"intermediate_size\":48"),
    )
    .unwrap();
    let e = BertModel::from_folder(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("encoder.layer.0.intermediate.dense.weight")
            && e.contains("[32, 16]"),
        "{e}"
    );

    // An architecture we do not build.
    std::fs::write(&cfg, original.replace("\"bert\"", "\"gpt_neox\"")).unwrap();
    let e = BertModel::from_folder(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("gpt_neox"),
        "{e}"
    );

    // A checkpoint with fewer layers than config.json says.
    std::fs::write(
        &cfg,
        original.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":3"),
    )
    .unwrap();
    let e = BertModel::from_folder(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("encoder.layer.2.") && e.contains("missing"),
        "{e}"
    );

    // Missing config.json.
    std::fs::remove_file(&cfg).unwrap();
    let e = BertModel::from_folder(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let src = ModelSource::packaged_default().unwrap();
    let e = TextTokenizer::from_file(src.tokenizer_path(), 128, 1000)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("30522") && e.contains("1000"),
        "{e}"
    );
    let e = TextTokenizer::from_file("/nonexistent/tokenizer.json", 128, 30522)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
}

#[test]
fn over_long_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path());
    let ids = Tensor::zeros([1, 65], (Kind::Int64, device()));
    let mask = Tensor::ones([1, 65], (Kind::Int64, device()));
    let e = model.encode(&ids, &mask, false).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let e = model
        .encode(&ids.to_kind(Kind::Float), &mask, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("int64"), "{e}");
}
