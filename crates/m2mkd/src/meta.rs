//! The meta model M (m2mKD §3.1, Algorithm step 1): a shallow model with one
//! block per module, trained first (or loaded), then frozen. Every hybrid
//! network borrows its prefix `M_{<i}` and suffix `M_{>i}`.
//!
//! Modules are distilled as independent jobs, possibly on several threads.
//! A `dyn Module` is `Send` but not `Sync`, so jobs cannot share one meta
//! model; each job gets a [`MetaModel::replica`]: the same architecture
//! built again by the user's builder, whose parameters are then pointed at
//! the original's storage (no copy). The meta model is frozen, so the
//! shared storage is only ever read.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tensor_core::{ModuleExt, Slot};

use crate::error::{Error, Result};
use crate::stage::ModularModel;

/// Builds meta module `i` of `M` (embeddings in module 0, head in module M-1).
pub type ModuleBuilder = dyn Fn(usize, usize) -> Result<Slot> + Send + Sync;

/// The frozen meta model and the recipe to rebuild its modules.
pub struct MetaModel {
    model: ModularModel,
    builder: Arc<ModuleBuilder>,
}

impl fmt::Debug for MetaModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaModel")
            .field("modules", &self.model.len())
            .field("width", &self.model.width())
            .finish()
    }
}

impl MetaModel {
    /// Build `num_modules` modules of hidden width `width` with `builder(i, M)`.
    pub fn new(num_modules: usize, width: i64, builder: Arc<ModuleBuilder>) -> Result<Self> {
        if num_modules == 0 {
            return Err(Error::config("the meta model needs at least one module"));
        }
        let modules = (0..num_modules)
            .map(|i| builder(i, num_modules))
            .collect::<Result<Vec<_>>>()?;
        let model = ModularModel::new(modules, vec![width; num_modules])?;
        Ok(Self { model, builder })
    }

    pub fn model(&self) -> &ModularModel {
        &self.model
    }

    /// To train the meta model (step 1) or load its weights before freezing.
    pub fn model_mut(&mut self) -> &mut ModularModel {
        &mut self.model
    }

    pub fn len(&self) -> usize {
        self.model.len()
    }

    pub fn is_empty(&self) -> bool {
        self.model.is_empty()
    }

    pub fn width(&self) -> i64 {
        self.model.width()
    }

    /// Freeze every parameter (the meta model never trains during distillation).
    pub fn freeze(&mut self) {
        self.model.set_trainable("*", false);
    }

    /// Whether no parameter requires a gradient.
    pub fn is_frozen(&self) -> bool {
        self.model.trainable_parameters().is_empty()
    }

    /// A second meta model whose parameters share this one's storage.
    pub fn replica(&self) -> Result<ModularModel> {
        let m = self.model.len();
        // The builder's random init is overwritten below; drawing it under
        // the seed lock keeps it out of any other thread's seeded draws.
        let modules = tensor_core::seed::with_seed_lock(|| {
            (0..m)
                .map(|i| (self.builder)(i, m))
                .collect::<Result<Vec<_>>>()
        })?;
        let mut copy = ModularModel::new(modules, vec![self.width(); m])?;
        let shared: HashMap<String, tensor_core::tch::Tensor> =
            self.model.named_parameters().into_iter().collect();
        let mut seen = 0usize;
        copy.for_each_param_mut(&mut |name, t| {
            let src = shared.get(name).ok_or_else(|| {
                tensor_core::Error::unknown(
                    "meta parameter (the builder made a different architecture)",
                    name,
                    shared.keys().take(8).cloned().collect(),
                )
            })?;
            if src.size() != t.size() {
                return Err(tensor_core::Error::shape(
                    format!("meta replica '{name}'"),
                    format!("{:?}", src.size()),
                    t.size(),
                ));
            }
            *t = src.shallow_clone();
            seen += 1;
            Ok(())
        })?;
        if seen != shared.len() {
            return Err(Error::config(format!(
                "the meta builder made {seen} parameters, the meta model has {}",
                shared.len()
            )));
        }
        Ok(copy)
    }
}
