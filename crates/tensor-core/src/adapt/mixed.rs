//! Mixed-adapter batches: each sample names an adapter, or [`BASE`] for
//! none, and one forward pass serves them all.
//!
//! The base output is computed once for the whole batch. Each adapted layer
//! then adds, row by row, its own sample's change: low-rank deltas gather
//! every sample's `(A, s·B)` from the stacked factors and apply them with two
//! batched matmuls, `Δy_b = x_b A_{a(b)}ᵀ (s_{a(b)} B_{a(b)})ᵀ`; scaling
//! deltas gather every sample's vector; any other additive change is
//! computed once and masked to its own rows. No per-adapter sub-batches and
//! no host sync: the per-sample choice travels as one index tensor in the
//! forward [`crate::module::Context`], as a typed extension.

use tch::{Device, Tensor};

use crate::error::{Error, Result};

/// The name that selects no adapter.
pub const BASE: &str = "__base__";

/// The per-sample adapter choice, put into the forward context with
/// `ctx.insert(MixedBatch::new(...)?)`.
#[derive(Debug)]
pub struct MixedBatch {
    /// Distinct adapter names of the batch (without [`BASE`]).
    pub table: Vec<String>,
    /// `[B]` int64: index into `table`, or -1 for the base model.
    pub index: Tensor,
}

impl MixedBatch {
    /// From one name per sample.
    pub fn new<S: AsRef<str>>(names: &[S], device: Device) -> Result<Self> {
        if names.is_empty() {
            return Err(Error::config("a mixed batch needs at least one sample"));
        }
        let mut table: Vec<String> = Vec::new();
        let mut idx = Vec::with_capacity(names.len());
        for n in names {
            let n = n.as_ref();
            if n == BASE {
                idx.push(-1i64);
                continue;
            }
            let pos = match table.iter().position(|t| t == n) {
                Some(p) => p,
                None => {
                    table.push(n.to_owned());
                    table.len() - 1
                }
            };
            idx.push(pos as i64);
        }
        let index = Tensor::from_slice(&idx).f_to_device(device)?;
        Ok(Self { table, index })
    }

    pub fn batch_size(&self) -> i64 {
        self.index.size()[0]
    }

    /// Each sample's position in `local` (a layer's own adapters), or
    /// `local.len()` where the sample's adapter is not held there (or is the base).
    pub fn local_index(&self, local: &[&str]) -> Result<Tensor> {
        let mut lookup = Vec::with_capacity(self.table.len() + 1);
        lookup.push(local.len() as i64);
        for t in &self.table {
            lookup.push(local.iter().position(|l| l == t).unwrap_or(local.len()) as i64);
        }
        let lookup = Tensor::from_slice(&lookup).f_to_device(self.index.device())?;
        Ok(lookup.f_index_select(0, &self.index.f_add_scalar(1)?)?)
    }

    /// `[B, 1, …]` float mask of the samples whose local index is `j`, shaped to broadcast over `like`.
    pub fn row_mask(local_index: &Tensor, j: usize, like: &Tensor) -> Result<Tensor> {
        let m = local_index.f_eq(j as i64)?.f_to_kind(like.kind())?;
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
        Ok(m.f_reshape(shape.as_slice())?)
    }

    /// Check that `xs`'s leading dimension is the batch.
    pub fn check_rows(&self, xs: &Tensor, what: &str) -> Result<()> {
        let b = self.batch_size();
        if xs.dim() < 2 || xs.size()[0] != b {
            return Err(Error::shape(
                format!("{what} (mixed batch of {b} samples)"),
                format!("[{b}, ...]"),
                xs.size(),
            ));
        }
        Ok(())
    }
}

/// Stack `[r_i, k]` matrices into `[n + 1, r_max, k]`, zero-padded, with a
/// final all-zero slot (the base model's "adapter"). `rows_last`: the rank
/// is the last dimension (`[k, r_i]`) instead of the first.
pub(crate) fn stack_padded(mats: &[Tensor], rows_last: bool) -> Result<Tensor> {
    let rdim = if rows_last { 1 } else { 0 };
    let r_max = mats.iter().map(|m| m.size()[rdim]).max().unwrap_or(1);
    let mut padded = Vec::with_capacity(mats.len() + 1);
    for m in mats {
        let r = m.size()[rdim];
        let p = if r == r_max {
            m.shallow_clone()
        } else if rows_last {
            m.f_constant_pad_nd([0, r_max - r])?
        } else {
            m.f_constant_pad_nd([0, 0, 0, r_max - r])?
        };
        padded.push(p);
    }
    let first = &mats[0];
    let k = first.size()[1 - rdim];
    let zero_shape = if rows_last { [k, r_max] } else { [r_max, k] };
    padded.push(Tensor::f_zeros(zero_shape, (first.kind(), first.device()))?);
    Ok(Tensor::f_stack(&padded, 0)?)
}

/// Stack `[k]` vectors into `[n + 1, k]` with a final slot of `fill`.
pub(crate) fn stack_vectors(vs: &[Tensor], fill: f64) -> Result<Tensor> {
    let mut all: Vec<Tensor> = vs.iter().map(|v| v.shallow_clone()).collect();
    let v0 = &vs[0];
    all.push(Tensor::f_full(
        v0.size().as_slice(),
        fill,
        (v0.kind(), v0.device()),
    )?);
    Ok(Tensor::f_stack(&all, 0)?)
}
