//! Shared by the integration tests: the PEFT fixture (a tiny random BERT
//! made by `scripts/peft_fixture.py`) and forwards with a context.
#![allow(dead_code)]

use std::path::PathBuf;

use model_zoo::bert::BertModel;
use pet_core::MixedBatch;
use tensor_core::Module;
use tensor_core::io::SafetensorsFile;
use tensor_core::module::Context;
use tensor_core::tch::{Device, Tensor};

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

pub fn base_model() -> BertModel {
    BertModel::from_folder(fixture_dir().join("base"), Device::Cpu).expect("fixture base model")
}

pub struct Inputs {
    pub ids: Tensor,
    pub mask: Tensor,
    file: SafetensorsFile,
}

impl Inputs {
    pub fn load() -> Self {
        let file = SafetensorsFile::open(fixture_dir().join("inputs.safetensors")).unwrap();
        Self {
            ids: file.load("input_ids", Device::Cpu).unwrap(),
            mask: file.load("attention_mask", Device::Cpu).unwrap(),
            file,
        }
    }

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
    ctx.insert(pet_core::mixed_batch(model, names, Device::Cpu).unwrap());
    let _: Option<&MixedBatch> = ctx.get::<MixedBatch>();
    model.forward(ids, &mut ctx).unwrap()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
