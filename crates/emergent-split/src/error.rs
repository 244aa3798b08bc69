//! Errors of the expert split (EMoE, Qiu et al. 2023, "Unlocking Emergent
//! Modularity in LLMs"; MoEfication, Zhang et al. 2022).
//!
//! No equation here: this file names what can go wrong before any of the
//! algorithm's equations run. The split needs `N | d_ff` (experts of exactly
//! `m = d_ff / N` neurons), `1 <= k <= N` selected experts, finite weights and
//! paths that name `FeedForward`s. Every such violation is an [`Error`], never
//! a panic; libtorch and module-tree failures arrive wrapped as
//! [`Error::Tensor`].

use tensor_core::tch::TchError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation or module-tree operation failed (shapes, dtypes, unknown paths).
    #[error(transparent)]
    Tensor(#[from] tensor_core::Error),
    /// An invalid split or gate configuration (`N` not dividing `d_ff`, `k > N`, `k = 0`, ...).
    #[error("invalid expert-split config: {0}")]
    Config(String),
    /// NaN or Inf in weights or activations that the split reads.
    #[error("{what} contains NaN or Inf")]
    NonFinite { what: String },
    /// A path that does not hold the module the operation needs.
    #[error("{path}: holds a {found}, expected a {expected}")]
    WrongModule {
        path: String,
        found: String,
        expected: &'static str,
    },
    /// A cached-labels file that cannot be used (format, missing layer,
    /// wrong length, out-of-range or unbalanced labels).
    #[error("labels file {file}: {reason}")]
    Labels { file: String, reason: String },
    /// Layer indices that match no `FeedForward` of the model.
    #[error("no FeedForward for layer {layer} (FFN paths: {})", available.join(", "))]
    UnknownLayer {
        layer: usize,
        available: Vec<String>,
    },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}

impl From<TchError> for Error {
    fn from(e: TchError) -> Self {
        Error::Tensor(tensor_core::Error::from(e))
    }
}

/// Check the shape arithmetic shared by every split: `N >= 1`, `N | d_ff`;
/// returns `m = d_ff / N`.
pub fn check_split(d_ff: i64, num_experts: usize) -> Result<i64> {
    if num_experts == 0 {
        return Err(Error::config("the number of experts N must be at least 1"));
    }
    let n = num_experts as i64;
    if d_ff <= 0 || d_ff % n != 0 {
        return Err(Error::config(format!(
            "N = {num_experts} experts must divide d_ff = {d_ff} (EMoE needs experts of equal size d_ff / N)"
        )));
    }
    Ok(d_ff / n)
}

/// Check `1 <= k <= N`.
pub fn check_top_k(top_k: usize, num_experts: usize) -> Result<()> {
    if top_k == 0 || top_k > num_experts {
        return Err(Error::config(format!(
            "top-k = {top_k} must satisfy 1 <= k <= N = {num_experts}"
        )));
    }
    Ok(())
}

/// Reject NaN / Inf (one host sync).
pub fn check_finite(what: &str, t: &tensor_core::tch::Tensor) -> Result<()> {
    let ok = t.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
    if ok {
        Ok(())
    } else {
        Err(Error::NonFinite { what: what.into() })
    }
}
