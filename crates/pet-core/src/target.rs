//! Which modules an adapter goes into, with PEFT's matching rules, and
//! seeded initialisation keyed by module path. The matching rules and the
//! name-keyed seeds are [`tensor_core::adapt::target`]'s, shared with every
//! adapter crate.
//!
//! PEFT (`huggingface/peft`, `tuners/tuners_utils.py`) matches a list entry
//! `t` against a module path `p` when `p == t` or `p` ends with `"." + t`;
//! `rank_pattern` / `alpha_pattern` keys match the same way (a suffix on a
//! dot boundary). We add globs: an entry containing `*` or `?` matches the
//! whole path ([`tensor_core::module::glob_match`]), e.g.
//! `encoder.layer.*.attention.self.query`.
//!
//! Initialisation draws from libtorch's generator seeded with
//! `seed ⊕ FNV-1a(path, adapter)`, so a module's initial weights depend on
//! the seed and its own name only, not on the order in which modules are
//! visited.

use tensor_core::tch::{Device, Tensor};

use crate::error::Result;

pub use tensor_core::adapt::target::{matches_any, matches_target, pattern_value};

/// `seed ⊕ FNV-1a(parts)`: [`tensor_core::adapt::name_seed`].
pub use tensor_core::adapt::target::name_seed as module_seed;

/// `U(-bound, bound)` of `shape` drawn on the CPU from `seed`, then moved to `device`.
pub fn uniform(shape: &[i64], bound: f64, seed: u64, device: Device) -> Result<Tensor> {
    Ok(tensor_core::seed::uniform_seeded(
        shape, bound, seed, device,
    )?)
}

/// `N(0, std²)` of `shape` drawn on the CPU from `seed`, then moved to `device`.
pub fn normal(shape: &[i64], std: f64, seed: u64, device: Device) -> Result<Tensor> {
    Ok(tensor_core::seed::randn_seeded(shape, seed, device)?.f_mul_scalar(std)?)
}

/// A trainable leaf made from `t`.
pub(crate) fn param(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}
