//! The avg-key gate: routing with no new parameters, steps 3, 4 and 6 of
//! EMoE (Qiu et al. 2023, "Emergent Modularity in Pre-trained Transformers",
//! §3.1 of METHODS.md); MoEfication (Zhang et al. 2022) selects experts the
//! same way from its `similarity` centres.
//!
//! - **Centroids (step 3)**: `c_e = (1/m) Σ_{i ∈ e} k_i`, the mean of expert
//!   `e`'s *raw* (un-normalised) key rows `k_i` (rows of `W1`; rows of `W_G`
//!   for gated FFNs, where `x · c_e` is the mean of `(x W_Gᵀ)_i` over `e`).
//! - **Scores**: `s_e(x) = x · c_e`, plus, when [`GateConfig::score_bias`]
//!   is set, `(1/m) Σ_{i ∈ e} b1_i` (so that `s_e` is the mean
//!   pre-activation of `e`'s neurons; off by default, as in the spec).
//! - **Selection (step 4)**: the top-k experts by `s` (computed in f32). In
//!   training, optional noise `σ · N(0, 1)` is added to the logits first
//!   (the Tutel path uses `σ = 1/N`). Weights ([`WeightMode`]): `Hard` gives
//!   every selected expert weight 1 (the paper's avg-k, unweighted default);
//!   `Softmax` gives it `softmax(s)_e` over all `N`; `Renorm` the softmax over
//!   the selected `k`.
//! - **Refresh (step 6)**: the gate is frozen (no gradient reaches it);
//!   [`AvgKeyGate::refresh`] recomputes the centroids from the current
//!   weights, to call after every optimiser step (momentum 0).

use tensor_core::TchResultExt;
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result, check_split, check_top_k};

/// How selected experts are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// Weight 1 for each selected expert (EMoE's default, "avg-k unweighted").
    #[default]
    Hard,
    /// `softmax(s)_e` over all experts, for the selected ones.
    Softmax,
    /// Softmax over the selected experts' scores (weights sum to 1).
    Renorm,
}

/// Configuration of the avg-key gate.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub weight_mode: WeightMode,
    /// Standard deviation of the Gaussian noise added to the scores in
    /// training (`None` or `0`: no noise). Tutel path: `1/N`.
    pub noise_std: Option<f64>,
    /// Add the mean of `b1` over the expert's neurons to its score.
    pub score_bias: bool,
}

impl GateConfig {
    /// The Tutel path (BERT, GPT-2, ViT): hard top-k, noise `1/N` in training, no bias term.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            num_experts,
            top_k,
            weight_mode: WeightMode::Hard,
            noise_std: Some(1.0 / num_experts.max(1) as f64),
            score_bias: false,
        }
    }

    /// The Llama path: hard top-k, no noise.
    pub fn without_noise(num_experts: usize, top_k: usize) -> Self {
        Self {
            noise_std: None,
            ..Self::new(num_experts, top_k)
        }
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
    /// `[N]` f32 mean of `b1` per expert, when `score_bias` is set.
    bias: Option<Tensor>,
}

impl AvgKeyGate {
    /// `keys: [d_ff, d_model]` raw key rows, already permuted so that expert
    /// `e` owns rows `e m .. (e+1) m`; `b1: [d_ff]` in the same order.
    pub fn new(keys: &Tensor, b1: Option<&Tensor>, config: GateConfig) -> Result<Self> {
        config.validate()?;
        let mut g = Self {
            centroids: Tensor::new(),
            bias: None,
            config,
        };
        g.refresh(keys, b1)?;
        Ok(g)
    }

    /// Recompute the centroids (and bias means) from the current weights.
    pub fn refresh(&mut self, keys: &Tensor, b1: Option<&Tensor>) -> Result<()> {
        let s = keys.size();
        if s.len() != 2 {
            return Err(tensor_core::Error::shape("AvgKeyGate keys", "[d_ff, d_model]", s).into());
        }
        let n = self.config.num_experts as i64;
        let m = check_split(s[0], self.config.num_experts)?;
        let c = tensor_core::tch::no_grad(|| {
            keys.f_detach()?
                .f_to_kind(Kind::Float)?
                .f_view([n, m, s[1]])?
                .f_mean_dim([1i64].as_slice(), false, Kind::Float)
        })
        .op("AvgKeyGate centroids")?;
        let bias = match (self.config.score_bias, b1) {
            (true, Some(b)) => {
                if b.size() != [s[0]] {
                    return Err(tensor_core::Error::shape(
                        "AvgKeyGate b1",
                        format!("[{}]", s[0]),
                        b.size(),
                    )
                    .into());
                }
                Some(
                    b.f_detach()?
                        .f_to_kind(Kind::Float)?
                        .f_view([n, m])?
                        .f_mean_dim([1i64].as_slice(), false, Kind::Float)?,
                )
            }
            _ => None,
        };
        self.centroids = c;
        self.bias = bias;
        Ok(())
    }

    /// `[N, d_model]`
    pub fn centroids(&self) -> &Tensor {
        &self.centroids
    }

    /// `s = x cᵀ (+ mean b1)`: `[T, d_model] -> [T, N]`, f32, no gradient to the gate.
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

    /// Select the top-k experts of each token; `train` turns the noise on.
    pub fn route(&self, x: &Tensor, train: bool) -> Result<Routing> {
        let mut s = self.scores(x)?;
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_core::tch::Device;
    use tensor_core::testing::{assert_close, randn_seeded, with_seed};

    fn keys() -> Tensor {
        randn_seeded(&[24, 8], 1, Device::Cpu).unwrap()
    }

    #[test]
    fn centroids_are_mean_raw_rows_and_scores_are_dot_products() {
        let k = keys();
        let g = AvgKeyGate::new(&k, None, GateConfig::without_noise(4, 2)).unwrap();
        for e in 0..4 {
            let mean = k.narrow(0, e * 6, 6).mean_dim(0, false, Kind::Float);
            assert_close(&g.centroids().get(e), &mean, 1e-6, 0.0);
        }
        let x = randn_seeded(&[5, 8], 2, Device::Cpu).unwrap();
        let s = g.scores(&x).unwrap();
        // Gated reading: x·c_e = mean over e's neurons of (x Kᵀ)_i.
        let pre = x
            .matmul(&k.tr())
            .view([5, 4, 6])
            .mean_dim(2, false, Kind::Float);
        assert_close(&s, &pre, 1e-5, 1e-5);
        // Top-k picks the k largest scores, weight 1.
        let r = g.route(&x, true).unwrap();
        let (_, want) = s.topk(2, -1, true, true);
        assert_eq!(
            Vec::<i64>::try_from(r.experts.reshape([-1])).unwrap(),
            Vec::<i64>::try_from(want.reshape([-1])).unwrap()
        );
        assert_close(
            &r.weights,
            &Tensor::ones([5, 2], (Kind::Float, Device::Cpu)),
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
        let b1 = randn_seeded(&[24], 3, Device::Cpu).unwrap();
        let cfg = GateConfig {
            score_bias: true,
            ..GateConfig::without_noise(4, 3)
        };
        let g = AvgKeyGate::new(&k, Some(&b1), cfg).unwrap();
        let x = randn_seeded(&[7, 8], 4, Device::Cpu).unwrap();
        let pre = x
            .matmul(&k.tr())
            .f_add(&b1)
            .unwrap()
            .view([7, 4, 6])
            .mean_dim(2, false, Kind::Float);
        assert_close(&g.scores(&x).unwrap(), &pre, 1e-5, 1e-5);

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
        assert_close(
            &w,
            &Tensor::ones([7], (Kind::Float, Device::Cpu)),
            1e-6,
            0.0,
        );
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
        assert_close(
            &w,
            &Tensor::ones([7], (Kind::Float, Device::Cpu)),
            1e-6,
            0.0,
        );

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
        let x = randn_seeded(&[64, 8], 5, Device::Cpu).unwrap();
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
        assert_close(g.centroids(), &mean, 1e-6, 0.0);
        // Scores are differentiable in x but never reach the keys.
        let g = AvgKeyGate::new(&k, None, GateConfig::new(4, 2)).unwrap();
        let x = randn_seeded(&[3, 8], 6, Device::Cpu)
            .unwrap()
            .set_requires_grad(true);
        g.scores(&x).unwrap().sum(Kind::Float).backward();
        assert!(x.grad().defined());
        assert!(!k.grad().defined());
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
            g.scores(&Tensor::zeros([2, 7], (Kind::Float, Device::Cpu)))
                .is_err()
        );
    }
}
