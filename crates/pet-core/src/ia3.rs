//! IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better
//! and Cheaper than In-Context Learning", arXiv 2205.05638), as PEFT
//! (`tuners/ia3/layer.py`) computes it.
//!
//! A learned vector `l`, initialised to 1, rescales activations:
//! - attention keys and values (output side): `y = l ⊙ (x Wᵀ + b)`, `l ∈ R^{out}`;
//! - the FFN down-projection (input side): `y = (l ⊙ x) Wᵀ + b`, `l ∈ R^{in}`.
//!
//! Merging folds `l` into `W` (rows, and `b`, for the output side; columns
//! for the input side). PEFT stores `l` as `[out, 1]` or `[1, in]` under the
//! key `…<module>.ia3_l`.

use serde::{Deserialize, Serialize};
use tensor_core::adapt::{Folded, LinearDelta, MergeOrder};
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::target::param;

/// IA3's configuration (PEFT's field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Ia3Config {
    /// Linear layers to rescale (PEFT's suffix rule or globs).
    pub target_modules: Vec<String>,
    /// The subset of targets scaled on their input (the FFN down-projections).
    pub feedforward_modules: Vec<String>,
}

impl Ia3Config {
    pub fn validate(&self) -> Result<()> {
        if self.target_modules.is_empty() {
            return Err(Error::config(
                "IA3 target_modules is empty; name the Linear layers to rescale (e.g. [\"key\", \"value\", \"output.dense\"])",
            ));
        }
        Ok(())
    }
}

/// One IA3 vector on one `Linear`.
#[derive(Debug)]
pub struct Ia3 {
    /// `[out]` (output side) or `[in]` (input side), kept 1-D.
    pub l: Tensor,
    /// Scale the input (FFN) instead of the output.
    pub on_input: bool,
}

impl Ia3 {
    /// `l = 1` for a base weight `w: [out, in]`.
    pub fn init(w: &Tensor, on_input: bool) -> Result<Self> {
        let size = w.size();
        let n = if on_input { size[1] } else { size[0] };
        Ok(Self {
            l: param(Tensor::f_ones([n], (w.kind(), w.device()))?),
            on_input,
        })
    }

    /// From a PEFT tensor (`[out, 1]` or `[1, in]`), checked against `w`.
    pub fn from_peft(t: &Tensor, w: &Tensor, on_input: bool, what: &str) -> Result<Self> {
        let (ws, ts) = (w.size(), t.size());
        let want = if on_input {
            vec![1, ws[1]]
        } else {
            vec![ws[0], 1]
        };
        if ts != want {
            return Err(Error::config(format!(
                "{what}: IA3 vector of shape {ts:?} does not fit a base weight {ws:?} (need {want:?}, {} side)",
                if on_input { "input" } else { "output" }
            )));
        }
        Ok(Self {
            l: param(
                t.f_reshape([-1])?
                    .f_to_kind(w.kind())?
                    .f_to_device(w.device())?,
            ),
            on_input,
        })
    }

    /// The PEFT layout of `l`.
    pub fn to_peft(&self) -> Result<Tensor> {
        let l = self.l.f_detach()?;
        Ok(if self.on_input {
            l.f_unsqueeze(0)?
        } else {
            l.f_unsqueeze(1)?
        })
    }

    /// `l` cast to `kind` for multiplying activations.
    pub fn vector(&self, kind: Kind) -> Result<Tensor> {
        Ok(self.l.f_to_kind(kind)?)
    }
}

/// Output-side IA3 is the host's output-scale stage, input-side IA3 its
/// input-scale stage; both fold into `W` first ([`MergeOrder::Scale`]).
impl LinearDelta for Ia3 {
    fn kind(&self) -> &'static str {
        "IA3"
    }

    fn param_names(&self, name: &str) -> Vec<String> {
        vec![format!("ia3_l.{name}")]
    }

    fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.l]
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.l]
    }

    fn input_scale(&self) -> Option<&Tensor> {
        self.on_input.then_some(&self.l)
    }

    fn output_scale(&self) -> Option<&Tensor> {
        (!self.on_input).then_some(&self.l)
    }

    fn merge_order(&self) -> Option<MergeOrder> {
        Some(MergeOrder::Scale)
    }

    /// Columns of `W` (input side), or rows of `W` and `b` (output side).
    fn fold(&self, w: &Tensor, b: Option<&Tensor>) -> tensor_core::Result<Folded> {
        let l = self.l.f_to_kind(Kind::Float)?.f_detach()?;
        Ok(if self.on_input {
            Folded {
                weight: w.f_mul(&l.f_unsqueeze(0)?)?,
                bias: b.map(Tensor::shallow_clone),
                undo: None,
            }
        } else {
            Folded {
                weight: w.f_mul(&l.f_unsqueeze(1)?)?,
                bias: b.map(|b| b.f_mul(&l)).transpose()?,
                undo: None,
            }
        })
    }

    fn unfold(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        _undo: Option<&Tensor>,
    ) -> tensor_core::Result<(Tensor, Option<Tensor>)> {
        let l = self.l.f_to_kind(Kind::Float)?.f_detach()?;
        Ok(if self.on_input {
            (w.f_div(&l.f_unsqueeze(0)?)?, b.map(Tensor::shallow_clone))
        } else {
            (
                w.f_div(&l.f_unsqueeze(1)?)?,
                b.map(|b| b.f_div(&l)).transpose()?,
            )
        })
    }
}
