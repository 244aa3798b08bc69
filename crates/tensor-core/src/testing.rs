//! Closeness checks and seeded random tensors, for tests and parity checks,
//! and the device the test suites run on ([`device`]).
//!
//! `close` holds element-wise when `|a - e| <= atol + rtol |e|`. NaN never
//! passes (not even against NaN), and neither does an infinity, so a
//! diverged computation can never look correct.

use std::cell::Cell;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::device::{DType, parse_device};
use crate::error::{Error, Result, TchResultExt};

/// Names the device the test suites compute on: `cpu`, `cuda` or `cuda:N`.
pub const TEST_DEVICE_VAR: &str = "MODULAR_TEST_DEVICE";

/// The device the test suites run their modules and kernels on:
/// `MODULAR_TEST_DEVICE` when set (`cargo xtask test --cuda` sets it to
/// `cuda`), else the CPU. The same test executables thus run on a GPU
/// machine without a rebuild.
///
/// # Panics
/// On a malformed value, or a CUDA device that is not there: a suite asked
/// to run on the GPU must never pass by quietly running on the CPU.
pub fn device() -> Device {
    match test_device_from(std::env::var(TEST_DEVICE_VAR).ok().as_deref()) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

/// [`device`] for an explicit value of `MODULAR_TEST_DEVICE`.
pub fn test_device_from(value: Option<&str>) -> Result<Device> {
    let d = match value.map(str::trim) {
        None | Some("") => return Ok(Device::Cpu),
        Some(v) => parse_device(v).map_err(|_| {
            Error::config(format!(
                "{TEST_DEVICE_VAR}='{v}' is not cpu, cuda or cuda:N"
            ))
        })?,
    };
    if let Device::Cuda(i) = d {
        let n = tch::Cuda::device_count();
        if i as i64 >= n {
            return Err(Error::config(format!(
                "{TEST_DEVICE_VAR} asks for cuda:{i} but libtorch sees {n} CUDA device(s)"
            )));
        }
    }
    Ok(d)
}

/// `(atol, rtol)` for results computed in `dtype` on `device` and compared
/// with a reference computed elsewhere (the CPU, PyTorch, a fixture):
/// [`DType::tolerances`] on the CPU; on CUDA, f32 gets 10x the CPU bounds
/// (cuBLAS and cuDNN sum in other orders and may pick other algorithms),
/// half types keep theirs (already dominated by rounding).
pub fn tolerances(dtype: DType, device: Device) -> (f64, f64) {
    let (a, r) = dtype.tolerances();
    match (device, dtype) {
        (Device::Cuda(_), DType::F32) => (a * 10.0, r * 10.0),
        _ => (a, r),
    }
}

/// How far `actual` is from `expected`.
#[derive(Debug, Clone, PartialEq)]
pub struct Closeness {
    pub max_abs: f64,
    /// Largest `|a - e| / |e|` over elements with `e != 0`.
    pub max_rel: f64,
    /// Elements outside `atol + rtol |e|` (non-finite ones included).
    pub mismatched: i64,
    pub numel: i64,
    pub ok: bool,
}

/// Compare two tensors of the same shape (any float dtype, any device).
pub fn closeness(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<Closeness> {
    if actual.size() != expected.size() {
        return Err(Error::shape(
            "closeness",
            format!("{:?}", expected.size()),
            actual.size(),
        ));
    }
    let a = actual
        .f_detach()?
        .f_to_kind(Kind::Double)?
        .f_to_device(Device::Cpu)
        .op("closeness")?;
    let e = expected
        .f_detach()?
        .f_to_kind(Kind::Double)?
        .f_to_device(Device::Cpu)
        .op("closeness")?;
    let diff = a.f_sub(&e)?.f_abs()?;
    let bound = e.f_abs()?.f_mul_scalar(rtol)?.f_add_scalar(atol)?;
    // `<=` is false for NaN; an infinite difference is caught by isfinite.
    let good = diff
        .f_le_tensor(&bound)?
        .f_logical_and(&diff.f_isfinite()?)?;
    let numel = a.numel() as i64;
    let mismatched = numel - good.f_sum(Kind::Int64)?.int64_value(&[]);
    let finite_diff = diff.f_nan_to_num(Some(f64::INFINITY), Some(f64::INFINITY), None)?;
    let max_abs = if numel == 0 {
        0.0
    } else {
        finite_diff.f_max()?.double_value(&[])
    };
    let nonzero = e.f_ne(0)?;
    let rel = finite_diff
        .f_div(&e.f_abs()?)?
        .f_masked_fill(&nonzero.f_logical_not()?, 0.0)?;
    let max_rel = if numel == 0 {
        0.0
    } else {
        rel.f_max()?.double_value(&[])
    };
    Ok(Closeness {
        max_abs,
        max_rel,
        mismatched,
        numel,
        ok: mismatched == 0,
    })
}

/// Panic with a readable report unless `actual` is close to `expected`.
#[track_caller]
pub fn assert_close(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    match closeness(actual, expected, atol, rtol) {
        Ok(c) if c.ok => {}
        Ok(c) => panic!(
            "not close (atol {atol:e}, rtol {rtol:e}): {} of {} elements mismatched, max abs err {:e}, max rel err {:e}",
            c.mismatched, c.numel, c.max_abs, c.max_rel
        ),
        Err(e) => panic!("cannot compare: {e}"),
    }
}

/// Seed libtorch's generators (CPU and CUDA): the same seed gives the same
/// initialisation, dropout masks and samples on the CPU.
///
/// Waits while another thread is inside [`with_seed`]: reseeding the global
/// generator in the middle of that closure would change what it draws.
pub fn manual_seed(seed: u64) {
    with_seed_lock(|| tch::manual_seed(seed as i64));
}

/// Held by the thread inside a [`with_seed`] closure (and, on its behalf,
/// by the workers it runs under [`as_seed_lock_holder`]).
static SEED_LOCK: Mutex<()> = Mutex::new(());
/// Taken by one such worker at a time for its own seeded closures, so
/// workers of one holder do not interleave with each other either.
static WORKER_LOCK: Mutex<()> = Mutex::new(());

/// Where this thread stands with the seed locks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SeedRole {
    /// Takes [`SEED_LOCK`] for a seeded closure.
    Outside,
    /// Inside its own seeded closure, [`SEED_LOCK`] held.
    Holder,
    /// Runs for a holder (which keeps [`SEED_LOCK`] until it joins this
    /// thread): takes [`WORKER_LOCK`] for a seeded closure.
    Worker,
    /// A worker inside its own seeded closure, [`WORKER_LOCK`] held.
    WorkerHolder,
}

thread_local! {
    static SEED_ROLE: Cell<SeedRole> = const { Cell::new(SeedRole::Outside) };
}

/// Puts the thread's role back when a closure ends (or unwinds).
struct RestoreRole(SeedRole);

impl Drop for RestoreRole {
    fn drop(&mut self) {
        SEED_ROLE.set(self.0);
    }
}

/// Run `f` right after seeding, with no other thread's `with_seed` in
/// between (libtorch's generator is global, and tests run on several
/// threads). Nested calls on one thread simply reseed.
pub fn with_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    with_seed_lock(|| {
        tch::manual_seed(seed as i64);
        f()
    })
}

/// Run `f` holding the seed lock without reseeding: for code that draws
/// from the global generator only to overwrite what it drew (a replica whose
/// parameters are then shared), so those draws can never land inside another
/// thread's [`with_seed`] closure. Reentrant on one thread.
pub fn with_seed_lock<T>(f: impl FnOnce() -> T) -> T {
    let role = SEED_ROLE.get();
    let (lock, inside) = match role {
        SeedRole::Holder | SeedRole::WorkerHolder => return f(),
        SeedRole::Outside => (&SEED_LOCK, SeedRole::Holder),
        SeedRole::Worker => (&WORKER_LOCK, SeedRole::WorkerHolder),
    };
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    SEED_ROLE.set(inside);
    let _restore = RestoreRole(role);
    f()
}

/// Whether this thread holds the seed lock, itself or for a holder (runs
/// inside [`with_seed`], or inside [`as_seed_lock_holder`] with `held`).
pub fn holds_seed_lock() -> bool {
    SEED_ROLE.get() != SeedRole::Outside
}

/// Run `f` on a worker thread on behalf of the seed lock's holder when
/// `held`: for threads spawned (and joined) inside a [`with_seed`] closure,
/// pass the spawner's [`holds_seed_lock`]. The spawner keeps the lock until
/// they are joined, so nothing outside interleaves with them; among
/// themselves, each worker's seeded closures still run one at a time.
/// Without this they would wait for the spawner's lock forever. One level:
/// a worker that spawns workers of its own must not pass `held`.
pub fn as_seed_lock_holder<T>(held: bool, f: impl FnOnce() -> T) -> T {
    let before = SEED_ROLE.get();
    if held {
        SEED_ROLE.set(SeedRole::Worker);
    }
    let _restore = RestoreRole(before);
    f()
}

/// `N(0, 1)` values drawn on the CPU from `seed`, then moved to `device`, so
/// the values are identical whatever the device.
pub fn randn_seeded(shape: &[i64], seed: u64, device: Device) -> Result<Tensor> {
    with_seed(seed, || Tensor::f_randn(shape, (Kind::Float, Device::Cpu)))
        .and_then(|t| t.f_to_device(device))
        .op("randn_seeded")
}

/// Uniform integers in `0..high`, drawn like [`randn_seeded`].
pub fn randint_seeded(high: i64, shape: &[i64], seed: u64, device: Device) -> Result<Tensor> {
    with_seed(seed, || {
        Tensor::f_randint(high, shape, (Kind::Int64, Device::Cpu))
    })
    .and_then(|t| t.f_to_device(device))
    .op("randint_seeded")
}

/// Reject NaN/Inf in `t`, naming `what` (one host sync).
pub fn check_finite(op: &str, what: &str, t: &Tensor) -> Result<()> {
    let all = t.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
    if all {
        Ok(())
    } else {
        Err(Error::NonFinite {
            op: op.to_owned(),
            what: what.to_owned(),
        })
    }
}
