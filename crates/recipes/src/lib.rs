//! Recipes: the end-to-end compositions of `model-zoo`'s architectures with
//! the method crates that more than one program runs. The `modular` binary's
//! user commands (`demo`, `distill`) and the `experiments` crate both call
//! these, so each composition is written once:
//! - [`flags`]: the command-line flag parser and usage errors;
//! - [`tune`]: the tuning kinds of the sentiment experiments (full, EMoE,
//!   LoRA, LoRA + EMoE, bottleneck adapter, VL-PET, LoRA + G) as
//!   `FinetuneHooks`;
//! - [`merge`]: the merge tasks from `data/` and the hooks that train one
//!   orthogonal or plain LoRA adapter per task;
//! - [`bricks`]: the functional corpus, its batches, the profile with
//!   sentence embeddings and the short analysis the demo shows;
//! - [`m2mkd`]: the m2mKD pipeline on MiniLM: teacher, meta model,
//!   incubation, and the modular student whose FFNs are `moe-router`
//!   mixture-of-experts layers;
//! - [`report`] and [`svg`]: atomic text outputs and bar charts.

pub mod bricks;
pub mod flags;
pub mod m2mkd;
pub mod merge;
pub mod report;
pub mod svg;
pub mod tune;

pub use flags::AnyResult;

/// The repository's root (where `data/` and `docs/` live).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
