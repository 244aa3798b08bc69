//! # model-zoo
//!
//! Real transformers built from `tensor-core` layers, with Hugging Face
//! parameter names, loaded from Hugging Face model folders:
//! - [`bert`]: BERT-family encoders (all-MiniLM-L6-v2 is the default model),
//!   sentence embeddings (mean pooling, optional L2 normalisation) and a
//!   sequence-classification head;
//! - [`gpt`]: a GPT-2 style causal decoder (GPT-2 keys and config);
//! - [`llama`]: Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) with
//!   RoPE and its scaling variants, grouped-query attention, a KV cache and
//!   generation (greedy, temperature, top-k, top-p);
//! - [`vit`]: a small Vision Transformer;
//! - [`source`]: where a model folder comes from (explicit folder, environment,
//!   the packaged default); [`config`]: Hugging Face `config.json`;
//!   [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate;
//! - [`lm`]: the causal language-model loss the decoders share;
//! - [`chat`]: a folder's chat template, rendered as transformers renders it;
//! - [`data`]: the project's real datasets (JSONL);
//! - [`finetune`]: the text-classification recipe, on `tensor_core::train`.
//!
//! Every sub-module is reachable by its Hugging Face path through
//! `tensor_core::ModuleExt` (`encoder.layer.3.attention.self.query`,
//! `encoder.layer.3.(ffn)`), which is how the method crates reach in.

pub mod bert;
pub mod chat;
pub mod config;
pub mod data;
pub mod error;
pub mod finetune;
pub mod gpt;
pub mod llama;
pub mod lm;
pub mod loading;
pub mod source;
pub mod tokenizer;
pub mod vit;

pub use error::{Error, Result};
