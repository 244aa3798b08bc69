//! tensor-core's test suite, one binary (each test executable links libtorch,
//! so fewer binaries keep the build quick).

mod adapt;
mod derive;
mod grouped;
mod io;
mod layers;
mod linking;
mod module;
mod testing;

use tensor_core::DType;
use tensor_core::testing::{device, tolerances};

/// `(atol, rtol)` for a result compared with a reference computed another
/// way: the given CPU bound, loosened on the test device as much as
/// [`tolerances`] loosens f32's there (10x on CUDA).
fn scaled(atol: f64, rtol: f64) -> (f64, f64) {
    let k = tolerances(DType::F32, device()).0 / DType::F32.tolerances().0;
    (atol * k, rtol * k)
}
