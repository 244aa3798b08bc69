//! The layers against their formulas: Linear, LayerNorm, Embedding, the
//! feed-forward variants and attention (self, causal, cross, with padding),
//! checkpoint parameter names, masks, and bf16 against f32.

use proptest::prelude::*;
use tch::{Device, Kind, Tensor};
use tensor_core::layers::*;
use tensor_core::testing::{assert_close, device, randn_seeded, tolerances, with_seed};
use tensor_core::{Context, DType, Module, ModuleExt};

use crate::scaled;

/// For tests of names and argument checks only: nothing is computed.
const CPU: Device = Device::Cpu;

fn ctx() -> Context {
    Context::eval()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn linear_equals_manual_matmul(batch in 1i64..4, seq in 1i64..6, din in 1i64..17, dout in 1i64..17, bias: bool, seed in 0u64..1000) {
        let dev = device();
        let lin = with_seed(seed, || Linear::new(din, dout, bias, dev).unwrap());
        let x = randn_seeded(&[batch, seq, din], seed + 1, dev).unwrap();
        let y = lin.forward(&x, &mut ctx()).unwrap();
        let mut expected = x.matmul(&lin.weight.tr());
        if let Some(b) = &lin.bias {
            expected += b;
        }
        prop_assert_eq!(y.size(), vec![batch, seq, dout]);
        let (atol, rtol) = scaled(1e-5, 1e-5);
        assert_close(&y, &expected, atol, rtol);
    }

    #[test]
    fn causal_attention_never_sees_later_tokens(seq in 2i64..9, cut in 0i64..8, heads in 1i64..4, seed in 0u64..1000) {
        let cut = cut % (seq - 1) + 1; // perturb positions cut.. ; earlier ones must not move
        let d = 8 * heads;
        let dev = device();
        let att = with_seed(seed, || Attention::new(AttentionConfig::new(d, heads).causal(true), AttentionNames::bert(), dev).unwrap());
        let x = randn_seeded(&[2, seq, d], seed + 1, dev).unwrap();
        let noise = randn_seeded(&[2, seq - cut, d], seed + 2, dev).unwrap();
        let x2 = x.copy();
        x2.narrow(1, cut, seq - cut).copy_(&(x.narrow(1, cut, seq - cut) + noise * 3.0));
        let y1 = att.forward(&x, &mut ctx()).unwrap();
        let y2 = att.forward(&x2, &mut ctx()).unwrap();
        let (atol, rtol) = scaled(1e-6, 1e-5);
        assert_close(&y2.narrow(1, 0, cut), &y1.narrow(1, 0, cut), atol, rtol);
        // ...while later positions do change.
        prop_assert!(!y2.narrow(1, cut, seq - cut).allclose(&y1.narrow(1, cut, seq - cut), 1e-5, 1e-5, false));
    }
}

#[test]
fn linear_rejects_wrong_width_and_dtype() {
    let lin = with_seed(21, || Linear::new(4, 3, true, CPU).unwrap());
    let e = lin
        .forward(&Tensor::zeros([2, 5], (Kind::Float, CPU)), &mut ctx())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[*, 4]") && e.contains("[2, 5]"), "{e}");
    let e = lin
        .forward(&Tensor::zeros([2, 4], (Kind::Int64, CPU)), &mut ctx())
        .unwrap_err()
        .to_string();
    assert!(e.contains("Int64"), "{e}");
    assert!(Linear::new(0, 3, true, CPU).is_err());
    assert!(
        Linear::from_weights(
            Tensor::zeros([3, 4], (Kind::Float, CPU)),
            Some(Tensor::zeros([4], (Kind::Float, CPU)))
        )
        .is_err()
    );
}

#[test]
fn layer_norm_matches_formula() {
    let dev = device();
    let mut ln = LayerNorm::new(6, 1e-5, true, dev).unwrap();
    tch::no_grad(|| {
        ln.weight.copy_(&randn_seeded(&[6], 1, dev).unwrap());
        ln.bias
            .as_mut()
            .unwrap()
            .copy_(&randn_seeded(&[6], 2, dev).unwrap());
    });
    let x = randn_seeded(&[3, 4, 6], 3, dev).unwrap();
    let mean = x.mean_dim(-1, true, Kind::Float);
    let var = (&x - &mean).square().mean_dim(-1, true, Kind::Float);
    let expected = (&x - &mean) / (var + 1e-5).sqrt() * &ln.weight + ln.bias.as_ref().unwrap();
    let (atol, rtol) = scaled(1e-5, 1e-5);
    assert_close(&ln.forward(&x, &mut ctx()).unwrap(), &expected, atol, rtol);
    assert!(
        ln.forward(&Tensor::zeros([2, 5], (Kind::Float, dev)), &mut ctx())
            .is_err()
    );
}

#[test]
fn embedding_looks_up_rows() {
    let dev = device();
    let emb = with_seed(22, || Embedding::new(10, 4, dev).unwrap());
    let idx = Tensor::from_slice(&[3i64, 0, 9, 3])
        .view([2, 2])
        .to_device(dev);
    let y = emb.forward(&idx, &mut ctx()).unwrap();
    assert_eq!(y.size(), [2, 2, 4]);
    assert!(y.get(0).get(0).equal(&emb.weight.get(3)));
    assert!(y.get(1).get(0).equal(&emb.weight.get(9)));
    let e = emb
        .forward(&Tensor::zeros([2], (Kind::Float, dev)), &mut ctx())
        .unwrap_err()
        .to_string();
    assert!(e.contains("indices"), "{e}");
    // On the CPU: on CUDA an out-of-range index is a device-side assert,
    // which would poison the CUDA context of every later test.
    let emb = with_seed(23, || Embedding::new(10, 4, Device::Cpu).unwrap());
    assert!(
        emb.forward(&Tensor::from_slice(&[10i64]), &mut ctx())
            .is_err()
    );
}

#[test]
fn feed_forward_matches_formula_for_every_activation() {
    for (act, reference) in [
        (
            Activation::Gelu,
            Box::new(|t: &Tensor| t.gelu("none")) as Box<dyn Fn(&Tensor) -> Tensor>,
        ),
        (
            Activation::GeluTanh,
            Box::new(|t: &Tensor| {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let c = (2.0f64 / std::f64::consts::PI).sqrt();
                (t * 0.5) * (((t + t.pow_tensor_scalar(3) * 0.044715) * c).tanh() + 1.0)
            }),
        ),
        (Activation::Relu, Box::new(|t: &Tensor| t.clamp_min(0.0))),
        (Activation::Silu, Box::new(|t: &Tensor| t * t.sigmoid())),
    ] {
        let ffn = with_seed(5, || {
            FeedForward::new(8, 32, act, FfnNames::bert(), device()).unwrap()
        });
        let x = randn_seeded(&[2, 3, 8], 6, device()).unwrap();
        let (w1, b1, w2, b2) = (
            ffn.w1().unwrap(),
            ffn.b1().unwrap().unwrap(),
            ffn.w2().unwrap(),
            ffn.b2().unwrap().unwrap(),
        );
        let expected = reference(&(x.matmul(&w1.tr()) + b1)).matmul(&w2.tr()) + b2;
        let (atol, rtol) = scaled(1e-5, 1e-5);
        assert_close(&ffn.forward(&x, &mut ctx()).unwrap(), &expected, atol, rtol);
    }
}

#[test]
fn swiglu_matches_formula_and_names() {
    let dev = device();
    let ffn = with_seed(9, || {
        FeedForward::gated(8, 16, Activation::Silu, FfnNames::llama(), dev).unwrap()
    });
    let x = randn_seeded(&[5, 8], 10, dev).unwrap();
    let g = x.matmul(&ffn.gate_weight().unwrap().tr());
    let expected = (g.silu() * x.matmul(&ffn.w1().unwrap().tr())).matmul(&ffn.w2().unwrap().tr());
    let (atol, rtol) = scaled(1e-5, 1e-5);
    assert_close(&ffn.forward(&x, &mut ctx()).unwrap(), &expected, atol, rtol);
    let names: Vec<String> = ffn.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["up_proj.weight", "gate_proj.weight", "down_proj.weight"]
    );
    assert!(FeedForward::gated(8, 16, Activation::Silu, FfnNames::bert(), dev).is_err());
}

#[test]
fn feed_forward_names_follow_the_checkpoint() {
    let ffn = with_seed(24, || {
        FeedForward::new(4, 8, Activation::Gelu, FfnNames::bert(), CPU).unwrap()
    });
    let names: Vec<String> = ffn.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "intermediate.dense.weight",
            "intermediate.dense.bias",
            "output.dense.weight",
            "output.dense.bias"
        ]
    );
    assert_eq!(ffn.d_model().unwrap(), 4);
    assert_eq!(ffn.d_ff().unwrap(), 8);
    assert!(ffn.gate_weight().is_err());
    assert!("gelu_pytorch_tanh".parse::<Activation>().unwrap() == Activation::GeluTanh);
    assert!("mish".parse::<Activation>().is_err());
}

/// Attention computed head by head with explicit softmax.
fn manual_attention(
    att: &Attention,
    x: &Tensor,
    mem: &Tensor,
    key_mask: Option<&Tensor>,
) -> Tensor {
    let lin = |m: &Slot| -> (Tensor, Tensor) {
        let l = tensor_core::module::downcast_ref::<Linear>(m.as_ref()).unwrap();
        (
            l.weight.shallow_clone(),
            l.bias.as_ref().unwrap().shallow_clone(),
        )
    };
    let (wq, bq) = lin(&att.query);
    let (wk, bk) = lin(&att.key);
    let (wv, bv) = lin(&att.value);
    let (wo, bo) = lin(&att.output);
    let (b, tq, tk) = (x.size()[0], x.size()[1], mem.size()[1]);
    let h = att.config.num_heads;
    let d = att.config.head_dim;
    let split = |t: Tensor, n: i64| t.view([b, n, h, d]).transpose(1, 2);
    let q = split(x.matmul(&wq.tr()) + bq, tq);
    let k = split(mem.matmul(&wk.tr()) + bk, tk);
    let v = split(mem.matmul(&wv.tr()) + bv, tk);
    let mut scores = q.matmul(&k.transpose(-1, -2)) / (d as f64).sqrt();
    if let Some(m) = key_mask {
        let hide = m.eq(0).view([b, 1, 1, tk]);
        scores = scores.masked_fill(&hide, f64::NEG_INFINITY);
    }
    if att.config.causal {
        let hide = Tensor::ones([tq, tk], (Kind::Bool, x.device())).triu(1);
        scores = scores.masked_fill(&hide, f64::NEG_INFINITY);
    }
    let out = scores
        .softmax(-1, Kind::Float)
        .matmul(&v)
        .transpose(1, 2)
        .reshape([b, tq, h * d]);
    out.matmul(&wo.tr()) + bo
}

use tensor_core::Slot;

#[test]
fn self_attention_matches_manual_with_padding() {
    let dev = device();
    let att = with_seed(11, || {
        Attention::new(AttentionConfig::new(12, 3), AttentionNames::bert(), dev).unwrap()
    });
    let x = randn_seeded(&[2, 5, 12], 12, dev).unwrap();
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0])
        .view([2, 5])
        .to_device(dev);
    let mut c = Context::eval().with_mask(mask.shallow_clone());
    let y = att.forward(&x, &mut c).unwrap();
    let (atol, rtol) = tolerances(DType::F32, dev);
    assert_close(&y, &manual_attention(&att, &x, &x, Some(&mask)), atol, rtol);
    // Perturbing padded positions leaves the real tokens' outputs unchanged.
    let x2 = x.copy();
    x2.get(1)
        .narrow(0, 3, 2)
        .copy_(&randn_seeded(&[2, 12], 13, dev).unwrap());
    let y2 = att.forward(&x2, &mut c).unwrap();
    let (atol, rtol) = scaled(1e-6, 1e-5);
    assert_close(
        &y2.get(1).narrow(0, 0, 3),
        &y.get(1).narrow(0, 0, 3),
        atol,
        rtol,
    );
    assert_close(&y2.get(0), &y.get(0), 0.0, 0.0);
}

#[test]
fn causal_attention_matches_manual() {
    let att = with_seed(14, || {
        Attention::new(
            AttentionConfig::new(8, 2).causal(true),
            AttentionNames::proj(),
            device(),
        )
        .unwrap()
    });
    let x = randn_seeded(&[3, 6, 8], 15, device()).unwrap();
    let y = att.forward(&x, &mut ctx()).unwrap();
    let (atol, rtol) = tolerances(DType::F32, device());
    assert_close(&y, &manual_attention(&att, &x, &x, None), atol, rtol);
}

#[test]
fn cross_attention_reads_memory() {
    let att = with_seed(16, || {
        Attention::new(
            AttentionConfig::new(8, 2).cross(true),
            AttentionNames::proj(),
            device(),
        )
        .unwrap()
    });
    let x = randn_seeded(&[2, 3, 8], 17, device()).unwrap();
    let mem = randn_seeded(&[2, 7, 8], 18, device()).unwrap();
    let mmask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
        .view([2, 7])
        .to_device(device());
    let e = att.forward(&x, &mut ctx()).unwrap_err().to_string();
    assert!(e.contains("ctx.memory"), "{e}");
    let mut c = Context::eval().with_memory(mem.shallow_clone(), Some(mmask.shallow_clone()));
    let y = att.forward(&x, &mut c).unwrap();
    assert_eq!(y.size(), [2, 3, 8]);
    let (atol, rtol) = tolerances(DType::F32, device());
    assert_close(
        &y,
        &manual_attention(&att, &x, &mem, Some(&mmask)),
        atol,
        rtol,
    );
}

#[test]
fn fully_masked_rows_stay_finite_and_bad_masks_are_errors() {
    let dev = device();
    let att = with_seed(25, || {
        Attention::new(AttentionConfig::new(8, 2), AttentionNames::bert(), dev).unwrap()
    });
    let x = randn_seeded(&[1, 4, 8], 19, dev).unwrap();
    let mut c = Context::eval().with_mask(Tensor::zeros([1, 4], (Kind::Int64, dev)));
    let y = att.forward(&x, &mut c).unwrap();
    assert!(bool::try_from(y.isfinite().all()).unwrap());
    let mut c = Context::eval().with_mask(Tensor::ones([1, 5], (Kind::Int64, dev)));
    let e = att.forward(&x, &mut c).unwrap_err().to_string();
    assert!(e.contains("[1, 4]") && e.contains("[1, 5]"), "{e}");
    let e = att
        .forward(&Tensor::zeros([4, 8], (Kind::Float, dev)), &mut ctx())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, seq, 8]"), "{e}");
    assert!(Attention::new(AttentionConfig::new(8, 0), AttentionNames::bert(), CPU).is_err());
}

#[test]
fn attention_parameter_names_are_bert_keys() {
    let att = with_seed(26, || {
        Attention::new(AttentionConfig::new(8, 2), AttentionNames::bert(), CPU).unwrap()
    });
    let names: Vec<String> = att.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "self.query.weight",
            "self.query.bias",
            "self.key.weight",
            "self.key.bias",
            "self.value.weight",
            "self.value.bias",
            "output.dense.weight",
            "output.dense.bias"
        ]
    );
}

#[test]
fn bf16_forward_is_close_to_f32() {
    let mut ffn = with_seed(20, || {
        FeedForward::new(16, 32, Activation::Gelu, FfnNames::bert(), device()).unwrap()
    });
    let x = randn_seeded(&[4, 16], 21, device()).unwrap();
    let y32 = ffn.forward(&x, &mut ctx()).unwrap();
    ffn.to_kind(Kind::BFloat16).unwrap();
    let y16 = ffn.forward(&x.to_kind(Kind::BFloat16), &mut ctx()).unwrap();
    assert_eq!(y16.kind(), Kind::BFloat16);
    let (atol, rtol) = tolerances(DType::BF16, device());
    assert_close(&y16, &y32, atol * 5.0, rtol * 2.0);
}

#[test]
fn rms_norm_is_the_formula_in_f32_and_keeps_the_input_dtype() {
    let d = 6;
    let mut n = tensor_core::layers::RmsNorm::new(d, 1e-6, Device::Cpu).unwrap();
    tch::no_grad(|| {
        n.weight
            .copy_(&tensor_core::seed::randn_seeded(&[d], 5, Device::Cpu).unwrap())
    });
    let x = tensor_core::seed::randn_seeded(&[2, 3, d], 6, Device::Cpu).unwrap();
    let want = &n.weight * (&x / (x.square().mean_dim(-1, true, Kind::Float) + 1e-6).sqrt());
    let got = n.forward(&x, &mut Context::eval()).unwrap();
    tensor_core::testing::assert_close(&got, &want, 1e-6, 1e-6);
    let xb = x.to_kind(Kind::BFloat16);
    let nb = n.forward(&xb, &mut Context::eval()).unwrap();
    // The statistics run in f32; the weight (f32 here) promotes the product.
    tensor_core::testing::assert_close(&nb, &want, 2e-2, 2e-2);
    assert!(n.forward(&x.narrow(2, 0, 5), &mut Context::eval()).is_err());
}
