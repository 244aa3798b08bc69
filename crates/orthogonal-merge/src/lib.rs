//! # orthogonal-merge
//!
//! Independently trained adapters that merge by plain addition, and the
//! standard ways to merge adapters or task vectors, for any `tensor-core`
//! model:
//! - **Orthogonal adaptation** (Po, Yang, Aberman, Wetzstein, CVPR 2024,
//!   arXiv 2312.02432): per layer a shared seeded orthogonal basis, disjoint
//!   bins of `r` columns per concept from a persisted registry, the frozen
//!   factor a bin, the trained factor zero-initialised, so
//!   `⟨ΔW_i, ΔW_j⟩_F = 0` and `W = W0 + Σ_i ΔW_i` loses nothing;
//! - **merging** of LoRA adapters or full weight deltas: sum, task arithmetic
//!   (arXiv 2212.04089), concatenation, truncated SVD, magnitude pruning, TIES
//!   (arXiv 2306.01708), DARE (arXiv 2311.03099), as PEFT's merge utilities
//!   compute them, and the closed-form least-squares merge of Mix-of-Show's
//!   gradient fusion (arXiv 2305.18292);
//! - an **interference report**: pairwise Frobenius cosines of the deltas and
//!   overlaps of their subspaces, per layer, and, given each task's recorded
//!   inputs, the crosstalk `‖ΔW_j X_i‖ / ‖ΔW_i X_i‖`.
//!
//! Specification: `docs/orthogonal-merge.md` (Method). Reading order:
//! 1. [`error`]: what can be wrong (full registry, bins claimed twice, mismatched shapes, ranks, bases, base models);
//! 2. [`basis`]: the seeded bases and bins; [`registry`]: concept → bin, persisted;
//! 3. [`adapter`]: [`OrthoAdapter`], a delta kind of tensor-core's [`AdaptedLinear`]; adding/removing adapters by PEFT target patterns, training set-up;
//! 4. [`delta`]: what merges consume ([`TaskDelta`]: LoRA pairs or full deltas per layer);
//! 5. the operators: [`ops`] (task arithmetic), [`prune`], [`ties`], [`dare`], [`svd`], [`lsq`];
//! 6. [`mod@merge`]: [`MergeConfig`], [`merge()`], applying the result to a model;
//! 7. [`mod@interference`]: the report; [`mod@crosstalk`]: each delta on the other tasks' inputs;
//! 8. [`peft_io`]: PEFT-style `adapter_config.json` + `adapter_model.safetensors`.
//!
//! ```no_run
//! use orthogonal_merge::*;
//! # fn demo(model: &mut dyn tensor_core::Module, other: &mut dyn tensor_core::Module) -> orthogonal_merge::Result<()> {
//! // Once, before any training: the shared registry.
//! let targets = ["query", "value"];
//! let mut reg = Registry::for_model(&*model, &targets, BasisKind::QrBins, 42, 8, FrozenSide::default())?;
//! reg.claim("sst2")?;
//! reg.claim("agnews")?;
//! reg.save("registry.json")?;
//! // Each trainer, independently:
//! let reg = Registry::load("registry.json")?;
//! add_orthogonal(model, "sst2", &reg, &AdapterConfig::new(&targets))?;
//! mark_only_trainable(model, &[], &["classifier.*"]);
//! // ... train ...
//! save_adapter(&*model, "sst2", "adapters/sst2", &SaveOptions::default())?;
//! // Merging: W = W0 + Σ_i ΔW_i, with the interference report.
//! let report = merge_adapters_into(other, &["adapters/sst2", "adapters/agnews"], &MergeConfig::new(Method::Sum))?;
//! println!("{}", report.interference);
//! # Ok(()) }
//! ```

pub mod adapter;
pub mod basis;
pub mod crosstalk;
pub mod dare;
pub mod delta;
pub mod error;
pub mod interference;
pub mod lsq;
pub mod merge;
pub mod ops;
pub mod peft_io;
pub mod prune;
pub mod registry;
pub mod svd;
pub mod target;
pub mod ties;

pub use adapter::{
    AdapterConfig, AddReport, OrthoAdapter, adapter_names, add_lora, add_orthogonal,
    mark_only_trainable, merge_and_unload, remove_adapter, set_adapters_enabled, task_delta,
    trained_parameter_names,
};
pub use basis::{BasisKind, BasisSpec, FrozenSide};
pub use crosstalk::{CrosstalkReport, CrosstalkStat, crosstalk};
pub use delta::{AdapterMeta, Delta, LoraFactors, OrthoInfo, TaskDelta};
pub use error::{Error, Result};
pub use interference::{InterferenceReport, interference, interference_with_features};
pub use lsq::{Features, record_features};
pub use merge::{
    MergeConfig, MergeReport, Merged, MergedDelta, Method, apply_merged, check_against_model,
    check_tasks, merge, merge_adapters_into, merge_with_features, unapply_merged,
};
pub use peft_io::{
    AdapterFile, SaveOptions, load_adapter, load_saved_modules, read_adapter, save_adapter,
    save_task,
};
pub use registry::Registry;
pub use tensor_core::adapt::AdaptedLinear;
pub use ties::SignMethod;
