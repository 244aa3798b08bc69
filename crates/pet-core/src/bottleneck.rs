//! The bottleneck module shared by adapters and VL-PET (Houlsby et al. 2019,
//! "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al. 2021,
//! "AdapterFusion"; He et al. 2022, "Towards a Unified View of
//! Parameter-Efficient Transfer Learning" for the parallel form; VL-PET §3.1,
//! docs/pet-core.md, Method, part 1 steps 1–2):
//!
//! `D = concat_h(H W_down^hᵀ + b_down^h)` over `N_h` heads with
//! `W_down^h ∈ R^{(r/N_h)×d}`, which is exactly one `Linear(d → r)` (so it is
//! one here; heads are views), then `ΔH = GELU_tanh(D) W_upᵀ + b_up`.
//!
//! `adapter_heads` (an open point of the spec): `down`, `up` and `down_up`
//! only change how heads are viewed, not the function (one dense `Linear`
//! each way); `paired` makes head `h`'s up-projection read only its own
//! `r/N_h` slice of `D` and write only its own `d/N_h` slice of `ΔH`
//! (block-diagonal `W_up`, `r·d/N_h` weights instead of `r·d`).

use serde::{Deserialize, Serialize};
use tensor_core::adapt::{DeltaInput, LinearDelta};
use tensor_core::layers::Activation;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::gate::{Gate, GateConfig, InitScheme};
use crate::target::{normal, param};

/// How the multi-head structure constrains the projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdapterHeads {
    #[default]
    Down,
    Up,
    DownUp,
    /// Block-diagonal up-projection, head by head.
    Paired,
}

/// The bottleneck's non-linearity (`GELU_tanh` in VL-PET).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdapterActivation {
    #[default]
    GeluTanh,
    Gelu,
    Relu,
    Silu,
}

impl From<AdapterActivation> for Activation {
    fn from(a: AdapterActivation) -> Self {
        match a {
            AdapterActivation::GeluTanh => Activation::GeluTanh,
            AdapterActivation::Gelu => Activation::Gelu,
            AdapterActivation::Relu => Activation::Relu,
            AdapterActivation::Silu => Activation::Silu,
        }
    }
}

/// Where the adapter reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// `H' = H + s·ΔH(H)` (Houlsby / Pfeiffer; VL-PET's sites).
    #[default]
    Sequential,
    /// `H' = H + s·ΔH(X)`: reads the sub-module's input.
    Parallel,
}

/// A bottleneck adapter's configuration. Defaults are VL-PET's on BART-base
/// (`r = 96`, `N_h = 4`, `s = 1`, GELU-tanh, `N(0, 0.02²)` weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterConfig {
    /// Bottleneck width `r`.
    pub r: i64,
    /// `N_h`; must divide `r` (and `d` for `paired`).
    pub heads: i64,
    pub adapter_heads: AdapterHeads,
    pub placement: Placement,
    /// `s` when there is no gate (`H' = H + s·ΔH`); with a gate, the gate's own `s` applies.
    pub scale: f64,
    pub activation: AdapterActivation,
    pub init: InitScheme,
    /// VL-PET's granularity-controlled gate; `None` is a plain adapter (`G ≡ 1`).
    pub gate: Option<GateConfig>,
    /// Sites (sub-modules) to put it on: PEFT's suffix rule or globs,
    /// e.g. `["attention", "(ffn)"]` for BERT.
    pub target_modules: Vec<String>,
    pub seed: u64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            r: 96,
            heads: 4,
            adapter_heads: AdapterHeads::Down,
            placement: Placement::Sequential,
            scale: 1.0,
            activation: AdapterActivation::GeluTanh,
            init: InitScheme::BartNormal,
            gate: None,
            target_modules: Vec::new(),
            seed: 0,
        }
    }
}

impl AdapterConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            return Err(Error::config(format!(
                "adapter bottleneck r must be >= 1, got {}",
                self.r
            )));
        }
        if self.heads <= 0 || self.r % self.heads != 0 {
            return Err(Error::config(format!(
                "adapter heads N_h = {} must be >= 1 and divide r = {}",
                self.heads, self.r
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::config("adapter scale s must be finite"));
        }
        if self.target_modules.is_empty() {
            return Err(Error::config(
                "adapter target_modules is empty; name the sub-modules to adapt (e.g. [\"attention\", \"(ffn)\"])",
            ));
        }
        if let Some(g) = &self.gate {
            g.validate()?;
        }
        Ok(())
    }
}

/// `ΔH = act(x W_downᵀ + b_down) W_upᵀ + b_up`.
#[derive(Debug)]
pub struct Bottleneck {
    pub heads: i64,
    pub paired: bool,
    pub activation: Activation,
    /// `down.weight [r, d_in]`, `down.bias [r]`, `up.weight [d_out, r]`
    /// (`[N_h, d_out/N_h, r/N_h]` when paired), `up.bias [d_out]`.
    pub params: Vec<(&'static str, Tensor)>,
}

impl Bottleneck {
    pub fn new(cfg: &AdapterConfig, d_in: i64, d_out: i64, seed: u64, dev: Device) -> Result<Self> {
        cfg.validate()?;
        let (r, nh) = (cfg.r, cfg.heads);
        let paired = cfg.adapter_heads == AdapterHeads::Paired;
        if paired && d_out % nh != 0 {
            return Err(Error::config(format!(
                "paired adapter heads: N_h = {nh} must divide the output width {d_out}"
            )));
        }
        let up_shape: Vec<i64> = if paired {
            vec![nh, d_out / nh, r / nh]
        } else {
            vec![d_out, r]
        };
        let up = match cfg.init {
            InitScheme::BartNormal => normal(&up_shape, 0.02, seed ^ 2, dev)?,
            InitScheme::T5ZeroUp => Tensor::f_zeros(up_shape.as_slice(), (Kind::Float, dev))?,
        };
        let params = vec![
            ("down.weight", normal(&[r, d_in], 0.02, seed ^ 1, dev)?),
            ("down.bias", Tensor::f_zeros([r], (Kind::Float, dev))?),
            ("up.weight", up),
            ("up.bias", Tensor::f_zeros([d_out], (Kind::Float, dev))?),
        ];
        Ok(Self {
            heads: nh,
            paired,
            activation: cfg.activation.into(),
            params: params.into_iter().map(|(n, t)| (n, param(t))).collect(),
        })
    }

    pub fn param_count(cfg: &AdapterConfig, d_in: i64, d_out: i64) -> i64 {
        let up = if cfg.adapter_heads == AdapterHeads::Paired {
            cfg.r * d_out / cfg.heads
        } else {
            cfg.r * d_out
        };
        d_in * cfg.r + cfg.r + up + d_out
    }

    /// `ΔH(x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_to_kind(self.params[0].1.kind())?;
        let d = x.f_linear(&self.params[0].1, Some(&self.params[1].1))?;
        let d = self.activation.apply(&d)?;
        if !self.paired {
            return Ok(d.f_linear(&self.params[2].1, Some(&self.params[3].1))?);
        }
        // [.., r] -> [.., N_h, r/N_h] x [N_h, d/N_h, r/N_h] -> [.., N_h, d/N_h] -> [.., d]
        let mut shape = d.size();
        let r = shape.pop().unwrap_or(0);
        let lead = shape.clone();
        shape.extend([self.heads, r / self.heads]);
        let dh = d.f_reshape(shape.as_slice())?;
        let y = Tensor::f_einsum(
            "...hk,hok->...ho",
            &[&dh, &self.params[2].1],
            None::<&[i64]>,
        )?;
        let mut out_shape = lead;
        out_shape.push(-1);
        Ok(y.f_reshape(out_shape.as_slice())?
            .f_add(&self.params[3].1)?)
    }
}

/// A parallel bottleneck on a `Linear`, `c = s·ΔH(x)` (VL-PET's decoder
/// value adapter), optionally gated. Its change depends on the input, so it
/// never merges.
#[derive(Debug)]
pub struct ParallelAdapter {
    pub module: Bottleneck,
    pub scale: f64,
    pub gate: Option<Gate>,
}

impl LinearDelta for ParallelAdapter {
    fn kind(&self) -> &'static str {
        "parallel bottleneck"
    }

    fn param_names(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .module
            .params
            .iter()
            .map(|(n, _)| format!("adapter.{name}.{n}"))
            .collect();
        if let Some(g) = &self.gate {
            v.extend(g.param_names(name));
        }
        v
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self.module.params.iter().map(|(_, t)| t).collect();
        if let Some(g) = &self.gate {
            v.extend(g.params.iter().map(|(_, t)| t));
        }
        v
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v: Vec<&mut Tensor> = self.module.params.iter_mut().map(|(_, t)| t).collect();
        if let Some(g) = &mut self.gate {
            v.extend(g.params.iter_mut().map(|(_, t)| t));
        }
        v
    }

    fn additive(&self, io: &DeltaInput<'_>) -> tensor_core::Result<Option<Tensor>> {
        let d = self.module.forward(io.x)?.f_mul_scalar(self.scale)?;
        Ok(Some(Gate::change(self.gate.as_ref(), io, d)?))
    }

    fn merge_order(&self) -> Option<tensor_core::adapt::MergeOrder> {
        None
    }
}
