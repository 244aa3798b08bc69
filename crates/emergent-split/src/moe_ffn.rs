//! `EmoeFfn`: a dense FFN run as a mixture of its own neuron blocks, step 5
//! of EMoE (Qiu et al. 2023, "Unlocking Emergent Modularity
//! in LLMs"; docs/emergent-split.md, Method, part 1); MoEfication's
//! "compute only the selected experts" (Zhang et al. 2022; part 2 step 3 there).
//!
//! With neurons permuted so that expert `e` owns rows `e m .. (e+1) m` of
//! `W1` (blocks `W1_e: [m, d]`, `b1_e`, gated `W_G,e`) and the same columns
//! of `W2` (`W2_e: [d, m]`), and `g_e(x)` the gate's weight (1 for a selected
//! expert in `hard` mode, 0 when not selected):
//!
//! `y = Σ_{e ∈ top-k(x)} g_e(x) · act(W1_e x + b1_e) W2_eᵀ + b2`
//! (gated: `(act(W_G,e x) ⊙ (W1_e x + b1_e)) W2_eᵀ`).
//!
//! `b2` ([`FoldB2`], the spec's `fold_b2`): by default added once, which
//! equals the Tutel path's `b2/k` per expert in `hard` mode and makes
//! folding back exact (`b2` unchanged); with `k_mean`, each expert owns
//! `b2_e` (the parameter `expert_bias: [N, d]`, initialised to `b2/k`),
//! `y = Σ_{e ∈ top-k} g_e (h_e W2_eᵀ + b2_e)`, folded back to
//! `b2 = k · mean_e b2_e`.
//!
//! The selection reads the gate's signal ([`SelectSignal`]): the avg-key
//! scores `x · c_e` (`gate`, `up`), or the mean of dense per-neuron values
//! (`up_abs`, `inter`, `inter_abs`), which need the full up projection or
//! hidden activation.
//!
//! Two computations of the same `y`:
//! - **masked** ([`ComputePath::Masked`], training): the dense hidden
//!   activation times a `[T, d_ff]` mask made by repeating each expert's
//!   weight `m` times (the Llama path); differentiable, goes through the
//!   projection slots, so a LoRA-wrapped projection still works;
//! - **sparse** ([`ComputePath::Sparse`], inference): only the selected
//!   blocks are computed. Token-expert pairs are sorted by expert
//!   (`tensor_core::grouped::Dispatch`, one host read of the `N` counts);
//!   then, per expert, its tokens are gathered once (`[n_e, d]`), both
//!   matmuls run on that buffer with the activation in between
//!   (`W1_e`, and the contiguous row block `W2ᵀ_e` of `W2ᵀ`), the rows are
//!   scaled by their gate weights and scatter-added into the output. Every
//!   temporary is per expert (`n_e ≈ T k / N` rows), none of the `[T k, d]`
//!   buffers of a gather-all/compute/scatter-all pipeline.
//!
//! The projections stay in slots under the dense FFN's names
//! (`intermediate.dense`, `output.dense`), so parameter names, and hence
//! checkpoints, are unchanged (`fold_b2 = k_mean` trades `output.dense.bias`
//! for `expert_bias`); the gate's centroids are not parameters.

use tensor_core::grouped::{Dispatch, grouped_linear_device};
use tensor_core::layers::{Activation, FeedForward, FfnNames, FfnPart, Linear};
use tensor_core::module::{downcast_ref, is};
use tensor_core::tch::{Kind, Tensor};
use tensor_core::{Context, Module, Slot, TchResultExt};

use crate::error::{Error, Result, check_split};
use crate::gate::{AvgKeyGate, FoldB2, GateConfig, Routing, SelectSignal, WeightMode};
use crate::regularise::{Regularisers, capacity, cv2_loss, priority_keep};
use crate::split::{ExpertSplit, FfnWeights, ffn_from, inverse_permutation, trainability};

/// Which computation `forward` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputePath {
    /// Masked in training; in evaluation sparse when the projections are
    /// plain `Linear`s and the select signal is linear (`gate`, `up`),
    /// masked otherwise (the other signals need the dense hidden layer anyway).
    /// On CUDA the sparse path uses the device grouped GEMM (below) when
    /// the widths allow it.
    #[default]
    Auto,
    Masked,
    Sparse,
    /// Sparse through `tensor_core::grouped::grouped_linear_device`: every
    /// expert's rows in one grouped GEMM per projection, group offsets kept
    /// on the device (no host synchronisation on CUDA bf16, sm90+). Needs
    /// `d_model` and the expert size to be multiples of 8 (16-bit) or 4 (f32).
    Grouped,
}

/// A `FeedForward` whose neurons are grouped into `N` experts, `k` of which
/// run per token.
#[derive(Debug, Module)]
#[module(kind = "EmoeFfn", forward = forward_impl)]
pub struct EmoeFfn {
    #[child(name_expr = "self.names.up.as_str()")]
    pub up: Slot,
    #[child(name_expr = "self.names.gate.as_deref().unwrap_or(\"gate\")")]
    pub gate: Option<Slot>,
    #[child(name_expr = "self.names.down.as_str()")]
    pub down: Slot,
    pub activation: Activation,
    pub names: FfnNames,
    pub dropout: f64,
    pub router: AvgKeyGate,
    pub path: ComputePath,
    /// `[N, d_model]` per-expert output biases `b2_e` (`fold_b2 = k_mean`
    /// with a biased `W2`), a parameter named `expert_bias`.
    #[param]
    pub expert_bias: Option<Tensor>,
    /// The Tutel-path extras: expert dropout, CV² loss, capacity
    /// ([`Regularisers::none`] when built by [`EmoeFfn::from_ffn`]; `convert`
    /// sets the config's).
    pub regularisers: Regularisers,
    /// `π`: position `p` holds original neuron `π[p]`.
    perm: Vec<i64>,
    split: ExpertSplit,
}

fn plain<'a>(slot: &'a Slot, what: &str) -> Result<&'a Linear> {
    downcast_ref::<Linear>(slot.as_ref()).ok_or_else(|| {
        Error::Tensor(tensor_core::Error::module(
            "EmoeFfn",
            format!(
                "{what} holds a {}, not a plain Linear (merge the wrapper first, or use ComputePath::Masked)",
                slot.kind()
            ),
        ))
    })
}

/// The key rows (and their bias) that the linear select signals read:
/// `gate` → `W_G` (gated) or `W1`; `up` → `W1`. Non-linear signals keep the
/// `gate` keys (their centroids are not used for scoring).
fn signal_keys<'a>(
    signal: SelectSignal,
    w1: &'a Tensor,
    b1: Option<&'a Tensor>,
    gate: Option<&'a Tensor>,
) -> (&'a Tensor, Option<&'a Tensor>) {
    match (signal, gate) {
        (SelectSignal::Up, _) | (_, None) => (w1, b1),
        (_, Some(g)) => (g, None),
    }
}

impl EmoeFfn {
    /// Split `ffn` by `split` (permuting its neurons into expert blocks) and
    /// route with the avg-key gate. The FFN's projections must be plain `Linear`s.
    pub fn from_ffn(ffn: &FeedForward, split: &ExpertSplit, gate: GateConfig) -> Result<Self> {
        let d_ff = ffn.d_ff()?;
        check_split(d_ff, split.num_experts)?;
        if split.d_ff() as i64 != d_ff {
            return Err(Error::config(format!(
                "the split has {} neurons, the FFN d_ff = {d_ff}",
                split.d_ff()
            )));
        }
        if gate.num_experts != split.num_experts {
            return Err(Error::config(format!(
                "the gate has N = {} experts, the split {}",
                gate.num_experts, split.num_experts
            )));
        }
        gate.validate()?;
        let weights = FfnWeights::of(ffn)?;
        weights.check_finite()?;
        let perm = split.permutation();
        let mut p = weights.permuted(&perm)?;
        let (keys, key_bias) =
            signal_keys(gate.select_signal, &p.w1, p.b1.as_ref(), p.gate.as_ref());
        let router = AvgKeyGate::new(keys, key_bias, gate)?;
        let expert_bias = match (router.config.fold_b2, p.b2.take()) {
            (FoldB2::KMean, Some(b2)) => {
                let (n, k) = (router.config.num_experts as i64, router.config.top_k as f64);
                let trainable = ffn.b2()?.is_some_and(|b| b.requires_grad());
                let eb = tensor_core::tch::no_grad(|| {
                    b2.f_detach()?
                        .f_div_scalar(k)?
                        .f_unsqueeze(0)?
                        .f_repeat([n, 1])
                })
                .op("EmoeFfn expert_bias")?;
                Some(eb.set_requires_grad(trainable))
            }
            (_, b2) => {
                p.b2 = b2;
                None
            }
        };
        let dense = ffn_from(
            p,
            ffn.activation,
            ffn.names.clone(),
            ffn.dropout,
            &trainability(ffn)?,
        )?;
        Ok(Self {
            up: dense.up,
            gate: dense.gate,
            down: dense.down,
            activation: dense.activation,
            names: dense.names,
            dropout: dense.dropout,
            router,
            path: ComputePath::Auto,
            expert_bias,
            regularisers: Regularisers::none(),
            perm,
            split: split.clone(),
        })
    }

    pub fn num_experts(&self) -> usize {
        self.router.config.num_experts
    }

    pub fn top_k(&self) -> usize {
        self.router.config.top_k
    }

    /// Neurons per expert, `m`.
    pub fn expert_size(&self) -> i64 {
        (self.perm.len() / self.num_experts()) as i64
    }

    /// `π`, from original neuron order to expert-block order.
    pub fn permutation(&self) -> &[i64] {
        &self.perm
    }

    pub fn split(&self) -> &ExpertSplit {
        &self.split
    }

    /// Select `k` experts (`1 <= k <= N`) from now on.
    pub fn set_top_k(&mut self, top_k: usize) -> Result<()> {
        crate::error::check_top_k(top_k, self.num_experts())?;
        self.router.config.top_k = top_k;
        Ok(())
    }

    /// Recompute the gate's centroids from the current weights (after each
    /// optimiser step), with the configured momentum.
    pub fn refresh_gate(&mut self) -> Result<()> {
        let up = plain(&self.up, &self.names.up)?;
        let gate = match &self.gate {
            Some(g) => Some(&plain(g, "gate")?.weight),
            None => None,
        };
        let (keys, bias) = signal_keys(
            self.router.config.select_signal,
            &up.weight,
            up.bias.as_ref(),
            gate,
        );
        self.router.refresh(keys, bias)
    }

    /// Route `x2: [T, d]`; `neurons: [T, d_ff]` are the dense per-neuron
    /// values of a non-linear select signal.
    fn route(&self, x2: &Tensor, neurons: Option<&Tensor>, ctx: &mut Context) -> Result<Routing> {
        let scores = match neurons {
            Some(v) => self.router.scores_from_neurons(v)?,
            None => self.router.scores(x2)?,
        };
        let reg = self.regularisers;
        let needs_probs = reg.capacity_factor.is_some() || (ctx.train && reg.cv2_weight > 0.0);
        let probs = if needs_probs {
            Some(scores.f_to_kind(Kind::Float)?.f_softmax(-1, Kind::Float)?)
        } else {
            None
        };
        let mut r = self.router.route_scores(scores, ctx.train)?;
        let n = self.num_experts() as i64;
        let keep = match (reg.capacity_factor, &probs) {
            (Some(f), Some(p)) => {
                let t = r.experts.size()[0];
                let cap = capacity(t, self.top_k(), self.num_experts(), f);
                // Importance: each token's largest gate probability.
                let (priority, _) = p.f_max_dim(1, false)?;
                let keep = priority_keep(&r.experts, &priority, n, cap)?;
                r.weights = r.weights.f_mul(&keep)?;
                r.dropped = true;
                Some(keep)
            }
            _ => None,
        };
        if ctx.train
            && reg.cv2_weight > 0.0
            && let Some(p) = &probs
        {
            let keep = match &keep {
                Some(k) => k.shallow_clone(),
                None => r.experts.f_ones_like()?.f_to_kind(Kind::Float)?,
            };
            let loss = cv2_loss(p, &r.experts, &keep)?.f_mul_scalar(reg.cv2_weight)?;
            ctx.add_aux_loss("cv2", loss);
        }
        let load = match &keep {
            Some(k) => Tensor::f_zeros([n], (Kind::Float, r.experts.device()))?.f_scatter_add(
                0,
                &r.experts.f_reshape([-1])?,
                &k.f_reshape([-1])?,
            )?,
            None => r.experts.f_reshape([-1])?.f_bincount::<Tensor>(None, n)?,
        };
        ctx.add_stat("expert_load", load);
        Ok(r)
    }

    /// The select signal's dense per-neuron values from the up
    /// pre-activation `up: [T, d_ff]` and the hidden activation `h`
    /// (`None` for the linear signals).
    fn neuron_values(&self, up: &Tensor, h: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self.router.config.select_signal {
            SelectSignal::Gate | SelectSignal::Up => None,
            SelectSignal::UpAbs => Some(up.f_abs()?),
            SelectSignal::Inter => Some(h.shallow_clone()),
            SelectSignal::InterAbs => Some(h.f_abs()?),
        })
    }

    fn flat(&self, xs: &Tensor) -> Result<(Tensor, Vec<i64>)> {
        let s = xs.size();
        let d = plain(&self.up, &self.names.up)
            .map(|l| l.in_features())
            .unwrap_or(*s.last().unwrap_or(&0));
        if s.last() != Some(&d) {
            return Err(tensor_core::Error::shape("EmoeFfn", format!("[*, {d}]"), s).into());
        }
        Ok((xs.f_reshape([-1, d])?, s))
    }

    /// `Σ_e g_e b2_e` for `fold_b2 = k_mean`: `[T, N] @ [N, d]`.
    fn expert_bias_term(&self, routing: &Routing) -> Result<Option<Tensor>> {
        match &self.expert_bias {
            Some(eb) => Ok(Some(
                routing
                    .expert_weights(self.num_experts())?
                    .f_to_kind(eb.kind())?
                    .f_matmul(eb)?,
            )),
            None => Ok(None),
        }
    }

    /// The dense hidden activation masked to the selected experts' neurons.
    pub fn forward_masked(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let (x2, _) = self.flat(xs)?;
        let up = ctx.call(&self.names.up, self.up.as_ref(), xs)?;
        let h = match (&self.gate, &self.names.gate) {
            (Some(g), Some(name)) => {
                let g = ctx.call(name, g.as_ref(), xs)?;
                self.activation.apply(&g)?.f_mul(&up).op("EmoeFfn gate")?
            }
            _ => self.activation.apply(&up)?,
        };
        let d_ff = *h.size().last().expect("hidden has a last dim");
        let neurons = self.neuron_values(&up.f_reshape([-1, d_ff])?, &h.f_reshape([-1, d_ff])?)?;
        let routing = self.route(&x2, neurons.as_ref(), ctx)?;
        let mask = routing
            .neuron_mask(self.num_experts(), self.expert_size())?
            .f_to_kind(h.kind())?
            .f_view(h.size().as_slice())?;
        let mut h = h.f_mul(&mask)?;
        if ctx.train && self.regularisers.expert_dropout > 0.0 {
            h = h.f_dropout(self.regularisers.expert_dropout, true)?;
        }
        ctx.record("act", &h)?;
        let mut y = ctx.call(&self.names.down, self.down.as_ref(), &h)?;
        if let Some(b) = self.expert_bias_term(&routing)? {
            y = y.f_add(&b.f_view(y.size().as_slice())?)?;
        }
        self.finish(y, ctx)
    }

    /// Only the selected experts: per expert, gather its tokens once, run
    /// both matmuls on that buffer, scatter-add the weighted rows.
    pub fn forward_sparse(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let grouped = xs.device().is_cuda() && self.grouped_widths_fit(xs.kind());
        self.forward_sparse_with(xs, ctx, grouped)
    }

    /// The sparse path with one gather, two matmuls and one scatter-add per
    /// selected expert (needs the group sizes on the host: one sync).
    pub fn forward_per_expert(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        self.forward_sparse_with(xs, ctx, false)
    }

    /// The sparse path through the device grouped GEMM ([`ComputePath::Grouped`]).
    pub fn forward_grouped(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        self.forward_sparse_with(xs, ctx, true)
    }

    /// Whether `d_model` and the expert size give the 16-byte rows the grouped GEMM needs.
    fn grouped_widths_fit(&self, kind: tensor_core::tch::Kind) -> bool {
        let align = 16 / kind.elt_size_in_bytes().max(1) as i64;
        let d = plain(&self.up, &self.names.up).map_or(0, |l| l.in_features());
        let d_out = plain(&self.down, &self.names.down).map_or(0, |l| l.out_features());
        d > 0 && d % align == 0 && d_out % align == 0 && self.expert_size() % align == 0
    }

    fn forward_sparse_with(&self, xs: &Tensor, ctx: &mut Context, grouped: bool) -> Result<Tensor> {
        let (x2, shape) = self.flat(xs)?;
        let up = plain(&self.up, &self.names.up)?;
        let down = plain(&self.down, &self.names.down)?;
        let gate_w = match &self.gate {
            Some(g) => Some(&plain(g, "gate")?.weight),
            None => None,
        };
        let (n, m) = (self.num_experts() as i64, self.expert_size());
        let neurons = if self.router.config.select_signal.is_linear() {
            None
        } else {
            // The signal needs every neuron: the dense up projection (and hidden layer).
            let pre = x2.f_linear(&up.weight, up.bias.as_ref())?;
            let h = match gate_w {
                Some(wg) => self
                    .activation
                    .apply(&x2.f_linear::<Tensor>(wg, None)?)?
                    .f_mul(&pre)?,
                None => self.activation.apply(&pre)?,
            };
            self.neuron_values(&pre, &h)?
        };
        let routing = self.route(&x2, neurons.as_ref(), ctx)?;
        let dispatch = Dispatch::new(&routing.experts, n)?;
        if grouped {
            let y = self.grouped_experts(&x2, &routing, &dispatch)?;
            let mut out_shape = shape;
            *out_shape.last_mut().expect("checked non-empty") = y.size()[1];
            return self.finish(y.f_view(out_shape.as_slice())?, ctx);
        }
        let counts = dispatch.counts_host()?;
        let gates = match routing.mode {
            WeightMode::Hard if !routing.dropped => None,
            _ => Some(
                routing
                    .weights
                    .f_reshape([-1])?
                    .f_index_select(0, &dispatch.order)?
                    .f_to_kind(x2.kind())?
                    .f_unsqueeze(1)?,
            ),
        };
        // W2ᵀ: [N m, d], so expert e's block is the contiguous rows e m .. (e+1) m.
        let w2t = down.weight.f_transpose(0, 1)?.f_contiguous()?;
        let d_out = down.out_features();
        let mut y = Tensor::f_zeros([x2.size()[0], d_out], (x2.kind(), x2.device()))?;
        let mut start = 0i64;
        for (e, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let e = e as i64;
            let tokens = dispatch.token.f_narrow(0, start, c)?;
            let xe = x2.f_index_select(0, &tokens)?;
            let w1e = up.weight.f_narrow(0, e * m, m)?;
            let pre = match &up.bias {
                Some(b) => b
                    .f_narrow(0, e * m, m)?
                    .f_addmm(&xe, &w1e.f_transpose(0, 1)?)?,
                None => xe.f_mm(&w1e.f_transpose(0, 1)?)?,
            };
            let he = match gate_w {
                Some(wg) => self
                    .activation
                    .apply(&xe.f_mm(&wg.f_narrow(0, e * m, m)?.f_transpose(0, 1)?)?)?
                    .f_mul(&pre)?,
                None => self.activation.apply(&pre)?,
            };
            let mut ye = he.f_mm(&w2t.f_narrow(0, e * m, m)?)?;
            if let Some(eb) = &self.expert_bias {
                ye = ye.f_add(&eb.f_select(0, e)?.f_to_kind(ye.kind())?)?;
            }
            if let Some(g) = &gates {
                ye = ye.f_mul(&g.f_narrow(0, start, c)?)?;
            }
            let _ = y.f_index_add_(0, &tokens, &ye)?;
            start += c;
        }
        if let Some(b2) = &down.bias {
            let _ = y.f_add_(b2)?;
        }
        let mut out_shape = shape;
        *out_shape.last_mut().expect("checked non-empty") = d_out;
        self.finish(y.f_view(out_shape.as_slice())?, ctx)
    }

    /// `Σ_j g_j FFN_{e_j}(x)` for every token through two (three when
    /// gated) grouped GEMMs over the dispatch order, with no host sync:
    /// `W1` is viewed as `[N, m, d]` (expert blocks are contiguous rows) and
    /// `W2` as `[N, d, m]`.
    fn grouped_experts(
        &self,
        x2: &Tensor,
        routing: &Routing,
        dispatch: &Dispatch,
    ) -> Result<Tensor> {
        let up = plain(&self.up, &self.names.up)?;
        let down = plain(&self.down, &self.names.down)?;
        if !self.grouped_widths_fit(x2.kind()) {
            return Err(Error::Tensor(tensor_core::Error::module(
                "EmoeFfn",
                format!(
                    "the grouped GEMM needs d_model, d_out and the expert size ({}) in multiples of 16 bytes",
                    self.expert_size()
                ),
            )));
        }
        let (n, m) = (self.num_experts() as i64, self.expert_size());
        let d = up.in_features();
        let d_out = down.out_features();
        let xs = dispatch.permute(x2)?;
        let w1 = up.weight.f_view([n, m, d])?;
        let b1 = up.bias.as_ref().map(|b| b.f_view([n, m])).transpose()?;
        let pre = grouped_linear_device(&xs, dispatch, &w1, b1.as_ref())?;
        let h = match &self.gate {
            Some(g) => {
                let wg = plain(g, "gate")?.weight.f_view([n, m, d])?;
                let g = grouped_linear_device(&xs, dispatch, &wg, None)?;
                self.activation.apply(&g)?.f_mul(&pre)?
            }
            None => self.activation.apply(&pre)?,
        };
        let w2 = down
            .weight
            .f_view([d_out, n, m])?
            .f_permute([1, 0, 2])?
            .f_contiguous()?;
        let ye = grouped_linear_device(&h, dispatch, &w2, self.expert_bias.as_ref())?;
        let gates = match routing.mode {
            WeightMode::Hard if !routing.dropped => None,
            _ => Some(&routing.weights),
        };
        let mut y = dispatch.unpermute(&ye, gates)?;
        if let Some(b2) = &down.bias {
            y = y.f_add(b2)?;
        }
        Ok(y)
    }

    fn finish(&self, y: Tensor, ctx: &Context) -> Result<Tensor> {
        if ctx.train && self.dropout > 0.0 {
            Ok(y.f_dropout(self.dropout, true)?)
        } else {
            Ok(y)
        }
    }

    fn projections_plain(&self) -> bool {
        is::<Linear>(self.up.as_ref())
            && is::<Linear>(self.down.as_ref())
            && self.gate.as_ref().is_none_or(|g| is::<Linear>(g.as_ref()))
    }

    /// Fold back to a dense `FeedForward` (EMoE step 8): the current weights,
    /// with the neuron permutation undone when `unpermute` (so an untuned
    /// split returns the original weights exactly), and `b2` kept
    /// (`shared`) or set to `k · mean_e b2_e` (`k_mean`). Trainability is kept.
    pub fn to_dense(&self, unpermute: bool) -> Result<FeedForward> {
        let up = plain(&self.up, &self.names.up)?;
        let down = plain(&self.down, &self.names.down)?;
        let detach = |t: &Tensor| crate::split::deep_copy(&t.f_detach()?);
        let (b2, b2_trainable) = match &self.expert_bias {
            Some(eb) => {
                let k = self.top_k() as f64;
                let b = tensor_core::tch::no_grad(|| {
                    eb.f_detach()?
                        .f_mean_dim([0i64].as_slice(), false, eb.kind())?
                        .f_mul_scalar(k)
                })
                .op("EmoeFfn fold b2")?;
                (Some(b), eb.requires_grad())
            }
            None => (
                down.bias.as_ref().map(detach).transpose()?,
                down.bias.as_ref().is_some_and(|b| b.requires_grad()),
            ),
        };
        let w = FfnWeights {
            w1: detach(&up.weight)?,
            b1: up.bias.as_ref().map(detach).transpose()?,
            gate: self
                .gate
                .as_ref()
                .map(|g| plain(g, "gate").and_then(|l| detach(&l.weight)))
                .transpose()?,
            w2: detach(&down.weight)?,
            b2,
        };
        let w = if unpermute {
            w.permuted(&inverse_permutation(&self.perm))?
        } else {
            w
        };
        let flag = |l: &Linear| {
            (
                l.weight.requires_grad(),
                l.bias.as_ref().is_some_and(|b| b.requires_grad()),
            )
        };
        let mut flags = vec![
            (FfnPart::Up, flag(up).0, flag(up).1),
            (FfnPart::Down, flag(down).0, b2_trainable),
        ];
        if let Some(g) = &self.gate {
            let l = plain(g, "gate")?;
            flags.push((FfnPart::Gate, flag(l).0, flag(l).1));
        }
        ffn_from(w, self.activation, self.names.clone(), self.dropout, &flags)
    }
}

impl EmoeFfn {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let r = match self.path {
            ComputePath::Masked => self.forward_masked(xs, ctx),
            ComputePath::Sparse => self.forward_sparse(xs, ctx),
            ComputePath::Grouped => self.forward_grouped(xs, ctx),
            ComputePath::Auto
                if !ctx.train
                    && self.projections_plain()
                    && self.router.config.select_signal.is_linear() =>
            {
                self.forward_sparse(xs, ctx)
            }
            ComputePath::Auto => self.forward_masked(xs, ctx),
        };
        r.map_err(|e| match e {
            Error::Tensor(t) => t,
            other => tensor_core::Error::module("EmoeFfn", other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{FoldB2, SelectSignal};
    use crate::kmeans::KMeansConfig;
    use crate::split::{kmeans_split, random_split};
    use proptest::prelude::*;
    use tensor_core::tch::Kind;
    use tensor_core::testing::{closeness, device, randn_seeded, tolerances, with_seed};
    use tensor_core::{DType, ModuleExt};

    /// A CPU bound for a result compared with one computed another way (the
    /// dense FFN, the masked path, a formula), loosened on the test device
    /// as [`tolerances`] loosens f32 there.
    fn scaled(bound: f64) -> f64 {
        bound * tolerances(DType::F32, device()).0 / DType::F32.tolerances().0
    }

    fn ffn(gated: bool, act: Activation, seed: u64) -> FeedForward {
        let dev = device();
        with_seed(seed, || {
            if gated {
                FeedForward::gated(16, 48, act, FfnNames::llama(), dev).unwrap()
            } else {
                FeedForward::new(16, 48, act, FfnNames::bert(), dev).unwrap()
            }
        })
    }

    fn run(m: &dyn Module, x: &Tensor, train: bool) -> Tensor {
        let mut ctx = if train {
            Context::train()
        } else {
            Context::eval()
        };
        m.forward(x, &mut ctx).unwrap()
    }

    fn err(a: &Tensor, b: &Tensor) -> f64 {
        closeness(a, b, 0.0, 0.0).unwrap().max_abs
    }

    #[test]
    fn capacity_drops_agree_across_paths_and_training_adds_the_cv2_loss() {
        use crate::regularise::Regularisers;
        let f = ffn(false, Activation::Gelu, 3);
        let s = random_split(48, 4, 0).unwrap();
        let mut e = EmoeFfn::from_ffn(&f, &s, GateConfig::without_noise(4, 2)).unwrap();
        // A tight capacity (f = 0.5: C = 2 · ⌊0.5 · ⌈24 / 4⌉⌋ = 6) forces drops.
        e.regularisers = Regularisers {
            capacity_factor: Some(0.5),
            ..Regularisers::tutel()
        };
        let x = randn_seeded(&[2, 12, 16], 9, device()).unwrap();
        let masked = e.forward_masked(&x, &mut Context::eval()).unwrap();
        let sparse = e.forward_per_expert(&x, &mut Context::eval()).unwrap();
        assert!(
            err(&masked, &sparse) < scaled(1e-5),
            "{}",
            err(&masked, &sparse)
        );
        let mut ctx = Context::eval();
        let _ = e.forward_masked(&x, &mut ctx).unwrap();
        let load = &ctx.stats()[0].1;
        assert!(load.max().double_value(&[]) <= 6.0, "{load}");
        assert!(ctx.aux_losses().is_empty(), "no CV² loss in evaluation");
        e.regularisers.capacity_factor = None;
        let free = e.forward_masked(&x, &mut Context::eval()).unwrap();
        assert!(err(&masked, &free) > 1e-4, "the capacity dropped nothing");
        let mut ctx = Context::train();
        let _ = e.forward_masked(&x, &mut ctx).unwrap();
        let (name, cv2) = &ctx.aux_losses()[0];
        assert!(name.ends_with("cv2"), "{name}");
        assert!(cv2.double_value(&[]) > 0.0);
    }

    #[test]
    fn all_experts_reproduce_the_dense_ffn() {
        for (gated, act) in [
            (false, Activation::Gelu),
            (false, Activation::Relu),
            (true, Activation::Silu),
        ] {
            let f = ffn(gated, act, 1);
            let split = kmeans_split(&f, &KMeansConfig::new(6)).unwrap();
            let mut e = EmoeFfn::from_ffn(&f, &split, GateConfig::without_noise(6, 6)).unwrap();
            let x = randn_seeded(&[2, 9, 16], 2, device()).unwrap();
            let dense = run(&f, &x, false);
            e.path = ComputePath::Masked;
            assert!(err(&run(&e, &x, false), &dense) <= scaled(1e-5));
            // Training (noise on) still selects everything when k = N.
            let noisy = EmoeFfn::from_ffn(&f, &split, GateConfig::new(6, 6)).unwrap();
            let trained = with_seed(0, || run(&noisy, &x, true));
            assert!(err(&trained, &dense) <= scaled(1e-5));
            e.path = ComputePath::Sparse;
            let sparse = run(&e, &x, false);
            assert_eq!(sparse.size(), dense.size());
            assert!(
                err(&sparse, &dense) <= scaled(1e-5),
                "{}",
                err(&sparse, &dense)
            );
            // Parameter names are the dense FFN's.
            let names = |m: &dyn Module| {
                m.named_parameters()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&e), names(&f));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// The sparse path computes exactly what the masked path does, for
        /// every k, weight mode, select signal and b2 bookkeeping.
        #[test]
        fn sparse_equals_masked(seed in 0u64..500, n in prop::sample::select(vec![2usize, 4, 8, 12]), kfrac in 0.0f64..1.0, gated in any::<bool>(), mode in 0usize..3, signal in 0usize..5, k_mean in any::<bool>()) {
            let f = ffn(gated, if gated { Activation::Silu } else { Activation::Gelu }, seed);
            let k = 1 + ((n - 1) as f64 * kfrac) as usize;
            let split = random_split(48, n, seed).unwrap();
            let mode = [WeightMode::Hard, WeightMode::Softmax, WeightMode::Renorm][mode];
            let signal = [SelectSignal::Gate, SelectSignal::Up, SelectSignal::UpAbs, SelectSignal::Inter, SelectSignal::InterAbs][signal];
            let cfg = GateConfig {
                weight_mode: mode,
                score_bias: seed % 2 == 0,
                select_signal: signal,
                fold_b2: if k_mean { FoldB2::KMean } else { FoldB2::Shared },
                ..GateConfig::without_noise(n, k)
            };
            let mut e = EmoeFfn::from_ffn(&f, &split, cfg).unwrap();
            let x = randn_seeded(&[3, 7, 16], seed + 7, device()).unwrap();
            e.path = ComputePath::Masked;
            let masked = run(&e, &x, false);
            e.path = ComputePath::Sparse;
            let sparse = run(&e, &x, false);
            prop_assert!(err(&sparse, &masked) <= scaled(1e-5), "k {} of {}: {}", k, n, err(&sparse, &masked));
            e.path = ComputePath::Auto;
            prop_assert!(err(&run(&e, &x, false), &masked) <= scaled(1e-5));
            if signal.is_linear() && (48 / n) % 4 == 0 {
                // The device grouped GEMM (libtorch's fallback on the CPU and for f32 on CUDA) computes the same.
                e.path = ComputePath::Grouped;
                let grouped = run(&e, &x, false);
                prop_assert!(err(&grouped, &masked) <= scaled(1e-5), "grouped, k {} of {}: {}", k, n, err(&grouped, &masked));
            }
            if k < n && !k_mean {
                // Fewer experts really changes the output.
                prop_assert!(err(&masked, &run(&f, &x, false)) > 1e-6);
            }
        }
    }

    /// What each select signal averages, computed by hand from the
    /// (permuted) dense weights: `gate` and `up` the pre-activations of
    /// their projection, `up_abs` `|x W1ᵀ + b1|`, `inter` / `inter_abs` the
    /// hidden activation.
    #[test]
    fn select_signals_route_by_their_neuron_values() {
        for gated in [false, true] {
            let f = ffn(
                gated,
                if gated {
                    Activation::Silu
                } else {
                    Activation::Gelu
                },
                11,
            );
            let split = random_split(48, 4, 3).unwrap();
            let dev = device();
            let x = randn_seeded(&[40, 16], 12, dev).unwrap();
            for signal in [
                SelectSignal::Gate,
                SelectSignal::Up,
                SelectSignal::UpAbs,
                SelectSignal::Inter,
                SelectSignal::InterAbs,
            ] {
                let cfg = GateConfig {
                    select_signal: signal,
                    ..GateConfig::without_noise(4, 1)
                };
                let mut e = EmoeFfn::from_ffn(&f, &split, cfg).unwrap();
                let p = e.to_dense(false).unwrap(); // expert-block order
                let up = x.linear(p.w1().unwrap(), p.b1().unwrap());
                let up_nobias = x.matmul(&p.w1().unwrap().tr());
                let h = if gated {
                    let g = x.matmul(&p.gate_weight().unwrap().tr());
                    Activation::Silu.apply(&g).unwrap() * &up
                } else {
                    Activation::Gelu.apply(&up).unwrap()
                };
                let values = match signal {
                    SelectSignal::Gate if gated => x.matmul(&p.gate_weight().unwrap().tr()),
                    SelectSignal::Gate | SelectSignal::Up => up_nobias,
                    SelectSignal::UpAbs => up.abs(),
                    SelectSignal::Inter => h.shallow_clone(),
                    SelectSignal::InterAbs => h.abs(),
                };
                let best = values
                    .view([40, 4, 12])
                    .mean_dim(2, false, Kind::Float)
                    .argmax(-1, true);
                let mask = Tensor::zeros([40, 4], (Kind::Float, dev))
                    .scatter_value(1, &best, 1.0)
                    .repeat_interleave_self_int(12, Some(1), None);
                let want = (h * mask).linear(p.w2().unwrap(), p.b2().unwrap());
                for path in [ComputePath::Masked, ComputePath::Sparse] {
                    e.path = path;
                    let got = run(&e, &x, false);
                    assert!(
                        err(&got, &want) <= scaled(1e-5),
                        "gated {gated} {signal:?} {path:?}: {}",
                        err(&got, &want)
                    );
                }
            }
        }
    }

    #[test]
    fn fold_b2_k_mean_keeps_per_expert_biases_and_folds_to_k_times_their_mean() {
        let f = ffn(false, Activation::Gelu, 13);
        let split = random_split(48, 4, 5).unwrap();
        let dev = device();
        let x = randn_seeded(&[2, 9, 16], 14, dev).unwrap();
        let cfg = |k| GateConfig {
            fold_b2: FoldB2::KMean,
            ..GateConfig::without_noise(4, k)
        };
        let mut e = EmoeFfn::from_ffn(&f, &split, cfg(2)).unwrap();
        let names: Vec<String> = e.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"expert_bias".to_owned()), "{names:?}");
        assert!(
            !names.contains(&"output.dense.bias".to_owned()),
            "{names:?}"
        );
        let eb = e.expert_bias.as_ref().unwrap();
        assert_eq!(eb.size(), [4, 16]);
        // Each expert starts with b2 / k.
        let b2 = f.b2().unwrap().unwrap();
        assert!(err(&eb.get(3), &(b2 / 2.0)) <= 1e-7);
        // Untuned: folding returns the original weights (b2 = k * mean(b2 / k)).
        let back = e.to_dense(true).unwrap();
        for ((n1, a), (n2, b)) in f
            .named_parameters()
            .into_iter()
            .zip(back.named_parameters())
        {
            assert_eq!(n1, n2);
            assert!(err(&a, &b) <= 1e-6, "{n1}");
        }
        // Selecting all experts reproduces the dense FFN (Σ_e b2 / N = b2).
        let all = EmoeFfn::from_ffn(&f, &split, cfg(4)).unwrap();
        assert!(err(&run(&all, &x, false), &run(&f, &x, false)) <= scaled(1e-5));
        // Tuned biases fold to k * mean_e b2_e.
        let tuned = randn_seeded(&[4, 16], 15, dev).unwrap();
        tensor_core::tch::no_grad(|| e.expert_bias.as_mut().unwrap().copy_(&tuned));
        let folded = e.to_dense(true).unwrap();
        let want = tuned.mean_dim(0, false, Kind::Float) * 2.0;
        assert!(err(folded.b2().unwrap().unwrap(), &want) <= 1e-6);
        // The per-expert biases enter with the selection: masked = sparse.
        e.path = ComputePath::Masked;
        let masked = run(&e, &x, false);
        e.path = ComputePath::Sparse;
        assert!(err(&run(&e, &x, false), &masked) <= scaled(1e-5));
        // They are trained (gradients arrive on the masked path).
        let mut t = EmoeFfn::from_ffn(&f, &split, cfg(2)).unwrap();
        t.path = ComputePath::Masked;
        run(&t, &x, true).sum(Kind::Float).backward();
        let g = t.expert_bias.as_ref().unwrap().grad();
        assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn gradients_reach_w1_w2_not_the_gate() {
        let f = ffn(false, Activation::Gelu, 3);
        let split = random_split(48, 4, 0).unwrap();
        let e = EmoeFfn::from_ffn(&f, &split, GateConfig::new(4, 2)).unwrap();
        let x = randn_seeded(&[5, 16], 4, device()).unwrap();
        with_seed(0, || run(&e, &x, true))
            .square()
            .sum(Kind::Float)
            .backward();
        for (name, p) in e.named_parameters() {
            let g = p.grad();
            assert!(g.defined(), "{name} has no gradient");
            assert!(
                g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name} gradient is zero"
            );
        }
        assert!(!e.router.centroids().requires_grad());
        // The sparse path is differentiable too.
        let mut e2 = EmoeFfn::from_ffn(&f, &split, GateConfig::without_noise(4, 2)).unwrap();
        e2.path = ComputePath::Sparse;
        run(&e2, &x, false).sum(Kind::Float).backward();
        let up = plain(&e2.up, "up").unwrap();
        assert!(up.weight.grad().defined());
    }

    #[test]
    fn refresh_tracks_updated_weights() {
        let f = ffn(false, Activation::Gelu, 5);
        let split = random_split(48, 4, 1).unwrap();
        let mut e = EmoeFfn::from_ffn(&f, &split, GateConfig::new(4, 2)).unwrap();
        let before = e.router.centroids().copy();
        tensor_core::tch::no_grad(|| {
            let up = tensor_core::module::downcast_mut::<Linear>(e.up.as_mut()).unwrap();
            let _ = up.weight.f_mul_scalar_(3.0).unwrap();
        });
        e.refresh_gate().unwrap();
        let after = e.router.centroids();
        assert!(err(after, &before.f_mul_scalar(3.0).unwrap()) <= scaled(1e-5));
        let w1 = &plain(&e.up, "up").unwrap().weight;
        assert!(
            err(
                after,
                &w1.detach()
                    .view([4, 12, 16])
                    .mean_dim(1, false, Kind::Float)
            ) <= 1e-6
        );
    }

    #[test]
    fn to_dense_of_an_untuned_split_returns_the_original_weights() {
        let f = ffn(true, Activation::Silu, 6);
        let split = random_split(48, 8, 2).unwrap();
        let e = EmoeFfn::from_ffn(&f, &split, GateConfig::new(8, 2)).unwrap();
        let back = e.to_dense(true).unwrap();
        for ((n1, a), (n2, b)) in f
            .named_parameters()
            .into_iter()
            .zip(back.named_parameters())
        {
            assert_eq!(n1, n2);
            assert!(a.equal(&b), "{n1} differs");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = ffn(false, Activation::Gelu, 7);
        let s = random_split(48, 4, 0).unwrap();
        assert!(EmoeFfn::from_ffn(&f, &s, GateConfig::new(4, 5)).is_err());
        assert!(EmoeFfn::from_ffn(&f, &s, GateConfig::new(4, 0)).is_err());
        assert!(EmoeFfn::from_ffn(&f, &s, GateConfig::new(3, 1)).is_err());
        assert!(
            EmoeFfn::from_ffn(&f, &random_split(24, 4, 0).unwrap(), GateConfig::new(4, 1)).is_err()
        );
        let mut e = EmoeFfn::from_ffn(&f, &s, GateConfig::new(4, 1)).unwrap();
        assert!(e.set_top_k(0).is_err());
        let dev = device();
        let bad = Tensor::zeros([2, 15], (Kind::Float, dev));
        e.path = ComputePath::Sparse;
        let msg = e
            .forward(&bad, &mut Context::eval())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("16"), "{msg}");
        // 8 experts of 6 neurons: f32 rows of 24 bytes, not what the grouped GEMM takes.
        let mut unaligned =
            EmoeFfn::from_ffn(&f, &random_split(48, 8, 0).unwrap(), GateConfig::new(8, 2)).unwrap();
        unaligned.path = ComputePath::Grouped;
        let x = Tensor::zeros([2, 16], (Kind::Float, dev));
        let msg = unaligned
            .forward(&x, &mut Context::eval())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("16 bytes"), "{msg}");
        let nan = FeedForward::from_weights(
            f.w1().unwrap().f_mul_scalar(f64::NAN).unwrap(),
            None,
            None,
            f.w2().unwrap().detach(),
            None,
            Activation::Gelu,
            FfnNames::bert(),
        )
        .unwrap();
        assert!(matches!(
            EmoeFfn::from_ffn(&nan, &s, GateConfig::new(4, 1)),
            Err(Error::NonFinite { .. })
        ));
    }
}
