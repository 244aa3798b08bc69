//! The avg-key gate: routing with no new parameters, steps 3, 4 and 6 of
//! EMoE (Qiu et al. 2023, "Unlocking Emergent Modularity in LLMs";
//! docs/emergent-split.md, Method, part 1); MoEfication (Zhang et al. 2022)
//! selects experts the same way from its `similarity` centres.
//!
//! - **Centroids (step 3)**: `c_e = (1/m) Σ_{i ∈ e} k_i`, the mean of expert
//!   `e`'s *raw* (un-normalised) key rows `k_i` (rows of `W1`; rows of `W_G`
//!   for gated FFNs, where `x · c_e` is the mean of `(x W_Gᵀ)_i` over `e`).
//! - **Scores** ([`SelectSignal`], the spec's `select_signal`, after
//!   `EMoE_LLaMA/moe_models.py`): the mean over `e`'s neurons of a per-neuron
//!   signal, `s_e(x) = (1/m) Σ_{i ∈ e} v_i(x)`:
//!   - `gate` (default): `v = x W_Gᵀ` (gated FFNs) or `x W1ᵀ` (plain), so
//!     `s_e = x · c_e`;
//!   - `up`: `v = x W1ᵀ` (the up projection; the same as `gate` for a plain
//!     FFN), `s_e = x · c_e^{up}`;
//!   - `up_abs`: `v = |x W1ᵀ + b1|`;
//!   - `inter`: `v = h`, the hidden activation (`act(x W_Gᵀ) ⊙ (x W1ᵀ + b1)`,
//!     or `act(x W1ᵀ + b1)`);
//!   - `inter_abs`: `v = |h|`.
//!
//!   The linear signals (`gate`, `up`) come from the centroids alone, plus,
//!   when [`GateConfig::score_bias`] is set, `(1/m) Σ_{i ∈ e} b_i` of the
//!   same projection's bias (off by default, as in the spec). The others need
//!   the dense per-neuron values ([`AvgKeyGate::scores_from_neurons`]).
//! - **Selection (step 4)**: the top-k experts by `s` (computed in f32). In
//!   training, optional noise `σ · N(0, 1)` is added to the scores first
//!   (the Tutel path uses `σ = 1/N`). Weights ([`WeightMode`], the spec's
//!   `weight_mode`): `hard` gives every selected expert weight 1 (the paper's
//!   avg-k, unweighted default); `renorm` the softmax over the selected `k`
//!   scores (EMoE-learn's renormalised weights); `softmax`, an extra,
//!   `softmax(s)_e` over all `N`.
//! - **Refresh (step 6)**: the gate is frozen (no gradient reaches it);
//!   [`AvgKeyGate::refresh`] recomputes the centroids from the current
//!   weights, to call after every optimiser step:
//!   `c_e ← μ c_e + (1 − μ) · mean_{i ∈ e} k_i` with `μ` =
//!   [`GateConfig::gate_refresh_momentum`] (0 in the spec: plain recompute).

use serde::{Deserialize, Deserializer, Serialize};
use tensor_core::TchResultExt;
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result, check_split, check_top_k};

/// How selected experts are weighted (the spec's `weight_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightMode {
    /// Weight 1 for each selected expert (EMoE's default, "avg-k unweighted").
    #[default]
    Hard,
    /// `softmax(s)_e` over all experts, for the selected ones (not in the spec).
    Softmax,
    /// Softmax over the selected experts' scores (weights sum to 1).
    Renorm,
}

/// Which per-neuron signal the expert scores average (the spec's
/// `select_signal`; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectSignal {
    /// `x W_Gᵀ` (gated) or `x W1ᵀ` (plain): the avg-key gate `x · c_e`.
    #[default]
    Gate,
    /// `x W1ᵀ`, the up projection: `x · c_e^{up}`.
    Up,
    /// `|x W1ᵀ + b1|`.
    UpAbs,
    /// The hidden activation `h`.
    Inter,
    /// `|h|`.
    InterAbs,
}

impl SelectSignal {
    /// Scores are `x · c_e` (+ bias means): no dense per-neuron values needed.
    pub fn is_linear(self) -> bool {
        matches!(self, SelectSignal::Gate | SelectSignal::Up)
    }
}

/// How `b2` is kept while split and folded back (the spec's `fold_b2`,
/// docs/emergent-split.md, Method, part 1 steps 5 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoldB2 {
    /// One `b2`, added once per token after the expert sum
    /// (`y = Σ g_e h_e W2_eᵀ + b2`; the same as the Tutel path's `b2/k` per
    /// expert in `hard` mode). Folding keeps `b2` as it is, so folding an
    /// all-experts model is exact.
    #[default]
    Shared,
    /// The Tutel path's bookkeeping: each expert owns a bias `b2_e`
    /// (initialised to `b2/k`, a parameter `expert_bias: [N, d]` of the
    /// `EmoeFfn` instead of `b2`), added with its gate weight,
    /// `y = Σ_{e ∈ top-k} g_e (h_e W2_eᵀ + b2_e)`; folding sets
    /// `b2 = k · mean_e b2_e` (the spec's inferred rule).
    KMean,
}

/// Configuration of the avg-key gate and of the split FFN around it: every
/// open choice of the Method (docs/emergent-split.md, part 1) on routing (`select_signal`,
/// `gate_refresh_momentum`, `weight_mode`, `fold_b2`), JSON-serialisable.
/// In JSON only `num_experts` and `top_k` are required; a missing
/// `noise_std` means the Tutel path's `1/N` (as [`GateConfig::new`]), an
/// explicit `null` no noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "GateConfigJson")]
pub struct GateConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub weight_mode: WeightMode,
    /// Standard deviation of the Gaussian noise added to the scores in
    /// training (`None` or `0`: no noise). Tutel path: `1/N`.
    pub noise_std: Option<f64>,
    /// Add the mean bias of the projection the linear signals use (`b1` for
    /// `up` and for `gate` on a plain FFN) to the scores.
    pub score_bias: bool,
    pub select_signal: SelectSignal,
    /// `μ` in `c_e ← μ c_e + (1 − μ) · mean_{i ∈ e} k_i` at each refresh;
    /// `0` (the spec) recomputes the centroids outright. In `[0, 1]`.
    pub gate_refresh_momentum: f64,
    pub fold_b2: FoldB2,
}

/// [`GateConfig`] as read from JSON: telling an absent `noise_std` (the
/// Tutel default `1/N`) from an explicit `null` (no noise).
#[derive(Deserialize)]
struct GateConfigJson {
    num_experts: usize,
    top_k: usize,
    #[serde(default)]
    weight_mode: WeightMode,
    #[serde(default, deserialize_with = "present")]
    noise_std: Option<Option<f64>>,
    #[serde(default)]
    score_bias: bool,
    #[serde(default)]
    select_signal: SelectSignal,
    #[serde(default)]
    gate_refresh_momentum: f64,
    #[serde(default)]
    fold_b2: FoldB2,
}

/// A field that is present (a value or `null`), as opposed to absent.
fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

impl From<GateConfigJson> for GateConfig {
    fn from(j: GateConfigJson) -> Self {
        let tutel = GateConfig::new(j.num_experts, j.top_k).noise_std;
        Self {
            num_experts: j.num_experts,
            top_k: j.top_k,
            weight_mode: j.weight_mode,
            noise_std: j.noise_std.unwrap_or(tutel),
            score_bias: j.score_bias,
            select_signal: j.select_signal,
            gate_refresh_momentum: j.gate_refresh_momentum,
            fold_b2: j.fold_b2,
        }
    }
}

impl GateConfig {
    /// The Tutel path (BERT, GPT-2, ViT): hard top-k, noise `1/N` in
    /// training, gate signal, no bias term, momentum 0, shared `b2`.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            num_experts,
            top_k,
            weight_mode: WeightMode::Hard,
            noise_std: Some(1.0 / num_experts.max(1) as f64),
            score_bias: false,
            select_signal: SelectSignal::Gate,
            gate_refresh_momentum: 0.0,
            fold_b2: FoldB2::Shared,
        }
    }

    /// The Llama path: hard top-k, no noise.
    pub fn without_noise(num_experts: usize, top_k: usize) -> Self {
        Self {
            noise_std: None,
            ..Self::new(num_experts, top_k)
        }
    }

    /// Parse and validate a JSON object (see the type's docs for the defaults).
    pub fn from_json(s: &str) -> Result<Self> {
        let c: Self =
            serde_json::from_str(s).map_err(|e| Error::config(format!("gate config JSON: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        check_top_k(self.top_k, self.num_experts)?;
        if let Some(s) = self.noise_std
            && !(s.is_finite() && s >= 0.0)
        {
            return Err(Error::config(format!(
                "gate noise_std must be finite and >= 0, got {s}"
            )));
        }
        let mu = self.gate_refresh_momentum;
        if !(0.0..=1.0).contains(&mu) {
            return Err(Error::config(format!(
                "gate_refresh_momentum must be in [0, 1], got {mu}"
            )));
        }
        Ok(())
    }
}
/// Experts chosen per token.
#[derive(Debug)]
pub struct Routing {
    /// `[T, k]` int64 expert ids.
    pub experts: Tensor,
    /// `[T, k]` f32 weights (all ones in `Hard` mode).
    pub weights: Tensor,
    pub mode: WeightMode,
    /// Whether a capacity limit may have dropped assignments (their weights
    /// are 0, also in `Hard` mode).
    pub dropped: bool,
}

impl Routing {
    /// `[T, N]`: each token's weight for each expert (0 when not selected).
    pub fn expert_weights(&self, num_experts: usize) -> Result<Tensor> {
        let t = self.experts.size()[0];
        Ok(Tensor::f_zeros(
            [t, num_experts as i64],
            (Kind::Float, self.experts.device()),
        )?
        .f_scatter(1, &self.experts, &self.weights)?)
    }

    /// `[T, N m]`: the expert weights repeated over each expert's `m`
    /// contiguous neurons (the Llama path's mask, weighted).
    pub fn neuron_mask(&self, num_experts: usize, expert_size: i64) -> Result<Tensor> {
        Ok(self
            .expert_weights(num_experts)?
            .f_repeat_interleave_self_int(expert_size, Some(1), None)?)
    }
}

/// Frozen routing from the mean key of each expert.
#[derive(Debug)]
pub struct AvgKeyGate {
    pub config: GateConfig,
    /// `[N, d_model]` f32, no gradient.
    centroids: Tensor,
    /// `[N]` f32 mean of the keys' bias per expert, when `score_bias` is set.
    bias: Option<Tensor>,
}

impl AvgKeyGate {
    /// `keys: [d_ff, d_model]` raw key rows (of the projection the linear
    /// signal reads), already permuted so that expert `e` owns rows
    /// `e m .. (e+1) m`; `bias: [d_ff]` that projection's bias, same order.
    pub fn new(keys: &Tensor, bias: Option<&Tensor>, config: GateConfig) -> Result<Self> {
        config.validate()?;
        let mut g = Self {
            centroids: Tensor::new(),
            bias: None,
            config,
        };
        g.set(keys, bias, 0.0)?;
        Ok(g)
    }

    /// Recompute the centroids (and bias means) from the current weights:
    /// `c ← μ c + (1 − μ) mean` with `μ = gate_refresh_momentum`.
    pub fn refresh(&mut self, keys: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        self.set(keys, bias, self.config.gate_refresh_momentum)
    }

    fn set(&mut self, keys: &Tensor, bias: Option<&Tensor>, momentum: f64) -> Result<()> {
        let s = keys.size();
        if s.len() != 2 {
            return Err(tensor_core::Error::shape("AvgKeyGate keys", "[d_ff, d_model]", s).into());
        }
        let n = self.config.num_experts as i64;
        let m = check_split(s[0], self.config.num_experts)?;
        let blend = |old: Option<&Tensor>, new: Tensor| -> Result<Tensor> {
            match old {
                Some(o) if momentum > 0.0 && o.defined() && o.size() == new.size() => Ok(o
                    .f_mul_scalar(momentum)?
                    .f_add(&new.f_mul_scalar(1.0 - momentum)?)?),
                _ => Ok(new),
            }
        };
        let c = tensor_core::tch::no_grad(|| {
            keys.f_detach()?
                .f_to_kind(Kind::Float)?
                .f_view([n, m, s[1]])?
                .f_mean_dim([1i64].as_slice(), false, Kind::Float)
        })
        .op("AvgKeyGate centroids")?;
        let c = blend(Some(&self.centroids), c)?;
        let b = match (self.config.score_bias, bias) {
            (true, Some(b)) => {
                if b.size() != [s[0]] {
                    return Err(tensor_core::Error::shape(
                        "AvgKeyGate bias",
                        format!("[{}]", s[0]),
                        b.size(),
                    )
                    .into());
                }
                let mean = b
                    .f_detach()?
                    .f_to_kind(Kind::Float)?
                    .f_view([n, m])?
                    .f_mean_dim([1i64].as_slice(), false, Kind::Float)?;
                Some(blend(self.bias.as_ref(), mean)?)
            }
            _ => None,
        };
        self.centroids = c;
        self.bias = b;
        Ok(())
    }

    /// `[N, d_model]`
    pub fn centroids(&self) -> &Tensor {
        &self.centroids
    }

    /// Linear signals: `s = x cᵀ (+ mean bias)`: `[T, d_model] -> [T, N]`,
    /// f32; differentiable in `x`, no gradient to the gate.
    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.centroids.size()[1];
        let xs = x.size();
        if xs.len() != 2 || xs[1] != d {
            return Err(
                tensor_core::Error::shape("AvgKeyGate", format!("[tokens, {d}]"), xs).into(),
            );
        }
        let mut s = x
            .f_to_kind(Kind::Float)?
            .f_matmul(&self.centroids.f_transpose(0, 1)?)?;
        if let Some(b) = &self.bias {
            s = s.f_add(&b.f_unsqueeze(0)?)?;
        }
        Ok(s)
    }

    /// Any signal from its dense per-neuron values `v: [T, N m]` (neurons in
    /// expert-block order): `s_e = mean_{i ∈ e} v_i`, `[T, N]` f32.
    pub fn scores_from_neurons(&self, values: &Tensor) -> Result<Tensor> {
        let n = self.config.num_experts as i64;
        let vs = values.size();
        if vs.len() != 2 || vs[1] % n != 0 {
            return Err(tensor_core::Error::shape(
                "AvgKeyGate::scores_from_neurons",
                format!("[tokens, {n} m]"),
                vs,
            )
            .into());
        }
        Ok(values
            .f_to_kind(Kind::Float)?
            .f_view([vs[0], n, vs[1] / n])?
            .f_mean_dim([2i64].as_slice(), false, Kind::Float)?)
    }

    /// Select the top-k experts of each token from the linear signal's
    /// scores; `train` turns the noise on.
    pub fn route(&self, x: &Tensor, train: bool) -> Result<Routing> {
        self.route_scores(self.scores(x)?, train)
    }

    /// Select the top-k experts of each token from given scores `[T, N]`.
    pub fn route_scores(&self, scores: Tensor, train: bool) -> Result<Routing> {
        let mut s = scores.f_to_kind(Kind::Float)?;
        if train
            && let Some(std) = self.config.noise_std
            && std > 0.0
        {
            s = s.f_add(&s.f_randn_like()?.f_mul_scalar(std)?.f_detach()?)?;
        }
        let k = self.config.top_k as i64;
        let (top, experts) = s.f_topk(k, -1, true, true)?;
        let weights = match self.config.weight_mode {
            WeightMode::Hard => top.f_ones_like()?,
            WeightMode::Softmax => s.f_softmax(-1, Kind::Float)?.f_gather(1, &experts, false)?,
            WeightMode::Renorm => top.f_softmax(-1, Kind::Float)?,
        };
        Ok(Routing {
            experts,
            weights,
            mode: self.config.weight_mode,
            dropped: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_core::DType;
    use tensor_core::testing::{assert_close, device, randn_seeded, tolerances, with_seed};

    /// `(atol, rtol)`: the CPU bounds for a result compared with one computed
    /// another way, loosened on the test device as [`tolerances`] loosens
    /// f32 there.
    fn tol(atol: f64, rtol: f64) -> (f64, f64) {
        let k = tolerances(DType::F32, device()).0 / DType::F32.tolerances().0;
        (atol * k, rtol * k)
    }

    #[track_caller]
    fn close(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
        let (atol, rtol) = tol(atol, rtol);
        assert_close(actual, expected, atol, rtol);
    }

    fn keys() -> Tensor {
        randn_seeded(&[24, 8], 1, device()).unwrap()
    }

    #[test]
    fn centroids_are_mean_raw_rows_and_scores_are_dot_products() {
        let k = keys();
        let g = AvgKeyGate::new(&k, None, GateConfig::without_noise(4, 2)).unwrap();
        for e in 0..4 {
            let mean = k.narrow(0, e * 6, 6).mean_dim(0, false, Kind::Float);
            close(&g.centroids().get(e), &mean, 1e-6, 0.0);
        }
        let x = randn_seeded(&[5, 8], 2, device()).unwrap();
        let s = g.scores(&x).unwrap();
        // Gated reading: x·c_e = mean over e's neurons of (x Kᵀ)_i.
        let pre = x
            .matmul(&k.tr())
            .view([5, 4, 6])
            .mean_dim(2, false, Kind::Float);
        close(&s, &pre, 1e-5, 1e-5);
        // Top-k picks the k largest scores, weight 1.
        let r = g.route(&x, true).unwrap();
        let (_, want) = s.topk(2, -1, true, true);
        assert_eq!(
            Vec::<i64>::try_from(r.experts.reshape([-1])).unwrap(),
            Vec::<i64>::try_from(want.reshape([-1])).unwrap()
        );
        close(
            &r.weights,
            &Tensor::ones([5, 2], (Kind::Float, device())),
            0.0,
            0.0,
        );
        let mask = r.neuron_mask(4, 6).unwrap();
        assert_eq!(mask.size(), [5, 24]);
        assert_eq!(mask.sum(Kind::Float).double_value(&[]), 5.0 * 2.0 * 6.0);
    }

    #[test]
    fn bias_term_weight_modes_and_noise() {
        let k = keys();
        let b1 = randn_seeded(&[24], 3, device()).unwrap();
        let cfg = GateConfig {
            score_bias: true,
            ..GateConfig::without_noise(4, 3)
        };
        let g = AvgKeyGate::new(&k, Some(&b1), cfg).unwrap();
        let x = randn_seeded(&[7, 8], 4, device()).unwrap();
        let pre = x
            .matmul(&k.tr())
            .f_add(&b1)
            .unwrap()
            .view([7, 4, 6])
            .mean_dim(2, false, Kind::Float);
        close(&g.scores(&x).unwrap(), &pre, 1e-5, 1e-5);

        let soft = AvgKeyGate::new(
            &k,
            None,
            GateConfig {
                weight_mode: WeightMode::Softmax,
                ..GateConfig::without_noise(4, 4)
            },
        )
        .unwrap();
        let w = soft
            .route(&x, false)
            .unwrap()
            .weights
            .sum_dim_intlist(1, false, Kind::Float);
        close(&w, &Tensor::ones([7], (Kind::Float, device())), 1e-6, 0.0);
        let renorm = AvgKeyGate::new(
            &k,
            None,
            GateConfig {
                weight_mode: WeightMode::Renorm,
                ..GateConfig::without_noise(4, 2)
            },
        )
        .unwrap();
        let w = renorm
            .route(&x, false)
            .unwrap()
            .weights
            .sum_dim_intlist(1, false, Kind::Float);
        close(&w, &Tensor::ones([7], (Kind::Float, device())), 1e-6, 0.0);

        // Noise only in training, seeded through libtorch's generator.
        let noisy = AvgKeyGate::new(
            &k,
            None,
            GateConfig {
                noise_std: Some(100.0),
                ..GateConfig::new(4, 1)
            },
        )
        .unwrap();
        let x = randn_seeded(&[64, 8], 5, device()).unwrap();
        let ev = noisy.route(&x, false).unwrap().experts;
        assert!(ev.equal(&noisy.route(&x, false).unwrap().experts));
        let t1 = with_seed(1, || noisy.route(&x, true).unwrap().experts);
        let t2 = with_seed(1, || noisy.route(&x, true).unwrap().experts);
        assert!(t1.equal(&t2));
        assert!(
            !t1.equal(&ev),
            "noise of std 100 should change some selections"
        );
    }

    #[test]
    fn refresh_follows_weights_and_gate_gets_no_gradient() {
        let k = keys().set_requires_grad(true);
        let mut g = AvgKeyGate::new(&k, None, GateConfig::new(4, 2)).unwrap();
        assert!(!g.centroids().requires_grad());
        let k2 = k.detach().f_mul_scalar(2.0).unwrap();
        g.refresh(&k2, None).unwrap();
        let mean = k2.view([4, 6, 8]).mean_dim(1, false, Kind::Float);
        close(g.centroids(), &mean, 1e-6, 0.0);
        // Scores are differentiable in x but never reach the keys.
        let g = AvgKeyGate::new(&k, None, GateConfig::new(4, 2)).unwrap();
        let x = randn_seeded(&[3, 8], 6, device())
            .unwrap()
            .set_requires_grad(true);
        g.scores(&x).unwrap().sum(Kind::Float).backward();
        assert!(x.grad().defined());
        assert!(!k.grad().defined());
    }

    #[test]
    fn refresh_momentum_blends_old_and_new_centroids() {
        let k1 = keys();
        let b1 = randn_seeded(&[24], 7, device()).unwrap();
        let cfg = GateConfig {
            gate_refresh_momentum: 0.25,
            score_bias: true,
            ..GateConfig::without_noise(4, 2)
        };
        let mut g = AvgKeyGate::new(&k1, Some(&b1), cfg).unwrap();
        // Construction takes the means outright, whatever the momentum.
        let mean = |k: &Tensor| k.view([4, 6, 8]).mean_dim(1, false, Kind::Float);
        close(g.centroids(), &mean(&k1), 1e-6, 0.0);
        let k2 = randn_seeded(&[24, 8], 8, device()).unwrap();
        let b2 = randn_seeded(&[24], 9, device()).unwrap();
        g.refresh(&k2, Some(&b2)).unwrap();
        let want = mean(&k1) * 0.25 + mean(&k2) * 0.75;
        close(g.centroids(), &want, 1e-6, 1e-6);
        // The bias means blend the same way: check through the scores.
        let x = randn_seeded(&[3, 8], 10, device()).unwrap();
        let bmean = |b: &Tensor| b.view([4, 6]).mean_dim(1, false, Kind::Float);
        let want_s = x.matmul(&want.tr()) + (bmean(&b1) * 0.25 + bmean(&b2) * 0.75).unsqueeze(0);
        close(&g.scores(&x).unwrap(), &want_s, 1e-5, 1e-5);
        // Momentum 0 (the spec) is a plain recompute; 1 freezes the gate.
        let mut g0 = AvgKeyGate::new(&k1, None, GateConfig::without_noise(4, 2)).unwrap();
        g0.refresh(&k2, None).unwrap();
        close(g0.centroids(), &mean(&k2), 1e-6, 0.0);
        let mut g1 = AvgKeyGate::new(
            &k1,
            None,
            GateConfig {
                gate_refresh_momentum: 1.0,
                ..GateConfig::without_noise(4, 2)
            },
        )
        .unwrap();
        g1.refresh(&k2, None).unwrap();
        close(g1.centroids(), &mean(&k1), 1e-6, 0.0);
    }

    #[test]
    fn scores_from_neurons_average_each_block() {
        let g = AvgKeyGate::new(&keys(), None, GateConfig::without_noise(4, 1)).unwrap();
        let v = randn_seeded(&[5, 24], 11, device()).unwrap();
        let s = g.scores_from_neurons(&v).unwrap();
        close(
            &s,
            &v.view([5, 4, 6]).mean_dim(2, false, Kind::Float),
            1e-6,
            0.0,
        );
        // The linear signal is the same average of x Kᵀ.
        let x = randn_seeded(&[5, 8], 12, device()).unwrap();
        let lin = g.scores_from_neurons(&x.matmul(&keys().tr())).unwrap();
        close(&g.scores(&x).unwrap(), &lin, 1e-5, 1e-5);
        let r = g.route_scores(s.shallow_clone(), false).unwrap();
        assert!(r.experts.equal(&s.argmax(-1, true)));
        assert!(
            g.scores_from_neurons(&Tensor::zeros([5, 23], (Kind::Float, device())))
                .is_err()
        );
    }

    #[test]
    fn config_json_names_and_defaults() {
        let c = GateConfig::from_json(r#"{"num_experts": 16, "top_k": 4}"#).unwrap();
        assert_eq!(c, GateConfig::new(16, 4));
        assert_eq!(c.noise_std, Some(1.0 / 16.0));
        assert_eq!(
            (
                c.select_signal,
                c.weight_mode,
                c.fold_b2,
                c.gate_refresh_momentum
            ),
            (SelectSignal::Gate, WeightMode::Hard, FoldB2::Shared, 0.0)
        );
        let j = r#"{"num_experts": 8, "top_k": 2, "noise_std": null, "select_signal": "inter_abs",
                    "weight_mode": "renorm", "fold_b2": "k_mean", "gate_refresh_momentum": 0.5}"#;
        let c = GateConfig::from_json(j).unwrap();
        assert_eq!(c.noise_std, None);
        assert_eq!(c.select_signal, SelectSignal::InterAbs);
        assert_eq!(c.weight_mode, WeightMode::Renorm);
        assert_eq!(c.fold_b2, FoldB2::KMean);
        let back = GateConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        for (v, name) in [
            (SelectSignal::Gate, "gate"),
            (SelectSignal::Up, "up"),
            (SelectSignal::UpAbs, "up_abs"),
            (SelectSignal::Inter, "inter"),
            (SelectSignal::InterAbs, "inter_abs"),
        ] {
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
        }
        assert_eq!(
            serde_json::to_string(&WeightMode::Hard).unwrap(),
            r#""hard""#
        );
        assert_eq!(
            serde_json::to_string(&FoldB2::Shared).unwrap(),
            r#""shared""#
        );
        assert!(
            GateConfig::from_json(r#"{"num_experts": 8, "top_k": 2, "select_signal": "down"}"#)
                .is_err()
        );
        assert!(GateConfig::from_json(r#"{"num_experts": 8, "top_k": 9}"#).is_err());
        assert!(
            GateConfig::from_json(
                r#"{"num_experts": 8, "top_k": 2, "gate_refresh_momentum": 1.5}"#
            )
            .is_err()
        );
    }

    #[test]
    fn bad_config_is_an_error() {
        let k = keys();
        assert!(AvgKeyGate::new(&k, None, GateConfig::new(4, 0)).is_err());
        assert!(AvgKeyGate::new(&k, None, GateConfig::new(4, 5)).is_err());
        assert!(AvgKeyGate::new(&k, None, GateConfig::new(5, 1)).is_err());
        assert!(
            AvgKeyGate::new(
                &k,
                None,
                GateConfig {
                    noise_std: Some(f64::NAN),
                    ..GateConfig::new(4, 1)
                }
            )
            .is_err()
        );
        let g = AvgKeyGate::new(&k, None, GateConfig::new(4, 1)).unwrap();
        assert!(
            g.scores(&Tensor::zeros([2, 7], (Kind::Float, device())))
                .is_err()
        );
    }
}
