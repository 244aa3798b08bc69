//! pet-core on all-MiniLM-L6-v2 (CPU, f32) against PEFT 0.21 + PyTorch
//! (`reference/pet_core.py`), same shapes, same run:
//! - one LoRA fine-tuning step (r = 8, α = 8 on query/value; mean pooling +
//!   linear head, dropout 0.1, cross-entropy, backward, AdamW lr 1e-3 over
//!   the trainable parameters), batch 32 × 128 with a quarter padded;
//! - inference with the LoRA unmerged, merged, and the plain model, at
//!   32 × 128 and 1 × 32 (the unmerged overhead is unmerged / merged − 1);
//! - eight LoRA adapters: one adapter for the whole batch vs a mixed batch
//!   where sample i uses adapter i mod 8, batch 64 × 128.

use criterion::criterion_main;
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::source::ModelSource;
use pet_core::{
    LoraConfig, LoraInit, add_lora, disable_adapters, enable_adapters,
    mark_only_adapters_trainable, merge_adapter, mixed_batch, set_adapter, unmerge_adapter,
};
use tensor_core::ModuleExt;
use tensor_core::module::{Context, Module};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::randint_seeded;
use tensor_core::train::optim::{AdamW, AdamWConfig};

fn batch(b: i64, t: i64, pad: bool) -> (Tensor, Tensor) {
    let ids = randint_seeded(29000, &[b, t], 1, Device::Cpu).unwrap() + 1000;
    let mask = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
    if pad {
        let _ = mask.narrow(0, 0, b / 4).narrow(1, t / 2, t / 2).fill_(0);
    }
    (ids, mask)
}

fn lora(seed: u64, random: bool) -> LoraConfig {
    let mut c = LoraConfig::new(8, 8.0, &["query", "value"]);
    c.seed = seed;
    if random {
        // Non-zero B so that merging is not trivial (the reference fills B too).
        c.init = LoraInit::Random;
    }
    c
}

fn forward(m: &dyn Module, ids: &Tensor, mask: &Tensor) -> Tensor {
    let mut ctx = Context::eval();
    ctx.attention_mask = Some(mask.shallow_clone());
    m.forward(ids, &mut ctx).unwrap()
}

fn benches() {
    let mut c = modular_benches::criterion();
    let src = ModelSource::packaged_default().expect("run `cargo xtask setup`");
    let mut g = c.benchmark_group("pet_core");
    g.sample_size(10);

    // Inference: unmerged vs merged vs plain.
    let mut model = BertModel::from_folder(&src.dir, Device::Cpu).unwrap();
    add_lora(&mut model, "default", &lora(0, true)).unwrap();
    for (size, (ids, mask)) in [
        ("32x128", batch(32, 128, true)),
        ("1x32", batch(1, 32, false)),
    ] {
        g.bench_function(format!("lora_unmerged_{size}/rust"), |b| {
            b.iter(|| tch::no_grad(|| forward(&model, &ids, &mask)))
        });
        merge_adapter(&mut model, &[], false).unwrap();
        g.bench_function(format!("lora_merged_{size}/rust"), |b| {
            b.iter(|| tch::no_grad(|| forward(&model, &ids, &mask)))
        });
        unmerge_adapter(&mut model).unwrap();
        disable_adapters(&mut model).unwrap();
        g.bench_function(format!("base_{size}/rust"), |b| {
            b.iter(|| tch::no_grad(|| forward(&model, &ids, &mask)))
        });
        enable_adapters(&mut model).unwrap();
    }
    drop(model);

    // One LoRA fine-tuning step.
    let (ids, mask) = batch(32, 128, true);
    let labels = randint_seeded(2, &[32], 2, Device::Cpu).unwrap();
    let mut clf = SequenceClassifier::new(
        BertModel::from_folder(&src.dir, Device::Cpu).unwrap(),
        2,
        Pooling::Mean,
    )
    .unwrap();
    add_lora(&mut clf, "default", &lora(0, false)).unwrap();
    mark_only_adapters_trainable(&mut clf, &[], &["classifier.*"]);
    let mut opt = AdamW::new(
        clf.trainable_parameters(),
        AdamWConfig::new(1e-3).with_weight_decay(0.01),
    )
    .unwrap();
    g.bench_function("lora_train_step_32x128/rust", |b| {
        b.iter(|| {
            let logits = clf.logits(&ids, &mask, true).unwrap();
            logits.cross_entropy_for_logits(&labels).backward();
            opt.step().unwrap();
            opt.zero_grad().unwrap();
        })
    });
    drop((clf, opt));

    // Eight adapters: one for the whole batch vs one per sample.
    let mut multi = BertModel::from_folder(&src.dir, Device::Cpu).unwrap();
    for i in 0..8 {
        add_lora(&mut multi, &format!("a{i}"), &lora(i, true)).unwrap();
    }
    let (ids, mask) = batch(64, 128, true);
    let names: Vec<String> = (0..64).map(|i| format!("a{}", i % 8)).collect();
    set_adapter(&mut multi, &["a0"]).unwrap();
    g.bench_function("single_64x128/rust", |b| {
        b.iter(|| tch::no_grad(|| forward(&multi, &ids, &mask)))
    });
    g.bench_function("mixed8_64x128/rust", |b| {
        b.iter(|| {
            tch::no_grad(|| {
                let mut ctx = Context::eval();
                ctx.attention_mask = Some(mask.shallow_clone());
                ctx.insert(mixed_batch(&multi, &names, Device::Cpu).unwrap());
                multi.forward(&ids, &mut ctx).unwrap()
            })
        })
    });
    g.finish();
    c.final_summary();
}

criterion_main!(benches);
