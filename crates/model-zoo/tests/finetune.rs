//! The fine-tuning recipe's report on the packaged all-MiniLM-L6-v2 and the
//! project's sentiment data: per-example correctness that agrees with the
//! reported accuracy (what a paired test over examples needs), extra test
//! sets, and auxiliary losses from the model's modules added to the training
//! loss. A few steps only; skipped (with a note) when `cargo xtask setup`
//! has not installed the packaged model.

use model_zoo::bert::SequenceClassifier;
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, FinetuneReport, TrainHooks, finetune_with};
use model_zoo::source::ModelSource;
use tensor_core::tch::{Kind, Tensor};
use tensor_core::testing::device;
use tensor_core::{Context, Module, ModuleExt, Slot};

fn setup() -> Option<(ModelSource, TextClassification)> {
    match (
        ModelSource::packaged_default(),
        TextClassification::sentiment(),
    ) {
        (Ok(s), Ok(d)) => Some((s, d)),
        _ => {
            eprintln!(
                "skipped: the packaged MiniLM or data/sentiment_domains is missing (run `cargo xtask setup`)"
            );
            None
        }
    }
}

fn opts(data: &TextClassification) -> FinetuneOptions {
    FinetuneOptions {
        epochs: 1,
        batch_size: 8,
        max_len: 24,
        lr: 1e-4,
        train_limit: Some(16),
        eval_limit: Some(24),
        progress: false,
        extra_tests: vec![("few".into(), data.validation[..10].to_vec())],
        ..FinetuneOptions::default()
    }
}

/// The classifier head behind a module that adds a constant auxiliary loss.
#[derive(Debug)]
struct AuxHead {
    inner: Slot,
    loss: f64,
}

impl Module for AuxHead {
    fn kind(&self) -> &'static str {
        "AuxHead"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        if ctx.train {
            ctx.add_aux_loss("constant", Tensor::from(self.loss).to_kind(Kind::Float));
        }
        ctx.call("inner", self.inner.as_ref(), xs)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("inner", self.inner.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("inner", &mut self.inner)]
    }
}

struct WrapHead(f64);

impl TrainHooks<SequenceClassifier, model_zoo::Error> for WrapHead {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let loss = self.0;
        model.wrap("classifier", |inner| Box::new(AuxHead { inner, loss }))?;
        Ok(String::new())
    }
}

fn check_correctness(r: &FinetuneReport) {
    assert_eq!(r.test_correct.len(), 24);
    let acc = r.test_correct.iter().filter(|c| **c).count() as f64 / 24.0;
    assert!(
        (acc - r.test.accuracy).abs() < 1e-12,
        "{acc} vs {}",
        r.test.accuracy
    );
    let ood = r
        .test_ood_correct
        .as_ref()
        .expect("test_ood.jsonl is packaged");
    assert_eq!(ood.len(), 24);
    let (name, m, c) = &r.extra_tests[0];
    assert_eq!((name.as_str(), c.len()), ("few", 10));
    let acc = c.iter().filter(|x| **x).count() as f64 / 10.0;
    assert!((acc - m.accuracy).abs() < 1e-12);
}

#[test]
fn report_carries_per_example_correctness_and_aux_losses_reach_the_loss() {
    let Some((src, data)) = setup() else {
        return;
    };
    tensor_core::tch::set_num_threads(1);
    let o = opts(&data);
    let plain =
        finetune_with(&src, &data, &o, device(), &mut model_zoo::finetune::NoHooks).unwrap();
    check_correctness(&plain);
    let with_aux = finetune_with(&src, &data, &o, device(), &mut WrapHead(100.0)).unwrap();
    check_correctness(&with_aux);
    // The same seeded run plus a constant auxiliary loss of 100 per step.
    assert!(
        (with_aux.final_train_loss - plain.final_train_loss - 100.0).abs() < 1e-3,
        "{} vs {}",
        with_aux.final_train_loss,
        plain.final_train_loss
    );
    // The wrapper adds no parameters: the same ones are trained.
    assert_eq!(with_aux.trainable_params, plain.trainable_params);
}
