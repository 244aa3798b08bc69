//! Neuron masks on FFN hidden activations, the instrument behind the
//! survey's sparsity and perturbation analyses (§4):
//!
//! `y = (a ⊙ m) W_Oᵀ + b_O`, with `m ∈ {0, 1}^{d_ff}` fixed (zero a brick
//! `S_f`), or per token: zero the `⌊k · d_ff⌉` neurons with the lowest
//! indicator (`|a_n|`, or `|a_n| · ‖W_O[:, n]‖`), or keep only the bricks an
//! activation-predicting router selects.
//!
//! [`MaskedFfn`] wraps a model's `FeedForward` in its own slot (the original
//! is a transparent child, so parameter names and recorded activation keys
//! do not change) and [`MaskGuard`]-style helpers install, set and remove
//! the wrappers on any model through `tensor_core`'s module tree.

use tensor_core::TchResultExt;
use tensor_core::layers::FeedForward;
use tensor_core::module::{Context, Identity, Module, ModuleExt, Slot, downcast_box, downcast_ref};
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::profile::{FfnSite, Indicator};
use crate::route::ActivationRouter;

/// What a [`MaskedFfn`] does to its hidden activation.
#[derive(Debug, Default)]
pub enum HiddenMask {
    /// Nothing: the FFN computes exactly as before.
    #[default]
    Keep,
    /// `[d_ff]` float: 1 keeps a neuron, 0 zeroes it (a brick's ablation).
    Fixed(Tensor),
    /// Per token, zero the `fraction` of neurons with the lowest indicator.
    LowestFraction { fraction: f64, indicator: Indicator },
    /// Per token, keep only the `top_k` bricks the router predicts (MoEfication-style).
    Routed {
        router: ActivationRouter,
        /// `[d_ff]` int64: each neuron's brick.
        brick_of: Tensor,
        top_k: i64,
    },
}

/// A `FeedForward` whose hidden activation is masked before the output projection.
#[derive(Debug, Module)]
#[module(kind = "MaskedFfn", forward = forward_impl)]
pub struct MaskedFfn {
    #[child(name = "")]
    inner: Slot,
    pub mask: HiddenMask,
    /// `‖W_O[:, n]‖`, for the output-magnitude indicator.
    out_norm: Tensor,
}

impl MaskedFfn {
    /// Wrap a slot holding a `FeedForward`; on failure the slot is handed back.
    pub fn wrap(inner: Slot) -> std::result::Result<Self, (Slot, Error)> {
        let norm = match downcast_ref::<FeedForward>(inner.as_ref()) {
            Some(f) => f
                .w2()
                .and_then(|w| {
                    w.f_detach()?
                        .f_to_kind(Kind::Float)?
                        .f_norm_scalaropt_dim(2, [0], false)
                        .op("MaskedFfn")
                })
                .map_err(Error::from),
            None => Err(Error::WrongModule {
                path: String::new(),
                found: inner.kind().into(),
                expected: "FeedForward",
            }),
        };
        match norm {
            Ok(out_norm) => Ok(Self {
                inner,
                mask: HiddenMask::Keep,
                out_norm,
            }),
            Err(e) => Err((inner, e)),
        }
    }

    pub fn ffn(&self) -> &FeedForward {
        downcast_ref::<FeedForward>(self.inner.as_ref()).expect("checked in wrap")
    }

    pub fn d_ff(&self) -> i64 {
        self.out_norm.size()[0]
    }

    /// Set the mask, checking it against this FFN's width.
    pub fn set(&mut self, mask: HiddenMask) -> Result<()> {
        let d = self.d_ff();
        match &mask {
            HiddenMask::Keep => {}
            HiddenMask::Fixed(m) => {
                if m.size() != [d] {
                    return Err(Error::mismatch(
                        "fixed neuron mask",
                        format!("shape [{d}] (d_ff)"),
                        format!("{:?}", m.size()),
                    ));
                }
                crate::error::check_finite("fixed neuron mask", m)?;
            }
            HiddenMask::LowestFraction { fraction, .. } => {
                if !(0.0..=1.0).contains(fraction) {
                    return Err(Error::config(format!(
                        "mask fraction {fraction} is outside [0, 1]"
                    )));
                }
            }
            HiddenMask::Routed {
                router,
                brick_of,
                top_k,
            } => {
                if brick_of.size() != [d] {
                    return Err(Error::mismatch(
                        "routed mask brick_of",
                        format!("shape [{d}] (d_ff)"),
                        format!("{:?}", brick_of.size()),
                    ));
                }
                let bricks = router.bricks();
                if *top_k < 1 || *top_k > bricks {
                    return Err(Error::config(format!(
                        "routed mask top_k {top_k} must be in 1..={bricks}"
                    )));
                }
                let max = brick_of.f_max()?.f_int64_value(&[])?;
                let min = brick_of.f_min()?.f_int64_value(&[])?;
                if min < 0 || max >= bricks {
                    return Err(Error::config(format!(
                        "routed mask brick_of has ids {min}..={max}, router has {bricks} bricks"
                    )));
                }
            }
        }
        self.mask = mask;
        Ok(())
    }

    fn apply(&self, xs: &Tensor, h: Tensor) -> tensor_core::Result<Tensor> {
        match &self.mask {
            HiddenMask::Keep => Ok(h),
            HiddenMask::Fixed(m) => Ok(h.f_mul(&m.f_to_device(h.device())?.f_to_kind(h.kind())?)?),
            HiddenMask::LowestFraction {
                fraction,
                indicator,
            } => {
                let d = self.d_ff();
                let k = (fraction * d as f64).round() as i64;
                if k == 0 {
                    return Ok(h);
                }
                let mut ind = h.f_abs()?;
                if *indicator == Indicator::OutputMagnitude {
                    ind =
                        ind.f_mul(&self.out_norm.f_to_device(h.device())?.f_to_kind(h.kind())?)?;
                }
                let lowest = ind.f_argsort(-1, false)?.f_narrow(-1, 0, k)?;
                let keep = h.f_ones_like()?.f_scatter_value(-1, &lowest, 0.0)?;
                Ok(h.f_mul(&keep)?)
            }
            HiddenMask::Routed {
                router,
                brick_of,
                top_k,
            } => {
                let chosen = router
                    .route(xs, *top_k)
                    .map_err(|e| tensor_core::Error::module("MaskedFfn router", e.to_string()))?;
                // [.., bricks] one-hot of the chosen bricks, gathered per neuron.
                let mut shape = chosen.size();
                *shape.last_mut().expect("route returns [.., k]") = router.bricks();
                let on = Tensor::f_zeros(&shape, (h.kind(), h.device()))?
                    .f_scatter_value(-1, &chosen, 1.0)?;
                let keep = on.f_index_select(-1, &brick_of.f_to_device(h.device())?)?;
                Ok(h.f_mul(&keep)?)
            }
        }
    }
}

impl MaskedFfn {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let ffn = self.ffn();
        let h = ffn.hidden(xs, ctx)?;
        let h = self.apply(xs, h)?;
        let y = ctx.call(&ffn.names.down, ffn.down.as_ref(), &h)?;
        if ctx.train && ffn.dropout > 0.0 {
            y.f_dropout(ffn.dropout, true).op("MaskedFfn dropout")
        } else {
            Ok(y)
        }
    }
}

/// Wrap the FFN at each site's path in a [`MaskedFfn`] (already wrapped ones are kept).
pub fn install_masks(model: &mut dyn Module, sites: &[FfnSite]) -> Result<()> {
    for s in sites {
        let slot = model.slot_mut(&s.path)?;
        if downcast_ref::<MaskedFfn>(slot.as_ref()).is_some() {
            continue;
        }
        let old = std::mem::replace(slot, Box::new(Identity));
        match MaskedFfn::wrap(old) {
            Ok(m) => *slot = Box::new(m),
            Err((old, e)) => {
                *slot = old;
                return Err(match e {
                    Error::WrongModule {
                        found, expected, ..
                    } => Error::WrongModule {
                        path: s.path.clone(),
                        found,
                        expected,
                    },
                    other => other,
                });
            }
        }
    }
    Ok(())
}

/// The mask wrapper at `path` (after [`install_masks`]).
pub fn masked_mut<'a>(model: &'a mut dyn Module, path: &str) -> Result<&'a mut MaskedFfn> {
    let slot = model.slot_mut(path)?;
    let kind = slot.kind();
    tensor_core::module::downcast_mut::<MaskedFfn>(slot.as_mut()).ok_or_else(|| {
        Error::WrongModule {
            path: path.into(),
            found: kind.into(),
            expected: "MaskedFfn (call install_masks first)",
        }
    })
}

/// Reset every site's mask to [`HiddenMask::Keep`].
pub fn clear_masks(model: &mut dyn Module, sites: &[FfnSite]) -> Result<()> {
    for s in sites {
        masked_mut(model, &s.path)?.mask = HiddenMask::Keep;
    }
    Ok(())
}

/// Unwrap every [`MaskedFfn`] at the sites, restoring the original `FeedForward`s.
pub fn remove_masks(model: &mut dyn Module, sites: &[FfnSite]) -> Result<()> {
    for s in sites {
        let slot = model.slot_mut(&s.path)?;
        let old = std::mem::replace(slot, Box::new(Identity));
        *slot = match downcast_box::<MaskedFfn>(old) {
            Ok(m) => m.inner,
            Err(other) => other,
        };
    }
    Ok(())
}

/// Per-site `[d_ff]` keep-masks that zero the global neuron indices in `set`.
pub fn set_masks(sites: &[FfnSite], set: &[usize]) -> Result<Vec<Tensor>> {
    let total: i64 = sites.iter().map(|s| s.d_ff).sum();
    let mut keep: Vec<Vec<f32>> = sites.iter().map(|s| vec![1.0; s.d_ff as usize]).collect();
    for &n in set {
        let site = sites
            .iter()
            .position(|s| (n as i64) >= s.offset && (n as i64) < s.offset + s.d_ff)
            .ok_or_else(|| Error::mismatch("neuron set", format!("indices below {total}"), n))?;
        keep[site][n - sites[site].offset as usize] = 0.0;
    }
    Ok(keep.iter().map(|k| Tensor::from_slice(k)).collect())
}

/// Zero the neurons of `set` (global indices) in every site's wrapper.
pub fn zero_set(model: &mut dyn Module, sites: &[FfnSite], set: &[usize]) -> Result<()> {
    for (s, m) in sites.iter().zip(set_masks(sites, set)?) {
        masked_mut(model, &s.path)?.set(HiddenMask::Fixed(m))?;
    }
    Ok(())
}
