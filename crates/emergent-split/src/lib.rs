//! # emergent-split
//!
//! Split a pretrained dense feed-forward network into experts with no new
//! parameters, route tokens to a few of them, and fold the model back to
//! dense after tuning:
//! - **EMoE**: Qiu, Huang, Fu (2023), "Unlocking Emergent Modularity in Large Language
//!   Models" (arXiv 2310.10908), `qiuzh20/EMoE`;
//! - **MoEfication**: Zhang et al. (2022), "MoEfication: Transformer
//!   Feed-forward Layers are Mixtures of Experts" (arXiv 2110.01786),
//!   `thunlp/MoEfication`.
//!
//! Specification: `docs/emergent-split.md` (Method). Files in the order of the
//! algorithm:
//! 1. [`error`]: what can be wrong with a request (`N ∤ d_ff`, `k ∉ 1..=N`,
//!    NaN weights, unknown layers), as errors, never panics;
//! 2. [`kmeans`]: balanced k-means of the L2-normalised key vectors (EMoE
//!    step 1) on their Gram matrix: greedy k-means++ seeding with
//!    [`kmeans::SplitMix64`], an exact min-cost-flow assignment step
//!    (warm-started with the previous step's dual prices) or a greedy one
//!    (`kmeans_solver`), `n_init` restarts in parallel (rayon), a pair-swap
//!    polish of the best start, objective per iteration;
//! 3. [`split`]: the labelling (k-means, MoEfication co-activation, random,
//!    contiguous) and the permutation into contiguous expert blocks (step 2);
//!    [`labels`]: cached labels from a JSON / safetensors file
//!    (`labels_from_file`), validated;
//! 4. [`gate`]: the avg-key gate `s_e(x) = x · mean_{i∈e} W1_i` or another
//!    `select_signal` (`up`, `up_abs`, `inter`, `inter_abs`), top-k hard or
//!    renormalised (`weight_mode`), training noise, refresh after each step
//!    with `gate_refresh_momentum` (steps 3, 4, 6);
//! 5. [`moe_ffn`]: [`moe_ffn::EmoeFfn`], the split FFN as a `tensor-core`
//!    `Module` with the dense FFN's parameter names: a masked path for
//!    training and a sparse path (per expert: one gather, both matmuls, one
//!    scatter-add; only the selected experts) for inference (step 5); `b2`
//!    shared or per expert (`fold_b2`);
//! 6. [`convert`]: replace chosen layers' `FeedForward`s in any model by
//!    path, refresh every gate, and fold back to dense (step 8); every open
//!    point sits in the JSON-serialisable [`convert::EmoeConfig`]; the
//!    default placement is [`convert::reference_layers`] (one FFN in the
//!    upper half, BERT-base's layer 10 of 12);
//! 7. [`regularise`]: the Tutel-path extras the reference trains with
//!    (dropout 0.1 inside the experts, CV² loss weight 0.01, capacity factor
//!    1.5 with priority routing), on by default in
//!    [`convert::EmoeConfig::new`], off in [`convert::EmoeConfig::plain`].
//!
//! ```no_run
//! use emergent_split::convert::{EmoeConfig, convert, reference_layers, fold_back, refresh_gates};
//! # fn demo(model: &mut dyn tensor_core::Module) -> emergent_split::error::Result<()> {
//! let report = convert(model, &reference_layers(12), &EmoeConfig::new(64, 16))?;
//! // ... training loop: after each optimiser step
//! refresh_gates(model)?;
//! // ... after tuning
//! fold_back(model)?;
//! # let _ = report; Ok(()) }
//! ```

pub mod convert;
pub mod error;
pub mod gate;
mod gram;
pub mod kmeans;
pub mod labels;
pub mod moe_ffn;
pub mod regularise;
pub mod split;

pub use convert::{EmoeConfig, SplitStrategy, convert, fold_back, refresh_gates};
pub use error::{Error, Result};
pub use gate::{AvgKeyGate, FoldB2, GateConfig, SelectSignal, WeightMode};
pub use kmeans::{KMeansConfig, KMeansResult, KMeansSolver, SplitMix64, balanced_kmeans};
pub use moe_ffn::{ComputePath, EmoeFfn};
pub use regularise::Regularisers;
pub use split::ExpertSplit;
