//! Every method crate on a Llama-family decoder (model-zoo's tiny Llama
//! fixture): EMoE splits its gated FFNs, the bricks profiler reads them,
//! orthogonal adapters merge on its projections. LoRA with PEFT parity is
//! pet-core's `tests/decoder.rs`.

use std::path::PathBuf;

use configurable_bricks::{ProfileConfig, Profiler};
use emergent_split::EmoeConfig;
use emergent_split::convert::{convert, emoe_paths, fold_back};
use model_zoo::llama::LlamaForCausalLM;
use orthogonal_merge::{AdapterConfig, BasisKind, FrozenSide, Registry};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{self, Device, Tensor};
use tensor_core::testing::assert_close;

fn fixture_of(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model-zoo/tests/fixtures")
        .join(name)
}

fn fixture() -> PathBuf {
    fixture_of("tiny-llama")
}

fn load() -> LlamaForCausalLM {
    LlamaForCausalLM::from_folder(fixture(), Device::Cpu).unwrap()
}

/// Mistral's tiny fixture: a gated FFN without biases, as real Llama-family checkpoints have.
fn load_mistral() -> LlamaForCausalLM {
    LlamaForCausalLM::from_folder(fixture_of("tiny-mistral"), Device::Cpu).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let e: std::collections::HashMap<String, Tensor> =
        tensor_core::io::load(fixture().join("expected.safetensors"), Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    (
        e["input_ids"].shallow_clone(),
        e["attention_mask"].shallow_clone(),
    )
}

fn logits(m: &LlamaForCausalLM) -> Tensor {
    let (ids, mask) = batch();
    let l = tch::no_grad(|| m.logits(&ids, Some(&mask))).unwrap();
    l.masked_select(&mask.ne(0).unsqueeze(-1))
}

/// EMoE on the gated FFNs `model.layers.N.mlp`, clustering the gate rows
/// `W_G` as the reference's Llama code does: with every expert selected the
/// split computes the dense model; with fewer it changes it; folding back
/// restores it. A gate projection with a bias (the Llama fixture's
/// `mlp_bias`) is refused by name.
#[test]
fn emoe_splits_gated_ffns_exactly() {
    let e = convert(&mut load(), &[0], &EmoeConfig::new(4, 4)).unwrap_err();
    assert!(e.to_string().contains("gate projection"), "{e}");
    let load = load_mistral;
    let dense = logits(&load());
    let mut m = load();
    let r = convert(&mut m, &[0, 1], &EmoeConfig::new(4, 4)).unwrap();
    assert_eq!(r.layers.len(), 2);
    assert_eq!(emoe_paths(&m), ["model.layers.0.mlp", "model.layers.1.mlp"]);
    assert!(
        r.layers
            .iter()
            .all(|l| l.d_ff == 48 && l.objective <= l.random_objective)
    );
    assert_close(&logits(&m), &dense, 1e-5, 1e-5);
    let mut sparse = load();
    convert(&mut sparse, &[0, 1], &EmoeConfig::new(4, 1)).unwrap();
    assert!((logits(&sparse) - &dense).abs().max().double_value(&[]) > 1e-3);
    fold_back(&mut m).unwrap();
    assert!(emoe_paths(&m).is_empty());
    assert_close(&logits(&m), &dense, 1e-5, 1e-5);
}

/// The bricks profiler finds both decoder FFNs and averages their hidden
/// activations `silu(x W_Gᵀ) ⊙ x W_Uᵀ` over each sample's tokens.
#[test]
fn bricks_profile_decoder_ffns() {
    let m = load();
    let p = Profiler::new(&m, ProfileConfig::default()).unwrap();
    let paths: Vec<&str> = p.sites.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["model.layers.0.mlp", "model.layers.1.mlp"]);
    let (ids, mask) = batch();
    let prof = p.profile_batch(&m, &ids, &mask, None).unwrap();
    assert_eq!(prof.size(), [3, 96]);
    assert_eq!(prof.isfinite().all().int64_value(&[]), 1);
    // Profiling twice gives the same values; padding does not count.
    assert!(prof.equal(&p.profile_batch(&m, &ids, &mask, None).unwrap()));
}

/// Orthogonal adapters on q_proj/v_proj of the decoder: both active equal
/// W0 + ΔW_a + ΔW_b, folding them in gives the same logits, and the two
/// deltas are orthogonal.
#[test]
fn orthogonal_adapters_merge_on_a_decoder() {
    let mut m = load();
    let targets = ["q_proj", "v_proj"];
    let mut reg =
        Registry::for_model(&m, &targets, BasisKind::QrBins, 11, 2, FrozenSide::Input).unwrap();
    for c in ["a", "b"] {
        reg.claim(c).unwrap();
        orthogonal_merge::add_orthogonal(&mut m, c, &reg, &AdapterConfig::new(&targets)).unwrap();
    }
    let mut seed = 0;
    tch::no_grad(|| {
        m.for_each_param_mut(&mut |n, t| {
            if n.contains(".lora_B.") {
                seed += 1;
                t.copy_(
                    &(tensor_core::seed::randn_seeded(&t.size(), seed, Device::Cpu).unwrap() * 0.2),
                );
            }
            Ok(())
        })
        .unwrap()
    });
    let both = logits(&m);
    assert!((&both - logits(&load())).abs().max().double_value(&[]) > 1e-3);
    let tasks = [
        orthogonal_merge::task_delta(&m, "a").unwrap(),
        orthogonal_merge::task_delta(&m, "b").unwrap(),
    ];
    let report = orthogonal_merge::interference(&tasks).unwrap();
    for l in &report.layers {
        for p in &l.pairs {
            assert!(p.cosine.abs() < 1e-5, "{}: {}", l.layer, p.cosine);
        }
    }
    assert_eq!(orthogonal_merge::merge_and_unload(&mut m).unwrap(), 4);
    assert_close(&logits(&m), &both, 1e-5, 1e-5);
}

/// The taken-over `MoeLayer` at `p` (inside a `SharedExpertMoe` for Qwen-MoE).
fn layer_of<'a>(m: &'a mut LlamaForCausalLM, p: &str) -> &'a mut moe_router::MoeLayer {
    if m.get_as::<moe_router::SharedExpertMoe>(p).is_ok() {
        let s = m.get_as_mut::<moe_router::SharedExpertMoe>(p).unwrap();
        return tensor_core::module::downcast_mut(s.moe.as_mut()).unwrap();
    }
    m.get_as_mut::<moe_router::MoeLayer>(p).unwrap()
}

/// moe-router takes over Mixtral's and Qwen-MoE's sparse blocks as its
/// MoeLayer with the router and the experts keeping their values: the
/// logits do not change, and the layer's losses and capacity then apply.
#[test]
fn moe_router_takes_over_pretrained_moe_blocks() {
    for (name, blocks) in [("tiny-mixtral", 2), ("tiny-qwen2moe", 1)] {
        let load = || LlamaForCausalLM::from_folder(fixture_of(name), Device::Cpu).unwrap();
        let before = logits(&load());
        let mut m = load();
        let paths = moe_router::take_over_sparse_blocks(&mut m).unwrap();
        assert_eq!(paths.len(), blocks, "{name}");
        assert_close(&logits(&m), &before, 1e-5, 1e-5);
        // Training adds the layer's auxiliary losses under its path.
        let (ids, mask) = batch();
        let mut ctx = tensor_core::Context::train().with_mask(mask);
        let _ = tch::no_grad(|| ctx.call("", &m, &ids)).unwrap();
        assert!(
            ctx.aux_losses()
                .iter()
                .any(|(n, _)| n.starts_with(&paths[0])),
            "{name}: {:?}",
            ctx.aux_losses().iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        // Growing masked experts, then pruning the unused ones, keeps the logits.
        let p = paths[0].clone();
        moe_router::grow_experts(layer_of(&mut m, &p), 2, false, true).unwrap();
        assert_eq!(layer_of(&mut m, &p).experts.w1.size()[0], 6);
        assert_close(&logits(&m), &before, 1e-5, 1e-5);
        let usage = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0, 0.0, 0.0]);
        let kept = moe_router::prune_experts(layer_of(&mut m, &p), &usage, 0.5).unwrap();
        assert_eq!(kept, [0, 1, 2, 3]);
        assert_close(&logits(&m), &before, 1e-5, 1e-5);
        // A tight capacity drops assignments and changes the output.
        let layer = layer_of(&mut m, &p);
        for r in [&mut layer.config.router, &mut layer.router.config] {
            r.capacity_factor = 0.25;
            r.eval_capacity_factor = Some(0.25);
            r.min_capacity = 1;
        }
        assert!(
            (logits(&m) - &before).abs().max().double_value(&[]) > 1e-4,
            "{name}"
        );
    }
}

/// m2mKD with a decoder teacher: the tiny Llama taken apart into stages
/// and split into two modules computes the teacher's logits module by
/// module, and a fresh decoder layer can stand in for a module's block.
#[test]
fn m2mkd_splits_a_decoder_teacher_into_modules() {
    let teacher = load();
    let want = logits(&teacher);
    let (embed, blocks, head, width) = teacher.into_stages().unwrap();
    let stack = m2mkd::stage::LayerStack::new(embed, blocks, head, width).unwrap();
    let modular =
        m2mkd::split::split_into_modular(stack, &m2mkd::split::Boundaries::even(2, 2).unwrap())
            .unwrap();
    assert_eq!(modular.len(), 2);
    let (ids, mask) = batch();
    let mut ctx = tensor_core::Context::eval().with_mask(mask.shallow_clone());
    let out = tch::no_grad(|| modular.forward_range(&ids, 0, 2, &mut ctx)).unwrap();
    assert_close(
        &out.masked_select(&mask.ne(0).unsqueeze(-1)),
        &want,
        1e-5,
        1e-5,
    );
    // Module 0's output feeds module 1 in the same context (its RoPE tables and mask travel with it).
    let mut ctx = tensor_core::Context::eval().with_mask(mask.shallow_clone());
    let h = tch::no_grad(|| modular.forward_range(&ids, 0, 1, &mut ctx)).unwrap();
    assert_eq!(h.size(), [3, 9, width]);
    let out2 = tch::no_grad(|| modular.forward_range(&h, 1, 2, &mut ctx)).unwrap();
    assert!(out2.equal(&out));
}
