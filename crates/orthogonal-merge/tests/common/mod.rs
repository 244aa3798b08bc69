//! Shared by the integration tests: a tiny random BERT (model-zoo), seeded
//! tensors, forwards and closeness.
#![allow(dead_code)]

use model_zoo::bert::BertModel;
use model_zoo::config::BertConfig;
use orthogonal_merge::{AdaptedLinear, Delta, LoraFactors, TaskDelta};
use tensor_core::DType;
use tensor_core::layers::Activation;
use tensor_core::module::{Context, Module, ModuleExt};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::{device, randn_seeded, tolerances, with_seed};

pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        hidden_act: Activation::Gelu,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
    }
}

/// `bound`, a CPU tolerance for a comparison of two computations done
/// differently, scaled as [`tolerances`] scales f32 on the test device
/// (unchanged on the CPU, 10x on CUDA).
pub fn scaled(bound: f64) -> f64 {
    bound * tolerances(DType::F32, device()).0 / tolerances(DType::F32, Device::Cpu).0
}

/// A tiny BERT with seeded random weights, on the test device (drawn on
/// the CPU, so the weights are the same on every device).
pub fn tiny_bert(seed: u64) -> BertModel {
    let mut m = with_seed(seed, || BertModel::new(tiny_config(), false, Device::Cpu)).unwrap();
    m.to_device(device()).unwrap();
    m
}

/// `[4, 8]` token ids and a mask with the last two tokens of row 0 padded.
pub fn batch() -> (Tensor, Tensor) {
    let dev = device();
    let ids = tensor_core::testing::randint_seeded(49, &[4, 8], 5, dev).unwrap() + 1;
    let mask = Tensor::ones([4, 8], (Kind::Int64, dev));
    let _ = mask.narrow(0, 0, 1).narrow(1, 6, 2).fill_(0);
    (ids, mask)
}

pub fn run(model: &dyn Module, ids: &Tensor, mask: &Tensor) -> Tensor {
    let mut ctx = Context::eval();
    ctx.attention_mask = Some(mask.shallow_clone());
    tch::no_grad(|| model.forward(ids, &mut ctx).unwrap())
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b.to_device(a.device())).abs().max().double_value(&[])
}

/// Seeded `N(0, 1)` values (drawn on the CPU) on the test device.
pub fn randn(shape: &[i64], seed: u64) -> Tensor {
    randn_seeded(shape, seed, device()).unwrap()
}

/// Fill the trained factor(s) of adapter `name` with seeded noise (a stand-in for training).
pub fn fake_train<M: ModuleExt + ?Sized>(model: &mut M, name: &str, seed: u64) {
    let names = orthogonal_merge::trained_parameter_names(model, &[name]);
    let mut k = 0;
    model
        .for_each_param_mut(&mut |n, t| {
            if names.iter().any(|x| x == n) {
                k += 1;
                let v = randn(&t.size(), seed + k) * 0.1;
                tch::no_grad(|| {
                    t.copy_(&v);
                });
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(k as usize, names.len());
}

/// A random LoRA task on layer `layer`.
pub fn lora_task(
    name: &str,
    layer: &str,
    out: i64,
    inp: i64,
    r: i64,
    scale: f64,
    seed: u64,
) -> TaskDelta {
    let f = LoraFactors::new(randn(&[r, inp], seed), randn(&[out, r], seed + 1), scale).unwrap();
    TaskDelta::new(name).with(layer, Delta::Lora(f))
}

pub fn full_task(name: &str, layer: &str, t: &Tensor) -> TaskDelta {
    TaskDelta::new(name).with(layer, Delta::full(t).unwrap())
}

pub fn is_wrapped<M: ModuleExt + ?Sized>(model: &M, path: &str) -> bool {
    model.get_as::<AdaptedLinear>(path).is_ok()
}
