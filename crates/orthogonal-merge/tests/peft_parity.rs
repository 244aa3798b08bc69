//! Parity with PEFT 0.21.2's merge utilities (`peft.utils.merge_utils`) and
//! `add_weighted_adapter`, on the committed fixtures made by
//! `scripts/peft_merge_fixture.py`: task arithmetic, magnitude pruning, TIES
//! (`total` / `frequency`), DARE linear / TIES on PEFT's own masks, the
//! masks themselves from the same seed, LoRA merges (cat, factor-wise
//! linear / TIES / magnitude pruning, SVD and `*_svd`), and reading a
//! PEFT-written adapter folder. Fixtures are read on the CPU; the merges
//! run on the test device.

mod common;

use std::path::PathBuf;

use common::scaled;
use orthogonal_merge::dare::{dare_linear, dare_masks, dare_ties};
use orthogonal_merge::ops::task_arithmetic;
use orthogonal_merge::prune::magnitude_prune;
use orthogonal_merge::ties::ties;
use orthogonal_merge::{
    Delta, LoraFactors, MergeConfig, MergedDelta, Method, SignMethod, TaskDelta, merge,
    read_adapter,
};
use tensor_core::io::SafetensorsFile;
use tensor_core::tch::{Device, Tensor};
use tensor_core::testing::{assert_close, device};

const W: [f64; 3] = [1.0, 0.5, -0.7];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fx(SafetensorsFile);

impl Fx {
    fn open() -> Self {
        Fx(SafetensorsFile::open(fixtures().join("peft_merge.safetensors")).unwrap())
    }
    /// A fixture tensor on the CPU (expected values).
    fn get(&self, n: &str) -> Tensor {
        self.0.load(n, Device::Cpu).unwrap()
    }
    /// A fixture tensor on the test device (inputs).
    fn input(&self, n: &str) -> Tensor {
        self.get(n).to_device(device())
    }
    fn tasks(&self) -> Vec<Tensor> {
        (0..3).map(|i| self.input(&format!("task_{i}"))).collect()
    }
}

fn sign(m: &str) -> SignMethod {
    if m == "total" {
        SignMethod::Total
    } else {
        SignMethod::Frequency
    }
}

#[test]
fn task_arithmetic_magnitude_prune_and_ties_equal_peft() {
    let fx = Fx::open();
    let ts = fx.tasks();
    let tol = scaled(1e-6);
    assert_close(
        &task_arithmetic(&ts, &W).unwrap(),
        &fx.get("task_arithmetic"),
        tol,
        tol,
    );
    assert_close(
        &magnitude_prune(&ts, &W, 0.3).unwrap(),
        &fx.get("magnitude_prune_0.3"),
        tol,
        tol,
    );
    for d in ["0.4", "1.0"] {
        for m in ["total", "frequency"] {
            let ours = ties(&ts, &W, d.parse().unwrap(), sign(m)).unwrap();
            assert_close(&ours, &fx.get(&format!("ties_{m}_{d}")), tol, tol);
        }
    }
}

#[test]
fn dare_equals_peft_on_its_masks_and_draws_the_same_masks() {
    let fx = Fx::open();
    let ts = fx.tasks();
    let masks: Vec<Tensor> = (0..3)
        .map(|i| fx.input(&format!("dare_mask_{i}")))
        .collect();
    let tol = scaled(1e-6);
    assert_close(
        &dare_linear(&ts, &W, 0.5, &masks).unwrap(),
        &fx.get("dare_linear_0.5"),
        tol,
        tol,
    );
    for m in ["total", "frequency"] {
        let ours = dare_ties(&ts, &W, 0.5, &masks, sign(m)).unwrap();
        assert_close(&ours, &fx.get(&format!("dare_ties_{m}_0.5")), tol, tol);
    }
    // Seeding libtorch's CPU generator as torch.manual_seed does gives PEFT's
    // masks (always drawn on the CPU, whatever the device of the tasks).
    for (seed, d, key) in [(1234, 0.5, "dare_mask"), (7, 0.3, "seed7_mask")] {
        let ours = dare_masks(&[6, 10], 3, d, seed).unwrap();
        for (i, m) in ours.iter().enumerate() {
            assert_close(m, &fx.get(&format!("{key}_{i}")), 0.0, 0.0);
        }
    }
}

#[test]
fn ties_test_vector_of_the_spec() {
    let fx = Fx::open();
    let tv = [
        Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.0]).to_device(device()),
        Tensor::from_slice(&[-3.0f32, 1.0, 0.5, 2.0]).to_device(device()),
    ];
    let cases = [
        (
            "tv_total_1.0",
            1.0,
            SignMethod::Total,
            [-3.0f32, -2.0, 0.5, 2.0],
        ),
        (
            "tv_frequency_1.0",
            1.0,
            SignMethod::Frequency,
            [1.0, 1.0, 0.5, 2.0],
        ),
        (
            "tv_total_0.5",
            0.5,
            SignMethod::Total,
            [-3.0, -2.0, 0.0, 2.0],
        ),
    ];
    // Exact on any device: sums and means of these values are exact in f32.
    for (key, d, m, want) in cases {
        let ours = ties(&tv, &[1.0, 1.0], d, m).unwrap();
        assert_close(&ours, &Tensor::from_slice(&want), 0.0, 0.0);
        assert_close(&ours, &fx.get(key), 0.0, 0.0);
    }
}

fn lora_tasks(fx: &Fx) -> Vec<TaskDelta> {
    [1.0, 2.0, 0.5]
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let f = LoraFactors::new(
                fx.input(&format!("lora_A_{i}")),
                fx.input(&format!("lora_B_{i}")),
                s,
            )
            .unwrap();
            TaskDelta::new(&format!("a{i}")).with("lin", Delta::Lora(f))
        })
        .collect()
}

#[test]
fn lora_merges_equal_add_weighted_adapter() {
    let fx = Fx::open();
    let tasks = lora_tasks(&fx);
    let cases: [(&str, MergeConfig); 7] = [
        ("cat", MergeConfig::new(Method::Cat)),
        (
            "linear",
            MergeConfig {
                factorwise: true,
                ..MergeConfig::new(Method::Linear)
            },
        ),
        (
            "ties",
            MergeConfig {
                factorwise: true,
                ..MergeConfig::new(Method::Ties).with_density(0.5)
            },
        ),
        (
            "magnitude_prune",
            MergeConfig {
                factorwise: true,
                ..MergeConfig::new(Method::MagnitudePrune).with_density(0.5)
            },
        ),
        ("svd", MergeConfig::new(Method::Svd).with_svd_rank(3)),
        (
            "ties_svd",
            MergeConfig {
                low_rank: true,
                ..MergeConfig::new(Method::Ties)
                    .with_density(0.5)
                    .with_svd_rank(3)
            },
        ),
        (
            "magnitude_prune_svd",
            MergeConfig {
                low_rank: true,
                ..MergeConfig::new(Method::MagnitudePrune)
                    .with_density(0.5)
                    .with_svd_rank(3)
            },
        ),
    ];
    let tol = scaled(1e-5);
    for (kind, cfg) in cases {
        let cfg = cfg.with_weights(&W);
        let m = merge(&tasks, &cfg).unwrap();
        let MergedDelta::Lora(f) = &m.layers["lin"] else {
            panic!("{kind}: expected LoRA factors")
        };
        assert_eq!(f.scale, 1.0, "{kind}");
        assert_eq!(
            f.rank(),
            fx.get(&format!("{kind}_A")).size()[0],
            "{kind}: rank"
        );
        if matches!(kind, "cat" | "linear" | "ties" | "magnitude_prune") {
            // Factors themselves are comparable (no SVD sign freedom).
            assert_close(&f.a, &fx.get(&format!("{kind}_A")), tol, tol);
            assert_close(&f.b, &fx.get(&format!("{kind}_B")), tol, tol);
        }
        assert_close(
            &f.delta_weight().unwrap(),
            &fx.get(&format!("{kind}_delta")),
            tol,
            tol,
        );
    }
}

#[test]
fn reads_a_peft_written_adapter() {
    // Files are read to the CPU: the delta is computed there.
    let fx = Fx::open();
    let file = read_adapter(fixtures().join("peft_lora"), None).unwrap();
    assert_eq!(file.task.name, "peft_lora");
    assert!(file.task.meta.is_none());
    let d = &file.task.layers["lin"];
    assert_eq!(d.rank(), Some(2));
    assert_close(&d.weight().unwrap(), &fx.get("peft_lora_delta"), 1e-6, 1e-6);
    // And its delta equals adapter a1 of the merge fixture (lora_alpha 4, r 2),
    // whose delta is computed on the test device.
    let a1 = &lora_tasks(&fx)[1].layers["lin"];
    let tol = scaled(1e-6);
    assert_close(&d.weight().unwrap(), &a1.weight().unwrap(), tol, tol);
}

#[test]
fn files_written_here_load_in_peft() {
    // The merged cat result (rank 6, s = 1, no metadata) and one adapter
    // (s = 2, with the metadata block PEFT ignores).
    let fx = Fx::open();
    let tasks = lora_tasks(&fx);
    let cat = merge(&tasks, &MergeConfig::new(Method::Cat).with_weights(&W))
        .unwrap()
        .to_task("cat");
    let mut one = lora_tasks(&fx).remove(1);
    one.meta = Some(orthogonal_merge::AdapterMeta {
        concept: "a1".into(),
        orthogonal: None,
        base_norms: Default::default(),
    });
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for (task, dir) in [cat, one].iter().zip(&dirs) {
        orthogonal_merge::save_task(task, dir.path(), &[], &Default::default()).unwrap();
        let back = read_adapter(dir.path(), None).unwrap();
        assert_eq!(back.task.meta, task.meta);
        // Bitwise on any device: the file's factors are read to the CPU, so
        // the expected delta is computed there too.
        let want = on_cpu(&task.layers["lin"]).weight().unwrap();
        assert_close(&back.task.layers["lin"].weight().unwrap(), &want, 0.0, 0.0);
        tensor_core::io::save(
            dir.path().join("expected.safetensors"),
            &[("delta", &want)],
            None,
        )
        .unwrap();
    }
    peft_check(&[dirs[0].path(), dirs[1].path()]);
}

/// `d` with its tensors on the CPU.
fn on_cpu(d: &Delta) -> Delta {
    match d {
        Delta::Lora(l) => Delta::Lora(
            LoraFactors::new(
                l.a.to_device(Device::Cpu),
                l.b.to_device(Device::Cpu),
                l.scale,
            )
            .unwrap(),
        ),
        Delta::Full(t) => Delta::Full(t.to_device(Device::Cpu)),
    }
}

/// When `MODULAR_VENV`'s Python has PEFT, load the folders in PEFT and
/// compare their deltas with `expected.safetensors` (one Python process).
fn peft_check(dirs: &[&std::path::Path]) {
    let Ok(venv) = std::env::var("MODULAR_VENV") else {
        eprintln!("PEFT check skipped: MODULAR_VENV not set");
        return;
    };
    let py = std::path::Path::new(&venv).join("bin/python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/peft_merge_fixture.py");
    let Ok(out) = std::process::Command::new(&py)
        .env("OMP_NUM_THREADS", "1")
        .arg(&script)
        .arg("--check")
        .args(dirs)
        .output()
    else {
        eprintln!("PEFT check skipped: no Python at {}", py.display());
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("No module named 'peft'") {
        eprintln!("PEFT check skipped: PEFT is not installed in {venv}");
        return;
    }
    assert!(out.status.success(), "PEFT rejected the files: {text}");
    eprintln!("{}", text.trim());
}
