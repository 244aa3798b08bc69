//! model-zoo's error: tensor errors plus what can go wrong with files,
//! configs, tokenizers and datasets, each naming the file and the key or line.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tensor(#[from] tensor_core::Error),
    /// A file that is missing, unreadable or not what it should be.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A config value that is missing, malformed or inconsistent.
    #[error("{path}: '{key}': {reason}")]
    Config {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A tokenizer that cannot be loaded or does not fit the model.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// A malformed line in a dataset file (1-based line number).
    #[error("{path}:{line}: {reason}")]
    Data {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// No model folder could be found; says where it looked.
    #[error("no model found: {0}")]
    Source(String),
    /// Invalid arguments or state.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
    pub fn invalid(reason: impl Into<String>) -> Self {
        Error::Invalid(reason.into())
    }
}

impl From<tensor_core::tch::TchError> for Error {
    fn from(e: tensor_core::tch::TchError) -> Self {
        Error::Tensor(e.into())
    }
}
