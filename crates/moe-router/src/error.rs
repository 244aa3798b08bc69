//! Errors of the mixture-of-experts layers (Switch, arXiv 2101.03961;
//! ModuleFormer, arXiv 2306.04640; `docs/moe-router.md`, Method).
//!
//! No equation here: this file names what can be wrong before any of the
//! routing equations run: `1 <= k <= E`, a capacity factor `cf >= 0`, shapes
//! `[tokens, d]`, token ids for hash routing. Every violation is an
//! [`Error`], never a panic; libtorch and module-tree failures arrive wrapped
//! as [`Error::Tensor`].

use tensor_core::tch::TchError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or module-tree operation failed (shapes, dtypes, unknown paths).
    #[error(transparent)]
    Tensor(#[from] tensor_core::Error),
    /// An invalid router, MoE, MoA or stick-breaking configuration.
    #[error("invalid moe-router config: {0}")]
    Config(String),
    /// Something the operation needs is not there (e.g. token ids for hash routing).
    #[error("{op}: {what}")]
    Missing { op: String, what: String },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    /// A shape error (wrapped `tensor_core::Error::Shape`).
    pub fn shape(op: impl Into<String>, expected: impl Into<String>, actual: Vec<i64>) -> Self {
        Error::Tensor(tensor_core::Error::shape(op, expected, actual))
    }

    pub fn missing(op: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Missing {
            op: op.into(),
            what: what.into(),
        }
    }
}

impl From<TchError> for Error {
    fn from(e: TchError) -> Self {
        Error::Tensor(tensor_core::Error::from(e))
    }
}

/// Back into `tensor_core`'s error, for [`tensor_core::Module::forward`].
impl From<Error> for tensor_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Tensor(t) => t,
            Error::Config(msg) => tensor_core::Error::Config(msg),
            Error::Missing { op, what } => tensor_core::Error::module(op, what),
        }
    }
}

/// Check `1 <= k <= E`.
pub fn check_top_k(top_k: usize, num_experts: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::config("the number of experts E must be at least 1"));
    }
    if top_k == 0 || top_k > num_experts {
        return Err(Error::config(format!(
            "top-k = {top_k} must satisfy 1 <= k <= E = {num_experts}"
        )));
    }
    Ok(())
}

/// Check that `x` is `[rows, d]` (after flattening leading dimensions) and floating point.
pub(crate) fn check_rows(op: &str, x: &tensor_core::tch::Tensor, d: i64) -> Result<()> {
    let s = x.size();
    if s.is_empty() || s[s.len() - 1] != d {
        return Err(Error::shape(op, format!("[*, {d}]"), s));
    }
    if !tensor_core::device::is_float(x.kind()) {
        return Err(Error::Tensor(tensor_core::Error::DType {
            op: op.into(),
            expected: "a floating-point tensor".into(),
            actual: x.kind(),
        }));
    }
    Ok(())
}
