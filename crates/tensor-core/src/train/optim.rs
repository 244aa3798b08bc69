//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019),
//! computed exactly as `torch.optim.AdamW` (single-tensor path, `amsgrad=False`,
//! `maximize=False`). For a parameter `p` with gradient `g`, at its own step
//! `t` (counted per parameter, as PyTorch does):
//!
//! ```text
//! p ← p · (1 − lr · wd)                         decoupled weight decay
//! m ← β1 m + (1 − β1) g                          (as m.lerp_(g, 1 − β1))
//! v ← β2 v + (1 − β2) g²
//! p ← p − lr · (m / (1 − β1^t)) / (sqrt(v) / sqrt(1 − β2^t) + eps)
//! ```
//!
//! Parameters are split into two groups by name, as Hugging Face training
//! scripts do: those matching a `no_decay` glob (biases and layer norms by
//! default) get weight decay 0. Parameters whose gradient is undefined are
//! skipped (their step count does not advance). `zero_grad` zeroes gradients
//! in place: libtorch through tch cannot reset a gradient to undefined, so,
//! unlike PyTorch's default `set_to_none=True`, a parameter that had a
//! gradient once keeps being updated (with a zero gradient) when a later step
//! does not reach it, as PyTorch does with `zero_grad(set_to_none=False)`.
//!
//! The update is all device ops under `no_grad`: no host synchronisation.
//!
//! Mixed precision: with `master_weights` (the default), a bf16 or f16
//! parameter keeps an f32 master copy; the gradient is cast to f32, the
//! moments and the update are f32, and the parameter receives the rounded
//! master after each step. Updates smaller than half a bf16 ulp therefore
//! accumulate instead of vanishing (bf16 has 8 significant bits: `1 + 1e-3`
//! rounds to 1). f32 and f64 parameters are updated in place as before.

use std::collections::HashSet;

use crate::module::glob_match;
use crate::tch::{self, Kind, Tensor};
use crate::{Module, ModuleExt, TchResultExt};

use crate::error::{Error, Result};

/// Default no-decay patterns: biases and layer-norm weights under the names
/// BERT, GPT-2, ViT and T5-style checkpoints give them.
pub const DEFAULT_NO_DECAY: [&str; 5] = [
    "*.bias",
    "*LayerNorm.weight",
    "*layer_norm*.weight",
    "*ln_*.weight",
    "*layernorm*.weight",
];

/// Hyper-parameters of [`AdamW`]. Defaults are PyTorch's (`lr` 1e-3,
/// `betas` (0.9, 0.999), `eps` 1e-8, `weight_decay` 0.01) with
/// [`DEFAULT_NO_DECAY`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Glob patterns (see `crate::module::glob_match`) of parameter
    /// names that get no weight decay.
    pub no_decay: Vec<String>,
    /// Keep f32 master weights (and f32 moments) for bf16/f16 parameters.
    pub master_weights: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            no_decay: DEFAULT_NO_DECAY.iter().map(|s| (*s).to_owned()).collect(),
            master_weights: true,
        }
    }
}

impl AdamWConfig {
    /// The defaults with learning rate `lr`.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            ..Self::default()
        }
    }

    /// f32 master weights for 16-bit parameters (on by default).
    pub fn with_master_weights(mut self, on: bool) -> Self {
        self.master_weights = on;
        self
    }

    pub fn with_betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.betas = (beta1, beta2);
        self
    }

    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Replace the no-decay patterns.
    pub fn with_no_decay(mut self, patterns: &[&str]) -> Self {
        self.no_decay = patterns.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Check every value is in its range: `lr >= 0`, `betas` in `[0, 1)`,
    /// `eps >= 0`, `weight_decay >= 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        for (name, b) in [("beta1", self.betas.0), ("beta2", self.betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(format!(
                    "AdamW: {name} must be in [0, 1), got {b}"
                )));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(format!(
                "AdamW: eps must be finite and >= 0, got {}",
                self.eps
            )));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid(format!(
                "AdamW: weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }

    /// Whether the parameter called `name` gets weight decay.
    pub fn decays(&self, name: &str) -> bool {
        !self.no_decay.iter().any(|p| glob_match(p, name))
    }
}

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "AdamW: learning rate must be finite and >= 0, got {lr}"
        )))
    }
}

/// One parameter and its optimiser state.
#[derive(Debug)]
struct ParamState {
    name: String,
    param: Tensor,
    /// `(exp_avg, exp_avg_sq)`, allocated at the parameter's first update.
    moments: Option<(Tensor, Tensor)>,
    /// The f32 master copy of a 16-bit parameter (`master_weights`).
    master: Option<Tensor>,
    /// Updates applied to this parameter (PyTorch's per-parameter `step`).
    step: u64,
}

/// Parameters sharing a weight decay.
#[derive(Debug)]
pub struct ParamGroup {
    name: &'static str,
    weight_decay: f64,
    params: Vec<ParamState>,
}

impl ParamGroup {
    /// `"decay"` or `"no_decay"`.
    pub fn name(&self) -> &str {
        self.name
    }

    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// Full names of the group's parameters, in the order given.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|s| s.name.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

/// AdamW over named parameters (see the module docs for the update).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    lr: f64,
    steps: u64,
    /// Always two groups: `decay` (the config's weight decay), then `no_decay` (0).
    groups: Vec<ParamGroup>,
}

impl AdamW {
    /// Build from named trainable parameters (e.g. `ModuleExt::trainable_parameters`).
    /// The tensors are shallow handles: the module's parameters are updated in place.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        if params.is_empty() {
            return Err(Error::invalid(
                "AdamW: no parameters to optimise (are they all frozen? see set_trainable)",
            ));
        }
        let mut seen = HashSet::new();
        let mut decay = Vec::new();
        let mut no_decay = Vec::new();
        for (name, param) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(format!(
                    "AdamW: parameter '{name}' is given twice"
                )));
            }
            let kind = param.f_kind().op(&name)?;
            if !crate::device::is_float(kind) {
                return Err(Error::invalid(format!(
                    "AdamW: parameter '{name}' has dtype {kind:?}, not a floating-point type"
                )));
            }
            if !param.requires_grad() {
                return Err(Error::invalid(format!(
                    "AdamW: parameter '{name}' does not require grad (pass trainable_parameters())"
                )));
            }
            let master = if config.master_weights && matches!(kind, Kind::BFloat16 | Kind::Half) {
                Some(
                    tch::no_grad(|| param.f_detach().and_then(|p| p.f_to_kind(Kind::Float)))
                        .op(&name)?,
                )
            } else {
                None
            };
            let state = ParamState {
                param,
                moments: None,
                master,
                step: 0,
                name,
            };
            if config.decays(&state.name) {
                decay.push(state);
            } else {
                no_decay.push(state);
            }
        }
        let groups = vec![
            ParamGroup {
                name: "decay",
                weight_decay: config.weight_decay,
                params: decay,
            },
            ParamGroup {
                name: "no_decay",
                weight_decay: 0.0,
                params: no_decay,
            },
        ];
        Ok(Self {
            lr: config.lr,
            config,
            steps: 0,
            groups,
        })
    }

    /// Optimise every trainable parameter of `module`.
    pub fn for_module(module: &dyn Module, config: AdamWConfig) -> Result<Self> {
        Self::new(module.trainable_parameters(), config)
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The two groups, `decay` then `no_decay` (either may be empty).
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Names of the parameters that get weight decay.
    pub fn decay_names(&self) -> Vec<&str> {
        self.groups[0].names()
    }

    /// Names of the parameters that get no weight decay.
    pub fn no_decay_names(&self) -> Vec<&str> {
        self.groups[1].names()
    }

    /// Every optimised parameter (shallow handles), decay group first.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.states().map(|s| s.param.shallow_clone()).collect()
    }

    /// Every optimised parameter with its name, decay group first.
    pub fn named_parameters(&self) -> Vec<(&str, &Tensor)> {
        self.states().map(|s| (s.name.as_str(), &s.param)).collect()
    }

    fn states(&self) -> impl Iterator<Item = &ParamState> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The configured learning rate, which schedules scale.
    pub fn base_lr(&self) -> f64 {
        self.config.lr
    }

    /// Set the learning rate of every group (finite, `>= 0`).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// How many times [`AdamW::step`] has run.
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// Updates applied to the parameter `name` so far (its bias-correction step).
    pub fn param_step(&self, name: &str) -> Result<u64> {
        self.states()
            .find(|s| s.name == name)
            .map(|s| s.step)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "AdamW: no parameter '{name}' (optimised: {})",
                    self.states()
                        .take(8)
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// One AdamW update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<()> {
        let lr = self.lr;
        let (beta1, beta2) = self.config.betas;
        let eps = self.config.eps;
        tch::no_grad(|| -> Result<()> {
            for group in &mut self.groups {
                let wd = group.weight_decay;
                for s in &mut group.params {
                    let name = s.name.as_str();
                    let grad = s.param.f_grad().op(name)?;
                    if !grad.defined() {
                        continue;
                    }
                    s.step += 1;
                    // The tensor updated: the f32 master of a 16-bit parameter, else the parameter.
                    let (mut target, grad) = match &s.master {
                        Some(m) => (m.shallow_clone(), grad.f_to_kind(Kind::Float).op(name)?),
                        None => (s.param.shallow_clone(), grad),
                    };
                    if wd != 0.0 {
                        target.f_mul_scalar_(1.0 - lr * wd).map(drop).op(name)?;
                    }
                    if s.moments.is_none() {
                        s.moments = Some((
                            target.f_zeros_like().op(name)?,
                            target.f_zeros_like().op(name)?,
                        ));
                    }
                    let (exp_avg, exp_avg_sq) = s.moments.as_mut().expect("set above");
                    exp_avg.f_lerp_(&grad, 1.0 - beta1).map(drop).op(name)?;
                    exp_avg_sq.f_mul_scalar_(beta2).map(drop).op(name)?;
                    let g2 = grad
                        .f_mul_scalar(1.0 - beta2)
                        .and_then(|t| t.f_mul(&grad))
                        .op(name)?;
                    exp_avg_sq.f_add_(&g2).map(drop).op(name)?;

                    let t = s.step as f64;
                    let bias_correction1 = 1.0 - beta1.powf(t);
                    let bias_correction2 = 1.0 - beta2.powf(t);
                    let step_size = lr / bias_correction1;
                    let mut denom = exp_avg_sq.f_sqrt().op(name)?;
                    denom
                        .f_div_scalar_(bias_correction2.sqrt())
                        .map(drop)
                        .op(name)?;
                    denom.f_add_scalar_(eps).map(drop).op(name)?;
                    let update = exp_avg
                        .f_mul_scalar(-step_size)
                        .and_then(|t| t.f_div(&denom))
                        .op(name)?;
                    target.f_add_(&update).map(drop).op(name)?;
                    if s.master.is_some() {
                        s.param.f_copy_(&target).op(name)?;
                    }
                }
            }
            Ok(())
        })?;
        self.steps += 1;
        Ok(())
    }

    /// Zero every defined gradient in place (see the module docs).
    pub fn zero_grad(&mut self) -> Result<()> {
        for s in self.groups.iter().flat_map(|g| g.params.iter()) {
            let mut g = s.param.f_grad().op(&s.name)?;
            if g.defined() {
                g.f_detach_().map(drop).op(&s.name)?;
                g.f_zero_().map(drop).op(&s.name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tch::{Device, Kind};
    use crate::testing::device;
    use serde_json::Value;

    use crate::testing::slack;

    const FIXTURE: &str = include_str!("../../tests/fixtures/train/adamw.json");

    use crate::train::test_fixtures::floats;

    fn tensor(v: &Value, shape: &[i64], device: Device) -> Tensor {
        Tensor::from_slice(&floats(v))
            .reshape(shape)
            .to_device(device)
    }

    /// On the host: for grouping, bookkeeping and argument checks.
    fn param(name: &str, shape: &[i64]) -> (String, Tensor) {
        (
            name.to_owned(),
            Tensor::zeros(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true),
        )
    }

    /// bf16 weights with f32 master copies follow the f32 trajectory (to
    /// bf16 rounding of the final weights); without masters, updates below
    /// half a bf16 ulp are lost and the weights never move.
    #[test]
    fn bf16_master_weights_follow_the_f32_trajectory() {
        let dev = device();
        let run = |kind: Kind, master: bool| -> Tensor {
            let p = Tensor::from_slice(&[1.0f32, -0.5, 0.25, 2.0])
                .to_device(dev)
                .to_kind(kind)
                .set_requires_grad(true);
            let cfg = AdamWConfig::new(1e-4)
                .with_weight_decay(0.0)
                .with_master_weights(master);
            let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], cfg).unwrap();
            for step in 0..50 {
                opt.zero_grad().unwrap();
                let g = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 1.0 + step as f32 * 0.01])
                    .to_device(dev);
                (p.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
                opt.step().unwrap();
            }
            p.to_kind(Kind::Float)
        };
        let f32_run = run(Kind::Float, true);
        let with_master = run(Kind::BFloat16, true);
        let without = run(Kind::BFloat16, false);
        let start = Tensor::from_slice(&[1.0f32, -0.5, 0.25, 2.0]).to_device(dev);
        // 50 steps of ~1e-4: a total move of ~5e-3, above the bf16 ulp at 1 (7.8e-3 / 2 rounding).
        let diff = (&with_master - f32_run.to_kind(Kind::BFloat16).to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0, "master: {with_master:?} f32: {f32_run:?}");
        assert!(
            (&with_master - &start).abs().max().double_value(&[]) > 0.0,
            "the master run moved"
        );
        assert_eq!(
            without,
            start.to_kind(Kind::BFloat16).to_kind(Kind::Float),
            "1e-4 steps vanish in bf16"
        );
    }

    /// Five steps against torch.optim.AdamW (scripts/train_reference.py):
    /// two groups, one parameter without a gradient for two steps, lr changed.
    #[test]
    fn matches_torch_adamw() {
        let device = device();
        let fx: Value = serde_json::from_str(FIXTURE).unwrap();
        let specs = fx["params"].as_array().unwrap();
        let mut named = Vec::new();
        let mut shapes = Vec::new();
        for p in specs {
            let shape: Vec<i64> = p["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            let t = tensor(&p["init"], &shape, device).set_requires_grad(true);
            named.push((p["name"].as_str().unwrap().to_owned(), t));
            shapes.push(shape);
        }
        let betas = fx["betas"].as_array().unwrap();
        let config = AdamWConfig::new(fx["lr"].as_f64().unwrap())
            .with_betas(betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap())
            .with_eps(fx["eps"].as_f64().unwrap())
            .with_weight_decay(fx["weight_decay"].as_f64().unwrap());
        let mut opt = AdamW::new(
            named
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            config,
        )
        .unwrap();
        for p in specs {
            let name = p["name"].as_str().unwrap();
            let decays = opt.decay_names().contains(&name);
            assert_eq!(decays, p["decay"].as_bool().unwrap(), "{name}");
        }
        let mut worst = 0.0f64;
        for (i, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
            opt.set_lr(step["lr"].as_f64().unwrap()).unwrap();
            opt.zero_grad().unwrap();
            // loss = sum(p * g) gives p.grad == g exactly; a missing g leaves the grad undefined.
            let mut loss = Tensor::zeros([], (Kind::Float, device));
            for ((name, p), shape) in named.iter().zip(&shapes) {
                let g = &step["grads"][name.as_str()];
                if !g.is_null() {
                    loss += (p * tensor(g, shape, device)).sum(Kind::Float);
                }
            }
            loss.backward();
            opt.step().unwrap();
            for ((name, p), shape) in named.iter().zip(&shapes) {
                let expected = tensor(&step["expected"][name.as_str()], shape, device);
                let c = crate::testing::closeness(p, &expected, 1e-6 * slack(), 0.0).unwrap();
                assert!(c.ok, "step {i} {name}: max abs err {:e}", c.max_abs);
                worst = worst.max(c.max_abs);
            }
        }
        assert_eq!(opt.step_count(), 5);
        assert_eq!(opt.param_step("encoder.LayerNorm.weight").unwrap(), 3);
        assert_eq!(opt.param_step("dense.weight").unwrap(), 5);
        eprintln!("AdamW vs torch.optim.AdamW on {device:?}: max abs err {worst:e}");
    }

    #[test]
    fn no_decay_grouping() {
        let names = [
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.0.attention.self.query.bias",
            "encoder.layer.0.output.LayerNorm.weight",
            "h.0.ln_1.weight",
            "ln_f.weight",
            "h.0.mlp.c_fc.weight",
            "vit.encoder.layer.0.layernorm_before.weight",
            "decoder.final_layer_norm.weight",
            "classifier.weight",
        ];
        let params = names.iter().map(|n| param(n, &[2])).collect();
        let opt = AdamW::new(params, AdamWConfig::new(1e-3).with_weight_decay(0.1)).unwrap();
        assert_eq!(
            opt.decay_names(),
            vec![
                "embeddings.word_embeddings.weight",
                "encoder.layer.0.attention.self.query.weight",
                "h.0.mlp.c_fc.weight",
                "classifier.weight",
            ]
        );
        assert_eq!(opt.no_decay_names().len(), 8);
        let groups = opt.groups();
        assert_eq!((groups[0].name(), groups[0].weight_decay()), ("decay", 0.1));
        assert_eq!(
            (groups[1].name(), groups[1].weight_decay()),
            ("no_decay", 0.0)
        );
        assert_eq!(opt.parameters().len(), names.len());

        // Custom patterns replace the defaults.
        let params = names.iter().map(|n| param(n, &[2])).collect();
        let opt = AdamW::new(
            params,
            AdamWConfig::new(1e-3).with_no_decay(&["classifier.*"]),
        )
        .unwrap();
        assert_eq!(opt.no_decay_names(), vec!["classifier.weight"]);
    }

    /// A no-decay parameter with zero gradient stays put; a decayed one shrinks by lr·wd.
    #[test]
    fn decoupled_decay_only_in_decay_group() {
        let dev = device();
        let w = Tensor::ones([3], (Kind::Float, dev)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, dev)).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![
                ("l.weight".into(), w.shallow_clone()),
                ("l.bias".into(), b.shallow_clone()),
            ],
            AdamWConfig::new(0.1).with_weight_decay(0.5),
        )
        .unwrap();
        ((&w + &b).sum(Kind::Float) * 0.0).backward();
        opt.step().unwrap();
        let expect_w = Tensor::full([3], 1.0 - 0.1 * 0.5, (Kind::Float, dev));
        crate::testing::assert_close(&w, &expect_w, 1e-7 * slack(), 0.0);
        crate::testing::assert_close(&b, &Tensor::ones([3], (Kind::Float, dev)), 0.0, 0.0);
    }

    #[test]
    fn skips_undefined_grads() {
        let (n, p) = param("w", &[2]);
        let before = p.copy();
        let mut opt = AdamW::new(vec![(n, p.shallow_clone())], AdamWConfig::default()).unwrap();
        opt.zero_grad().unwrap();
        opt.step().unwrap();
        assert_eq!(opt.step_count(), 1);
        assert_eq!(opt.param_step("w").unwrap(), 0);
        crate::testing::assert_close(&p, &before, 0.0, 0.0);
        assert!(
            opt.param_step("nope")
                .unwrap_err()
                .to_string()
                .contains("no parameter 'nope'")
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let err = |params: Vec<(String, Tensor)>, c: AdamWConfig| {
            AdamW::new(params, c).unwrap_err().to_string()
        };
        assert!(err(vec![], AdamWConfig::default()).contains("no parameters"));
        assert!(err(vec![param("w", &[2])], AdamWConfig::new(-1.0)).contains("learning rate"));
        assert!(err(vec![param("w", &[2])], AdamWConfig::new(f64::NAN)).contains("learning rate"));
        assert!(
            err(
                vec![param("w", &[2])],
                AdamWConfig::default().with_betas(0.9, 1.0)
            )
            .contains("beta2 must be in [0, 1)")
        );
        assert!(
            err(
                vec![param("w", &[2])],
                AdamWConfig::default().with_betas(-0.1, 0.9)
            )
            .contains("beta1")
        );
        assert!(
            err(
                vec![param("w", &[2])],
                AdamWConfig::default().with_eps(-1.0)
            )
            .contains("eps")
        );
        assert!(
            err(
                vec![param("w", &[2])],
                AdamWConfig::default().with_weight_decay(-0.1)
            )
            .contains("weight_decay")
        );
        assert!(
            err(
                vec![param("w", &[2]), param("w", &[3])],
                AdamWConfig::default()
            )
            .contains("given twice")
        );
        let frozen = (
            "f".to_owned(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        );
        assert!(err(vec![frozen], AdamWConfig::default()).contains("does not require grad"));
        let ints = (
            "i".to_owned(),
            Tensor::zeros([2], (Kind::Int64, Device::Cpu)),
        );
        assert!(err(vec![ints], AdamWConfig::default()).contains("floating-point"));

        let mut opt = AdamW::new(vec![param("w", &[2])], AdamWConfig::default()).unwrap();
        assert!(opt.set_lr(-0.5).is_err());
        opt.set_lr(0.5).unwrap();
        assert_eq!((opt.lr(), opt.base_lr()), (0.5, 1e-3));
    }
}
