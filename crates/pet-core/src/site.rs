//! [`AdapterSite`]: a whole sub-module (self-attention or FFN) with named
//! bottleneck adapters around it — Houlsby/Pfeiffer adapters and VL-PET's
//! sites (docs/pet-core.md, Method, part 1 steps 1–5 and part 2 step 4).
//!
//! With `X` the site's input and `H = f(X)` the frozen sub-module's output
//! before the residual add, an active adapter `a` gives
//!
//! ```text
//! ΔH_a = Bottleneck_a(H)            (sequential)   or   Bottleneck_a(X)   (parallel)
//! H'_a = H + s·ΔH_a                 (plain adapter, G ≡ 1)
//! H'_a = s·(H + ΔH_a) ⊙ G_a         (VL-PET, see [`crate::gate`])
//! ```
//!
//! and several active adapters add their changes, `H' = H + Σ_a (H'_a − H)`.
//! The model's own residual form then applies (BERT/BART post-LN:
//! `LN(X + Dropout(H'))`), because the site sits where the sub-module sat.

use tensor_core::module::{Context, Module, Slot};
use tensor_core::tch::Tensor;

use crate::bottleneck::{Bottleneck, Placement};
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::host::AdapterHost;
use crate::mixed::MixedBatch;

/// One named adapter at one site.
#[derive(Debug)]
pub struct SiteAdapter {
    pub name: String,
    pub bottleneck: Bottleneck,
    pub placement: Placement,
    /// `s` of a plain adapter (a gate carries its own).
    pub scale: f64,
    pub gate: Option<Gate>,
    names: Vec<String>,
}

impl SiteAdapter {
    pub fn new(
        name: &str,
        bottleneck: Bottleneck,
        placement: Placement,
        scale: f64,
        gate: Option<Gate>,
    ) -> Self {
        let mut names: Vec<String> = bottleneck
            .params
            .iter()
            .map(|(n, _)| format!("adapter.{name}.{n}"))
            .collect();
        if let Some(g) = &gate {
            names.extend(g.params.iter().map(|(n, _)| format!("adapter.{name}.{n}")));
        }
        Self {
            name: name.to_owned(),
            bottleneck,
            placement,
            scale,
            gate,
            names,
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self.bottleneck.params.iter().map(|(_, t)| t).collect();
        if let Some(g) = &self.gate {
            v.extend(g.params.iter().map(|(_, t)| t));
        }
        v
    }

    fn named_tensors_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let Self {
            names,
            bottleneck,
            gate,
            ..
        } = self;
        let mut v: Vec<&mut Tensor> = bottleneck.params.iter_mut().map(|(_, t)| t).collect();
        if let Some(g) = gate {
            v.extend(g.params.iter_mut().map(|(_, t)| t));
        }
        names.iter().map(String::as_str).zip(v).collect()
    }

    /// `H'_a − H`.
    fn change(&self, x: &Tensor, h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let src = match self.placement {
            Placement::Sequential => h,
            Placement::Parallel => x,
        };
        let d = self.bottleneck.forward(src)?.f_to_kind(h.kind())?;
        match &self.gate {
            None => Ok(if self.scale == 1.0 {
                d
            } else {
                d.f_mul_scalar(self.scale)?
            }),
            Some(g) => Ok(g.apply(x, &h.f_add(&d)?, mask)?.f_sub(h)?),
        }
    }
}

/// A sub-module with named adapters; the sub-module stays under a
/// transparent child so its parameter names do not change.
#[derive(Debug)]
pub struct AdapterSite {
    inner: Slot,
    adapters: Vec<SiteAdapter>,
    active: Vec<String>,
    enabled: bool,
}

impl AdapterSite {
    pub fn wrap(inner: Slot) -> Self {
        Self {
            inner,
            adapters: Vec::new(),
            active: Vec::new(),
            enabled: true,
        }
    }

    pub fn add(&mut self, adapter: SiteAdapter) -> Result<()> {
        if self.adapters.iter().any(|a| a.name == adapter.name) {
            return Err(tensor_core::Error::duplicate_adapter(adapter.name).into());
        }
        if self.active.is_empty() {
            self.active.push(adapter.name.clone());
        }
        self.adapters.push(adapter);
        Ok(())
    }

    pub fn adapters(&self) -> &[SiteAdapter] {
        &self.adapters
    }

    pub fn inner(&self) -> &dyn Module {
        self.inner.as_ref()
    }

    fn run(&self, x: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let h = ctx.call("", self.inner.as_ref(), x)?;
        if !self.enabled || self.adapters.is_empty() {
            return Ok(h);
        }
        let mask = ctx.attention_mask.as_ref().map(Tensor::shallow_clone);
        let mut out = h.shallow_clone();
        if let Some(mb) = ctx.get::<MixedBatch>() {
            mb.check_rows(x, "mixed-batch site input")?;
            let names: Vec<&str> = self.adapters.iter().map(|a| a.name.as_str()).collect();
            let local = mb.local_index(&names)?;
            for (j, a) in self.adapters.iter().enumerate() {
                let c = a.change(x, &h, mask.as_ref())?;
                out = out.f_add(&c.f_mul(&MixedBatch::row_mask(&local, j, &c)?)?)?;
            }
            return Ok(out);
        }
        for a in self
            .adapters
            .iter()
            .filter(|a| self.active.contains(&a.name))
        {
            out = out.f_add(&a.change(x, &h, mask.as_ref())?)?;
        }
        Ok(out)
    }
}

impl Module for AdapterSite {
    fn kind(&self) -> &'static str {
        "AdapterSite"
    }

    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        self.run(xs, ctx).map_err(Into::into)
    }

    fn params(&self) -> Vec<(&str, &Tensor)> {
        let mut v = Vec::new();
        for a in &self.adapters {
            for (n, t) in a.names.iter().zip(a.tensors()) {
                v.push((n.as_str(), t));
            }
        }
        v
    }

    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        let mut v = Vec::new();
        for a in &mut self.adapters {
            v.extend(a.named_tensors_mut());
        }
        v
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("", self.inner.as_ref())]
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        vec![("", &mut self.inner)]
    }
}

impl AdapterHost for AdapterSite {
    fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }

    fn set_active(&mut self, names: &[String]) {
        self.active = names
            .iter()
            .filter(|n| self.adapters.iter().any(|a| &a.name == *n))
            .cloned()
            .collect();
    }

    fn active_names(&self) -> Vec<String> {
        self.active.clone()
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        self.enabled = enabled;
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<bool> {
        let before = self.adapters.len();
        self.adapters.retain(|a| a.name != name);
        self.active.retain(|a| a != name);
        Ok(self.adapters.len() != before)
    }

    fn check_merge(&self, path: &str, names: &[String], _safe: bool) -> Result<()> {
        match names
            .iter()
            .find(|n| self.adapters.iter().any(|a| &a.name == *n))
        {
            Some(n) => Err(Error::state(format!(
                "{path}: adapter '{n}' cannot be merged: a bottleneck adapter is not linear in its input"
            ))),
            None => Ok(()),
        }
    }

    fn merge(&mut self, path: &str, names: &[String], _safe: bool) -> Result<usize> {
        match names
            .iter()
            .find(|n| self.adapters.iter().any(|a| &a.name == *n))
        {
            Some(n) => Err(Error::state(format!(
                "{path}: adapter '{n}' cannot be merged: a bottleneck adapter is not linear in its input"
            ))),
            None => Ok(0),
        }
    }

    fn unmerge_all(&mut self, _path: &str) -> Result<usize> {
        Ok(0)
    }

    fn merged_names(&self) -> Vec<String> {
        Vec::new()
    }

    fn adapter_param_count(&self, name: &str) -> i64 {
        self.adapters
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.tensors().iter().map(|t| t.numel() as i64).sum())
            .unwrap_or(0)
    }

    fn into_inner(self: Box<Self>) -> Slot {
        self.inner
    }
}
