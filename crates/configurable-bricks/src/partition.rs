//! Partition of an FFN's neurons into bricks by co-activation
//! (docs/configurable-bricks.md, Method step 6; MoEfication's co-activation
//! graph split, Zhang et al. 2022).
//!
//! Each neuron is described by its activation over examples (a column of
//! the profile `P`, or over tokens), centred and L2-normalised, so that
//! `‖z_i − z_j‖² = 2 − 2·corr(i, j)`: neurons that fire together are close.
//! Balanced k-means splits the `d_ff` neurons into `K` bricks of exactly
//! `d_ff / K` neurons (usable as equal-size experts):
//!
//! 1. k-means++ seeding (seeded [`SplitMix64`]);
//! 2. assignment under capacity `d_ff / K`: all (neuron, brick) pairs in
//!    increasing distance, each taken if the neuron is free and the brick
//!    not full (greedy balanced assignment);
//! 3. centroids = means of their members; repeat until no label changes.

use serde::{Deserialize, Serialize};
use tensor_core::rng::SplitMix64;
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, check_finite};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionConfig {
    pub bricks: usize,
    pub max_iter: usize,
    pub seed: u64,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            bricks: 16,
            max_iter: 30,
            seed: 0,
        }
    }
}

/// A balanced partition of one FFN's neurons.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// `brick_of[n]` in `0..bricks`.
    pub brick_of: Vec<usize>,
    pub bricks: usize,
    /// Mean squared distance of neurons to their brick's centroid.
    pub objective: f64,
    pub iterations: usize,
}

impl Partition {
    /// `[d_ff]` int64, for [`crate::mask::HiddenMask::Routed`] and [`crate::route::brick_activation`].
    pub fn brick_tensor(&self) -> Tensor {
        let v: Vec<i64> = self.brick_of.iter().map(|&b| b as i64).collect();
        Tensor::from_slice(&v)
    }
}

/// Rows of `x` centred and scaled to unit norm (constant rows become zero).
fn standardise(x: &Tensor) -> Result<Tensor> {
    let c = x.f_sub(&x.f_mean_dim([1i64].as_slice(), true, Kind::Double)?)?;
    let n = c.f_norm_scalaropt_dim(2, [1], true)?.f_clamp_min(1e-12)?;
    Ok(c.f_div(&n)?)
}

/// Mean correlation of neuron pairs inside the same brick, from `activity [examples, d_ff]`.
pub fn within_brick_correlation(activity: &Tensor, partition: &Partition) -> Result<f64> {
    let z = standardise(
        &activity
            .f_transpose(0, 1)?
            .f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?,
    )?;
    let corr = z.f_matmul(&z.f_transpose(0, 1)?)?;
    let b = partition.brick_tensor();
    let same = b
        .f_unsqueeze(1)?
        .f_eq_tensor(&b.f_unsqueeze(0)?)?
        .f_to_kind(Kind::Double)?;
    let d = partition.brick_of.len() as i64;
    let off = same.f_sub(&Tensor::f_eye(d, (Kind::Double, Device::Cpu))?)?;
    let pairs = off.f_sum(Kind::Double)?.f_double_value(&[])?;
    if pairs == 0.0 {
        return Ok(0.0);
    }
    Ok(corr.f_mul(&off)?.f_sum(Kind::Double)?.f_double_value(&[])? / pairs)
}

/// Balanced co-activation partition of the neurons (columns) of
/// `activity [examples, d_ff]`.
pub fn coactivation_partition(activity: &Tensor, config: &PartitionConfig) -> Result<Partition> {
    let s = activity.size();
    if s.len() != 2 || s[0] < 2 {
        return Err(Error::mismatch(
            "coactivation_partition activity",
            "[examples >= 2, d_ff]",
            format!("{s:?}"),
        ));
    }
    let (d, k) = (s[1] as usize, config.bricks);
    if k == 0 || d % k != 0 {
        return Err(Error::config(format!(
            "{k} bricks must divide d_ff = {d} (balanced bricks of equal size)"
        )));
    }
    check_finite("coactivation_partition activity", activity)?;
    let z = standardise(
        &activity
            .f_transpose(0, 1)?
            .f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?,
    )?;
    let cap = d / k;
    let sq = |c: &Tensor| -> Result<Vec<f64>> {
        // ‖z_i − c_j‖² = ‖z_i‖² + ‖c_j‖² − 2 z_i·c_j, [d, k]
        let zz = z.f_square()?.f_sum_dim_intlist(1, true, Kind::Double)?;
        let cc = c.f_square()?.f_sum_dim_intlist(1, false, Kind::Double)?;
        let dist = zz
            .f_add(&cc.f_unsqueeze(0)?)?
            .f_sub(&z.f_matmul(&c.f_transpose(0, 1)?)?.f_mul_scalar(2.0)?)?
            .f_clamp_min(0.0)?
            .f_contiguous()?;
        let mut v = vec![0f64; d * c.size()[0] as usize];
        dist.f_copy_data(&mut v, d * c.size()[0] as usize)?;
        Ok(v)
    };
    // k-means++ seeding.
    let mut rng = SplitMix64::new(config.seed);
    let mut centres = vec![rng.below(d as u64) as i64];
    while centres.len() < k {
        let c = z.f_index_select(0, &Tensor::from_slice(&centres))?;
        let dist = sq(&c)?;
        let nearest: Vec<f64> = (0..d)
            .map(|i| {
                (0..centres.len())
                    .map(|j| dist[i * centres.len() + j])
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let total: f64 = nearest.iter().sum();
        let pick = if total <= 0.0 {
            (0..d as i64).find(|i| !centres.contains(i)).unwrap_or(0)
        } else {
            let mut r = rng.next_f64() * total;
            let mut chosen = d - 1;
            for (i, w) in nearest.iter().enumerate() {
                if r < *w {
                    chosen = i;
                    break;
                }
                r -= w;
            }
            chosen as i64
        };
        centres.push(pick);
    }
    let mut centroids = z.f_index_select(0, &Tensor::from_slice(&centres))?;
    let mut labels = vec![usize::MAX; d];
    let mut objective = 0.0;
    let mut iterations = 0;
    for it in 0..config.max_iter.max(1) {
        iterations = it + 1;
        let dist = sq(&centroids)?;
        let mut pairs: Vec<(usize, usize)> =
            (0..d).flat_map(|i| (0..k).map(move |j| (i, j))).collect();
        pairs.sort_by(|a, b| {
            dist[a.0 * k + a.1]
                .total_cmp(&dist[b.0 * k + b.1])
                .then(a.cmp(b))
        });
        let mut new = vec![usize::MAX; d];
        let mut fill = vec![0usize; k];
        let mut placed = 0;
        objective = 0.0;
        for (i, j) in pairs {
            if new[i] == usize::MAX && fill[j] < cap {
                new[i] = j;
                fill[j] += 1;
                objective += dist[i * k + j];
                placed += 1;
                if placed == d {
                    break;
                }
            }
        }
        objective /= d as f64;
        let changed = new != labels;
        labels = new;
        let lab = Tensor::from_slice(&labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
        let onehot = Tensor::f_zeros([k as i64, d as i64], (Kind::Double, Device::Cpu))?
            .f_scatter_value(0, &lab.f_unsqueeze(0)?, 1.0)?;
        centroids = onehot.f_matmul(&z)?.f_div_scalar(cap as f64)?;
        if !changed {
            break;
        }
    }
    Ok(Partition {
        brick_of: labels,
        bricks: k,
        objective,
        iterations,
    })
}
