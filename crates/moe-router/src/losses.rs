//! Auxiliary routing losses (docs/moe-router.md, Method, part 1 step 9): Switch load balancing
//! (arXiv 2101.03961 eq. 4), DeepSpeed/MegaBlocks top-k variants, the router
//! z-loss (ST-MoE, arXiv 2202.08906 eq. 5), importance/load CV² (Shazeer et
//! al., arXiv 1701.06538 eqs. 6–10), ModuleFormer's mutual-information loss
//! (arXiv 2306.04640 eq. 8) and load concentration.
//!
//! Notation: `T` tokens, `E` experts, top-`k`; `p_te` the routing
//! distribution (rows sum to 1), `P_e = mean_t p_te`, `n_e` assignments to
//! `e` (counted before capacity drops, as DeepSpeed does), `f_e = n_e / T`.
//!
//! | loss | formula | minimum | maximum |
//! |---|---|---|---|
//! | [`balance_loss`] `switch_top1` | `E Σ_e f_e P_e` (`f_e` from first choices) | 1 (uniform) | `E` (collapsed) |
//! | `deepspeed_topk` | `(E²/k) mean_e f_e P_e` (all `k` picks) | 1 (uniform) | `E/k` |
//! | `megablocks` | `E/(L T k) Σ_e n_e P_e` | `1/L` | |
//! | [`z_loss`] | `mean_t (logsumexp_e ℓ_te)²` | 0 | |
//! | [`cv_squared`] | `Var(v) / Mean(v)²` | 0 (balanced) | |
//! | [`importance_load_cv2`] | `(CV²(Imp) + CV²(Load)) / 2`, `Imp_e = Σ_t p_te` | 0 | |
//! | [`mutual_information_loss`] | `H(e|x) − H(e)` | `−log E` (one-hot, balanced) | 0 (all rows equal) |
//! | [`load_concentration`] | `H(e) = −Σ_e P_e log(P_e + 1e-8)` | 0 (one expert) | `log E` |
//!
//! `H(e|x) = −mean_t Σ_e p_te log p_te` (from log-softmax), `H(e)` as in the
//! last row. ModuleFormer's `acc_aux_loss` accumulates `Σ_t p_t`, `Σ_t H(p_t)`
//! and `T` over calls ([`MiAccumulator`]) and evaluates the MI loss once.
//!
//! Each layer adds its weighted losses with `ctx.add_aux_loss` in training
//! ([`add_aux_losses`]); `ctx.aux_loss_total` sums them over layers.
//!
//! **Padding.** Every loss has a `_masked` form taking a token mask `m: [T]`
//! (1 = real token, 0 = padding): each mean over tokens becomes
//! `Σ_t m_t (·) / Σ_t m_t`, the counts `n_e` and `Load_e` count real tokens
//! only, and `T` is the number of real tokens, so padding rows change
//! nothing (tested). No host synchronisation: `Σ_t m_t` stays on the device.

use std::collections::HashMap;

use tensor_core::Context;
use tensor_core::tch::{Kind, Tensor};

use crate::config::{
    BalanceVariant, CvVariance, GateType, LoadEstimator, RouterConfig, RoutingMode,
};
use crate::error::{Error, Result};
use crate::router::Routing;

fn check_probs(op: &str, probs: &Tensor) -> Result<(i64, i64)> {
    let s = probs.size();
    if s.len() != 2 || s[1] == 0 {
        return Err(Error::shape(op, "probs [tokens, experts]", s));
    }
    Ok((s[0], s[1]))
}

/// `[E]` assignment counts of `experts: [T, k]` (f32/f64 like `kind`, no
/// gradient), only of the real tokens when `mask: [T]` is given.
fn counts(experts: &Tensor, num_experts: i64, kind: Kind, mask: Option<&Tensor>) -> Result<Tensor> {
    let w = mask
        .map(|m| -> Result<Tensor> {
            let k = experts.size().get(1).copied().unwrap_or(1);
            let m = if m.kind() == Kind::Bool {
                m.shallow_clone()
            } else {
                m.f_ne(0)?
            };
            Ok(m.f_to_kind(Kind::Double)?
                .f_unsqueeze(1)?
                .f_expand([-1, k], false)?
                .f_reshape([-1])?)
        })
        .transpose()?;
    let c = crate::capacity::expert_counts(
        "balance_loss counts",
        experts,
        w.as_ref(),
        num_experts,
        Kind::Double,
    )?;
    Ok(c.f_to_kind(kind)?)
}

/// `[T]` weights `m_t` (1 real, 0 padding) of `mask` in `kind`, checked against `T`.
fn mask_weights(op: &str, mask: &Tensor, t: i64, kind: Kind) -> Result<Tensor> {
    if mask.numel() as i64 != t {
        return Err(Error::shape(op, format!("token mask [{t}]"), mask.size()));
    }
    let m = mask.f_reshape([-1])?;
    let m = if m.kind() == Kind::Bool {
        m
    } else {
        m.f_ne(0)?
    };
    Ok(m.f_to_kind(kind)?)
}

/// `Σ_t m_t x_t / max(Σ_t m_t, 1)` over dim 0 of `x: [T, ...]` (`mean_t` without a mask).
fn token_mean(op: &str, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(x.f_mean_dim(0, false, x.kind())?);
    };
    let m = mask_weights(op, mask, x.size()[0], x.kind())?;
    let n = m.f_sum(x.kind())?.f_clamp_min(1.0)?;
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, x.dim().saturating_sub(1)));
    Ok(x.f_mul(&m.f_view(shape.as_slice())?)?
        .f_sum_dim_intlist(0, false, x.kind())?
        .f_div(&n)?)
}

/// The balance loss of `probs: [T, E]` and the chosen `experts: [T, k]`
/// (see the table in the module docs). Uniform routing gives 1 in every
/// variant (`1/L` for `megablocks`); `p = [[.8,.2],[.6,.4]]`, top-1, gives 1.4.
pub fn balance_loss(
    probs: &Tensor,
    experts: &Tensor,
    variant: BalanceVariant,
    num_layers: usize,
) -> Result<Tensor> {
    balance_loss_masked(probs, experts, variant, num_layers, None)
}

/// [`balance_loss`] over the real tokens of `mask: [T]` (`P_e`, `f_e` and `T` from them).
pub fn balance_loss_masked(
    probs: &Tensor,
    experts: &Tensor,
    variant: BalanceVariant,
    num_layers: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "balance_loss";
    let (t, e) = check_probs(OP, probs)?;
    let es = experts.size();
    if es.len() != 2 || es[0] != t || es[1] == 0 {
        return Err(Error::shape(OP, format!("experts [{t}, k]"), es));
    }
    let k = es[1];
    let p_mean = token_mean(OP, probs, mask)?;
    let chosen = match variant {
        BalanceVariant::SwitchTop1 => experts.f_narrow(1, 0, 1)?,
        _ => experts.shallow_clone(),
    };
    let c = counts(&chosen, e, probs.kind(), mask)?;
    let f = match mask {
        None => c.f_div_scalar(t.max(1) as f64)?,
        Some(m) => c.f_div(
            &mask_weights(OP, m, t, probs.kind())?
                .f_sum(probs.kind())?
                .f_clamp_min(1.0)?,
        )?,
    };
    let dot = f.f_mul(&p_mean)?.f_sum(probs.kind())?;
    let scale = match variant {
        BalanceVariant::SwitchTop1 => e as f64,
        BalanceVariant::DeepspeedTopk => e as f64 / k as f64,
        BalanceVariant::Megablocks => e as f64 / (k as f64 * num_layers.max(1) as f64),
    };
    Ok(dot.f_mul_scalar(scale)?)
}

/// Router z-loss `mean_t (logsumexp_e ℓ_te)²` of `logits: [T, E]`; `[0, 0]` gives `(ln 2)²`.
pub fn z_loss(logits: &Tensor) -> Result<Tensor> {
    z_loss_masked(logits, None)
}

/// [`z_loss`] averaged over the real tokens of `mask: [T]`.
pub fn z_loss_masked(logits: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    check_probs("z_loss", logits)?;
    let sq = logits.f_logsumexp([-1i64].as_slice(), false)?.f_square()?;
    token_mean("z_loss", &sq, mask)
}

/// `CV²(v) = Var(v) / (Mean(v)² + 1e-10)` of `v: [E]`; 0 for `E = 1`.
pub fn cv_squared(v: &Tensor, variance: CvVariance) -> Result<Tensor> {
    let s = v.size();
    if s.len() != 1 {
        return Err(Error::shape("cv_squared", "[experts]", s));
    }
    if s[0] <= 1 {
        return Ok(v.f_sum(v.kind())?.f_mul_scalar(0.0)?);
    }
    let var = v.f_var(variance == CvVariance::Unbiased)?;
    let mean = v.f_mean(v.kind())?;
    Ok(var.f_div(&mean.f_square()?.f_add_scalar(1e-10)?)?)
}

/// `(CV²(Imp) + CV²(Load)) / 2` with `Imp_e = Σ_t p_te` and `load: [E]`
/// (counts, or [`smooth_load`]).
pub fn importance_load_cv2(probs: &Tensor, load: &Tensor, variance: CvVariance) -> Result<Tensor> {
    importance_load_cv2_masked(probs, load, variance, None)
}

/// [`importance_load_cv2`] with `Imp_e = Σ_t m_t p_te` (the `load` should
/// count real tokens only too: [`smooth_load_masked`] or masked counts).
pub fn importance_load_cv2_masked(
    probs: &Tensor,
    load: &Tensor,
    variance: CvVariance,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (t, _) = check_probs("importance_load_cv2", probs)?;
    let imp = match mask {
        None => probs.f_sum_dim_intlist(0, false, probs.kind())?,
        Some(m) => probs
            .f_mul(&mask_weights("importance_load_cv2", m, t, probs.kind())?.f_unsqueeze(1)?)?
            .f_sum_dim_intlist(0, false, probs.kind())?,
    };
    let a = cv_squared(&imp, variance)?;
    let b = cv_squared(&load.f_to_kind(probs.kind())?, variance)?;
    Ok(a.f_add(&b)?.f_mul_scalar(0.5)?)
}

/// Shazeer et al.'s differentiable load: `Load_e = Σ_t Φ((ℓ_te − θ_te) / σ)`
/// where `θ_te` is the `k`-th largest noisy logit of token `t` excluding `e`:
/// the `(k+1)`-th if `e` is in the noisy top-k, else the `k`-th.
pub fn smooth_load(clean: &Tensor, noisy: &Tensor, noise_std: f64, k: i64) -> Result<Tensor> {
    smooth_load_masked(clean, noisy, noise_std, k, None)
}

/// [`smooth_load`] summed over the real tokens of `mask: [T]` only.
pub fn smooth_load_masked(
    clean: &Tensor,
    noisy: &Tensor,
    noise_std: f64,
    k: i64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "smooth_load";
    let (t, e) = check_probs(OP, clean)?;
    if noisy.size() != clean.size() || k < 1 || k >= e || noise_std <= 0.0 {
        return Err(Error::config(format!(
            "{OP}: needs noisy logits like the clean ones, 1 <= k < E and noise std > 0"
        )));
    }
    let (top, _) = noisy.f_topk(k + 1, -1, true, true)?;
    let thr_in = top.f_narrow(1, k, 1)?;
    let thr_out = top.f_narrow(1, k - 1, 1)?;
    let is_in = noisy.f_gt_tensor(&thr_in)?;
    let phi = |thr: &Tensor| -> Result<Tensor> {
        let z = clean
            .f_sub(thr)?
            .f_div_scalar(noise_std * std::f64::consts::SQRT_2)?;
        Ok(z.f_erf()?.f_add_scalar(1.0)?.f_mul_scalar(0.5)?)
    };
    let mut p = phi(&thr_in)?.f_where_self(&is_in, &phi(&thr_out)?)?;
    if let Some(m) = mask {
        p = p.f_mul(&mask_weights(OP, m, t, clean.kind())?.f_unsqueeze(1)?)?;
    }
    Ok(p.f_sum_dim_intlist(0, false, clean.kind())?)
}

/// `H(p̄) = −Σ_e p̄_e log(p̄_e + 1e-8)` of a mean distribution `p̄: [E]`.
fn marginal_entropy(p_mean: &Tensor) -> Result<Tensor> {
    Ok(p_mean
        .f_mul(&p_mean.f_add_scalar(1e-8)?.f_log()?)?
        .f_sum(p_mean.kind())?
        .f_neg()?)
}

/// `Σ_t m_t H(p_t) = −Σ_t m_t Σ_e p_te log p_te` (`m_t = 1` without a mask).
fn summed_conditional_entropy(
    probs: &Tensor,
    log_probs: &Tensor,
    m: Option<&Tensor>,
) -> Result<Tensor> {
    // p log p = 0 where p = 0 (log p may be −∞ there).
    let mut plogp = probs.f_mul(&log_probs.f_clamp_min(-1e4)?)?;
    if let Some(m) = m {
        plogp = plogp.f_mul(&m.f_unsqueeze(1)?)?;
    }
    Ok(plogp.f_sum(probs.kind())?.f_neg()?)
}

/// ModuleFormer's MI loss `H(e|x) − H(e)` of `probs: [T, E]` with their
/// `log_probs` (log-softmax); `None` takes `log p`. In `[−log E, 0]`.
pub fn mutual_information_loss(probs: &Tensor, log_probs: Option<&Tensor>) -> Result<Tensor> {
    mutual_information_loss_masked(probs, log_probs, None)
}

/// [`mutual_information_loss`] over the real tokens of `mask: [T]`.
pub fn mutual_information_loss_masked(
    probs: &Tensor,
    log_probs: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut acc = MiAccumulator::default();
    acc.add_masked(probs, log_probs, mask)?;
    acc.loss()
}

/// Load concentration `L_conc = H(e)` (minimised on task data before pruning).
pub fn load_concentration(probs: &Tensor) -> Result<Tensor> {
    load_concentration_masked(probs, None)
}

/// [`load_concentration`] with `P_e` over the real tokens of `mask: [T]`.
pub fn load_concentration_masked(probs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    check_probs("load_concentration", probs)?;
    marginal_entropy(&token_mean("load_concentration", probs, mask)?)
}

/// ModuleFormer's `acc_aux_loss`: `Σ_t p_t`, `Σ_t H(p_t)` and `T` summed
/// over calls (with their autograd graphs), the MI loss evaluated once.
/// With token masks the sums run over real tokens and `T` counts them
/// (a device scalar: no host sync).
#[derive(Debug, Default)]
pub struct MiAccumulator {
    sum_probs: Option<Tensor>,
    sum_entropy: Option<Tensor>,
    /// Rows added (padding included).
    count: i64,
    /// Real tokens added, when some call had a mask.
    real: Option<Tensor>,
    /// Weight the accumulated loss is added with by [`flush_mi_losses`].
    pub weight: f64,
}

impl MiAccumulator {
    pub fn add(&mut self, probs: &Tensor, log_probs: Option<&Tensor>) -> Result<()> {
        self.add_masked(probs, log_probs, None)
    }

    /// [`MiAccumulator::add`] of the real tokens of `mask: [T]` only.
    pub fn add_masked(
        &mut self,
        probs: &Tensor,
        log_probs: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        let (t, e) = check_probs("MiAccumulator::add", probs)?;
        if let Some(s) = &self.sum_probs
            && s.size() != [e]
        {
            return Err(Error::shape(
                "MiAccumulator::add",
                format!("[tokens, {}]", s.size()[0]),
                probs.size(),
            ));
        }
        let owned;
        let lp = match log_probs {
            Some(l) => l,
            None => {
                owned = probs.f_clamp_min(1e-30)?.f_log()?;
                &owned
            }
        };
        let m = mask
            .map(|m| mask_weights("MiAccumulator::add", m, t, probs.kind()))
            .transpose()?;
        let sp = match &m {
            None => probs.f_sum_dim_intlist(0, false, probs.kind())?,
            Some(m) => {
                probs
                    .f_mul(&m.f_unsqueeze(1)?)?
                    .f_sum_dim_intlist(0, false, probs.kind())?
            }
        };
        let sh = summed_conditional_entropy(probs, lp, m.as_ref())?;
        // Real-token count on the device once a mask was seen.
        if m.is_some() || self.real.is_some() {
            let prev = match self.real.take() {
                Some(r) => r,
                None => Tensor::f_full([], self.count as f64, (probs.kind(), probs.device()))?,
            };
            let add = match &m {
                Some(m) => m.f_sum(probs.kind())?,
                None => Tensor::f_full([], t as f64, (probs.kind(), probs.device()))?,
            };
            self.real = Some(prev.f_add(&add)?);
        }
        self.sum_probs = Some(match self.sum_probs.take() {
            Some(s) => s.f_add(&sp)?,
            None => sp,
        });
        self.sum_entropy = Some(match self.sum_entropy.take() {
            Some(s) => s.f_add(&sh)?,
            None => sh,
        });
        self.count += t;
        Ok(())
    }

    pub fn count(&self) -> i64 {
        self.count
    }

    /// `H(e|x) − H(e)` over everything added so far.
    pub fn loss(&self) -> Result<Tensor> {
        let (Some(sp), Some(sh)) = (&self.sum_probs, &self.sum_entropy) else {
            return Err(Error::missing(
                "MiAccumulator::loss",
                "no routing statistics were added",
            ));
        };
        let (h_cond, p_mean) = match &self.real {
            None => {
                let n = self.count.max(1) as f64;
                (sh.f_div_scalar(n)?, sp.f_div_scalar(n)?)
            }
            Some(r) => {
                let n = r.f_clamp_min(1.0)?;
                (sh.f_div(&n)?, sp.f_div(&n)?)
            }
        };
        let h_marg = marginal_entropy(&p_mean)?;
        Ok(h_cond.f_sub(&h_marg)?)
    }

    pub fn clear(&mut self) {
        self.sum_probs = None;
        self.sum_entropy = None;
        self.count = 0;
        self.real = None;
    }
}

/// The accumulators of every layer with `mi_accumulate`, by module path,
/// kept in the forward [`Context`] (`ctx.get::<MiAccumulators>()`).
#[derive(Debug, Default)]
pub struct MiAccumulators(pub HashMap<String, MiAccumulator>);

/// Add every accumulated MI loss (weighted) to `ctx`'s auxiliary losses as
/// `PATH.mi_loss`, and clear the accumulators. Returns how many were added.
pub fn flush_mi_losses(ctx: &mut Context) -> Result<usize> {
    let Some(mut accs) = ctx.remove::<MiAccumulators>() else {
        return Ok(0);
    };
    let mut n = 0;
    let mut paths: Vec<String> = accs.0.keys().cloned().collect();
    paths.sort();
    for path in paths {
        let acc = accs.0.get_mut(&path).expect("listed key");
        if acc.count() == 0 {
            continue;
        }
        let l = acc.loss()?.f_mul_scalar(acc.weight)?;
        let name = if path.is_empty() {
            "mi_loss".to_owned()
        } else {
            format!("{path}.mi_loss")
        };
        // At the top level the context path is empty, so `name` is the full key.
        ctx.add_aux_loss(&name, l);
        acc.clear();
        n += 1;
    }
    Ok(n)
}

/// Step 9 for one layer, in training only: add each loss whose weight is
/// non-zero to `ctx` (`balance_loss`, `z_loss`, `cv_loss`, `mi_loss`,
/// `concentration_loss`), weighted. Expert choice needs no balance or CV²
/// loss (skipped); `hash` / `fixed` gates have nothing to train (all skipped).
pub fn add_aux_losses(config: &RouterConfig, routing: &Routing, ctx: &mut Context) -> Result<()> {
    add_aux_losses_masked(config, routing, None, ctx)
}

/// [`add_aux_losses`] over the real tokens of `mask: [T]` (padding excluded
/// from every loss; the layers pass the mask they routed with).
pub fn add_aux_losses_masked(
    config: &RouterConfig,
    routing: &Routing,
    mask: Option<&Tensor>,
    ctx: &mut Context,
) -> Result<()> {
    if !ctx.train || matches!(config.gate, GateType::Hash | GateType::Fixed) {
        return Ok(());
    }
    let ec = config.routing == RoutingMode::ExpertChoice;
    let log_probs = routing.log_probs.as_ref();
    if config.balance_weight > 0.0 && !ec {
        let l = balance_loss_masked(
            &routing.probs,
            &routing.experts,
            config.balance_variant,
            config.num_layers,
            mask,
        )?;
        ctx.add_aux_loss("balance_loss", l.f_mul_scalar(config.balance_weight)?);
    }
    if config.z_loss_weight > 0.0 {
        ctx.add_aux_loss(
            "z_loss",
            z_loss_masked(&routing.logits, mask)?.f_mul_scalar(config.z_loss_weight)?,
        );
    }
    if config.cv_weight > 0.0 && !ec {
        let load = match (config.load_estimator, &routing.noisy_logits) {
            (LoadEstimator::Smooth, Some(noisy)) if routing.noise_std > 0.0 => smooth_load_masked(
                &routing.logits,
                noisy,
                routing.noise_std,
                routing.top_k,
                mask,
            )?,
            _ => counts(
                &routing.experts,
                routing.num_experts,
                routing.probs.kind(),
                mask,
            )?,
        };
        let l = importance_load_cv2_masked(&routing.probs, &load, config.cv_var, mask)?;
        ctx.add_aux_loss("cv_loss", l.f_mul_scalar(config.cv_weight)?);
    }
    if config.mi_weight > 0.0 {
        if config.mi_accumulate {
            let path = ctx.path();
            if ctx.get::<MiAccumulators>().is_none() {
                ctx.insert(MiAccumulators::default());
            }
            let accs = ctx.get_mut::<MiAccumulators>().expect("inserted above");
            let acc = accs.0.entry(path).or_default();
            acc.weight = config.mi_weight;
            acc.add_masked(&routing.probs, log_probs, mask)?;
        } else {
            let l = mutual_information_loss_masked(&routing.probs, log_probs, mask)?;
            ctx.add_aux_loss("mi_loss", l.f_mul_scalar(config.mi_weight)?);
        }
    }
    if config.concentration_weight > 0.0 {
        let l = load_concentration_masked(&routing.probs, mask)?;
        ctx.add_aux_loss(
            "concentration_loss",
            l.f_mul_scalar(config.concentration_weight)?,
        );
    }
    Ok(())
}
