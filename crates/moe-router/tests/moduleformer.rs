//! Stick-breaking attention (log space vs the O(T³) product form, the spec's
//! test vector, limits, gradients), the mixture of attention heads (sparse vs
//! dense, reduction to plain stick-breaking) and the ModuleFormer block
//! (causality, names).

mod common;

use common::{atomics_tol, dev, grads, leaf, randn64, seeded_f64, to_vec, trainable};
use moe_router::block::{ModuleFormerConfig, moduleformer_block};
use moe_router::config::{GateType, WeightMode};
use moe_router::moa::{KvCache, MixtureOfAttention, MoaConfig};
use moe_router::moe::MoePath;
use moe_router::stick_breaking::*;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::assert_close;
use tensor_core::{Context, Module, ModuleExt};

/// The spec's lower-triangular logits (upper entries are ignored), on the test device.
fn spec_logits() -> Tensor {
    Tensor::from_slice(&[0.5f64, 9.0, 9.0, 1.0, -0.3, 9.0, 0.2, 2.0, -1.0])
        .view([3, 3])
        .to_device(dev())
}

#[test]
fn spec_test_vector_mf_and_sb() {
    let a = stick_breaking_weights(&spec_logits(), SbVariant::Mf, None).unwrap();
    let expect = Tensor::from_slice(&[
        0.622459, 0.0, 0.0, 0.419951, 0.425557, 0.0, 0.047915, 0.643914, 0.268941,
    ])
    .view([3, 3]);
    assert_close(&a, &expect, 1e-6, 0.0);
    let sums = a.sum_dim_intlist(-1, false, None);
    assert_close(
        &sums,
        &Tensor::from_slice(&[0.622459, 0.845509, 0.960771]),
        1e-6,
        0.0,
    );
    let sb = stick_breaking_weights(&spec_logits(), SbVariant::Sb, None).unwrap();
    let expect = Tensor::from_slice(&[0.0, 0.0, 0.0, 0.731059, 0.0, 0.0, 0.065542, 0.880797, 0.0])
        .view([3, 3]);
    assert_close(&sb, &expect, 1e-6, 0.0);
    let rem = sb.sum_dim_intlist(-1, false, None).neg() + 1.0;
    assert_close(
        &rem,
        &Tensor::from_slice(&[1.0, 0.268941, 0.053661]),
        1e-6,
        0.0,
    );
}

#[test]
fn log_space_equals_the_cubic_reference_and_rows_sum_to_at_most_one() {
    for variant in [SbVariant::Mf, SbVariant::Sb] {
        for (tq, tk) in [(7, 7), (3, 7)] {
            let logits = randn64(&[2, 3, tq, tk], 20) * 2.0;
            let a = stick_breaking_weights(&logits, variant, None).unwrap();
            let naive = stick_breaking_naive(&logits, variant).unwrap();
            assert_close(&a, &naive, 1e-12, 0.0);
            let v = to_vec(&a);
            assert!(v.iter().all(|&x| (0.0..=1.0).contains(&x)));
            let sums = to_vec(&a.sum_dim_intlist(-1, false, None));
            assert!(sums.iter().all(|&s| s <= 1.0 + 1e-12));
            // Causal: nothing above the (shifted) diagonal; SB also zeroes it.
            let off = tk - tq;
            let diag = if variant == SbVariant::Mf {
                off + 1
            } else {
                off
            };
            let above = a.triu(diag).abs().sum(Kind::Double).double_value(&[]);
            assert_eq!(above, 0.0);
        }
    }
}

#[test]
fn limits() {
    // MF with a huge diagonal logit: all the mass on token i.
    let l = randn64(&[5, 5], 21);
    let _ = l.diagonal(0, 0, 1).fill_(1e4);
    let a = stick_breaking_weights(&l, SbVariant::Mf, None).unwrap();
    assert_close(&a, &Tensor::eye(5, (Kind::Double, dev())), 1e-12, 0.0);
    // Very negative logits: A = 0.
    let a = stick_breaking_weights(
        &Tensor::full([4, 4], -1e4, (Kind::Double, dev())),
        SbVariant::Mf,
        None,
    )
    .unwrap();
    assert_eq!(a.abs().sum(Kind::Double).double_value(&[]), 0.0);
    // Masked (padding) keys get no weight and do not break the stick.
    let l = randn64(&[1, 6, 6], 22);
    let mask = Tensor::from_slice(&[1i64, 0, 1, 1, 0, 1])
        .view([1, 1, 6])
        .to_device(dev());
    let a = stick_breaking_weights(&l, SbVariant::Mf, Some(&mask)).unwrap();
    let cols = a.sum_dim_intlist(-2, false, None);
    assert_eq!(to_vec(&cols)[1], 0.0);
    assert_eq!(to_vec(&cols)[4], 0.0);
    // Equals the unmasked weights on the kept keys only.
    let keep = Tensor::from_slice(&[0i64, 2, 3, 5]).to_device(dev());
    let sub = l.index_select(1, &keep).index_select(2, &keep);
    let a_sub = stick_breaking_weights(&sub, SbVariant::Mf, None).unwrap();
    assert_close(
        &a.index_select(1, &keep).index_select(2, &keep),
        &a_sub,
        1e-12,
        0.0,
    );
    assert!(
        stick_breaking_weights(
            &l,
            SbVariant::Mf,
            Some(&Tensor::ones([1, 5], (Kind::Int64, dev())))
        )
        .is_err()
    );
}

#[test]
fn gradient_matches_finite_differences() {
    let q = leaf(randn64(&[1, 5, 3], 23));
    let k = randn64(&[1, 5, 3], 24);
    let v = randn64(&[1, 5, 2], 25);
    let r = randn64(&[1, 5, 2], 26);
    let f = |q: &Tensor| {
        let o = stick_breaking_attention(q, &k, &v, SbVariant::Sb, true, None).unwrap();
        (o.out * &r).sum(Kind::Double)
    };
    let g = Tensor::run_backward(&[f(&q)], &[&q], false, false).remove(0);
    let eps = 1e-6;
    let qd = q.detach();
    for i in 0..15 {
        let e = Tensor::zeros([15], (Kind::Double, dev()));
        let _ = e.get(i).fill_(eps);
        let e = e.view([1, 5, 3]);
        let fd =
            (f(&(&qd + &e)).double_value(&[]) - f(&(&qd - &e)).double_value(&[])) / (2.0 * eps);
        let an = g.view([15]).double_value(&[i]);
        assert!((fd - an).abs() < 1e-7, "{i}: fd {fd} vs {an}");
    }
}

#[test]
fn attention_output_and_current_value_remainder() {
    let q = randn64(&[2, 4, 3], 27);
    let k = randn64(&[2, 4, 3], 28);
    let v = randn64(&[2, 4, 5], 29);
    let logits = q.matmul(&k.transpose(-2, -1)) / 3f64.sqrt();
    let a = stick_breaking_naive(&logits, SbVariant::Sb).unwrap();
    let o = stick_breaking_attention(&q, &k, &v, SbVariant::Sb, false, None).unwrap();
    assert_close(&o.out, &a.matmul(&v), 1e-12, 0.0);
    let rem = a.sum_dim_intlist(-1, false, None).neg() + 1.0;
    assert_close(&o.rem, &rem, 1e-12, 0.0);
    let o2 = stick_breaking_attention(&q, &k, &v, SbVariant::Sb, true, None).unwrap();
    assert_close(
        &o2.out,
        &(a.matmul(&v) + rem.unsqueeze(-1) * &v),
        1e-12,
        0.0,
    );
    // The first token under SB attends to nothing: its output is v_0 with the remainder.
    assert_close(&o2.out.select(1, 0), &v.select(1, 0), 1e-12, 0.0);
    // f32 and bf16 inputs run (bf16 computed in f32).
    let o3 = stick_breaking_attention(
        &q.to_kind(Kind::BFloat16),
        &k.to_kind(Kind::BFloat16),
        &v.to_kind(Kind::BFloat16),
        SbVariant::Mf,
        false,
        None,
    )
    .unwrap();
    assert_eq!(o3.out.kind(), Kind::BFloat16);
}

fn moa(config: MoaConfig, seed: u64) -> MixtureOfAttention {
    seeded_f64(seed, || {
        MixtureOfAttention::new(config, Device::Cpu).unwrap()
    })
}

#[test]
fn moa_sparse_equals_dense_values_and_gradients() {
    for remainder in [
        SbRemainder::None,
        SbRemainder::AddCurrentValue,
        SbRemainder::AddHeadBias,
    ] {
        let mut c = MoaConfig::new(8, 6, 2, 4, 2);
        c.router.mlp_hidden = 10;
        c.remainder = remainder;
        c.variant = if remainder == SbRemainder::None {
            SbVariant::Mf
        } else {
            SbVariant::Sb
        };
        let mut m = moa(c, 30);
        if let Some(b) = &m.head_bias {
            tensor_core::tch::no_grad(|| {
                b.shallow_clone().copy_(&randn64(&[6], 3));
            });
        }
        let x = leaf(randn64(&[2, 5, 8], 31));
        let r = randn64(&[2, 5, 8], 32);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0])
            .view([2, 5])
            .to_device(dev());
        let mut ctx = Context::eval().with_mask(mask.shallow_clone());
        let sparse = m.forward(&x, &mut ctx).unwrap();
        m.config.path = MoePath::Dense;
        let mut ctx = Context::eval().with_mask(mask);
        let dense = m.forward(&x, &mut ctx).unwrap();
        let tol = atomics_tol(1e-10);
        assert_close(&sparse, &dense, tol, tol);
        let mut inputs = trainable(&m);
        inputs.push(x.shallow_clone());
        for (a, b) in grads(&sparse, &r, &inputs)
            .iter()
            .zip(&grads(&dense, &r, &inputs))
        {
            assert_close(a, b, tol, tol);
        }
    }
}

#[test]
fn moa_with_one_expert_is_plain_stick_breaking() {
    // One expert, k = 1, g = 1, W_q = W_o = I, K = V = x: plain stick-breaking attention.
    let mut c = MoaConfig::new(4, 4, 1, 1, 1);
    c.kv_projection = false;
    c.router.gate = GateType::Linear;
    c.router.weight_mode = WeightMode::Hard;
    let m = moa(c, 33);
    tensor_core::tch::no_grad(|| {
        let eye = Tensor::eye(4, (Kind::Double, dev())).unsqueeze(0);
        m.w_q.shallow_clone().copy_(&eye);
        m.w_o.shallow_clone().copy_(&eye);
    });
    let x = randn64(&[2, 6, 4], 34);
    let y = m.forward(&x, &mut Context::eval()).unwrap();
    let plain = stick_breaking_attention(&x, &x, &x, SbVariant::Mf, false, None).unwrap();
    assert_close(&y, &plain.out, 1e-12, 0.0);
}

fn block_config() -> ModuleFormerConfig {
    ModuleFormerConfig {
        d_model: 8,
        att_hidden: 8,
        n_head: 2,
        att_experts: 3,
        att_top_k: 2,
        ffn_experts: 4,
        ffn_top_k: 2,
        d_ff: 6,
        gating_size: 5,
        mi_weight: 0.1,
        ..ModuleFormerConfig::default()
    }
}

#[test]
fn block_is_causal_and_names_its_slots_like_gpt2() {
    let mut block = seeded_f64(35, || {
        moduleformer_block(&block_config(), Device::Cpu).unwrap()
    });
    // The block, its MoA and its MoE layer keep the module contract.
    let report = tensor_core::contract::check_contract(&mut block).unwrap();
    assert_eq!(
        report.parameters,
        block.named_parameters().len(),
        "{report:?}"
    );
    let x = randn64(&[2, 7, 8], 36);
    let y = block.forward(&x, &mut Context::eval()).unwrap();
    // Perturb tokens 4.. : outputs 0..4 unchanged.
    let x2 = x.copy();
    x2.narrow(1, 4, 3).copy_(&randn64(&[2, 3, 8], 37));
    let y2 = block.forward(&x2, &mut Context::eval()).unwrap();
    assert_close(&y2.narrow(1, 0, 4), &y.narrow(1, 0, 4), 1e-12, 0.0);
    assert!(
        (y2.narrow(1, 4, 3) - y.narrow(1, 4, 3))
            .abs()
            .max()
            .double_value(&[])
            > 1e-6
    );
    let mut names: Vec<String> = block
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "attn.experts.o_proj",
            "attn.experts.q_proj",
            "attn.k_proj.weight",
            "attn.router.mlp.0.bias",
            "attn.router.mlp.0.weight",
            "attn.router.mlp.2.weight",
            "attn.v_proj.weight",
            "ln_1.bias",
            "ln_1.weight",
            "ln_2.bias",
            "ln_2.weight",
            "mlp.experts.w1",
            "mlp.experts.w2",
            "mlp.router.mlp.0.bias",
            "mlp.router.mlp.0.weight",
            "mlp.router.mlp.2.weight",
        ]
    );
    // Training: MI losses from both routers; gradients reach every parameter.
    let mut ctx = Context::train();
    let y = block.forward(&x, &mut ctx).unwrap();
    let losses: Vec<&str> = ctx.aux_losses().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(losses, ["attn.mi_loss", "mlp.mi_loss"]);
    (y.square().mean(Kind::Double) + ctx.aux_loss_total(dev()).unwrap()).backward();
    for (n, p) in block.named_parameters() {
        assert!(
            p.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{n}"
        );
    }
    // A GPT-2-like tree takes the MoA in its attention slot.
    let mut gpt = tensor_core::module::Sequential::new().push_named(
        "h.0",
        Box::new(seeded_f64(38, || {
            moduleformer_block(&block_config(), Device::Cpu).unwrap()
        })),
    );
    let moa2 = seeded_f64(39, || {
        MixtureOfAttention::new(block_config().moa(), Device::Cpu).unwrap()
    });
    let old = gpt.replace("h.0.attn", Box::new(moa2)).unwrap();
    assert_eq!(old.kind(), "MixtureOfAttention");
    assert_eq!(
        gpt.forward(&x, &mut Context::eval()).unwrap().size(),
        [2, 7, 8]
    );
}

#[test]
fn moa_bad_configs_are_errors() {
    let mut c = MoaConfig::new(8, 6, 4, 2, 1);
    assert!(c.validate().is_err(), "4 heads do not divide 6");
    c.n_head = 2;
    c.router.capacity_factor = 1.0;
    assert!(MixtureOfAttention::new(c.clone(), dev()).is_err());
    c.router.capacity_factor = 0.0;
    c.kv_projection = false;
    assert!(c.validate().is_err(), "K = V = x needs att_hidden = d");
    c.kv_projection = true;
    let m = MixtureOfAttention::new(c, dev()).unwrap();
    assert!(
        m.forward(
            &Tensor::zeros([2, 3, 7], (Kind::Float, dev())),
            &mut Context::eval()
        )
        .is_err()
    );
    let mut ctx = Context::eval().with_mask(Tensor::ones([2, 4], (Kind::Int64, dev())));
    assert!(
        m.forward(&Tensor::zeros([2, 3, 8], (Kind::Float, dev())), &mut ctx)
            .is_err()
    );
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for experts in [2usize, 5] {
        let mut c = MoaConfig::new(8, 6, 2, experts, 2);
        c.router.mlp_hidden = 4;
        c.remainder = SbRemainder::AddCurrentValue;
        let m = moa(c, 40);
        let x = randn64(&[2, 6, 8], 41);
        let full = m.forward(&x, &mut Context::eval()).unwrap();
        let mut cache = KvCache::default();
        let mut parts = Vec::new();
        for (start, len) in [(0, 3), (3, 1), (4, 2)] {
            parts.push(
                m.forward_cached(&x.narrow(1, start, len), &mut cache, &mut Context::eval())
                    .unwrap(),
            );
        }
        assert_close(&Tensor::cat(&parts, 1), &full, atomics_tol(1e-12), 0.0);
        // The cache holds the shared K and V only: its size does not depend on E.
        assert_eq!(cache.len(), 6);
        assert_eq!(cache.k.as_ref().unwrap().size(), [2, 1, 2, 6, 3]);
    }
}
