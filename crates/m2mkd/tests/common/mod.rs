//! Small models for the tests: token embedding -> residual MLP blocks ->
//! masked-mean + linear head, a user-written top-k MoE block, and a seeded
//! synthetic classification task (the label is a function of the tokens).
//!
//! Models are initialised on the CPU under a seed (the same values on every
//! device) and moved to the test device ([`dev`], `MODULAR_TEST_DEVICE`,
//! the CPU by default); [`batch`] builds on the CPU, [`device_batch`] moves it.
#![allow(dead_code)]

use std::sync::Arc;

use m2mkd::{Batch, LayerStack, MetaModel, ModularModel, Stage};
use tensor_core::layers::{Activation, Embedding, FeedForward, FfnNames, LayerNorm, Linear};
use tensor_core::prelude::*;
use tensor_core::testing::with_seed;

/// The device the tests compute on (`tensor_core::testing::device`).
pub fn dev() -> Device {
    tensor_core::testing::device()
}

/// `(atol, rtol)` for f32 results: the given CPU bounds, scaled like
/// `tensor_core::testing::tolerances` scales f32 for the test device (10x on CUDA).
pub fn f32_tol(atol: f64, rtol: f64) -> (f64, f64) {
    let (a, r) = tensor_core::testing::tolerances(DType::F32, dev());
    let (a0, r0) = DType::F32.tolerances();
    (atol * a / a0, rtol * r / r0)
}

pub const VOCAB: i64 = 24;
pub const CLASSES: i64 = 3;
pub const SEQ: i64 = 6;
pub const BATCH: i64 = 8;

/// `h + FFN(LN(h))`.
#[derive(Debug)]
pub struct ResBlock {
    pub norm: Slot,
    pub ffn: Slot,
}

impl ResBlock {
    pub fn new(d: i64) -> Self {
        Self {
            norm: Box::new(LayerNorm::new(d, 1e-5, true, Device::Cpu).unwrap()),
            ffn: Box::new(
                FeedForward::new(d, 2 * d, Activation::Gelu, FfnNames::bert(), Device::Cpu)
                    .unwrap(),
            ),
        }
    }
}

impl Module for ResBlock {
    fn kind(&self) -> &'static str {
        "ResBlock"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let n = ctx.call("norm", self.norm.as_ref(), xs)?;
        let f = ctx.call("ffn", self.ffn.as_ref(), &n)?;
        Ok(xs.f_add(&f)?)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("norm", self.norm.as_ref()), ("ffn", self.ffn.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("norm", &mut self.norm), ("ffn", &mut self.ffn)]
    }
}

/// A user's mixture-of-experts block: `h + Σ_{e ∈ top-k} p_e FFN_e(LN(h))`,
/// softmax over the chosen k, with a Switch-style balance loss in the context.
#[derive(Debug)]
pub struct MoeBlock {
    pub norm: Slot,
    pub router: Slot,
    pub experts: Vec<Slot>,
    pub names: Vec<String>,
    pub k: i64,
}

impl MoeBlock {
    pub fn new(d: i64, experts: usize, k: i64) -> Self {
        Self {
            norm: Box::new(LayerNorm::new(d, 1e-5, true, Device::Cpu).unwrap()),
            router: Box::new(Linear::new(d, experts as i64, false, Device::Cpu).unwrap()),
            experts: (0..experts)
                .map(|_| {
                    Box::new(
                        FeedForward::new(d, d, Activation::Gelu, FfnNames::bert(), Device::Cpu)
                            .unwrap(),
                    ) as Slot
                })
                .collect(),
            names: (0..experts).map(|e| format!("experts.{e}")).collect(),
            k,
        }
    }
}

impl Module for MoeBlock {
    fn kind(&self) -> &'static str {
        "MoeBlock"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let n = ctx.call("norm", self.norm.as_ref(), xs)?;
        let logits = ctx.call("router", self.router.as_ref(), &n)?;
        let (top_v, top_i) = logits.f_topk(self.k, -1, true, true)?;
        let gates = top_v.f_softmax(-1, Kind::Float)?;
        let e = self.experts.len() as i64;
        let dense = Tensor::f_zeros_like(&logits)?.f_scatter(-1, &top_i, &gates)?;
        let mut out = Tensor::f_zeros_like(xs)?;
        for (i, (name, ex)) in self.names.iter().zip(&self.experts).enumerate() {
            let y = ctx.call(name, ex.as_ref(), &n)?;
            out = out.f_add(&y.f_mul(&dense.f_narrow(-1, i as i64, 1)?)?)?;
        }
        // Switch balance loss: E · Σ_e f_e P_e.
        let probs = logits.f_softmax(-1, Kind::Float)?.f_reshape([-1, e])?;
        let chosen = Tensor::f_zeros_like(&logits)?
            .f_scatter_value(-1, &top_i, 1.0)?
            .f_reshape([-1, e])?;
        let f = chosen.f_mean_dim(0, false, Kind::Float)?;
        let p = probs.f_mean_dim(0, false, Kind::Float)?;
        ctx.add_aux_loss(
            "balance",
            f.f_mul(&p)?
                .f_sum(Kind::Float)?
                .f_mul_scalar(0.01 * e as f64)?,
        );
        Ok(xs.f_add(&out)?)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        let mut v: Vec<(&str, &dyn Module)> = vec![
            ("norm", self.norm.as_ref()),
            ("router", self.router.as_ref()),
        ];
        v.extend(
            self.names
                .iter()
                .map(String::as_str)
                .zip(self.experts.iter().map(|e| e.as_ref())),
        );
        v
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        let mut v: Vec<(&str, &mut Slot)> =
            vec![("norm", &mut self.norm), ("router", &mut self.router)];
        v.extend(
            self.names
                .iter()
                .map(String::as_str)
                .zip(self.experts.iter_mut()),
        );
        v
    }
}

/// Masked mean over tokens, then `Linear(d, CLASSES)`.
#[derive(Debug)]
pub struct MeanHead {
    pub linear: Slot,
}

impl MeanHead {
    pub fn new(d: i64) -> Self {
        Self {
            linear: Box::new(Linear::new(d, CLASSES, true, Device::Cpu).unwrap()),
        }
    }
}

impl Module for MeanHead {
    fn kind(&self) -> &'static str {
        "MeanHead"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let pooled = match &ctx.attention_mask {
            Some(m) => {
                let m = m.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
                xs.f_mul(&m)?
                    .f_sum_dim_intlist(1, false, Kind::Float)?
                    .f_div(
                        &m.f_sum_dim_intlist(1, false, Kind::Float)?
                            .f_clamp_min(1.0)?,
                    )?
            }
            None => xs.f_mean_dim(1, false, Kind::Float)?,
        };
        ctx.call("linear", self.linear.as_ref(), &pooled)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("linear", self.linear.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("linear", &mut self.linear)]
    }
}

fn embed(d: i64) -> Slot {
    Box::new(Embedding::new(VOCAB, d, Device::Cpu).unwrap())
}

/// A teacher of `depth` residual blocks of width `d`, seeded, on the test device.
pub fn teacher(depth: usize, d: i64, seed: u64) -> LayerStack {
    let mut t = with_seed(seed, || {
        let blocks = (0..depth)
            .map(|_| Box::new(ResBlock::new(d)) as Slot)
            .collect();
        LayerStack::new(embed(d), blocks, Box::new(MeanHead::new(d)), d).unwrap()
    });
    t.to_device(dev()).unwrap();
    t
}

/// Builder of meta module `i` of `m`: one block, embeddings first, head last
/// (on the CPU; [`meta`] moves the model, and replicas share its storage).
pub fn meta_builder(d: i64) -> Arc<m2mkd::ModuleBuilder> {
    Arc::new(move |i, m| {
        let e = (i == 0).then(|| embed(d));
        let h = (i + 1 == m).then(|| Box::new(MeanHead::new(d)) as Slot);
        Ok(Box::new(Stage::new(e, vec![Box::new(ResBlock::new(d))], h, d, i)?) as Slot)
    })
}

/// A frozen meta model of `m` modules, seeded, on the test device.
pub fn meta(m: usize, d: i64, seed: u64) -> MetaModel {
    let mut meta = with_seed(seed, || MetaModel::new(m, d, meta_builder(d)).unwrap());
    meta.model_mut().to_device(dev()).unwrap();
    meta.freeze();
    meta
}

/// A student of `m` modules of width `d`: `blocks` residual blocks each, or
/// MoE blocks; on the test device.
pub fn student(m: usize, d: i64, blocks: usize, moe: bool, seed: u64) -> ModularModel {
    let mut s = with_seed(seed, || {
        let stages = (0..m)
            .map(|i| {
                let e = (i == 0).then(|| embed(d));
                let h = (i + 1 == m).then(|| Box::new(MeanHead::new(d)) as Slot);
                let bs = (0..blocks)
                    .map(|_| {
                        if moe {
                            Box::new(MoeBlock::new(d, 4, 2)) as Slot
                        } else {
                            Box::new(ResBlock::new(d)) as Slot
                        }
                    })
                    .collect();
                Stage::new(e, bs, h, d, i * blocks).unwrap()
            })
            .collect();
        ModularModel::from_stages(stages).unwrap()
    });
    s.to_device(dev()).unwrap();
    s
}

/// A seeded batch on the CPU: ids in `1..VOCAB`, padding (id 0, mask 0) at
/// the end of some rows; label = (number of ids below VOCAB/3 among the
/// tokens) mod 3.
pub fn batch(step: u64) -> Batch {
    let ids =
        tensor_core::testing::randint_seeded(VOCAB - 1, &[BATCH, SEQ], 1000 + step, Device::Cpu)
            .unwrap()
            + 1;
    let lens = tensor_core::testing::randint_seeded(SEQ - 2, &[BATCH, 1], 5000 + step, Device::Cpu)
        .unwrap()
        + 3;
    let pos = Tensor::arange(SEQ, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = pos.lt_tensor(&lens).to_kind(Kind::Int64);
    let ids = ids * &mask;
    let small = ids
        .lt(VOCAB / 3)
        .logical_and(&mask.ne(0))
        .to_kind(Kind::Int64);
    let y = small
        .sum_dim_intlist(1, false, Kind::Int64)
        .remainder(CLASSES);
    Batch::new(ids, y).with_mask(mask)
}

/// [`batch`] on the test device.
pub fn device_batch(step: u64) -> Batch {
    let b = batch(step);
    let d = dev();
    let mask = b.mask.map(|m| m.to_device(d));
    Batch {
        input: b.input.to_device(d),
        targets: b.targets.to_device(d),
        mask,
    }
}

/// Every parameter, deep-copied, by name.
pub fn snapshot(m: &dyn Module) -> Vec<(String, Tensor)> {
    use tensor_core::ModuleExt;
    m.named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

/// Names of the parameters that differ (bitwise) between two snapshots of one model.
pub fn changed(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Vec<String> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            !ta.equal(tb)
        })
        .map(|((n, _), _)| n.clone())
        .collect()
}
