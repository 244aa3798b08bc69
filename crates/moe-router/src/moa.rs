//! Mixture of attention heads (MoA), ModuleFormer's attention experts
//! (docs/moe-router.md, Method, part 2 step 3; Shen et al., arXiv 2306.04640
//! eqs. 4–6; Zhang et al., "Mixture of Attention Heads", arXiv 2210.05144),
//! with stick-breaking attention ([`crate::stick_breaking`]).
//!
//! Keys and values are shared by all experts: `K = x W_kᵀ`, `V = x W_vᵀ`
//! (identities with `kv_projection = false`, which needs `att_hidden = d`;
//! MoLM uses that with one head). Expert `e` owns a query projection
//! `W_q^e: d → att_hidden` and an output projection `W_o^e: att_hidden → d`.
//! For token `t` routed to experts `e_t1..e_tk` with gates `g_tj`:
//!
//! `q^(e)_t = x_t W_q^eᵀ` (split into `n_head` heads),
//! `y^(e)_t = SBAttn(q^(e)_t, K, V)` (causal, over all earlier tokens),
//! `out_t = Σ_j g_tj · y^(e_tj)_t W_o^{e_tj}ᵀ`.
//!
//! With `add_head_bias` the remainder `rem · b_head` is added per head and a
//! GroupNorm (one group per head) precedes `W_o`. Routing is dropless token
//! choice (each token's query depends only on that token, so causality holds).
//!
//! **Computation.** The `k` chosen queries of every token come from one
//! grouped matmul (`tensor_core::grouped`, one host sync per call for the
//! group sizes), the `k` query sets attend as `k` extra "head groups" against
//! the shared `[B, 1, H, T, d_h]` keys (broadcast, not copied), and the
//! per-expert output projections are a second grouped matmul before the
//! gated `unpermute`. [`MoaPath::Dense`](crate::moe::MoePath::Dense) runs every
//! expert on every token (the test reference).
//!
//! **Padding.** The router's token mask is the last `T` columns of
//! `ctx.attention_mask` ([`crate::router::token_mask`]): padding queries are
//! not dispatched (output 0) and count in no loss or statistic; padding keys
//! are hidden by the same mask.
//!
//! **Growing and pruning** ([`crate::extend::grow_attention_experts`],
//! [`crate::extend::prune_attention_experts`]): experts frozen by growing
//! live in `frozen_q` / `frozen_o` (indices `0..E_frozen`, before the
//! trainable ones).

use serde::{Deserialize, Serialize};
use tensor_core::grouped::{Dispatch, grouped_linear};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::{Context, Module};

use crate::config::{RouterConfig, RoutingMode};
use crate::error::{Error, Result};
use crate::losses::add_aux_losses_masked;
use crate::moe::MoePath;
use crate::router::{Router, Routing, token_mask};
use crate::stick_breaking::{SbRemainder, SbVariant, stick_breaking_attention};

/// Configuration of a [`MixtureOfAttention`] (JSON-serialisable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoaConfig {
    pub d_model: i64,
    /// Width of each expert's queries (and of the shared keys and values).
    pub att_hidden: i64,
    pub n_head: i64,
    /// Dropless token choice (`capacity_factor = 0`).
    pub router: RouterConfig,
    pub variant: SbVariant,
    pub remainder: SbRemainder,
    /// Project the shared keys and values (false: `K = V = x`, needs `att_hidden = d_model`).
    pub kv_projection: bool,
    pub group_norm_eps: f64,
    pub path: MoePath,
}

impl Default for MoaConfig {
    fn default() -> Self {
        Self {
            d_model: 0,
            att_hidden: 0,
            n_head: 1,
            router: RouterConfig::moduleformer(16, 2),
            variant: SbVariant::Mf,
            remainder: SbRemainder::None,
            kv_projection: true,
            group_norm_eps: 1e-5,
            path: MoePath::Sparse,
        }
    }
}

impl MoaConfig {
    /// ModuleFormer's MoA: MLP gate, raw weights, MF stick-breaking, no remainder.
    pub fn new(
        d_model: i64,
        att_hidden: i64,
        n_head: i64,
        num_experts: usize,
        top_k: usize,
    ) -> Self {
        Self {
            d_model,
            att_hidden,
            n_head,
            router: RouterConfig::moduleformer(num_experts, top_k),
            ..Self::default()
        }
    }

    pub fn head_dim(&self) -> i64 {
        if self.n_head > 0 {
            self.att_hidden / self.n_head
        } else {
            0
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.d_model <= 0 || self.att_hidden <= 0 || self.n_head <= 0 {
            return Err(Error::config(
                "MoA: d_model, att_hidden and n_head must be positive",
            ));
        }
        if self.att_hidden % self.n_head != 0 {
            return Err(Error::config(format!(
                "MoA: n_head = {} must divide att_hidden = {}",
                self.n_head, self.att_hidden
            )));
        }
        if !self.kv_projection && self.att_hidden != self.d_model {
            return Err(Error::config(
                "MoA: kv_projection = false needs att_hidden = d_model",
            ));
        }
        if self.router.routing != RoutingMode::TokenChoice || self.router.capacity_factor > 0.0 {
            return Err(Error::config(
                "MoA routes dropless token choice: set router.capacity_factor = 0 and routing = token_choice",
            ));
        }
        if self.router.eval_capacity_factor.is_some_and(|c| c > 0.0) {
            return Err(Error::config(
                "MoA routes dropless: eval_capacity_factor must be unset or 0",
            ));
        }
        self.router.validate()
    }
}

/// The shared keys and values of the tokens decoded so far (`[B, 1, H, T, d_h]`).
#[derive(Debug, Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.k.as_ref().map_or(0, |k| k.size()[3])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// ModuleFormer's mixture of attention heads, a [`Module`] on `[B, T, d]`
/// that can replace a decoder's attention slot (`model.replace("h.3.attn", ...)`).
/// Reads the key-padding mask from `ctx.attention_mask` (`[B, T]`).
#[derive(Debug)]
pub struct MixtureOfAttention {
    pub config: MoaConfig,
    pub router: Router,
    /// `[att_hidden, d]` shared key projection (with `kv_projection`).
    pub w_k: Option<Tensor>,
    /// `[att_hidden, d]` shared value projection.
    pub w_v: Option<Tensor>,
    /// `[E, att_hidden, d]` per-expert query projections.
    pub w_q: Tensor,
    /// `[E, d, att_hidden]` per-expert output projections.
    pub w_o: Tensor,
    /// Frozen experts' query / output projections (after growing with `freeze_old`).
    pub frozen_q: Option<Tensor>,
    pub frozen_o: Option<Tensor>,
    /// `[att_hidden]` head bias, GroupNorm weight and bias (`add_head_bias` only).
    pub head_bias: Option<Tensor>,
    pub gn_weight: Option<Tensor>,
    pub gn_bias: Option<Tensor>,
}

fn uniform(shape: &[i64], fan_in: i64, device: Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut t = Tensor::f_empty(shape, (Kind::Float, device))?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t.set_requires_grad(true))
}

impl MixtureOfAttention {
    pub fn new(config: MoaConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let (d, a) = (config.d_model, config.att_hidden);
        let e = config.router.num_experts as i64;
        let router = Router::new(d, config.router.clone(), device)?;
        let (w_k, w_v) = if config.kv_projection {
            (
                Some(uniform(&[a, d], d, device)?),
                Some(uniform(&[a, d], d, device)?),
            )
        } else {
            (None, None)
        };
        let bias = config.remainder == SbRemainder::AddHeadBias;
        let opts = (Kind::Float, device);
        Ok(Self {
            router,
            w_k,
            w_v,
            w_q: uniform(&[e, a, d], d, device)?,
            w_o: uniform(&[e, d, a], a, device)?,
            frozen_q: None,
            frozen_o: None,
            head_bias: if bias {
                Some(Tensor::f_zeros([a], opts)?.set_requires_grad(true))
            } else {
                None
            },
            gn_weight: if bias {
                Some(Tensor::f_ones([a], opts)?.set_requires_grad(true))
            } else {
                None
            },
            gn_bias: if bias {
                Some(Tensor::f_zeros([a], opts)?.set_requires_grad(true))
            } else {
                None
            },
            config,
        })
    }

    pub fn num_experts(&self) -> i64 {
        self.router.num_experts()
    }

    /// All experts' `(W_q [E, att, d], W_o [E, d, att])`, frozen ones first.
    pub fn expert_projections(&self) -> Result<(Tensor, Tensor)> {
        Ok(match (&self.frozen_q, &self.frozen_o) {
            (Some(fq), Some(fo)) => (
                Tensor::f_cat(&[fq, &self.w_q], 0)?,
                Tensor::f_cat(&[fo, &self.w_o], 0)?,
            ),
            _ => (self.w_q.shallow_clone(), self.w_o.shallow_clone()),
        })
    }

    /// `[B, T, att] -> [B, 1, H, T, d_h]` (shared keys or values).
    fn shared(&self, x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        let s = x.size();
        let (h, dh) = (self.config.n_head, self.config.head_dim());
        let y = match w {
            Some(w) => x.f_linear::<Tensor>(w, None)?,
            None => x.shallow_clone(),
        };
        Ok(y.f_view([s[0], s[1], h, dh])?
            .f_permute([0, 2, 1, 3])?
            .f_unsqueeze(1)?)
    }

    /// Remainder `rem · b_head` and GroupNorm on per-head outputs `o: [B, G, H, T, d_h]`
    /// (`rem: [B, G, H, T]`); returns `[B, G, H, T, d_h]` before the output projection,
    /// normalised over rows `[.., att]` when `add_head_bias`.
    fn head_bias_and_norm(&self, o: Tensor, rem: &Tensor) -> Result<Tensor> {
        let Some(b) = &self.head_bias else {
            return Ok(o);
        };
        let (h, dh) = (self.config.n_head, self.config.head_dim());
        let bias = b.f_to_kind(o.kind())?.f_view([1, 1, h, 1, dh])?;
        let o = o.f_add(&rem.f_to_kind(o.kind())?.f_unsqueeze(-1)?.f_mul(&bias)?)?;
        // GroupNorm over each token's [att] vector, one group per head.
        let s = o.size();
        let rows = o.f_permute([0, 1, 3, 2, 4])?.f_reshape([-1, h * dh])?;
        let w = self
            .gn_weight
            .as_ref()
            .map(|w| w.f_to_kind(o.kind()))
            .transpose()?;
        let bb = self
            .gn_bias
            .as_ref()
            .map(|w| w.f_to_kind(o.kind()))
            .transpose()?;
        let n = rows.f_group_norm(
            h,
            w.as_ref(),
            bb.as_ref(),
            self.config.group_norm_eps,
            false,
        )?;
        Ok(n.f_view([s[0], s[1], s[3], h, dh])?
            .f_permute([0, 1, 3, 2, 4])?)
    }

    /// `(out, routing)` for `x: [B, T, d]`, losses and statistics added to `ctx`.
    pub fn forward_with_routing(&self, x: &Tensor, ctx: &mut Context) -> Result<(Tensor, Routing)> {
        self.run(x, ctx, None)
    }

    /// Incremental decoding: `x: [B, T_new, d]` are the next tokens; the shared
    /// keys and values of the earlier ones come from `cache` (which grows by
    /// `T_new`). `ctx.attention_mask`, if set, covers all `T_cache + T_new` keys.
    /// The cache holds only the shared `K`, `V` (`[B, 1, H, T, d_h]` each),
    /// whatever the number of experts.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        ctx: &mut Context,
    ) -> Result<Tensor> {
        Ok(self.run(x, ctx, Some(cache))?.0)
    }

    fn run(
        &self,
        x: &Tensor,
        ctx: &mut Context,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Routing)> {
        const OP: &str = "MixtureOfAttention";
        let s = x.size();
        let d = self.config.d_model;
        if s.len() != 3 || s[2] != d {
            return Err(Error::shape(OP, format!("[batch, seq, {d}]"), s));
        }
        let (b, t) = (s[0], s[1]);
        let n = b * t;
        let xf = x.f_reshape([n, d])?;
        let mask = token_mask(&self.router.config, ctx, n)?;
        let routing = self.router.route_masked(&xf, mask.as_ref(), ctx)?;
        add_aux_losses_masked(&self.router.config, &routing, mask.as_ref(), ctx)?;
        let mut kk = self.shared(
            x,
            self.w_k
                .as_ref()
                .map(|w| w.f_to_kind(x.kind()))
                .transpose()?
                .as_ref(),
        )?;
        let mut vv = self.shared(
            x,
            self.w_v
                .as_ref()
                .map(|w| w.f_to_kind(x.kind()))
                .transpose()?
                .as_ref(),
        )?;
        if let Some(c) = cache {
            if let (Some(k0), Some(v0)) = (&c.k, &c.v) {
                if k0.size()[0] != b {
                    return Err(Error::shape(
                        "MoA KV cache",
                        format!("batch {b}"),
                        k0.size(),
                    ));
                }
                kk = Tensor::f_cat(&[k0, &kk], 3)?;
                vv = Tensor::f_cat(&[v0, &vv], 3)?;
            }
            c.k = Some(kk.shallow_clone());
            c.v = Some(vv.shallow_clone());
        }
        let tk = kk.size()[3];
        let key_mask = match &ctx.attention_mask {
            Some(m) if m.size() == [b, tk] => Some(m.f_view([b, 1, 1, 1, tk])?),
            Some(m) => {
                return Err(Error::shape(
                    OP,
                    format!("attention_mask [{b}, {tk}]"),
                    m.size(),
                ));
            }
            None => None,
        };
        let y = match self.config.path {
            MoePath::Sparse => self.sparse(&xf, &routing, &kk, &vv, key_mask.as_ref(), b, t)?,
            MoePath::Dense => self.dense(&xf, &routing, &kk, &vv, key_mask.as_ref(), b, t)?,
        };
        Ok((y.f_view([b, t, d])?, routing))
    }

    #[allow(clippy::too_many_arguments)]
    fn sparse(
        &self,
        xf: &Tensor,
        routing: &Routing,
        kk: &Tensor,
        vv: &Tensor,
        key_mask: Option<&Tensor>,
        b: i64,
        t: i64,
    ) -> Result<Tensor> {
        let (h, dh, a) = (
            self.config.n_head,
            self.config.head_dim(),
            self.config.att_hidden,
        );
        let k = routing.top_k;
        let nk = b * t * k;
        let disp = Dispatch::new(&routing.experts, routing.num_experts)?;
        let counts = disp.counts_host()?;
        let xs = disp.permute(xf)?;
        let (w_q, w_o) = self.expert_projections()?;
        let q_sorted = grouped_linear(&xs, &counts, &w_q.f_to_kind(xf.kind())?, None)?;
        let q = Tensor::f_zeros([nk, a], (q_sorted.kind(), q_sorted.device()))?
            .f_index_copy(0, &disp.order, &q_sorted)?
            .f_view([b, t, k, h, dh])?
            .f_permute([0, 2, 3, 1, 4])?; // [B, k, H, T, dh]
        let sb = stick_breaking_attention(
            &q,
            kk,
            vv,
            self.config.variant,
            self.config.remainder == SbRemainder::AddCurrentValue,
            key_mask,
        )?;
        let o = self.head_bias_and_norm(sb.out, &sb.rem)?;
        let o = o.f_permute([0, 3, 1, 2, 4])?.f_reshape([nk, a])?; // flat (b, t, j)
        let o_sorted = o.f_index_select(0, &disp.order)?;
        let y = grouped_linear(&o_sorted, &counts, &w_o.f_to_kind(xf.kind())?, None)?;
        Ok(disp.unpermute(&y, Some(&routing.gates.f_to_kind(xf.kind())?))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn dense(
        &self,
        xf: &Tensor,
        routing: &Routing,
        kk: &Tensor,
        vv: &Tensor,
        key_mask: Option<&Tensor>,
        b: i64,
        t: i64,
    ) -> Result<Tensor> {
        let (h, dh, a) = (
            self.config.n_head,
            self.config.head_dim(),
            self.config.att_hidden,
        );
        let e = routing.num_experts;
        let n = b * t;
        let (w_q, w_o) = self.expert_projections()?;
        let wq = w_q.f_to_kind(xf.kind())?;
        let q = xf
            .f_matmul(&wq.f_transpose(1, 2)?)? // [E, N, a]
            .f_view([e, b, t, h, dh])?
            .f_permute([1, 0, 3, 2, 4])?; // [B, E, H, T, dh]
        let sb = stick_breaking_attention(
            &q,
            kk,
            vv,
            self.config.variant,
            self.config.remainder == SbRemainder::AddCurrentValue,
            key_mask,
        )?;
        let o = self.head_bias_and_norm(sb.out, &sb.rem)?;
        let o = o.f_permute([1, 0, 3, 2, 4])?.f_reshape([e, n, a])?;
        let y = o.f_matmul(&w_o.f_to_kind(xf.kind())?.f_transpose(1, 2)?)?; // [E, N, d]
        let cw = routing.combine_weights()?.f_to_kind(xf.kind())?;
        Ok(Tensor::f_einsum("ne,end->nd", &[&cw, &y], None::<&[i64]>)?)
    }
}

impl Module for MixtureOfAttention {
    fn kind(&self) -> &'static str {
        "MixtureOfAttention"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        Ok(self.forward_with_routing(xs, ctx).map(|(y, _)| y)?)
    }

    fn params(&self) -> Vec<(&str, &Tensor)> {
        let mut v: Vec<(&str, &Tensor)> = self.router.params();
        if let (Some(k), Some(vv)) = (&self.w_k, &self.w_v) {
            v.push(("k_proj.weight", k));
            v.push(("v_proj.weight", vv));
        }
        if let (Some(fq), Some(fo)) = (&self.frozen_q, &self.frozen_o) {
            v.push(("frozen_experts.q_proj", fq));
            v.push(("frozen_experts.o_proj", fo));
        }
        v.push(("experts.q_proj", &self.w_q));
        v.push(("experts.o_proj", &self.w_o));
        if let (Some(b), Some(w), Some(bb)) = (&self.head_bias, &self.gn_weight, &self.gn_bias) {
            v.push(("head_bias", b));
            v.push(("group_norm.weight", w));
            v.push(("group_norm.bias", bb));
        }
        v
    }

    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let mut v: Vec<(&str, &mut Tensor)> = self.router.params_mut();
        if let (Some(k), Some(vv)) = (&mut self.w_k, &mut self.w_v) {
            v.push(("k_proj.weight", k));
            v.push(("v_proj.weight", vv));
        }
        if let (Some(fq), Some(fo)) = (&mut self.frozen_q, &mut self.frozen_o) {
            v.push(("frozen_experts.q_proj", fq));
            v.push(("frozen_experts.o_proj", fo));
        }
        v.push(("experts.q_proj", &mut self.w_q));
        v.push(("experts.o_proj", &mut self.w_o));
        if let (Some(b), Some(w), Some(bb)) =
            (&mut self.head_bias, &mut self.gn_weight, &mut self.gn_bias)
        {
            v.push(("head_bias", b));
            v.push(("group_norm.weight", w));
            v.push(("group_norm.bias", bb));
        }
        v
    }
}
