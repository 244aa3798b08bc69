//! Growing a brick (survey §3.5 "Growing"; T-Patcher, Huang et al. 2023,
//! arXiv 2301.09785, for the neuron form).
//!
//! Widen an FFN with `m` new neurons while the old ones stay frozen:
//!
//! `y = FFN_old(x) + act(x W_newᵀ + b_new) W'_newᵀ` (gated FFNs:
//! `act(x G_newᵀ) ⊙ (x W_newᵀ)`), with `W'_new = 0` at insertion, so the
//! grown FFN computes exactly the old function until the new neurons are
//! trained. [`GrownFfn`] keeps the old `FeedForward` as a transparent child
//! (its parameter names are unchanged, its parameters frozen) and owns only
//! the new, trainable ones (`grown_up.weight`, `grown_up.bias`,
//! `grown_gate.weight`, `grown_down.weight`). [`GrownFfn::widened`] folds
//! both into one `FeedForward` of width `d_ff + m` (rows appended to
//! `W_1`/`b_1`/`W_G`, columns to `W_2`), the same function.

use tensor_core::layers::FeedForward;
use tensor_core::module::{Context, Identity, Module, ModuleExt, Slot, downcast_ref};
use tensor_core::seed::randn_seeded;
use tensor_core::tch::Tensor;

use crate::error::{Error, Result};

/// A frozen FFN plus `m` new trainable neurons.
#[derive(Debug, Module)]
#[module(kind = "GrownFfn", forward = forward_impl)]
pub struct GrownFfn {
    #[child(name = "")]
    base: Slot,
    /// `[m, d_model]`
    #[param(name = "grown_up.weight")]
    pub up: Tensor,
    /// `[m]`, when the base FFN's up-projection has a bias.
    #[param(name = "grown_up.bias")]
    pub up_bias: Option<Tensor>,
    /// `[m, d_model]`, for gated FFNs.
    #[param(name = "grown_gate.weight")]
    pub gate: Option<Tensor>,
    /// `[d_model, m]`, zero at insertion.
    #[param(name = "grown_down.weight")]
    pub down: Tensor,
}

impl GrownFfn {
    /// Grow `base` (a slot holding a `FeedForward`) by `m` neurons whose
    /// input weights are `N(0, 1/d_model)` from `seed`; freezes `base`.
    pub fn new(mut base: Slot, m: i64, seed: u64) -> std::result::Result<Self, (Slot, Error)> {
        let dims = match downcast_ref::<FeedForward>(base.as_ref()) {
            None => Err(Error::WrongModule {
                path: String::new(),
                found: base.kind().into(),
                expected: "FeedForward",
            }),
            Some(_) if m < 1 => Err(Error::config(format!(
                "grow by {m} neurons: must be at least 1"
            ))),
            Some(f) => (|| -> Result<_> {
                let w1 = f.w1()?;
                Ok((
                    f.d_model()?,
                    w1.kind(),
                    w1.device(),
                    f.b1()?.is_some(),
                    f.gate.is_some(),
                ))
            })(),
        };
        let (d, kind, dev, has_bias, gated) = match dims {
            Ok(x) => x,
            Err(e) => return Err((base, e)),
        };
        let build = || -> Result<Self> {
            let scale = 1.0 / (d as f64).sqrt();
            let up = randn_seeded(&[m, d], seed, dev)?
                .f_mul_scalar(scale)?
                .f_to_kind(kind)?;
            let gate = if gated {
                Some(
                    randn_seeded(&[m, d], seed.wrapping_add(1), dev)?
                        .f_mul_scalar(scale)?
                        .f_to_kind(kind)?,
                )
            } else {
                None
            };
            Ok(Self {
                base: Box::new(Identity),
                up: up.set_requires_grad(true),
                up_bias: if has_bias {
                    Some(Tensor::f_zeros([m], (kind, dev))?.set_requires_grad(true))
                } else {
                    None
                },
                gate: gate.map(|g| g.set_requires_grad(true)),
                down: Tensor::f_zeros([d, m], (kind, dev))?.set_requires_grad(true),
            })
        };
        match build() {
            Ok(mut g) => {
                let _ = base.for_each_param_mut(&mut |_, p| {
                    *p = p.detach().set_requires_grad(false);
                    Ok(())
                });
                g.base = base;
                Ok(g)
            }
            Err(e) => Err((base, e)),
        }
    }

    pub fn base(&self) -> &FeedForward {
        downcast_ref::<FeedForward>(self.base.as_ref()).expect("checked in new")
    }

    pub fn grown(&self) -> i64 {
        self.up.size()[0]
    }

    fn new_hidden(&self, xs: &Tensor) -> tensor_core::Result<Tensor> {
        let ffn = self.base();
        let up = xs.f_linear(&self.up, self.up_bias.as_ref())?;
        match &self.gate {
            Some(g) => ffn
                .activation
                .apply(&xs.f_linear::<Tensor>(g, None)?)?
                .f_mul(&up)
                .map_err(Into::into),
            None => ffn.activation.apply(&up),
        }
    }

    /// One `FeedForward` of width `d_ff + m` computing the same function.
    pub fn widened(&self) -> Result<FeedForward> {
        let f = self.base();
        let d = |t: &Tensor| t.detach();
        let w1 = Tensor::f_cat(&[d(f.w1()?), d(&self.up)], 0)?;
        let b1 = match (f.b1()?, &self.up_bias) {
            (Some(b), Some(n)) => Some(Tensor::f_cat(&[d(b), d(n)], 0)?),
            _ => None,
        };
        let gate = match &self.gate {
            Some(g) => Some(Tensor::f_cat(&[d(f.gate_weight()?), d(g)], 0)?),
            None => None,
        };
        let w2 = Tensor::f_cat(&[d(f.w2()?), d(&self.down)], 1)?;
        let b2 = f.b2()?.map(d);
        let mut out =
            FeedForward::from_weights(w1, b1, gate, w2, b2, f.activation, f.names.clone())?;
        out.dropout = f.dropout;
        Ok(out)
    }
}

impl GrownFfn {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let old = ctx.call("", self.base.as_ref(), xs)?;
        let h = self.new_hidden(xs)?;
        ctx.record("grown_act", &h)?;
        let new = h.f_linear::<Tensor>(&self.down, None)?;
        Ok(old.f_add(&new)?)
    }
}

/// Grow the `FeedForward` at `path` of `model` by `m` trainable neurons (old ones frozen).
pub fn grow_ffn(model: &mut dyn Module, path: &str, m: i64, seed: u64) -> Result<()> {
    let slot = model.slot_mut(path)?;
    let old = std::mem::replace(slot, Box::new(Identity));
    match GrownFfn::new(old, m, seed) {
        Ok(g) => {
            *slot = Box::new(g);
            Ok(())
        }
        Err((old, e)) => {
            *slot = old;
            Err(match e {
                Error::WrongModule {
                    found, expected, ..
                } => Error::WrongModule {
                    path: path.into(),
                    found,
                    expected,
                },
                other => other,
            })
        }
    }
}
