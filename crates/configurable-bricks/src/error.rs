//! Errors of brick analysis and brick operations (Xiao et al. 2024,
//! "Configurable Foundation Models", arXiv 2409.02877).
//!
//! No equation here: this file names what can be wrong before any of the
//! method's equations run (an AP with no positive example, a top fraction
//! outside `(0, 1]`, a rank-one edit whose key is orthogonal to `C⁻¹k*`, a
//! profile file that does not hold what it claims). Every such case is an
//! [`Error`], never a panic; libtorch and module-tree failures arrive
//! wrapped as [`Error::Tensor`].

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or module-tree operation failed (shapes, dtypes, unknown paths, I/O).
    #[error(transparent)]
    Tensor(#[from] tensor_core::Error),
    /// An invalid or inconsistent configuration or argument.
    #[error("invalid configurable-bricks config: {0}")]
    Config(String),
    /// Inputs whose sizes disagree (scores vs labels, sets vs neurons, ...).
    #[error("{what}: expected {expected}, got {actual}")]
    Mismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// NaN or Inf where only finite values make sense.
    #[error("{what} contains NaN or Inf")]
    NonFinite { what: String },
    /// A path that does not hold the module the operation needs.
    #[error("{path}: holds a {found}, expected a {expected}")]
    WrongModule {
        path: String,
        found: String,
        expected: &'static str,
    },
    /// A profile file that is truncated, corrupt, or not a profile.
    #[error("profile file {file}: {reason}")]
    ProfileFile { file: String, reason: String },
    /// A name that does not exist (a functionality, a brick, a parameter).
    #[error("{what} '{name}' not found (known: {})", known.join(", "))]
    Unknown {
        what: String,
        name: String,
        known: Vec<String>,
    },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn mismatch(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        actual: impl std::fmt::Display,
    ) -> Self {
        Error::Mismatch {
            what: what.into(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}

impl From<tensor_core::tch::TchError> for Error {
    fn from(e: tensor_core::tch::TchError) -> Self {
        Error::Tensor(tensor_core::Error::Torch {
            op: String::new(),
            source: e,
        })
    }
}

/// Fail with [`Error::NonFinite`] unless every element of `t` is finite.
pub(crate) fn check_finite(what: &str, t: &tensor_core::tch::Tensor) -> Result<()> {
    let ok = t.f_isfinite()?.f_all()?.f_int64_value(&[])?;
    if ok == 1 {
        Ok(())
    } else {
        Err(Error::NonFinite { what: what.into() })
    }
}

pub(crate) fn check_finite_slice(what: &str, xs: &[f64]) -> Result<()> {
    if xs.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { what: what.into() })
    }
}
