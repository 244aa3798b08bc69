//! The persisted bin registry (docs/orthogonal-merge.md, Method, part 1, open choices):
//! which concept owns which bin of every layer's shared basis, and what the
//! basis is made from, so that trainers who never talk to each other build
//! orthogonal adapters.
//!
//! ```text
//! registry = { basis, seed, rank r, frozen_side, dims: layer -> n, concepts: concept -> bin }
//! concept i uses B_i = Q_layer[:, b_i·r : (b_i+1)·r] on every layer
//! capacity = min over layers of ⌊n/r⌋;   N·r > n is an error
//! ```
//!
//! The file is JSON, written atomically (temporary file, sync, rename). Claim
//! every concept's bin before launching the trainers, or claim under an
//! external lock: two processes editing one file at once can lose a claim
//! (a lost claim is caught at merge time, where two adapters with one bin
//! are an error).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tensor_core::module::ModuleExt;

use crate::basis::{BasisKind, BasisSpec, FrozenSide, capacity};
use crate::error::{Error, Result};
use crate::target::{base_linear, resolve_targets};

/// The `format` value of registry files this crate writes and reads.
pub const REGISTRY_FORMAT: &str = "modular-orthogonal-registry/1";

/// Concept → bin, with the shared basis specification and layer sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    pub format: String,
    #[serde(flatten)]
    pub spec: BasisSpec,
    /// Layer path → size `n` of its frozen side.
    pub dims: BTreeMap<String, i64>,
    /// Concept → bin.
    pub concepts: BTreeMap<String, i64>,
}

/// A concept name must work inside parameter names (`lora_A.<name>.weight`).
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('.') || name.contains(char::is_whitespace) {
        return Err(Error::config(format!(
            "name '{name}' must be non-empty and contain no '.' or whitespace"
        )));
    }
    Ok(())
}

impl Registry {
    /// An empty registry for bins of rank `rank`.
    pub fn new(kind: BasisKind, seed: u64, rank: i64, frozen_side: FrozenSide) -> Result<Self> {
        if rank <= 0 {
            return Err(Error::config(format!(
                "registry rank must be >= 1, got {rank}"
            )));
        }
        Ok(Self {
            format: REGISTRY_FORMAT.to_owned(),
            spec: BasisSpec {
                kind,
                seed,
                rank,
                frozen_side,
            },
            dims: BTreeMap::new(),
            concepts: BTreeMap::new(),
        })
    }

    /// An empty registry with the sizes of `model`'s layers matching `targets`.
    pub fn for_model<M: ModuleExt + ?Sized>(
        model: &M,
        targets: &[&str],
        kind: BasisKind,
        seed: u64,
        rank: i64,
        frozen_side: FrozenSide,
    ) -> Result<Self> {
        let mut r = Self::new(kind, seed, rank, frozen_side)?;
        r.record_dims(model, targets)?;
        Ok(r)
    }

    /// Record the frozen-side sizes of `model`'s layers matching `targets`.
    /// A layer already recorded with another size is a mismatch (another base model).
    pub fn record_dims<M: ModuleExt + ?Sized>(
        &mut self,
        model: &M,
        targets: &[&str],
    ) -> Result<()> {
        let pats: Vec<String> = targets.iter().map(|s| (*s).to_owned()).collect();
        let mut found = Vec::new();
        for p in resolve_targets(model, &pats)? {
            let lin = base_linear(model, &p)?;
            let n = self
                .spec
                .frozen_side
                .size(lin.out_features(), lin.in_features());
            found.push((p, n));
        }
        for (p, n) in &found {
            self.check_layer(p, *n)?;
        }
        let mut next = self.dims.clone();
        next.extend(found);
        let cap = next
            .values()
            .map(|&n| capacity(n, self.spec.rank))
            .min()
            .unwrap_or(i64::MAX);
        if let Some((c, &b)) = self.concepts.iter().find(|(_, b)| **b >= cap) {
            return Err(Error::mismatch(format!(
                "concept '{c}' holds bin {b}, but these layers hold only {cap} bins of rank {}",
                self.spec.rank
            )));
        }
        self.dims = next;
        Ok(())
    }

    /// Is `layer` with frozen size `n` consistent with what the registry recorded?
    pub fn check_layer(&self, layer: &str, n: i64) -> Result<()> {
        match self.dims.get(layer) {
            Some(&m) if m != n => Err(Error::mismatch(format!(
                "layer '{layer}' has frozen-side size {n} here but {m} in the registry (another base model?)"
            ))),
            _ => Ok(()),
        }
    }

    /// Check a layer an adapter is about to use: when the registry records
    /// layers, it must record this one, with the same size (a path that is
    /// not recorded usually means the registry was built on another model
    /// type, e.g. `encoder.…` vs `bert.encoder.…`, whose bases differ).
    pub fn check_adapted_layer(&self, layer: &str, n: i64) -> Result<()> {
        if !self.dims.is_empty() && !self.dims.contains_key(layer) {
            let some: Vec<&str> = self.dims.keys().take(3).map(String::as_str).collect();
            return Err(Error::mismatch(format!(
                "layer '{layer}' is not in the registry (it records {} layers such as {}); build the registry on the model you train",
                self.dims.len(),
                some.join(", ")
            )));
        }
        self.check_layer(layer, n)
    }

    /// The most bins every recorded layer holds, with the limiting layer and its `n`
    /// (`None` before any layer is recorded).
    pub fn capacity(&self) -> Option<(i64, String, i64)> {
        self.dims
            .iter()
            .map(|(l, &n)| (capacity(n, self.spec.rank), l.clone(), n))
            .min_by_key(|(c, _, _)| *c)
    }

    fn check_fits(&self, concept: &str, bin: i64) -> Result<()> {
        if let Some((cap, layer, n)) = self.capacity()
            && bin >= cap
        {
            return Err(Error::RegistryFull {
                concept: concept.to_owned(),
                bin,
                layer,
                n,
                rank: self.spec.rank,
                capacity: cap,
            });
        }
        Ok(())
    }

    /// Give `concept` the lowest free bin; returns it.
    pub fn claim(&mut self, concept: &str) -> Result<i64> {
        check_name(concept)?;
        if let Some(&bin) = self.concepts.get(concept) {
            return Err(Error::DuplicateConcept {
                concept: concept.to_owned(),
                bin,
            });
        }
        let mut bin = 0;
        while self.concepts.values().any(|&b| b == bin) {
            bin += 1;
        }
        self.check_fits(concept, bin)?;
        self.concepts.insert(concept.to_owned(), bin);
        Ok(bin)
    }

    /// Give `concept` exactly `bin`.
    pub fn assign(&mut self, concept: &str, bin: i64) -> Result<()> {
        check_name(concept)?;
        if bin < 0 {
            return Err(Error::config(format!("bin must be >= 0, got {bin}")));
        }
        if let Some(&b) = self.concepts.get(concept) {
            return Err(Error::DuplicateConcept {
                concept: concept.to_owned(),
                bin: b,
            });
        }
        if let Some((holder, _)) = self.concepts.iter().find(|(_, b)| **b == bin) {
            return Err(Error::BinTaken {
                bin,
                holder: holder.clone(),
                concept: concept.to_owned(),
            });
        }
        self.check_fits(concept, bin)?;
        self.concepts.insert(concept.to_owned(), bin);
        Ok(())
    }

    /// The bin of `concept`.
    pub fn bin(&self, concept: &str) -> Result<i64> {
        self.concepts
            .get(concept)
            .copied()
            .ok_or_else(|| Error::UnknownConcept {
                name: concept.to_owned(),
                available: self.concepts.keys().cloned().collect(),
            })
    }

    /// The bin of `concept`, claiming the lowest free one if it has none.
    pub fn bin_or_claim(&mut self, concept: &str) -> Result<i64> {
        match self.concepts.get(concept) {
            Some(&b) => Ok(b),
            None => self.claim(concept),
        }
    }

    /// Free `concept`'s bin; returns it.
    pub fn release(&mut self, concept: &str) -> Result<i64> {
        let b = self.bin(concept)?;
        self.concepts.remove(concept);
        Ok(b)
    }

    /// Concepts in bin order.
    pub fn concepts_by_bin(&self) -> Vec<(String, i64)> {
        let mut v: Vec<(String, i64)> =
            self.concepts.iter().map(|(c, b)| (c.clone(), *b)).collect();
        v.sort_by_key(|(_, b)| *b);
        v
    }

    /// Read a registry file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e.to_string()))?;
        let r: Registry = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a registry file: {e}")))?;
        if r.format != REGISTRY_FORMAT {
            return Err(Error::file(
                path,
                format!("format '{}' is not '{REGISTRY_FORMAT}'", r.format),
            ));
        }
        if r.spec.rank <= 0 {
            return Err(Error::file(
                path,
                format!("rank {} must be >= 1", r.spec.rank),
            ));
        }
        let mut seen: BTreeMap<i64, &str> = BTreeMap::new();
        for (c, &b) in &r.concepts {
            if let Some(h) = seen.insert(b, c) {
                return Err(Error::file(
                    path,
                    format!("concepts '{h}' and '{c}' both hold bin {b}"),
                ));
            }
        }
        Ok(r)
    }

    /// Write the registry atomically (the old file, or none, survives a failure).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::file(path, e.to_string()))?;
        write_text(path, &text)
    }

    /// Load `path`, apply `f`, save; the file is left unchanged if `f` fails.
    pub fn update<T>(
        path: impl AsRef<Path>,
        f: impl FnOnce(&mut Registry) -> Result<T>,
    ) -> Result<T> {
        let path = path.as_ref();
        let mut r = Self::load(path)?;
        let out = f(&mut r)?;
        r.save(path)?;
        Ok(out)
    }
}

/// Write `text` to `path` atomically.
pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e.to_string()))?;
    }
    tensor_core::io::write_atomic(path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    Ok(())
}
