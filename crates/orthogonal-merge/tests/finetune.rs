//! Orthogonal adapters through model-zoo's fine-tuning recipe
//! (`finetune_with` + `FinetuneHooks`) on the packaged all-MiniLM-L6-v2 and
//! the project's sentiment data, two concepts trained independently from one
//! registry, saved with their heads, then merged into a fresh classifier.
//! A few steps only; skipped (with a note) when `cargo xtask setup` has not
//! installed the packaged model.

use std::path::PathBuf;

use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, TrainHooks, finetune_with};
use model_zoo::source::ModelSource;
use orthogonal_merge::{
    AdaptedLinear, AdapterConfig, BasisKind, FrozenSide, MergeConfig, Method, Registry,
    SaveOptions, add_orthogonal, load_saved_modules, mark_only_trainable, merge_adapters_into,
    read_adapter, save_adapter,
};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Device, Kind};
use tensor_core::testing::device;

const TARGETS: [&str; 2] = ["query", "value"];
const Q: &str = "bert.encoder.layer.0.attention.self.query";

fn zoo(e: orthogonal_merge::Error) -> model_zoo::Error {
    model_zoo::Error::invalid(e.to_string())
}

/// Adds concept `concept`'s orthogonal adapter before training, saves it (with the head) before evaluation.
struct OrthoHooks {
    registry: Registry,
    concept: String,
    out: PathBuf,
}

impl TrainHooks<SequenceClassifier, model_zoo::Error> for OrthoHooks {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let cfg = AdapterConfig::new(&TARGETS).with_alpha(16.0);
        let rep = add_orthogonal(model, &self.concept, &self.registry, &cfg).map_err(zoo)?;
        mark_only_trainable(model, &[], &["classifier.*"]);
        Ok(format!(
            "orthogonal adapter '{}' on {} layers, {} trained parameters",
            self.concept,
            rep.paths.len(),
            rep.trainable
        ))
    }

    fn before_eval(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let opts = SaveOptions {
            modules_to_save: vec!["classifier".into()],
            ..SaveOptions::default()
        };
        save_adapter(model, &self.concept, &self.out, &opts).map_err(zoo)?;
        Ok(format!("saved to {}", self.out.display()))
    }
}

#[test]
fn train_two_concepts_independently_then_merge() {
    let (Ok(src), Ok(data)) = (
        ModelSource::packaged_default(),
        TextClassification::sentiment(),
    ) else {
        eprintln!(
            "skipped: the packaged MiniLM or data/sentiment_domains is missing (run `cargo xtask setup`)"
        );
        return;
    };
    // Tiny batches: one thread is faster, and a busy machine's OpenMP spin-waits cannot stall it.
    tensor_core::tch::set_num_threads(1);
    let dev = device();
    let dir = tempfile::tempdir().unwrap();
    // The registry is built once, on the model type that is trained (host-side
    // bookkeeping of layer shapes: the template computes nothing).
    let template = SequenceClassifier::new(
        BertModel::from_source(&src, Device::Cpu).unwrap(),
        data.num_labels,
        Pooling::Mean,
    )
    .unwrap();
    let mut reg = Registry::for_model(
        &template,
        &TARGETS,
        BasisKind::QrBins,
        2024,
        8,
        FrozenSide::Output,
    )
    .unwrap();
    reg.claim("pos").unwrap();
    reg.claim("neg").unwrap();
    reg.save(dir.path().join("registry.json")).unwrap();
    drop(template);

    let opts = FinetuneOptions {
        epochs: 1,
        batch_size: 8,
        max_len: 32,
        lr: 1e-3,
        train_limit: Some(16),
        eval_limit: Some(16),
        progress: false,
        ..FinetuneOptions::default()
    };
    for (i, concept) in ["pos", "neg"].iter().enumerate() {
        let mut hooks = OrthoHooks {
            registry: Registry::load(dir.path().join("registry.json")).unwrap(),
            concept: (*concept).to_owned(),
            out: dir.path().join(concept),
        };
        let rep = finetune_with(
            &src,
            &data,
            &FinetuneOptions {
                seed: i as u64,
                ..opts.clone()
            },
            dev,
            &mut hooks,
        )
        .unwrap();
        assert!(rep.notes[0].contains("on 12 layers"), "{:?}", rep.notes);
        assert_eq!(
            rep.trainable_params,
            12 * 8 * 384 + 384 * data.num_labels + data.num_labels
        );
    }
    // Training moved the trained factor and left the basis as the registry makes it
    // (the file is read to the CPU; bases are computed on the host).
    let file = read_adapter(dir.path().join("pos"), None).unwrap();
    let orthogonal_merge::Delta::Lora(l) = &file.task.layers[Q] else {
        panic!()
    };
    assert!(l.a.abs().max().double_value(&[]) > 0.0);
    let basis = reg
        .spec
        .block(Q, 384, reg.bin("pos").unwrap(), Kind::Float, Device::Cpu)
        .unwrap();
    assert_eq!((&l.b - basis).abs().max().double_value(&[]), 0.0);

    // Merge both into a fresh classifier; each task then uses its own head.
    let mut merged = SequenceClassifier::new(
        BertModel::from_source(&src, dev).unwrap(),
        data.num_labels,
        Pooling::Mean,
    )
    .unwrap();
    let dirs = [dir.path().join("pos"), dir.path().join("neg")];
    let rep = merge_adapters_into(&mut merged, &dirs, &MergeConfig::new(Method::Sum)).unwrap();
    assert!(
        rep.interference.mean_abs_cosine() < 1e-5,
        "{}",
        rep.interference
    );
    assert!(rep.interference.mean_output_overlap().unwrap() < 1e-6);
    assert!(
        merged.get_as::<AdaptedLinear>(Q).is_err(),
        "merging writes into the weights"
    );
    assert_eq!(load_saved_modules(&mut merged, &file).unwrap(), 2);
}
