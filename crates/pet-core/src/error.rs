//! Errors of parameter-efficient tuning (LoRA, DoRA, IA3, bottleneck
//! adapters, VL-PET; `docs/pet-core.md`, Method).
//!
//! No equation here: this file names what can go wrong before the modules'
//! equations run: a rank of 0, a pattern that targets nothing, an adapter
//! name that does not exist or exists twice, a merge that would write NaN/Inf
//! into the base, a lifecycle step in the wrong state (mixed batch while
//! merged), and files that do not hold what they claim. Each is an
//! [`Error`] naming the culprit, never a panic; libtorch and module-tree
//! failures arrive wrapped as [`Error::Tensor`], as do the errors every
//! adapter crate shares through tensor-core's host (a duplicate or unknown
//! adapter name, targets that match nothing, an unsafe merge).

use std::path::PathBuf;

use tensor_core::tch::TchError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or module-tree operation failed (shapes, dtypes, unknown paths).
    #[error(transparent)]
    Tensor(tensor_core::Error),
    /// An invalid configuration (rank 0, negative dropout, unknown option).
    #[error("invalid adapter config: {0}")]
    Config(String),
    /// A lifecycle step that the current state does not allow.
    #[error("{0}")]
    State(String),
    /// A PEFT file that is malformed or does not fit the model.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn state(msg: impl Into<String>) -> Self {
        Error::State(msg.into())
    }

    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// The adapted-linear host's refused lifecycle steps are this crate's
/// [`Error::State`]; every other error of tensor-core (duplicate or unknown
/// adapters, targets that match nothing, unsafe merges, bad files) is
/// wrapped as it is.
impl From<tensor_core::Error> for Error {
    fn from(e: tensor_core::Error) -> Self {
        match e {
            tensor_core::Error::AdapterState(s) => Error::State(s),
            other => Error::Tensor(other),
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
            Error::State(s) => tensor_core::Error::AdapterState(s),
            other => tensor_core::Error::config(other.to_string()),
        }
    }
}
