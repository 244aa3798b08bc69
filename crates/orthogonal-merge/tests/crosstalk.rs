//! Crosstalk `‖ΔW_j X_i‖ / ‖ΔW_i X_i‖` from recorded Grams: equal to the
//! ratio computed on the inputs themselves, zero where the paper's
//! input-side property says so, and errors that name what is missing.

use orthogonal_merge::lsq::Gram;
use orthogonal_merge::{
    Delta, Features, LoraFactors, TaskDelta, crosstalk, interference_with_features,
};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::randn_seeded;

const L: &str = "layer.0.query";

fn gram_of(x: &Tensor) -> Features {
    let mut f = Features::new();
    let x = x.to_kind(Kind::Double);
    f.layers.insert(
        L.to_owned(),
        Gram {
            xtx: x.tr().mm(&x),
            count: x.size()[0],
        },
    );
    f
}

fn task(name: &str, d: Delta) -> TaskDelta {
    let mut t = TaskDelta::new(name);
    t.layers.insert(L.to_owned(), d);
    t
}

fn lora(seed: u64, scale: f64) -> Delta {
    let a = randn_seeded(&[3, 10], seed, Device::Cpu).unwrap();
    let b = randn_seeded(&[6, 3], seed + 100, Device::Cpu).unwrap();
    Delta::Lora(LoraFactors::new(a, b, scale).unwrap())
}

fn direct(d: &Delta, x: &Tensor) -> f64 {
    d.weight()
        .unwrap()
        .to_kind(Kind::Double)
        .mm(&x.to_kind(Kind::Double).tr())
        .square()
        .sum(Kind::Double)
        .double_value(&[])
        .sqrt()
}

#[test]
fn gram_ratio_equals_the_ratio_on_the_inputs() {
    let x0 = randn_seeded(&[40, 10], 1, Device::Cpu).unwrap();
    let x1 = randn_seeded(&[25, 10], 2, Device::Cpu).unwrap();
    let full = randn_seeded(&[6, 10], 3, Device::Cpu).unwrap();
    let tasks = [
        task("a", lora(5, 2.0)),
        task("b", Delta::full(&full).unwrap()),
    ];
    let r = crosstalk(&tasks, &[gram_of(&x0), gram_of(&x1)]).unwrap();
    assert_eq!(r.stats.len(), 2);
    for s in &r.stats {
        let x = if s.on == 0 { &x0 } else { &x1 };
        let want = direct(&tasks[s.from].layers[L], x) / direct(&tasks[s.on].layers[L], x);
        let got = s.ratio.unwrap();
        // `Delta::weight` forms ΔW in f32; the Gram path stays in f64.
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    }
}

#[test]
fn input_side_frozen_bins_give_zero_crosstalk_on_inputs_in_the_own_bin() {
    // One orthonormal basis of R^10; task i's frozen A_i = its bin's columns transposed.
    let g = randn_seeded(&[10, 10], 7, Device::Cpu)
        .unwrap()
        .to_kind(Kind::Double);
    let q = Tensor::linalg_qr(&g, "reduced").0;
    let bin = |i: i64| q.narrow(1, 3 * i, 3);
    let delta = |i: i64, seed: u64| {
        let b = randn_seeded(&[6, 3], seed, Device::Cpu)
            .unwrap()
            .to_kind(Kind::Double);
        Delta::Lora(LoraFactors::new(bin(i).tr().contiguous(), b, 1.0).unwrap())
    };
    let tasks = [task("a", delta(0, 1)), task("b", delta(1, 2))];
    // Task i's inputs lie in its own bin.
    let inputs = |i: i64, seed: u64| {
        randn_seeded(&[30, 3], seed, Device::Cpu)
            .unwrap()
            .to_kind(Kind::Double)
            .mm(&bin(i).tr())
    };
    let r = interference_with_features(&tasks, &[gram_of(&inputs(0, 11)), gram_of(&inputs(1, 12))])
        .unwrap();
    let c = r.crosstalk.as_ref().unwrap();
    for s in &c.stats {
        assert!(s.ratio.unwrap() < 1e-6, "{s:?}");
    }
    assert!(r.to_string().contains("crosstalk"), "{r}");
}

#[test]
fn missing_inputs_and_counts_are_errors_and_untrained_tasks_have_no_ratio() {
    let x = randn_seeded(&[8, 10], 1, Device::Cpu).unwrap();
    let tasks = [task("a", lora(1, 1.0)), task("b", lora(2, 1.0))];
    let e = crosstalk(&tasks, &[gram_of(&x)]).unwrap_err().to_string();
    assert!(e.contains("1 feature sets for 2 tasks"), "{e}");
    let e = crosstalk(&tasks, &[gram_of(&x), Features::new()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'b'") && e.contains(L), "{e}");
    let zero = task("z", lora(3, 0.0));
    let r = crosstalk(
        &[zero, task("b", lora(2, 1.0))],
        &[gram_of(&x), gram_of(&x)],
    )
    .unwrap();
    let on_zero = r.stats.iter().find(|s| s.on == 0).unwrap();
    assert_eq!(on_zero.ratio, None);
}
