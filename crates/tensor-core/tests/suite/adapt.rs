//! The adapted-linear host with delta kinds defined here, outside the
//! crate: the trait is open, and the host's paths (fused low-rank, stages,
//! mixed batch, merge with undo) agree with the formulas of
//! `tensor_core::adapt`.

use proptest::prelude::*;
use tensor_core::adapt::peft::{
    self, LoraHeader, check_targets, group_keys, read_config, write_folder,
};
use tensor_core::adapt::{
    AdaptedLinear, DeltaInput, Folded, LinearDelta, LowRank, MergeOrder, MixedBatch, insert,
    unwrap_empty_hosts,
};
use tensor_core::contract::check_contract;
use tensor_core::io::SafetensorsFile;
use tensor_core::layers::Linear;
use tensor_core::module::{Context, Module, ModuleExt, Sequential};
use tensor_core::seed::randn_seeded;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::assert_close;

use super::scaled;

/// `c = s·x AᵀBᵀ`, seen by the host through its low-rank view.
#[derive(Debug)]
struct Lr {
    a: Tensor,
    b: Tensor,
    s: f64,
}

impl LinearDelta for Lr {
    fn kind(&self) -> &'static str {
        "test low-rank"
    }
    fn param_names(&self, name: &str) -> Vec<String> {
        vec![format!("lr_a.{name}"), format!("lr_b.{name}")]
    }
    fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.a, &self.b]
    }
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.a, &mut self.b]
    }
    fn low_rank(&self) -> Option<LowRank> {
        Some(LowRank {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            scale: self.s,
            dropout: 0.0,
        })
    }
}

/// `h ← h ⊙ v`, folded into the rows of `W` and `b`.
#[derive(Debug)]
struct OutScale {
    v: Tensor,
}

impl LinearDelta for OutScale {
    fn kind(&self) -> &'static str {
        "test scale"
    }
    fn param_names(&self, name: &str) -> Vec<String> {
        vec![format!("scale.{name}")]
    }
    fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.v]
    }
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.v]
    }
    fn output_scale(&self) -> Option<&Tensor> {
        Some(&self.v)
    }
    fn merge_order(&self) -> Option<MergeOrder> {
        Some(MergeOrder::Scale)
    }
    fn fold(&self, w: &Tensor, b: Option<&Tensor>) -> tensor_core::Result<Folded> {
        Ok(Folded {
            weight: w.f_mul(&self.v.f_unsqueeze(1)?)?,
            bias: b.map(|b| b.f_mul(&self.v)).transpose()?,
            undo: None,
        })
    }
    fn unfold(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        _undo: Option<&Tensor>,
    ) -> tensor_core::Result<(Tensor, Option<Tensor>)> {
        Ok((
            w.f_div(&self.v.f_unsqueeze(1)?)?,
            b.map(|b| b.f_div(&self.v)).transpose()?,
        ))
    }
}

/// `c = tanh(x Uᵀ) − tanh(h)`: reads both the input and the base output,
/// so it never folds.
#[derive(Debug)]
struct Act {
    u: Tensor,
}

impl LinearDelta for Act {
    fn kind(&self) -> &'static str {
        "test activation"
    }
    fn param_names(&self, name: &str) -> Vec<String> {
        vec![format!("act.{name}")]
    }
    fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.u]
    }
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.u]
    }
    fn additive(&self, io: &DeltaInput<'_>) -> tensor_core::Result<Option<Tensor>> {
        Ok(Some(
            io.x.f_linear::<&Tensor>(&self.u, None)?
                .f_tanh()?
                .f_sub(&io.h.f_tanh()?)?,
        ))
    }
    fn merge_order(&self) -> Option<MergeOrder> {
        None
    }
}

const IN: i64 = 6;
const OUT: i64 = 5;

fn rand(shape: &[i64], seed: u64) -> Tensor {
    randn_seeded(shape, seed, Device::Cpu).unwrap()
}

fn lr(r: i64, seed: u64, s: f64) -> Box<dyn LinearDelta> {
    Box::new(Lr {
        a: rand(&[r, IN], seed),
        b: rand(&[OUT, r], seed + 1),
        s,
    })
}

fn out_scale(seed: u64) -> Box<dyn LinearDelta> {
    Box::new(OutScale {
        v: rand(&[OUT], seed).f_mul_scalar(0.3).unwrap() + 1.0,
    })
}

fn act(seed: u64) -> Box<dyn LinearDelta> {
    Box::new(Act {
        u: rand(&[OUT, IN], seed),
    })
}

/// A model `{"proj": Linear(IN -> OUT)}` with seeded weights.
fn model() -> Sequential {
    let lin = Linear::from_weights(rand(&[OUT, IN], 1), Some(rand(&[OUT], 2))).unwrap();
    Sequential::new().push_named("proj", Box::new(lin))
}

fn host(m: &Sequential) -> &AdaptedLinear {
    m.get_as::<AdaptedLinear>("proj").unwrap()
}

fn host_mut(m: &mut Sequential) -> &mut AdaptedLinear {
    m.get_as_mut::<AdaptedLinear>("proj").unwrap()
}

fn run(m: &Sequential, x: &Tensor) -> Tensor {
    m.forward(x, &mut Context::eval()).unwrap()
}

fn base(m: &Sequential, x: &Tensor) -> Tensor {
    let l = host(m).linear();
    x.linear(&l.weight, l.bias.as_ref())
}

fn lr_change(d: &dyn LinearDelta, x: &Tensor) -> Tensor {
    let l = d.low_rank().unwrap();
    x.linear::<&Tensor>(&l.a, None)
        .linear::<&Tensor>(&l.b, None)
        * l.scale
}

#[test]
fn fused_low_rank_path_is_the_sum_of_the_changes() {
    let mut m = model();
    insert(&mut m, "proj", "a", lr(2, 10, 0.5)).unwrap();
    insert(&mut m, "proj", "b", lr(3, 20, 2.0)).unwrap();
    host_mut(&mut m).activate("b");
    let x = rand(&[4, 3, IN], 3);
    let h = host(&m);
    let want =
        base(&m, &x) + lr_change(h.get("a").unwrap(), &x) + lr_change(h.get("b").unwrap(), &x);
    let (atol, rtol) = scaled(1e-5, 1e-5);
    assert_close(&run(&m, &x), &want, atol, rtol);
    // Only the first added is active by default (PEFT's rule).
    host_mut(&mut m).set_active(&["a".into()]);
    let want = base(&m, &x) + lr_change(host(&m).get("a").unwrap(), &x);
    assert_close(&run(&m, &x), &want, atol, rtol);
}

#[test]
fn stages_scale_then_add_and_names_keep_the_contract() {
    let mut m = model();
    insert(&mut m, "proj", "s", out_scale(30)).unwrap();
    insert(&mut m, "proj", "l", lr(2, 40, 1.5)).unwrap();
    insert(&mut m, "proj", "t", act(50)).unwrap();
    host_mut(&mut m).set_active(&["s".into(), "l".into(), "t".into()]);
    let x = rand(&[2, 4, IN], 4);
    let h = host(&m);
    let v = h.get_as::<OutScale>("s").unwrap().v.shallow_clone();
    let hb = base(&m, &x) * &v;
    let u = &h.get_as::<Act>("t").unwrap().u;
    let want =
        &hb + lr_change(h.get("l").unwrap(), &x) + x.linear::<&Tensor>(u, None).tanh() - hb.tanh();
    let (atol, rtol) = scaled(1e-5, 1e-5);
    assert_close(&run(&m, &x), &want, atol, rtol);
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "proj.scale.s",
            "proj.lr_a.l",
            "proj.lr_b.l",
            "proj.act.t",
            "proj.weight",
            "proj.bias"
        ]
    );
    check_contract(&mut m).unwrap();
}

#[test]
fn merge_reproduces_the_forward_and_unmerge_restores_the_weights() {
    let mut m = model();
    insert(&mut m, "proj", "l", lr(2, 60, 0.7)).unwrap();
    insert(&mut m, "proj", "s", out_scale(70)).unwrap();
    insert(&mut m, "proj", "t", act(80)).unwrap();
    let all: Vec<String> = ["l", "s"].map(String::from).to_vec();
    host_mut(&mut m).set_active(&all);
    let x = rand(&[3, IN], 5);
    let unmerged = run(&m, &x);
    let (w0, b0) = {
        let l = host(&m).linear();
        (l.weight.copy(), l.bias.as_ref().unwrap().copy())
    };
    // The data-dependent delta is refused and nothing is written.
    let e = host_mut(&mut m)
        .merge("proj", &["l".into(), "t".into()], true)
        .unwrap_err();
    assert!(matches!(e, tensor_core::Error::AdapterState(_)), "{e}");
    assert!(e.to_string().contains("'t'"), "{e}");
    assert_close(&host(&m).linear().weight, &w0, 0.0, 0.0);
    // The scale folds first whatever the order asked, so the merged layer
    // computes what the unmerged one did.
    assert_eq!(host_mut(&mut m).merge("proj", &all, true).unwrap(), 2);
    assert_eq!(host(&m).merged(), ["s", "l"]);
    let (atol, rtol) = scaled(1e-5, 1e-5);
    assert_close(&run(&m, &x), &unmerged, atol, rtol);
    // A scale after an additive fold would not reproduce the forward.
    insert(&mut m, "proj", "s2", out_scale(90)).unwrap();
    let e = host_mut(&mut m)
        .merge("proj", &["s2".into()], false)
        .unwrap_err();
    assert!(e.to_string().contains("unmerge first"), "{e}");
    // Merged deltas cannot be disabled or removed; unmerging pops both.
    assert!(host_mut(&mut m).set_enabled(false).is_err());
    assert!(host_mut(&mut m).remove("l").is_err());
    assert_eq!(host_mut(&mut m).unmerge_all("proj").unwrap(), 2);
    assert_close(&host(&m).linear().weight, &w0, 1e-6, 1e-6);
    assert_close(host(&m).linear().bias.as_ref().unwrap(), &b0, 1e-6, 1e-6);
}

#[test]
fn emptied_hosts_give_the_linear_back() {
    let mut m = model();
    let before: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    insert(&mut m, "proj", "a", lr(2, 100, 1.0)).unwrap();
    assert!(insert(&mut m, "proj", "a", lr(2, 101, 1.0)).is_err());
    assert!(host_mut(&mut m).remove("a").unwrap().is_some());
    assert_eq!(unwrap_empty_hosts(&mut m).unwrap(), 1);
    assert!(m.get_as::<Linear>("proj").is_ok());
    let after: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(before, after);
}

/// One sample's expected output: its own adapter alone, or the base.
fn single(m: &mut Sequential, name: &str, x: &Tensor) -> Tensor {
    if name == tensor_core::adapt::BASE {
        return base(m, x);
    }
    host_mut(m).set_active(&[name.to_owned()]);
    run(m, x)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Each sample of a mixed batch gets exactly what a batch of its own
    /// adapter would, whatever the kinds and ranks the layer holds.
    #[test]
    fn mixed_batch_rows_equal_their_own_adapter(
        picks in proptest::collection::vec(0usize..5, 1..7),
        seq in 1i64..4,
        seed in 0u64..1000,
    ) {
        let mut m = model();
        insert(&mut m, "proj", "a", lr(1, seed + 1, 0.5)).unwrap();
        insert(&mut m, "proj", "b", lr(3, seed + 2, 2.0)).unwrap();
        insert(&mut m, "proj", "s", out_scale(seed + 3)).unwrap();
        insert(&mut m, "proj", "t", act(seed + 4)).unwrap();
        let table = ["a", "b", "s", "t", tensor_core::adapt::BASE];
        let names: Vec<&str> = picks.iter().map(|&i| table[i]).collect();
        let x = rand(&[names.len() as i64, seq, IN], seed + 5);
        let mut ctx = Context::eval();
        ctx.insert(MixedBatch::new(&names, Device::Cpu).unwrap());
        let got = m.forward(&x, &mut ctx).unwrap();
        let (atol, rtol) = scaled(1e-5, 1e-5);
        for (i, n) in names.iter().enumerate() {
            let xi = x.narrow(0, i as i64, 1);
            let want = single(&mut m, n, &xi);
            assert_close(&got.narrow(0, i as i64, 1), &want, atol, rtol);
        }
    }
}

#[test]
fn lora_config_round_trips_ranks_and_scales() {
    let layers = vec![
        ("m.0.q".to_owned(), 4, 2.0),
        ("m.0.v".to_owned(), 4, 2.0),
        ("m.1.q".to_owned(), 2, 2.0),
        ("m.1.v".to_owned(), 4, 0.25),
    ];
    let cfg = peft::lora_config(&layers);
    let h = LoraHeader::read(std::path::Path::new("cfg"), &cfg).unwrap();
    for (p, r, s) in &layers {
        let (rank, alpha) = h.rank_alpha(p);
        assert_eq!(rank, *r, "{p}");
        assert!((h.scale(rank, alpha) - s).abs() < 1e-12, "{p}");
    }
    // What is not supported is refused by name.
    let mut dora = cfg.clone();
    dora["use_dora"] = true.into();
    let e = LoraHeader::read(std::path::Path::new("cfg"), &dora).unwrap_err();
    assert!(e.to_string().contains("DoRA"), "{e}");
    let mut ia3 = cfg;
    ia3["peft_type"] = "IA3".into();
    assert!(LoraHeader::read(std::path::Path::new("cfg"), &ia3).is_err());
}

#[test]
fn folders_are_written_whole_and_checked_against_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let layers = vec![("proj".to_owned(), 2, 1.0)];
    let tensors = vec![
        (
            format!("{}proj.lora_A.weight", peft::PREFIX),
            Tensor::zeros([2, IN], (Kind::Float, Device::Cpu)),
        ),
        (
            format!("{}proj.lora_B.weight", peft::PREFIX),
            Tensor::zeros([OUT, 2], (Kind::Float, Device::Cpu)),
        ),
    ];
    write_folder(dir.path(), &peft::lora_config(&layers), &tensors).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [peft::CONFIG_FILE, peft::WEIGHTS_FILE]);
    let (cpath, cfg) = read_config(dir.path()).unwrap();
    let wpath = dir.path().join(peft::WEIGHTS_FILE);
    let file = SafetensorsFile::open(&wpath).unwrap();
    let (by_module, extra) = group_keys(
        &wpath,
        &file,
        &[".lora_A.weight", ".lora_B.weight"],
        "LoRA",
        |_| false,
    )
    .unwrap();
    assert!(extra.is_empty());
    assert_eq!(by_module["proj"].len(), 2);
    let targets = peft::str_list(&cpath, &cfg, "target_modules").unwrap();
    check_targets(&cpath, &targets, by_module.keys(), &["proj".to_owned()]).unwrap();
    // A target the file has no tensors for, and one that names nothing.
    let e = check_targets(
        &cpath,
        &targets,
        by_module.keys(),
        &["proj".to_owned(), "x.proj".to_owned()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("x.proj"), "{e}");
    let e = check_targets(
        &cpath,
        &["nope".to_owned()],
        by_module.keys(),
        &["proj".to_owned()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("'proj'"), "{e}");
    // A string where a list belongs is a regular expression: refused by name.
    let bad = serde_json::json!({"target_modules": ".*q"});
    let e = peft::str_list(&cpath, &bad, "target_modules").unwrap_err();
    assert!(e.to_string().contains("regular expression"), "{e}");
}
