//! m2mkd (issue 8): distillation step throughput per module, sequential vs
//! parallel distillation of all modules, and the KD loss against PyTorch
//! (`reference/m2mkd.py`).
//!
//! - `distil_step_module{0,1,2}`: one [`m2mkd::distil_step`] of hybrid i —
//!   meta prefix and teacher module without a graph, student module inside
//!   the frozen meta suffix with one, backward, AdamW — for a MiniLM-shaped
//!   teacher (6 BERT layers of width 384, 12 heads, FFN 1536, vocabulary cut
//!   to 2048) split [2, 2, 2], a 3-layer meta model of the same width, and a
//!   student module of one BERT layer of width 192 (LayerNorm + Linear
//!   stitches), batch 16 × 32 tokens. No PyTorch pair.
//! - `distil_all_sequential` / `distil_all_parallel`: [`m2mkd::distil_all`]
//!   of the three modules for 2 steps each, one after the other or on three
//!   threads, with libtorch's intra-op pool at 1 thread (so parallelism comes
//!   from the jobs); `distil_all_sequential_intraop` lets libtorch use its
//!   default pool instead. Rebuilding the student and teacher is outside the timing.
//! - `kd_loss_b256c1000`: eq. 2 (α = 0.5, τ = 2, `sum_over_BC`) forward +
//!   backward w.r.t. the student logits, `[256, 1000]`, ours and PyTorch's.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use m2mkd::{
    Batch, Boundaries, DistilConfig, Hybrid, HybridOptions, KdConfig, LayerStack, LossRegistry,
    MetaModel, ModularModel, OptimConfig, Optimizer, Stage, distil_all, distil_step, m2mkd_loss,
    split_into_modular,
};
use model_zoo::bert::{BertEncoder, BertModel};
use model_zoo::config::BertConfig;
use tensor_core::layers::Linear;
use tensor_core::module::downcast_box;
use tensor_core::prelude::*;
use tensor_core::testing::{randint_seeded, randn_seeded, with_seed};

const VOCAB: i64 = 2048;
const B: i64 = 16;
const T: i64 = 32;

#[derive(Debug)]
struct MeanHead(Slot);

impl Module for MeanHead {
    fn kind(&self) -> &'static str {
        "MeanHead"
    }
    fn forward(&self, h: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let pooled = h.f_mean_dim(1, false, Kind::Float)?;
        ctx.call("linear", self.0.as_ref(), &pooled)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("linear", self.0.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("linear", &mut self.0)]
    }
}

fn config(d: i64, heads: i64, layers: i64) -> BertConfig {
    BertConfig {
        vocab_size: VOCAB,
        hidden_size: d,
        num_attention_heads: heads,
        intermediate_size: 4 * d,
        num_hidden_layers: layers,
        ..BertConfig::minilm_l6()
    }
}

fn parts(d: i64, heads: i64, layers: i64) -> (Slot, Vec<Slot>, Slot) {
    let bert = BertModel::new(config(d, heads, layers), false, Device::Cpu).unwrap();
    let enc = downcast_box::<BertEncoder>(bert.encoder).unwrap();
    let head = Box::new(MeanHead(Box::new(
        Linear::new(d, 2, true, Device::Cpu).unwrap(),
    )));
    (bert.embeddings, enc.layers, head)
}

fn teacher() -> ModularModel {
    with_seed(1, || {
        let (e, l, h) = parts(384, 12, 6);
        let stack = LayerStack::new(e, l, h, 384).unwrap();
        split_into_modular(stack, &Boundaries::new(vec![2, 2, 2])).unwrap()
    })
}

fn meta() -> MetaModel {
    let builder: Arc<m2mkd::ModuleBuilder> = Arc::new(|i, m| {
        let (e, mut l, h) = parts(384, 12, 1);
        let e = (i == 0).then_some(e);
        let h = (i + 1 == m).then_some(h);
        Ok(Box::new(Stage::new(e, vec![l.remove(0)], h, 384, i)?) as Slot)
    });
    let mut meta = with_seed(2, || MetaModel::new(3, 384, builder).unwrap());
    meta.freeze();
    meta
}

fn student() -> ModularModel {
    with_seed(3, || {
        let (e, layers, h) = parts(192, 4, 3);
        let (mut e, mut h) = (Some(e), Some(h));
        let stages = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let e = if i == 0 { e.take() } else { None };
                let hh = if i == 2 { h.take() } else { None };
                Stage::new(e, vec![l], hh, 192, i).unwrap()
            })
            .collect();
        ModularModel::from_stages(stages).unwrap()
    })
}

fn batch(step: u64) -> m2mkd::Result<Batch> {
    let ids = randint_seeded(VOCAB, &[B, T], 10 + step, Device::Cpu)?;
    let y = randint_seeded(2, &[B], 20 + step, Device::Cpu)?;
    Ok(Batch::new(ids, y).with_mask(Tensor::ones([B, T], (Kind::Int64, Device::Cpu))))
}

fn bench(c: &mut Criterion) {
    let default_threads = tch::get_num_threads();
    let meta = meta();
    let registry = LossRegistry::with_builtins(&KdConfig::default());
    let terms = DistilConfig::default().terms();
    let optim = OptimConfig::default();
    for i in 0..3 {
        let (mut t, tw) = teacher().into_modules();
        let (mut s, _) = student().into_modules();
        let h = Hybrid::new(
            meta.replica().unwrap(),
            i,
            Some((t.swap_remove(i), tw[i])),
            s.swap_remove(i),
            192,
            HybridOptions::default(),
            Device::Cpu,
        )
        .unwrap();
        let mut opt = Optimizer::new(h.trainable_parameters(), optim.clone(), 1_000_000).unwrap();
        let b = batch(0).unwrap();
        c.bench_function(&format!("m2mkd/distil_step_module{i}/rust"), |bn| {
            bn.iter(|| distil_step(&h, &mut opt, &b, &registry, &terms).unwrap())
        });
    }

    let mut g = c.benchmark_group("m2mkd");
    g.sample_size(10);
    for (name, parallel, threads) in [
        ("distil_all_sequential", false, 1),
        ("distil_all_parallel", true, 1),
        ("distil_all_sequential_intraop", false, default_threads),
    ] {
        let cfg = DistilConfig {
            steps: 2,
            parallel,
            ..DistilConfig::default()
        };
        g.bench_function(format!("{name}/rust"), |bn| {
            tch::set_num_threads(threads);
            bn.iter_batched(
                || (teacher(), student()),
                |(t, s)| distil_all(&meta, t, s, &batch, &cfg, &registry).unwrap(),
                BatchSize::PerIteration,
            );
            tch::set_num_threads(default_threads);
        });
    }
    g.finish();

    let zs = randn_seeded(&[256, 1000], 4, Device::Cpu)
        .unwrap()
        .set_requires_grad(true);
    let zt = randn_seeded(&[256, 1000], 5, Device::Cpu).unwrap();
    let y = randint_seeded(1000, &[256], 6, Device::Cpu).unwrap();
    let kd = KdConfig {
        tau: 2.0,
        ..KdConfig::default()
    };
    c.bench_function("m2mkd/kd_loss_b256c1000/rust", |bn| {
        bn.iter(|| {
            let l = m2mkd_loss(&zs, &zt, &y, &kd).unwrap().total;
            Tensor::run_backward(&[l], &[&zs], false, false)
        })
    });
}

criterion_group! {
    name = benches;
    config = modular_benches::criterion();
    targets = bench
}
criterion_main!(benches);
