//! The causal language-model loss shared by the decoders (`gpt.rs`,
//! `llama.rs`): the shifted next-token cross-entropy
//!
//! ```text
//! L = −1/N Σ_{(b,t) ∈ V} log p(x_{b,t+1} | x_{b,≤t}),   V = {(b,t): m_bt = m_b,t+1 = 1}
//! ```
//!
//! over the positions where both the token and the next one are real
//! (`attention_mask`, 1 = token; all positions without a mask). A batch
//! with nothing to predict gives 0. No host synchronisation.

use tensor_core::tch::{Kind, Reduction, Tensor};
use tensor_core::{Error as TensorError, TchResultExt};

use crate::Result;

/// The mean loss of `logits [B, T, V]` for `input_ids [B, T]` and the number
/// `N` of positions it averages (a scalar tensor, for weighting batches).
pub fn next_token_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let op = "next-token loss";
    let s = input_ids.size();
    let ls = logits.size();
    if s.len() != 2 || s[1] < 2 || ls.len() != 3 || ls[..2] != s[..] {
        return Err(TensorError::shape(
            op,
            "input_ids [batch, seq >= 2] and logits [batch, seq, vocab]",
            s,
        )
        .into());
    }
    let (b, t, v) = (s[0], s[1], ls[2]);
    let pred = logits
        .f_narrow(1, 0, t - 1)
        .and_then(|p| p.f_reshape([b * (t - 1), v]))
        .op(op)?;
    let mut targets = input_ids
        .f_narrow(1, 1, t - 1)
        .and_then(|x| x.f_to_kind(Kind::Int64))
        .op(op)?;
    let count = if let Some(m) = attention_mask {
        let m = m.f_to_device(input_ids.device()).op(op)?.f_ne(0).op(op)?;
        let valid = m
            .f_narrow(1, 0, t - 1)
            .and_then(|a| a.f_logical_and(&m.f_narrow(1, 1, t - 1)?))
            .op(op)?;
        targets = targets
            .f_masked_fill(&valid.f_logical_not().op(op)?, -100)
            .op(op)?;
        valid.f_sum(Kind::Float).op(op)?
    } else {
        Tensor::f_scalar_tensor((b * (t - 1)) as f64, (Kind::Float, logits.device())).op(op)?
    };
    let total = pred
        .f_cross_entropy_loss::<Tensor>(
            &targets.f_reshape([b * (t - 1)]).op(op)?,
            None,
            Reduction::Sum,
            -100,
            0.0,
        )
        .op(op)?;
    let mean = total
        .f_div(
            &count
                .f_clamp_min(1.0)
                .op(op)?
                .f_to_kind(total.kind())
                .op(op)?,
        )
        .op(op)?;
    Ok((mean, count))
}
