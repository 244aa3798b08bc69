//! Batches for the pipeline. Distillation jobs run on several threads, so a
//! batch source is `Sync` and builds each batch's tensors on demand (a
//! `Tensor` is `Send` but not `Sync`). Every module job sees the same batch
//! sequence, `batch(0), batch(1), ...`, as every module of the paper is
//! trained on the same data.

use tensor_core::Context;
use tensor_core::tch::Tensor;

use crate::error::Result;

/// One batch: the raw input (token ids, images, features), targets (class
/// ids `[B]` or probability rows `[B, C]`), and an optional `[B, T]` mask.
#[derive(Debug)]
pub struct Batch {
    pub input: Tensor,
    pub targets: Tensor,
    pub mask: Option<Tensor>,
}

impl Batch {
    pub fn new(input: Tensor, targets: Tensor) -> Self {
        Self {
            input,
            targets,
            mask: None,
        }
    }

    pub fn with_mask(mut self, mask: Tensor) -> Self {
        self.mask = Some(mask);
        self
    }

    /// A forward context carrying the batch's mask.
    pub fn context(&self, train: bool) -> Context {
        let mut ctx = if train {
            Context::train()
        } else {
            Context::eval()
        };
        ctx.attention_mask = self.mask.as_ref().map(Tensor::shallow_clone);
        ctx
    }
}

/// Where training batches come from: `batch(step)` for `step = 0, 1, ...`.
pub trait BatchSource: Sync {
    fn batch(&self, step: u64) -> Result<Batch>;
}

impl<F: Fn(u64) -> Result<Batch> + Sync> BatchSource for F {
    fn batch(&self, step: u64) -> Result<Batch> {
        self(step)
    }
}
