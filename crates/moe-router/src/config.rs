//! The router's configuration: every open choice of docs/moe-router.md, Method, part 1, as a
//! JSON-serialisable field with the spec's default (Switch, arXiv 2101.03961;
//! ST-MoE, arXiv 2202.08906; Expert Choice, arXiv 2202.09368; noisy top-k,
//! arXiv 1701.06538; ModuleFormer, arXiv 2306.04640).
//!
//! The equations the fields select are in [`crate::router`] (steps 1–7),
//! [`crate::capacity`] (step 6) and [`crate::losses`] (step 9). In short:
//!
//! - logits `ℓ = gate(x ⊙ u)`, `u ~ U(1−ε, 1+ε)` in training when `jitter`;
//! - noisy logits `ℓ + (σ_n/E)·N(0,1)` (Tutel) or `ℓ + Gumbel(0,1)` in training;
//! - `p = softmax(ℓ)` (or `σ(ℓ)`, row-normalised for the losses);
//! - top-k of `p`, `sample_topk = s` of them sampled in training;
//! - weights `raw` (`g = p`), `renorm` (`p / Σ_chosen p`), `pnorm`
//!   (`p / ‖p_chosen‖_q`), `hard` (`g = 1`);
//! - capacity `C` by `capacity_rule`; `capacity_factor = 0` is dropless.
//!
//! Defaults that the spec states: capacity factor 1.0, jitter ε 0.01, Tutel
//! σ_n 1.0, MLP gate hidden 256, balance weight 1e-2 (Switch), z-loss weight
//! 1e-3, expert-choice c = 2, DeepSpeed minimum capacity 8. Where the spec
//! names several values without a default (`balance_variant`, `cv_var`,
//! `weight_mode`), the default is stated on the field.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_top_k};

/// Step 2: how logits are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateType {
    /// `ℓ = x W_gᵀ`, no bias.
    #[default]
    Linear,
    /// `ℓ = W_2 Dropout(GELU(W_1 x + b_1))`, `mlp_hidden` units, no bias on `W_2` (ModuleFormer).
    Mlp,
    /// `ℓ_e = cos(x Pᵀ, c_e) · exp(τ)`, `P: d → cosine_dim`, `τ` learned and clamped at `ln 100`.
    Cosine,
    /// Fixed: expert `h(id) mod E` from a seeded universal hash of the token id
    /// (Hash Layers); the `k` experts are `h, h+1, ..., h+k−1 (mod E)`.
    Hash,
    /// Fixed: expert `id mod E` (domain or task id routing); `k` consecutive experts.
    Fixed,
}

/// Step 4: the score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFn {
    /// `p = softmax(ℓ)`.
    #[default]
    Softmax,
    /// `s = σ(ℓ)` per expert; the losses use `s / Σ_e s`.
    Sigmoid,
}

/// Step 3: training-only noise on the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Noise {
    #[default]
    None,
    /// `ℓ + (σ_n / E) · N(0, 1)` (Tutel; `noise_std` = σ_n).
    Gaussian,
    /// `ℓ + G`, `G = −log(−log U)`, `U ~ U(0, 1)`.
    Gumbel,
}

/// Step 5: gate weights of the chosen experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightMode {
    /// `g = p` (ModuleFormer).
    Raw,
    /// `g = p / Σ_chosen p`: the softmax over the chosen logits (Mixtral, default).
    #[default]
    Renorm,
    /// `g = p / ‖p_chosen‖_q` with `q = pnorm_p` (MegaBlocks).
    Pnorm,
    /// `g = 1` (EMoE).
    Hard,
}

/// Token choice (steps 4–6) or expert choice (step 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoutingMode {
    #[default]
    TokenChoice,
    /// Each expert takes its top `⌈T c / E⌉` tokens of `S = softmax(ℓ)`,
    /// `c = expert_choice_capacity` (opt-in, DeepSpeed #2517).
    ExpertChoice,
}

/// Step 6: the capacity formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CapacityRule {
    /// `max(⌈cf · k · T / E⌉, min_capacity)`, with `eval_capacity_factor` at eval.
    #[default]
    Deepspeed,
    /// `k · ⌈T / E⌉` in training (`2⌈T/E⌉` for top-2), `⌈0.25 T⌉` at eval.
    Fairseq,
    /// `⌈cf · k · T / E⌉` (world size 1).
    Megablocks,
}

/// Step 6: which assignments get an expert's slots first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// GShard order: all first choices in token order, then all second choices, ...
    #[default]
    Position,
    /// Descending routing probability `p_te` of the assignment (batch-prioritised routing).
    Priority,
}

/// Step 9: the balance-loss variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalanceVariant {
    /// `E Σ_e f_e P_e`, `f_e` = fraction of tokens whose first choice is `e`.
    SwitchTop1,
    /// `(E²/k) mean_e f_e P_e`, `f_e` counting all `k` picks (default: it is
    /// defined for every `k` and equals `switch_top1` at `k = 1`).
    #[default]
    DeepspeedTopk,
    /// `E/(L T k) Σ_e n_e P_e` (`L = num_layers`).
    Megablocks,
}

/// Step 9: how `Load_e` of the CV² loss is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadEstimator {
    /// Token counts (no gradient).
    #[default]
    Count,
    /// Shazeer et al.'s smooth estimate `Σ_t Φ((ℓ_te − θ_te) / σ)`; needs `noise = gaussian`
    /// (falls back to counts when no noise was drawn, e.g. at eval).
    Smooth,
}

/// Step 9: the variance in `CV² = Var / Mean²`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CvVariance {
    Biased,
    /// `Σ (x − x̄)² / (E − 1)` (default, as `torch.var` in Shazeer's code).
    #[default]
    Unbiased,
}

/// Everything a [`crate::router::Router`] needs. `serde(default)`: a JSON
/// object may name only the fields it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub gate: GateType,
    /// Hidden units of the `mlp` gate (256).
    pub mlp_hidden: i64,
    /// Dropout inside the `mlp` gate, training only (0).
    pub gate_dropout: f64,
    /// Projection width of the `cosine` gate (256).
    pub cosine_dim: i64,
    pub score: ScoreFn,
    /// Multiplicative jitter `x ⊙ U(1−ε, 1+ε)`, training only (off).
    pub jitter: bool,
    /// ε (0.01).
    pub jitter_eps: f64,
    pub noise: Noise,
    /// σ_n of the Gaussian noise; the added noise has std `σ_n / E` (1.0).
    pub noise_std: f64,
    /// `s`: in training the last `s` of the `k` experts are sampled from `p + 1e-6` (0).
    pub sample_topk: usize,
    pub weight_mode: WeightMode,
    /// `q` of `pnorm` weights (1.0).
    pub pnorm_p: f64,
    pub routing: RoutingMode,
    /// Expert choice `c` (2.0).
    pub expert_choice_capacity: f64,
    /// `cf`; 0 means dropless (1.0).
    pub capacity_factor: f64,
    /// `cf` at evaluation; `None` = `capacity_factor`.
    pub eval_capacity_factor: Option<f64>,
    pub capacity_rule: CapacityRule,
    /// DeepSpeed's minimum capacity (8).
    pub min_capacity: i64,
    pub drop_policy: DropPolicy,
    /// Renormalise a token's gates over its kept assignments after drops (false).
    pub renorm_after_drop: bool,
    pub balance_variant: BalanceVariant,
    pub load_estimator: LoadEstimator,
    pub cv_var: CvVariance,
    /// Weight of the balance loss (1e-2, Switch; HF Switch 1e-3, MegaBlocks 0.1).
    pub balance_weight: f64,
    /// Weight of the z-loss (1e-3).
    pub z_loss_weight: f64,
    /// Weight of the importance/load CV² loss (0; EMoE/Tutel use 0.01 instead of the balance loss).
    pub cv_weight: f64,
    /// Weight of ModuleFormer's mutual-information loss (0, the released weight).
    pub mi_weight: f64,
    /// Accumulate the MI statistics across calls in the context instead of
    /// adding a loss per call (`acc_aux_loss`); see [`crate::losses::flush_mi_losses`].
    pub mi_accumulate: bool,
    /// Weight of the load-concentration loss `H(e)` (0; fine-tuning before pruning).
    pub concentration_weight: f64,
    /// `L` of the MegaBlocks balance loss (1).
    pub num_layers: usize,
    /// Seed of the `hash` gate's hash function (0). Learned router weights,
    /// and rows added by `Router::grow`, come from libtorch's generator:
    /// seed those with `tensor_core::seed::with_seed`.
    pub seed: u64,
    /// Take the layers' token mask from `ctx.attention_mask`: padding tokens
    /// are not dispatched and count in no loss or statistic (true).
    pub mask_padding: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            num_experts: 8,
            top_k: 2,
            gate: GateType::Linear,
            mlp_hidden: 256,
            gate_dropout: 0.0,
            cosine_dim: 256,
            score: ScoreFn::Softmax,
            jitter: false,
            jitter_eps: 0.01,
            noise: Noise::None,
            noise_std: 1.0,
            sample_topk: 0,
            weight_mode: WeightMode::Renorm,
            pnorm_p: 1.0,
            routing: RoutingMode::TokenChoice,
            expert_choice_capacity: 2.0,
            capacity_factor: 1.0,
            eval_capacity_factor: None,
            capacity_rule: CapacityRule::Deepspeed,
            min_capacity: 8,
            drop_policy: DropPolicy::Position,
            renorm_after_drop: false,
            balance_variant: BalanceVariant::DeepspeedTopk,
            load_estimator: LoadEstimator::Count,
            cv_var: CvVariance::Unbiased,
            balance_weight: 1e-2,
            z_loss_weight: 1e-3,
            cv_weight: 0.0,
            mi_weight: 0.0,
            mi_accumulate: false,
            concentration_weight: 0.0,
            num_layers: 1,
            seed: 0,
            mask_padding: true,
        }
    }
}

impl RouterConfig {
    /// Defaults with `E` experts and top-`k`.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            num_experts,
            top_k,
            ..Self::default()
        }
    }

    /// ModuleFormer's router: `mlp` gate, `raw` weights, dropless, the MI
    /// loss (released weight 0) and no other auxiliary loss.
    pub fn moduleformer(num_experts: usize, top_k: usize) -> Self {
        Self {
            gate: GateType::Mlp,
            weight_mode: WeightMode::Raw,
            capacity_factor: 0.0,
            balance_weight: 0.0,
            z_loss_weight: 0.0,
            mi_weight: 0.0,
            ..Self::new(num_experts, top_k)
        }
    }

    /// Dropless (`capacity_factor = 0`).
    pub fn dropless(mut self) -> Self {
        self.capacity_factor = 0.0;
        self.eval_capacity_factor = None;
        self
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::config(format!("RouterConfig: {e}")))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self =
            serde_json::from_str(text).map_err(|e| Error::config(format!("RouterConfig: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// The capacity factor in force (`None` = dropless).
    pub fn capacity_factor_for(&self, train: bool) -> Option<f64> {
        let cf = if train {
            self.capacity_factor
        } else {
            self.eval_capacity_factor.unwrap_or(self.capacity_factor)
        };
        (cf > 0.0).then_some(cf)
    }

    pub fn validate(&self) -> Result<()> {
        check_top_k(self.top_k, self.num_experts)?;
        let finite_nonneg = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(format!(
                    "{name} = {v} must be finite and >= 0"
                )))
            }
        };
        for (name, v) in [
            ("gate_dropout", self.gate_dropout),
            ("jitter_eps", self.jitter_eps),
            ("noise_std", self.noise_std),
            ("capacity_factor", self.capacity_factor),
            ("expert_choice_capacity", self.expert_choice_capacity),
            ("balance_weight", self.balance_weight),
            ("z_loss_weight", self.z_loss_weight),
            ("cv_weight", self.cv_weight),
            ("mi_weight", self.mi_weight),
            ("concentration_weight", self.concentration_weight),
        ] {
            finite_nonneg(name, v)?;
        }
        if let Some(cf) = self.eval_capacity_factor {
            finite_nonneg("eval_capacity_factor", cf)?;
        }
        if self.gate_dropout >= 1.0 {
            return Err(Error::config("gate_dropout must be < 1"));
        }
        if self.jitter_eps >= 1.0 {
            return Err(Error::config("jitter_eps must be < 1"));
        }
        if !(self.pnorm_p.is_finite() && self.pnorm_p > 0.0) {
            return Err(Error::config(format!(
                "pnorm_p = {} must be finite and > 0",
                self.pnorm_p
            )));
        }
        if self.sample_topk > self.top_k {
            return Err(Error::config(format!(
                "sample_topk = {} must not exceed top_k = {}",
                self.sample_topk, self.top_k
            )));
        }
        if self.gate == GateType::Mlp && self.mlp_hidden <= 0 {
            return Err(Error::config("mlp_hidden must be positive"));
        }
        if self.gate == GateType::Cosine && self.cosine_dim <= 0 {
            return Err(Error::config("cosine_dim must be positive"));
        }
        if self.min_capacity < 0 {
            return Err(Error::config("min_capacity must be >= 0"));
        }
        if self.routing == RoutingMode::ExpertChoice && self.expert_choice_capacity <= 0.0 {
            return Err(Error::config("expert_choice_capacity must be > 0"));
        }
        if self.num_layers == 0 {
            return Err(Error::config("num_layers must be >= 1"));
        }
        if self.load_estimator == LoadEstimator::Smooth && self.top_k >= self.num_experts {
            return Err(Error::config(
                "load_estimator = smooth needs top_k < num_experts (it reads the (k+1)-th logit)",
            ));
        }
        Ok(())
    }
}
