//! Growing and pruning a trained MoE (ModuleFormer, Shen et al., arXiv
//! 2306.04640 §4.3 "expanding" and §4.4 "pruning"; docs/moe-router.md,
//! Method, part 2, open choices `grow_experts(n_new, freeze_old)` and
//! `prune_experts(usage < threshold)`).
//!
//! **Grow.** `E → E + n` experts: `n` freshly initialised experts are
//! appended, and the router gets `n` new rows (linear weight rows, `mlp`
//! output rows or `cosine` centres). With `freeze_old`, the old experts move
//! to the frozen bank (`requires_grad = false`; the router stays trainable).
//! With `mask_new`, the new experts' logits are `−∞` (`router.active`), so
//! the layer computes exactly what it computed before until
//! [`unmask_experts`] is called (to train the new experts, unmask them).
//!
//! **Prune.** The usage of expert `e` on some data, `u_e` = kept assignments
//! to `e` ([`expert_usage`]); experts with `u_e < threshold` are removed from
//! the experts and the router. Returns the kept map `new index → old index`.
//! Outputs on that data are unchanged when every removed expert had no
//! assignment and the gates depend only on the chosen experts' logits
//! (`renorm`, `hard`); with `raw` or `pnorm` weights the surviving `p` are
//! renormalised over fewer experts, so gates change (fine-tune afterwards,
//! as ModuleFormer does after its load-concentration loss).
//!
//! **Attention experts** (ModuleFormer's MoA, [`MixtureOfAttention`]): the
//! same two operations on the per-expert query/output projections
//! ([`grow_attention_experts`], [`attention_expert_usage`],
//! [`prune_attention_experts`]). New experts get fresh `W_q^e`, `W_o^e`
//! (PyTorch `Linear` initialisation) and router rows; with `mask_new` the
//! layer's output is unchanged until [`unmask_attention_experts`]. With
//! `freeze_old`, the old experts' projections move to `frozen_q`/`frozen_o`
//! **and the shared key/value projections (plus head bias and GroupNorm)
//! are frozen too**: the old experts read them, so an old expert computes
//! exactly what it did whatever the new ones learn; the router and the new
//! experts train. Usage counts can leave out padding (`masks`).

use tensor_core::tch::{Kind, Tensor};
use tensor_core::{Context, TchResultExt};

use crate::error::{Error, Result};
use crate::moa::MixtureOfAttention;
use crate::moe::{ExpertActivation, ExpertWeights, MoeLayer};
use crate::router::{GateParams, Router};

fn detached(t: &Tensor, requires_grad: bool) -> Result<Tensor> {
    Ok(t.f_detach()?
        .f_contiguous()?
        .set_requires_grad(requires_grad))
}

fn cat_rows(old: &Tensor, new: &Tensor) -> Result<Tensor> {
    let new = new.f_to_kind(old.kind())?.f_to_device(old.device())?;
    detached(
        &Tensor::f_cat(&[old.f_detach()?, new], 0)?,
        old.requires_grad(),
    )
}

/// `[n, out, inp]` PyTorch-`Linear`-initialised expert weights like `like`.
fn new_experts(n: i64, out: i64, inp: i64, like: &Tensor) -> Result<Tensor> {
    let bound = 1.0 / (inp as f64).sqrt();
    let mut t = Tensor::f_empty([n, out, inp], (like.kind(), like.device()))?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t)
}

fn new_rows(rows: i64, cols: i64, like: &Tensor) -> Result<Tensor> {
    let bound = 1.0 / (cols as f64).sqrt();
    let mut t = Tensor::f_empty([rows, cols], (like.kind(), like.device()))?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t)
}

impl Router {
    /// Append `n` router rows (seeded by libtorch's generator); new experts are
    /// masked (`−∞` logits) when `mask_new`.
    pub fn grow(&mut self, n: i64, mask_new: bool) -> Result<()> {
        let e = self.num_experts();
        match &mut self.params {
            GateParams::Linear { weight } => {
                let r = new_rows(n, weight.size()[1], weight)?;
                *weight = cat_rows(weight, &r)?;
            }
            GateParams::Mlp { w2, .. } => {
                let r = new_rows(n, w2.size()[1], w2)?;
                *w2 = cat_rows(w2, &r)?;
            }
            GateParams::Cosine { centers, .. } => {
                let r = new_rows(n, centers.size()[1], centers)?;
                *centers = cat_rows(centers, &r)?;
            }
            GateParams::Fixed { .. } => {
                return Err(Error::config(
                    "hash/fixed routers have no rows to add (their assignment depends on E)",
                ));
            }
        }
        let dev = self.device();
        let old = match self.active.take() {
            Some(a) => a,
            None => Tensor::f_ones([e], (Kind::Bool, dev))?,
        };
        let new = if mask_new {
            Tensor::f_zeros([n], (Kind::Bool, dev))?
        } else {
            Tensor::f_ones([n], (Kind::Bool, dev))?
        };
        self.active = Some(Tensor::f_cat(&[old, new], 0)?);
        self.config.num_experts += n as usize;
        Ok(())
    }

    /// Keep router rows `keep` (i64 indices, ascending).
    pub fn select(&mut self, keep: &Tensor) -> Result<()> {
        let pick = |t: &Tensor| -> Result<Tensor> {
            detached(
                &t.f_index_select(0, &keep.f_to_device(t.device())?)?,
                t.requires_grad(),
            )
        };
        match &mut self.params {
            GateParams::Linear { weight } => *weight = pick(weight)?,
            GateParams::Mlp { w2, .. } => *w2 = pick(w2)?,
            GateParams::Cosine { centers, .. } => *centers = pick(centers)?,
            GateParams::Fixed { .. } => {
                return Err(Error::config("hash/fixed routers cannot be pruned"));
            }
        }
        if let Some(a) = &self.active {
            self.active = Some(a.f_index_select(0, &keep.f_to_device(a.device())?)?);
        }
        self.config.num_experts = keep.size()[0] as usize;
        Ok(())
    }

    fn device(&self) -> tensor_core::tch::Device {
        match &self.params {
            GateParams::Linear { weight } => weight.device(),
            GateParams::Mlp { w2, .. } => w2.device(),
            GateParams::Cosine { centers, .. } => centers.device(),
            GateParams::Fixed { .. } => tensor_core::tch::Device::Cpu,
        }
    }
}

/// Add `n_new` experts to `moe` (see the module docs).
pub fn grow_experts(
    moe: &mut MoeLayer,
    n_new: usize,
    freeze_old: bool,
    mask_new: bool,
) -> Result<()> {
    if n_new == 0 {
        return Err(Error::config("grow_experts: n_new must be at least 1"));
    }
    let n = n_new as i64;
    moe.router.grow(n, mask_new)?;
    let like = &moe.experts.w1;
    let mut fresh = ExpertWeights::new(
        n,
        moe.config.d_model,
        moe.config.d_ff,
        moe.config.activation == ExpertActivation::SwiGlu,
        moe.config.bias,
        like.device(),
    )?;
    for t in fresh.tensors_mut() {
        *t = detached(&t.f_to_kind(like.kind())?, true)?;
    }
    if freeze_old {
        let old = moe.expert_weights()?;
        let frozen = old.zip_map(None, &mut |t, _| detached(t, false))?;
        moe.frozen = Some(frozen);
        moe.experts = fresh;
    } else {
        moe.experts = moe.experts.zip_map(Some(&fresh), &mut |a, b| {
            let b = b.ok_or_else(|| Error::config("expert structure mismatch"))?;
            cat_rows(a, b)
        })?;
    }
    moe.config.router.num_experts = moe.router.config.num_experts;
    Ok(())
}

/// Let every expert be chosen again (clears `router.active`).
pub fn unmask_experts(moe: &mut MoeLayer) {
    moe.router.active = None;
}

/// `[E]` kept assignments per expert of `router` (evaluation mode, no
/// noise) over `inputs` (each `[..., d]`), summed; padding tokens left out
/// where `masks` (one per input, 1 = token) say so. f32 on the device.
fn router_usage(router: &Router, inputs: &[Tensor], masks: Option<&[Tensor]>) -> Result<Tensor> {
    const OP: &str = "expert_usage";
    if let Some(m) = masks
        && m.len() != inputs.len()
    {
        return Err(Error::config(format!(
            "{OP}: {} masks for {} inputs",
            m.len(),
            inputs.len()
        )));
    }
    let _g = tensor_core::tch::no_grad_guard();
    let mut total: Option<Tensor> = None;
    for (i, x) in inputs.iter().enumerate() {
        let xf = x.f_reshape([-1, router.d_model]).op(OP)?;
        let mut ctx = Context::eval();
        let r = router.route_masked(&xf, masks.map(|m| &m[i]), &mut ctx)?;
        let l = r.load()?;
        total = Some(match total {
            Some(t) => t.f_add(&l)?,
            None => l,
        });
    }
    total.ok_or_else(|| Error::missing(OP, "no inputs given"))
}

/// `[E]` kept assignments per expert of `moe`'s router (evaluation mode,
/// no noise) over `inputs` (each `[..., d]`), summed; f32 on the device.
pub fn expert_usage(moe: &MoeLayer, inputs: &[Tensor]) -> Result<Tensor> {
    router_usage(&moe.router, inputs, None)
}

/// [`expert_usage`] without the padding tokens of `masks` (one per input,
/// with its token count; 1 = token, 0 = padding).
pub fn expert_usage_masked(moe: &MoeLayer, inputs: &[Tensor], masks: &[Tensor]) -> Result<Tensor> {
    router_usage(&moe.router, inputs, Some(masks))
}

/// Indices `e` with `usage[e] >= threshold`; at least `top_k` must remain.
fn kept_experts(op: &str, router: &Router, usage: &Tensor, threshold: f64) -> Result<Vec<i64>> {
    let e = router.num_experts();
    if usage.size() != [e] {
        return Err(Error::shape(
            format!("{op} usage"),
            format!("[{e}]"),
            usage.size(),
        ));
    }
    let u = Vec::<f64>::try_from(
        usage
            .f_to_kind(Kind::Double)?
            .f_to_device(tensor_core::tch::Device::Cpu)?,
    )
    .map_err(tensor_core::Error::from)?;
    if u.iter().any(|x| !x.is_finite()) {
        return Err(Error::config(format!("{op}: usage holds NaN or Inf")));
    }
    let keep: Vec<i64> = (0..e).filter(|&i| u[i as usize] >= threshold).collect();
    let k = router.config.top_k;
    if keep.len() < k {
        return Err(Error::config(format!(
            "{op}: only {} experts have usage >= {threshold}, top_k = {k} need to remain",
            keep.len()
        )));
    }
    Ok(keep)
}

/// Remove the experts with `usage[e] < threshold` (`usage: [E]`); returns the
/// kept map `new index → old index`. At least `top_k` experts must remain.
pub fn prune_experts(moe: &mut MoeLayer, usage: &Tensor, threshold: f64) -> Result<Vec<i64>> {
    let keep = kept_experts("prune_experts", &moe.router, usage, threshold)?;
    let dev = moe.experts.w1.device();
    let idx = Tensor::from_slice(&keep).f_to_device(dev)?;
    moe.router.select(&idx)?;
    let n_frozen = moe.frozen.as_ref().map_or(0, ExpertWeights::num_experts);
    let all = moe.expert_weights()?;
    let kept_frozen: Vec<i64> = keep.iter().copied().filter(|&i| i < n_frozen).collect();
    let nf = kept_frozen.len() as i64;
    let nk = keep.len() as i64;
    let take = |t: &Tensor, start: i64, len: i64, rg: bool| -> Result<Tensor> {
        let picked = t.f_index_select(0, &idx)?.f_narrow(0, start, len)?;
        detached(&picked, rg)
    };
    if moe.frozen.is_some() {
        moe.frozen = if nf > 0 {
            Some(all.zip_map(None, &mut |t, _| take(t, 0, nf, false))?)
        } else {
            None
        };
    }
    let trainable_rg = moe.experts.w1.requires_grad();
    moe.experts = all.zip_map(None, &mut |t, _| take(t, nf, nk - nf, trainable_rg))?;
    moe.config.router.num_experts = keep.len();
    Ok(keep)
}

/// Add `n_new` attention experts to `moa` (see the module docs): fresh
/// `W_q^e`, `W_o^e` and router rows; new experts masked when `mask_new`;
/// old experts (and the shared K/V, head bias, GroupNorm) frozen when `freeze_old`.
pub fn grow_attention_experts(
    moa: &mut MixtureOfAttention,
    n_new: usize,
    freeze_old: bool,
    mask_new: bool,
) -> Result<()> {
    if n_new == 0 {
        return Err(Error::config(
            "grow_attention_experts: n_new must be at least 1",
        ));
    }
    let n = n_new as i64;
    let (a, d) = (moa.config.att_hidden, moa.config.d_model);
    moa.router.grow(n, mask_new)?;
    let q_new = detached(&new_experts(n, a, d, &moa.w_q)?, true)?;
    let o_new = detached(&new_experts(n, d, a, &moa.w_o)?, true)?;
    if freeze_old {
        let (q, o) = moa.expert_projections()?;
        moa.frozen_q = Some(detached(&q, false)?);
        moa.frozen_o = Some(detached(&o, false)?);
        moa.w_q = q_new;
        moa.w_o = o_new;
        for t in [
            &mut moa.w_k,
            &mut moa.w_v,
            &mut moa.head_bias,
            &mut moa.gn_weight,
            &mut moa.gn_bias,
        ]
        .into_iter()
        .flatten()
        {
            *t = detached(t, false)?;
        }
    } else {
        moa.w_q = cat_rows(&moa.w_q, &q_new)?;
        moa.w_o = cat_rows(&moa.w_o, &o_new)?;
    }
    moa.config.router.num_experts = moa.router.config.num_experts;
    Ok(())
}

/// Let every attention expert be chosen again (clears `router.active`).
pub fn unmask_attention_experts(moa: &mut MixtureOfAttention) {
    moa.router.active = None;
}

/// `[E]` kept assignments per attention expert of `moa`'s router over
/// `inputs` (the MoA's inputs, `[B, T, d]` or `[N, d]`), summed; padding
/// left out where `masks` (one per input, 1 = token) say so.
pub fn attention_expert_usage(
    moa: &MixtureOfAttention,
    inputs: &[Tensor],
    masks: Option<&[Tensor]>,
) -> Result<Tensor> {
    router_usage(&moa.router, inputs, masks)
}

/// Remove the attention experts with `usage[e] < threshold`; returns the
/// kept map `new index → old index` (at least `top_k` must remain). Outputs
/// on the data are unchanged when the removed experts had no assignment
/// and the gates are `renorm` or `hard` (as for [`prune_experts`]).
pub fn prune_attention_experts(
    moa: &mut MixtureOfAttention,
    usage: &Tensor,
    threshold: f64,
) -> Result<Vec<i64>> {
    let keep = kept_experts("prune_attention_experts", &moa.router, usage, threshold)?;
    let idx = Tensor::from_slice(&keep).f_to_device(moa.w_q.device())?;
    moa.router.select(&idx)?;
    let n_frozen = moa.frozen_q.as_ref().map_or(0, |t| t.size()[0]);
    let (q, o) = moa.expert_projections()?;
    let nf = keep.iter().filter(|&&i| i < n_frozen).count() as i64;
    let nk = keep.len() as i64;
    let take = |t: &Tensor, start: i64, len: i64, rg: bool| -> Result<Tensor> {
        detached(&t.f_index_select(0, &idx)?.f_narrow(0, start, len)?, rg)
    };
    let trainable_rg = moa.w_q.requires_grad();
    if moa.frozen_q.is_some() {
        if nf > 0 {
            moa.frozen_q = Some(take(&q, 0, nf, false)?);
            moa.frozen_o = Some(take(&o, 0, nf, false)?);
        } else {
            moa.frozen_q = None;
            moa.frozen_o = None;
        }
    }
    moa.w_q = take(&q, nf, nk - nf, trainable_rg)?;
    moa.w_o = take(&o, nf, nk - nf, trainable_rg)?;
    moa.config.router.num_experts = keep.len();
    Ok(keep)
}
