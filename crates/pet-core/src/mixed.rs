//! Mixed-adapter batches (docs/pet-core.md, Method, part 2 step 7): each
//! sample names an adapter, or `"__base__"` for none, and one forward serves
//! them all. The batch type and the adapted-linear layers' batched path live
//! in [`tensor_core::adapt`], so adapters of every crate share one batch;
//! [`crate::site::AdapterSite`] masks its sites' changes row by row.

pub use tensor_core::adapt::mixed::{BASE, MixedBatch};
