//! # The training kit
//!
//! What fine-tuning a `tensor-core` model needs, model-agnostic (everything
//! goes through named parameters and closures), each part checked against
//! its reference (PyTorch, Hugging Face transformers, scikit-learn; values
//! from `scripts/train_reference.py`, fixtures in `tests/fixtures/train/`).
//! Reading order:
//!
//! 1. [`optim`]: [`AdamW`], exactly `torch.optim.AdamW`, with a no-decay
//!    group for biases and layer norms picked by name patterns;
//! 2. [`schedule`]: [`LrSchedule`], constant / linear / cosine with warm-up,
//!    as transformers' `get_*_schedule_with_warmup`;
//! 3. [`clip`]: [`clip_grad_norm`], as `torch.nn.utils.clip_grad_norm_`;
//! 4. [`metrics`]: accuracy, macro-F1, Matthews correlation and the
//!    confusion matrix, as scikit-learn;
//! 5. [`batch`]: [`pad_batch`] into a [`Batch`], and [`BatchPlan`], seeded
//!    shuffled index batches;
//! 6. [`loops`]: [`train_epoch`] and [`evaluate`] over index batches and a
//!    closure, with a progress bar;
//! 7. [`checkpoint`]: [`save_checkpoint`] / [`load_checkpoint`], safetensors
//!    with metadata, written atomically, mismatches reported by name;
//! 8. [`hooks`]: [`TrainHooks`], how a method crate takes part in a recipe
//!    it does not own, for any model type;
//! 9. [`scaler`]: [`GradScaler`], dynamic loss scaling for f16;
//!
//! and [`freeze_all_but`] here, to train only part of a model.

pub mod batch;
pub mod checkpoint;
pub mod clip;
pub mod hooks;
pub mod loops;
pub mod metrics;
pub mod optim;
pub mod scaler;
pub mod schedule;

pub use batch::{Batch, BatchIter, BatchPlan, SplitMix64, pad_batch, pad_batch_with_labels};
pub use checkpoint::{LoadReport, load_checkpoint, read_metadata, save_checkpoint, save_tensors};
pub use clip::{clip_grad_norm, grad_norm};
pub use hooks::{NoHooks, TrainHooks};
pub use loops::{EpochStats, EvalOutput, TrainOptions, evaluate, train_epoch};
pub use metrics::{
    ClassificationMetrics, ConfusionMatrix, accuracy, class_ids, confusion_matrix, macro_f1,
    matthews_corrcoef,
};
pub use optim::{AdamW, AdamWConfig, DEFAULT_NO_DECAY, ParamGroup};
pub use scaler::{GradScaler, ScalerConfig};
pub use schedule::{LrSchedule, ScheduleKind, WarmupStart};

use crate::ModuleExt;

/// Freeze every parameter of `module`, then make trainable those whose full
/// name matches one of the glob `patterns` (`"*.lora_*"`, `"classifier.*"`).
/// Returns how many parameters are trainable afterwards: 0 means no pattern
/// matched anything.
pub fn freeze_all_but<M: ModuleExt + ?Sized>(module: &mut M, patterns: &[&str]) -> usize {
    module.set_trainable("*", false);
    for p in patterns {
        module.set_trainable(p, true);
    }
    module.trainable_parameters().len()
}

/// Reading the reference values of `tests/fixtures/train/*.json`.
#[cfg(test)]
pub(crate) mod test_fixtures {
    use serde_json::Value;

    /// A JSON array of numbers as f32.
    pub(crate) fn floats(v: &Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use crate::module::Sequential;
    use crate::tch::Device;

    #[test]
    fn freeze_all_but_keeps_only_matches() {
        // Trainability flags only: nothing is computed, the host suffices.
        let mut m = Sequential::new()
            .push(Linear::new(3, 3, true, Device::Cpu).unwrap())
            .push(Linear::new(3, 2, true, Device::Cpu).unwrap());
        assert_eq!(freeze_all_but(&mut m, &["1.*"]), 2);
        let trainable: Vec<String> = m
            .trainable_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(trainable, vec!["1.weight", "1.bias"]);
        assert_eq!(freeze_all_but(&mut m, &["*.bias", "0.weight"]), 3);
        assert_eq!(freeze_all_but(&mut m, &["nothing.*"]), 0);
        // An optimiser over a fully frozen model is a clear error.
        let e = AdamW::for_module(&m, AdamWConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no parameters"), "{e}");
        // Through a trait object.
        let mut boxed: Box<dyn crate::Module> = Box::new(m);
        assert_eq!(freeze_all_but(boxed.as_mut(), &["*"]), 4);
    }
}
