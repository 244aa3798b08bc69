//! Shared set-up for the criterion benchmarks in this folder.
//!
//! Naming convention (read by `cargo xtask bench`): a benchmark's full id is
//! `TOPIC/CASE/rust`, and `reference/TOPIC.py` prints `TOPIC/CASE/pytorch
//! SECONDS` for the same computation in PyTorch, on the same machine, in the
//! same run; xtask prints the ratio.

use std::time::Duration;

use criterion::Criterion;

/// Short, stable settings: the suite must stay quick on a 2-core machine.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}
