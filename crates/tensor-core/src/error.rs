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
    /// libtorch refused an operation. Shown as libtorch's message without
    /// the C++ stack it appends (see [`torch_message`]).
    #[error("{op}: {}", torch_message(.source))]
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
    /// A file or folder that cannot be written, or whose content does not
    /// fit what it is loaded into (a checkpoint for another model).
    #[error("{path}: {reason}")]
    Path { path: PathBuf, reason: String },
    /// Invalid arguments or state (an empty batch, a step past the schedule).
    #[error("{0}")]
    Invalid(String),
    /// Adding an adapter under a name already in use.
    #[error("adapter '{0}' already exists; delete it first or choose another name")]
    DuplicateAdapter(String),
    /// An adapter name that the model does not hold.
    #[error("adapter '{name}' not found (adapters: {})", if available.is_empty() { "none".to_owned() } else { available.join(", ") })]
    UnknownAdapter {
        name: String,
        available: Vec<String>,
    },
    /// Target patterns that match no module of the right type.
    #[error("target modules {patterns:?} match no {kind} in the model (some {kind} paths: {})", examples.join(", "))]
    NoTarget {
        patterns: Vec<String>,
        kind: &'static str,
        examples: Vec<String>,
    },
    /// An adapter lifecycle step that the current state does not allow
    /// (disabling merged adapters, a mixed batch while merged).
    #[error("{0}")]
    AdapterState(String),
    /// A merge that would put NaN or Inf into the base weights (safe merge).
    #[error(
        "safe merge of adapter '{adapter}' into {path}: the merged weight contains NaN or Inf; the base is left unchanged"
    )]
    NonFiniteMerge { adapter: String, path: String },
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

    pub fn path(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Path {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::Invalid(reason.into())
    }

    pub fn duplicate_adapter(name: impl Into<String>) -> Self {
        Self::DuplicateAdapter(name.into())
    }

    pub fn unknown_adapter(name: impl Into<String>, available: Vec<String>) -> Self {
        Self::UnknownAdapter {
            name: name.into(),
            available,
        }
    }

    pub fn adapter_state(reason: impl Into<String>) -> Self {
        Self::AdapterState(reason.into())
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

/// The environment variable that brings back libtorch's full error text
/// (its C++ stack frames included) when set to anything but `0` or empty.
pub const TORCH_BACKTRACE_VAR: &str = "MODULAR_TORCH_BACKTRACE";

/// What a user should read of a libtorch error: its message, without the
/// `Exception raised from ...` line and the `frame #N: ...` lines libtorch
/// appends, and without tch's `Internal torch error: ` prefix. With
/// [`TORCH_BACKTRACE_VAR`] set, the full text.
pub fn torch_message(e: &TchError) -> String {
    let full = match e {
        TchError::Torch(s) => s.clone(),
        other => other.to_string(),
    };
    let wanted = std::env::var(TORCH_BACKTRACE_VAR).is_ok_and(|v| !v.is_empty() && v != "0");
    if wanted {
        return full;
    }
    trim_torch_text(&full)
}

/// [`torch_message`]'s trimming, on any text that may carry libtorch's C++
/// stack (a panic message from a tch call, say).
pub fn trim_torch_text(full: &str) -> String {
    let mut kept = Vec::new();
    for line in full.lines() {
        let l = line.trim_start();
        if l.starts_with("Exception raised from") || l.starts_with("frame #") {
            break;
        }
        kept.push(line.trim_end());
    }
    while kept.last().is_some_and(|l| l.is_empty()) {
        kept.pop();
    }
    let text = kept.join("\n");
    if text.is_empty() {
        // Nothing before the stack: keep its first line rather than nothing.
        full.lines().next().unwrap_or_default().trim().to_owned()
    } else {
        text
    }
}

/// Reject NaN/Inf in `t`, naming `what` (one host sync).
pub fn check_finite(op: &str, what: &str, t: &tch::Tensor) -> Result<()> {
    let all = t.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
    if all {
        Ok(())
    } else {
        Err(Error::NonFinite {
            op: op.to_owned(),
            what: what.to_owned(),
        })
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

#[cfg(test)]
mod torch_text_tests {
    use super::*;

    const RAW: &str = "The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1
Exception raised from infer_size_impl at /pytorch/aten/src/ATen/ExpandUtils.cpp:31 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f in libc10.so)
frame #1: at::infer_size_dimvector(c10::ArrayRef<long>, c10::ArrayRef<long>) + 0x3c1 (0x7f in libtorch_cpu.so)
";

    #[test]
    fn the_stack_is_cut_and_the_message_kept() {
        assert_eq!(
            trim_torch_text(RAW),
            "The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1"
        );
        // Several message lines survive; a text that is all stack keeps its first line.
        assert_eq!(trim_torch_text("a\nb\n\nframe #0: x"), "a\nb");
        assert_eq!(trim_torch_text("frame #0: x\nframe #1: y"), "frame #0: x");
        // Through the error type: the user's line names the operation, no frame.
        let e = Error::Torch {
            op: "Linear".into(),
            source: TchError::Torch(RAW.into()),
        };
        let shown = e.to_string();
        assert!(
            shown.starts_with("Linear: The size of tensor a (3)"),
            "{shown}"
        );
        assert!(
            !shown.contains("frame #") && !shown.contains("Exception raised"),
            "{shown}"
        );
    }

    #[test]
    fn a_real_libtorch_error_reaches_the_user_without_frames() {
        let a = tch::Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::zeros([4, 5], (Kind::Float, tch::Device::Cpu));
        let e: Error = a.f_matmul(&b).op("matmul").unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with("matmul: "), "{shown}");
        assert!(!shown.contains("frame #"), "{shown}");
        assert!(!shown.contains("Exception raised from"), "{shown}");
        assert!(shown.lines().count() <= 2, "{shown}");
    }
}
