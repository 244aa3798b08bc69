//! One error type for every tensor operation in the workspace.
//!
//! tch's own `TchError` says what libtorch said; `Error` adds what we were
//! doing (the operation, the module path or parameter name, the expected and
//! actual shapes) so that a failure deep inside a model names its place.

use std::path::PathBuf;

use tch::{Kind, TchError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch refused an operation.
    #[error("{op}: {source}")]
    Torch {
        op: String,
        #[source]
        source: TchError,
    },
    /// A tensor had the wrong shape.
    #[error("{op}: expected shape {expected}, got {actual:?}")]
    Shape {
        op: String,
        /// Human-readable expectation, e.g. `[*, 384]` or `[batch, seq]`.
        expected: String,
        actual: Vec<i64>,
    },
    /// A tensor had the wrong element type.
    #[error("{op}: expected dtype {expected}, got {actual:?}")]
    DType {
        op: String,
        expected: String,
        actual: Kind,
    },
    /// NaN or Inf where only finite values are allowed.
    #[error("{op}: {what} contains NaN or Inf")]
    NonFinite { op: String, what: String },
    /// A name (module path, parameter, tensor in a file, config key) that does not exist.
    #[error("{what} '{name}' not found{}", hint(.available))]
    UnknownName {
        what: String,
        name: String,
        /// A few of the names that do exist, to help spot a typo.
        available: Vec<String>,
    },
    /// An inconsistent or invalid configuration.
    #[error("invalid config: {0}")]
    Config(String),
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file that is truncated, corrupt, or does not hold what it claims.
    #[error("{path}: {tensor}: {reason}")]
    File {
        path: PathBuf,
        /// The tensor concerned, or `(header)` for the file as a whole.
        tensor: String,
        reason: String,
    },
    /// An operation on a module that does not support it (e.g. reading the
    /// weight of a `Linear` that has been wrapped).
    #[error("{path}: {reason}")]
    Module { path: String, reason: String },
}

fn hint(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        let shown: Vec<&str> = available.iter().take(8).map(String::as_str).collect();
        let more = available.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(", ... ({more} more)")
        } else {
            String::new()
        };
        format!(" (available: {}{more})", shown.join(", "))
    }
}

impl Error {
    pub fn shape(op: impl Into<String>, expected: impl Into<String>, actual: Vec<i64>) -> Self {
        Self::Shape {
            op: op.into(),
            expected: expected.into(),
            actual,
        }
    }

    pub fn unknown(
        what: impl Into<String>,
        name: impl Into<String>,
        available: Vec<String>,
    ) -> Self {
        Self::UnknownName {
            what: what.into(),
            name: name.into(),
            available,
        }
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }

    pub fn module(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Module {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Prefix the operation (or module path) this error happened in.
    pub fn within(self, outer: &str) -> Self {
        let join = |op: String| {
            if op.is_empty() {
                outer.to_owned()
            } else {
                format!("{outer}: {op}")
            }
        };
        match self {
            Error::Torch { op, source } => Error::Torch {
                op: join(op),
                source,
            },
            Error::Shape {
                op,
                expected,
                actual,
            } => Error::Shape {
                op: join(op),
                expected,
                actual,
            },
            Error::DType {
                op,
                expected,
                actual,
            } => Error::DType {
                op: join(op),
                expected,
                actual,
            },
            Error::NonFinite { op, what } => Error::NonFinite { op: join(op), what },
            Error::Module { path, reason } => Error::Module {
                path: join(path),
                reason,
            },
            other => other,
        }
    }
}

/// Attach the operation's name to tch results: `x.f_matmul(&w).op("Linear")?`.
pub trait TchResultExt<T> {
    fn op(self, op: &str) -> Result<T>;
}

impl<T> TchResultExt<T> for std::result::Result<T, TchError> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|source| Error::Torch {
            op: op.to_owned(),
            source,
        })
    }
}

/// Bare `?` on a tch result: the operation is unnamed, the message is libtorch's.
impl From<TchError> for Error {
    fn from(source: TchError) -> Self {
        Error::Torch {
            op: String::new(),
            source,
        }
    }
}

/// Add context to our own results.
pub trait ResultExt<T> {
    fn within(self, outer: &str) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn within(self, outer: &str) -> Result<T> {
        self.map_err(|e| e.within(outer))
    }
}
