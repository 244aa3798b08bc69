//! Checkpoints: a module's named parameters in one safetensors file (the
//! Hugging Face `model.safetensors` layout: full dotted names, stored dtype
//! kept), with a string-to-string `__metadata__` map (epoch, step, metrics...).
//!
//! Writing goes through `crate::io::save`, which is atomic (temporary
//! file, sync, rename). Reading opens the file with
//! `crate::io::SafetensorsFile` and first compares it with the module:
//! names the module has but the file lacks (missing), names the file has but
//! the module lacks (unexpected), and shape mismatches. Shape or dtype-family
//! mismatches are always errors; missing or unexpected names are errors when
//! `strict`. Only then are values copied in with `ModuleExt::load_named`, so a
//! failed load leaves the module untouched.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::ModuleExt;
use crate::io::{SafetensorsFile, save};
use crate::tch::Tensor;

use crate::error::{Error, Result};

/// Save every parameter of `module` under its full name.
pub fn save_checkpoint<M: ModuleExt + ?Sized>(
    path: impl AsRef<Path>,
    module: &M,
    metadata: HashMap<String, String>,
) -> Result<()> {
    save_tensors(path, &module.named_parameters(), metadata)
}

/// Save named tensors (e.g. only the trainable ones) with metadata.
pub fn save_tensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    if tensors.is_empty() {
        return Err(Error::path(path, "save_checkpoint: no tensors to save"));
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::path(dir, format!("cannot create the folder: {e}")))?;
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save(path, &refs, Some(metadata))?;
    Ok(())
}

/// The metadata map of a checkpoint (empty when it has none).
pub fn read_metadata(path: impl AsRef<Path>) -> Result<HashMap<String, String>> {
    Ok(SafetensorsFile::open(path)?
        .metadata()
        .cloned()
        .unwrap_or_default())
}

/// What [`load_checkpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Parameters given values.
    pub loaded: usize,
    /// Module parameters the file does not hold (kept as they were).
    pub missing: Vec<String>,
    /// Tensors in the file that the module does not have (ignored).
    pub unexpected: Vec<String>,
    pub metadata: HashMap<String, String>,
}

fn listing(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{}, ... ({more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Load a checkpoint written by [`save_checkpoint`] (or any safetensors file
/// with the module's names) into `module`, casting to each parameter's dtype
/// and device. See the module docs for what is an error.
pub fn load_checkpoint<M: ModuleExt + ?Sized>(
    path: impl AsRef<Path>,
    module: &mut M,
    strict: bool,
) -> Result<LoadReport> {
    let path = path.as_ref();
    let file = SafetensorsFile::open(path)?;
    let params = module.named_parameters();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    let mut values = Vec::new();
    let mut known = HashSet::new();
    for (name, p) in &params {
        known.insert(name.as_str());
        if !file.contains(name) {
            missing.push(name.clone());
            continue;
        }
        let (kind, shape) = file.info(name)?;
        if shape != p.size() {
            mismatched.push(format!("{name}: file {shape:?}, module {:?}", p.size()));
            continue;
        }
        let float = crate::device::is_float;
        if float(kind) != float(p.kind()) {
            mismatched.push(format!(
                "{name}: file dtype {kind:?}, module {:?}",
                p.kind()
            ));
            continue;
        }
        let value = if float(kind) {
            file.load_weight(name, p.device())?
        } else {
            file.load(name, p.device())?
        };
        values.push((name.clone(), value));
    }
    let unexpected: Vec<String> = file
        .names()
        .into_iter()
        .filter(|n| !known.contains(n.as_str()))
        .collect();
    let mut problems = Vec::new();
    if !mismatched.is_empty() {
        problems.push(format!(
            "{} mis-shaped ({})",
            mismatched.len(),
            listing(&mismatched)
        ));
    }
    if strict && !missing.is_empty() {
        problems.push(format!("{} missing ({})", missing.len(), listing(&missing)));
    }
    if strict && !unexpected.is_empty() {
        problems.push(format!(
            "{} unexpected ({})",
            unexpected.len(),
            listing(&unexpected)
        ));
    }
    if !problems.is_empty() {
        return Err(Error::path(
            path,
            format!(
                "checkpoint does not fit the module: {}",
                problems.join("; ")
            ),
        ));
    }
    module.load_named(&values, false)?;
    Ok(LoadReport {
        loaded: values.len(),
        missing,
        unexpected,
        metadata: file.metadata().cloned().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use crate::module::Sequential;
    use crate::tch::{Device, Kind};
    use crate::testing::{device, with_seed};

    /// On the test device: checkpoints are written from it and read onto it.
    fn mlp(seed: u64, hidden: i64) -> Sequential {
        with_seed(seed, || {
            Sequential::new()
                .push(Linear::new(4, hidden, true, device()).unwrap())
                .push(Linear::new(hidden, 2, true, device()).unwrap())
        })
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/ckpt.safetensors");
        let a = mlp(1, 8);
        let meta = HashMap::from([("epoch".to_owned(), "3".to_owned())]);
        save_checkpoint(&path, &a, meta.clone()).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);

        let mut b = mlp(2, 8);
        let differs = a.named_parameters()[0]
            .1
            .ne_tensor(&b.named_parameters()[0].1)
            .any();
        assert!(bool::try_from(differs).unwrap());
        let report = load_checkpoint(&path, &mut b, true).unwrap();
        assert_eq!(report.loaded, 4);
        assert!(report.missing.is_empty() && report.unexpected.is_empty());
        assert_eq!(report.metadata, meta);
        for ((na, ta), (nb, tb)) in a.named_parameters().iter().zip(b.named_parameters()) {
            assert_eq!(na, &nb);
            assert_eq!(tb.device(), device(), "{nb} stays on the device");
            crate::testing::assert_close(&tb, ta, 0.0, 0.0);
            assert!(tb.requires_grad(), "{nb} stays trainable");
        }
        // Through a trait object too.
        let mut c: Box<dyn crate::Module> = Box::new(mlp(3, 8));
        load_checkpoint(&path, c.as_mut(), true).unwrap();
    }

    #[test]
    fn mismatches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        save_checkpoint(&path, &mlp(1, 8), HashMap::new()).unwrap();

        // Shapes differ: always an error, and the module is left untouched.
        let mut wide = mlp(2, 16);
        let before = wide.named_parameters()[1].1.copy();
        let e = load_checkpoint(&path, &mut wide, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mis-shaped"), "{e}");
        assert!(e.contains("0.weight: file [8, 4], module [16, 4]"), "{e}");
        crate::testing::assert_close(&wide.named_parameters()[1].1, &before, 0.0, 0.0);

        // An extra layer in the module: missing names.
        let mut deeper = mlp(2, 8).push(Linear::new(2, 2, false, device()).unwrap());
        let e = load_checkpoint(&path, &mut deeper, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 missing (2.weight)"), "{e}");
        let r = load_checkpoint(&path, &mut deeper, false).unwrap();
        assert_eq!(
            (r.loaded, r.missing.clone()),
            (4, vec!["2.weight".to_owned()])
        );

        // A module with fewer parameters: unexpected names.
        let mut shallow = with_seed(4, || {
            Sequential::new().push(Linear::new(4, 8, true, device()).unwrap())
        });
        let e = load_checkpoint(&path, &mut shallow, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 unexpected (1.bias, 1.weight)"), "{e}");
        let r = load_checkpoint(&path, &mut shallow, false).unwrap();
        assert_eq!(r.unexpected.len(), 2);

        // Integer tensors cannot fill float parameters (a file made on the host).
        let ints = dir.path().join("ints.safetensors");
        let t = Tensor::zeros([8, 4], (Kind::Int64, Device::Cpu));
        save_tensors(&ints, &[("0.weight".to_owned(), t)], HashMap::new()).unwrap();
        let e = load_checkpoint(&ints, &mut mlp(1, 8), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file dtype Int64"), "{e}");

        assert!(save_tensors(dir.path().join("x.safetensors"), &[], HashMap::new()).is_err());
        let e = load_checkpoint(dir.path().join("absent.safetensors"), &mut mlp(1, 8), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }
}
