//! Shared by the integration tests: the PEFT fixture (a tiny random BERT
//! made by `scripts/peft_fixture.py`) and forwards with a context. Models
//! and inputs are on the test device ([`tensor_core::testing::device`],
//! `MODULAR_TEST_DEVICE`); expected outputs stay on the CPU.
#![allow(dead_code)]

use std::path::PathBuf;

use model_zoo::bert::BertModel;
use pet_core::MixedBatch;
use tensor_core::io::SafetensorsFile;
use tensor_core::module::Context;
use tensor_core::tch::{Device, Tensor};
use tensor_core::testing::{device, tolerances};
use tensor_core::{DType, Module};

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

/// `bound`, a CPU tolerance for a comparison of two computations done
/// differently (or with PEFT's outputs), scaled as [`tolerances`] scales f32
/// on the test device (unchanged on the CPU, 10x on CUDA).
pub fn scaled(bound: f64) -> f64 {
    bound * tolerances(DType::F32, device()).0 / tolerances(DType::F32, Device::Cpu).0
}

/// The fixture's base model (read on the CPU), on the test device.
pub fn base_model() -> BertModel {
    BertModel::from_folder(fixture_dir().join("base"), device()).expect("fixture base model")
}

pub struct Inputs {
    pub ids: Tensor,
    pub mask: Tensor,
    file: SafetensorsFile,
}

impl Inputs {
    /// The inputs, on the test device.
    pub fn load() -> Self {
        let file = SafetensorsFile::open(fixture_dir().join("inputs.safetensors")).unwrap();
        Self {
            ids: file.load("input_ids", device()).unwrap(),
            mask: file.load("attention_mask", device()).unwrap(),
            file,
        }
    }

    /// PEFT's output `name`, on the CPU.
    pub fn expected(&self, name: &str) -> Tensor {
        self.file.load(name, Device::Cpu).unwrap()
    }
}

/// Last hidden states in evaluation mode.
pub fn run(model: &dyn Module, ids: &Tensor, mask: &Tensor) -> Tensor {
    let mut ctx = Context::eval();
    ctx.attention_mask = Some(mask.shallow_clone());
    model.forward(ids, &mut ctx).unwrap()
}

/// Last hidden states with one adapter name per sample.
pub fn run_mixed(model: &dyn Module, ids: &Tensor, mask: &Tensor, names: &[&str]) -> Tensor {
    let mut ctx = Context::eval();
    ctx.attention_mask = Some(mask.shallow_clone());
    ctx.insert(pet_core::mixed_batch(model, names, ids.device()).unwrap());
    let _: Option<&MixedBatch> = ctx.get::<MixedBatch>();
    model.forward(ids, &mut ctx).unwrap()
}

/// `max |a - b|`, on `a`'s device (`b`, e.g. a CPU fixture, is moved there).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b.to_device(a.device())).abs().max().double_value(&[])
}
