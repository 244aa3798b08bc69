//! all-MiniLM-L6-v2 on the CPU in f32, batch 32 x 128 tokens (a quarter of
//! the batch padded to half length): a forward pass, and one fine-tuning step
//! (mean pooling + linear head, cross-entropy, backward, AdamW), against
//! Hugging Face transformers + torch.optim.AdamW (`reference/model_zoo.py`).

use criterion::criterion_main;
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::source::ModelSource;
use tensor_core::ModuleExt;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::randint_seeded;
use tensor_core::train::optim::{AdamW, AdamWConfig};

const B: i64 = 32;
const T: i64 = 128;

fn inputs() -> (Tensor, Tensor, Tensor) {
    let ids = randint_seeded(29000, &[B, T], 1, Device::Cpu).unwrap() + 1000;
    let mask = Tensor::ones([B, T], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(0, 0, B / 4).narrow(1, T / 2, T / 2).fill_(0);
    let labels = randint_seeded(2, &[B], 2, Device::Cpu).unwrap();
    (ids, mask, labels)
}

fn benches() {
    let mut c = modular_benches::criterion();
    let src = ModelSource::packaged_default().expect("run `cargo xtask setup`");
    let (ids, mask, labels) = inputs();
    let mut g = c.benchmark_group("model_zoo");
    g.sample_size(10);

    let model = BertModel::from_folder(&src.dir, Device::Cpu).unwrap();
    g.bench_function("minilm_forward_32x128/rust", |b| {
        b.iter(|| tch::no_grad(|| model.encode(&ids, &mask, false).unwrap()))
    });

    let clf = SequenceClassifier::new(model, 2, Pooling::Mean).unwrap();
    let mut opt = AdamW::new(
        clf.trainable_parameters(),
        AdamWConfig::new(2e-5).with_weight_decay(0.01),
    )
    .unwrap();
    g.bench_function("minilm_train_step_32x128/rust", |b| {
        b.iter(|| {
            let logits = clf.logits(&ids, &mask, true).unwrap();
            logits.cross_entropy_for_logits(&labels).backward();
            opt.step().unwrap();
            opt.zero_grad().unwrap();
        })
    });
    g.finish();
    c.final_summary();
}

criterion_main!(benches);
