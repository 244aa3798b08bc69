//! Expert capacity and token dropping, docs/moe-router.md, Method, part 1 step 6 (Switch,
//! arXiv 2101.03961, eq. "expert capacity"; GShard; DeepSpeed-MoE
//! `sharded_moe.py`; fairseq `top2gate.py`; MegaBlocks).
//!
//! **Capacity** `C` (slots per expert, for `T` tokens, `E` experts, top-`k`):
//! - DeepSpeed: `C = max(⌈cf · k · T / E⌉, min_capacity)`, eval `cf` separate;
//! - fairseq top-2: `C = k · ⌈T / E⌉` in training, `⌈0.25 T⌉` at eval;
//! - MegaBlocks: `C = ⌈cf · k · T / E⌉` (world size 1);
//!
//! always clamped to `1 ..= T` (an expert can take each token at most once).
//! `cf = 0` means dropless: no capacity.
//!
//! **Slots.** Each assignment `(t, j)` (token `t`'s `j`-th choice, expert
//! `e = e_tj`) gets a rank: `position` ranks all first choices in token order,
//! then all second choices (`r = j T + t`, GShard/DeepSpeed/Tutel); `priority`
//! ranks by descending routing probability `p_te` (ties by position). Its slot
//! is the number of assignments to `e` with a smaller rank; it is kept iff
//! `slot < C`. Everything is computed on the device (a stable sort of the key
//! `e · 2Tk + r`), with no host synchronisation.
//!
//! **Padding.** With a token mask ([`assign_slots_masked`]), the assignments of
//! padding tokens are ranked after every real one (`r + Tk`) and are never
//! kept: they take no slot from a real token.

use tensor_core::TchResultExt;
use tensor_core::tch::{Kind, Tensor};

use crate::config::{CapacityRule, DropPolicy, RouterConfig};
use crate::error::{Error, Result};

/// `[E]` in `kind`: `c_e = Σ_{i: e_i = e} w_i` over the flattened expert ids
/// (`w_i = 1` without weights). A scatter-add on the device: unlike
/// `bincount`, which reads the largest id on the host to size its output
/// (a host sync on CUDA), it needs no synchronisation. Ids must lie in
/// `0..E` (the routers' top-k, hash and fixed ids always do); on the CPU an
/// id out of range is an error.
pub fn expert_counts(
    op: &str,
    experts: &Tensor,
    weights: Option<&Tensor>,
    num_experts: i64,
    kind: Kind,
) -> Result<Tensor> {
    let idx = experts
        .f_reshape([-1])
        .and_then(|t| t.f_to_kind(Kind::Int64))
        .op(op)?;
    let w = match weights {
        Some(w) => w.f_reshape([-1]).and_then(|w| w.f_to_kind(kind)).op(op)?,
        None => Tensor::f_ones(idx.size(), (kind, idx.device())).op(op)?,
    };
    if w.size() != idx.size() {
        return Err(Error::shape(
            op,
            format!("{:?} weights", idx.size()),
            w.size(),
        ));
    }
    Tensor::f_zeros([num_experts], (kind, idx.device()))
        .and_then(|z| z.f_scatter_add(0, &idx, &w))
        .op(op)
        .map_err(Error::from)
}

/// The capacity `C` for `tokens` tokens, or `None` when dropless.
pub fn capacity(config: &RouterConfig, tokens: i64, train: bool) -> Option<i64> {
    let cf = config.capacity_factor_for(train)?;
    let (e, k, t) = (
        config.num_experts as f64,
        config.top_k as f64,
        tokens as f64,
    );
    let c = match config.capacity_rule {
        CapacityRule::Deepspeed => ((cf * k * t / e).ceil() as i64).max(config.min_capacity),
        CapacityRule::Fairseq if train => config.top_k as i64 * (t / e).ceil() as i64,
        CapacityRule::Fairseq => (0.25 * t).ceil() as i64,
        CapacityRule::Megablocks => (cf * k * t / e).ceil() as i64,
    };
    Some(c.clamp(1, tokens.max(1)))
}

/// Slots of the assignments `experts: [T, k]` (with their probabilities
/// `probs: [T, k]`, read only by `priority`): returns `(kept, slot)`, both
/// `[T, k]`, `kept = slot < capacity`.
pub fn assign_slots(
    experts: &Tensor,
    probs: &Tensor,
    num_experts: i64,
    capacity: i64,
    policy: DropPolicy,
) -> Result<(Tensor, Tensor)> {
    assign_slots_masked(experts, probs, num_experts, capacity, policy, None)
}

/// [`assign_slots`] where only the assignments with `valid: [T, k]` (bool)
/// compete for slots: invalid ones (padding tokens) are ranked last and
/// never kept, so the valid slots of each expert are `0..n_e`.
pub fn assign_slots_masked(
    experts: &Tensor,
    probs: &Tensor,
    num_experts: i64,
    capacity: i64,
    policy: DropPolicy,
    valid: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "assign_slots";
    let s = experts.size();
    if s.len() != 2 || probs.size() != s {
        return Err(Error::shape(OP, "experts and probs [tokens, k]", s));
    }
    if let Some(v) = valid
        && (v.size() != s || v.kind() != Kind::Bool)
    {
        return Err(Error::shape(OP, "valid [tokens, k] (bool)", v.size()));
    }
    if capacity <= 0 {
        return Err(Error::config(format!(
            "capacity must be positive, got {capacity}"
        )));
    }
    let (t, k) = (s[0], s[1]);
    let n = t * k;
    let dev = experts.device();
    let opts = (Kind::Int64, dev);
    // rank[t, j] of each assignment in fill order.
    let rank = match policy {
        DropPolicy::Position => Tensor::f_arange(k, opts)
            .and_then(|j| j.f_mul_scalar(t))
            .and_then(|j| j.f_unsqueeze(0))
            .and_then(|j| j.f_add(&Tensor::f_arange(t, opts)?.f_unsqueeze(1)?))
            .op(OP)?,
        DropPolicy::Priority => {
            // Probabilities in position order (j-major), stable descending sort:
            // ties keep position order.
            let by_pos = probs.f_detach()?.f_tr()?.f_reshape([-1]).op(OP)?;
            let idx = by_pos.f_argsort_stable(true, 0, true).op(OP)?;
            let rank_of_pos = Tensor::f_zeros([n], opts)
                .and_then(|z| z.f_scatter(0, &idx, &Tensor::f_arange(n, opts)?))
                .op(OP)?;
            rank_of_pos.f_view([k, t])?.f_tr()?
        }
    };
    let mut rank = rank.f_reshape([-1])?;
    if let Some(v) = valid {
        // Padding after every real assignment of the same expert.
        rank = rank.f_add(
            &v.f_reshape([-1])?
                .f_logical_not()?
                .f_to_kind(Kind::Int64)?
                .f_mul_scalar(n)?,
        )?;
    }
    let flat_e = experts.f_reshape([-1])?.f_to_kind(Kind::Int64)?;
    let key = flat_e.f_mul_scalar(2 * n)?.f_add(&rank).op(OP)?;
    let order = key.f_argsort_stable(true, 0, false).op(OP)?;
    let sorted_e = flat_e.f_index_select(0, &order)?;
    let counts = expert_counts(OP, &flat_e, None, num_experts, Kind::Int64)?;
    let starts = counts.f_cumsum(0, Kind::Int64)?.f_sub(&counts)?;
    let slot_sorted = Tensor::f_arange(n, opts)?.f_sub(&starts.f_index_select(0, &sorted_e)?)?;
    let slot = Tensor::f_zeros([n], opts)?
        .f_scatter(0, &order, &slot_sorted)?
        .f_view([t, k])?;
    let mut kept = slot.f_lt(capacity)?;
    if let Some(v) = valid {
        kept = kept.f_logical_and(v)?;
    }
    Ok((kept, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_clamped_to_the_token_count() {
        let c = RouterConfig::new(4, 2);
        // max(⌈2·3/4⌉, 8) = 8, clamped to T = 3.
        assert_eq!(capacity(&c, 3, true), Some(3));
        assert_eq!(capacity(&c.dropless(), 3, true), None);
    }

    #[test]
    fn slots_count_up_per_expert_in_position_order() {
        // Tokens 0..3, top-2: first choices (0, 1, 0), second (1, 0, 1).
        let e = Tensor::from_slice(&[0i64, 1, 1, 0, 0, 1])
            .view([3, 2])
            .to_device(tensor_core::testing::device());
        let (kept, slot) =
            assign_slots(&e, &e.to_kind(Kind::Float), 2, 2, DropPolicy::Position).unwrap();
        // Expert 0: (t0,j0)=0, (t2,j0)=1, (t1,j1)=2. Expert 1: (t1,j0)=0, (t0,j1)=1, (t2,j1)=2.
        assert_eq!(
            Vec::<i64>::try_from(slot.view([-1])).unwrap(),
            [0, 1, 0, 2, 1, 2]
        );
        let k = Vec::<bool>::try_from(kept.view([-1])).unwrap();
        assert_eq!(k, [true, true, true, false, true, false]);
    }
}
