//! What the merge operators consume: one task's change to each layer, as a
//! LoRA pair or as a full weight delta (a task vector, Ilharco et al.,
//! "Editing Models with Task Arithmetic", arXiv 2212.04089).
//!
//! ```text
//! LoRA:  ΔW = s · B A,   A ∈ R^{r×in},  B ∈ R^{out×r}   (PEFT's lora_A / lora_B)
//! full:  ΔW = θ_t − θ_0 ∈ R^{out×in}
//! ```
//!
//! Layers are keyed by the module path of the `Linear`
//! (`encoder.layer.0.attention.self.query`). Every operator computes in f32
//! (full deltas are cast on the way in).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{Kind, Tensor};

use crate::basis::BasisSpec;
use crate::error::{Error, Result};
use crate::target::{base_linear, resolve_targets};

/// `ΔW = scale · b · a`.
#[derive(Debug)]
pub struct LoraFactors {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
}

impl LoraFactors {
    /// Check the shapes (`a: [r, in]`, `b: [out, r]`) and keep the factors (detached).
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        let (sa, sb) = (a.size(), b.size());
        if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] || sa[0] == 0 {
            return Err(Error::mismatch(format!(
                "LoRA factors need A [r, in] and B [out, r] with the same r >= 1; got A {sa:?}, B {sb:?}"
            )));
        }
        if !scale.is_finite() {
            return Err(Error::config(format!(
                "LoRA scale must be finite, got {scale}"
            )));
        }
        Ok(Self {
            a: a.detach(),
            b: b.detach(),
            scale,
        })
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// `(out, in)`
    pub fn shape(&self) -> (i64, i64) {
        (self.b.size()[0], self.a.size()[1])
    }

    /// `s·B·A` in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.f_to_kind(Kind::Float)?;
        let b = self.b.f_to_kind(Kind::Float)?;
        Ok(b.f_mm(&a)?.f_mul_scalar(self.scale)?)
    }

    pub fn shallow_clone(&self) -> Self {
        Self {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            scale: self.scale,
        }
    }
}

/// One task's change to one layer.
#[derive(Debug)]
pub enum Delta {
    Lora(LoraFactors),
    Full(Tensor),
}

impl Delta {
    /// A full delta `[out, in]` (detached).
    pub fn full(t: &Tensor) -> Result<Self> {
        if t.dim() != 2 {
            return Err(Error::mismatch(format!(
                "a weight delta must be [out, in]; got {:?}",
                t.size()
            )));
        }
        Ok(Delta::Full(t.detach()))
    }

    /// `(out, in)`
    pub fn shape(&self) -> (i64, i64) {
        match self {
            Delta::Lora(l) => l.shape(),
            Delta::Full(t) => {
                let s = t.size();
                (s[0], s[1])
            }
        }
    }

    /// The rank of a LoRA pair; `None` for a full delta.
    pub fn rank(&self) -> Option<i64> {
        match self {
            Delta::Lora(l) => Some(l.rank()),
            Delta::Full(_) => None,
        }
    }

    /// `ΔW` in f32.
    pub fn weight(&self) -> Result<Tensor> {
        match self {
            Delta::Lora(l) => l.delta_weight(),
            Delta::Full(t) => Ok(t.f_to_kind(Kind::Float)?),
        }
    }

    pub fn shallow_clone(&self) -> Self {
        match self {
            Delta::Lora(l) => Delta::Lora(l.shallow_clone()),
            Delta::Full(t) => Delta::Full(t.shallow_clone()),
        }
    }
}

/// How an orthogonal adapter was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrthoInfo {
    #[serde(flatten)]
    pub spec: BasisSpec,
    pub bin: i64,
}

/// What a saved adapter records about its making (the `modular_orthogonal`
/// block of `adapter_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub concept: String,
    /// `None` for a plain LoRA adapter (both factors trained).
    pub orthogonal: Option<OrthoInfo>,
    /// `‖W0‖_F` of each adapted layer of the base model it was trained on.
    pub base_norms: BTreeMap<String, f64>,
}

/// One task (adapter or fine-tuned model) as changes to layers.
#[derive(Debug)]
pub struct TaskDelta {
    pub name: String,
    pub layers: BTreeMap<String, Delta>,
    pub meta: Option<AdapterMeta>,
}

impl TaskDelta {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            layers: BTreeMap::new(),
            meta: None,
        }
    }

    /// Add a layer's change (builder style).
    pub fn with(mut self, layer: &str, delta: Delta) -> Self {
        self.layers.insert(layer.to_owned(), delta);
        self
    }

    /// Full task vectors `W_tuned − W_base` of the `Linear` layers matching
    /// `targets`, from a fine-tuned model and its base.
    pub fn from_models<M: ModuleExt + ?Sized, N: ModuleExt + ?Sized>(
        name: &str,
        tuned: &M,
        base: &N,
        targets: &[&str],
    ) -> Result<Self> {
        let pats: Vec<String> = targets.iter().map(|s| (*s).to_owned()).collect();
        let mut t = Self::new(name);
        for p in resolve_targets(base, &pats)? {
            let w0 = &base_linear(base, &p)?.weight;
            let w1 = &base_linear(tuned, &p)
                .map_err(|e| Error::mismatch(format!("the fine-tuned model lacks '{p}': {e}")))?
                .weight;
            if w0.size() != w1.size() {
                return Err(Error::mismatch(format!(
                    "{p}: base weight {:?} but fine-tuned weight {:?}",
                    w0.size(),
                    w1.size()
                )));
            }
            let d = w1
                .f_to_kind(Kind::Float)?
                .f_sub(&w0.f_to_kind(Kind::Float)?.f_to_device(w1.device())?)?
                .f_detach()?;
            t.layers.insert(p, Delta::Full(d));
        }
        Ok(t)
    }

    pub fn shallow_clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            layers: self
                .layers
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
            meta: self.meta.clone(),
        }
    }
}
