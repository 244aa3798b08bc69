//! The closeness check itself: `atol + rtol |e|`, and NaN or Inf never
//! passing, so a diverged computation cannot look correct.

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
fn reseeding_waits_for_another_threads_seeded_draw() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tensor_core::testing::{as_seed_lock_holder, holds_seed_lock, manual_seed};
    let dev = device();
    // Several draws in one seeded closure, like a layer's weight and bias.
    let draws = || {
        with_seed(5, || {
            (0..8)
                .map(|_| Tensor::randn([64], (Kind::Float, Device::Cpu)))
                .collect::<Vec<_>>()
        })
    };
    let expected = Tensor::cat(&draws(), 0);
    // Another thread reseeds over and over while this one draws under the
    // lock: what it draws must not change.
    let (started, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let reseeded = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                manual_seed(99);
                started.store(true, Ordering::Relaxed);
            }
        });
        while !started.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        let reseeded = (0..200)
            .filter(|_| !Tensor::cat(&draws(), 0).equal(&expected))
            .count();
        // Stop the other thread before asserting: the scope joins it.
        stop.store(true, Ordering::Relaxed);
        reseeded
    });
    assert_eq!(reseeded, 0, "draws reseeded midway by another thread");
    let expected = expected.narrow(0, 0, 64).to_device(dev);
    // Workers spawned inside `with_seed` seed as holders instead of waiting
    // for the lock their spawner holds.
    let drawn = with_seed(1, || {
        let held = holds_seed_lock();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    as_seed_lock_holder(held, || {
                        assert!(holds_seed_lock());
                        manual_seed(5);
                        Tensor::randn([64], (Kind::Float, Device::Cpu))
                    })
                })
                .join()
                .unwrap()
        })
    });
    assert!(drawn.to_device(dev).equal(&expected));
    assert!(!holds_seed_lock());
}

#[test]
fn workers_of_one_holder_do_not_interleave_their_seeded_draws() {
    use tensor_core::testing::{as_seed_lock_holder, holds_seed_lock};
    // Host values: tensors cannot be shared between threads.
    let draws = || {
        with_seed(5, || {
            let t = Tensor::cat(
                &(0..8)
                    .map(|_| Tensor::randn([64], (Kind::Float, Device::Cpu)))
                    .collect::<Vec<_>>(),
                0,
            );
            Vec::<f32>::try_from(&t).unwrap()
        })
    };
    let expected = draws();
    // Two workers of one holder (like parallel distillation jobs drawing
    // seeded batches): each seeded closure must still see only its own seed.
    let changed = with_seed(1, || {
        let held = holds_seed_lock();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        as_seed_lock_holder(held, || {
                            (0..100).filter(|_| draws() != expected).count()
                        })
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .sum::<usize>()
        })
    });
    assert_eq!(
        changed, 0,
        "a worker's seeded draws interleaved with another's"
    );
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
