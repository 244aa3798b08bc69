use tch::{Device, Kind, Tensor};
use tensor_core::testing::{closeness, device, randn_seeded, with_seed};

/// Host values on the test device (`closeness` reads any device).
fn on_dev(v: &[f32]) -> Tensor {
    Tensor::from_slice(v).to_device(device())
}

#[test]
fn closeness_uses_atol_plus_rtol() {
    let e = on_dev(&[1.0, 100.0, 0.0]);
    let a = on_dev(&[1.0 + 1e-6, 100.0 + 1e-3, 5e-7]);
    assert!(closeness(&a, &e, 1e-6, 1e-5).unwrap().ok);
    let c = closeness(&a, &e, 1e-7, 1e-6).unwrap();
    assert!(!c.ok);
    assert_eq!(c.numel, 3);
    assert!(c.mismatched >= 2, "{c:?}");
}

#[test]
fn nan_and_inf_never_pass() {
    let nan = on_dev(&[f32::NAN]);
    assert!(!closeness(&nan, &nan, 1e9, 1e9).unwrap().ok);
    let one = on_dev(&[1.0]);
    assert!(!closeness(&nan, &one, 1e9, 1e9).unwrap().ok);
    let inf = on_dev(&[f32::INFINITY]);
    assert!(!closeness(&inf, &inf, 1e9, 1e9).unwrap().ok);
    assert!(!closeness(&inf, &one, 1e9, 1e9).unwrap().ok);
}

#[test]
fn shape_mismatch_is_an_error() {
    // Checked before anything is computed: host tensors suffice.
    let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let e = closeness(&a, &b, 0.0, 0.0).unwrap_err().to_string();
    assert!(e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn same_seed_same_values() {
    let dev = device();
    let a = randn_seeded(&[4, 5], 7, dev).unwrap();
    let b = randn_seeded(&[4, 5], 7, dev).unwrap();
    let c = randn_seeded(&[4, 5], 8, dev).unwrap();
    assert_eq!(a.device(), dev);
    assert!(a.equal(&b));
    assert!(!a.equal(&c));
    // Drawn on the CPU whatever the device: the same values everywhere.
    assert!(
        a.to_device(Device::Cpu)
            .equal(&randn_seeded(&[4, 5], 7, Device::Cpu).unwrap())
    );
    let new = || tensor_core::layers::Linear::new(6, 4, true, dev).unwrap();
    let l1 = with_seed(3, new);
    let l2 = with_seed(3, new);
    assert!(l1.weight.equal(&l2.weight));
    assert!(l1.bias.as_ref().unwrap().equal(l2.bias.as_ref().unwrap()));
}

#[test]
fn nested_seeding_does_not_deadlock() {
    let dev = device();
    let inner = with_seed(1, || with_seed(2, || randn_seeded(&[3], 2, dev).unwrap()));
    assert!(inner.equal(&randn_seeded(&[3], 2, dev).unwrap()));
}

#[test]
fn test_device_follows_the_environment_value_and_refuses_a_missing_gpu() {
    use tensor_core::DType;
    use tensor_core::testing::{test_device_from, tolerances};
    assert_eq!(test_device_from(None).unwrap(), Device::Cpu);
    assert_eq!(test_device_from(Some(" ")).unwrap(), Device::Cpu);
    assert_eq!(test_device_from(Some("CPU")).unwrap(), Device::Cpu);
    let e = test_device_from(Some("tpu")).unwrap_err().to_string();
    assert!(e.contains("MODULAR_TEST_DEVICE='tpu'"), "{e}");
    let n = tch::Cuda::device_count();
    let e = test_device_from(Some(&format!("cuda:{n}")))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("sees {n} CUDA device")), "{e}");
    if n > 0 {
        assert_eq!(test_device_from(Some("cuda")).unwrap(), Device::Cuda(0));
    }
    // Looser f32 bounds on CUDA only; half types keep their own.
    assert_eq!(tolerances(DType::F32, Device::Cpu), DType::F32.tolerances());
    let (a, r) = tolerances(DType::F32, Device::Cuda(0));
    assert!(a > DType::F32.tolerances().0 && r > DType::F32.tolerances().1);
    assert_eq!(
        tolerances(DType::BF16, Device::Cuda(0)),
        DType::BF16.tolerances()
    );
}
