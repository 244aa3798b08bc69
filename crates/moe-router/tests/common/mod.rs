//! Helpers shared by the integration tests. Modules and inputs live on the
//! test device ([`dev`], `MODULAR_TEST_DEVICE`, the CPU by default); their
//! values are drawn on the CPU first, so they are the same on every device.
#![allow(dead_code)]

use tensor_core::ModuleExt;
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::testing::{randn_seeded, with_seed};

/// The device the tests compute on (`tensor_core::testing::device`).
pub fn dev() -> Device {
    tensor_core::testing::device()
}

/// `N(0, 1)` values of `shape` in f64 (seeded), on the test device, not requiring grad.
pub fn randn64(shape: &[i64], seed: u64) -> Tensor {
    randn_seeded(shape, seed, dev())
        .unwrap()
        .to_kind(Kind::Double)
}

/// The bound for comparing f64 results of which at least one went through
/// `scatter_add` / `index_add` (the sparse MoE and MoA kernels, expert
/// counts): `cpu` on the CPU, 100x on CUDA, where those kernels accumulate
/// with atomics in no fixed order.
pub fn atomics_tol(cpu: f64) -> f64 {
    if dev().is_cuda() { cpu * 100.0 } else { cpu }
}

/// A leaf input that requires grad.
pub fn leaf(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Gradients of `Σ y ⊙ r` w.r.t. `inputs` (undefined ones as zeros), keeping the graph.
pub fn grads(y: &Tensor, r: &Tensor, inputs: &[Tensor]) -> Vec<Tensor> {
    let loss = (y * r).sum(y.kind());
    let gs = Tensor::run_backward(&[loss], inputs, true, false);
    gs.into_iter()
        .zip(inputs)
        .map(|(g, x)| if g.defined() { g } else { x.zeros_like() })
        .collect()
}

/// Trainable parameters of a module tree plus extra leaves.
pub fn trainable(m: &dyn tensor_core::Module) -> Vec<Tensor> {
    m.trainable_parameters()
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

/// Build under a seed (`f` builds on the CPU, so the initial values are the
/// same on every device) and move to the test device.
pub fn seeded<M: tensor_core::Module>(seed: u64, f: impl FnOnce() -> M) -> M {
    let mut m = with_seed(seed, f);
    m.to_device(dev()).unwrap();
    m
}

/// [`seeded`], cast to f64.
pub fn seeded_f64<M: tensor_core::Module>(seed: u64, f: impl FnOnce() -> M) -> M {
    let mut m = seeded(seed, f);
    m.to_kind(Kind::Double).unwrap();
    m
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

pub fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64).reshape([-1])).unwrap()
}
