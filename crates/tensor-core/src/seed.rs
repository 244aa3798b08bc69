//! Seeding: libtorch's generator is global, so every seeded draw in the
//! workspace goes through here. [`with_seed`] reseeds and runs a closure
//! with no other thread's seeded closure in between (tests and rayon
//! workers run on several threads); [`manual_seed`] reseeds for code that
//! draws as it goes (dropout in a training loop); [`randn_seeded`] and
//! [`randint_seeded`] draw on the CPU so the values do not depend on the
//! device. Host-side randomness (shuffles, k-means++ seeding) uses
//! [`crate::rng::SplitMix64`] instead.

use std::cell::Cell;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TchResultExt};

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

/// `U(-bound, bound)` values drawn like [`randn_seeded`] (LoRA's
/// Kaiming-uniform `A` with `bound = 1/√in`).
pub fn uniform_seeded(shape: &[i64], bound: f64, seed: u64, device: Device) -> Result<Tensor> {
    with_seed(seed, || {
        Tensor::f_empty(shape, (Kind::Float, Device::Cpu))
            .and_then(|mut t| t.f_uniform_(-bound, bound))
    })
    .and_then(|t| t.f_to_device(device))
    .op("uniform_seeded")
}

/// Uniform integers in `0..high`, drawn like [`randn_seeded`].
pub fn randint_seeded(high: i64, shape: &[i64], seed: u64, device: Device) -> Result<Tensor> {
    with_seed(seed, || {
        Tensor::f_randint(high, shape, (Kind::Int64, Device::Cpu))
    })
    .and_then(|t| t.f_to_device(device))
    .op("randint_seeded")
}
