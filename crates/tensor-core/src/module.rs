//! The extension point every method crate uses: modules in named slots.
//!
//! A model is a tree of [`Module`]s. Each module maps a tensor to a tensor
//! given a [`Context`], lists its own named parameters, and lists its
//! children, each held in a [`Slot`] (`Box<dyn Module>`) under a name. Full
//! parameter names are the children's names joined by `.`, so a BERT built
//! from these parts has exactly the Hugging Face checkpoint keys
//! (`encoder.layer.3.attention.self.query.weight`).
//!
//! Method crates never see a model type. Through [`ModuleExt`] they
//! - find sub-modules by path or by type ([`ModuleExt::get`], [`ModuleExt::find`]),
//! - replace one ([`ModuleExt::replace`]): an expert split swaps a `FeedForward`,
//! - wrap one ([`ModuleExt::wrap`]): LoRA around a `Linear`, keeping the
//!   original inside so unwrapping restores the model,
//! - insert a module after one ([`ModuleExt::insert_after`]): adapters,
//! - and read concrete layers' weights by downcasting ([`downcast_ref`]).
//!
//! **Transparent children.** A child whose name is empty adds nothing to
//! paths: a wrapper keeps the original module under `""` so the original's
//! parameters keep their names (`query.weight`) while the wrapper's own sit
//! beside them (`query.lora_A.weight`). Path lookup descends through
//! transparent children; a path that names a slot holding a wrapper gets
//! the wrapper (the outermost module).
//!
//! **Labelled children.** A child named `(label)` is transparent in the same
//! way (its parameters are named as if it were not there), but the label
//! addresses it: BERT keeps its FFN under `(ffn)` so that
//! `encoder.layer.3.(ffn)` names the `FeedForward` while its weights stay
//! `encoder.layer.3.intermediate.dense.weight`.
//!
//! **Contract.** `children()` and `children_mut()` list the same children in
//! the same order, as do `params()` and `params_mut()`.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TchResultExt};

/// A place in the tree that holds a module and can be given a new one.
pub type Slot = Box<dyn Module>;

/// `#[derive(Module)]`: the four lists generated from field attributes
/// (`#[param]`, `#[params]`, `#[child]`, `#[children]`); see the
/// `tensor-core-derive` crate.
pub use tensor_core_derive::Module;

/// The name of a `#[params]` / `#[children]` entry (used by the derive).
pub fn list_name<N: AsRef<str> + ?Sized>(n: &N) -> &str {
    n.as_ref()
}

/// A differentiable map from tensors to tensors with named parameters.
pub trait Module: Any + Send + fmt::Debug {
    /// Short name of the module's type, for reports (`"Linear"`, `"LoRA"`).
    fn kind(&self) -> &'static str;

    /// Apply the module. Shapes are checked; failures name the module.
    fn forward(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor>;

    /// This module's own parameters (not its children's), by local name.
    fn params(&self) -> Vec<(&str, &Tensor)> {
        Vec::new()
    }

    /// Mutable access to the same parameters, in the same order.
    fn params_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        Vec::new()
    }

    /// Named children. An empty name is transparent (see the module docs).
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        Vec::new()
    }

    /// Mutable access to the children's slots, in the same order as `children`.
    fn children_mut(&mut self) -> Vec<(&str, &mut Slot)> {
        Vec::new()
    }
}

/// The concrete module behind a trait object, if it is a `T`.
pub fn downcast_ref<T: Module>(m: &dyn Module) -> Option<&T> {
    (m as &dyn Any).downcast_ref::<T>()
}

pub fn downcast_mut<T: Module>(m: &mut dyn Module) -> Option<&mut T> {
    (m as &mut dyn Any).downcast_mut::<T>()
}

/// Take the concrete module out of a slot, or give the slot back unchanged.
pub fn downcast_box<T: Module>(m: Slot) -> std::result::Result<Box<T>, Slot> {
    if (m.as_ref() as &dyn Any).is::<T>() {
        let any: Box<dyn Any> = m;
        Ok(any.downcast::<T>().expect("type checked above"))
    } else {
        Err(m)
    }
}

pub fn is<T: Module>(m: &dyn Module) -> bool {
    (m as &dyn Any).is::<T>()
}

/// Is this child name a label, `(name)`: transparent for parameter names
/// but addressable as a path segment?
pub fn is_label(name: &str) -> bool {
    name.len() > 2 && name.starts_with('(') && name.ends_with(')')
}

/// Join a parent path and a child name; empty parts and labels vanish
/// (this is how parameter names and descendants' paths are formed).
pub fn join_path(prefix: &str, name: &str) -> String {
    if is_label(name) {
        return prefix.to_owned();
    }
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_owned(),
        (_, true) => prefix.to_owned(),
        _ => format!("{prefix}.{name}"),
    }
}

/// Glob match over dotted names: `*` matches any run of characters
/// (dots included), `?` one character. `encoder.layer.*.attention.self.query`
/// or `*.lora_*`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Parameter counts of a module tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamCount {
    pub total: i64,
    pub trainable: i64,
}

impl ParamCount {
    /// Trainable share in percent.
    pub fn trainable_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl fmt::Display for ParamCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            self.trainable,
            self.total,
            self.trainable_percent()
        )
    }
}

fn visit_params(m: &dyn Module, prefix: &str, f: &mut dyn FnMut(&str, &Tensor)) {
    for (n, t) in m.params() {
        f(&join_path(prefix, n), t);
    }
    for (n, c) in m.children() {
        visit_params(c, &join_path(prefix, n), f);
    }
}

fn visit_params_mut(
    m: &mut dyn Module,
    prefix: &str,
    f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
) -> Result<()> {
    for (n, t) in m.params_mut() {
        f(&join_path(prefix, n), t)?;
    }
    for (n, c) in m.children_mut() {
        visit_params_mut(c.as_mut(), &join_path(prefix, n), f)?;
    }
    Ok(())
}

/// The path that addresses a child itself: like `join_path`, but a label
/// stays (`encoder.layer.3.(ffn)`).
fn slot_path(prefix: &str, name: &str) -> String {
    if is_label(name) && !prefix.is_empty() {
        format!("{prefix}.{name}")
    } else if is_label(name) {
        name.to_owned()
    } else {
        join_path(prefix, name)
    }
}

fn visit_modules<'a>(m: &'a dyn Module, prefix: &str, out: &mut Vec<(String, &'a dyn Module)>) {
    for (n, c) in m.children() {
        out.push((slot_path(prefix, n), c));
        visit_modules(c, &join_path(prefix, n), out);
    }
}

/// Child indices leading from `m` to the slot named by `path`.
fn resolve(m: &dyn Module, path: &str) -> Option<Vec<usize>> {
    for (i, (name, c)) in m.children().into_iter().enumerate() {
        let found = if name.is_empty() {
            resolve(c, path)
        } else if is_label(name) && path != name && !path.starts_with(&format!("{name}.")) {
            // A label is transparent unless the path names it.
            resolve(c, path)
        } else if path == name {
            Some(Vec::new())
        } else if let Some(rest) = path.strip_prefix(name).and_then(|r| r.strip_prefix('.')) {
            resolve(c, rest)
        } else {
            None
        };
        if let Some(mut idx) = found {
            idx.insert(0, i);
            return Some(idx);
        }
    }
    None
}

fn slot_at<'a>(m: &'a mut dyn Module, idx: &[usize]) -> &'a mut Slot {
    let (_, slot) = m
        .children_mut()
        .into_iter()
        .nth(idx[0])
        .expect("children() and children_mut() list the same children");
    if idx.len() == 1 {
        slot
    } else {
        slot_at(slot.as_mut(), &idx[1..])
    }
}

fn post_order_slots(
    m: &mut dyn Module,
    prefix: &str,
    f: &mut dyn FnMut(&str, &mut Slot) -> Result<()>,
) -> Result<()> {
    for (n, c) in m.children_mut() {
        let (inner, own) = (join_path(prefix, n), slot_path(prefix, n));
        post_order_slots(c.as_mut(), &inner, f)?;
        f(&own, c)?;
    }
    Ok(())
}

/// Operations on any module tree. Implemented for every `Module` and for `dyn Module`.
pub trait ModuleExt {
    fn as_module(&self) -> &dyn Module;
    fn as_module_mut(&mut self) -> &mut dyn Module;

    /// Every parameter with its full name (shallow handles sharing storage).
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        visit_params(self.as_module(), "", &mut |n, t| {
            out.push((n.to_owned(), t.shallow_clone()))
        });
        out
    }

    /// Parameters whose `requires_grad` is set, with their names.
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// Visit every parameter mutably, with its full name.
    fn for_each_param_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        visit_params_mut(self.as_module_mut(), "", f)
    }

    fn param_count(&self) -> ParamCount {
        let mut c = ParamCount::default();
        visit_params(self.as_module(), "", &mut |_, t| {
            let n = t.numel() as i64;
            c.total += n;
            if t.requires_grad() {
                c.trainable += n;
            }
        });
        c
    }

    /// Every sub-module with its path, pre-order. A transparent child shares its parent's path.
    fn named_modules(&self) -> Vec<(String, &dyn Module)> {
        let mut out = Vec::new();
        visit_modules(self.as_module(), "", &mut out);
        out
    }

    /// Paths of the sub-modules that satisfy `pred` (e.g. `|_, m| is::<Linear>(m)`).
    fn find(&self, pred: &mut dyn FnMut(&str, &dyn Module) -> bool) -> Vec<String> {
        self.named_modules()
            .into_iter()
            .filter(|(p, m)| pred(p, *m))
            .map(|(p, _)| p)
            .collect()
    }

    /// The module in the slot named by `path`.
    fn get(&self, path: &str) -> Result<&dyn Module> {
        let root = self.as_module();
        let idx = resolve(root, path).ok_or_else(|| unknown_path(root, path))?;
        let mut m = root;
        for i in idx {
            m = m.children().into_iter().nth(i).expect("resolved index").1;
        }
        Ok(m)
    }

    /// The slot named by `path`, to read, replace or wrap its module.
    fn slot_mut(&mut self, path: &str) -> Result<&mut Slot> {
        let idx =
            resolve(self.as_module(), path).ok_or_else(|| unknown_path(self.as_module(), path))?;
        Ok(slot_at(self.as_module_mut(), &idx))
    }

    /// The module at `path` as a concrete type.
    fn get_as<T: Module>(&self, path: &str) -> Result<&T> {
        let m = self.get(path)?;
        downcast_ref::<T>(m).ok_or_else(|| {
            Error::module(
                path,
                format!("holds a {}, not a {}", m.kind(), std::any::type_name::<T>()),
            )
        })
    }

    fn get_as_mut<T: Module>(&mut self, path: &str) -> Result<&mut T> {
        let slot = self.slot_mut(path)?;
        let kind = slot.kind();
        downcast_mut::<T>(slot.as_mut()).ok_or_else(|| {
            Error::module(
                path,
                format!("holds a {kind}, not a {}", std::any::type_name::<T>()),
            )
        })
    }

    /// Put `module` in the slot at `path`; returns the module that was there.
    fn replace(&mut self, path: &str, module: Slot) -> Result<Slot> {
        Ok(std::mem::replace(self.slot_mut(path)?, module))
    }

    /// Replace the module at `path` by `f(old)`, typically a wrapper that keeps `old`.
    fn wrap(&mut self, path: &str, f: impl FnOnce(Slot) -> Slot) -> Result<()>
    where
        Self: Sized,
    {
        let slot = self.slot_mut(path)?;
        let old = std::mem::replace(slot, Box::new(Identity));
        *slot = f(old);
        Ok(())
    }

    /// Like [`ModuleExt::wrap`] with a fallible constructor; on failure the
    /// constructor hands the original back and the slot is restored.
    fn try_wrap(
        &mut self,
        path: &str,
        f: impl FnOnce(Slot) -> std::result::Result<Slot, (Slot, Error)>,
    ) -> Result<()>
    where
        Self: Sized,
    {
        let slot = self.slot_mut(path)?;
        let old = std::mem::replace(slot, Box::new(Identity));
        match f(old) {
            Ok(new) => {
                *slot = new;
                Ok(())
            }
            Err((old, e)) => {
                *slot = old;
                Err(e.within(path))
            }
        }
    }

    /// Run `module` (named `name`) on the output of the module at `path`.
    /// The original keeps its parameter names; the new module's parameters
    /// are `path.name.*`. Undo with [`ModuleExt::remove_after`].
    fn insert_after(&mut self, path: &str, name: &str, module: Slot) -> Result<()>
    where
        Self: Sized,
    {
        if name.is_empty() || name.contains('.') {
            return Err(Error::config(format!(
                "insert_after: name '{name}' must be non-empty and contain no '.'"
            )));
        }
        self.wrap(path, |first| {
            Box::new(Then {
                first,
                name: name.to_owned(),
                after: module,
            })
        })
    }

    /// Undo [`ModuleExt::insert_after`]: returns the inserted module.
    fn remove_after(&mut self, path: &str, name: &str) -> Result<Slot> {
        let slot = self.slot_mut(path)?;
        let old = std::mem::replace(slot, Box::new(Identity));
        match downcast_box::<Then>(old) {
            Ok(then) if then.name == name => {
                *slot = then.first;
                Ok(then.after)
            }
            Ok(then) => {
                let found = then.name.clone();
                *slot = then;
                Err(Error::unknown(
                    format!("module inserted after {path}"),
                    name,
                    vec![found],
                ))
            }
            Err(old) => {
                let kind = old.kind();
                *slot = old;
                Err(Error::module(
                    path,
                    format!("holds a {kind}, nothing was inserted after it"),
                ))
            }
        }
    }

    /// Visit every slot, children before parents, with its path. The
    /// callback may replace the module in the slot; the new module is not
    /// visited (so wrapping every `Linear` never wraps a wrapper's inner one).
    fn for_each_slot_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Slot) -> Result<()>,
    ) -> Result<()> {
        post_order_slots(self.as_module_mut(), "", f)
    }

    /// Set `requires_grad` on every parameter whose full name matches `pattern` (glob).
    /// Returns how many parameters matched.
    fn set_trainable(&mut self, pattern: &str, trainable: bool) -> usize {
        let mut n = 0;
        let _ = self.for_each_param_mut(&mut |name, t| {
            if glob_match(pattern, name) {
                *t = t.set_requires_grad(trainable);
                n += 1;
            }
            Ok(())
        });
        n
    }

    /// Move every parameter to `device` (names and trainability kept).
    fn to_device(&mut self, device: Device) -> Result<()> {
        self.for_each_param_mut(&mut |name, t| {
            if t.device() != device {
                let rg = t.requires_grad();
                let moved = t.f_to_device(device).op(name)?.f_detach().op(name)?;
                *t = moved.set_requires_grad(rg);
            }
            Ok(())
        })
    }

    /// Cast every floating-point parameter to `kind` (integer tensors untouched).
    fn to_kind(&mut self, kind: Kind) -> Result<()> {
        self.for_each_param_mut(&mut |name, t| {
            if crate::device::is_float(t.kind()) && t.kind() != kind {
                let rg = t.requires_grad();
                let cast = t.f_to_kind(kind).op(name)?.f_detach().op(name)?;
                *t = cast.set_requires_grad(rg);
            }
            Ok(())
        })
    }

    /// Copy values into parameters by full name (under `no_grad`). Shapes must
    /// match exactly; values are cast to each parameter's dtype and device.
    /// With `strict`, every parameter must be given and every given name used.
    /// Returns the names of parameters that were not given.
    fn load_named(&mut self, values: &[(String, Tensor)], strict: bool) -> Result<Vec<String>> {
        let lookup: HashMap<&str, &Tensor> = values.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut used = 0usize;
        let mut missing = Vec::new();
        self.for_each_param_mut(&mut |name, p| {
            let Some(src) = lookup.get(name) else {
                missing.push(name.to_owned());
                return Ok(());
            };
            used += 1;
            if src.size() != p.size() {
                return Err(Error::shape(
                    format!("load '{name}'"),
                    format!("{:?}", p.size()),
                    src.size(),
                ));
            }
            tch::no_grad(|| -> Result<()> {
                let v = src
                    .f_to_device(p.device())
                    .op(name)?
                    .f_to_kind(p.kind())
                    .op(name)?;
                p.f_copy_(&v).op(name)?;
                Ok(())
            })
        })?;
        if strict {
            if !missing.is_empty() {
                return Err(Error::unknown(
                    "value for parameter",
                    missing[0].clone(),
                    values.iter().map(|(n, _)| n.clone()).collect(),
                ));
            }
            if used != lookup.len() {
                let names: Vec<String> = self
                    .named_parameters()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                let extra = values
                    .iter()
                    .find(|(n, _)| !names.contains(n))
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                return Err(Error::unknown("parameter", extra, names));
            }
        }
        Ok(missing)
    }
}

fn unknown_path(root: &dyn Module, path: &str) -> Error {
    let mut all = Vec::new();
    visit_modules(root, "", &mut all);
    let mut known: Vec<String> = Vec::new();
    for (p, _) in all {
        if !p.is_empty() && !known.contains(&p) {
            known.push(p);
        }
    }
    // Show the paths nearest to the one asked for first.
    let head = path.split('.').next().unwrap_or("");
    known.sort_by_key(|p| (!p.starts_with(head), p.len()));
    Error::unknown("module", path, known)
}

impl<M: Module> ModuleExt for M {
    fn as_module(&self) -> &dyn Module {
        self
    }
    fn as_module_mut(&mut self) -> &mut dyn Module {
        self
    }
}

impl ModuleExt for dyn Module {
    fn as_module(&self) -> &dyn Module {
        self
    }
    fn as_module_mut(&mut self) -> &mut dyn Module {
        self
    }
}

impl ModuleExt for Slot {
    fn as_module(&self) -> &dyn Module {
        self.as_ref()
    }
    fn as_module_mut(&mut self) -> &mut dyn Module {
        self.as_mut()
    }
}

/// Receives activations that modules offer through [`Context::record`]
/// (profiling, attribution). Keys are `module.path:what`.
pub trait ActivationSink: Any + Send {
    /// Whether `key` is wanted; modules skip the work of recording otherwise.
    fn wants(&self, key: &str) -> bool;
    fn record(&mut self, key: &str, value: &Tensor) -> Result<()>;
}

/// Keeps every recorded tensor (detached) whose key matches one of the patterns.
#[derive(Debug, Default)]
pub struct KeepActivations {
    pub patterns: Vec<String>,
    pub values: Vec<(String, Tensor)>,
}

impl KeepActivations {
    pub fn new(patterns: &[&str]) -> Self {
        Self {
            patterns: patterns.iter().map(|s| (*s).to_owned()).collect(),
            values: Vec::new(),
        }
    }
}

impl ActivationSink for KeepActivations {
    fn wants(&self, key: &str) -> bool {
        self.patterns.iter().any(|p| glob_match(p, key))
    }
    fn record(&mut self, key: &str, value: &Tensor) -> Result<()> {
        self.values.push((key.to_owned(), value.f_detach()?));
        Ok(())
    }
}

/// Everything a forward pass needs besides its input, passed down the tree.
///
/// - `train`: dropout and training-only noise are on.
/// - `attention_mask`: `[batch, seq]`, 1 for tokens and 0 for padding.
/// - `memory` / `memory_mask`: the encoder states and their mask, for cross-attention.
/// - auxiliary losses and router statistics accumulate here, on the device,
///   under the path of the module that produced them.
/// - an optional [`ActivationSink`] for profiling.
/// - typed extensions: a method crate stores its own per-call state (for
///   example the per-sample adapter choice of a mixed batch) with
///   [`Context::insert`] and reads it back by type, so `tensor-core` never
///   needs to know about it.
pub struct Context {
    pub train: bool,
    pub attention_mask: Option<Tensor>,
    pub memory: Option<Tensor>,
    pub memory_mask: Option<Tensor>,
    path: Vec<String>,
    error_tagged: bool,
    aux_losses: Vec<(String, Tensor)>,
    stats: Vec<(String, Tensor)>,
    sink: Option<Box<dyn ActivationSink>>,
    extensions: HashMap<TypeId, Box<dyn Any + Send>>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("train", &self.train)
            .field(
                "attention_mask",
                &self.attention_mask.as_ref().map(Tensor::size),
            )
            .field("memory", &self.memory.as_ref().map(Tensor::size))
            .field("path", &self.path)
            .field("aux_losses", &self.aux_losses.len())
            .field("stats", &self.stats.len())
            .field("sink", &self.sink.is_some())
            .field("extensions", &self.extensions.len())
            .finish()
    }
}

impl Default for Context {
    fn default() -> Self {
        Self::eval()
    }
}

impl Context {
    pub fn eval() -> Self {
        Self {
            train: false,
            attention_mask: None,
            memory: None,
            memory_mask: None,
            path: Vec::new(),
            error_tagged: false,
            aux_losses: Vec::new(),
            stats: Vec::new(),
            sink: None,
            extensions: HashMap::new(),
        }
    }

    pub fn train() -> Self {
        Self {
            train: true,
            ..Self::eval()
        }
    }

    pub fn with_mask(mut self, mask: Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    pub fn with_memory(mut self, memory: Tensor, mask: Option<Tensor>) -> Self {
        self.memory = Some(memory);
        self.memory_mask = mask;
        self
    }

    pub fn with_sink(mut self, sink: Box<dyn ActivationSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Run child `m`, named `name`, on `xs`, with the path extended. The first
    /// failure on the way out is tagged with the full path of the failing module.
    pub fn call(&mut self, name: &str, m: &dyn Module, xs: &Tensor) -> Result<Tensor> {
        let pushed = !name.is_empty();
        if pushed {
            self.path.push(name.to_owned());
        }
        let r = m.forward(xs, self);
        let r = match r {
            Err(e) if !self.error_tagged => {
                self.error_tagged = true;
                let here = self.path();
                Err(if here.is_empty() { e } else { e.within(&here) })
            }
            other => other,
        };
        if pushed {
            self.path.pop();
        }
        if self.path.is_empty() {
            self.error_tagged = false;
        }
        r
    }

    /// Path of the module currently running (`encoder.layer.3.intermediate.dense`),
    /// formed as [`ModuleExt::named_modules`] forms it: a label shows only
    /// when it is the last segment (`encoder.layer.3.(ffn)`).
    pub fn path(&self) -> String {
        let last = self.path.len().saturating_sub(1);
        let mut out = String::new();
        for (i, seg) in self.path.iter().enumerate() {
            if is_label(seg) && i != last {
                continue;
            }
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
        out
    }

    /// Add an auxiliary loss (kept on its device) under the current path.
    pub fn add_aux_loss(&mut self, name: &str, loss: Tensor) {
        self.aux_losses.push((join_path(&self.path(), name), loss));
    }

    pub fn aux_losses(&self) -> &[(String, Tensor)] {
        &self.aux_losses
    }

    pub fn take_aux_losses(&mut self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut self.aux_losses)
    }

    /// Sum of the auxiliary losses (a zero scalar when there are none).
    pub fn aux_loss_total(&self, device: Device) -> Result<Tensor> {
        let mut total = Tensor::f_zeros([], (Kind::Float, device))?;
        for (name, l) in &self.aux_losses {
            total = total.f_add(&l.f_to_kind(Kind::Float).op(name)?).op(name)?;
        }
        Ok(total)
    }

    /// Record a statistic (e.g. per-expert load) under the current path; stays on device.
    pub fn add_stat(&mut self, name: &str, value: Tensor) {
        self.stats.push((join_path(&self.path(), name), value));
    }

    pub fn stats(&self) -> &[(String, Tensor)] {
        &self.stats
    }

    pub fn take_stats(&mut self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut self.stats)
    }

    /// Whether a sink wants activations named `what` from the current module.
    pub fn wants(&self, what: &str) -> bool {
        self.sink
            .as_ref()
            .is_some_and(|s| s.wants(&format!("{}:{what}", self.path())))
    }

    /// Offer an activation to the sink (a no-op without one).
    pub fn record(&mut self, what: &str, value: &Tensor) -> Result<()> {
        // Every FFN offers its activation on every forward: without a sink,
        // do not even build the key.
        if self.sink.is_none() {
            return Ok(());
        }
        let key = format!("{}:{what}", self.path());
        match self.sink.as_mut() {
            Some(s) if s.wants(&key) => s.record(&key, value),
            _ => Ok(()),
        }
    }

    pub fn take_sink(&mut self) -> Option<Box<dyn ActivationSink>> {
        self.sink.take()
    }

    pub fn sink_mut(&mut self) -> Option<&mut (dyn ActivationSink + 'static)> {
        self.sink.as_deref_mut()
    }

    /// Store a method crate's own per-call state, one value per type.
    pub fn insert<T: Any + Send>(&mut self, value: T) -> Option<T> {
        self.extensions
            .insert(TypeId::of::<T>(), Box::new(value))
            .and_then(|b| (b as Box<dyn Any>).downcast::<T>().ok().map(|b| *b))
    }

    pub fn get<T: Any + Send>(&self) -> Option<&T> {
        self.extensions
            .get(&TypeId::of::<T>())
            .and_then(|b| (b.as_ref() as &dyn Any).downcast_ref::<T>())
    }

    pub fn get_mut<T: Any + Send>(&mut self) -> Option<&mut T> {
        self.extensions
            .get_mut(&TypeId::of::<T>())
            .and_then(|b| (b.as_mut() as &mut dyn Any).downcast_mut::<T>())
    }

    pub fn remove<T: Any + Send>(&mut self) -> Option<T> {
        self.extensions
            .remove(&TypeId::of::<T>())
            .and_then(|b| (b as Box<dyn Any>).downcast::<T>().ok().map(|b| *b))
    }
}

/// Returns its input. Also the placeholder while a slot is being rewrapped.
#[derive(Debug, Default, Clone, Copy, Module)]
#[module(kind = "Identity", forward = forward_impl)]
pub struct Identity;

impl Identity {
    fn forward_impl(&self, xs: &Tensor, _ctx: &mut Context) -> Result<Tensor> {
        Ok(xs.shallow_clone())
    }
}

/// `after(first(x))`: what [`ModuleExt::insert_after`] builds. `first` is
/// transparent, so its parameters keep their names.
#[derive(Debug, Module)]
#[module(kind = "Then", forward = forward_impl)]
pub struct Then {
    #[child(name = "")]
    pub first: Slot,
    pub name: String,
    #[child(name_expr = "self.name.as_str()")]
    pub after: Slot,
}

impl Then {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let h = ctx.call("", self.first.as_ref(), xs)?;
        ctx.call(&self.name, self.after.as_ref(), &h)
    }
}

/// Named modules applied in order (`0`, `1`, ... unless named otherwise).
#[derive(Debug, Default, Module)]
#[module(kind = "Sequential", forward = forward_impl)]
pub struct Sequential {
    #[children]
    items: Vec<(String, Slot)>,
}

impl Sequential {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a module under the next index as its name.
    pub fn push(mut self, m: impl Module) -> Self {
        let name = self.items.len().to_string();
        self.items.push((name, Box::new(m)));
        self
    }

    /// Append a module under an explicit name (empty = transparent).
    pub fn push_named(mut self, name: &str, m: Slot) -> Self {
        self.items.push((name.to_owned(), m));
        self
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl Sequential {
    fn forward_impl(&self, xs: &Tensor, ctx: &mut Context) -> Result<Tensor> {
        let mut h = xs.shallow_clone();
        for (n, m) in &self.items {
            h = ctx.call(n, m.as_ref(), &h)?;
        }
        Ok(h)
    }
}
