//! What every adapter-holding wrapper offers the lifecycle (docs/pet-core.md,
//! Method, part 2 step 5): PEFT's `add_adapter` / `set_adapter` / `disable_adapter` /
//! `delete_adapter` / `merge` / `unmerge`, layer by layer.
//!
//! Two wrappers hold adapters: [`AdaptedLinear`] around a `Linear`
//! (tensor-core's host, shared with every adapter crate; here it carries
//! LoRA, DoRA, IA3, parallel bottlenecks and LoRA + G) and
//! [`crate::site::AdapterSite`] around a whole sub-module (sequential or
//! parallel bottleneck adapters, VL-PET sites). Several active adapters add
//! their changes: `y = base(x) + Σ_a Δ_a(x)`.

use tensor_core::module::{Module, Slot, downcast_box, downcast_mut, downcast_ref};

use tensor_core::adapt::AdaptedLinear;

use crate::error::Result;
use crate::site::AdapterSite;

pub trait AdapterHost: Module {
    /// Adapters held here, in the order they were added.
    fn adapter_names(&self) -> Vec<String>;
    /// Activate `names` (those held here; the others are ignored at this layer).
    fn set_active(&mut self, names: &[String]);
    fn active_names(&self) -> Vec<String>;
    /// `false`: the layer computes the base output only (adapters kept).
    fn set_enabled(&mut self, enabled: bool) -> Result<()>;
    /// Remove `name`; `Ok(false)` if it is not held here.
    fn delete(&mut self, name: &str) -> Result<bool>;
    /// Compute the merge of `names` without writing it: the errors
    /// [`AdapterHost::merge`] would give, with no side effect.
    fn check_merge(&self, path: &str, names: &[String], safe: bool) -> Result<()>;
    /// Merge the held adapters among `names`; returns how many.
    fn merge(&mut self, path: &str, names: &[String], safe: bool) -> Result<usize>;
    /// Undo every merge, last first; returns how many.
    fn unmerge_all(&mut self, path: &str) -> Result<usize>;
    /// Merged adapters, first merged first.
    fn merged_names(&self) -> Vec<String>;
    /// Parameters of adapter `name` at this layer.
    fn adapter_param_count(&self, name: &str) -> i64;
    /// The wrapped module (adapters dropped).
    fn into_inner(self: Box<Self>) -> Slot;
}

/// The adapter host in `m`, if `m` is one.
pub fn host_ref(m: &dyn Module) -> Option<&dyn AdapterHost> {
    if let Some(h) = downcast_ref::<AdaptedLinear>(m) {
        return Some(h);
    }
    downcast_ref::<AdapterSite>(m).map(|h| h as &dyn AdapterHost)
}

pub fn host_mut(m: &mut dyn Module) -> Option<&mut dyn AdapterHost> {
    if tensor_core::module::is::<AdaptedLinear>(m) {
        return downcast_mut::<AdaptedLinear>(m).map(|h| h as &mut dyn AdapterHost);
    }
    downcast_mut::<AdapterSite>(m).map(|h| h as &mut dyn AdapterHost)
}

/// Take a host out of its slot, as a host; or give the slot back.
pub fn host_box(m: Slot) -> std::result::Result<Box<dyn AdapterHost>, Slot> {
    let m = match downcast_box::<AdaptedLinear>(m) {
        Ok(h) => return Ok(h),
        Err(m) => m,
    };
    match downcast_box::<AdapterSite>(m) {
        Ok(h) => Ok(h),
        Err(m) => Err(m),
    }
}

/// The lifecycle on tensor-core's host, for adapters of any crate.
impl AdapterHost for AdaptedLinear {
    fn adapter_names(&self) -> Vec<String> {
        self.names()
    }

    fn set_active(&mut self, names: &[String]) {
        AdaptedLinear::set_active(self, names);
    }

    fn active_names(&self) -> Vec<String> {
        self.active().to_vec()
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        Ok(AdaptedLinear::set_enabled(self, enabled)?)
    }

    fn delete(&mut self, name: &str) -> Result<bool> {
        Ok(self.remove(name)?.is_some())
    }

    fn check_merge(&self, path: &str, names: &[String], safe: bool) -> Result<()> {
        Ok(AdaptedLinear::check_merge(self, path, names, safe)?)
    }

    fn merge(&mut self, path: &str, names: &[String], safe: bool) -> Result<usize> {
        Ok(AdaptedLinear::merge(self, path, names, safe)?)
    }

    fn unmerge_all(&mut self, path: &str) -> Result<usize> {
        Ok(AdaptedLinear::unmerge_all(self, path)?)
    }

    fn merged_names(&self) -> Vec<String> {
        self.merged()
    }

    fn adapter_param_count(&self, name: &str) -> i64 {
        self.param_count(name)
    }

    fn into_inner(self: Box<Self>) -> Slot {
        AdaptedLinear::into_inner(*self)
    }
}
