//! VL-PET's lightweight placement (Hu et al., ICCV 2023, arXiv 2308.09804,
//! §3.3; docs/pet-core.md, Method, part 1 step 6) as one call:
//!
//! - encoder: a gated bottleneck site after every self-attention and every
//!   FFN, `H' = s·(H + ΔH) ⊙ G`, and the encoder LayerNorms trainable;
//! - decoder: no sites in self-attention or FFN, LayerNorms frozen; only the
//!   cross-attention value projection gets an ungated parallel adapter,
//!   `V = X_enc W_vᵀ + b_v + s·GELU_tanh(X_enc W_downᵀ) W_upᵀ`;
//! - everything else frozen.
//!
//! Per-site parameters on BART-base (`d = 768`, `r = r_g = 96`):
//! `ΔH` 148,320; `G_large` 148,320; middle-X 769; middle-Y 768; small 1,537
//! ([`site_param_count`]).

use serde::{Deserialize, Serialize};
use tensor_core::module::ModuleExt;

use crate::bottleneck::{AdapterConfig, AdapterHeads, Bottleneck, Placement};
use crate::error::Result;
use crate::gate::{GateConfig, Granularity, InitScheme};
use crate::model::{AddReport, add_adapter, add_linear_adapter, mark_only_adapters_trainable};

/// VL-PET on an encoder(-decoder). Defaults: BART-base's (`r = 96`,
/// `N_h = 4`, large gate with `r_g = 96`, `s = 1`) on BERT-style paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VlPetConfig {
    pub r: i64,
    pub heads: i64,
    pub adapter_heads: AdapterHeads,
    /// `None`: a plain bottleneck adapter at the same places (`G ≡ 1`).
    pub gate: Option<GateConfig>,
    pub init: InitScheme,
    /// Encoder sites (sub-modules whose output is `H`): BERT `attention`, `(ffn)`.
    pub encoder_sites: Vec<String>,
    /// Globs of encoder LayerNorm parameters made trainable.
    pub encoder_layer_norms: Vec<String>,
    /// Decoder cross-attention value projections (`Linear`s) for the parallel adapter.
    pub decoder_value: Vec<String>,
    /// Bottleneck of the decoder value adapter (96 in the paper).
    pub decoder_value_r: i64,
    /// Further trainable parameters (globs), e.g. a task head `classifier.*`.
    pub also_trainable: Vec<String>,
    pub seed: u64,
}

impl Default for VlPetConfig {
    fn default() -> Self {
        Self {
            r: 96,
            heads: 4,
            adapter_heads: AdapterHeads::Down,
            gate: Some(GateConfig::new(Granularity::Large)),
            init: InitScheme::BartNormal,
            encoder_sites: vec!["attention".into(), "(ffn)".into()],
            encoder_layer_norms: vec!["*encoder.*LayerNorm.*".into()],
            decoder_value: Vec::new(),
            decoder_value_r: 96,
            also_trainable: Vec::new(),
            seed: 0,
        }
    }
}

impl VlPetConfig {
    /// The paper's module with the given gate granularity (BART defaults).
    pub fn with_granularity(g: Granularity) -> Self {
        Self {
            gate: Some(GateConfig::new(g)),
            ..Self::default()
        }
    }

    fn site_adapter(&self) -> AdapterConfig {
        AdapterConfig {
            r: self.r,
            heads: self.heads,
            adapter_heads: self.adapter_heads,
            placement: Placement::Sequential,
            init: self.init,
            gate: self.gate.clone().map(|mut g| {
                g.init = self.init;
                g
            }),
            target_modules: self.encoder_sites.clone(),
            seed: self.seed,
            ..AdapterConfig::default()
        }
    }
}

/// What [`apply_vlpet`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct VlPetReport {
    pub sites: AddReport,
    pub decoder_value: Option<AddReport>,
    /// Trainable tensors after freezing.
    pub trainable_tensors: usize,
}

/// Put VL-PET adapter `name` into `model` (hidden width `d_model`) and
/// freeze everything but its modules, the encoder LayerNorms and `also_trainable`.
pub fn apply_vlpet<M: ModuleExt + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &VlPetConfig,
    d_model: i64,
) -> Result<VlPetReport> {
    let sites = add_adapter(model, name, &cfg.site_adapter(), d_model)?;
    let decoder_value = if cfg.decoder_value.is_empty() {
        None
    } else {
        let dv = AdapterConfig {
            r: cfg.decoder_value_r,
            heads: 1,
            placement: Placement::Parallel,
            init: cfg.init,
            gate: None,
            target_modules: cfg.decoder_value.clone(),
            seed: cfg.seed ^ 0xdec0,
            ..AdapterConfig::default()
        };
        Some(add_linear_adapter(model, &format!("{name}_dec_v"), &dv)?)
    };
    let mut also: Vec<&str> = cfg.encoder_layer_norms.iter().map(String::as_str).collect();
    also.extend(cfg.also_trainable.iter().map(String::as_str));
    let mut names = vec![name.to_owned()];
    if decoder_value.is_some() {
        names.push(format!("{name}_dec_v"));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let trainable_tensors = mark_only_adapters_trainable(model, &names, &also);
    Ok(VlPetReport {
        sites,
        decoder_value,
        trainable_tensors,
    })
}

/// Parameters of one VL-PET site of width `d`: `ΔH` plus its gate.
pub fn site_param_count(d: i64, cfg: &VlPetConfig) -> i64 {
    let a = cfg.site_adapter();
    Bottleneck::param_count(&a, d, d) + cfg.gate.as_ref().map_or(0, |g| g.param_count(d, d))
}
