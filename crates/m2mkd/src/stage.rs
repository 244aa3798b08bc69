//! Staged models: a monolithic model as embeddings -> L blocks -> head, and
//! a modular model as M modules in a row.
//!
//! m2mKD (arXiv 2402.16918, §3; `deep_incubation/timm/models/vision_transformer.py`)
//! sees every network, teacher, meta model or student, as a list of stages:
//! stage 0 owns the embeddings, the last stage owns the (norm and) head, and
//!
//! `forward(x, start, end)` runs blocks `[start, end)`, embedding only when
//! `start = 0` and applying the head only when `end = L`,
//!
//! so that `forward(x, 0, L) = forward(forward(x, 0, a), a, L)`.
//!
//! - [`LayerStack`]: the monolithic model, block by block.
//! - [`Stage`]: consecutive blocks of a stack, with the embeddings if it is the
//!   first stage and the head if it is the last (what [`crate::split`] returns).
//! - [`ModularModel`]: M modules (any [`Module`]: a [`Stage`], a user's MoE
//!   block, a stitched module) with the hidden width each one reads and
//!   writes; the teacher after splitting, the meta model and the student.
//!
//! Hidden states between stages are checked against the declared width, so
//! a module plugged in at the wrong place fails with its index and widths
//! instead of deep inside a matmul.

use tensor_core::tch::Tensor;
use tensor_core::{Context, Module, Slot};

use crate::error::{Error, Result};

/// Check that a hidden state between stages has `width` as its last dimension.
pub(crate) fn check_width(what: &str, h: &Tensor, width: i64) -> tensor_core::Result<()> {
    let s = h.size();
    if s.last() == Some(&width) {
        Ok(())
    } else {
        Err(tensor_core::Error::shape(what, format!("[*, {width}]"), s))
    }
}

/// A monolithic model: `head(blocks[L-1](... blocks[0](embed(x))))`.
///
/// Children are named `embed`, `block.0` ... `block.{L-1}`, `head`.
#[derive(Debug, Module)]
#[module(kind = "LayerStack", forward = forward_impl)]
pub struct LayerStack {
    #[child]
    pub embed: Slot,
    #[children(names = "names")]
    pub blocks: Vec<Slot>,
    #[child]
    pub head: Slot,
    /// Width of the hidden states between blocks.
    pub width: i64,
    names: Vec<String>,
}

impl LayerStack {
    pub fn new(embed: Slot, blocks: Vec<Slot>, head: Slot, width: i64) -> Result<Self> {
        if blocks.is_empty() {
            return Err(Error::config("a LayerStack needs at least one block"));
        }
        if width <= 0 {
            return Err(Error::config(format!(
                "LayerStack width must be positive, got {width}"
            )));
        }
        let names = (0..blocks.len()).map(|i| format!("block.{i}")).collect();
        Ok(Self {
            embed,
            blocks,
            head,
            width,
            names,
        })
    }

    /// Number of blocks `L`.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Run blocks `[start, end)`; embed when `start = 0`, apply the head when `end = L`.
    pub fn forward_range(
        &self,
        xs: &Tensor,
        start: usize,
        end: usize,
        ctx: &mut Context,
    ) -> Result<Tensor> {
        let l = self.depth();
        if start > end || end > l {
            return Err(Error::config(format!(
                "forward range [{start}, {end}) is not within the {l} blocks"
            )));
        }
        let mut h = if start == 0 {
            ctx.call("embed", self.embed.as_ref(), xs)?
        } else {
            xs.shallow_clone()
        };
        check_width("LayerStack hidden", &h, self.width)?;
        for i in start..end {
            h = ctx.call(&self.names[i], self.blocks[i].as_ref(), &h)?;
        }
        if end == l {
            h = ctx.call("head", self.head.as_ref(), &h)?;
        }
        Ok(h)
    }

    /// Take the stack apart: `(embed, blocks, head)`.
    pub fn into_parts(self) -> (Slot, Vec<Slot>, Slot) {
        (self.embed, self.blocks, self.head)
    }
}

impl LayerStack {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        self.forward_range(xs, 0, self.depth(), ctx)
            .map_err(into_tensor_error)
    }
}

/// Our errors inside a `Module::forward`, which returns tensor-core's error.
pub(crate) fn into_tensor_error(e: Error) -> tensor_core::Error {
    match e {
        Error::Tensor(t) => t,
        other => tensor_core::Error::config(other.to_string()),
    }
}

/// Consecutive blocks of a [`LayerStack`]: `head?(blocks(embed?(x)))`.
///
/// Children are named `embed` (first stage only), `block.0`, ... (local
/// indices, so a stage's parameter names do not depend on where it was cut),
/// and `head` (last stage only).
#[derive(Debug, Module)]
#[module(kind = "Stage", forward = forward_impl)]
pub struct Stage {
    #[child]
    pub embed: Option<Slot>,
    #[children(names = "names")]
    pub blocks: Vec<Slot>,
    #[child]
    pub head: Option<Slot>,
    /// Width of the hidden states it reads (unless it embeds) and writes (unless it has the head).
    pub width: i64,
    /// Index of its first block in the stack it came from.
    pub first_block: usize,
    names: Vec<String>,
}

impl Stage {
    pub fn new(
        embed: Option<Slot>,
        blocks: Vec<Slot>,
        head: Option<Slot>,
        width: i64,
        first_block: usize,
    ) -> Result<Self> {
        if blocks.is_empty() && embed.is_none() && head.is_none() {
            return Err(Error::config("a Stage needs at least one block"));
        }
        if width <= 0 {
            return Err(Error::config(format!(
                "Stage width must be positive, got {width}"
            )));
        }
        let names = (0..blocks.len()).map(|i| format!("block.{i}")).collect();
        Ok(Self {
            embed,
            blocks,
            head,
            width,
            first_block,
            names,
        })
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }
}

impl Stage {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let mut h = match &self.embed {
            Some(e) => ctx.call("embed", e.as_ref(), xs)?,
            None => xs.shallow_clone(),
        };
        check_width("Stage input", &h, self.width)?;
        for (n, b) in self.names.iter().zip(&self.blocks) {
            h = ctx.call(n, b.as_ref(), &h)?;
        }
        if let Some(head) = &self.head {
            h = ctx.call("head", head.as_ref(), &h)?;
        }
        Ok(h)
    }
}

/// M modules applied in a row, named `stage.0` ... `stage.{M-1}`.
///
/// Module 0 reads the raw input; the last module writes the logits; module
/// `i` writes hidden states of width `widths[i]`, which module `i + 1` reads.
#[derive(Debug, Module)]
#[module(kind = "ModularModel", forward = forward_impl)]
pub struct ModularModel {
    #[children(names = "names")]
    modules: Vec<Slot>,
    widths: Vec<i64>,
    names: Vec<String>,
}

impl ModularModel {
    /// `modules[i]` with its boundary width `widths[i]`. Consecutive widths
    /// must agree (module `i` writes what module `i + 1` reads).
    pub fn new(modules: Vec<Slot>, widths: Vec<i64>) -> Result<Self> {
        if modules.is_empty() {
            return Err(Error::config("a ModularModel needs at least one module"));
        }
        if modules.len() != widths.len() {
            return Err(Error::config(format!(
                "{} modules but {} widths",
                modules.len(),
                widths.len()
            )));
        }
        if let Some(w) = widths.iter().find(|&&w| w <= 0) {
            return Err(Error::config(format!(
                "module widths must be positive, got {w}"
            )));
        }
        if let Some(i) = (1..widths.len()).find(|&i| widths[i] != widths[i - 1]) {
            return Err(Error::WidthMismatch {
                module: i,
                side: "input",
                width: widths[i],
                meta: widths[i - 1],
                hint: "module i reads what module i-1 writes; keep the stitches or use one width",
            });
        }
        let names = (0..modules.len()).map(|i| format!("stage.{i}")).collect();
        Ok(Self {
            modules,
            widths,
            names,
        })
    }

    /// Split-teacher convenience: the [`Stage`]s with their own widths.
    pub fn from_stages(stages: Vec<Stage>) -> Result<Self> {
        let widths = stages.iter().map(|s| s.width).collect();
        let modules = stages.into_iter().map(|s| Box::new(s) as Slot).collect();
        Self::new(modules, widths)
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Hidden width between modules (all modules share it).
    pub fn width(&self) -> i64 {
        self.widths[0]
    }

    pub fn module(&self, i: usize) -> Result<&dyn Module> {
        self.modules
            .get(i)
            .map(|m| m.as_ref())
            .ok_or_else(|| self.no_module(i))
    }

    pub fn module_mut(&mut self, i: usize) -> Result<&mut Slot> {
        let n = self.modules.len();
        self.modules
            .get_mut(i)
            .ok_or_else(|| Error::config(format!("module {i} does not exist (the model has {n})")))
    }

    fn no_module(&self, i: usize) -> Error {
        Error::config(format!(
            "module {i} does not exist (the model has {})",
            self.modules.len()
        ))
    }

    /// Run modules `[start, end)` (module 0 takes the raw input, the last one gives logits).
    pub fn forward_range(
        &self,
        xs: &Tensor,
        start: usize,
        end: usize,
        ctx: &mut Context,
    ) -> Result<Tensor> {
        let m = self.modules.len();
        if start > end || end > m {
            return Err(Error::config(format!(
                "module range [{start}, {end}) is not within the {m} modules"
            )));
        }
        let mut h = xs.shallow_clone();
        for i in start..end {
            if i > 0 {
                check_width(&format!("input of {}", self.names[i]), &h, self.widths[i])?;
            }
            h = ctx.call(&self.names[i], self.modules[i].as_ref(), &h)?;
        }
        Ok(h)
    }

    /// Take the modules out (with their widths).
    pub fn into_modules(self) -> (Vec<Slot>, Vec<i64>) {
        (self.modules, self.widths)
    }
}

impl ModularModel {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        self.forward_range(xs, 0, self.modules.len(), ctx)
            .map_err(into_tensor_error)
    }
}
