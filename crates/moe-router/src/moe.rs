//! The sparse MoE feed-forward layer: dispatch (step 8 of METHODS.md §2.1),
//! expert computation and combine (Switch, arXiv 2101.03961 eq. 1–2;
//! MegaBlocks dMoE, arXiv 2211.15841; ModuleFormer MoE_FFN, arXiv 2306.04640
//! §2.2 step 2).
//!
//! For token `x_t`, its chosen experts `e_t1..e_tk` with gates `g_tj` (0 for
//! a dropped assignment):
//!
//! `y_t = Σ_j g_tj f_{e_tj}(x_t)`,
//! `f_e(x) = act(x W1_eᵀ + b1_e) W2_eᵀ + b2_e` (GELU / GELU-tanh / ReLU), or
//! `f_e(x) = (SiLU(x Wg_eᵀ) ⊙ x W1_eᵀ) W2_eᵀ` (SwiGLU),
//!
//! with the experts stacked: `W1, Wg: [E, d_ff, d]`, `W2: [E, d, d_ff]`,
//! `b1: [E, d_ff]`, `b2: [E, d]` (`tensor_core::grouped`'s `[E, out, in]`
//! layout). Four computations of the same `y` ([`MoePath`], chosen from the routing):
//! - **capacity** (`cf > 0`): every assignment was given a slot `< C` or
//!   dropped by the router ([`crate::capacity`]); an `[E, C, d]` buffer is
//!   gathered from the tokens (empty slots read a zero row), the experts run
//!   as two batched matmuls with the gates applied to the hidden activation
//!   (`g (h W2ᵀ + b2) = (g h) W2ᵀ + g b2`), and the rows are `index_add`ed
//!   back to their tokens. **No host synchronisation.**
//! - **dropless** (`cf = 0`), **one host sync per call** ([`DroplessKernel`]):
//!   by default the capacity path with `C = max_e n_e` (the sync reads that
//!   one integer; nothing is dropped), falling back to `tensor_core::grouped`
//!   when padding would more than double the rows; or `tensor_core::grouped`
//!   itself — [`Dispatch`] (stable sort by expert), [`grouped_linear`] per
//!   expert segment, `unpermute` with the gates (the sync reads the `E`
//!   segment sizes, [`Dispatch::counts_host`]). Measured on 2 CPU cores
//!   (single-threaded, fwd + bwd, 8192 tokens, `benches/moe_router.rs`): padded 483 ms vs grouped
//!   679 ms at E = 64 / k = 8 (many tiny matmuls), but 175 vs 145 ms at
//!   E = 16 / k = 2 with an untrained, unbalanced router (padding waste).
//! - **expert choice**: the `[E, C]` token lists gather an `[E, C, d]` batch,
//!   two batched matmuls, `index_add` back with weights `S_te`; no host sync.
//! - **dense** (reference, tests): every expert on every token, combined with
//!   the `[T, E]` matrix of gates. `O(E)` times the work.
//!
//! Gradients reach the experts and, through the gates, the router.
//! Auxiliary losses go to `ctx.add_aux_loss` (training only) and per-expert
//! statistics to `ctx.add_stat` (every call), under the layer's path.

use serde::{Deserialize, Serialize};
use tensor_core::grouped::{Dispatch, grouped_linear};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::{Context, Module, TchResultExt};

use crate::capacity::assign_slots;
use crate::config::{DropPolicy, RouterConfig};
use crate::error::{Error, Result, check_rows};
use crate::losses::add_aux_losses;
use crate::router::{Router, Routing};

/// The experts' non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExpertActivation {
    /// Exact GELU.
    #[default]
    Gelu,
    /// `gelu_new` (ModuleFormer).
    GeluTanh,
    Relu,
    /// `SiLU(x Wgᵀ) ⊙ x W1ᵀ` (adds the `w_gate` weights).
    SwiGlu,
}

impl ExpertActivation {
    fn apply(self, h: &Tensor) -> Result<Tensor> {
        Ok(match self {
            ExpertActivation::Gelu => h.f_gelu("none")?,
            ExpertActivation::GeluTanh => h.f_gelu("tanh")?,
            ExpertActivation::Relu => h.f_relu()?,
            ExpertActivation::SwiGlu => h.f_silu()?,
        })
    }
}

/// Which computation `forward` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MoePath {
    /// Capacity, dropless or expert choice, as the routing says.
    #[default]
    Sparse,
    /// Every expert on every token, masked by the gates (the reference).
    Dense,
}

/// How the dropless path computes the experts (both need one host sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DroplessKernel {
    /// Pad every expert's group to the largest one, `C = max_e n_e` (the one
    /// host sync reads `C`), then the capacity path's two batched matmuls.
    /// Falls back to `Grouped` when padding would more than double the rows
    /// (`E · C > 2 T k`, e.g. a collapsed router). Default: two large ops
    /// beat `E` small ones when experts are many or narrow; `Grouped` wins
    /// for few experts with unbalanced loads (see `benches/moe_router.rs`).
    #[default]
    Padded,
    /// `tensor_core::grouped`: one matmul per expert segment (the host sync
    /// reads the `E` segment sizes).
    Grouped,
}

/// Configuration of a [`MoeLayer`] (JSON-serialisable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoeConfig {
    pub d_model: i64,
    /// Hidden width of each expert.
    pub d_ff: i64,
    pub activation: ExpertActivation,
    /// Per-expert biases `b1`, `b2` (false: ModuleFormer has none).
    pub bias: bool,
    pub router: RouterConfig,
    pub path: MoePath,
    pub dropless_kernel: DroplessKernel,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            d_model: 0,
            d_ff: 0,
            activation: ExpertActivation::Gelu,
            bias: false,
            router: RouterConfig::default(),
            path: MoePath::Sparse,
            dropless_kernel: DroplessKernel::Padded,
        }
    }
}

impl MoeConfig {
    pub fn new(d_model: i64, d_ff: i64, router: RouterConfig) -> Self {
        Self {
            d_model,
            d_ff,
            router,
            ..Self::default()
        }
    }

    /// ModuleFormer's MoE FFN: MLP gate, raw weights, dropless, GELU-tanh, no biases.
    pub fn moduleformer(d_model: i64, d_ff: i64, num_experts: usize, top_k: usize) -> Self {
        Self {
            activation: ExpertActivation::GeluTanh,
            ..Self::new(
                d_model,
                d_ff,
                RouterConfig::moduleformer(num_experts, top_k),
            )
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.d_model <= 0 || self.d_ff <= 0 {
            return Err(Error::config(format!(
                "MoE: d_model and d_ff must be positive, got {} and {}",
                self.d_model, self.d_ff
            )));
        }
        self.router.validate()
    }
}

/// Stacked expert weights (`[E, out, in]` layout).
#[derive(Debug)]
pub struct ExpertWeights {
    /// `[E, d_ff, d]`
    pub w1: Tensor,
    /// `[E, d_ff, d]` (SwiGLU only)
    pub w_gate: Option<Tensor>,
    /// `[E, d, d_ff]`
    pub w2: Tensor,
    /// `[E, d_ff]`
    pub b1: Option<Tensor>,
    /// `[E, d]`
    pub b2: Option<Tensor>,
}

fn uniform(shape: &[i64], fan_in: i64, device: Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut t = Tensor::f_empty(shape, (Kind::Float, device))?;
    let _ = t.f_uniform_(-bound, bound)?;
    Ok(t.set_requires_grad(true))
}

impl ExpertWeights {
    /// `E` freshly initialised experts (PyTorch `Linear` initialisation per expert).
    pub fn new(
        num_experts: i64,
        d_model: i64,
        d_ff: i64,
        gated: bool,
        bias: bool,
        device: Device,
    ) -> Result<Self> {
        let (e, d, f) = (num_experts, d_model, d_ff);
        Ok(Self {
            w1: uniform(&[e, f, d], d, device)?,
            w_gate: if gated {
                Some(uniform(&[e, f, d], d, device)?)
            } else {
                None
            },
            w2: uniform(&[e, d, f], f, device)?,
            b1: if bias {
                Some(uniform(&[e, f], d, device)?)
            } else {
                None
            },
            b2: if bias {
                Some(uniform(&[e, d], f, device)?)
            } else {
                None
            },
        })
    }

    pub fn num_experts(&self) -> i64 {
        self.w1.size()[0]
    }

    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.w1];
        v.extend(self.w_gate.as_ref());
        v.push(&self.w2);
        v.extend(self.b1.as_ref());
        v.extend(self.b2.as_ref());
        v
    }

    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.w1];
        v.extend(self.w_gate.as_mut());
        v.push(&mut self.w2);
        v.extend(self.b1.as_mut());
        v.extend(self.b2.as_mut());
        v
    }

    fn names(&self, frozen: bool) -> Vec<&'static str> {
        let n = |a: &'static str, b: &'static str| if frozen { b } else { a };
        let mut v = vec![n("experts.w1", "frozen_experts.w1")];
        if self.w_gate.is_some() {
            v.push(n("experts.w_gate", "frozen_experts.w_gate"));
        }
        v.push(n("experts.w2", "frozen_experts.w2"));
        if self.b1.is_some() {
            v.push(n("experts.b1", "frozen_experts.b1"));
        }
        if self.b2.is_some() {
            v.push(n("experts.b2", "frozen_experts.b2"));
        }
        v
    }

    /// Apply `f` to every tensor pairwise with `other`'s (same structure).
    pub(crate) fn zip_map(
        &self,
        other: Option<&ExpertWeights>,
        f: &mut dyn FnMut(&Tensor, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<ExpertWeights> {
        Ok(ExpertWeights {
            w1: f(&self.w1, other.map(|o| &o.w1))?,
            w_gate: match &self.w_gate {
                Some(g) => Some(f(g, other.and_then(|o| o.w_gate.as_ref()))?),
                None => None,
            },
            w2: f(&self.w2, other.map(|o| &o.w2))?,
            b1: match &self.b1 {
                Some(b) => Some(f(b, other.and_then(|o| o.b1.as_ref()))?),
                None => None,
            },
            b2: match &self.b2 {
                Some(b) => Some(f(b, other.and_then(|o| o.b2.as_ref()))?),
                None => None,
            },
        })
    }
}

/// A mixture-of-experts FFN, a [`Module`] that can replace a `FeedForward`
/// slot (`model.replace("h.3.mlp.(ffn)", Box::new(moe))`). Input `[..., d]`.
#[derive(Debug)]
pub struct MoeLayer {
    pub config: MoeConfig,
    pub router: Router,
    /// Trainable experts (indices after the frozen ones).
    pub experts: ExpertWeights,
    /// Experts frozen by [`crate::extend::grow_experts`] (indices `0..E_frozen`).
    pub frozen: Option<ExpertWeights>,
}

impl MoeLayer {
    /// Fresh router and experts (seed with `tensor_core::testing::with_seed`).
    pub fn new(config: MoeConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let router = Router::new(config.d_model, config.router.clone(), device)?;
        let experts = ExpertWeights::new(
            config.router.num_experts as i64,
            config.d_model,
            config.d_ff,
            config.activation == ExpertActivation::SwiGlu,
            config.bias,
            device,
        )?;
        Ok(Self {
            config,
            router,
            experts,
            frozen: None,
        })
    }

    pub fn num_experts(&self) -> i64 {
        self.router.num_experts()
    }

    /// All experts' weights (frozen ones first; a concatenation when some are frozen).
    pub fn expert_weights(&self) -> Result<ExpertWeights> {
        match &self.frozen {
            None => self
                .experts
                .zip_map(None, &mut |t, _| Ok(t.shallow_clone())),
            Some(fr) => fr.zip_map(Some(&self.experts), &mut |a, b| {
                let b = b.ok_or_else(|| {
                    Error::config("frozen and trainable experts differ in structure")
                })?;
                Ok(Tensor::f_cat(&[a, b], 0)?)
            }),
        }
    }

    /// Route and compute: `(y, routing)` for `x: [T, d]`, adding losses and statistics to `ctx`.
    pub fn forward_with_routing(&self, x: &Tensor, ctx: &mut Context) -> Result<(Tensor, Routing)> {
        let d = self.config.d_model;
        check_rows("MoeLayer", x, d)?;
        let shape = x.size();
        let xf = x.f_reshape([-1, d])?;
        let routing = self.router.route(&xf, ctx)?;
        add_aux_losses(&self.router.config, &routing, ctx)?;
        let y = self.compute(&xf, &routing, self.config.path)?;
        Ok((y.f_reshape(shape)?, routing))
    }

    /// The experts applied to `x: [T, d]` as `routing` says, by `path`.
    pub fn compute(&self, x: &Tensor, routing: &Routing, path: MoePath) -> Result<Tensor> {
        let w = self.expert_weights()?;
        let e = w.num_experts();
        if e != routing.num_experts {
            return Err(Error::config(format!(
                "routing for {} experts, layer has {e}",
                routing.num_experts
            )));
        }
        if path == MoePath::Dense {
            return self.dense(x, routing, &w);
        }
        if let Some((tokens, gates)) = &routing.expert_choice {
            return self.expert_choice(x, tokens, gates, &w);
        }
        match (routing.capacity, &routing.slot) {
            (Some(c), Some(slot)) => self.with_capacity(x, routing, slot, c, &w),
            _ => self.dropless(x, routing, &w),
        }
    }

    /// `[E, C, d] -> [E, C, d]`: every expert on its own batch. With `gate:
    /// [E, C, 1]` each row's result is scaled by its gate, applied to the
    /// (narrow) hidden activation before the down projection:
    /// `g (h W2ᵀ + b2) = (g h) W2ᵀ + g b2`.
    fn experts_batched(
        &self,
        xs: &Tensor,
        w: &ExpertWeights,
        gate: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut h = xs.f_matmul(&w.w1.f_transpose(1, 2)?)?;
        if let Some(b) = &w.b1 {
            h = h.f_add(&b.f_unsqueeze(1)?)?;
        }
        let mut h = match &w.w_gate {
            Some(g) => self
                .config
                .activation
                .apply(&xs.f_matmul(&g.f_transpose(1, 2)?)?)?
                .f_mul(&h)?,
            None => self.config.activation.apply(&h)?,
        };
        if let Some(g) = gate {
            h = h.f_mul(g)?;
        }
        let mut y = h.f_matmul(&w.w2.f_transpose(1, 2)?)?;
        if let Some(b) = &w.b2 {
            let b = b.f_unsqueeze(1)?;
            y = y.f_add(&match gate {
                Some(g) => b.f_mul(g)?,
                None => b,
            })?;
        }
        Ok(y)
    }

    fn gates_as(&self, routing: &Routing, x: &Tensor) -> Result<Tensor> {
        Ok(routing.gates.f_to_kind(x.kind())?)
    }

    /// Capacity path (no host sync): each kept assignment `(t, j)` owns row
    /// `e_tj C + slot_tj` of an `[E, C, d]` buffer. The buffer is gathered
    /// from the tokens (empty rows read a zero row), the gated experts run as
    /// two batched matmuls, and the rows are added back to their tokens.
    fn with_capacity(
        &self,
        x: &Tensor,
        routing: &Routing,
        slot: &Tensor,
        c: i64,
        w: &ExpertWeights,
    ) -> Result<Tensor> {
        const OP: &str = "MoeLayer capacity";
        let (t, d) = (x.size()[0], x.size()[1]);
        let (e, k) = (routing.num_experts, routing.top_k);
        let rows = e * c;
        let dev = x.device();
        // Destination row of each assignment (dropped ones to a spare row `rows`).
        let dest = routing
            .experts
            .f_mul_scalar(c)?
            .f_add(slot)?
            .f_where_scalarother(&routing.kept, rows)?
            .f_reshape([-1])?;
        let token = Tensor::f_arange(t, (Kind::Int64, dev))?
            .f_unsqueeze(1)?
            .f_expand([t, k], false)?
            .f_reshape([-1])?;
        // Token of each buffer row (`t` = the zero row for empty rows) and its gate (0 when empty).
        let row_token = Tensor::f_full([rows + 1], t, (Kind::Int64, dev))?
            .f_index_copy(0, &dest, &token)
            .op(OP)?
            .f_narrow(0, 0, rows)?;
        let g = self.gates_as(routing, x)?.f_reshape([-1])?;
        let row_gate = Tensor::f_zeros([rows + 1], (g.kind(), dev))?
            .f_index_copy(0, &dest, &g)
            .op(OP)?
            .f_narrow(0, 0, rows)?
            .f_view([e, c, 1])?;
        let xpad = Tensor::f_cat(&[x, &Tensor::f_zeros([1, d], (x.kind(), dev))?], 0)?;
        let buf = xpad.f_index_select(0, &row_token)?.f_view([e, c, d])?;
        let y = self.experts_batched(&buf, w, Some(&row_gate))?;
        Ok(Tensor::f_zeros([t + 1, d], (y.kind(), dev))?
            .f_index_add(0, &row_token, &y.f_reshape([rows, d])?)?
            .f_narrow(0, 0, t)?)
    }

    /// Dropless path: padded to the largest group, or `tensor_core::grouped`
    /// (either way one host sync).
    fn dropless(&self, x: &Tensor, routing: &Routing, w: &ExpertWeights) -> Result<Tensor> {
        let (t, e, k) = (x.size()[0], routing.num_experts, routing.top_k);
        if self.config.dropless_kernel == DroplessKernel::Padded && t > 0 {
            // Slots in position order with room for everything: nothing is dropped.
            let (_, slot) =
                assign_slots(&routing.experts, &routing.gates, e, t, DropPolicy::Position)?;
            let c = slot.f_max()?.int64_value(&[]) + 1; // the host sync
            if e * c <= 2 * t * k {
                return self.with_capacity(x, routing, &slot, c, w);
            }
        }
        self.dropless_grouped(x, routing, w)
    }

    /// `tensor_core::grouped`: [`Dispatch`], one matmul per expert segment, `unpermute`.
    fn dropless_grouped(&self, x: &Tensor, routing: &Routing, w: &ExpertWeights) -> Result<Tensor> {
        let disp = Dispatch::new(&routing.experts, routing.num_experts)?;
        let counts = disp.counts_host()?;
        let xs = disp.permute(x)?;
        let h = grouped_linear(&xs, &counts, &w.w1, w.b1.as_ref())?;
        let h = match &w.w_gate {
            Some(g) => self
                .config
                .activation
                .apply(&grouped_linear(&xs, &counts, g, None)?)?
                .f_mul(&h)?,
            None => self.config.activation.apply(&h)?,
        };
        let y = grouped_linear(&h, &counts, &w.w2, w.b2.as_ref())?;
        let g = self.gates_as(routing, x)?;
        Ok(disp.unpermute(&y, Some(&g))?)
    }

    /// Expert choice: `tokens, gates: [E, C]`.
    fn expert_choice(
        &self,
        x: &Tensor,
        tokens: &Tensor,
        gates: &Tensor,
        w: &ExpertWeights,
    ) -> Result<Tensor> {
        let (t, d) = (x.size()[0], x.size()[1]);
        let (e, c) = (tokens.size()[0], tokens.size()[1]);
        let flat = tokens.f_reshape([-1])?;
        let xs = x.f_index_select(0, &flat)?.f_view([e, c, d])?;
        let g = gates.f_to_kind(x.kind())?.f_unsqueeze(2)?;
        let y = self.experts_batched(&xs, w, Some(&g))?;
        Ok(
            Tensor::f_zeros([t, d], (y.kind(), y.device()))?.f_index_add(
                0,
                &flat,
                &y.f_reshape([e * c, d])?,
            )?,
        )
    }

    /// Reference: every expert on every token, `y = Σ_e W_te f_e(x_t)`.
    fn dense(&self, x: &Tensor, routing: &Routing, w: &ExpertWeights) -> Result<Tensor> {
        let e = routing.num_experts;
        let (t, d) = (x.size()[0], x.size()[1]);
        let all = self.experts_batched(&x.f_unsqueeze(0)?.f_expand([e, t, d], false)?, w, None)?;
        let cw = routing.combine_weights()?.f_to_kind(x.kind())?;
        Ok(Tensor::f_einsum(
            "te,etd->td",
            &[&cw, &all],
            None::<&[i64]>,
        )?)
    }
}

impl Module for MoeLayer {
    fn kind(&self) -> &'static str {
        "MoeLayer"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        Ok(self.forward_with_routing(xs, ctx).map(|(y, _)| y)?)
    }

    fn params(&self) -> Vec<(&str, &Tensor)> {
        let mut v: Vec<(&str, &Tensor)> = self.router.params();
        if let Some(fr) = &self.frozen {
            v.extend(fr.names(true).into_iter().zip(fr.tensors()));
        }
        v.extend(
            self.experts
                .names(false)
                .into_iter()
                .zip(self.experts.tensors()),
        );
        v
    }

    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let mut v: Vec<(&str, &mut Tensor)> = self.router.params_mut();
        if let Some(fr) = &mut self.frozen {
            let names = fr.names(true);
            v.extend(names.into_iter().zip(fr.tensors_mut()));
        }
        let names = self.experts.names(false);
        v.extend(names.into_iter().zip(self.experts.tensors_mut()));
        v
    }
}
