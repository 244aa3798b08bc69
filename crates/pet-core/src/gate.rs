//! VL-PET's granularity-controlled gate `G` (Hu et al., ICCV 2023,
//! "VL-PET: Vision-and-Language Parameter-Efficient Tuning via Granularity
//! Control", arXiv 2308.09804, §3.2; `HenryHZY/VL-PET`); docs/pet-core.md,
//! Method, part 1.
//!
//! With `X` the site's input, `H` the frozen sub-module's output and `ΔH`
//! the adapter's change, the modified output is `H' = s·(H + ΔH) ⊙ G`
//! (`combine = multiply`, the default) or `H' = s·(H + ΔH + G)`
//! (`combine = add`), where `G` is one of:
//!
//! | granularity | `G` | shape | parameters |
//! |---|---|---|---|
//! | large   | `σ(GELU_tanh(X W_gdᵀ + b_gd) W_guᵀ + b_gu)` | `[B,T,d]` | `2·d·r_g + r_g + d` |
//! | middleX | `σ((X + H + ΔH) w + b)` | `[B,T,1]` | `d + 1` |
//! | middleY | `1 + z` (or `1 + σ(z)`) | `[d]` | `d` |
//! | small   | `mean_t σ([X_t ; H_t + ΔH_t] w + b)` | `[B,1,1]` | `2d + 1` |
//!
//! `X` is the site's input (`gate_input = residual`), or its LayerNorm
//! without affine parameters (`normed`). In a post-LN model (BERT, BART)
//! the input of an attention or FFN site *is* the residual stream; in a
//! pre-LN model (GPT-2, T5) it is already `LN(X)`.

use serde::{Deserialize, Serialize};
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::target::{normal, param};

/// Which of VL-PET's four gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Element-wise, `[B,T,d]`, from a bottleneck of width `r_g`.
    Large,
    /// Token-wise, `[B,T,1]`.
    MiddleX,
    /// Channel-wise, `[d]`, input-independent.
    MiddleY,
    /// Sample-wise, `[B,1,1]`.
    Small,
}

/// The form of the middle-Y gate (an open point of the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MiddleYForm {
    /// `G = 1 + z` (the released code; default).
    #[default]
    OnePlusZ,
    /// `G = 1 + σ(z)` (the paper's figure).
    OnePlusSigmoid,
}

/// How `G` meets `H + ΔH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// `H' = s·(H + ΔH) ⊙ G` (default).
    #[default]
    Multiply,
    /// `H' = s·(H + ΔH + G)`.
    Add,
}

/// What the gate reads as `X`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateInput {
    /// The site's input as it is (default; the residual stream in post-LN models).
    #[default]
    Residual,
    /// `LayerNorm(X)` without affine parameters.
    Normed,
}

/// Initialisation of VL-PET modules (adapters and gates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// BART: weights `N(0, 0.02²)`, biases 0 (default).
    #[default]
    BartNormal,
    /// T5: output-side projections 0, so `ΔH = 0` and sigmoid gates start at 0.5.
    T5ZeroUp,
}

/// A gate's configuration; defaults are the BART setting (`r_g = 96`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GateConfig {
    pub granularity: Granularity,
    /// `r_g`, the large gate's bottleneck.
    pub bottleneck: i64,
    /// `s` in `H' = s·(H + ΔH) ⊙ G`.
    pub scale: f64,
    pub middle_y_form: MiddleYForm,
    /// Average the small gate over real tokens only (the code averages over padding too).
    pub small_gate_mask_padding: bool,
    pub combine: Combine,
    pub gate_input: GateInput,
    pub init: InitScheme,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            granularity: Granularity::Large,
            bottleneck: 96,
            scale: 1.0,
            middle_y_form: MiddleYForm::OnePlusZ,
            small_gate_mask_padding: false,
            combine: Combine::Multiply,
            gate_input: GateInput::Residual,
            init: InitScheme::BartNormal,
        }
    }
}

impl GateConfig {
    pub fn new(granularity: Granularity) -> Self {
        Self {
            granularity,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.granularity == Granularity::Large && self.bottleneck <= 0 {
            return Err(Error::config(format!(
                "large gate bottleneck r_g must be >= 1, got {}",
                self.bottleneck
            )));
        }
        if !self.scale.is_finite() {
            return Err(Error::config("gate scale s must be finite"));
        }
        Ok(())
    }

    /// Parameters of one gate on a site of input width `d_in` and output width `d`.
    pub fn param_count(&self, d_in: i64, d: i64) -> i64 {
        match self.granularity {
            Granularity::Large => {
                d_in * self.bottleneck + self.bottleneck + self.bottleneck * d + d
            }
            Granularity::MiddleX => d + 1,
            Granularity::MiddleY => d,
            Granularity::Small => d_in + d + 1,
        }
    }
}

/// One gate's parameters (names as the adapter's own: `gate_down.weight`, ...).
#[derive(Debug)]
pub struct Gate {
    pub config: GateConfig,
    /// `(local name, tensor)`, in a fixed order per granularity.
    pub params: Vec<(&'static str, Tensor)>,
}

impl Gate {
    /// A gate for a site with input width `d_in` and output width `d`.
    pub fn new(config: &GateConfig, d_in: i64, d: i64, seed: u64, dev: Device) -> Result<Self> {
        config.validate()?;
        if config.granularity == Granularity::MiddleX && d_in != d {
            return Err(Error::config(format!(
                "middle-X gate reads X + H + ΔH, so input and output widths must agree (got {d_in} and {d})"
            )));
        }
        let zero_out = config.init == InitScheme::T5ZeroUp;
        let w = |shape: &[i64], s: u64, zero: bool| -> Result<Tensor> {
            if zero {
                Ok(Tensor::f_zeros(shape, (Kind::Float, dev))?)
            } else {
                normal(shape, 0.02, seed ^ s, dev)
            }
        };
        let z = |n: i64| Tensor::f_zeros([n], (Kind::Float, dev));
        let params: Vec<(&'static str, Tensor)> = match config.granularity {
            Granularity::Large => {
                let rg = config.bottleneck;
                vec![
                    ("gate_down.weight", w(&[rg, d_in], 11, false)?),
                    ("gate_down.bias", z(rg)?),
                    ("gate_up.weight", w(&[d, rg], 12, zero_out)?),
                    ("gate_up.bias", z(d)?),
                ]
            }
            Granularity::MiddleX => vec![
                ("gate.weight", w(&[1, d], 13, zero_out)?),
                ("gate.bias", z(1)?),
            ],
            Granularity::MiddleY => vec![("gate.z", normal(&[d], 0.02, seed ^ 14, dev)?)],
            Granularity::Small => vec![
                ("gate.weight", w(&[1, d_in + d], 15, zero_out)?),
                ("gate.bias", z(1)?),
            ],
        };
        Ok(Self {
            config: config.clone(),
            params: params.into_iter().map(|(n, t)| (n, param(t))).collect(),
        })
    }

    fn p(&self, i: usize) -> &Tensor {
        &self.params[i].1
    }

    /// `G` from the site input `x`, and `h_new = H + ΔH`; `mask` (`[B,T]`,
    /// 1 = token) is used by the small gate when `small_gate_mask_padding`.
    pub fn compute(&self, x: &Tensor, h_new: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = match self.config.gate_input {
            GateInput::Residual => x.shallow_clone(),
            GateInput::Normed => {
                let d = *x.size().last().unwrap_or(&1);
                x.f_layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-5, false)?
            }
        };
        let kind = h_new.kind();
        let x = x.f_to_kind(kind)?;
        Ok(match self.config.granularity {
            Granularity::Large => x
                .f_linear(self.p(0), Some(self.p(1)))?
                .f_gelu("tanh")?
                .f_linear(self.p(2), Some(self.p(3)))?
                .f_sigmoid()?,
            Granularity::MiddleX => x
                .f_add(h_new)?
                .f_linear(self.p(0), Some(self.p(1)))?
                .f_sigmoid()?,
            Granularity::MiddleY => match self.config.middle_y_form {
                MiddleYForm::OnePlusZ => self.p(0).f_add_scalar(1.0)?,
                MiddleYForm::OnePlusSigmoid => self.p(0).f_sigmoid()?.f_add_scalar(1.0)?,
            },
            Granularity::Small => {
                let per_token = Tensor::f_cat(&[&x, h_new], -1)?
                    .f_linear(self.p(0), Some(self.p(1)))?
                    .f_sigmoid()?;
                if per_token.dim() < 3 {
                    // `[N, 1]` rows without a sequence axis: one token per sample.
                    per_token
                } else {
                    match (mask, self.config.small_gate_mask_padding) {
                        (Some(m), true) => {
                            let m = m.f_to_kind(per_token.kind())?.f_unsqueeze(-1)?;
                            per_token
                                .f_mul(&m)?
                                .f_sum_dim_intlist(1, true, None)?
                                .f_div(&m.f_sum_dim_intlist(1, true, None)?.f_clamp_min(1.0)?)?
                        }
                        _ => per_token.f_mean_dim(1, true, None)?,
                    }
                }
            }
        })
    }

    /// `H' = s·(H + ΔH) ⊙ G` or `s·(H + ΔH + G)`.
    pub fn apply(&self, x: &Tensor, h_new: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let g = self.compute(x, h_new, mask)?;
        let y = match self.config.combine {
            Combine::Multiply => h_new.f_mul(&g)?,
            Combine::Add => h_new.f_add(&g)?,
        };
        Ok(if self.config.scale == 1.0 {
            y
        } else {
            y.f_mul_scalar(self.config.scale)?
        })
    }

    /// The gated change on a linear layer, `c = G·(H + d) − H`, from the
    /// base output `H` and the ungated change `d` ("LoRA + G", a gated
    /// parallel adapter); `d` itself when there is no gate.
    pub fn change(
        gate: Option<&Gate>,
        io: &tensor_core::adapt::DeltaInput<'_>,
        d: Tensor,
    ) -> Result<Tensor> {
        match gate {
            None => Ok(d),
            Some(g) => Ok(g
                .apply(io.x, &io.h.f_add(&d)?, io.attention_mask)?
                .f_sub(io.h)?),
        }
    }

    /// Parameter names under a linear layer for adapter `name`.
    pub fn param_names(&self, name: &str) -> Vec<String> {
        self.params
            .iter()
            .map(|(n, _)| format!("vlpet_gate.{name}.{n}"))
            .collect()
    }
}
