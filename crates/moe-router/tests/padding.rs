//! Padding tokens (a token mask, `ctx.attention_mask` in the layers) change
//! no auxiliary loss and no load statistic, are never dispatched and take no
//! capacity slot (f64, exact up to 1e-12; 100x that where CUDA's atomic
//! scatter / index adds sum in no fixed order).

mod common;

use common::{atomics_tol, dev, randn64, seeded_f64, to_vec, to_vec_i64};
use moe_router::capacity::{assign_slots, assign_slots_masked};
use moe_router::config::*;
use moe_router::losses::*;
use moe_router::moa::{MixtureOfAttention, MoaConfig};
use moe_router::moe::{MoeConfig, MoeLayer};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, with_seed};
use tensor_core::{Context, Module};

const D: i64 = 6;

/// `[T]` mask with padding at `pad` positions, on the test device.
fn mask(t: i64, pad: &[i64]) -> Tensor {
    let v: Vec<bool> = (0..t).map(|i| !pad.contains(&i)).collect();
    Tensor::from_slice(&v).to_device(dev())
}

fn real_rows(x: &Tensor, m: &Tensor) -> Tensor {
    let idx = m.nonzero().view([-1]);
    x.index_select(0, &idx)
}

#[test]
fn masked_losses_equal_the_losses_of_the_real_tokens() {
    let t = 9;
    let pad = [1, 4, 8];
    let m = mask(t, &pad);
    let logits = randn64(&[t, 5], 1) * 2.0;
    let probs = logits.softmax(-1, Kind::Double);
    let lp = logits.log_softmax(-1, Kind::Double);
    let (_, experts) = probs.topk(2, -1, true, true);
    let (rl, rp, rlp, re) = (
        real_rows(&logits, &m),
        real_rows(&probs, &m),
        real_rows(&lp, &m),
        real_rows(&experts, &m),
    );
    for v in [
        BalanceVariant::SwitchTop1,
        BalanceVariant::DeepspeedTopk,
        BalanceVariant::Megablocks,
    ] {
        let a = balance_loss_masked(&probs, &experts, v, 2, Some(&m)).unwrap();
        let b = balance_loss(&rp, &re, v, 2).unwrap();
        assert_close(&a, &b, atomics_tol(1e-12), 0.0);
    }
    assert_close(
        &z_loss_masked(&logits, Some(&m)).unwrap(),
        &z_loss(&rl).unwrap(),
        1e-12,
        0.0,
    );
    assert_close(
        &mutual_information_loss_masked(&probs, Some(&lp), Some(&m)).unwrap(),
        &mutual_information_loss(&rp, Some(&rlp)).unwrap(),
        1e-12,
        0.0,
    );
    assert_close(
        &load_concentration_masked(&probs, Some(&m)).unwrap(),
        &load_concentration(&rp).unwrap(),
        1e-12,
        0.0,
    );
    let noisy = &logits + randn64(&[t, 5], 2) * 0.3;
    let sl = smooth_load_masked(&logits, &noisy, 0.3, 2, Some(&m)).unwrap();
    assert_close(
        &sl,
        &smooth_load(&rl, &real_rows(&noisy, &m), 0.3, 2).unwrap(),
        1e-12,
        0.0,
    );
    assert_close(
        &importance_load_cv2_masked(&probs, &sl, CvVariance::Unbiased, Some(&m)).unwrap(),
        &importance_load_cv2(&rp, &sl, CvVariance::Unbiased).unwrap(),
        1e-12,
        0.0,
    );
    // An all-ones mask is no mask; an integer mask works like a bool one.
    let ones = Tensor::ones([t], (Kind::Int64, dev()));
    assert_close(
        &z_loss_masked(&logits, Some(&ones)).unwrap(),
        &z_loss(&logits).unwrap(),
        1e-12,
        0.0,
    );
    // Accumulated MI: a masked call then an unmasked one = both real sets at once.
    let mut acc = MiAccumulator::default();
    acc.add_masked(&probs, Some(&lp), Some(&m)).unwrap();
    acc.add(&rp, Some(&rlp)).unwrap();
    let both = Tensor::cat(&[&rp, &rp], 0);
    assert_close(
        &acc.loss().unwrap(),
        &mutual_information_loss(&both, None).unwrap(),
        1e-12,
        0.0,
    );
    // A mask of the wrong length is an error.
    assert!(z_loss_masked(&logits, Some(&mask(t + 1, &[]))).is_err());
}

#[test]
fn padding_takes_no_capacity_slot() {
    let t = 12;
    let pad = [0, 3, 7];
    let m = mask(t, &pad);
    let logits = randn64(&[t, 4], 3);
    let probs = logits.softmax(-1, Kind::Double);
    let (top, experts) = probs.topk(2, -1, true, true);
    for policy in [DropPolicy::Position, DropPolicy::Priority] {
        let valid = m.unsqueeze(1).expand([t, 2], false);
        let (kept, slot) = assign_slots_masked(&experts, &top, 4, 3, policy, Some(&valid)).unwrap();
        let (rk, rs) =
            assign_slots(&real_rows(&experts, &m), &real_rows(&top, &m), 4, 3, policy).unwrap();
        // Real assignments get the slots they get without the padding rows.
        assert_eq!(to_vec_i64(&real_rows(&slot, &m)), to_vec_i64(&rs));
        assert_eq!(
            to_vec_i64(&real_rows(&kept, &m).to_kind(Kind::Int64)),
            to_vec_i64(&rk.to_kind(Kind::Int64))
        );
        // No padding assignment is kept.
        let pk = kept.index_select(0, &Tensor::from_slice(&pad).to_device(dev()));
        assert_eq!(pk.sum(Kind::Int64).int64_value(&[]), 0);
    }
}

/// Auxiliary losses and statistics by name.
type Recorded = (Vec<(String, f64)>, Vec<(String, Vec<f64>)>);

/// A layer's aux losses and stats, by name, after `f`.
fn losses_and_stats(f: impl FnOnce(&mut Context)) -> Recorded {
    let mut ctx = Context::train();
    f(&mut ctx);
    let l = ctx
        .aux_losses()
        .iter()
        .map(|(n, v)| (n.clone(), v.double_value(&[])))
        .collect();
    let s = ctx
        .stats()
        .iter()
        .map(|(n, v)| (n.clone(), to_vec(v)))
        .collect();
    (l, s)
}

fn all_losses(mut rc: RouterConfig) -> RouterConfig {
    rc.cv_weight = 0.5;
    rc.mi_weight = 0.3;
    rc.concentration_weight = 0.2;
    rc
}

/// Losses within 1e-12 and statistics within 1e-9 (the balance loss and
/// the loads count by scatter-add: [`atomics_tol`]).
fn assert_same(a: &Recorded, b: &Recorded) {
    assert_eq!(a.0.len(), b.0.len());
    assert!(a.0.len() >= 3, "{:?}", a.0);
    for ((na, va), (nb, vb)) in a.0.iter().zip(&b.0) {
        assert_eq!(na, nb);
        assert!((va - vb).abs() < atomics_tol(1e-12), "{na}: {va} vs {vb}");
    }
    assert_eq!(a.1.len(), b.1.len());
    for ((na, va), (nb, vb)) in a.1.iter().zip(&b.1) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            assert!((x - y).abs() < atomics_tol(1e-9), "{na}: {va:?} vs {vb:?}");
        }
    }
}

#[test]
fn moe_layer_padding_changes_no_loss_statistic_or_real_output() {
    // Right padding in a [2, 5] batch: 7 real tokens.
    let am = Tensor::from_slice(&[1i64, 1, 1, 1, 0, 1, 1, 1, 0, 0])
        .view([2, 5])
        .to_device(dev());
    let x = randn64(&[2, 5, D], 4);
    let m = am.view([-1]).ne(0);
    let xr = real_rows(&x.view([10, D]), &m).view([1, 7, D]);
    for cf in [0.0, 1.5] {
        for routing in [RoutingMode::TokenChoice, RoutingMode::ExpertChoice] {
            let mut rc = all_losses(RouterConfig::new(4, 2));
            rc.capacity_factor = cf;
            rc.routing = routing;
            rc.expert_choice_capacity = 1.0;
            let layer = seeded_f64(5, || {
                MoeLayer::new(MoeConfig::new(D, 5, rc), Device::Cpu).unwrap()
            });
            let mut y = None;
            let masked = losses_and_stats(|ctx| {
                ctx.attention_mask = Some(am.shallow_clone());
                y = Some(layer.forward(&x, ctx).unwrap());
            });
            let y = y.unwrap().view([10, D]);
            // Padding rows are not dispatched.
            let pad_rows = y.index_select(0, &m.logical_not().nonzero().view([-1]));
            assert_eq!(pad_rows.abs().sum(Kind::Double).double_value(&[]), 0.0);
            if cf == 0.0 && routing == RoutingMode::TokenChoice {
                // Dropless token choice: the same losses, statistics and outputs as the real tokens alone.
                let mut yr = None;
                let real = losses_and_stats(|ctx| yr = Some(layer.forward(&xr, ctx).unwrap()));
                assert_same(&masked, &real);
                assert_close(
                    &real_rows(&y, &m),
                    &yr.unwrap().view([7, D]),
                    atomics_tol(1e-12),
                    0.0,
                );
            } else {
                // Capacity and expert choice depend on T, but the load counts real tokens only.
                let load: f64 = masked
                    .1
                    .iter()
                    .find(|(n, _)| n == "expert_load")
                    .unwrap()
                    .1
                    .iter()
                    .sum();
                assert!(
                    load <= 7.0
                        * if routing == RoutingMode::ExpertChoice {
                            4.0
                        } else {
                            2.0
                        }
                );
                assert!(load > 0.0);
            }
            // Changing the padding tokens' features changes nothing at all.
            let x2 = &x
                + randn64(&[2, 5, D], 6)
                    * am.logical_not().unsqueeze(-1).to_kind(Kind::Double)
                    * 5.0;
            let mut y2 = None;
            let masked2 = losses_and_stats(|ctx| {
                ctx.attention_mask = Some(am.shallow_clone());
                y2 = Some(layer.forward(&x2, ctx).unwrap());
            });
            assert_same(&masked, &masked2);
            assert_close(&y2.unwrap().view([10, D]), &y, atomics_tol(1e-12), 0.0);
        }
    }
    // mask_padding = false: padding counts again (different losses).
    let mut rc = all_losses(RouterConfig::new(4, 2).dropless());
    rc.mask_padding = false;
    let layer = seeded_f64(5, || {
        MoeLayer::new(MoeConfig::new(D, 5, rc), Device::Cpu).unwrap()
    });
    let unmasked = losses_and_stats(|ctx| {
        ctx.attention_mask = Some(am.shallow_clone());
        let _ = layer.forward(&x, ctx).unwrap();
    });
    let real = losses_and_stats(|ctx| {
        let _ = layer.forward(&xr, ctx).unwrap();
    });
    assert!((unmasked.0[0].1 - real.0[0].1).abs() > 1e-9);
    // A mask that fits no batch is an error.
    let rc = RouterConfig::new(4, 2).dropless();
    let layer = seeded_f64(5, || {
        MoeLayer::new(MoeConfig::new(D, 5, rc), Device::Cpu).unwrap()
    });
    let mut ctx = Context::train();
    ctx.attention_mask = Some(Tensor::ones([3, 5], (Kind::Int64, dev())));
    assert!(layer.forward(&x, &mut ctx).is_err());
}

#[test]
fn moa_padding_changes_no_loss_statistic_or_real_output() {
    // Causal attention with right padding: real tokens never see the padding.
    let mut c = MoaConfig::new(8, 6, 2, 4, 2);
    c.router.mlp_hidden = 10;
    c.router = all_losses(c.router);
    c.router.balance_weight = 0.1;
    c.router.z_loss_weight = 0.1;
    let moa = seeded_f64(7, || MixtureOfAttention::new(c, Device::Cpu).unwrap());
    let x = randn64(&[1, 7, 8], 8);
    let am = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0, 0])
        .view([1, 7])
        .to_device(dev());
    let mut y = None;
    let masked = with_seed(9, || {
        losses_and_stats(|ctx| {
            ctx.attention_mask = Some(am.shallow_clone());
            y = Some(moa.forward(&x, ctx).unwrap());
        })
    });
    let xr = x.narrow(1, 0, 5);
    let mut yr = None;
    let real = with_seed(9, || {
        losses_and_stats(|ctx| yr = Some(moa.forward(&xr, ctx).unwrap()))
    });
    assert_same(&masked, &real);
    let y = y.unwrap();
    assert_close(&y.narrow(1, 0, 5), &yr.unwrap(), atomics_tol(1e-12), 0.0);
    assert_eq!(
        y.narrow(1, 5, 2).abs().sum(Kind::Double).double_value(&[]),
        0.0
    );
}
