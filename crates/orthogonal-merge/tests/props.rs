//! Properties of the merge algebra (proptest): linearity of task arithmetic
//! in the weights and λ, positive-scale equivariance of TIES and pruning,
//! disjoint supports (TIES at ρ = 1 is the plain sum, and merging a merged
//! result with itself returns it), cat = linear, and exact recovery of each
//! concept from an orthogonal sum.

mod common;

use orthogonal_merge::basis::BasisSpec;
use orthogonal_merge::ties::ties;
use orthogonal_merge::{
    BasisKind, Delta, FrozenSide, LoraFactors, MergeConfig, Method, SignMethod, TaskDelta, merge,
};
use proptest::prelude::*;
use tensor_core::tch::{Kind, Tensor};
use tensor_core::testing::device;

fn tasks_strategy() -> impl Strategy<Value = (usize, i64, i64, Vec<f32>)> {
    (1usize..4, 1i64..5, 1i64..6).prop_flat_map(|(t, r, c)| {
        (
            Just(t),
            Just(r),
            Just(c),
            prop::collection::vec(-10f32..10.0, t * (r * c) as usize),
        )
    })
}

fn split(t: usize, r: i64, c: i64, v: &[f32]) -> Vec<Tensor> {
    let n = (r * c) as usize;
    (0..t)
        .map(|i| {
            Tensor::from_slice(&v[i * n..(i + 1) * n])
                .reshape([r, c])
                .to_device(device())
        })
        .collect()
}

fn full_tasks(ts: &[Tensor]) -> Vec<TaskDelta> {
    ts.iter()
        .enumerate()
        .map(|(i, t)| TaskDelta::new(&format!("t{i}")).with("l", Delta::full(t).unwrap()))
        .collect()
}

fn merged(tasks: &[TaskDelta], cfg: &MergeConfig) -> Tensor {
    merge(tasks, cfg).unwrap().layers["l"].weight().unwrap()
}

/// `tol` relative to the scale of `b`; exact relations (positive scaling by
/// 2, disjoint supports) keep their bound, comparisons of computations done
/// differently pass it through `common::scaled`.
fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
    let scale = 1.0 + b.abs().max().double_value(&[]);
    (a - b).abs().max().double_value(&[]) <= tol * scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn task_arithmetic_is_linear((t, r, c, v) in tasks_strategy(), a in -3.0f64..3.0, b in -3.0f64..3.0, lam in -2.0f64..2.0) {
        let tasks = full_tasks(&split(t, r, c, &v));
        let w1: Vec<f64> = (0..t).map(|i| 0.5 + i as f64).collect();
        let w2: Vec<f64> = (0..t).map(|i| 1.0 - 0.7 * i as f64).collect();
        let mix: Vec<f64> = w1.iter().zip(&w2).map(|(x, y)| a * x + b * y).collect();
        let lin = |w: &[f64], l: f64| merged(&tasks, &MergeConfig::new(Method::Linear).with_weights(w).with_lambda(l));
        let lhs = lin(&mix, lam);
        let rhs = lin(&w1, 1.0) * (a * lam) + lin(&w2, 1.0) * (b * lam);
        prop_assert!(close(&lhs, &rhs, common::scaled(1e-5)));
    }

    #[test]
    fn ties_and_pruning_commute_with_positive_scaling((t, r, c, v) in tasks_strategy(), d in 0.0f64..1.0) {
        let ts = split(t, r, c, &v);
        let tasks = full_tasks(&ts);
        let doubled = full_tasks(&ts.iter().map(|x| x * 2.0).collect::<Vec<_>>());
        for method in [Method::Ties, Method::MagnitudePrune] {
            let cfg = MergeConfig::new(method).with_density(d);
            prop_assert!(close(&(merged(&tasks, &cfg) * 2.0), &merged(&doubled, &cfg), 1e-6));
        }
    }

    #[test]
    fn disjoint_supports_merge_to_their_sum_and_are_idempotent(
        (t, r, c, v) in tasks_strategy(),
        owner in prop::collection::vec(0usize..4, 30),
        freq in any::<bool>(),
    ) {
        let n = (r * c) as usize;
        // Entry k belongs to task owner[k] % t only.
        let ts: Vec<Tensor> = (0..t)
            .map(|i| {
                let vals: Vec<f32> = (0..n).map(|k| if owner[k] % t == i { v[i * n + k] } else { 0.0 }).collect();
                Tensor::from_slice(&vals).reshape([r, c]).to_device(device())
            })
            .collect();
        let tasks = full_tasks(&ts);
        let sum = merged(&tasks, &MergeConfig::new(Method::Sum));
        let sign = if freq { SignMethod::Frequency } else { SignMethod::Total };
        let t1 = merged(&tasks, &MergeConfig::new(Method::Ties).with_density(1.0).with_sign(sign));
        prop_assert!(close(&t1, &sum, 1e-6));
        let dt = merged(&tasks, &MergeConfig::new(Method::DareTies).with_density(1.0).with_sign(sign));
        prop_assert!(close(&dt, &sum, 1e-6));
        // Merging the merged result with itself gives it back.
        let again = ties(&[sum.shallow_clone(), sum.shallow_clone()], &[1.0, 1.0], 1.0, sign).unwrap();
        prop_assert!(close(&again, &sum, 1e-6));
    }

    #[test]
    fn cat_equals_linear_on_lora((t, r, c, _v) in tasks_strategy(), rank in 1i64..3, s in 0.1f64..3.0, seed in 0u64..1000) {
        let tasks: Vec<TaskDelta> = (0..t)
            .map(|i| {
                let a = common::randn(&[rank + i as i64, c], seed + 2 * i as u64);
                let b = common::randn(&[r, rank + i as i64], seed + 2 * i as u64 + 1);
                TaskDelta::new(&format!("t{i}")).with("l", Delta::Lora(LoraFactors::new(a, b, s).unwrap()))
            })
            .collect();
        let w: Vec<f64> = (0..t).map(|i| 1.5 - i as f64).collect();
        let cat = merged(&tasks, &MergeConfig::new(Method::Cat).with_weights(&w));
        let lin = merged(&tasks, &MergeConfig::new(Method::Linear).with_weights(&w));
        prop_assert!(close(&cat, &lin, common::scaled(1e-5)));
    }

    #[test]
    fn each_concept_is_recovered_from_an_orthogonal_sum(seed in 0u64..1000, k in 1i64..4) {
        // Input side frozen: (Σ_j ΔW_j) B_i B_iᵀ = ΔW_i.
        let (out, n, r) = (5, 12, 3);
        let spec = BasisSpec { kind: BasisKind::QrBins, seed, rank: r, frozen_side: FrozenSide::Input };
        let mut tasks = Vec::new();
        let mut bases = Vec::new();
        for i in 0..k {
            let bi = spec.block("l", n, i, Kind::Float, device()).unwrap();
            let trained = common::randn(&[out, r], seed * 10 + i as u64);
            let f = LoraFactors::new(bi.transpose(0, 1), trained, 0.5).unwrap();
            tasks.push(TaskDelta::new(&format!("c{i}")).with("l", Delta::Lora(f)));
            bases.push(bi);
        }
        let sum = merged(&tasks, &MergeConfig::new(Method::Sum));
        for (t, bi) in tasks.iter().zip(&bases) {
            let got = sum.mm(bi).mm(&bi.transpose(0, 1));
            prop_assert!(close(&got, &t.layers["l"].weight().unwrap(), common::scaled(1e-5)));
        }
    }
}
