//! LoRA (Hu et al. 2021, arXiv 2106.09685), rsLoRA (Kalajdzievski 2023,
//! arXiv 2312.03732) and DoRA (Liu et al. 2024, arXiv 2402.09353), as PEFT
//! (`huggingface/peft`, `tuners/lora/layer.py`) computes them.
//!
//! For a frozen `Linear` `y = x Wᵀ + b` with `W ∈ R^{out×in}`:
//!
//! - **LoRA**: `y = x Wᵀ + b + s · Dropout(x) Aᵀ Bᵀ`, `A ∈ R^{r×in}`,
//!   `B ∈ R^{out×r}`, `ΔW = s·BA`; `s = α/r`, or `α/√r` for rsLoRA.
//!   PEFT's default initialisation: `A ~ U(±1/√in)` (Kaiming-uniform with
//!   `a = √5`), `B = 0`, so the model is unchanged at step 0.
//! - **DoRA**: `W' = m ⊙ (W + sBA) / ‖W + sBA‖_row` with the norm taken per
//!   output unit and `m` initialised to `‖W‖_row`. Computed additively, as
//!   PEFT does, so several adapters can be active:
//!   `Δy = (m/n − 1) ⊙ x Wᵀ + (m/n) ⊙ s · x Aᵀ Bᵀ`, `n = ‖W + sBA‖_row`,
//!   with `n` detached from the graph by default (the paper treats it as a
//!   constant in backward, `dora_detach_norm`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tensor_core::adapt::{DeltaInput, Folded, LinearDelta, LowRank, MergeOrder};
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::gate::{Gate, GateConfig};
use crate::target::{module_seed, normal, param, uniform};

/// How `s` follows from `α` and `r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraScaling {
    /// `s = α / r` (LoRA, PEFT's default).
    #[default]
    AlphaOverR,
    /// `s = α / √r` (rsLoRA).
    Rslora,
}

/// How `A` and `B` start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// PEFT's default: `A ~ U(±1/√in)`, `B = 0`.
    #[default]
    Kaiming,
    /// PEFT's `"gaussian"`: `A ~ N(0, 1/r²)`, `B = 0`.
    Gaussian,
    /// Both random (PEFT's `init_lora_weights=False`): `A ~ U(±1/√in)`,
    /// `B ~ U(±1/√r)`. The model changes at step 0; for tests and benchmarks.
    Random,
}

/// A LoRA (or DoRA) adapter's configuration. Defaults are PEFT's:
/// `r = 8`, `α = 8`, dropout 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub scaling: LoraScaling,
    /// Module paths to adapt: PEFT's suffix rule (`"query"` matches
    /// `encoder.layer.0.attention.self.query`) or globs.
    pub target_modules: Vec<String>,
    /// Per-module rank, by the same matching rule (the longest key wins).
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module `α`.
    pub alpha_pattern: BTreeMap<String, f64>,
    pub init: LoraInit,
    pub use_dora: bool,
    /// Treat `‖W + sBA‖` as a constant in backward (the DoRA paper's choice).
    pub dora_detach_norm: bool,
    /// GPT-2 `Conv1D` stores `W` as `[in, out]`. model-zoo converts such
    /// weights to `[out, in]` at load, so this only travels to and from PEFT
    /// files (where it must match the base model the file was made for).
    pub fan_in_fan_out: bool,
    /// VL-PET's granularity-controlled gate on LoRA's output ("LoRA + G"):
    /// `y = s_G · (xWᵀ + b + ΔH) ⊙ G`.
    pub gate: Option<GateConfig>,
    /// Seed of the initialisation (mixed with each module's path).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            scaling: LoraScaling::AlphaOverR,
            target_modules: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            init: LoraInit::Kaiming,
            use_dora: false,
            dora_detach_norm: true,
            fan_in_fan_out: false,
            gate: None,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// PEFT's defaults on the given targets.
    pub fn new(r: i64, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            alpha,
            target_modules: targets.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }

    /// Reject what PEFT would reject (or silently mis-handle).
    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            return Err(Error::config(format!(
                "LoRA rank r must be >= 1, got {}",
                self.r
            )));
        }
        if let Some((k, r)) = self.rank_pattern.iter().find(|(_, r)| **r <= 0) {
            return Err(Error::config(format!(
                "LoRA rank_pattern '{k}' gives rank {r}; ranks must be >= 1"
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() || self.alpha_pattern.values().any(|a| !a.is_finite()) {
            return Err(Error::config("LoRA alpha must be finite"));
        }
        if self.target_modules.is_empty() {
            return Err(Error::config(
                "LoRA target_modules is empty; name the Linear layers to adapt (e.g. [\"query\", \"value\"])",
            ));
        }
        if self.use_dora && self.gate.is_some() {
            return Err(Error::config(
                "a VL-PET gate on a DoRA adapter is not supported",
            ));
        }
        if let Some(g) = &self.gate {
            g.validate()?;
        }
        Ok(())
    }

    /// Rank and `α` for the module at `path` (patterns first, then the defaults).
    pub fn rank_alpha(&self, path: &str) -> (i64, f64) {
        tensor_core::adapt::rank_alpha(
            path,
            self.r,
            self.alpha,
            &self.rank_pattern,
            &self.alpha_pattern,
        )
    }

    /// `s` for rank `r` and `α`.
    pub fn scale(&self, r: i64, alpha: f64) -> f64 {
        match self.scaling {
            LoraScaling::AlphaOverR => alpha / r as f64,
            LoraScaling::Rslora => alpha / (r as f64).sqrt(),
        }
    }
}

/// One LoRA (or DoRA) adapter on one `Linear`.
#[derive(Debug)]
pub struct Lora {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// DoRA's magnitude `m`, `[out]`; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    pub detach_norm: bool,
    /// VL-PET's `G` on this adapter ("LoRA + G").
    pub gate: Option<Gate>,
}

impl Lora {
    /// A new adapter for a base weight `w: [out, in]` at `path`.
    pub fn init(cfg: &LoraConfig, path: &str, adapter: &str, w: &Tensor) -> Result<Self> {
        let size = w.size();
        let (out, inp) = (size[0], size[1]);
        let (r, alpha) = cfg.rank_alpha(path);
        if r <= 0 {
            return Err(Error::config(format!(
                "{path}: LoRA rank must be >= 1, got {r}"
            )));
        }
        let dev = w.device();
        let seed = module_seed(cfg.seed, &[path, adapter, "lora"]);
        let bound = 1.0 / (inp as f64).sqrt();
        let zeros_b = || Tensor::f_zeros([out, r], (Kind::Float, dev));
        let (a, b) = match cfg.init {
            LoraInit::Kaiming => (uniform(&[r, inp], bound, seed, dev)?, zeros_b()?),
            LoraInit::Gaussian => (normal(&[r, inp], 1.0 / r as f64, seed, dev)?, zeros_b()?),
            LoraInit::Random => (
                uniform(&[r, inp], bound, seed, dev)?,
                uniform(&[out, r], 1.0 / (r as f64).sqrt(), seed ^ 1, dev)?,
            ),
        };
        let magnitude = if cfg.use_dora {
            Some(param(row_norm(&w.f_to_kind(Kind::Float)?)?))
        } else {
            None
        };
        let kind = w.kind();
        Ok(Self {
            a: param(a.f_to_kind(kind)?),
            b: param(b.f_to_kind(kind)?),
            scale: cfg.scale(r, alpha),
            dropout: cfg.dropout,
            magnitude: magnitude.map(|m| m.to_kind(kind).detach().set_requires_grad(true)),
            detach_norm: cfg.dora_detach_norm,
            gate: None,
        })
    }

    /// An adapter from given factors (a file), checked against the base `w`.
    pub fn from_weights(a: Tensor, b: Tensor, scale: f64, w: &Tensor, what: &str) -> Result<Self> {
        let (ws, as_, bs) = (w.size(), a.size(), b.size());
        if as_.len() != 2 || bs.len() != 2 || as_[1] != ws[1] || bs[0] != ws[0] || as_[0] != bs[1] {
            return Err(Error::config(format!(
                "{what}: LoRA shapes A {as_:?}, B {bs:?} do not fit a base weight {ws:?} (need A [r, {}], B [{}, r])",
                ws[1], ws[0]
            )));
        }
        let lora = Self {
            a: param(a.f_to_kind(w.kind())?.f_to_device(w.device())?),
            b: param(b.f_to_kind(w.kind())?.f_to_device(w.device())?),
            scale,
            dropout: 0.0,
            magnitude: None,
            detach_norm: true,
            gate: None,
        };
        // Finite factors can still make an infinite change (a huge
        // lora_alpha, or factors at the edge of the dtype's range).
        let dw = lora.delta_weight()?;
        let bad = dw
            .f_isfinite()?
            .f_logical_not()?
            .f_any()?
            .f_int64_value(&[])?;
        if !scale.is_finite() || bad == 1 {
            return Err(Error::config(format!(
                "{what}: the adapter's change s·B·A is not finite (scale s = {scale:e}); \
                 check lora_alpha and the factors"
            )));
        }
        Ok(lora)
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// `s · Dropout(x) Aᵀ Bᵀ`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            x.f_dropout(self.dropout, true)?
        } else {
            x.shallow_clone()
        };
        Ok(x.f_linear::<&Tensor>(&self.a, None)?
            .f_linear::<&Tensor>(&self.b, None)?
            .f_mul_scalar(self.scale)?)
    }

    /// `ΔW = s · B A` in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let b = self.b.f_to_kind(Kind::Float)?;
        let a = self.a.f_to_kind(Kind::Float)?;
        Ok(b.f_matmul(&a)?.f_mul_scalar(self.scale)?)
    }

    /// DoRA's `m / ‖W + sBA‖_row`, `[out]` (f32 norm of the base weight `w`).
    pub fn dora_factor(&self, w: &Tensor) -> Result<Option<Tensor>> {
        let Some(m) = &self.magnitude else {
            return Ok(None);
        };
        let merged = w.f_to_kind(Kind::Float)?.f_add(&self.delta_weight()?)?;
        let mut n = row_norm(&merged)?;
        if self.detach_norm {
            n = n.f_detach()?;
        }
        Ok(Some(m.f_to_kind(Kind::Float)?.f_div(&n)?))
    }

    /// The output change given `base_nobias = x Wᵀ` (DoRA needs it):
    /// LoRA `s·x AᵀBᵀ`; DoRA `(f−1) ⊙ xWᵀ + f ⊙ s·x AᵀBᵀ` with `f = m/n`.
    pub fn output_delta(
        &self,
        x: &Tensor,
        base_nobias: Option<&Tensor>,
        w: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let lora = self.delta(x, train)?;
        match self.dora_factor(w)? {
            None => Ok(lora),
            Some(f) => {
                let f = f.f_to_kind(lora.kind())?;
                let base = base_nobias
                    .ok_or_else(|| Error::state("DoRA needs the base output without bias"))?;
                Ok(base.f_mul(&f.f_sub_scalar(1.0)?)?.f_add(&lora.f_mul(&f)?)?)
            }
        }
    }

    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }
}

/// The host sees plain LoRA as its low-rank view (the fused path, mixed
/// batches); DoRA and LoRA + G as additive changes that read the base output.
impl LinearDelta for Lora {
    fn kind(&self) -> &'static str {
        match (self.is_dora(), self.gate.is_some()) {
            (true, _) => "DoRA",
            (false, true) => "gated LoRA (LoRA + G)",
            (false, false) => "LoRA",
        }
    }

    fn param_names(&self, name: &str) -> Vec<String> {
        let mut v = vec![
            format!("lora_A.{name}.weight"),
            format!("lora_B.{name}.weight"),
        ];
        if self.magnitude.is_some() {
            v.push(format!("lora_magnitude_vector.{name}.weight"));
        }
        if let Some(g) = &self.gate {
            v.extend(g.param_names(name));
        }
        v
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.a, &self.b];
        v.extend(self.magnitude.as_ref());
        if let Some(g) = &self.gate {
            v.extend(g.params.iter().map(|(_, t)| t));
        }
        v
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.a, &mut self.b];
        v.extend(self.magnitude.as_mut());
        if let Some(g) = &mut self.gate {
            v.extend(g.params.iter_mut().map(|(_, t)| t));
        }
        v
    }

    fn low_rank(&self) -> Option<LowRank> {
        (!self.is_dora() && self.gate.is_none()).then(|| LowRank {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            scale: self.scale,
            dropout: self.dropout,
        })
    }

    fn needs_base_nobias(&self) -> bool {
        self.is_dora()
    }

    fn additive(&self, io: &DeltaInput<'_>) -> tensor_core::Result<Option<Tensor>> {
        let d = self.output_delta(io.x, io.base_nobias, &io.linear.weight, io.train)?;
        Ok(Some(Gate::change(self.gate.as_ref(), io, d)?))
    }

    fn merge_order(&self) -> Option<MergeOrder> {
        match (self.gate.is_some(), self.is_dora()) {
            (true, _) => None,
            (false, true) => Some(MergeOrder::Normalizing),
            (false, false) => Some(MergeOrder::Additive),
        }
    }

    /// `W + sBA`; DoRA then rescales each row by `m / ‖W + sBA‖` and
    /// records that factor for the unmerge.
    fn fold(&self, w: &Tensor, b: Option<&Tensor>) -> tensor_core::Result<Folded> {
        let sum = w.f_add(&self.delta_weight()?.f_detach()?)?;
        let bias = b.map(Tensor::shallow_clone);
        Ok(match &self.magnitude {
            None => Folded {
                weight: sum,
                bias,
                undo: None,
            },
            Some(m) => {
                let f = m
                    .f_to_kind(Kind::Float)?
                    .f_detach()?
                    .f_div(&row_norm(&sum)?)?;
                Folded {
                    weight: sum.f_mul(&f.f_unsqueeze(1)?)?,
                    bias,
                    undo: Some(f),
                }
            }
        })
    }

    fn unfold(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        undo: Option<&Tensor>,
    ) -> tensor_core::Result<(Tensor, Option<Tensor>)> {
        let w = match undo {
            Some(f) => w.f_div(&f.f_unsqueeze(1)?)?,
            None => w.shallow_clone(),
        };
        Ok((
            w.f_sub(&self.delta_weight()?.f_detach()?)?,
            b.map(Tensor::shallow_clone),
        ))
    }

    fn unmixable(&self) -> Option<&'static str> {
        self.is_dora()
            .then_some("their change is not additive per row")
    }
}

/// `‖W_o,:‖₂` for every output unit `o`: `[out]`.
pub fn row_norm(w: &Tensor) -> Result<Tensor> {
    Ok(w.f_square()?
        .f_sum_dim_intlist(1, false, Kind::Float)?
        .f_sqrt()?)
}
