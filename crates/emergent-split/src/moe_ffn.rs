//! `EmoeFfn`: a dense FFN run as a mixture of its own neuron blocks, step 5
//! of EMoE (Qiu et al. 2023, "Emergent Modularity in Pre-trained
//! Transformers", §3.1 of METHODS.md); MoEfication's "compute only the
//! selected experts" (Zhang et al. 2022, §3.2 step 3).
//!
//! With neurons permuted so that expert `e` owns rows `e m .. (e+1) m` of
//! `W1` (blocks `W1_e: [m, d]`, `b1_e`, gated `W_G,e`) and the same columns
//! of `W2` (`W2_e: [d, m]`), and `g_e(x)` the gate's weight (1 for a selected
//! expert in `Hard` mode, 0 when not selected):
//!
//! `y = Σ_{e ∈ top-k(x)} g_e(x) · act(W1_e x + b1_e) W2_eᵀ + b2`
//! (gated: `(act(W_G,e x) ⊙ (W1_e x + b1_e)) W2_eᵀ`).
//!
//! `b2` is added once; this equals the Tutel path's `b2/k` per expert in
//! `Hard` mode and makes folding back exact (`b2` unchanged).
//!
//! Two computations of the same `y`:
//! - **masked** ([`ComputePath::Masked`], training): the dense hidden
//!   activation times a `[T, d_ff]` mask made by repeating each expert's
//!   weight `m` times (the Llama path); differentiable, goes through the
//!   projection slots, so a LoRA-wrapped projection still works;
//! - **sparse** ([`ComputePath::Sparse`], inference): only the selected
//!   blocks are computed, with `tensor_core::grouped` (`Dispatch`, then
//!   `grouped_linear` over `W1` viewed as `[N, m, d]` and `W2` as `[N, d, m]`).
//!
//! The projections stay in slots under the dense FFN's names
//! (`intermediate.dense`, `output.dense`), so parameter names, and hence
//! checkpoints, are unchanged; the gate's centroids are not parameters.

use tensor_core::grouped::{Dispatch, grouped_linear};
use tensor_core::layers::{Activation, FeedForward, FfnNames, FfnPart, Linear};
use tensor_core::module::{downcast_ref, is};
use tensor_core::tch::Tensor;
use tensor_core::{Context, Module, Slot, TchResultExt};

use crate::error::{Error, Result, check_split};
use crate::gate::{AvgKeyGate, GateConfig, Routing, WeightMode};
use crate::split::{ExpertSplit, FfnWeights, ffn_from, inverse_permutation, trainability};

/// Which computation `forward` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputePath {
    /// Masked in training; sparse in evaluation when the projections are
    /// plain `Linear`s, masked otherwise.
    #[default]
    Auto,
    Masked,
    Sparse,
}

/// A `FeedForward` whose neurons are grouped into `N` experts, `k` of which
/// run per token.
#[derive(Debug)]
pub struct EmoeFfn {
    pub up: Slot,
    pub gate: Option<Slot>,
    pub down: Slot,
    pub activation: Activation,
    pub names: FfnNames,
    pub dropout: f64,
    pub router: AvgKeyGate,
    pub path: ComputePath,
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
        let p = weights.permuted(&perm)?;
        let keys = p.gate.as_ref().unwrap_or(&p.w1).shallow_clone();
        let router = AvgKeyGate::new(&keys, p.b1.as_ref(), gate)?;
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

    /// Recompute the gate's centroids from the current weights (after each optimiser step).
    pub fn refresh_gate(&mut self) -> Result<()> {
        let up = plain(&self.up, &self.names.up)?;
        let keys = match &self.gate {
            Some(g) => &plain(g, "gate")?.weight,
            None => &up.weight,
        };
        self.router.refresh(keys, up.bias.as_ref())
    }

    fn route(&self, x2: &Tensor, ctx: &mut Context) -> Result<Routing> {
        let r = self.router.route(x2, ctx.train)?;
        let n = self.num_experts() as i64;
        let load = r.experts.f_reshape([-1])?.f_bincount::<Tensor>(None, n)?;
        ctx.add_stat("expert_load", load);
        Ok(r)
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

    /// The dense hidden activation masked to the selected experts' neurons.
    pub fn forward_masked(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let (x2, _) = self.flat(xs)?;
        let routing = self.route(&x2, ctx)?;
        let up = ctx.call(&self.names.up, self.up.as_ref(), xs)?;
        let h = match (&self.gate, &self.names.gate) {
            (Some(g), Some(name)) => {
                let g = ctx.call(name, g.as_ref(), xs)?;
                self.activation.apply(&g)?.f_mul(&up).op("EmoeFfn gate")?
            }
            _ => self.activation.apply(&up)?,
        };
        let mask = routing
            .neuron_mask(self.num_experts(), self.expert_size())?
            .f_to_kind(h.kind())?
            .f_view(h.size().as_slice())?;
        let h = h.f_mul(&mask)?;
        ctx.record("act", &h)?;
        let y = ctx.call(&self.names.down, self.down.as_ref(), &h)?;
        self.finish(y, ctx)
    }

    /// Only the selected experts, through `tensor_core::grouped`.
    pub fn forward_sparse(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let (x2, shape) = self.flat(xs)?;
        let routing = self.route(&x2, ctx)?;
        let up = plain(&self.up, &self.names.up)?;
        let down = plain(&self.down, &self.names.down)?;
        let (n, m) = (self.num_experts() as i64, self.expert_size());
        let d = up.in_features();
        let dispatch = Dispatch::new(&routing.experts, n)?;
        let counts = dispatch.counts_host()?;
        let xs_sorted = dispatch.permute(&x2)?;
        let w1 = up.weight.f_view([n, m, d])?;
        let b1 = up.bias.as_ref().map(|b| b.f_view([n, m])).transpose()?;
        let mut h = grouped_linear(&xs_sorted, &counts, &w1, b1.as_ref())?;
        h = match &self.gate {
            Some(g) => {
                let wg = plain(g, "gate")?.weight.f_view([n, m, d])?;
                let g = grouped_linear(&xs_sorted, &counts, &wg, None)?;
                self.activation.apply(&g)?.f_mul(&h)?
            }
            None => self.activation.apply(&h)?,
        };
        // W2 [d, N m] -> [N, d, m] (a strided view, no copy).
        let w2 = down.weight.f_view([d, n, m])?.f_permute([1, 0, 2])?;
        let y = grouped_linear(&h, &counts, &w2, None)?;
        let gates = match routing.mode {
            WeightMode::Hard => None,
            _ => Some(routing.weights.f_to_kind(y.kind())?),
        };
        let mut y = dispatch.unpermute(&y, gates.as_ref())?;
        if let Some(b2) = &down.bias {
            y = y.f_add(b2)?;
        }
        let mut out_shape = shape;
        *out_shape.last_mut().expect("checked non-empty") = down.out_features();
        self.finish(y.f_view(out_shape.as_slice())?, ctx)
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
    /// split returns the original weights exactly). Trainability is kept.
    pub fn to_dense(&self, unpermute: bool) -> Result<FeedForward> {
        let up = plain(&self.up, &self.names.up)?;
        let down = plain(&self.down, &self.names.down)?;
        let detach = |t: &Tensor| crate::split::deep_copy(&t.f_detach()?);
        let w = FfnWeights {
            w1: detach(&up.weight)?,
            b1: up.bias.as_ref().map(detach).transpose()?,
            gate: self
                .gate
                .as_ref()
                .map(|g| plain(g, "gate").and_then(|l| detach(&l.weight)))
                .transpose()?,
            w2: detach(&down.weight)?,
            b2: down.bias.as_ref().map(detach).transpose()?,
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
            (FfnPart::Down, flag(down).0, flag(down).1),
        ];
        if let Some(g) = &self.gate {
            let l = plain(g, "gate")?;
            flags.push((FfnPart::Gate, flag(l).0, flag(l).1));
        }
        ffn_from(w, self.activation, self.names.clone(), self.dropout, &flags)
    }
}

impl Module for EmoeFfn {
    fn kind(&self) -> &'static str {
        "EmoeFfn"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let r = match self.path {
            ComputePath::Masked => self.forward_masked(xs, ctx),
            ComputePath::Sparse => self.forward_sparse(xs, ctx),
            ComputePath::Auto if !ctx.train && self.projections_plain() => {
                self.forward_sparse(xs, ctx)
            }
            ComputePath::Auto => self.forward_masked(xs, ctx),
        };
        r.map_err(|e| match e {
            Error::Tensor(t) => t,
            other => tensor_core::Error::module("EmoeFfn", other.to_string()),
        })
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        let mut v: Vec<(&str, &dyn Module)> = vec![(self.names.up.as_str(), self.up.as_ref())];
        if let (Some(g), Some(n)) = (&self.gate, &self.names.gate) {
            v.push((n.as_str(), g.as_ref()));
        }
        v.push((self.names.down.as_str(), self.down.as_ref()));
        v
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        let mut v: Vec<(&str, &mut Slot)> = vec![(self.names.up.as_str(), &mut self.up)];
        if let (Some(g), Some(n)) = (&mut self.gate, &self.names.gate) {
            v.push((n.as_str(), g));
        }
        v.push((self.names.down.as_str(), &mut self.down));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::KMeansConfig;
    use crate::split::{kmeans_split, random_split};
    use proptest::prelude::*;
    use tensor_core::ModuleExt;
    use tensor_core::tch::{Device, Kind};
    use tensor_core::testing::{closeness, randn_seeded, with_seed};

    fn ffn(gated: bool, act: Activation, seed: u64) -> FeedForward {
        with_seed(seed, || {
            if gated {
                FeedForward::gated(16, 48, act, FfnNames::llama(), Device::Cpu).unwrap()
            } else {
                FeedForward::new(16, 48, act, FfnNames::bert(), Device::Cpu).unwrap()
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
    fn all_experts_reproduce_the_dense_ffn() {
        for (gated, act) in [
            (false, Activation::Gelu),
            (false, Activation::Relu),
            (true, Activation::Silu),
        ] {
            let f = ffn(gated, act, 1);
            let split = kmeans_split(&f, &KMeansConfig::new(6)).unwrap();
            let mut e = EmoeFfn::from_ffn(&f, &split, GateConfig::without_noise(6, 6)).unwrap();
            let x = randn_seeded(&[2, 9, 16], 2, Device::Cpu).unwrap();
            let dense = run(&f, &x, false);
            e.path = ComputePath::Masked;
            assert!(err(&run(&e, &x, false), &dense) <= 1e-5);
            // Training (noise on) still selects everything when k = N.
            let noisy = EmoeFfn::from_ffn(&f, &split, GateConfig::new(6, 6)).unwrap();
            assert!(err(&run(&noisy, &x, true), &dense) <= 1e-5);
            e.path = ComputePath::Sparse;
            let sparse = run(&e, &x, false);
            assert_eq!(sparse.size(), dense.size());
            assert!(err(&sparse, &dense) <= 1e-5, "{}", err(&sparse, &dense));
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

        /// The sparse path computes exactly what the masked path does, for every k and weight mode.
        #[test]
        fn sparse_equals_masked(seed in 0u64..500, n in prop::sample::select(vec![2usize, 4, 8, 12]), kfrac in 0.0f64..1.0, gated in any::<bool>(), mode in 0usize..3) {
            let f = ffn(gated, if gated { Activation::Silu } else { Activation::Gelu }, seed);
            let k = 1 + ((n - 1) as f64 * kfrac) as usize;
            let split = random_split(48, n, seed).unwrap();
            let mode = [WeightMode::Hard, WeightMode::Softmax, WeightMode::Renorm][mode];
            let cfg = GateConfig { weight_mode: mode, score_bias: seed % 2 == 0, ..GateConfig::without_noise(n, k) };
            let mut e = EmoeFfn::from_ffn(&f, &split, cfg).unwrap();
            let x = randn_seeded(&[3, 7, 16], seed + 7, Device::Cpu).unwrap();
            e.path = ComputePath::Masked;
            let masked = run(&e, &x, false);
            e.path = ComputePath::Sparse;
            let sparse = run(&e, &x, false);
            prop_assert!(err(&sparse, &masked) <= 1e-5, "k {} of {}: {}", k, n, err(&sparse, &masked));
            if k < n {
                // Fewer experts really changes the output.
                prop_assert!(err(&masked, &run(&f, &x, false)) > 1e-6);
            }
        }
    }

    #[test]
    fn gradients_reach_w1_w2_not_the_gate() {
        let f = ffn(false, Activation::Gelu, 3);
        let split = random_split(48, 4, 0).unwrap();
        let e = EmoeFfn::from_ffn(&f, &split, GateConfig::new(4, 2)).unwrap();
        let x = randn_seeded(&[5, 16], 4, Device::Cpu).unwrap();
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
        assert!(err(after, &before.f_mul_scalar(3.0).unwrap()) <= 1e-5);
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
        let bad = Tensor::zeros([2, 15], (Kind::Float, Device::Cpu));
        e.path = ComputePath::Sparse;
        let msg = e
            .forward(&bad, &mut Context::eval())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("16"), "{msg}");
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
