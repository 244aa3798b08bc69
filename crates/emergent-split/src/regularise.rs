//! EMoE's Tutel-path regularisers (docs/emergent-split.md, Method, part 1 step 7):
//! the reference implementation trains its BERT, GPT-2 and ViT experts through Tutel's MoE
//! layer, which adds three things to the plain avg-k computation:
//!
//! - **dropout inside the experts**, `p = 0.1`, on each expert's hidden
//!   activation `act(W1_e x + b1_e)` before `W2_e` (training only);
//! - a **CV² balancing loss**, weight `0.01`:
//!   `(CV²(Imp) + CV²(Load)) / 2` with `Imp_e = Σ_t p_te` (softmax of the
//!   gate scores) and `Load_e` the number of kept assignments to `e`, where
//!   `CV²(v) = Var(v) / (mean(v)² + 1e-10)` (unbiased variance). The gate is
//!   frozen, so its gradient reaches the layers below through `x`;
//! - a **capacity** of `C = k · ⌊f · ⌈T / N⌉⌋` assignments per expert, `f = 1.5`
//!   (Tutel's rounding),
//!   with batch-prioritised routing: tokens are ordered by their top-1 gate
//!   probability, then assignments are placed slot by slot (every token's
//!   first choice before any second choice), and an assignment beyond an
//!   expert's `C`-th is dropped (it contributes nothing, `b2_e` included).
//!   The capacity holds in training and in evaluation, as in the reference.
//!
//! [`Regularisers::tutel`] is the reference setting and the default of
//! [`crate::convert::EmoeConfig::new`]; [`Regularisers::none`] is plain avg-k
//! (the Llama path, and what the exactness tests use).

use serde::{Deserialize, Serialize};
use tensor_core::tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The Tutel-path extras of one converted FFN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Regularisers {
    /// Dropout probability on the experts' hidden activation in training.
    #[serde(default)]
    pub expert_dropout: f64,
    /// Weight of the CV² loss added to the forward context in training (0: none).
    #[serde(default)]
    pub cv2_weight: f64,
    /// `f` in `C = k · ⌊f · ⌈T / N⌉⌋` (`None`: no capacity limit).
    #[serde(default)]
    pub capacity_factor: Option<f64>,
}

impl Default for Regularisers {
    fn default() -> Self {
        Self::tutel()
    }
}

impl Regularisers {
    /// The reference implementation's Tutel path: dropout 0.1 inside the
    /// experts, CV² weight 0.01, capacity factor 1.5 with priority routing.
    pub fn tutel() -> Self {
        Self {
            expert_dropout: 0.1,
            cv2_weight: 0.01,
            capacity_factor: Some(1.5),
        }
    }

    /// None of them (plain avg-k; the Llama path).
    pub fn none() -> Self {
        Self {
            expert_dropout: 0.0,
            cv2_weight: 0.0,
            capacity_factor: None,
        }
    }

    /// Every field in range, naming the one that is not.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.expert_dropout) {
            return Err(Error::config(format!(
                "regularisers.expert_dropout = {} (need 0 <= p < 1)",
                self.expert_dropout
            )));
        }
        if !(self.cv2_weight.is_finite() && self.cv2_weight >= 0.0) {
            return Err(Error::config(format!(
                "regularisers.cv2_weight = {} (need a finite value >= 0)",
                self.cv2_weight
            )));
        }
        if let Some(f) = self.capacity_factor
            && !(f.is_finite() && f > 0.0)
        {
            return Err(Error::config(format!(
                "regularisers.capacity_factor = {f} (need a finite value > 0)"
            )));
        }
        Ok(())
    }
}

/// `C = k · ⌊f · ⌈T / N⌉⌋` (Tutel's rounding), at least 1.
pub fn capacity(tokens: i64, top_k: usize, num_experts: usize, factor: f64) -> i64 {
    let per_expert = (tokens + num_experts as i64 - 1) / num_experts as i64;
    (top_k as i64 * (factor * per_expert as f64).floor() as i64).max(1)
}

/// `Var(v) / (mean(v)² + 1e-10)` of a 1-D float tensor (unbiased variance).
pub fn cv_squared(v: &Tensor) -> Result<Tensor> {
    let v = v.f_to_kind(Kind::Float)?;
    if v.size()[0] < 2 {
        return Ok(Tensor::f_zeros([], (Kind::Float, v.device()))?);
    }
    let var = v.f_var(true)?;
    let mean = v.f_mean(Kind::Float)?;
    Ok(var.f_div(&mean.f_square()?.f_add_scalar(1e-10)?)?)
}

/// The CV² loss `(CV²(Imp) + CV²(Load)) / 2` from the gate probabilities
/// `probs: [T, N]` and the kept assignments `experts: [T, k]`, `keep: [T, k]`
/// (0/1 float).
pub fn cv2_loss(probs: &Tensor, experts: &Tensor, keep: &Tensor) -> Result<Tensor> {
    let n = probs.size()[1];
    let importance = probs.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Float)?;
    let load = Tensor::f_zeros([n], (Kind::Float, probs.device()))?.f_scatter_add(
        0,
        &experts.f_reshape([-1])?,
        &keep.f_reshape([-1])?.f_to_kind(Kind::Float)?,
    )?;
    Ok(cv_squared(&importance)?
        .f_add(&cv_squared(&load)?)?
        .f_mul_scalar(0.5)?)
}

/// Which assignments survive a capacity of `cap` per expert under
/// batch-prioritised routing: `experts: [T, k]` (column `j` = each token's
/// `j`-th choice), `priority: [T]` (higher goes first). Returns `[T, k]`
/// 0/1 float. All on the device, no host sync.
pub fn priority_keep(
    experts: &Tensor,
    priority: &Tensor,
    num_experts: i64,
    cap: i64,
) -> Result<Tensor> {
    let (t, k) = (experts.size()[0], experts.size()[1]);
    let order = priority.f_argsort(0, true)?;
    let inverse = order.f_argsort(0, false)?;
    // Slot-major over the prioritised tokens: [k, T] flattened.
    let sorted = experts.f_index_select(0, &order)?;
    let flat = sorted.f_transpose(0, 1)?.f_contiguous()?.f_reshape([-1])?;
    let one_hot = flat.f_one_hot(num_experts)?;
    // Position of each assignment in its expert's queue (0-based).
    let position = one_hot
        .f_cumsum(0, Kind::Int64)?
        .f_gather(1, &flat.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?
        .f_sub_scalar(1)?;
    let kept = position
        .f_lt(cap)?
        .f_to_kind(Kind::Float)?
        .f_reshape([k, t])?;
    Ok(kept.f_transpose(0, 1)?.f_index_select(0, &inverse)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_core::tch::Device;

    fn ids(rows: &[[i64; 2]]) -> Tensor {
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 2])
    }

    #[test]
    fn capacity_rounds_up() {
        // ⌈10 / 4⌉ = 3, ⌊1.5 · 3⌋ = 4, times k = 2.
        assert_eq!(capacity(10, 2, 4, 1.5), 8);
        assert_eq!(capacity(1280, 4, 16, 1.5), 480);
        assert_eq!(capacity(1, 1, 64, 1.0), 1);
        assert_eq!(capacity(3, 1, 4, 0.5), 1);
    }

    #[test]
    fn priority_keeps_first_choices_of_the_most_confident_tokens() {
        // Four tokens, all choosing expert 0 first and expert 1 second; capacity 2.
        let e = ids(&[[0, 1], [0, 1], [0, 1], [0, 1]]);
        let p = Tensor::from_slice(&[0.1f32, 0.9, 0.5, 0.3]);
        let keep = priority_keep(&e, &p, 3, 2).unwrap();
        let got: Vec<f32> = Vec::try_from(keep.view([-1])).unwrap();
        // Expert 0 keeps tokens 1 and 2 (most confident); expert 1 likewise.
        assert_eq!(got, vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn first_choices_go_before_second_choices() {
        // Token 0 (high priority) picks 1 as its second choice; token 1 picks 1 first.
        let e = ids(&[[0, 1], [1, 2]]);
        let p = Tensor::from_slice(&[0.9f32, 0.1]);
        let keep = priority_keep(&e, &p, 3, 1).unwrap();
        let got: Vec<f32> = Vec::try_from(keep.view([-1])).unwrap();
        assert_eq!(got, vec![1.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn no_expert_exceeds_its_capacity() {
        let e = Tensor::randint(5, [40, 3], (Kind::Int64, Device::Cpu));
        let p = Tensor::rand([40], (Kind::Float, Device::Cpu));
        let keep = priority_keep(&e, &p, 5, 9).unwrap();
        let load = Tensor::zeros([5], (Kind::Float, Device::Cpu)).scatter_add(
            0,
            &e.view([-1]),
            &keep.view([-1]),
        );
        assert!(load.max().double_value(&[]) <= 9.0);
    }

    #[test]
    fn cv2_is_zero_under_balance_and_positive_otherwise() {
        let probs = Tensor::full([4, 2], 0.5, (Kind::Float, Device::Cpu));
        let e = ids(&[[0, 1], [1, 0], [0, 1], [1, 0]]);
        let keep = Tensor::ones([4, 2], (Kind::Float, Device::Cpu));
        assert_eq!(cv2_loss(&probs, &e, &keep).unwrap().double_value(&[]), 0.0);
        let e = ids(&[[0, 0], [0, 0], [0, 0], [0, 0]]);
        assert!(cv2_loss(&probs, &e, &keep).unwrap().double_value(&[]) > 0.5);
    }

    #[test]
    fn bad_settings_name_their_field() {
        let mut r = Regularisers::tutel();
        r.expert_dropout = 1.0;
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("expert_dropout")
        );
        let mut r = Regularisers::none();
        r.capacity_factor = Some(f64::NAN);
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("capacity_factor")
        );
    }
}
