use tch::{Device, Kind, Tensor};
use tensor_core::testing::{closeness, randn_seeded, with_seed};

#[test]
fn closeness_uses_atol_plus_rtol() {
    let e = Tensor::from_slice(&[1.0f32, 100.0, 0.0]);
    let a = Tensor::from_slice(&[1.0f32 + 1e-6, 100.0 + 1e-3, 5e-7]);
    assert!(closeness(&a, &e, 1e-6, 1e-5).unwrap().ok);
    let c = closeness(&a, &e, 1e-7, 1e-6).unwrap();
    assert!(!c.ok);
    assert_eq!(c.numel, 3);
    assert!(c.mismatched >= 2, "{c:?}");
}

#[test]
fn nan_and_inf_never_pass() {
    let nan = Tensor::from_slice(&[f32::NAN]);
    assert!(!closeness(&nan, &nan, 1e9, 1e9).unwrap().ok);
    let one = Tensor::from_slice(&[1.0f32]);
    assert!(!closeness(&nan, &one, 1e9, 1e9).unwrap().ok);
    let inf = Tensor::from_slice(&[f32::INFINITY]);
    assert!(!closeness(&inf, &inf, 1e9, 1e9).unwrap().ok);
    assert!(!closeness(&inf, &one, 1e9, 1e9).unwrap().ok);
}

#[test]
fn shape_mismatch_is_an_error() {
    let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let e = closeness(&a, &b, 0.0, 0.0).unwrap_err().to_string();
    assert!(e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn same_seed_same_values() {
    let a = randn_seeded(&[4, 5], 7, Device::Cpu).unwrap();
    let b = randn_seeded(&[4, 5], 7, Device::Cpu).unwrap();
    let c = randn_seeded(&[4, 5], 8, Device::Cpu).unwrap();
    assert!(a.equal(&b));
    assert!(!a.equal(&c));
    let new = || tensor_core::layers::Linear::new(6, 4, true, Device::Cpu).unwrap();
    let l1 = with_seed(3, new);
    let l2 = with_seed(3, new);
    assert!(l1.weight.equal(&l2.weight));
    assert!(l1.bias.as_ref().unwrap().equal(l2.bias.as_ref().unwrap()));
}

#[test]
fn nested_seeding_does_not_deadlock() {
    let inner = with_seed(1, || {
        with_seed(2, || randn_seeded(&[3], 2, Device::Cpu).unwrap())
    });
    assert!(inner.equal(&randn_seeded(&[3], 2, Device::Cpu).unwrap()));
}
