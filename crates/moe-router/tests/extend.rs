//! Growing a trained MoE with new experts and pruning the experts unused on
//! some data: old outputs are kept (f64, 1e-12; 1e-10 on CUDA, whose
//! atomic `index_add` sums in no fixed order), old experts can be frozen.
//! Usage vectors given by hand are host-side bookkeeping and stay on the CPU.

mod common;

use common::{atomics_tol, dev, randn64, seeded_f64};
use moe_router::config::{GateType, RouterConfig, WeightMode};
use moe_router::extend::{expert_usage, grow_experts, prune_experts, unmask_experts};
use moe_router::moe::{ExpertActivation, MoeConfig, MoeLayer};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{assert_close, with_seed};
use tensor_core::{Context, Module, ModuleExt};

const D: i64 = 6;

fn layer(gate: GateType, mode: WeightMode, act: ExpertActivation, seed: u64) -> MoeLayer {
    let mut rc = RouterConfig::new(4, 2).dropless();
    rc.gate = gate;
    rc.mlp_hidden = 7;
    rc.cosine_dim = 5;
    rc.weight_mode = mode;
    let mut c = MoeConfig::new(D, 5, rc);
    c.activation = act;
    c.bias = true;
    seeded_f64(seed, || MoeLayer::new(c, Device::Cpu).unwrap())
}

#[test]
fn grow_keeps_old_outputs_and_freezes_old_experts() {
    for gate in [GateType::Linear, GateType::Mlp, GateType::Cosine] {
        let mut m = layer(gate, WeightMode::Raw, ExpertActivation::SwiGlu, 1);
        let x = randn64(&[10, D], 2);
        let before = m.forward(&x, &mut Context::eval()).unwrap();
        tensor_core::contract::check_contract(&mut m).unwrap();
        with_seed(3, || grow_experts(&mut m, 2, true, true)).unwrap();
        assert_eq!(m.num_experts(), 6);
        // Frozen old experts beside the new ones: the contract still holds.
        tensor_core::contract::check_contract(&mut m).unwrap();
        assert_eq!(m.expert_weights().unwrap().w1.size(), [6, 5, D]);
        let after = m.forward(&x, &mut Context::eval()).unwrap();
        assert_close(&after, &before, atomics_tol(1e-12), 0.0);
        // Old experts are frozen, new ones and the router train.
        for (n, p) in m.named_parameters() {
            assert_eq!(p.requires_grad(), !n.starts_with("frozen_experts"), "{n}");
            assert_eq!(p.kind(), Kind::Double, "{n}");
        }
        // Unmasked, the new experts are chosen and get gradient; the frozen ones do not.
        unmask_experts(&mut m);
        let (y, ro) = m
            .forward_with_routing(&(x * 3.0), &mut Context::train())
            .unwrap();
        y.square().sum(Kind::Double).backward();
        let new_used = ro
            .load()
            .unwrap()
            .narrow(0, 4, 2)
            .sum(Kind::Float)
            .double_value(&[]);
        if new_used > 0.0 {
            assert!(
                m.experts
                    .w1
                    .grad()
                    .abs()
                    .sum(Kind::Double)
                    .double_value(&[])
                    > 0.0
            );
        }
        assert!(!m.frozen.as_ref().unwrap().w1.grad().defined());
    }
}

#[test]
fn grow_without_freezing_stacks_one_trainable_bank() {
    let mut m = layer(
        GateType::Linear,
        WeightMode::Renorm,
        ExpertActivation::Gelu,
        4,
    );
    let x = randn64(&[8, D], 5);
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    with_seed(6, || grow_experts(&mut m, 3, false, true)).unwrap();
    assert!(m.frozen.is_none());
    assert_eq!(m.experts.w1.size(), [7, 5, D]);
    assert!(m.experts.w1.requires_grad());
    assert_close(
        &m.forward(&x, &mut Context::eval()).unwrap(),
        &before,
        atomics_tol(1e-12),
        0.0,
    );
    assert!(grow_experts(&mut m, 0, false, true).is_err());
}

#[test]
fn prune_unused_experts_keeps_outputs_on_the_data() {
    let mut m = layer(
        GateType::Linear,
        WeightMode::Renorm,
        ExpertActivation::Gelu,
        7,
    );
    // Experts 1 and 3 never win on data whose first feature is 10: their
    // router rows are (−1, 0, ...), the others' rows have a zero first entry.
    tensor_core::tch::no_grad(|| {
        let w = m.router.params()[0].1.shallow_clone();
        for e in [1, 3] {
            let _ = w.get(e).fill_(0.0);
            let _ = w.get(e).get(0).fill_(-1.0);
        }
        for e in [0, 2] {
            let _ = w.get(e).get(0).fill_(0.0);
        }
    });
    let x = randn64(&[12, D], 9);
    let _ = x.select(1, 0).fill_(10.0);
    let usage = expert_usage(&m, &[x.shallow_clone()]).unwrap();
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    let kept = prune_experts(&mut m, &usage, 0.5).unwrap();
    assert_eq!(kept, [0, 2]);
    assert_eq!(m.num_experts(), 2);
    assert_eq!(m.experts.w1.size()[0], 2);
    let after = m.forward(&x, &mut Context::eval()).unwrap();
    assert_close(&after, &before, atomics_tol(1e-12), 0.0);
    // Too few left for top-k: an error.
    let zero = Tensor::zeros([m.num_experts()], (Kind::Float, Device::Cpu));
    assert!(prune_experts(&mut m, &zero, 0.5).is_err());
    assert!(prune_experts(&mut m, &Tensor::zeros([9], (Kind::Float, Device::Cpu)), 0.5).is_err());
}

#[test]
fn prune_after_grow_splits_frozen_and_trainable() {
    let mut m = layer(GateType::Mlp, WeightMode::Hard, ExpertActivation::Gelu, 10);
    with_seed(11, || grow_experts(&mut m, 2, true, false)).unwrap();
    let usage = Tensor::from_slice(&[5.0f32, 0.0, 3.0, 0.0, 1.0, 2.0]);
    let kept = prune_experts(&mut m, &usage, 1.0).unwrap();
    assert_eq!(kept, [0, 2, 4, 5]);
    assert_eq!(m.frozen.as_ref().unwrap().w1.size()[0], 2);
    assert_eq!(m.experts.w1.size()[0], 2);
    assert!(!m.frozen.as_ref().unwrap().w1.requires_grad());
    assert!(m.experts.w1.requires_grad());
    let x = randn64(&[5, D], 12);
    assert_eq!(m.forward(&x, &mut Context::eval()).unwrap().size(), [5, D]);
}

#[test]
fn fixed_routers_cannot_grow() {
    let mut rc = RouterConfig::new(4, 1);
    rc.gate = GateType::Hash;
    // An error path with no computation.
    let mut m = MoeLayer::new(MoeConfig::new(D, 5, rc), Device::Cpu).unwrap();
    assert!(grow_experts(&mut m, 1, true, true).is_err());
}

// ------------------------------------------------ attention experts (MoA)

use moe_router::extend::{
    attention_expert_usage, grow_attention_experts, prune_attention_experts,
    unmask_attention_experts,
};
use moe_router::moa::{KvCache, MixtureOfAttention, MoaConfig};
use moe_router::stick_breaking::SbRemainder;

fn moa(gate: GateType, mode: WeightMode, remainder: SbRemainder, seed: u64) -> MixtureOfAttention {
    let mut c = MoaConfig::new(8, 6, 2, 4, 2);
    c.router.gate = gate;
    c.router.mlp_hidden = 7;
    c.router.weight_mode = mode;
    c.remainder = remainder;
    seeded_f64(seed, || MixtureOfAttention::new(c, Device::Cpu).unwrap())
}

#[test]
fn grown_moa_keeps_outputs_and_freezes_old_experts_and_shared_kv() {
    for (gate, remainder) in [
        (GateType::Mlp, SbRemainder::None),
        (GateType::Linear, SbRemainder::AddHeadBias),
    ] {
        let mut m = moa(gate, WeightMode::Raw, remainder, 20);
        let x = randn64(&[2, 5, 8], 21);
        let before = m.forward(&x, &mut Context::eval()).unwrap();
        with_seed(22, || grow_attention_experts(&mut m, 3, true, true)).unwrap();
        assert_eq!(m.num_experts(), 7);
        tensor_core::contract::check_contract(&mut m).unwrap();
        let (q, o) = m.expert_projections().unwrap();
        assert_eq!((q.size(), o.size()), (vec![7, 6, 8], vec![7, 8, 6]));
        assert_close(
            &m.forward(&x, &mut Context::eval()).unwrap(),
            &before,
            atomics_tol(1e-12),
            0.0,
        );
        // The KV cache path too.
        let mut cache = KvCache::default();
        let inc = m
            .forward_cached(&x, &mut cache, &mut Context::eval())
            .unwrap();
        assert_close(&inc, &before, atomics_tol(1e-12), 0.0);
        for (n, p) in m.named_parameters() {
            let frozen = n.starts_with("frozen_experts")
                || n.starts_with("k_proj")
                || n.starts_with("v_proj")
                || n.starts_with("head_bias")
                || n.starts_with("group_norm");
            assert_eq!(p.requires_grad(), !frozen, "{n}");
            assert_eq!(p.kind(), Kind::Double, "{n}");
        }
        // Unmasked, new experts are chosen and train; frozen tensors get no gradient.
        unmask_attention_experts(&mut m);
        let (y, ro) = m
            .forward_with_routing(&(&x * 3.0), &mut Context::train())
            .unwrap();
        y.square().sum(Kind::Double).backward();
        let new_used = ro
            .load()
            .unwrap()
            .narrow(0, 4, 3)
            .sum(Kind::Float)
            .double_value(&[]);
        assert!(new_used > 0.0);
        assert!(m.w_q.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0);
        assert!(!m.frozen_q.as_ref().unwrap().grad().defined());
        assert!(!m.w_k.as_ref().unwrap().grad().defined());
    }
}

#[test]
fn grown_moa_without_freezing_is_one_trainable_bank() {
    let mut m = moa(GateType::Mlp, WeightMode::Raw, SbRemainder::None, 23);
    let x = randn64(&[1, 6, 8], 24);
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    with_seed(25, || grow_attention_experts(&mut m, 2, false, true)).unwrap();
    assert!(m.frozen_q.is_none());
    assert_eq!(m.w_q.size(), [6, 6, 8]);
    assert!(m.w_q.requires_grad() && m.w_k.as_ref().unwrap().requires_grad());
    assert_close(
        &m.forward(&x, &mut Context::eval()).unwrap(),
        &before,
        atomics_tol(1e-12),
        0.0,
    );
    // Unmasked with raw gates the softmax runs over 6 experts: outputs move.
    unmask_attention_experts(&mut m);
    let after = m.forward(&x, &mut Context::eval()).unwrap();
    assert!((after - &before).abs().max().double_value(&[]) > 1e-9);
    assert!(grow_attention_experts(&mut m, 0, false, true).is_err());
}

#[test]
fn pruning_unused_attention_experts_keeps_outputs_on_the_data() {
    let mut m = moa(GateType::Linear, WeightMode::Renorm, SbRemainder::None, 26);
    // Experts 1 and 3 never win when the first feature is 10 (as for the FFN test).
    tensor_core::tch::no_grad(|| {
        let w = m.router.params()[0].1.shallow_clone();
        for e in [1, 3] {
            let _ = w.get(e).fill_(0.0);
            let _ = w.get(e).get(0).fill_(-1.0);
        }
        for e in [0, 2] {
            let _ = w.get(e).get(0).fill_(0.0);
        }
    });
    let x = randn64(&[2, 6, 8], 27);
    let _ = x.select(2, 0).fill_(10.0);
    let usage = attention_expert_usage(&m, &[x.shallow_clone()], None).unwrap();
    assert_eq!(usage.sum(Kind::Float).double_value(&[]), 24.0);
    let before = m.forward(&x, &mut Context::eval()).unwrap();
    let kept = prune_attention_experts(&mut m, &usage, 0.5).unwrap();
    assert_eq!(kept, [0, 2]);
    assert_eq!(m.num_experts(), 2);
    assert_eq!(m.w_q.size()[0], 2);
    assert_close(
        &m.forward(&x, &mut Context::eval()).unwrap(),
        &before,
        atomics_tol(1e-12),
        0.0,
    );
    // Usage without padding: masked tokens are not counted.
    let am = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0])
        .view([2, 6])
        .to_device(dev());
    let u = attention_expert_usage(&m, &[x.shallow_clone()], Some(&[am])).unwrap();
    assert_eq!(u.sum(Kind::Float).double_value(&[]), 16.0);
    // Too few left, wrong length, NaN: errors.
    let zero = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    assert!(prune_attention_experts(&mut m, &zero, 0.5).is_err());
    assert!(
        prune_attention_experts(&mut m, &Tensor::zeros([5], (Kind::Float, Device::Cpu)), 0.5)
            .is_err()
    );
    let nan = Tensor::from_slice(&[f32::NAN, 1.0]);
    assert!(prune_attention_experts(&mut m, &nan, 0.5).is_err());
}

#[test]
fn pruning_a_grown_moa_splits_frozen_and_trainable() {
    let mut m = moa(GateType::Mlp, WeightMode::Hard, SbRemainder::None, 28);
    with_seed(29, || grow_attention_experts(&mut m, 2, true, false)).unwrap();
    let usage = Tensor::from_slice(&[5.0f32, 0.0, 3.0, 0.0, 1.0, 2.0]);
    let (q_all, _) = m.expert_projections().unwrap();
    let kept = prune_attention_experts(&mut m, &usage, 1.0).unwrap();
    assert_eq!(kept, [0, 2, 4, 5]);
    assert_eq!(m.frozen_q.as_ref().unwrap().size()[0], 2);
    assert_eq!(m.w_q.size()[0], 2);
    assert!(!m.frozen_q.as_ref().unwrap().requires_grad());
    assert!(m.w_q.requires_grad());
    let (q, _) = m.expert_projections().unwrap();
    assert_close(
        &q,
        &q_all.index_select(0, &Tensor::from_slice(&[0i64, 2, 4, 5]).to_device(dev())),
        0.0,
        0.0,
    );
    let x = randn64(&[1, 4, 8], 30);
    assert_eq!(
        m.forward(&x, &mut Context::eval()).unwrap().size(),
        [1, 4, 8]
    );
    // Pruning every frozen expert leaves one trainable bank.
    let usage = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 1.0]);
    prune_attention_experts(&mut m, &usage, 0.5).unwrap();
    assert!(m.frozen_q.is_none() && m.frozen_o.is_none());
    assert_eq!(m.w_q.size()[0], 2);
}
