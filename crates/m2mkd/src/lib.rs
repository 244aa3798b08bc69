//! # m2mkd
//!
//! Module-to-module knowledge distillation: Lo, Hu, Chen, Hsieh, Qiu, Yu
//! (2024), "m2mKD: Module-to-Module Knowledge Distillation for Modular
//! Transformers" (arXiv 2402.16918), repository `kamanphoebe/m2mKD`, built
//! on Deep Incubation (Ni et al., "Deep Incubation: Training Large Models by
//! Divide-and-Conquering"). A monolithic teacher is split into M modules;
//! each student module is trained, independently of the others, to make a
//! frozen shallow "meta" model behave like the teacher module does in it;
//! the student is then assembled and trained end to end.
//!
//! Specification: `docs/m2mkd.md` (Method). Files in the order of the algorithm:
//! 1. [`error`]: bad boundaries, width mismatches, unknown losses, NaN;
//! 2. [`stage`]: [`LayerStack`] (a monolithic model, `forward(x, start, end)`),
//!    [`Stage`] and [`ModularModel`] (M modules in a row);
//! 3. [`split`]: [`Boundaries`] (`divided_depths`, validated) and [`split_teacher`];
//! 4. [`meta`]: the frozen [`MetaModel`] and its storage-sharing replicas for parallel jobs;
//! 5. [`stitch`]: [`Stitch`] (LayerNorm + Linear, or Linear) and [`StitchPolicy`];
//! 6. [`hybrid`]: [`Hybrid`], `M_{>i}(post(S_i(pre(M_{<i}(x)))))` beside `M_{>i}(T_i(M_{<i}(x)))`;
//! 7. [`loss`]: eq. 2 (KL at τ with `sum_over_BC` or `batchmean`, hard
//!    variant, α mix with CE), hidden-state matching, the [`LossRegistry`];
//! 8. [`optim`]: AdamW with schedule and clipping; [`data`]: batches;
//! 9. [`pipeline`]: [`incubate`], [`distil_all`] (sequential or parallel),
//!    [`assemble`] / [`load_module`], [`train_end_to_end`].
//!
//! Student modules are any [`tensor_core::Module`]: a [`Stage`] of BERT
//! layers, a user's mixture-of-experts block, anything that maps the hidden
//! states of its width to the next.

pub mod data;
pub mod error;
pub mod hybrid;
pub mod loss;
pub mod meta;
pub mod optim;
pub mod pipeline;
pub mod split;
pub mod stage;
pub mod stitch;

pub use data::{Batch, BatchSource};
pub use error::{Error, Result};
pub use hybrid::{Hybrid, HybridOptions};
pub use loss::{
    DistilLoss, KdConfig, KdType, KlNorm, LossInputs, LossRegistry, LossTerm, kd_hard, kd_soft,
    m2mkd_loss,
};
pub use meta::{MetaModel, ModuleBuilder};
pub use optim::{OptimConfig, Optimizer, Schedule};
pub use pipeline::{
    DistilConfig, Distillation, DistilledModule, ModuleReport, StepOutput, TrainReport, assemble,
    distil_all, distil_module, distil_step, incubate, load_module, predict, save_module,
    train_end_to_end,
};
pub use split::{Boundaries, split_into_modular, split_teacher};
pub use stage::{LayerStack, ModularModel, Stage};
pub use stitch::{Stitch, StitchKind, StitchPolicy, Stitched};
