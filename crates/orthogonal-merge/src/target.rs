//! Which `Linear` layers an adapter goes into (PEFT's matching rule), and
//! seeds keyed by names.
//!
//! PEFT (`huggingface/peft`, `tuners/tuners_utils.py`) matches a list entry
//! `t` against a module path `p` when `p == t` or `p` ends with `"." + t`
//! (a suffix on a dot boundary). An entry containing `*` or `?` is a glob
//! over the whole path ([`tensor_core::module::glob_match`]).
//!
//! Seeds: `seed ⊕ FNV-1a(parts)`, so what is drawn for a layer depends on
//! the seed and the layer's own name only, never on the order of visits.

use tensor_core::layers::Linear;
use tensor_core::module::{ModuleExt, glob_match, is};

use crate::adapter::OrthoLinear;
use crate::error::{Error, Result};

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

/// FNV-1a over the bytes of `parts` (separated), mixed into `seed`.
pub fn name_seed(seed: u64, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    seed ^ h
}

/// Paths of the `Linear` layers (plain or wrapped by [`OrthoLinear`]), deduplicated, in model order.
pub fn linear_paths<M: ModuleExt + ?Sized>(model: &M) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (p, m) in model.named_modules() {
        if (is::<Linear>(m) || is::<OrthoLinear>(m)) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The `Linear` paths matching `patterns`; an error naming some paths when none does.
pub fn resolve_targets<M: ModuleExt + ?Sized>(
    model: &M,
    patterns: &[String],
) -> Result<Vec<String>> {
    if patterns.is_empty() {
        return Err(Error::config(
            "target_modules is empty; name the Linear layers to adapt (e.g. [\"query\", \"value\"])",
        ));
    }
    let all = linear_paths(model);
    let hits: Vec<String> = all
        .iter()
        .filter(|p| matches_any(p, patterns))
        .cloned()
        .collect();
    if hits.is_empty() {
        return Err(Error::NoTarget {
            patterns: patterns.to_vec(),
            examples: all.into_iter().take(8).collect(),
        });
    }
    Ok(hits)
}

/// The base `Linear` at `path` (inside an [`OrthoLinear`] or not).
pub fn base_linear<'a, M: ModuleExt + ?Sized>(model: &'a M, path: &str) -> Result<&'a Linear> {
    let m = model.get(path)?;
    if let Some(l) = tensor_core::module::downcast_ref::<Linear>(m) {
        return Ok(l);
    }
    if let Some(h) = tensor_core::module::downcast_ref::<OrthoLinear>(m) {
        return Ok(h.linear());
    }
    Err(Error::mismatch(format!(
        "{path}: holds a {}, not a Linear",
        m.kind()
    )))
}

/// The base `Linear` at `path`, mutably.
pub fn base_linear_mut<'a, M: ModuleExt + ?Sized>(
    model: &'a mut M,
    path: &str,
) -> Result<&'a mut Linear> {
    let slot = model.slot_mut(path)?;
    let kind = slot.kind();
    if tensor_core::module::is::<Linear>(slot.as_ref()) {
        return Ok(tensor_core::module::downcast_mut::<Linear>(slot.as_mut()).expect("checked"));
    }
    if let Some(h) = tensor_core::module::downcast_mut::<OrthoLinear>(slot.as_mut()) {
        return Ok(h.linear_mut());
    }
    Err(Error::mismatch(format!(
        "{path}: holds a {kind}, not a Linear"
    )))
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
    fn seeds_depend_on_names_not_order() {
        assert_eq!(name_seed(0, &["a", "b"]), name_seed(0, &["a", "b"]));
        assert_ne!(name_seed(0, &["a", "b"]), name_seed(0, &["ab", ""]));
        assert_ne!(name_seed(0, &["a"]), name_seed(1, &["a"]));
    }
}
