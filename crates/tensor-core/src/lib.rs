//! # tensor-core
//!
//! The one crate every method crate of *modular* depends on: libtorch (via
//! `tch`) with the conventions the methods share.
//!
//! Reading order:
//! 1. [`device`]: CUDA when available, else CPU; `MODULAR_FORCE_CPU` / `MODULAR_DEVICE`.
//! 2. [`error`]: one [`Error`] with the operation, module path and shapes.
//! 3. [`module`]: the extension point, [`Module`] in named [`Slot`]s, the
//!    forward [`Context`], and [`ModuleExt`] to find, replace, wrap and
//!    insert-after sub-modules by their Hugging Face paths.
//!    [`contract`] checks the contract every module's lists must keep.
//! 4. [`layers`]: `Linear`, `LayerNorm`, `Embedding`, `FeedForward`,
//!    `Attention`, named as checkpoints name them.
//! 5. [`grouped`]: grouped expert computation (permute, per-expert matmul,
//!    unpermute), shared by the mixture-of-experts crates.
//! 6. [`io`]: safetensors, memory-mapped reads and atomic writes.
//! 7. [`seed`]: seeding libtorch's global generator and seeded random
//!    tensors; [`rng`]: the seeded host-side generator.
//! 8. [`train`]: the training kit every crate shares: AdamW, schedules,
//!    clipping, the gradient scaler, batching, loops, metrics, checkpoints.
//! 9. [`adapt`]: the adapted-linear host every adapter kind plugs into
//!    (an open [`adapt::LinearDelta`] trait), mixed-adapter batches, and
//!    the PEFT adapter folder format.
//! 10. [`testing`]: the closeness check and the test device, for tests.

// `#[derive(Module)]` names `::tensor_core`, also inside this crate.
extern crate self as tensor_core;

pub mod adapt;
pub mod contract;
pub mod device;
pub mod error;
pub mod grouped;
pub mod io;
pub mod layers;
pub mod module;
pub mod rng;
pub mod seed;
pub mod testing;
pub mod train;

pub use device::{DType, best};
pub use error::{Error, Result, ResultExt, TchResultExt};
pub use module::{Context, Module, ModuleExt, ParamCount, Slot};
pub use tch;

/// The names most code needs.
pub mod prelude {
    pub use crate::device::{DType, best};
    pub use crate::error::{Error, Result, ResultExt, TchResultExt};
    pub use crate::layers::{
        Activation, Attention, AttentionConfig, AttentionNames, Embedding, FeedForward, FfnNames,
        FfnPart, LayerNorm, Linear,
    };
    pub use crate::module::{Context, Module, ModuleExt, Sequential, Slot, downcast_ref, is};
    pub use tch::{Device, Kind, Tensor};
}
