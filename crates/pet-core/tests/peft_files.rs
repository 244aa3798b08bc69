//! Interoperability with Python PEFT 0.21.2: adapters it wrote load here and
//! give its outputs; adapters written here round-trip bitwise and (when the
//! cache venv has PEFT) load in PEFT with the same outputs.

mod common;

use common::{Inputs, base_model, fixture_dir, max_abs, run, run_mixed, scaled};
use pet_core::{
    Error, LohaConfig, LoraConfig, LoraInit, add_ia3, add_loha, add_lora, load_adapter,
    merge_adapter, save_adapter, set_adapter, unmerge_adapter,
};
use tensor_core::ModuleExt;
use tensor_core::tch::Tensor;

/// Against PEFT's outputs, on the CPU (scaled on CUDA by `scaled`).
const TOL: f64 = 1e-5;

#[test]
fn peft_lora_ia3_and_rslora_files_give_peft_outputs() {
    let tol = scaled(TOL);
    let inp = Inputs::load();
    let mut m = base_model();
    let base = run(&m, &inp.ids, &inp.mask);
    assert!(max_abs(&base, &inp.expected("base")) < tol);
    for name in ["lora", "lora_rs", "ia3"] {
        let r = load_adapter(&mut m, name, fixture_dir().join(name)).unwrap();
        assert!(!r.paths.is_empty());
        set_adapter(&mut m, &[name]).unwrap();
        let err = max_abs(&run(&m, &inp.ids, &inp.mask), &inp.expected(name));
        assert!(err < tol, "{name}: max |err| vs PEFT = {err:e}");
    }
    // rank_pattern / alpha_pattern: layer 1 value has rank 2 and s = 3/sqrt(2).
    let h = m
        .get_as::<pet_core::AdaptedLinear>("encoder.layer.1.attention.self.value")
        .unwrap();
    let l = h.get_as::<pet_core::Lora>("lora_rs").expect("a LoRA delta");
    assert_eq!(l.rank(), 2);
    assert!((l.scale - 3.0 / 2f64.sqrt()).abs() < 1e-12);
    // Merged LoRA equals PEFT's merge_and_unload output.
    set_adapter(&mut m, &["lora"]).unwrap();
    merge_adapter(&mut m, &["lora"], true).unwrap();
    let err = max_abs(&run(&m, &inp.ids, &inp.mask), &inp.expected("lora_merged"));
    assert!(err < tol, "merged: {err:e}");
}

/// LoHa, the adapter kind added to pet-core alone: PEFT's files give PEFT's
/// outputs unmerged, merged and in a mixed batch.
#[test]
fn peft_loha_files_give_peft_outputs() {
    let tol = scaled(TOL);
    let inp = Inputs::load();
    let mut m = base_model();
    let r = load_adapter(&mut m, "loha", fixture_dir().join("loha")).unwrap();
    assert_eq!(r.paths.len(), 6);
    // rank_pattern / alpha_pattern: layer 1 value has rank 2 and s = 3/2.
    let h = m
        .get_as::<pet_core::AdaptedLinear>("encoder.layer.1.attention.self.value")
        .unwrap();
    let l = h.get_as::<pet_core::Loha>("loha").expect("a LoHa delta");
    assert_eq!(l.rank(), 2);
    assert!((l.scale - 1.5).abs() < 1e-12);
    let err = max_abs(&run(&m, &inp.ids, &inp.mask), &inp.expected("loha"));
    eprintln!("loha: max |err| vs PEFT = {err:e}");
    assert!(err < tol, "loha: max |err| vs PEFT = {err:e}");
    let out = run_mixed(&m, &inp.ids, &inp.mask, &["loha", "__base__"]);
    let (want, base) = (inp.expected("loha"), inp.expected("base"));
    assert!(max_abs(&out.get(0), &want.get(0)) < tol);
    assert!(max_abs(&out.get(1), &base.get(1)) < tol);
    merge_adapter(&mut m, &["loha"], true).unwrap();
    let err = max_abs(&run(&m, &inp.ids, &inp.mask), &inp.expected("loha_merged"));
    eprintln!("loha merged: max |err| vs PEFT = {err:e}");
    assert!(err < tol, "loha merged: {err:e}");
    unmerge_adapter(&mut m).unwrap();
    let err = max_abs(&run(&m, &inp.ids, &inp.mask), &inp.expected("loha"));
    assert!(err < tol, "loha unmerged again: {err:e}");
}

/// A fresh LoHa adapter changes nothing (W2b = 0) and still trains: its
/// gradient reaches W2b through the nonzero W2a.
#[test]
fn fresh_loha_is_the_base_model_and_trains() {
    let inp = Inputs::load();
    let mut m = base_model();
    let base = run(&m, &inp.ids, &inp.mask);
    let r = add_loha(&mut m, "h", &LohaConfig::new(4, 8.0, &["query", "value"])).unwrap();
    assert_eq!(r.paths.len(), 4);
    // 2·r·(out + in) per 32x32 layer.
    assert_eq!(r.params, 4 * 2 * 4 * (32 + 32));
    assert!(run(&m, &inp.ids, &inp.mask).equal(&base));
    pet_core::mark_only_adapters_trainable(&mut m, &[], &[]);
    let loss = run(&m, &inp.ids, &inp.mask).square().sum(None);
    loss.backward();
    for (n, t) in m.named_parameters() {
        if n.contains("hada_w2_b") {
            assert!(t.grad().abs().sum(None).double_value(&[]) > 0.0, "{n}");
        }
    }
}

#[test]
fn peft_mixed_batch_rows_match() {
    let inp = Inputs::load();
    let mut m = base_model();
    load_adapter(&mut m, "lora", fixture_dir().join("lora")).unwrap();
    load_adapter(&mut m, "lora_rs", fixture_dir().join("lora_rs")).unwrap();
    let out = run_mixed(&m, &inp.ids, &inp.mask, &["lora", "__base__"]);
    let err = max_abs(&out, &inp.expected("lora_mixed"));
    assert!(err < scaled(TOL), "mixed: {err:e}");
}

fn tensors_of(m: &dyn tensor_core::Module, adapter: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = m
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n.contains(&format!(".{adapter}.")) || n.ends_with(&format!(".{adapter}")))
        .map(|(n, t)| (n.replace(&format!(".{adapter}"), ".X"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn save_then_load_round_trips_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = base_model();
    let mut cfg = LoraConfig::new(4, 8.0, &["query", "value", "intermediate.dense"]);
    cfg.init = LoraInit::Random;
    cfg.rank_pattern
        .insert("layer.1.attention.self.value".into(), 2);
    cfg.alpha_pattern
        .insert("layer.0.attention.self.query".into(), 5.0);
    cfg.scaling = pet_core::LoraScaling::Rslora;
    add_lora(&mut m, "mine", &cfg).unwrap();
    add_ia3(
        &mut m,
        "scales",
        &pet_core::Ia3Config {
            target_modules: vec!["key".into(), "layer.0.output.dense".into()],
            feedforward_modules: vec!["layer.0.output.dense".into()],
        },
    )
    .unwrap();
    // Non-trivial IA3 values.
    m.for_each_param_mut(&mut |n, t| {
        if n.contains("ia3_l") {
            tensor_core::tch::no_grad(|| t.copy_(&(t.rand_like() + 0.5)));
        }
        Ok(())
    })
    .unwrap();
    let mut loha = LohaConfig::new(3, 5.0, &["key", "layer.1.output.dense"]);
    loha.rank_pattern.insert("layer.1.output.dense".into(), 2);
    add_loha(&mut m, "hada", &loha).unwrap();
    // Non-trivial IA3 values and LoHa factors.
    m.for_each_param_mut(&mut |n, t| {
        if n.contains("hada_w2_b") {
            tensor_core::tch::no_grad(|| t.copy_(&(t.rand_like() - 0.5)));
        }
        Ok(())
    })
    .unwrap();
    for name in ["mine", "scales", "hada"] {
        let out = dir.path().join(name);
        save_adapter(&m, name, &out).unwrap();
        let mut fresh = base_model();
        load_adapter(&mut fresh, name, &out).unwrap();
        let (a, b) = (tensors_of(&m, name), tensors_of(&fresh, name));
        assert_eq!(a.len(), b.len(), "{name}");
        // Bitwise on any device: the file round trip, then the same kernels.
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{name}: {na} differs after the round trip");
        }
        let inp = Inputs::load();
        set_adapter(&mut m, &[name]).unwrap();
        let (x, y) = (
            run(&m, &inp.ids, &inp.mask),
            run(&fresh, &inp.ids, &inp.mask),
        );
        assert!(x.equal(&y), "{name}: outputs differ after the round trip");
        peft_check(&out, &inp, &x);
    }
}

/// When the cache venv's Python has PEFT, load the folder in PEFT and compare.
fn peft_check(dir: &std::path::Path, inp: &Inputs, expected: &Tensor) {
    let Ok(venv) = std::env::var("MODULAR_VENV") else {
        eprintln!("PEFT check skipped: MODULAR_VENV not set");
        return;
    };
    let py = std::path::Path::new(&venv).join("bin/python");
    let has_peft = std::process::Command::new(&py)
        .args(["-c", "import peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_peft {
        eprintln!("PEFT check skipped: PEFT is not installed in {venv}");
        return;
    }
    tensor_core::io::save(
        dir.join("expected.safetensors"),
        &[
            ("input_ids", &inp.ids),
            ("attention_mask", &inp.mask),
            ("last_hidden_state", expected),
        ],
        None,
    )
    .unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peft_fixture.py");
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg("--check")
        .arg(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "PEFT rejected {}: {text}",
        dir.display()
    );
    eprintln!("PEFT check {}: {}", dir.display(), text.trim());
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture_dir().join(name).join(f), d.path().join(f)).unwrap();
    }
    d
}

#[test]
fn malformed_files_are_clear_errors_and_leave_the_model_alone() {
    let mut m = base_model();
    let before = m.named_parameters().len();
    // Corrupt JSON.
    let d = copy_fixture("lora");
    std::fs::write(d.path().join("adapter_config.json"), "{ not json").unwrap();
    let e = load_adapter(&mut m, "x", d.path()).unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
    // Rank in the config disagrees with the tensors.
    let d = copy_fixture("lora");
    let p = d.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"r\": 4", "\"r\": 3");
    std::fs::write(&p, text).unwrap();
    let e = load_adapter(&mut m, "x", d.path()).unwrap_err();
    assert!(e.to_string().contains("rank 3"), "{e}");
    // Truncated safetensors.
    let d = copy_fixture("lora");
    let w = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_adapter(&mut m, "x", d.path()).is_err());
    // Unsupported options.
    let d = copy_fixture("lora");
    let p = d.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "\"modules_to_save\": null",
        "\"modules_to_save\": [\"classifier\"]",
    );
    std::fs::write(&p, text).unwrap();
    let e = load_adapter(&mut m, "x", d.path()).unwrap_err();
    assert!(e.to_string().contains("modules_to_save"), "{e}");
    // target_modules must agree with the tensors and with the model (PEFT's
    // contract): an entry that matches nothing, or a target with no tensors.
    for (targets, needle) in [
        (
            "[\"query\", \"value\", \"nonexistent\"]",
            "match no Linear module",
        ),
        ("[\"query\", \"value\", \"key\"]", "has no tensors for it"),
        (
            "[\"query\"]",
            "which target_modules [\"query\"] does not name",
        ),
        ("[]", "missing or empty"),
    ] {
        let d = copy_fixture("lora");
        let p = d.path().join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg["target_modules"] = serde_json::from_str(targets).unwrap();
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = load_adapter(&mut m, "x", d.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(needle),
            "{targets}: {e}"
        );
    }
    // A NaN or Inf in either factor, or an integer factor, is refused
    // naming the file and the tensor.
    for (suffix, poison) in [
        ("lora_A.weight", Some(f64::NAN)),
        ("lora_B.weight", Some(f64::INFINITY)),
        ("lora_A.weight", None),
    ] {
        let d = copy_fixture("lora");
        let w = d.path().join("adapter_model.safetensors");
        let mut tensors = tensor_core::io::load(&w, tensor_core::tch::Device::Cpu).unwrap();
        let (key, t) = tensors
            .iter_mut()
            .find(|(k, _)| k.ends_with(suffix))
            .unwrap();
        let key = key.clone();
        *t = match poison {
            Some(v) => t.index_fill(0, &tensor_core::tch::Tensor::from_slice(&[0i64]), v),
            None => t.to_kind(tensor_core::tch::Kind::Int),
        };
        let refs: Vec<(&str, &tensor_core::tch::Tensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tensor_core::io::save(&w, &refs, None).unwrap();
        let e = load_adapter(&mut m, "x", d.path()).unwrap_err().to_string();
        let why = if poison.is_some() {
            "non-finite"
        } else {
            "stored as Int"
        };
        assert!(
            e.contains("adapter_model.safetensors") && e.contains(&key) && e.contains(why),
            "{e}"
        );
    }
    // A model without the named modules (refused before any compute).
    let mut other = tensor_core::module::Sequential::new().push_named(
        "proj",
        Box::new(
            tensor_core::layers::Linear::new(32, 32, true, tensor_core::tch::Device::Cpu).unwrap(),
        ),
    );
    let e = load_adapter(&mut other, "x", fixture_dir().join("lora")).unwrap_err();
    assert!(
        e.to_string().contains("encoder.layer.0.attention.self"),
        "{e}"
    );
    // Nothing was added by any failed load.
    assert_eq!(m.named_parameters().len(), before);
    assert!(pet_core::adapter_names(&m).is_empty());
    // Saving an unknown adapter names what exists.
    let e = save_adapter(&m, "nope", d.path()).unwrap_err();
    assert!(
        matches!(e, Error::Tensor(tensor_core::Error::UnknownAdapter { .. })),
        "{e}"
    );
}
