//! Which modules an adapter goes into, and seeds keyed by names.
//!
//! PEFT matches a list entry `t` against a module path `p` when `p == t` or
//! `p` ends with `"." + t` (a suffix on a dot boundary); per-module patterns
//! (`rank_pattern`, `alpha_pattern`) match the same way and the longest
//! matching key wins. An entry containing `*` or `?` is instead a glob over
//! the whole path ([`crate::module::glob_match`]), e.g.
//! `encoder.layer.*.attention.self.query`.
//!
//! Seeds are `seed ⊕ FNV-1a(parts)`, so what is drawn for a module depends on
//! the seed and the module's own name only, never on the order of visits.

use std::collections::BTreeMap;

use crate::module::glob_match;

/// Does `path` match the target entry `entry` (PEFT's suffix rule, or a glob)?
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

/// Rank and `α` of the module at `path`: the most specific `rank_pattern` /
/// `alpha_pattern` entries, else `r` and `alpha` (PEFT's LoRA and LoHa rule).
pub fn rank_alpha(
    path: &str,
    r: i64,
    alpha: f64,
    rank_pattern: &BTreeMap<String, i64>,
    alpha_pattern: &BTreeMap<String, f64>,
) -> (i64, f64) {
    (
        pattern_value(path, rank_pattern).copied().unwrap_or(r),
        pattern_value(path, alpha_pattern).copied().unwrap_or(alpha),
    )
}

/// FNV-1a over the bytes of `parts` (each followed by a separator), mixed into `seed`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_suffix_rule() {
        let q = "encoder.layer.0.attention.self.query";
        assert!(matches_target(q, "query"));
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
        assert_eq!(name_seed(0, &["a", "b"]), name_seed(0, &["a", "b"]));
        assert_ne!(name_seed(0, &["a", "b"]), name_seed(0, &["ab", ""]));
        assert_ne!(name_seed(0, &["a"]), name_seed(1, &["a"]));
    }
}
