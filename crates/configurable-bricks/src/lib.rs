//! # configurable-bricks
//!
//! Treat a pretrained model as a set of bricks: profile its FFN neurons,
//! attribute them to functionalities, partition them into bricks, and
//! route, combine, update and grow those bricks.
//!
//! Xiao, Zhang, … Sun (2024), "Configurable Foundation Models: Building LLMs
//! from a Modular Perspective", arXiv 2409.02877; attribution after Zhang et
//! al. (2023), "Emergent Modularity in Pre-trained Transformers"
//! (`thunlp/Modularity-Analysis`). Specification: `docs/configurable-bricks.md` (Method).
//!
//! Files in the order of the method's steps:
//! 1. [`profile`]: per-example mean indicator `P ∈ R^{examples × neurons}` of
//!    every FFN of any `tensor-core` model, streamed to safetensors (step 1);
//! 2. [`attribution`]: FuncScore `= AP(P[:, n], y_f)`, exact as scikit-learn (step 3);
//! 3. [`sets`]: top-p% functional sets, resident neurons, overlap and its
//!    random baseline, partition by function (steps 4–6);
//! 4. [`mask`] and [`analysis`]: neuron masks on FFN activations; the
//!    perturbation matrix and the sparsity curve (step 5);
//! 5. [`partition`]: balanced co-activation bricks (step 6);
//! 6. [`route`]: activation-predicting router, retrieval by signature (step 7);
//! 7. [`combine`]: weighted sums, task arithmetic with negation, soups (step 8);
//! 8. [`edit`]: ROME's rank-one edit of an FFN output matrix (step 9);
//! 9. [`grow`]: widen an FFN with new trainable neurons, old ones frozen (steps 9–10);
//! 10. [`svg`]: the figures of the analysis.

pub mod analysis;
pub mod attribution;
pub mod combine;
pub mod controls;
pub mod edit;
pub mod error;
pub mod grow;
pub mod mask;
pub mod partition;
pub mod profile;
pub mod route;
pub mod sets;
pub mod svg;

pub use analysis::{
    Perturbation, SparsityPoint, perturbation_matrix, sparsity_curve, zeroed_losses,
};
pub use attribution::{AttributionConfig, FuncScores, average_precision, func_scores};
pub use controls::{NullDistribution, func_score_null, matched_random_sets, matched_top_sets};
pub use error::{Error, Result};
pub use profile::{
    FfnSite, Indicator, Profile, ProfileConfig, Profiler, TokenScope, profile_corpus,
};
pub use sets::{
    NeuronSet, OverlapFormula, ResidentRule, SetConfig, TopScope, functional_sets, overlap_matrix,
};
