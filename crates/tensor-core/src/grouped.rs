//! Grouped expert computation: permute tokens by expert, one matmul per
//! expert group, unpermute and combine with the gate weights.
//!
//! For `N` tokens each routed to `k` experts (`expert_idx: [N, k]`, gates
//! `g: [N, k]`) and per-expert linear maps `W_e: [out, in]`, `b_e: [out]`:
//!
//! `y_t = Σ_j g_{t,j} (W_{e(t,j)} x_t + b_{e(t,j)})`
//!
//! computed as in MegaBlocks/Tutel rather than by masking a dense product:
//! 1. [`Dispatch::new`]: a stable sort of the `N k` assignments by expert
//!    (rows of one expert become contiguous, in token order) and per-expert counts;
//! 2. [`Dispatch::permute`]: gather `x` into that order (`[N k, in]`);
//! 3. [`grouped_linear`]: one matmul per group (`[n_e, in] x [in, out]`), or
//!    [`grouped_linear_padded`]: one batched matmul over `[E, capacity, in]`;
//! 4. [`Dispatch::unpermute`]: scale rows by their gates and scatter-add them
//!    back to their tokens.
//!
//! Every step is a differentiable tensor op, so autograd reaches `x`, the
//! expert weights and the gates. Expert weights use the `Linear` layout
//! `[E, out, in]`, so the rows of a dense FFN's `W1` split into contiguous
//! blocks are a zero-copy view.
//!
//! Host synchronisation: [`grouped_linear`] needs the group sizes on the host
//! to cut the rows (one transfer of `E` integers per call, [`Dispatch::counts_host`]).
//! [`grouped_linear_padded`] needs none: positions inside each group are
//! computed on the device and rows beyond `capacity` are dropped (output
//! zero), the capacity-factor regime of Switch/GShard.
//! [`grouped_linear_device`] is dropless and needs none either where
//! libtorch has a device grouped GEMM: it hands the group offsets, as a
//! device tensor, to `torch._grouped_mm` (CUTLASS grouped GEMM for bf16 on
//! sm90/sm100, the MegaBlocks regime). Elsewhere (CPU, f32 on CUDA, older
//! GPUs) libtorch's fallback copies the offsets to the host and loops.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TchResultExt};

/// The permutation that groups token-expert assignments by expert.
#[derive(Debug)]
pub struct Dispatch {
    pub num_tokens: i64,
    pub top_k: i64,
    pub num_experts: i64,
    /// `[N k]`: for each sorted row, the flat assignment index `t k + j`.
    pub order: Tensor,
    /// `[N k]`: the token of each sorted row.
    pub token: Tensor,
    /// `[N k]`: the expert of each sorted row (non-decreasing).
    pub expert: Tensor,
    /// `[E]` rows per expert, on the device.
    pub counts: Tensor,
}

impl Dispatch {
    /// `expert_idx: [N, k]` integer expert ids in `0..num_experts`.
    pub fn new(expert_idx: &Tensor, num_experts: i64) -> Result<Self> {
        let s = expert_idx.size();
        if s.len() != 2 {
            return Err(Error::shape("Dispatch::new expert_idx", "[tokens, k]", s));
        }
        if !matches!(expert_idx.kind(), Kind::Int64 | Kind::Int) {
            return Err(Error::DType {
                op: "Dispatch::new expert_idx".into(),
                expected: "int64 or int32".into(),
                actual: expert_idx.kind(),
            });
        }
        if num_experts <= 0 {
            return Err(Error::config(format!(
                "Dispatch::new: num_experts must be positive, got {num_experts}"
            )));
        }
        let (n, k) = (s[0], s[1]);
        let flat = expert_idx
            .f_reshape([-1])
            .and_then(|t| t.f_to_kind(Kind::Int64))
            .op("Dispatch::new")?;
        let order = flat.f_argsort_stable(true, 0, false).op("Dispatch sort")?;
        let expert = flat.f_index_select(0, &order).op("Dispatch sort")?;
        let token = order
            .f_floor_divide_scalar(k.max(1))
            .op("Dispatch tokens")?;
        // Out-of-range ids make bincount's length exceed E (or fail on
        // negatives): both are reported without a host sync on the happy path
        // only as far as libtorch checks them; `validate` checks explicitly.
        let counts = flat
            .f_bincount::<Tensor>(None, num_experts)
            .op("Dispatch counts")?;
        if counts.size() != [num_experts] {
            return Err(Error::config(format!(
                "Dispatch::new: an expert id is >= num_experts ({num_experts})"
            )));
        }
        Ok(Self {
            num_tokens: n,
            top_k: k,
            num_experts,
            order,
            token,
            expert,
            counts,
        })
    }

    /// Group sizes on the host (one device-to-host copy of `E` integers).
    pub fn counts_host(&self) -> Result<Vec<i64>> {
        Vec::<i64>::try_from(self.counts.f_to_device(Device::Cpu).op("Dispatch counts")?).map_err(
            |e| Error::Torch {
                op: "Dispatch counts".into(),
                source: e,
            },
        )
    }

    /// `x: [N, d] -> [N k, d]` in expert order.
    pub fn permute(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.size();
        if s.len() != 2 || s[0] != self.num_tokens {
            return Err(Error::shape(
                "Dispatch::permute",
                format!("[{}, d]", self.num_tokens),
                s,
            ));
        }
        x.f_index_select(0, &self.token).op("Dispatch::permute")
    }

    /// `y: [N k, h]` in expert order -> `[N, h]`, each row scaled by its gate
    /// (`gates: [N, k]`; `None` = weight 1) and summed into its token.
    pub fn unpermute(&self, y: &Tensor, gates: Option<&Tensor>) -> Result<Tensor> {
        let s = y.size();
        let rows = self.num_tokens * self.top_k;
        if s.len() != 2 || s[0] != rows {
            return Err(Error::shape(
                "Dispatch::unpermute",
                format!("[{rows}, h]"),
                s,
            ));
        }
        let y = match gates {
            Some(g) => {
                if g.size() != [self.num_tokens, self.top_k] {
                    return Err(Error::shape(
                        "Dispatch::unpermute gates",
                        format!("[{}, {}]", self.num_tokens, self.top_k),
                        g.size(),
                    ));
                }
                let w = g
                    .f_reshape([-1])
                    .and_then(|t| t.f_index_select(0, &self.order))
                    .and_then(|t| t.f_to_kind(y.kind()))
                    .and_then(|t| t.f_unsqueeze(1))
                    .op("Dispatch::unpermute gates")?;
                y.f_mul(&w).op("Dispatch::unpermute")?
            }
            None => y.shallow_clone(),
        };
        Tensor::f_zeros([self.num_tokens, s[1]], (y.kind(), y.device()))
            .and_then(|z| z.f_index_add(0, &self.token, &y))
            .op("Dispatch::unpermute")
    }
}

fn check_weights(
    op: &str,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(i64, i64, i64)> {
    let ws = weight.size();
    if ws.len() != 3 {
        return Err(Error::shape(op, "weight [experts, out, in]", ws));
    }
    let (e, out, inp) = (ws[0], ws[1], ws[2]);
    let xs = x.size();
    if xs.len() != 2 || xs[1] != inp {
        return Err(Error::shape(op, format!("x [rows, {inp}]"), xs));
    }
    if let Some(b) = bias
        && b.size() != [e, out]
    {
        return Err(Error::shape(op, format!("bias [{e}, {out}]"), b.size()));
    }
    Ok((e, out, inp))
}

/// Rows of `x_sorted` grouped by expert (`counts[e]` rows each, in order)
/// through their expert's linear map: `[Σ counts, in] -> [Σ counts, out]`.
/// `weight: [E, out, in]`, `bias: [E, out]`.
pub fn grouped_linear(
    x_sorted: &Tensor,
    counts: &[i64],
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "grouped_linear";
    let (e, out, _) = check_weights(OP, x_sorted, weight, bias)?;
    if counts.len() as i64 != e {
        return Err(Error::config(format!(
            "{OP}: {} group sizes for {e} experts",
            counts.len()
        )));
    }
    let total: i64 = counts.iter().sum();
    if counts.iter().any(|&c| c < 0) || total != x_sorted.size()[0] {
        return Err(Error::shape(
            OP,
            format!("x with {total} rows (sum of group sizes)"),
            x_sorted.size(),
        ));
    }
    let parts = x_sorted.f_split_with_sizes(counts, 0).op(OP)?;
    let mut outs = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if counts[i] == 0 {
            continue;
        }
        let w = weight.f_select(0, i as i64).op(OP)?;
        let b = bias.map(|b| b.f_select(0, i as i64)).transpose().op(OP)?;
        outs.push(part.f_linear(&w, b.as_ref()).op(OP)?);
    }
    if outs.is_empty() {
        return Tensor::f_zeros([0, out], (x_sorted.kind(), x_sorted.device())).op(OP);
    }
    Tensor::f_cat(&outs, 0).op(OP)
}

/// As [`grouped_linear`], without host synchronisation: each expert takes at
/// most `capacity` rows (the first ones, in sorted order); the rest are
/// dropped and give zero rows. Returns the output `[N k, out]` and the
/// boolean `kept: [N k]`.
pub fn grouped_linear_padded(
    x_sorted: &Tensor,
    dispatch: &Dispatch,
    weight: &Tensor,
    bias: Option<&Tensor>,
    capacity: i64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "grouped_linear_padded";
    let (e, out, inp) = check_weights(OP, x_sorted, weight, bias)?;
    if e != dispatch.num_experts {
        return Err(Error::config(format!(
            "{OP}: {e} expert weights for {} experts",
            dispatch.num_experts
        )));
    }
    if capacity <= 0 {
        return Err(Error::config(format!(
            "{OP}: capacity must be positive, got {capacity}"
        )));
    }
    let rows = x_sorted.size()[0];
    let dev = x_sorted.device();
    // Position of each sorted row inside its expert's group.
    let starts = dispatch
        .counts
        .f_cumsum(0, Kind::Int64)
        .and_then(|c| c.f_sub(&dispatch.counts))
        .op(OP)?;
    let pos = Tensor::f_arange(rows, (Kind::Int64, dev))
        .and_then(|a| a.f_sub(&starts.f_index_select(0, &dispatch.expert)?))
        .op(OP)?;
    let kept = pos.f_lt(capacity).op(OP)?;
    // Kept rows go to `e * capacity + pos`; dropped ones to a spare last row.
    let spare = e * capacity;
    let slot = dispatch
        .expert
        .f_mul_scalar(capacity)
        .and_then(|s| s.f_add(&pos))
        .and_then(|s| s.f_where_scalarother(&kept, spare))
        .op(OP)?;
    let buf = Tensor::f_zeros([spare + 1, inp], (x_sorted.kind(), dev))
        .and_then(|b| b.f_index_copy(0, &slot, x_sorted))
        .op(OP)?;
    let mut y = buf
        .f_narrow(0, 0, spare)
        .and_then(|b| b.f_view([e, capacity, inp]))
        .and_then(|b| b.f_bmm(&weight.f_transpose(1, 2)?))
        .op(OP)?;
    if let Some(b) = bias {
        y = y.f_add(&b.f_unsqueeze(1).op(OP)?).op(OP)?;
    }
    let y = y.f_reshape([spare, out]).op(OP)?;
    let zero = Tensor::f_zeros([1, out], (y.kind(), dev)).op(OP)?;
    let y = Tensor::f_cat(&[y, zero], 0)
        .and_then(|y| y.f_index_select(0, &slot))
        .op(OP)?;
    Ok((y, kept))
}

/// As [`grouped_linear`], dropless, through libtorch's grouped GEMM
/// (`torch._grouped_mm`) with the group offsets `cumsum(counts)` left on the
/// device: no host synchronisation on CUDA for bf16 on sm90/sm100 (see the
/// module docs for the fallback). `x_sorted: [N k, in]` in `dispatch`
/// order, `weight: [E, out, in]` (any strides), `bias: [E, out]`.
///
/// The grouped GEMM needs row strides that are multiples of 16 bytes, so
/// `in` and `out` must be multiples of 8 for 16-bit dtypes and of 4 for f32;
/// other widths are an error (use [`grouped_linear`]).
pub fn grouped_linear_device(
    x_sorted: &Tensor,
    dispatch: &Dispatch,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "grouped_linear_device";
    let (e, out, inp) = check_weights(OP, x_sorted, weight, bias)?;
    if e != dispatch.num_experts {
        return Err(Error::config(format!(
            "{OP}: {e} expert weights for {} experts",
            dispatch.num_experts
        )));
    }
    if x_sorted.size()[0] != dispatch.num_tokens * dispatch.top_k {
        return Err(Error::shape(
            OP,
            format!("x [{}, {inp}]", dispatch.num_tokens * dispatch.top_k),
            x_sorted.size(),
        ));
    }
    if weight.kind() != x_sorted.kind() {
        return Err(Error::DType {
            op: OP.into(),
            expected: format!("weight in x's dtype {:?}", x_sorted.kind()),
            actual: weight.kind(),
        });
    }
    let align = 16 / x_sorted.kind().elt_size_in_bytes().max(1) as i64;
    if inp % align != 0 || out % align != 0 {
        return Err(Error::config(format!(
            "{OP}: in ({inp}) and out ({out}) must be multiples of {align} for {:?} \
             (16-byte rows); use grouped_linear",
            x_sorted.kind()
        )));
    }
    let offs = dispatch
        .counts
        .f_cumsum(0, Kind::Int)
        .op("grouped_linear_device offsets")?;
    // `[E, in, out]` as a transposed view of the Linear layout; the GEMM reads either major order.
    let w = weight.f_transpose(1, 2).op(OP)?;
    let x = x_sorted.f_contiguous().op(OP)?;
    let mut y = x
        .f_internal_grouped_mm::<Tensor>(&w, Some(offs), None, None)
        .op(OP)?;
    if let Some(b) = bias {
        y = y
            .f_add(&b.f_index_select(0, &dispatch.expert).op(OP)?)
            .op(OP)?;
    }
    Ok(y)
}
