//! # pet-core
//!
//! Parameter-efficient tuning for any `tensor-core` model, à la carte:
//! - **LoRA** (Hu et al. 2021), **rsLoRA** (Kalajdzievski 2023), **DoRA**
//!   (Liu et al. 2024) and **IA3** (Liu et al. 2022), as Hugging Face PEFT
//!   computes them, with PEFT's adapter files;
//! - **LoHa** (Hyeon-Woo et al. 2022, arXiv 2108.06098), the low-rank
//!   Hadamard product, as PEFT computes it, with its adapter files;
//! - **bottleneck adapters** (Houlsby et al. 2019; Pfeiffer et al. 2021),
//!   sequential or parallel;
//! - **VL-PET** (Hu et al., ICCV 2023, arXiv 2308.09804): the multi-head
//!   modular modification `ΔH` and the granularity-controlled gate `G`
//!   (large, middle-X, middle-Y, small), `H' = s·(H + ΔH) ⊙ G`, its
//!   lightweight placement, and `G` on LoRA and adapters.
//!
//! Specification: `docs/pet-core.md` (Method). Reading order:
//! 1. [`error`]: what can be wrong (rank 0, no target, unknown adapter, unsafe merge, bad files);
//! 2. [`target`]: PEFT's module-matching rules and per-module seeded initialisation;
//! 3. [`lora`], [`loha`], [`ia3`], [`bottleneck`], [`gate`]: the modules' equations;
//! 4. [`AdaptedLinear`] (tensor-core's host for deltas on a `Linear`; [`Lora`],
//!    [`Ia3`] and [`ParallelAdapter`] are its delta kinds here) and [`site`]
//!    ([`AdapterSite`]: adapters around a sub-module), both [`host::AdapterHost`]s;
//! 5. [`model`]: the lifecycle by name (add, set active, disable, delete,
//!    merge / unmerge / merge-and-unload, trainable report);
//! 6. [`mixed`]: mixed-adapter batches, one batched forward;
//! 7. [`peft_io`]: `adapter_config.json` + `adapter_model.safetensors`;
//! 8. [`vlpet`]: VL-PET's placement in one call.
//!
//! ```no_run
//! use pet_core::{LoraConfig, add_lora, mark_only_adapters_trainable, merge_adapter, save_adapter};
//! # fn demo(model: &mut dyn tensor_core::Module) -> pet_core::Result<()> {
//! add_lora(model, "sst2", &LoraConfig::new(8, 16.0, &["query", "value"]))?;
//! mark_only_adapters_trainable(model, &[], &["classifier.*"]);
//! // ... train ...
//! save_adapter(model, "sst2", "adapters/sst2")?; // loads in Python PEFT
//! merge_adapter(model, &["sst2"], true)?;        // zero inference overhead
//! # Ok(()) }
//! ```

pub mod bottleneck;
pub mod error;
pub mod gate;
pub mod host;
pub mod ia3;
pub mod loha;
pub mod lora;
pub mod mixed;
pub mod model;
pub mod peft_io;
pub mod site;
pub mod target;
pub mod vlpet;

pub use bottleneck::{AdapterConfig, AdapterHeads, ParallelAdapter, Placement};
pub use error::{Error, Result};
pub use gate::{Combine, GateConfig, GateInput, Granularity, InitScheme, MiddleYForm};
pub use ia3::{Ia3, Ia3Config};
pub use loha::{Loha, LohaConfig, add_loha};
pub use lora::{Lora, LoraConfig, LoraInit, LoraScaling};
pub use mixed::{BASE, MixedBatch};
pub use model::{
    AddReport, TrainableReport, active_adapters, adapter_names, add_adapter, add_ia3,
    add_linear_adapter, add_lora, delete_adapter, disable_adapters, enable_adapters,
    mark_only_adapters_trainable, merge_adapter, merge_and_unload, merged_adapters, mixed_batch,
    set_adapter, trainable_report, unload, unmerge_adapter, with_adapters_disabled,
};
pub use peft_io::{load_adapter, save_adapter};
pub use site::AdapterSite;
pub use tensor_core::adapt::AdaptedLinear;
pub use vlpet::{VlPetConfig, apply_vlpet, site_param_count};
