//! Adapted `Linear` layers: the one host every adapter kind of the
//! workspace plugs into, and the one adapter file format (docs/tensor-core.md,
//! "Adapted linear layers").
//!
//! A frozen `y = x Wᵀ + b` carries named deltas. Each delta says, through
//! the open [`LinearDelta`] trait, what it does at three stages of the
//! forward pass:
//!
//! ```text
//! x̃ = x ⊙ Π_a u_a                  input scale   (IA3 on the FFN side)
//! h = (x̃ Wᵀ + b) ⊙ Π_a v_a          output scale  (IA3 on keys/values)
//! y = h + Σ_a c_a(x, h)             additive change (LoRA, DoRA, adapters, gates)
//! ```
//!
//! A delta that is a plain low-rank change `c = s·x AᵀBᵀ` also says so
//! ([`LinearDelta::low_rank`]); the host then runs the fused path
//! `y = addmm(x Wᵀ + b, s·x Aᵀ, Bᵀ)` and, in mixed-adapter batches, gathers
//! every sample's factors into one batched matmul.
//!
//! Reading order:
//! 1. [`target`]: which modules a pattern names (PEFT's suffix rule or a
//!    glob), the most specific per-module value, name-keyed seeds;
//! 2. [`delta`]: the [`LinearDelta`] trait and what it hands the host;
//! 3. [`mixed`]: the per-sample adapter choice of a mixed batch;
//! 4. [`host`]: [`AdaptedLinear`], its forward paths, merging with undo
//!    records, and the model-tree helpers;
//! 5. [`peft`]: the `adapter_config.json` + `adapter_model.safetensors`
//!    folder Python PEFT reads and writes.

pub mod delta;
pub mod host;
pub mod mixed;
pub mod peft;
pub mod target;

pub use delta::{DeltaInput, Folded, LinearDelta, LowRank, MergeOrder};
pub use host::{
    AdaptedLinear, adapter_names, base_linear, base_linear_mut, hosts, insert, linear_paths,
    mark_only_trainable, resolve_targets, unwrap_empty_hosts,
};
pub use mixed::{BASE, MixedBatch};
pub use target::{matches_any, matches_target, name_seed, pattern_value, rank_alpha};
