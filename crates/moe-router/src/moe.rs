//! The sparse MoE feed-forward layer: dispatch (docs/moe-router.md, Method, part 1 step 8),
//! expert computation and combine (Switch, arXiv 2101.03961 eq. 1–2;
//! MegaBlocks dMoE, arXiv 2211.15841; ModuleFormer MoE_FFN, arXiv 2306.04640;
//! Method, part 2 step 2).
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
//!   dropped by the router ([`crate::capacity`]). The experts are processed
//!   in **chunks** of `G` consecutive experts: a `[G, C, d]` buffer is
//!   gathered from the tokens (row `(e − e₀) C + slot`; empty slots read a
//!   zero row), the experts run as two batched matmuls with the gates
//!   applied to the hidden activation (`g (h W2ᵀ + b2) = (g h) W2ᵀ + g b2`),
//!   and the rows are `index_add`ed (in place) back to their tokens.
//!   **No host synchronisation.**
//! - **dropless** (`cf = 0`), by the [`DroplessKernel`]:
//!   - `Padded` (the CPU's choice under `Auto`), **one host sync per
//!     call**: the same chunked computation, each chunk padded to its own
//!     largest group `C_g = max_{e ∈ g} n_e` (the sync reads the `E` group
//!     sizes; nothing is dropped), falling back to `Grouped` when padding
//!     would more than double the rows;
//!   - `Grouped`, one host sync: [`Dispatch`] (stable sort by expert),
//!     [`grouped_linear`] per expert segment, `unpermute` with the gates
//!     (the sync reads the `E` segment sizes, [`Dispatch::counts_host`]);
//!   - `GroupedDevice` (CUDA bf16's choice under `Auto`), **no host sync**:
//!     the same sort with the group sizes counted on the device, one
//!     [`grouped_linear_device`] (`torch._grouped_mm`) per projection with
//!     the group offsets on the device, one scatter-add. Needs `d_model` and
//!     `d_ff` in multiples of 16 bytes ([`MoeLayer::grouped_device_fits`]).
//!
//! **Why chunks** ([`MoeConfig::chunk_bytes`], 8 MiB of gathered rows per
//! chunk by default). With `k = 8`, `d = 384` and 8192 tokens, one `[E, C,
//! d]` buffer is ~100 MiB, and so are the second matmul's output and both
//! their gradients. glibc serves blocks above 32 MiB with a fresh `mmap`
//! every time, so each such tensor pays a page fault per 4 KiB on first touch
//! (measured: a 100 MiB `bmm` output costs 80 ms fresh vs 28 ms into reused
//! memory). Chunks of ≤ 8 MiB come from the reused heap, stay in cache
//! longer, and pad each chunk only to its own largest group. Measured
//! figures: `docs/moe-router.md`.
//! - **expert choice**: the `[E, C]` token lists gather an `[E, C, d]` batch,
//!   two batched matmuls, `index_add` back with weights `S_te`; no host sync.
//! - **dense** (reference, tests): every expert on every token, combined with
//!   the `[T, E]` matrix of gates. `O(E)` times the work.
//!
//! Gradients reach the experts and, through the gates, the router.
//! Auxiliary losses go to `ctx.add_aux_loss` (training only) and per-expert
//! statistics to `ctx.add_stat` (every call), under the layer's path.

use serde::{Deserialize, Serialize};
use tensor_core::grouped::{Dispatch, grouped_linear, grouped_linear_device};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::{Context, Module, TchResultExt};

use crate::capacity::{assign_slots_masked, expert_counts};
use crate::config::{DropPolicy, RouterConfig};
use crate::error::{Error, Result, check_rows};
use crate::losses::add_aux_losses_masked;
use crate::router::{Router, Routing, token_mask};

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

/// How the dropless path computes the experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DroplessKernel {
    /// `GroupedDevice` on CUDA for bf16 inputs when the widths fit its
    /// 16-byte rows ([`MoeLayer::grouped_device_fits`]): there libtorch runs
    /// `torch._grouped_mm` as one CUTLASS grouped GEMM (sm90/sm100) with no
    /// host sync. `Padded` everywhere else (CPU; f32/f16 on CUDA, where
    /// `_grouped_mm` falls back to a host-synchronised loop of matmuls).
    #[default]
    Auto,
    /// Pad every expert's group to the largest one, `C = max_e n_e` (the one
    /// host sync reads `C`), then the capacity path's two batched matmuls.
    /// Falls back to `Grouped` when padding would more than double the rows
    /// (`E · C > 2 T k`, e.g. a collapsed router). On the CPU two large ops
    /// beat `E` small ones when experts are many or narrow; `Grouped` wins
    /// for few experts with unbalanced loads (see `benches/moe_router.rs`).
    Padded,
    /// `tensor_core::grouped`: one matmul per expert segment (the host sync
    /// reads the `E` segment sizes).
    Grouped,
    /// `tensor_core::grouped::grouped_linear_device`: the `T k` assignments
    /// sorted by expert on the device, then one grouped GEMM per projection
    /// (`torch._grouped_mm`, group offsets kept on the device) and one
    /// scatter-add. **No host synchronisation** (on CUDA bf16, sm90/sm100;
    /// libtorch's fallback elsewhere reads the offsets itself). Needs f32,
    /// bf16 or f16 and `d_model`, `d_ff` in multiples of 16 bytes (4 f32
    /// values, 8 16-bit ones); otherwise `forward` returns an error.
    GroupedDevice,
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
    /// Bytes of gathered token rows per expert chunk of the padded paths
    /// (8 MiB; `0` = all experts in one chunk). See the module docs.
    pub chunk_bytes: i64,
}

/// Default [`MoeConfig::chunk_bytes`]: 8 MiB, a quarter of glibc's largest mmap threshold.
pub const DEFAULT_CHUNK_BYTES: i64 = 8 << 20;

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            d_model: 0,
            d_ff: 0,
            activation: ExpertActivation::Gelu,
            bias: false,
            router: RouterConfig::default(),
            path: MoePath::Sparse,
            dropless_kernel: DroplessKernel::Auto,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
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

    /// Consecutive groups of experts of the given sizes (views through
    /// `split_with_sizes`, whose backward is one concatenation).
    pub(crate) fn split(&self, sizes: &[i64]) -> Result<Vec<ExpertWeights>> {
        if sizes.len() == 1 {
            return Ok(vec![self.zip_map(None, &mut |t, _| Ok(t.shallow_clone()))?]);
        }
        let sp = |t: &Tensor| -> Result<Vec<Tensor>> { Ok(t.f_split_with_sizes(sizes, 0)?) };
        let opt = |t: &Option<Tensor>| -> Result<Vec<Option<Tensor>>> {
            Ok(match t {
                Some(t) => sp(t)?.into_iter().map(Some).collect(),
                None => sizes.iter().map(|_| None).collect(),
            })
        };
        let (w1, w2) = (sp(&self.w1)?, sp(&self.w2)?);
        let (wg, b1, b2) = (opt(&self.w_gate)?, opt(&self.b1)?, opt(&self.b2)?);
        Ok(w1
            .into_iter()
            .zip(w2)
            .zip(wg)
            .zip(b1)
            .zip(b2)
            .map(|((((w1, w2), w_gate), b1), b2)| ExpertWeights {
                w1,
                w_gate,
                w2,
                b1,
                b2,
            })
            .collect())
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

/// Experts `e0..e1` padded to `c` rows each.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    e0: i64,
    e1: i64,
    c: i64,
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
    /// Fresh router and experts (seed with `tensor_core::seed::with_seed`).
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

    /// Route and compute: `(y, routing)` for `x: [..., d]`, adding losses and
    /// statistics to `ctx`. Padding tokens (`ctx.attention_mask`, see
    /// [`token_mask`]) are not dispatched (their output is 0; the residual
    /// carries them) and count in no loss or statistic.
    pub fn forward_with_routing(&self, x: &Tensor, ctx: &mut Context) -> Result<(Tensor, Routing)> {
        let d = self.config.d_model;
        check_rows("MoeLayer", x, d)?;
        let shape = x.size();
        let xf = x.f_reshape([-1, d])?;
        let mask = token_mask(&self.router.config, ctx, xf.size()[0])?;
        let routing = self.router.route_masked(&xf, mask.as_ref(), ctx)?;
        add_aux_losses_masked(&self.router.config, &routing, mask.as_ref(), ctx)?;
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
            (Some(c), Some(slot)) => {
                let plan = self.uniform_chunks(e, c, x);
                self.padded(x, routing, slot, &plan, &w)
            }
            _ => self.dropless(x, routing, &w),
        }
    }

    /// Bytes of one gathered row.
    fn row_bytes(&self, x: &Tensor) -> i64 {
        self.config.d_model * x.kind().elt_size_in_bytes() as i64
    }

    /// Chunks of equal capacity `c`: as many experts per chunk as fit `chunk_bytes`.
    fn uniform_chunks(&self, e: i64, c: i64, x: &Tensor) -> Vec<Chunk> {
        let per_expert = (c * self.row_bytes(x)).max(1);
        let g = if self.config.chunk_bytes > 0 {
            (self.config.chunk_bytes / per_expert).clamp(1, e.max(1))
        } else {
            e.max(1)
        };
        (0..e)
            .step_by(g as usize)
            .map(|e0| Chunk {
                e0,
                e1: (e0 + g).min(e),
                c,
            })
            .collect()
    }

    /// Dropless chunks from the host group sizes `n_e`: consecutive experts
    /// while `(#experts) · max n_e` rows fit `chunk_bytes`, each padded to its
    /// own largest group; empty chunks are skipped.
    fn dropless_chunks(&self, n: &[i64], x: &Tensor) -> Vec<Chunk> {
        let budget = if self.config.chunk_bytes > 0 {
            self.config.chunk_bytes
        } else {
            i64::MAX
        };
        let rb = self.row_bytes(x).max(1);
        let mut out = Vec::new();
        let (mut e0, mut c) = (0usize, 0i64);
        for (e, &ne) in n.iter().enumerate() {
            let c_new = c.max(ne);
            if e > e0
                && ((e - e0 + 1) as i64)
                    .saturating_mul(c_new)
                    .saturating_mul(rb)
                    > budget
            {
                if c > 0 {
                    out.push(Chunk {
                        e0: e0 as i64,
                        e1: e as i64,
                        c,
                    });
                }
                (e0, c) = (e, ne);
            } else {
                c = c_new;
            }
        }
        if c > 0 {
            out.push(Chunk {
                e0: e0 as i64,
                e1: n.len() as i64,
                c,
            });
        }
        out
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

    /// The padded computation (no host sync by itself): for each chunk of
    /// experts `e₀..e₁` with capacity `c`, each kept assignment `(t, j)` with
    /// `e_tj` in the chunk owns row `(e_tj − e₀) c + slot_tj` of a `[G, c, d]`
    /// buffer. The buffer is gathered from the tokens (empty rows read a zero
    /// row), the gated experts run as two batched matmuls, and the rows are
    /// added back to their tokens in place.
    fn padded(
        &self,
        x: &Tensor,
        routing: &Routing,
        slot: &Tensor,
        plan: &[Chunk],
        w: &ExpertWeights,
    ) -> Result<Tensor> {
        const OP: &str = "MoeLayer padded experts";
        let (t, d) = (x.size()[0], x.size()[1]);
        let (e, k) = (routing.num_experts, routing.top_k);
        let dev = x.device();
        let token = Tensor::f_arange(t, (Kind::Int64, dev))?
            .f_unsqueeze(1)?
            .f_expand([t, k], false)?
            .f_reshape([-1])?;
        let g = self.gates_as(routing, x)?.f_reshape([-1])?;
        let xpad = Tensor::f_cat(&[x, &Tensor::f_zeros([1, d], (x.kind(), dev))?], 0)?;
        let mut out = Tensor::f_zeros([t + 1, d], (x.kind(), dev))?;
        // Expert groups: the plan's chunks plus the gaps between them (skipped).
        let mut sizes = Vec::new();
        let mut which = Vec::new();
        let mut at = 0;
        for ch in plan {
            if ch.e0 > at {
                sizes.push(ch.e0 - at);
                which.push(None);
            }
            sizes.push(ch.e1 - ch.e0);
            which.push(Some(ch));
            at = ch.e1;
        }
        if at < e {
            sizes.push(e - at);
            which.push(None);
        }
        let parts = w.split(&sizes)?;
        for (ch, wc) in which.into_iter().zip(&parts) {
            let Some(ch) = ch else { continue };
            let (ge, c) = (ch.e1 - ch.e0, ch.c);
            let rows = ge * c;
            let inside = routing
                .kept
                .f_logical_and(&routing.experts.f_ge(ch.e0)?)?
                .f_logical_and(&routing.experts.f_lt(ch.e1)?)?;
            // Destination row of each assignment (others to a spare row `rows`).
            let dest = routing
                .experts
                .f_sub_scalar(ch.e0)?
                .f_mul_scalar(c)?
                .f_add(slot)?
                .f_where_scalarother(&inside, rows)?
                .f_reshape([-1])?;
            // Token of each buffer row (`t` = the zero row for empty rows) and its gate.
            let row_token = Tensor::f_full([rows + 1], t, (Kind::Int64, dev))?
                .f_index_copy(0, &dest, &token)
                .op(OP)?
                .f_narrow(0, 0, rows)?;
            let row_gate = Tensor::f_zeros([rows + 1], (g.kind(), dev))?
                .f_index_copy(0, &dest, &g)
                .op(OP)?
                .f_narrow(0, 0, rows)?
                .f_view([ge, c, 1])?;
            let buf = xpad.f_index_select(0, &row_token)?.f_view([ge, c, d])?;
            let y = self.experts_batched(&buf, wc, Some(&row_gate))?;
            let _ = out.f_index_add_(0, &row_token, &y.f_reshape([rows, d])?)?;
        }
        Ok(out.f_narrow(0, 0, t)?)
    }

    /// The kernel the dropless path runs for `x` ([`DroplessKernel::Auto`]
    /// resolved: `GroupedDevice` for bf16 on CUDA when the widths fit, else `Padded`).
    pub fn dropless_kernel_for(&self, x: &Tensor) -> DroplessKernel {
        match self.config.dropless_kernel {
            DroplessKernel::Auto
                if x.device().is_cuda()
                    && x.kind() == Kind::BFloat16
                    && self.grouped_device_fits(x.kind()).is_ok() =>
            {
                DroplessKernel::GroupedDevice
            }
            DroplessKernel::Auto => DroplessKernel::Padded,
            k => k,
        }
    }

    /// Whether [`DroplessKernel::GroupedDevice`] can run in `kind`:
    /// `torch._grouped_mm` takes f32, bf16 or f16, and its rows must be
    /// multiples of 16 bytes, so `d_model` and `d_ff` must be multiples of
    /// 4 (f32) or 8 (bf16, f16). The error says which constraint fails.
    pub fn grouped_device_fits(&self, kind: Kind) -> Result<()> {
        const OP: &str = "MoeLayer DroplessKernel::GroupedDevice";
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(Error::config(format!(
                "{OP}: the grouped GEMM (torch._grouped_mm) takes f32, bf16 or f16 inputs, \
                 got {kind:?}; use DroplessKernel::Padded or Grouped"
            )));
        }
        let align = 16 / kind.elt_size_in_bytes() as i64;
        let (d, f) = (self.config.d_model, self.config.d_ff);
        if d % align != 0 || f % align != 0 {
            return Err(Error::config(format!(
                "{OP}: the grouped GEMM needs rows of 16-byte multiples: d_model ({d}) and \
                 d_ff ({f}) must be multiples of {align} for {kind:?}; use \
                 DroplessKernel::Padded or Grouped"
            )));
        }
        Ok(())
    }

    /// Dropless path: the kernel [`Self::dropless_kernel_for`] picks:
    /// padded to the largest group or `tensor_core::grouped` (one host sync
    /// either way), or the device grouped GEMM (none).
    fn dropless(&self, x: &Tensor, routing: &Routing, w: &ExpertWeights) -> Result<Tensor> {
        let (t, e, k) = (x.size()[0], routing.num_experts, routing.top_k);
        let kernel = self.dropless_kernel_for(x);
        if kernel == DroplessKernel::GroupedDevice {
            return self.dropless_grouped_device(x, routing, w);
        }
        if kernel == DroplessKernel::Padded && t > 0 {
            // Slots in position order with room for everything: nothing is
            // dropped (padding tokens, not kept, come after the real ones).
            let (_, slot) = assign_slots_masked(
                &routing.experts,
                &routing.gates,
                e,
                t,
                DropPolicy::Position,
                Some(&routing.kept),
            )?;
            let n = routing
                .experts
                .f_masked_fill(&routing.kept.f_logical_not()?, e)?
                .f_reshape([-1])?
                .f_bincount::<Tensor>(None, e + 1)
                .op("MoeLayer dropless")?;
            // The host sync: the E group sizes.
            let n = Vec::<i64>::try_from(n.f_narrow(0, 0, e)?.f_to_device(Device::Cpu)?)
                .map_err(tensor_core::Error::from)?;
            let plan = self.dropless_chunks(&n, x);
            let rows: i64 = plan.iter().map(|c| (c.e1 - c.e0) * c.c).sum();
            if rows <= 2 * t * k {
                return self.padded(x, routing, &slot, &plan, w);
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

    /// The device grouped GEMM ([`DroplessKernel::GroupedDevice`]), no host
    /// sync: a stable sort of the `T k` assignments by expert (a
    /// [`Dispatch`] built here with the group sizes counted by a
    /// scatter-add, not `bincount`, which reads the largest id on the host),
    /// the sorted rows gathered from `[x; 0]` (an assignment that is not
    /// kept, i.e. a padding token, reads the zero row and is added to a
    /// spare output row that is cut off), [`grouped_linear_device`] for `W1`
    /// (and `Wg`), the gates applied to the hidden activation
    /// (`g (h W2ᵀ + b2) = (g h) W2ᵀ + g b2`), [`grouped_linear_device`] for
    /// `W2`, and one `index_add` back to the tokens.
    fn dropless_grouped_device(
        &self,
        x: &Tensor,
        routing: &Routing,
        w: &ExpertWeights,
    ) -> Result<Tensor> {
        const OP: &str = "MoeLayer grouped-device experts";
        self.grouped_device_fits(x.kind())?;
        let (t, d) = (x.size()[0], x.size()[1]);
        let (e, k) = (routing.num_experts, routing.top_k);
        let dev = x.device();
        if t == 0 {
            return Ok(Tensor::f_zeros([0, d], (x.kind(), dev))?);
        }
        let flat_e = routing.experts.f_reshape([-1])?.f_to_kind(Kind::Int64)?;
        let order = flat_e.f_argsort_stable(true, 0, false).op(OP)?;
        let expert = flat_e.f_index_select(0, &order)?;
        let token = order.f_floor_divide_scalar(k)?;
        let counts = expert_counts(OP, &flat_e, None, e, Kind::Int64)?;
        let disp = Dispatch {
            num_tokens: t,
            top_k: k,
            num_experts: e,
            order,
            token,
            expert,
            counts,
        };
        // Source row of each sorted assignment: its token, or the zero row `t`.
        let kept = routing
            .kept
            .f_reshape([-1])?
            .f_index_select(0, &disp.order)?;
        let src = disp.token.f_where_scalarother(&kept, t)?;
        let xpad = Tensor::f_cat(&[x, &Tensor::f_zeros([1, d], (x.kind(), dev))?], 0)?;
        let xs = xpad.f_index_select(0, &src)?;
        let h = grouped_linear_device(&xs, &disp, &w.w1, w.b1.as_ref())?;
        let h = match &w.w_gate {
            Some(g) => self
                .config
                .activation
                .apply(&grouped_linear_device(&xs, &disp, g, None)?)?
                .f_mul(&h)?,
            None => self.config.activation.apply(&h)?,
        };
        let g = self
            .gates_as(routing, x)?
            .f_reshape([-1])?
            .f_index_select(0, &disp.order)?
            .f_unsqueeze(1)?;
        let mut y = grouped_linear_device(&h.f_mul(&g)?, &disp, &w.w2, None)?;
        if let Some(b) = &w.b2 {
            y = y.f_add(&b.f_index_select(0, &disp.expert)?.f_mul(&g)?)?;
        }
        Ok(Tensor::f_zeros([t + 1, d], (y.kind(), dev))?
            .f_index_add(0, &src, &y)
            .op(OP)?
            .f_narrow(0, 0, t)?)
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
