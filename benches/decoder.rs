//! A Llama-family decoder (model-zoo's `llama.rs`) on the CPU in f32 against
//! Hugging Face transformers + PyTorch (`reference/decoder.py`), same config,
//! same shapes, same run: a random Llama with 4 layers, width 512, 8 query /
//! 2 key-value heads of 64, SwiGLU width 1408, vocabulary 32000, untied head.
//! - `prefill_4x128`: logits of a 4 × 128 batch, no cache;
//! - `decode_4x32_new32`: greedy generation of 32 tokens after a 4 × 32
//!   prompt through the KV cache (no stop token), prefill included;
//! - `decode_one_adapter_new32` / `decode_mixed4_new32`: the same with four
//!   LoRA adapters (r = 8 on q_proj/v_proj) loaded, every row using the
//!   first one, or row i using adapter i in one mixed batch (the per-request
//!   adapter overhead is mixed / one − 1).

use criterion::criterion_main;
use model_zoo::config::JsonConfig;
use model_zoo::llama::{GenerateOptions, LlamaConfig, LlamaForCausalLM, Sampling};
use pet_core::{LoraConfig, LoraInit, MixedBatch, add_lora, set_adapter};
use tensor_core::module::Context;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::randint_seeded;

fn config() -> LlamaConfig {
    let v = serde_json::json!({
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    LlamaConfig::from_json(&JsonConfig::from_value("bench config", v).unwrap()).unwrap()
}

fn opts() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 32,
        sampling: Sampling::Greedy,
        stop_tokens: vec![],
        pad_token_id: 0,
    }
}

fn ids(b: i64, t: i64) -> (Tensor, Tensor) {
    let ids = randint_seeded(31000, &[b, t], 1, Device::Cpu).unwrap() + 100;
    (ids, Tensor::ones([b, t], (Kind::Int64, Device::Cpu)))
}

fn benches() {
    let mut c = modular_benches::criterion();
    let mut g = c.benchmark_group("decoder");
    g.sample_size(10);
    let mut model =
        tensor_core::seed::with_seed(0, || LlamaForCausalLM::new(config(), Device::Cpu)).unwrap();
    let (p_ids, p_mask) = ids(4, 128);
    g.bench_function("prefill_4x128/rust", |b| {
        b.iter(|| tch::no_grad(|| model.logits(&p_ids, Some(&p_mask)).unwrap()))
    });
    let (g_ids, g_mask) = ids(4, 32);
    g.bench_function("decode_4x32_new32/rust", |b| {
        b.iter(|| model.generate(&g_ids, Some(&g_mask), &opts()).unwrap())
    });
    let names = ["a0", "a1", "a2", "a3"];
    for (i, n) in names.iter().enumerate() {
        let mut cfg = LoraConfig::new(8, 8.0, &["q_proj", "v_proj"]);
        cfg.init = LoraInit::Random;
        cfg.seed = i as u64;
        add_lora(&mut model, n, &cfg).unwrap();
    }
    set_adapter(&mut model, &["a0"]).unwrap();
    g.bench_function("decode_one_adapter_new32/rust", |b| {
        b.iter(|| model.generate(&g_ids, Some(&g_mask), &opts()).unwrap())
    });
    g.bench_function("decode_mixed4_new32/rust", |b| {
        b.iter(|| {
            let mut ctx = Context::eval();
            ctx.insert(MixedBatch::new(&names, Device::Cpu).unwrap());
            model
                .generate_with(&g_ids, Some(&g_mask), &opts(), ctx, &mut |_| Ok(()))
                .unwrap()
        })
    });
    g.finish();
    c.final_summary();
}

criterion_main!(benches);
