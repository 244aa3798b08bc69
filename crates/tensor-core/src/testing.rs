//! Closeness checks and seeded random tensors, for tests and parity checks,
//! and the device the test suites run on ([`device`]).
//!
//! `close` holds element-wise when `|a - e| <= atol + rtol |e|`. NaN never
//! passes (not even against NaN), and neither does an infinity, so a
//! diverged computation can never look correct.

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

/// How much looser a bound against a reference computed elsewhere
/// (`transformers`, torch, a naive formula) is on the test device than on
/// the CPU: as much as [`tolerances`] loosens f32's (1 on the CPU, 10 on
/// CUDA).
pub fn slack() -> f64 {
    tolerances(DType::F32, device()).0 / DType::F32.tolerances().0
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

// Seeding and finiteness are library concerns, re-exported here because
// every test uses them.
pub use crate::error::check_finite;
pub use crate::seed::{
    as_seed_lock_holder, holds_seed_lock, manual_seed, randint_seeded, randn_seeded, with_seed,
    with_seed_lock,
};
