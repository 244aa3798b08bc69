//! LoRA on a Llama-family decoder: PEFT's adapter file on model-zoo's tiny
//! Llama (fixture by `scripts/peft_decoder_fixture.py`, PEFT 0.21.2) gives
//! PEFT's logits unmerged and merged, on every projection `q_proj` ...
//! `down_proj`, with a per-module rank, and round-trips bitwise.

use std::path::PathBuf;

use model_zoo::llama::LlamaForCausalLM;
use pet_core::{load_adapter, merge_adapter, save_adapter};
use tensor_core::ModuleExt;
use tensor_core::tch::{Device, Tensor};
use tensor_core::testing::{closeness, device, slack};

fn base() -> LlamaForCausalLM {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model-zoo/tests/fixtures/tiny-llama");
    LlamaForCausalLM::from_folder(dir, device()).unwrap()
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-llama")
}

/// Logits at the token positions only (padding positions carry no meaning).
fn tokens(logits: &Tensor, mask: &Tensor) -> Tensor {
    let keep = mask.to_device(logits.device()).ne(0).unsqueeze(-1);
    logits.masked_select(&keep).to_device(Device::Cpu)
}

#[test]
fn peft_lora_on_a_decoder_gives_peft_logits() {
    let e: std::collections::HashMap<String, Tensor> =
        tensor_core::io::load(fixture().join("expected.safetensors"), Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let (ids, mask) = (&e["input_ids"], &e["attention_mask"]);
    let mut m = base();
    let r = load_adapter(&mut m, "lora", fixture().join("lora")).unwrap();
    assert_eq!(r.paths.len(), 14, "7 projections x 2 layers");
    let l = m
        .get_as::<pet_core::AdaptedLinear>("model.layers.1.mlp.down_proj")
        .unwrap()
        .get_as::<pet_core::Lora>("lora")
        .unwrap();
    assert_eq!(l.rank(), 2);
    let run = |m: &LlamaForCausalLM| {
        tensor_core::tch::no_grad(|| {
            m.logits(&ids.to_device(device()), Some(&mask.to_device(device())))
        })
        .unwrap()
    };
    let c = closeness(
        &tokens(&run(&m), mask),
        &tokens(&e["logits"], mask),
        1e-5 * slack(),
        0.0,
    )
    .unwrap();
    println!("LoRA on tiny Llama: max |err| vs PEFT = {:e}", c.max_abs);
    assert!(c.ok, "{c:?}");
    // Written here, read back: bitwise the same adapter and logits.
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, "lora", dir.path()).unwrap();
    let mut again = base();
    load_adapter(&mut again, "lora", dir.path()).unwrap();
    assert!(run(&again).equal(&run(&m)));
    merge_adapter(&mut m, &["lora"], true).unwrap();
    let c = closeness(
        &tokens(&run(&m), mask),
        &tokens(&e["merged_logits"], mask),
        1e-5 * slack(),
        0.0,
    )
    .unwrap();
    println!(
        "LoRA on tiny Llama, merged: max |err| vs PEFT = {:e}",
        c.max_abs
    );
    assert!(c.ok, "{c:?}");
}
