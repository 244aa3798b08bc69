//! The tuning kinds of the sentiment experiments, as `FinetuneHooks` on
//! `model-zoo`'s sequence classifier: full fine-tuning, EMoE (Qiu et al.,
//! 2024) with and without LoRA, LoRA, a bottleneck adapter, VL-PET at its
//! four gate granularities and LoRA + G (Hu et al., ICCV 2023). The
//! experiments and the demo build every arm through [`Hooks`].

use emergent_split::{EmoeConfig, convert, refresh_gates};
use model_zoo::bert::SequenceClassifier;
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, FinetuneReport, TrainHooks, finetune_with};
use model_zoo::source::ModelSource;
use pet_core::{
    AdapterConfig, GateConfig, Granularity, LoraConfig, VlPetConfig, add_adapter, add_lora,
    apply_vlpet, mark_only_adapters_trainable, trainable_report,
};

use crate::AnyResult;

fn zoo(e: impl std::fmt::Display) -> model_zoo::Error {
    model_zoo::Error::invalid(e.to_string())
}

/// One way of tuning the classifier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Full,
    Emoe,
    Lora,
    LoraEmoe,
    Adapter,
    /// VL-PET as the paper sets it: `s = 1`, so the sigmoid gates start at 0.5.
    VlPet(Granularity),
    /// VL-PET with `s = 2` for the sigmoid gates (large, middle-X, small), so
    /// `s · G` starts at 1 and the frozen encoder's output is untouched at
    /// step 0; middle-Y (`1 + z`) starts at 1 anyway and keeps `s = 1`.
    VlPetAtOne(Granularity),
    LoraGate,
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Full => "full fine-tuning".into(),
            Kind::Emoe => "EMoE (full)".into(),
            Kind::Lora => "LoRA".into(),
            Kind::LoraEmoe => "LoRA + EMoE".into(),
            Kind::Adapter => "bottleneck adapter".into(),
            Kind::VlPet(g) => format!("VL-PET {}", granularity_name(g)),
            Kind::VlPetAtOne(g) => format!("VL-PET {} (s·G starts at 1)", granularity_name(g)),
            Kind::LoraGate => "LoRA + G (large)".into(),
        }
    }

    /// Whether the kind trains a small share of the parameters (and so
    /// takes the parameter-efficient learning rate).
    pub fn parameter_efficient(self) -> bool {
        !matches!(self, Kind::Full | Kind::Emoe)
    }
}

/// The granularity's name as the VL-PET paper writes it.
pub fn granularity_name(g: Granularity) -> &'static str {
    match g {
        Granularity::Large => "large",
        Granularity::MiddleX => "middle-X",
        Granularity::MiddleY => "middle-Y",
        Granularity::Small => "small",
    }
}

/// Shared settings of the parameter-efficient methods on MiniLM (d = 384):
/// LoRA r = 8, α = 16 on query/value; bottleneck r = 48 = d/8 (VL-PET's
/// r = 96 on d = 768 scaled to MiniLM), N_h = 4, r_g = 48.
#[derive(Debug, Clone)]
pub struct Setup {
    /// LoRA rank (α = 2r), on query and value.
    pub lora_r: i64,
    /// Bottleneck width of the adapters, VL-PET's modules and gates.
    pub adapter_r: i64,
    /// EMoE: experts per converted FFN and how many each token uses.
    pub experts: usize,
    pub top_k: usize,
    /// EMoE: the converted layers; `None` takes the library's default
    /// placement for the model's depth.
    pub emoe_layers: Option<Vec<usize>>,
    /// EMoE: train with the reference's Tutel-path regularisers (expert
    /// dropout 0.1, CV² loss 0.01, capacity factor 1.5); `false` is plain avg-k.
    pub emoe_regularisers: bool,
    /// Bottleneck adapter: also train the encoder LayerNorms, as VL-PET
    /// does, so the two differ only by the gate.
    pub adapter_trains_layer_norms: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            lora_r: 8,
            adapter_r: 48,
            experts: 16,
            top_k: 4,
            emoe_layers: None,
            emoe_regularisers: true,
            adapter_trains_layer_norms: true,
        }
    }
}

/// The hooks that turn a dense classifier into one tuning kind.
pub struct Hooks {
    pub kind: Kind,
    pub setup: Setup,
    pub seed: u64,
    /// Filled in by `prepare`: the trainable share of the parameters, in %.
    pub trainable_percent: f64,
}

impl Hooks {
    /// Hooks for `kind` under `setup`, seeded by `seed`.
    pub fn new(kind: Kind, setup: Setup, seed: u64) -> Self {
        Self {
            kind,
            setup,
            seed,
            trainable_percent: 100.0,
        }
    }

    fn lora(&self) -> LoraConfig {
        let mut c = LoraConfig::new(
            self.setup.lora_r,
            2.0 * self.setup.lora_r as f64,
            &["query", "value"],
        );
        c.seed = self.seed;
        c
    }
}

impl TrainHooks<SequenceClassifier, model_zoo::Error> for Hooks {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let d = 384;
        let r = self.setup.adapter_r;
        let mut note = String::new();
        if matches!(self.kind, Kind::Emoe | Kind::LoraEmoe) {
            let depth = emergent_split::convert::ffn_paths(model).len();
            let layers = match &self.setup.emoe_layers {
                Some(l) => l.clone(),
                None => emergent_split::convert::reference_layers(depth),
            };
            let cfg = if self.setup.emoe_regularisers {
                EmoeConfig::new(self.setup.experts, self.setup.top_k)
            } else {
                EmoeConfig::plain(self.setup.experts, self.setup.top_k)
            };
            let rep = convert(model, &layers, &cfg).map_err(zoo)?;
            note = format!(
                "EMoE layers {:?}; ",
                rep.layers
                    .iter()
                    .filter_map(|l| l.layer)
                    .collect::<Vec<_>>()
            );
        }
        match self.kind {
            Kind::Full | Kind::Emoe => {}
            Kind::Lora | Kind::LoraEmoe => {
                add_lora(model, "task", &self.lora()).map_err(zoo)?;
            }
            Kind::LoraGate => {
                let mut c = self.lora();
                c.gate = Some(GateConfig {
                    bottleneck: r,
                    ..GateConfig::new(Granularity::Large)
                });
                add_lora(model, "task", &c).map_err(zoo)?;
            }
            Kind::Adapter => {
                let c = AdapterConfig {
                    r,
                    heads: 4,
                    target_modules: vec!["attention".into(), "(ffn)".into()],
                    seed: self.seed,
                    ..AdapterConfig::default()
                };
                add_adapter(model, "task", &c, d).map_err(zoo)?;
            }
            Kind::VlPet(g) | Kind::VlPetAtOne(g) => {
                let at_one = matches!(self.kind, Kind::VlPetAtOne(_));
                let scale = if at_one && g != Granularity::MiddleY {
                    2.0
                } else {
                    1.0
                };
                let c = VlPetConfig {
                    r,
                    heads: 4,
                    gate: Some(GateConfig {
                        bottleneck: r,
                        scale,
                        ..GateConfig::new(g)
                    }),
                    also_trainable: vec!["classifier.*".into()],
                    seed: self.seed,
                    ..VlPetConfig::default()
                };
                apply_vlpet(model, "task", &c, d).map_err(zoo)?;
            }
        }
        if self.kind.parameter_efficient()
            && !matches!(self.kind, Kind::VlPet(_) | Kind::VlPetAtOne(_))
        {
            let layer_norms = VlPetConfig::default().encoder_layer_norms;
            let mut also = vec!["classifier.*"];
            if self.kind == Kind::Adapter && self.setup.adapter_trains_layer_norms {
                also.extend(layer_norms.iter().map(String::as_str));
            }
            mark_only_adapters_trainable(model, &[], &also);
        }
        let rep = trainable_report(model);
        self.trainable_percent = rep.percent();
        Ok(format!("{note}{rep}"))
    }

    fn after_step(&mut self, model: &mut SequenceClassifier) -> Option<model_zoo::Result<()>> {
        matches!(self.kind, Kind::Emoe | Kind::LoraEmoe)
            .then(|| refresh_gates(model).map(|_| ()).map_err(zoo))
    }
}

/// One tuning run set up as in the experiments (LoRA r = 8, α = 16 on
/// query/value; adapters and VL-PET r = 48, 4 heads; parameter-efficient
/// methods at `opts.lr`): the report and the trainable share in %.
pub fn tune_once(
    kind: Kind,
    source: &ModelSource,
    data: &TextClassification,
    opts: &FinetuneOptions,
    device: tensor_core::tch::Device,
) -> AnyResult<(FinetuneReport, f64)> {
    let mut hooks = Hooks::new(kind, Setup::default(), opts.seed);
    let report = finetune_with(source, data, opts, device, &mut hooks)?;
    Ok((report, hooks.trainable_percent))
}
