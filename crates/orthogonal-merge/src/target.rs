//! Which `Linear` layers an adapter goes into (PEFT's matching rule), and
//! seeds keyed by names: tensor-core's [`tensor_core::adapt::target`] rules,
//! shared with every adapter crate, with this crate's errors.
//!
//! PEFT (`huggingface/peft`, `tuners/tuners_utils.py`) matches a list entry
//! `t` against a module path `p` when `p == t` or `p` ends with `"." + t`
//! (a suffix on a dot boundary). An entry containing `*` or `?` is a glob
//! over the whole path ([`tensor_core::module::glob_match`]).
//!
//! Seeds: `seed ⊕ FNV-1a(parts)`, so what is drawn for a layer depends on
//! the seed and the layer's own name only, never on the order of visits.

use tensor_core::layers::Linear;
use tensor_core::module::ModuleExt;

use crate::error::{Error, Result};

pub use tensor_core::adapt::linear_paths;
pub use tensor_core::adapt::target::{matches_any, matches_target, name_seed};

/// The `Linear` paths matching `patterns`; an error naming some paths when none does.
pub fn resolve_targets<M: ModuleExt + ?Sized>(
    model: &M,
    patterns: &[String],
) -> Result<Vec<String>> {
    Ok(tensor_core::adapt::resolve_targets(model, patterns)?)
}

/// The base `Linear` at `path` (adapted or not).
pub fn base_linear<'a, M: ModuleExt + ?Sized>(model: &'a M, path: &str) -> Result<&'a Linear> {
    tensor_core::adapt::base_linear(model, path).map_err(not_linear)
}

/// The base `Linear` at `path`, mutably.
pub fn base_linear_mut<'a, M: ModuleExt + ?Sized>(
    model: &'a mut M,
    path: &str,
) -> Result<&'a mut Linear> {
    tensor_core::adapt::base_linear_mut(model, path).map_err(not_linear)
}

/// "holds a X, not a Linear" is a mismatch between the adapter and the model.
fn not_linear(e: tensor_core::Error) -> Error {
    match e {
        tensor_core::Error::Module { path, reason } => Error::mismatch(format!("{path}: {reason}")),
        other => other.into(),
    }
}
