//! Routers: docs/moe-router.md, Method, part 1 steps 1–7 (Switch, arXiv 2101.03961; noisy
//! top-k, Shazeer et al. arXiv 1701.06538; Tutel `gates/top.py`; Expert
//! Choice, arXiv 2202.09368; Hash Layers, arXiv 2106.04426; ModuleFormer
//! `utils/gate.py`, arXiv 2306.04640).
//!
//! For tokens `x_t ∈ R^d` (`t = 1..T`) and `E` experts:
//! 1. **jitter** (training, `jitter`): `x ← x ⊙ u`, `u ~ U(1−ε, 1+ε)`;
//! 2. **logits** `ℓ ∈ R^{T×E}` ([`GateType`]): `linear` `x W_gᵀ`; `mlp`
//!    `W_2 Dropout(GELU(W_1 x + b_1))`; `cosine` `cos(x Pᵀ, c_e) · exp(min(τ, ln 100))`;
//!    `hash` / `fixed` take the expert from the token id (no logits: `ℓ = 0`);
//! 3. **noise** (training): `ℓ̃ = ℓ + (σ_n/E) N(0,1)` or `ℓ̃ = ℓ + Gumbel(0,1)`;
//! 4. **scores** `p = softmax(ℓ̃)` (or `σ(ℓ̃)`); the top-`k` of `p`; with
//!    `sample_topk = s` in training, the best `k − s` and `s` more drawn
//!    without replacement from `p + 1e-6` (ModuleFormer);
//! 5. **weights** ([`WeightMode`]): `raw` `g = p`, `renorm` `g = p / Σ_chosen p`
//!    (= softmax over the chosen logits), `pnorm` `g = p / ‖p_chosen‖_q`, `hard` `g = 1`;
//! 6. **capacity** ([`crate::capacity`]): dropped assignments get `g = 0`
//!    (and, with `renorm_after_drop`, the kept ones are renormalised);
//! 7. **expert choice** (replaces 4–6): `S = softmax(ℓ̃)`, expert `e` takes
//!    the top `C = ⌈T c / E⌉` tokens of column `S_{·e}`, with weight `S_te`.
//!
//! Every call records per-expert statistics with `ctx.add_stat`, on the
//! device (no host synchronisation): `expert_load` (kept assignments per
//! expert), `expert_importance` (`mean_t p_te`) and `dropped_fraction`.
//!
//! **Padding** ([`Router::route_masked`], `m_t = 1` for a real token, 0 for
//! padding): padding tokens are routed (their logits exist) but never
//! dispatched — `kept = false`, `g = 0`, no capacity slot, no expert-choice
//! pick while real tokens remain — and the statistics and the auxiliary
//! losses ([`crate::losses`]) average over real tokens only:
//! `mean_t → Σ_t m_t (·) / Σ_t m_t`. The layers take `m` from
//! `ctx.attention_mask` ([`token_mask`]).
//! Randomness (noise, jitter, sampling, dropout) draws from libtorch's
//! generator: seed it with `tensor_core::seed::with_seed`.

use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::{Context, TchResultExt};

use crate::capacity::{assign_slots_masked, capacity};
use crate::config::{GateType, Noise, RouterConfig, RoutingMode, ScoreFn, WeightMode};
use crate::error::{Error, Result, check_rows};

/// Token (or domain) ids for the `hash` and `fixed` gates, stored in the
/// forward [`Context`] with `ctx.insert(RouteIds(ids))`; any shape with one
/// id per routed token (`[B, T]` for a `[B, T, d]` input).
#[derive(Debug)]
pub struct RouteIds(pub Tensor);

/// The learned part of a gate.
#[derive(Debug)]
pub enum GateParams {
    /// `weight: [E, d]`.
    Linear { weight: Tensor },
    /// `w1: [H, d]`, `b1: [H]`, `w2: [E, H]`.
    Mlp { w1: Tensor, b1: Tensor, w2: Tensor },
    /// `proj: [D, d]`, `centers: [E, D]`, `temperature: []` (`τ`, log scale).
    Cosine {
        proj: Tensor,
        centers: Tensor,
        temperature: Tensor,
    },
    /// `hash` / `fixed`: `(a, b)` of `h(id) = ((id mod P) a + b) mod P mod E`, `P = 2³¹ − 1`.
    Fixed { a: i64, b: i64 },
}

const HASH_P: i64 = 2_147_483_647;

/// The result of routing `T` tokens to `k` of `E` experts.
///
/// For expert choice `k = E`: column `j` is expert `j`, `kept[t, j]` says
/// whether expert `j` took token `t`, and `expert_choice` holds the compact
/// `[E, C]` form.
#[derive(Debug)]
pub struct Routing {
    /// `[T, k]` expert ids (i64), distinct per row.
    pub experts: Tensor,
    /// `[T, k]` gate weights (router dtype: f32, or f64 for f64 inputs); 0 where dropped.
    pub gates: Tensor,
    /// `[T, k]` bool: the assignment fits its expert's capacity.
    pub kept: Tensor,
    /// `[T, k]` i64 slot inside the expert's buffer (capacity mode only).
    pub slot: Option<Tensor>,
    /// Capacity `C` (`None` = dropless).
    pub capacity: Option<i64>,
    /// `[T, E]` clean logits `ℓ` (before noise); zeros for `hash` / `fixed`.
    pub logits: Tensor,
    /// `[T, E]` noisy logits `ℓ̃`, when noise was drawn.
    pub noisy_logits: Option<Tensor>,
    /// Std of the Gaussian noise that was drawn (`σ_n / E`), for the smooth load estimate.
    pub noise_std: f64,
    /// `[T, E]` routing distribution (rows sum to 1), read by the losses.
    pub probs: Tensor,
    /// `log p` from log-softmax, for the MI loss (softmax scores with `mi_weight > 0` only).
    pub log_probs: Option<Tensor>,
    /// Expert choice: `(tokens [E, C] i64, gates [E, C])`.
    pub expert_choice: Option<(Tensor, Tensor)>,
    pub num_experts: i64,
    pub top_k: i64,
}

impl Routing {
    pub fn num_tokens(&self) -> i64 {
        self.experts.size()[0]
    }

    /// `[E]` kept assignments per expert (f32, no gradient; a scatter-add,
    /// no host sync).
    pub fn load(&self) -> Result<Tensor> {
        let w = self.kept.f_reshape([-1])?.f_to_kind(Kind::Float)?;
        crate::capacity::expert_counts(
            "Routing::load",
            &self.experts,
            Some(&w),
            self.num_experts,
            Kind::Float,
        )
    }

    /// `[T, E]`: `W_te` = gate of expert `e` for token `t` (0 if not chosen or dropped).
    pub fn combine_weights(&self) -> Result<Tensor> {
        let t = self.num_tokens();
        let g = self.gates.f_mul(&self.kept.f_to_kind(self.gates.kind())?)?;
        Ok(
            Tensor::f_zeros([t, self.num_experts], (g.kind(), g.device()))?.f_scatter_add(
                1,
                &self.experts,
                &g,
            )?,
        )
    }
}

fn uniform(shape: &[i64], bound: f64, device: Device) -> Result<Tensor> {
    let mut t = Tensor::f_empty(shape, (Kind::Float, device))?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t.set_requires_grad(true))
}

/// A token-to-expert router (the gate's parameters plus its [`RouterConfig`]).
#[derive(Debug)]
pub struct Router {
    pub config: RouterConfig,
    pub d_model: i64,
    pub params: GateParams,
    /// `[E]` bool, `true` = the expert can be chosen; `None` = all can.
    /// Masked experts get logit `−∞` (new experts after [`crate::extend::grow_experts`]).
    pub active: Option<Tensor>,
}

impl Router {
    /// A freshly initialised router for `d_model`-wide tokens (PyTorch's
    /// `Linear` initialisation for every matrix; `τ = ln(1/0.07)`).
    pub fn new(d_model: i64, config: RouterConfig, device: Device) -> Result<Self> {
        config.validate()?;
        if d_model <= 0 {
            return Err(Error::config(format!(
                "d_model must be positive, got {d_model}"
            )));
        }
        let e = config.num_experts as i64;
        let bd = 1.0 / (d_model as f64).sqrt();
        let params = match config.gate {
            GateType::Linear => GateParams::Linear {
                weight: uniform(&[e, d_model], bd, device)?,
            },
            GateType::Mlp => {
                let h = config.mlp_hidden;
                GateParams::Mlp {
                    w1: uniform(&[h, d_model], bd, device)?,
                    b1: uniform(&[h], bd, device)?,
                    w2: uniform(&[e, h], 1.0 / (h as f64).sqrt(), device)?,
                }
            }
            GateType::Cosine => {
                let dc = config.cosine_dim;
                GateParams::Cosine {
                    proj: uniform(&[dc, d_model], bd, device)?,
                    centers: uniform(&[e, dc], 1.0 / (dc as f64).sqrt(), device)?,
                    temperature: Tensor::f_full([], (1.0f64 / 0.07).ln(), (Kind::Float, device))?
                        .set_requires_grad(true),
                }
            }
            GateType::Hash | GateType::Fixed => {
                let mut rng = tensor_core::rng::SplitMix64::new(config.seed);
                GateParams::Fixed {
                    a: 1 + rng.below(HASH_P as u64 - 1) as i64,
                    b: rng.below(HASH_P as u64) as i64,
                }
            }
        };
        Ok(Self {
            config,
            d_model,
            params,
            active: None,
        })
    }

    pub fn num_experts(&self) -> i64 {
        self.config.num_experts as i64
    }

    /// Parameters, named relative to the layer that owns the router (`router.*`).
    pub fn params(&self) -> Vec<(&'static str, &Tensor)> {
        match &self.params {
            GateParams::Linear { weight } => vec![("router.weight", weight)],
            GateParams::Mlp { w1, b1, w2 } => vec![
                ("router.mlp.0.weight", w1),
                ("router.mlp.0.bias", b1),
                ("router.mlp.2.weight", w2),
            ],
            GateParams::Cosine {
                proj,
                centers,
                temperature,
            } => vec![
                ("router.proj.weight", proj),
                ("router.centers", centers),
                ("router.temperature", temperature),
            ],
            GateParams::Fixed { .. } => Vec::new(),
        }
    }

    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match &mut self.params {
            GateParams::Linear { weight } => vec![("router.weight", weight)],
            GateParams::Mlp { w1, b1, w2 } => vec![
                ("router.mlp.0.weight", w1),
                ("router.mlp.0.bias", b1),
                ("router.mlp.2.weight", w2),
            ],
            GateParams::Cosine {
                proj,
                centers,
                temperature,
            } => vec![
                ("router.proj.weight", proj),
                ("router.centers", centers),
                ("router.temperature", temperature),
            ],
            GateParams::Fixed { .. } => Vec::new(),
        }
    }

    /// The router's compute dtype for input `x`: f64 stays f64, everything else is f32.
    pub fn compute_kind(x: &Tensor) -> Kind {
        if x.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        }
    }

    /// Steps 1–2: the clean logits `ℓ: [T, E]` of `x: [T, d]` (jitter and
    /// gate dropout applied when `train`). `hash` / `fixed`: zeros.
    pub fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_rows("Router", x, self.d_model)?;
        let rk = Self::compute_kind(x);
        let mut x = x.f_to_kind(rk)?;
        if train && self.config.jitter && self.config.jitter_eps > 0.0 {
            let eps = self.config.jitter_eps;
            let mut u = x.f_empty_like()?;
            let _ = u.f_uniform_(1.0 - eps, 1.0 + eps)?;
            x = x.f_mul(&u)?;
        }
        let w = |t: &Tensor| t.f_to_kind(rk);
        let l = match &self.params {
            GateParams::Linear { weight } => x.f_linear::<Tensor>(&w(weight)?, None)?,
            GateParams::Mlp { w1, b1, w2 } => {
                let h = x.f_linear(&w(w1)?, Some(&w(b1)?))?.f_gelu("none")?;
                let h = if train && self.config.gate_dropout > 0.0 {
                    h.f_dropout(self.config.gate_dropout, true)?
                } else {
                    h
                };
                h.f_linear::<Tensor>(&w(w2)?, None)?
            }
            GateParams::Cosine {
                proj,
                centers,
                temperature,
            } => {
                let h = x.f_linear::<Tensor>(&w(proj)?, None)?;
                let hn = normalize_rows(&h)?;
                let cn = normalize_rows(&w(centers)?)?;
                let scale = w(temperature)?.f_clamp_max(100f64.ln())?.f_exp()?;
                hn.f_matmul(&cn.f_tr()?)?.f_mul(&scale)?
            }
            GateParams::Fixed { .. } => {
                let t = x.size()[..x.dim() - 1].iter().product::<i64>();
                Tensor::f_zeros([t, self.num_experts()], (rk, x.device()))?
            }
        };
        Ok(l)
    }

    /// Route `x: [T, d]` (flattened tokens): steps 1–7, with statistics
    /// recorded in `ctx` (`expert_load`, `expert_importance`, `dropped_fraction`).
    pub fn route(&self, x: &Tensor, ctx: &mut Context) -> Result<Routing> {
        self.route_masked(x, None, ctx)
    }

    /// [`Router::route`] with a token mask `mask: [T]` (bool, `true` = real
    /// token): padding tokens are not dispatched and count in no statistic
    /// or loss (module docs).
    pub fn route_masked(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        ctx: &mut Context,
    ) -> Result<Routing> {
        let s = x.size();
        if s.len() != 2 {
            return Err(Error::shape(
                "Router::route",
                format!("[tokens, {}]", self.d_model),
                s,
            ));
        }
        let mask = match mask {
            Some(m) => Some(check_mask("Router::route", m, s[0], x.device())?),
            None => None,
        };
        let r = match self.config.gate {
            GateType::Hash | GateType::Fixed => self.route_fixed(x, mask.as_ref(), ctx)?,
            _ => {
                let logits = self.logits(x, ctx.train)?;
                self.route_logits_masked(logits, ctx.train, mask.as_ref())?
            }
        };
        self.record_stats(&r, mask.as_ref(), ctx)?;
        Ok(r)
    }

    /// Steps 3–7 from given clean logits `ℓ: [T, E]`.
    pub fn route_logits(&self, logits: Tensor, train: bool) -> Result<Routing> {
        self.route_logits_masked(logits, train, None)
    }

    /// [`Router::route_logits`] with a token mask `mask: [T]` (bool).
    pub fn route_logits_masked(
        &self,
        logits: Tensor,
        train: bool,
        mask: Option<&Tensor>,
    ) -> Result<Routing> {
        const OP: &str = "Router::route_logits";
        let c = &self.config;
        let e = self.num_experts();
        let ls = logits.size();
        if ls.len() != 2 || ls[1] != e {
            return Err(Error::shape(OP, format!("logits [tokens, {e}]"), ls));
        }
        let t = ls[0];
        let k = c.top_k as i64;
        let mask = match mask {
            Some(m) => Some(check_mask(OP, m, t, logits.device())?),
            None => None,
        };
        let mask = mask.as_ref();
        // Step 3: noise.
        let mut noise_std = 0.0;
        let noisy = match (train, c.noise) {
            (true, Noise::Gaussian) if c.noise_std > 0.0 => {
                noise_std = c.noise_std / e as f64;
                Some(logits.f_add(&logits.f_randn_like()?.f_mul_scalar(noise_std)?)?)
            }
            (true, Noise::Gumbel) => {
                let u = logits.f_rand_like()?.f_clamp(1e-10, 1.0 - 1e-10)?;
                let g = u.f_log()?.f_neg()?.f_log()?.f_neg()?;
                Some(logits.f_add(&g)?)
            }
            _ => None,
        };
        let mut scored = noisy.as_ref().unwrap_or(&logits).shallow_clone();
        if let Some(active) = &self.active {
            scored = scored.f_masked_fill(&active.f_logical_not()?, f64::NEG_INFINITY)?;
        }
        // Step 4: scores and the routing distribution.
        let scores = match c.score {
            ScoreFn::Softmax => scored.f_softmax(-1, scored.kind())?,
            ScoreFn::Sigmoid => scored.f_sigmoid()?,
        };
        let probs = match c.score {
            ScoreFn::Softmax => scores.shallow_clone(),
            ScoreFn::Sigmoid => scores.f_div(
                &scores
                    .f_sum_dim_intlist(-1, true, None)?
                    .f_clamp_min(1e-30)?,
            )?,
        };
        let log_probs = match c.score {
            ScoreFn::Softmax if c.mi_weight > 0.0 => Some(scored.f_log_softmax(-1, scored.kind())?),
            _ => None,
        };
        if c.routing == RoutingMode::ExpertChoice {
            return self.expert_choice(logits, noisy, noise_std, probs, log_probs, mask);
        }
        let (top_p, experts) = if train && c.sample_topk > 0 {
            sample_topk(&scores, k, c.sample_topk as i64)?
        } else {
            scores.f_topk(k, -1, true, true).op(OP)?
        };
        // Step 5: weights.
        let mut gates = self.weights(&top_p)?;
        // Step 6: capacity (padding assignments are never kept).
        let valid = mask
            .map(|m| m.f_unsqueeze(1)?.f_expand([t, k], false))
            .transpose()?;
        let cap = capacity(c, t, train);
        let (kept, slot) = match cap {
            Some(cap) => {
                let (kept, slot) =
                    assign_slots_masked(&experts, &top_p, e, cap, c.drop_policy, valid.as_ref())?;
                gates = gates.f_mul(&kept.f_to_kind(gates.kind())?)?;
                if c.renorm_after_drop && c.weight_mode != WeightMode::Hard {
                    let s = gates.f_sum_dim_intlist(-1, true, None)?;
                    let denom = s.f_where_scalarother(&s.f_gt(0.0)?, 1.0)?;
                    gates = gates.f_div(&denom)?;
                }
                (kept, Some(slot))
            }
            None => match &valid {
                Some(v) => {
                    gates = gates.f_mul(&v.f_to_kind(gates.kind())?)?;
                    (v.f_contiguous()?, None)
                }
                None => (Tensor::f_ones([t, k], (Kind::Bool, logits.device()))?, None),
            },
        };
        Ok(Routing {
            experts,
            gates,
            kept,
            slot,
            capacity: cap,
            logits,
            noisy_logits: noisy,
            noise_std,
            probs,
            log_probs,
            expert_choice: None,
            num_experts: e,
            top_k: k,
        })
    }

    /// Step 5 on the chosen scores `top_p: [T, k]`.
    fn weights(&self, top_p: &Tensor) -> Result<Tensor> {
        Ok(match self.config.weight_mode {
            WeightMode::Raw => top_p.shallow_clone(),
            WeightMode::Renorm => top_p.f_div(
                &top_p
                    .f_sum_dim_intlist(-1, true, None)?
                    .f_clamp_min(1e-30)?,
            )?,
            WeightMode::Pnorm => top_p.f_div(
                &top_p
                    .f_norm_scalaropt_dim(self.config.pnorm_p, [-1i64].as_slice(), true)?
                    .f_clamp_min(1e-30)?,
            )?,
            WeightMode::Hard => top_p.f_ones_like()?,
        })
    }

    /// Step 7: each expert takes its top `C = ⌈T c / E⌉` tokens of `S`
    /// (padding tokens rank below every real one and get gate 0).
    fn expert_choice(
        &self,
        logits: Tensor,
        noisy: Option<Tensor>,
        noise_std: f64,
        probs: Tensor,
        log_probs: Option<Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Routing> {
        let e = self.num_experts();
        let t = logits.size()[0];
        let dev = logits.device();
        let cap = ((t as f64 * self.config.expert_choice_capacity / e as f64).ceil() as i64)
            .clamp(1, t.max(1));
        let (vals, idx) = match mask {
            None => probs.f_tr()?.f_topk(cap, 1, true, true)?,
            Some(m) => {
                let pad = m.f_logical_not()?.f_unsqueeze(1)?;
                let sel = probs.f_detach()?.f_masked_fill(&pad, -1.0)?;
                let (_, idx) = sel.f_tr()?.f_topk(cap, 1, true, true)?;
                let real = m
                    .f_index_select(0, &idx.f_reshape([-1])?)?
                    .f_view([e, cap])?;
                let vals = probs
                    .f_tr()?
                    .f_gather(1, &idx, false)?
                    .f_mul(&real.f_to_kind(probs.kind())?)?;
                (vals, idx)
            }
        };
        let gates = Tensor::f_zeros([e, t], (probs.kind(), dev))?
            .f_scatter(1, &idx, &vals)?
            .f_tr()?;
        let mut kept = Tensor::f_zeros([e, t], (Kind::Bool, dev))?
            .f_scatter_value(1, &idx, 1)?
            .f_tr()?;
        if let Some(m) = mask {
            kept = kept.f_logical_and(&m.f_unsqueeze(1)?)?;
        }
        let experts = Tensor::f_arange(e, (Kind::Int64, dev))?
            .f_unsqueeze(0)?
            .f_expand([t, e], false)?;
        Ok(Routing {
            experts,
            gates,
            kept,
            slot: None,
            capacity: Some(cap),
            logits,
            noisy_logits: noisy,
            noise_std,
            probs,
            log_probs,
            expert_choice: Some((idx, vals)),
            num_experts: e,
            top_k: e,
        })
    }

    /// `hash` / `fixed`: experts `h, h+1, ..., h+k−1 (mod E)` from the token ids.
    fn route_fixed(&self, x: &Tensor, mask: Option<&Tensor>, ctx: &Context) -> Result<Routing> {
        const OP: &str = "Router (hash/fixed)";
        let GateParams::Fixed { a, b } = self.params else {
            return Err(Error::config("route_fixed needs a hash or fixed gate"));
        };
        let t = x.size()[0];
        let ids = ctx
            .get::<RouteIds>()
            .ok_or_else(|| {
                Error::missing(
                    OP,
                    "hash/fixed routing needs token ids: ctx.insert(RouteIds(ids))",
                )
            })?
            .0
            .f_reshape([-1])?;
        if ids.size() != [t] {
            return Err(Error::shape(
                OP,
                format!("RouteIds with {t} ids"),
                ids.size(),
            ));
        }
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::config("RouteIds must hold integer ids"));
        }
        let e = self.num_experts();
        let k = self.config.top_k as i64;
        let ids = ids.f_to_kind(Kind::Int64)?.f_to_device(x.device())?;
        let h = match self.config.gate {
            GateType::Hash => ids
                .f_remainder(HASH_P)?
                .f_mul_scalar(a)?
                .f_add_scalar(b)?
                .f_remainder(HASH_P)?,
            _ => ids,
        };
        let experts = h
            .f_unsqueeze(1)?
            .f_add(&Tensor::f_arange(k, (Kind::Int64, x.device()))?.f_unsqueeze(0)?)?
            .f_remainder(e)?;
        let rk = Self::compute_kind(x);
        let logits = Tensor::f_zeros([t, e], (rk, x.device()))?;
        let probs = logits.f_softmax(-1, rk)?;
        let top_p = probs.f_gather(1, &experts, false)?;
        let mut gates = self.weights(&top_p)?;
        let kept = match mask {
            Some(m) => {
                let v = m.f_unsqueeze(1)?.f_expand([t, k], false)?.f_contiguous()?;
                gates = gates.f_mul(&v.f_to_kind(gates.kind())?)?;
                v
            }
            None => Tensor::f_ones([t, k], (Kind::Bool, x.device()))?,
        };
        Ok(Routing {
            experts,
            gates,
            kept,
            slot: None,
            capacity: None,
            logits,
            noisy_logits: None,
            noise_std: 0.0,
            probs,
            log_probs: None,
            expert_choice: None,
            num_experts: e,
            top_k: k,
        })
    }

    fn record_stats(&self, r: &Routing, mask: Option<&Tensor>, ctx: &mut Context) -> Result<()> {
        let no_grad = tensor_core::tch::no_grad_guard();
        let load = r.load()?;
        let probs = r.probs.f_detach()?.f_to_kind(Kind::Float)?;
        let (importance, dropped) = match mask {
            None => {
                let total = (r.num_tokens() * r.top_k).max(1) as f64;
                let dropped = r
                    .kept
                    .f_logical_not()?
                    .f_sum(Kind::Float)?
                    .f_div_scalar(total)?;
                (probs.f_mean_dim(0, false, Kind::Float)?, dropped)
            }
            Some(m) => {
                let mf = m.f_to_kind(Kind::Float)?;
                let n = mf.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
                let imp = probs
                    .f_mul(&mf.f_unsqueeze(1)?)?
                    .f_sum_dim_intlist(0, false, Kind::Float)?
                    .f_div(&n)?;
                // Dropped among the real tokens' assignments.
                let dropped = r
                    .kept
                    .f_logical_not()?
                    .f_logical_and(&m.f_unsqueeze(1)?)?
                    .f_sum(Kind::Float)?
                    .f_div(&n.f_mul_scalar(r.top_k as f64)?)?;
                (imp, dropped)
            }
        };
        drop(no_grad);
        ctx.add_stat("expert_load", load);
        ctx.add_stat("expert_importance", importance);
        ctx.add_stat("dropped_fraction", dropped);
        Ok(())
    }
}

/// `mask` as a `[tokens]` bool tensor on `device` (any integer, float or
/// bool dtype with 1 = real token; any shape with `tokens` elements).
pub(crate) fn check_mask(op: &str, mask: &Tensor, tokens: i64, device: Device) -> Result<Tensor> {
    if mask.numel() as i64 != tokens {
        return Err(Error::shape(
            op,
            format!("token mask with {tokens} entries"),
            mask.size(),
        ));
    }
    let m = mask.f_reshape([-1])?.f_to_device(device)?;
    Ok(if m.kind() == Kind::Bool {
        m
    } else {
        m.f_ne(0)?
    })
}

/// The token mask of a layer's `tokens` routed tokens from
/// `ctx.attention_mask` (`[B, T_keys]`, 1 = token): its last `tokens / B`
/// columns, flattened (with a KV cache the mask also covers the cached
/// keys). `None` without a mask, or when `config.mask_padding` is off.
pub fn token_mask(config: &RouterConfig, ctx: &Context, tokens: i64) -> Result<Option<Tensor>> {
    let Some(m) = &ctx.attention_mask else {
        return Ok(None);
    };
    if !config.mask_padding {
        return Ok(None);
    }
    let s = m.size();
    let fits = s.len() == 2 && s[0] > 0 && tokens % s[0] == 0 && tokens / s[0] <= s[1];
    if !fits {
        return Err(Error::shape(
            "token_mask (ctx.attention_mask)",
            format!("[B, T] with B·T >= {tokens} routed tokens"),
            s,
        ));
    }
    let t = tokens / s[0];
    let m = m.f_narrow(1, s[1] - t, t)?.f_reshape([-1])?;
    Ok(Some(if m.kind() == Kind::Bool {
        m
    } else {
        m.f_ne(0)?
    }))
}

/// ModuleFormer's sampled top-k: the best `k − s` of `scores`, then `s`
/// drawn without replacement from `scores + 1e-6` with those removed.
fn sample_topk(scores: &Tensor, k: i64, s: i64) -> Result<(Tensor, Tensor)> {
    let det = k - s;
    let masked = scores.f_detach()?.f_add_scalar(1e-6)?;
    let (first, masked) = if det > 0 {
        let (_, idx) = scores.f_topk(det, -1, true, true)?;
        let m = masked.f_scatter_value(1, &idx, 0.0)?;
        (Some(idx), m)
    } else {
        (None, masked)
    };
    let drawn = masked.f_to_kind(Kind::Float)?.f_multinomial(s, false)?;
    let idx = match first {
        Some(f) => Tensor::f_cat(&[f, drawn], 1)?,
        None => drawn,
    };
    let vals = scores.f_gather(1, &idx, false)?;
    Ok((vals, idx))
}

/// Rows scaled to unit L2 norm (`x / max(‖x‖, 1e-12)`).
pub(crate) fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let n = x
        .f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&n)?)
}
