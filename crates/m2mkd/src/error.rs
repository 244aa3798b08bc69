//! Errors of m2mKD (Lo et al. 2024, "m2mKD: Module-to-Module Knowledge
//! Distillation for Modular Transformers", arXiv 2402.16918).
//!
//! No equation here: this file names what can be wrong before the
//! algorithm runs. The paper's repository accepts configs that break its own
//! rules (a 9-entry split summing to 29 blocks; a stitch width of 1024
//! against a ViT-H width of 1280); here both are errors, as are shape,
//! dtype and NaN problems in the losses. libtorch and module-tree failures
//! arrive wrapped as [`Error::Tensor`].

use tensor_core::tch::TchError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation or module-tree operation failed.
    #[error(transparent)]
    Tensor(#[from] tensor_core::Error),
    /// Stage boundaries (`divided_depths`) that do not partition the teacher.
    #[error("invalid module boundaries {depths:?} for a teacher of {blocks} blocks: {reason}")]
    Boundaries {
        depths: Vec<usize>,
        blocks: usize,
        reason: String,
    },
    /// A student module whose width differs from the meta model's, with no
    /// stitches to bridge them (or a teacher module that does not fit the meta model).
    #[error(
        "module {module}: {side} width {width} differs from the meta model's width {meta}; {hint}"
    )]
    WidthMismatch {
        module: usize,
        side: &'static str,
        width: i64,
        meta: i64,
        hint: &'static str,
    },
    /// An inconsistent configuration (alpha outside [0, 1], tau <= 0, zero steps, ...).
    #[error("invalid m2mKD config: {0}")]
    Config(String),
    /// A loss name that is not in the registry.
    #[error("unknown loss '{name}' (registered: {})", available.join(", "))]
    UnknownLoss {
        name: String,
        available: Vec<String>,
    },
    /// A loss that needs an input the step did not provide (teacher logits, hidden states).
    #[error("loss '{loss}' needs {what}")]
    MissingInput { loss: String, what: &'static str },
    /// NaN or Inf in a loss or logits.
    #[error("{what} contains NaN or Inf")]
    NonFinite { what: String },
    /// Distilled modules that do not make up a whole student.
    #[error("cannot assemble the student: {0}")]
    Assembly(String),
    /// A distillation job (thread) that panicked or failed.
    #[error("distilling module {module}: {source}")]
    Job {
        module: usize,
        #[source]
        source: Box<Error>,
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

/// Reject NaN / Inf (one host sync).
pub fn check_finite(what: &str, t: &tensor_core::tch::Tensor) -> Result<()> {
    if t.f_isfinite()?.f_all()?.int64_value(&[]) != 0 {
        Ok(())
    } else {
        Err(Error::NonFinite { what: what.into() })
    }
}
