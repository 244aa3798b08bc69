//! Least-squares merge on recorded input features: the closed form of what
//! Mix-of-Show's gradient fusion solves by iteration (Gu et al.,
//! "Mix-of-Show: Decentralized Low-Rank Adaptation for Multi-Concept
//! Customization of Diffusion Models", NeurIPS 2023, arXiv 2305.18292;
//! docs/orthogonal-merge.md, Method, part 2 step 5).
//!
//! Per layer, with task `i`'s fine-tuned weight `W_i = W_0 + w_i ΔW_i` and its
//! recorded inputs `X_i ∈ R^{N_i×in}` (one row per token):
//!
//! ```text
//! G_i = X_iᵀ X_i / N_i                                 (mean Gram, so tasks count equally)
//! W*  = argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²/N_i + λ‖W − W_0‖²_F
//!     = W_0 + (Σ_i w_i ΔW_i G_i)(Σ_i G_i + λI)⁻¹
//! ```
//!
//! The ridge pulls `W` toward the base `W_0` (the Method writes the ridge
//! toward 0, `(Σ_i W_i G_i)(Σ_i G_i + λI)⁻¹`; both agree as `λ → 0`, and this
//! form needs no `W_0`). Solved in f64 by a Cholesky factorisation; a Gram
//! that is singular with `λ = 0` is an error asking for `λ > 0`.
//!
//! Features are recorded by [`record_features`]: each target `Linear` is
//! wrapped by a [`GramTap`] that accumulates `XᵀX` (padding rows excluded when
//! the context carries an attention mask of the input's `[batch, seq]`
//! shape) while the caller runs the model, then unwrapped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tensor_core::module::{Context, Identity, Module, ModuleExt, Slot, downcast_box};
use tensor_core::tch::{self, Kind, Tensor};

use crate::error::{Error, Result};
use crate::target::resolve_targets;

/// `Σ xᵀx` over recorded rows, and their count.
#[derive(Debug)]
pub struct Gram {
    /// `[in, in]`, f64.
    pub xtx: Tensor,
    pub count: i64,
}

impl Gram {
    /// `XᵀX / N`.
    pub fn mean(&self) -> Result<Tensor> {
        if self.count == 0 {
            return Err(Error::config("no input rows were recorded for this layer"));
        }
        Ok(self.xtx.f_div_scalar(self.count as f64)?)
    }
}

/// Recorded Grams of one task, by layer path.
#[derive(Debug, Default)]
pub struct Features {
    pub layers: BTreeMap<String, Gram>,
}

impl Features {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add rows `x` (`[*, in]`) to `layer`'s Gram.
    pub fn add(&mut self, layer: &str, x: &Tensor) -> Result<()> {
        let inp = *x
            .size()
            .last()
            .ok_or_else(|| Error::mismatch("features must be [*, in]"))?;
        let x2 = x
            .f_detach()?
            .f_reshape([-1, inp])?
            .f_to_kind(Kind::Double)?;
        let g = x2.f_transpose(0, 1)?.f_mm(&x2)?;
        let rows = x2.size()[0];
        match self.layers.get_mut(layer) {
            Some(e) => {
                if e.xtx.size() != g.size() {
                    return Err(Error::mismatch(format!(
                        "{layer}: features of width {inp} after features of width {}",
                        e.xtx.size()[0]
                    )));
                }
                let _ = e.xtx.f_add_(&g)?;
                e.count += rows;
            }
            None => {
                self.layers.insert(
                    layer.to_owned(),
                    Gram {
                        xtx: g,
                        count: rows,
                    },
                );
            }
        }
        Ok(())
    }
}

type Store = Arc<Mutex<Option<(Tensor, i64)>>>;

/// Records its input's Gram, then runs the wrapped module (transparent child).
#[derive(Debug, Module)]
#[module(kind = "GramTap", forward = forward_impl)]
pub struct GramTap {
    #[child(name = "")]
    inner: Slot,
    store: Store,
}

impl GramTap {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let inp = *xs.size().last().unwrap_or(&0);
        let mut x2 = xs.f_detach()?.f_to_kind(Kind::Double)?;
        if let Some(m) = &ctx.attention_mask
            && xs.dim() == 3
            && m.size()[..] == xs.size()[..2]
        {
            x2 = x2.f_mul(
                &m.f_to_kind(Kind::Double)?
                    .f_to_device(xs.device())?
                    .f_unsqueeze(-1)?,
            )?;
            let rows = m.f_ne(0)?.f_sum(Kind::Int64)?.int64_value(&[]);
            self.accumulate(&x2.f_reshape([-1, inp])?, rows)?;
        } else {
            let x2 = x2.f_reshape([-1, inp])?;
            let rows = x2.size()[0];
            self.accumulate(&x2, rows)?;
        }
        ctx.call("", self.inner.as_ref(), xs)
    }
}

impl GramTap {
    fn accumulate(&self, x2: &Tensor, rows: i64) -> tensor_core::Result<()> {
        let g = tch::no_grad(|| x2.f_transpose(0, 1)?.f_mm(x2))?;
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        match s.as_mut() {
            Some((acc, n)) => {
                let _ = acc.f_add_(&g)?;
                *n += rows;
            }
            None => *s = Some((g, rows)),
        }
        Ok(())
    }
}

/// Run `run` on `model` with the inputs of the `Linear`s matching `targets`
/// recorded; the model is restored afterwards (also on error).
pub fn record_features<M: ModuleExt + ?Sized>(
    model: &mut M,
    targets: &[&str],
    run: impl FnOnce(&mut M) -> Result<()>,
) -> Result<Features> {
    let pats: Vec<String> = targets.iter().map(|s| (*s).to_owned()).collect();
    let paths = resolve_targets(model, &pats)?;
    let mut stores = Vec::new();
    for p in &paths {
        let store: Store = Arc::new(Mutex::new(None));
        let s2 = store.clone();
        let slot = model.slot_mut(p)?;
        let inner = std::mem::replace(slot, Box::new(Identity));
        *slot = Box::new(GramTap { inner, store: s2 });
        stores.push((p.clone(), store));
    }
    let result = run(model);
    for (p, _) in &stores {
        let slot = model.slot_mut(p)?;
        let old = std::mem::replace(slot, Box::new(Identity));
        *slot = match downcast_box::<GramTap>(old) {
            Ok(t) => t.inner,
            Err(old) => old,
        };
    }
    result?;
    let mut f = Features::new();
    for (p, store) in stores {
        let taken = store.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((xtx, count)) = taken {
            f.layers.insert(p, Gram { xtx, count });
        }
    }
    Ok(f)
}

/// `(Σ_i w_i ΔW_i G_i)(Σ_i G_i + λI)⁻¹` for one layer: `deltas[i]` `[out, in]`,
/// `grams[i]` `[in, in]` (mean Grams). Returned in f32.
pub fn least_squares(
    deltas: &[Tensor],
    grams: &[Tensor],
    weights: &[f64],
    ridge: f64,
) -> Result<Tensor> {
    crate::prune::check_weights(deltas.len(), weights)?;
    if grams.len() != deltas.len() {
        return Err(Error::mismatch(format!(
            "{} Grams for {} deltas",
            grams.len(),
            deltas.len()
        )));
    }
    if ridge.is_nan() || ridge < 0.0 {
        return Err(Error::config(format!("ridge must be >= 0, got {ridge}")));
    }
    let inp = deltas[0].size()[1];
    let mut rhs: Option<Tensor> = None;
    let mut gsum: Option<Tensor> = None;
    for (i, (d, g)) in deltas.iter().zip(grams).enumerate() {
        if d.dim() != 2 || d.size()[1] != inp || g.size() != [inp, inp] {
            return Err(Error::mismatch(format!(
                "least squares: delta {i} {:?} and Gram {:?} do not fit [out, {inp}] / [{inp}, {inp}]",
                d.size(),
                g.size()
            )));
        }
        let g = g.f_to_kind(Kind::Double)?.f_to_device(d.device())?;
        let term = d
            .f_to_kind(Kind::Double)?
            .f_mm(&g)?
            .f_mul_scalar(weights[i])?;
        rhs = Some(match rhs {
            None => term,
            Some(r) => r.f_add(&term)?,
        });
        gsum = Some(match gsum {
            None => g,
            Some(s) => s.f_add(&g)?,
        });
    }
    let (rhs, g) = (rhs.expect("non-empty"), gsum.expect("non-empty"));
    let eye = Tensor::f_eye(inp, (Kind::Double, g.device()))?;
    let lhs = g.f_add(&eye.f_mul_scalar(ridge)?)?;
    let (l, info) = lhs.f_linalg_cholesky_ex(false, false)?;
    if info.int64_value(&[]) != 0 {
        return Err(Error::config(format!(
            "least squares: Σ G_i + {ridge}·I is singular (the recorded features span fewer than {inp} directions); set a ridge > 0"
        )));
    }
    // D (G + λI) = R  ⇔  (G + λI) Dᵀ = Rᵀ
    let dt = rhs.f_transpose(0, 1)?.f_cholesky_solve(&l, false)?;
    Ok(dt
        .f_transpose(0, 1)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?)
}
