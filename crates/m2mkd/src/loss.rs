//! Distillation losses (m2mKD §3.2, eq. 2; `deep_incubation/losses.py`,
//! `m2mKDLoss`, which is DeiT's `DistillationLoss`):
//!
//! `L = (1 − α)·CE(z_S, y) + α·L_KD`, with `q = softmax(z / τ)` and
//!
//! - soft, `kl_norm = sum_over_BC` (the repository's default):
//!   `L_KD = τ²·Σ_{b,c} q_T (log q_T − log q_S) / (B·C)`,
//! - soft, `kl_norm = batchmean`: the same sum divided by `B` only (Hinton's
//!   usual normalisation; `sum_over_BC = batchmean / C`),
//! - hard: `L_KD = CE(z_S, argmax_c z_T)`.
//!
//! CE takes class ids or probability rows (mixup / cutmix) and optional label
//! smoothing. Beyond the paper: hidden-state matching
//! `MSE(P h_S, h_T)` over the tokens of the mask, with a learned projection
//! `P` held by the hybrid network (TextBrewer / torchdistill style).
//!
//! Every loss is a [`DistilLoss`] in a [`LossRegistry`] under a name, and a
//! run combines named losses with weights ([`LossTerm`]); a user adds a loss
//! with [`LossRegistry::register`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tensor_core::tch::{Kind, Reduction, Tensor};

use crate::error::{Error, Result};

/// How the KL sum is normalised (spec open point `kl_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlNorm {
    /// Divide by `B·C` (DeiT / m2mKD repository).
    #[default]
    SumOverBc,
    /// Divide by `B` (`reduction="batchmean"`).
    BatchMean,
}

/// Soft (KL at temperature τ) or hard (CE on the teacher's argmax) distillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KdType {
    #[default]
    Soft,
    Hard,
}

/// The knobs of eq. 2. Defaults: `α = 0.5`, `τ = 1`, soft, `sum_over_BC`,
/// no label smoothing (the paper's 0.1 goes with its mixup recipe).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KdConfig {
    /// Weight of the KD term (`kd_weight`); CE gets `1 − α`. torchdistill uses the opposite convention.
    pub alpha: f64,
    pub tau: f64,
    pub kd_type: KdType,
    pub kl_norm: KlNorm,
    pub label_smoothing: f64,
}

impl Default for KdConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            tau: 1.0,
            kd_type: KdType::Soft,
            kl_norm: KlNorm::SumOverBc,
            label_smoothing: 0.0,
        }
    }
}

impl KdConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(Error::config(format!(
                "alpha (kd_weight) must be in [0, 1], got {}",
                self.alpha
            )));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(Error::config(format!(
                "tau must be positive, got {}",
                self.tau
            )));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::config(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            )));
        }
        Ok(())
    }
}

fn check_logits(what: &str, z: &Tensor) -> Result<()> {
    let s = z.size();
    if s.len() < 2 || s.contains(&0) {
        return Err(tensor_core::Error::shape(what, "[batch, classes] (non-empty)", s).into());
    }
    if !tensor_core::device::is_float(z.kind()) {
        return Err(tensor_core::Error::DType {
            op: what.into(),
            expected: "floating-point logits".into(),
            actual: z.kind(),
        }
        .into());
    }
    Ok(())
}

fn check_pair(zs: &Tensor, zt: &Tensor) -> Result<()> {
    check_logits("student logits", zs)?;
    check_logits("teacher logits", zt)?;
    if zs.size() != zt.size() {
        return Err(tensor_core::Error::shape(
            "teacher logits",
            format!("{:?}", zs.size()),
            zt.size(),
        )
        .into());
    }
    Ok(())
}

/// Soft KD term: `τ²·Σ q_T (log q_T − log q_S) / N`, `N = B·C` or `B`
/// (rows are every index but the last). The teacher side is detached.
pub fn kd_soft(zs: &Tensor, zt: &Tensor, tau: f64, norm: KlNorm) -> Result<Tensor> {
    check_pair(zs, zt)?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::config(format!("tau must be positive, got {tau}")));
    }
    let s = zs.size();
    let classes = *s.last().expect("checked: at least 2 dims");
    let rows: i64 = s[..s.len() - 1].iter().product();
    let log_qs = zs.f_div_scalar(tau)?.f_log_softmax(-1, Kind::Float)?;
    let log_qt = zt
        .f_detach()?
        .f_div_scalar(tau)?
        .f_log_softmax(-1, Kind::Float)?;
    let kl = log_qt
        .f_exp()?
        .f_mul(&log_qt.f_sub(&log_qs)?)?
        .f_sum(Kind::Float)?;
    let n = match norm {
        KlNorm::SumOverBc => (rows * classes) as f64,
        KlNorm::BatchMean => rows as f64,
    };
    Ok(kl.f_mul_scalar(tau * tau / n)?)
}

/// Hard KD term: `CE(z_S, argmax z_T)` (no smoothing, as DeiT).
pub fn kd_hard(zs: &Tensor, zt: &Tensor) -> Result<Tensor> {
    check_pair(zs, zt)?;
    let c = *zs.size().last().expect("checked");
    let y = zt.f_detach()?.f_argmax(-1, false)?.f_reshape([-1])?;
    Ok(zs.f_reshape([-1, c])?.f_cross_entropy_loss::<Tensor>(
        &y,
        None,
        Reduction::Mean,
        -100,
        0.0,
    )?)
}

/// `CE(z_S, y)`: `y` holds class ids `[B]` (int64) or probability rows
/// `[B, C]` (float, mixup / cutmix), with label smoothing `ε`.
pub fn cross_entropy(zs: &Tensor, targets: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    check_logits("student logits", zs)?;
    let s = zs.size();
    let (b, c) = (s[0], *s.last().expect("checked"));
    if s.len() != 2 {
        return Err(
            tensor_core::Error::shape("cross_entropy logits", "[batch, classes]", s).into(),
        );
    }
    let ts = targets.size();
    let ok = match targets.kind() {
        Kind::Int64 | Kind::Int => ts == [b],
        k if tensor_core::device::is_float(k) => ts == [b, c],
        _ => false,
    };
    if !ok {
        return Err(tensor_core::Error::shape(
            "targets",
            format!("[{b}] class ids (int64) or [{b}, {c}] probabilities"),
            ts,
        )
        .into());
    }
    let t = if targets.kind() == Kind::Int {
        targets.f_to_kind(Kind::Int64)?
    } else {
        targets.shallow_clone()
    };
    Ok(zs.f_cross_entropy_loss::<Tensor>(&t, None, Reduction::Mean, -100, label_smoothing)?)
}

/// The three parts of eq. 2.
#[derive(Debug)]
pub struct KdLoss {
    pub total: Tensor,
    pub ce: Tensor,
    pub kd: Tensor,
}

/// `L = (1 − α)·CE(z_S, y) + α·L_KD` (eq. 2).
pub fn m2mkd_loss(zs: &Tensor, zt: &Tensor, targets: &Tensor, cfg: &KdConfig) -> Result<KdLoss> {
    cfg.validate()?;
    let ce = cross_entropy(zs, targets, cfg.label_smoothing)?;
    let kd = match cfg.kd_type {
        KdType::Soft => kd_soft(zs, zt, cfg.tau, cfg.kl_norm)?,
        KdType::Hard => kd_hard(zs, zt)?,
    };
    let total = ce
        .f_mul_scalar(1.0 - cfg.alpha)?
        .f_add(&kd.f_mul_scalar(cfg.alpha)?)?;
    Ok(KdLoss { total, ce, kd })
}

/// Mean squared error of hidden states, over the tokens where `mask`
/// (`[B, T]`, 1 = token) is set when the states are `[B, T, d]`.
pub fn hidden_mse(hs: &Tensor, ht: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    if hs.size() != ht.size() {
        return Err(tensor_core::Error::shape(
            "projected student hidden states",
            format!("{:?} (the teacher's)", ht.size()),
            hs.size(),
        )
        .into());
    }
    let sq = hs.f_sub(&ht.f_detach()?)?.f_square()?;
    let s = hs.size();
    match mask {
        Some(m) if s.len() == 3 && m.size() == s[..2] => {
            let m = m.f_to_kind(Kind::Float)?;
            let per_token = sq.f_mean_dim(-1, false, Kind::Float)?;
            let count = m.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
            Ok(per_token.f_mul(&m)?.f_sum(Kind::Float)?.f_div(&count)?)
        }
        _ => Ok(sq.f_mean(Kind::Float)?),
    }
}

/// What one distillation step offers the losses.
#[derive(Debug)]
pub struct LossInputs<'a> {
    /// `z_S`, from the student module inside the frozen meta suffix.
    pub student_logits: &'a Tensor,
    /// `z_T`, no graph; absent when the step has no teacher (incubation, from scratch).
    pub teacher_logits: Option<&'a Tensor>,
    /// Class ids `[B]` or probability rows `[B, C]`.
    pub targets: &'a Tensor,
    /// The student module's output, projected to the teacher's width (not for the last module).
    pub student_hidden: Option<&'a Tensor>,
    /// The teacher module's output `T_i(h)`.
    pub teacher_hidden: Option<&'a Tensor>,
    /// `[B, T]` attention mask, when the inputs are token sequences.
    pub mask: Option<&'a Tensor>,
}

/// A distillation loss; register your own in a [`LossRegistry`].
pub trait DistilLoss: Send + Sync + fmt::Debug {
    fn compute(&self, inputs: &LossInputs<'_>) -> Result<Tensor>;
    /// Whether it reads `student_hidden` / `teacher_hidden` (the hybrid
    /// then builds the learned projection).
    fn uses_hidden(&self) -> bool {
        false
    }
}

fn need<'a>(loss: &str, t: Option<&'a Tensor>, what: &'static str) -> Result<&'a Tensor> {
    t.ok_or_else(|| Error::MissingInput {
        loss: loss.to_owned(),
        what,
    })
}

/// Eq. 2 with a fixed [`KdConfig`].
#[derive(Debug, Clone, Copy)]
pub struct M2mKdLoss(pub KdConfig);

impl DistilLoss for M2mKdLoss {
    fn compute(&self, x: &LossInputs<'_>) -> Result<Tensor> {
        let zt = need("m2mkd", x.teacher_logits, "teacher logits")?;
        Ok(m2mkd_loss(x.student_logits, zt, x.targets, &self.0)?.total)
    }
}

/// The soft KD term alone.
#[derive(Debug, Clone, Copy)]
pub struct SoftKd {
    pub tau: f64,
    pub norm: KlNorm,
}

impl DistilLoss for SoftKd {
    fn compute(&self, x: &LossInputs<'_>) -> Result<Tensor> {
        let zt = need("kd_soft", x.teacher_logits, "teacher logits")?;
        kd_soft(x.student_logits, zt, self.tau, self.norm)
    }
}

/// The hard KD term alone.
#[derive(Debug, Clone, Copy)]
pub struct HardKd;

impl DistilLoss for HardKd {
    fn compute(&self, x: &LossInputs<'_>) -> Result<Tensor> {
        let zt = need("kd_hard", x.teacher_logits, "teacher logits")?;
        kd_hard(x.student_logits, zt)
    }
}

/// Cross-entropy with the labels alone (training without a teacher).
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy {
    pub label_smoothing: f64,
}

impl DistilLoss for CrossEntropy {
    fn compute(&self, x: &LossInputs<'_>) -> Result<Tensor> {
        cross_entropy(x.student_logits, x.targets, self.label_smoothing)
    }
}

/// [`hidden_mse`] between the projected student output and the teacher
/// module's output; zero for the last module (its output is the logits).
#[derive(Debug, Clone, Copy)]
pub struct HiddenMse;

impl DistilLoss for HiddenMse {
    fn compute(&self, x: &LossInputs<'_>) -> Result<Tensor> {
        match (x.student_hidden, x.teacher_hidden) {
            (Some(s), Some(t)) => hidden_mse(s, t, x.mask),
            (None, None) => Ok(Tensor::f_zeros(
                [],
                (Kind::Float, x.student_logits.device()),
            )?),
            _ => Err(Error::MissingInput {
                loss: "hidden_mse".into(),
                what: "both the student's and the teacher's hidden states",
            }),
        }
    }
    fn uses_hidden(&self) -> bool {
        true
    }
}

/// One named loss with its weight in the total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossTerm {
    pub name: String,
    pub weight: f64,
}

impl LossTerm {
    pub fn new(name: impl Into<String>, weight: f64) -> Self {
        Self {
            name: name.into(),
            weight,
        }
    }
}

/// Losses by name. [`LossRegistry::with_builtins`] holds `m2mkd` (eq. 2),
/// `kd_soft`, `kd_hard`, `ce` and `hidden_mse`, configured from a [`KdConfig`].
#[derive(Debug, Clone, Default)]
pub struct LossRegistry {
    losses: BTreeMap<String, Arc<dyn DistilLoss>>,
}

impl LossRegistry {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn with_builtins(kd: &KdConfig) -> Self {
        let mut r = Self::empty();
        r.register("m2mkd", Arc::new(M2mKdLoss(*kd)));
        r.register(
            "kd_soft",
            Arc::new(SoftKd {
                tau: kd.tau,
                norm: kd.kl_norm,
            }),
        );
        r.register("kd_hard", Arc::new(HardKd));
        r.register(
            "ce",
            Arc::new(CrossEntropy {
                label_smoothing: kd.label_smoothing,
            }),
        );
        r.register("hidden_mse", Arc::new(HiddenMse));
        r
    }

    /// Add (or replace) a loss; returns the one it replaced.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        loss: Arc<dyn DistilLoss>,
    ) -> Option<Arc<dyn DistilLoss>> {
        self.losses.insert(name.into(), loss)
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn DistilLoss>> {
        self.losses
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownLoss {
                name: name.to_owned(),
                available: self.names(),
            })
    }

    pub fn names(&self) -> Vec<String> {
        self.losses.keys().cloned().collect()
    }

    /// Check every term names a registered loss with a finite, non-negative weight.
    pub fn check(&self, terms: &[LossTerm]) -> Result<()> {
        if terms.is_empty() {
            return Err(Error::config("at least one loss term is needed"));
        }
        for t in terms {
            self.get(&t.name)?;
            if !(t.weight.is_finite() && t.weight >= 0.0) {
                return Err(Error::config(format!(
                    "loss '{}' has weight {}; weights must be finite and >= 0",
                    t.name, t.weight
                )));
            }
        }
        Ok(())
    }

    /// Whether any of the terms reads hidden states.
    pub fn uses_hidden(&self, terms: &[LossTerm]) -> Result<bool> {
        let mut any = false;
        for t in terms {
            any |= t.weight > 0.0 && self.get(&t.name)?.uses_hidden();
        }
        Ok(any)
    }

    /// `Σ_k w_k L_k(inputs)`, with each weighted part under its name.
    pub fn combine(
        &self,
        terms: &[LossTerm],
        inputs: &LossInputs<'_>,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        self.check(terms)?;
        let mut total: Option<Tensor> = None;
        let mut parts = Vec::with_capacity(terms.len());
        for t in terms {
            let l = self.get(&t.name)?.compute(inputs)?.f_mul_scalar(t.weight)?;
            total = Some(match total {
                None => l.shallow_clone(),
                Some(acc) => acc.f_add(&l)?,
            });
            parts.push((t.name.clone(), l));
        }
        Ok((total.expect("checked: at least one term"), parts))
    }
}
