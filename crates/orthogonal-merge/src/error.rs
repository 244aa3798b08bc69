//! Errors of orthogonal adaptation and merging (`docs/orthogonal-merge.md`, Method).
//!
//! No equation here: this file names what can go wrong before the equations
//! of [`crate::basis`], [`mod@crate::merge`] and the operators run: a registry
//! that is full (`N·r > n`), a concept or bin claimed twice, adapters made
//! for different shapes, ranks, bases or base models, invalid densities,
//! and files that do not hold what they claim. Each is an [`Error`] naming
//! the culprit, never a panic; libtorch and module-tree failures arrive
//! wrapped as [`Error::Tensor`], as do the errors every adapter crate shares
//! through tensor-core's host (a duplicate or unknown adapter name, targets
//! that match nothing).

use std::path::PathBuf;

use tensor_core::tch::TchError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or module-tree operation failed (shapes, dtypes, unknown paths).
    #[error(transparent)]
    Tensor(#[from] tensor_core::Error),
    /// An invalid configuration (rank 0, density outside its range, unknown option).
    #[error("invalid config: {0}")]
    Config(String),
    /// No free bin is left for a new concept: `(bins + 1)·r > n` on some layer.
    #[error(
        "registry full: concept '{concept}' needs bin {bin}, but layer '{layer}' has n = {n} so it holds at most {capacity} bins of rank {rank} (N·r must be <= n)"
    )]
    RegistryFull {
        concept: String,
        bin: i64,
        layer: String,
        n: i64,
        rank: i64,
        capacity: i64,
    },
    /// A concept that the registry already holds.
    #[error(
        "concept '{concept}' is already registered (bin {bin}); use Registry::bin to look it up"
    )]
    DuplicateConcept { concept: String, bin: i64 },
    /// Two concepts claiming one bin (their bases would collide).
    #[error("bin {bin} is already held by concept '{holder}'; '{concept}' cannot claim it")]
    BinTaken {
        bin: i64,
        holder: String,
        concept: String,
    },
    /// A concept the registry does not hold.
    #[error("concept '{name}' is not registered (registered: {})", if available.is_empty() { "none".to_owned() } else { available.join(", ") })]
    UnknownConcept {
        name: String,
        available: Vec<String>,
    },
    /// Inputs that do not fit together: shapes, ranks, bases, base models, registries.
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// A registry or PEFT file that is malformed or does not fit.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn mismatch(msg: impl Into<String>) -> Self {
        Error::Mismatch(msg.into())
    }

    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl From<TchError> for Error {
    fn from(e: TchError) -> Self {
        Error::Tensor(tensor_core::Error::from(e))
    }
}

/// Inside a module's `forward` (which returns `tensor_core::Result`), our
/// errors travel as `tensor_core` errors with their message kept.
impl From<Error> for tensor_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Tensor(t) => t,
            other => tensor_core::Error::config(other.to_string()),
        }
    }
}
