//! Which modules an adapter goes into, with PEFT's matching rules, and
//! seeded initialisation keyed by module path.
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

use std::collections::BTreeMap;

use tensor_core::module::glob_match;
use tensor_core::seed::with_seed;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Does `path` match the target entry `entry` (PEFT suffix rule, or a glob)?
pub fn matches_target(path: &str, entry: &str) -> bool {
    if entry.contains('*') || entry.contains('?') {
        return glob_match(entry, path);
    }
    path == entry
        || (path.len() > entry.len()
            && path.ends_with(entry)
            && path.as_bytes()[path.len() - entry.len() - 1] == b'.')
}

/// Does `path` match any of `entries`?
pub fn matches_any(path: &str, entries: &[String]) -> bool {
    entries.iter().any(|e| matches_target(path, e))
}

/// The value of the most specific (longest) key of `patterns` that matches `path`.
pub fn pattern_value<'a, T>(path: &str, patterns: &'a BTreeMap<String, T>) -> Option<&'a T> {
    patterns
        .iter()
        .filter(|(k, _)| matches_target(path, k))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v)
}

/// FNV-1a over the bytes of `parts` (separated), mixed into `seed`.
pub fn module_seed(seed: u64, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    seed ^ h
}

/// `U(-bound, bound)` of `shape` drawn on the CPU from `seed`, then moved to `device`.
pub fn uniform(shape: &[i64], bound: f64, seed: u64, device: Device) -> Result<Tensor> {
    let t = with_seed(seed, || {
        Tensor::f_empty(shape, (Kind::Float, Device::Cpu))
            .and_then(|mut t| t.f_uniform_(-bound, bound))
    })?;
    Ok(t.f_to_device(device)?)
}

/// `N(0, std²)` of `shape` drawn on the CPU from `seed`, then moved to `device`.
pub fn normal(shape: &[i64], std: f64, seed: u64, device: Device) -> Result<Tensor> {
    let t = with_seed(seed, || Tensor::f_randn(shape, (Kind::Float, Device::Cpu)))?;
    Ok(t.f_mul_scalar(std)?.f_to_device(device)?)
}

/// A trainable leaf made from `t`.
pub(crate) fn param(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_suffix_rule() {
        assert!(matches_target(
            "encoder.layer.0.attention.self.query",
            "query"
        ));
        assert!(matches_target(
            "encoder.layer.0.output.dense",
            "layer.0.output.dense"
        ));
        assert!(!matches_target(
            "encoder.layer.0.attention.output.dense",
            "layer.0.output.dense"
        ));
        assert!(!matches_target(
            "encoder.layer.0.attention.self.myquery",
            "query"
        ));
        assert!(matches_target("query", "query"));
        assert!(matches_target(
            "encoder.layer.3.attention.self.query",
            "encoder.layer.*.attention.self.query"
        ));
    }

    #[test]
    fn most_specific_pattern_wins() {
        let mut p = BTreeMap::new();
        p.insert("value".to_owned(), 4);
        p.insert("layer.1.attention.self.value".to_owned(), 2);
        assert_eq!(
            pattern_value("encoder.layer.1.attention.self.value", &p),
            Some(&2)
        );
        assert_eq!(
            pattern_value("encoder.layer.0.attention.self.value", &p),
            Some(&4)
        );
        assert_eq!(
            pattern_value("encoder.layer.0.attention.self.key", &p),
            None
        );
    }

    #[test]
    fn seeds_depend_on_names_not_order() {
        assert_eq!(module_seed(0, &["a", "b"]), module_seed(0, &["a", "b"]));
        assert_ne!(module_seed(0, &["a", "b"]), module_seed(0, &["ab", ""]));
        assert_ne!(module_seed(0, &["a"]), module_seed(1, &["a"]));
    }
}
