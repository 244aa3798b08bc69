//! The m2mKD pipeline (arXiv 2402.16918, Algorithm 1):
//!
//! 1. (optional, Deep Incubation) [`incubate`]: train each teacher module
//!    inside the frozen meta model with CE, so that `M_{>i}(T_i(h))` is a
//!    good classifier;
//! 2. [`distil_all`]: for every module i, independently (in parallel threads
//!    when asked), minimise eq. 2 (plus any registered losses) of the
//!    student hybrid against the teacher hybrid, updating only `S_i`, its
//!    stitches and the optional projection;
//! 3. [`assemble`]: put the distilled `S_i` together, stitches dropped
//!    (the default, as the paper's non-strict load) or kept; or load them
//!    from one file per module ([`save_module`], [`load_module`]);
//! 4. [`train_end_to_end`]: fine-tune the assembled student (also the
//!    from-scratch and logit-KD baselines, and the meta model's own training).
//!
//! Stitches are initialised under a seed of their own per module (held
//! with `with_seed`, so concurrent draws elsewhere cannot interleave). A
//! job's randomness (dropout) comes from libtorch's global generator,
//! seeded per job with `seed + i`; jobs running in parallel draw from it
//! in an interleaved order, so parallel runs with dropout are not
//! bit-reproducible (sequential runs are).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tensor_core::seed::{as_seed_lock_holder, holds_seed_lock, manual_seed, with_seed};
use tensor_core::tch::{Device, Kind, Tensor};
use tensor_core::{Context, Module, ModuleExt, Slot};

use crate::data::{Batch, BatchSource};
use crate::error::{Error, Result};
use crate::hybrid::{Hybrid, HybridOptions};
use crate::loss::{KdConfig, LossInputs, LossRegistry, LossTerm, cross_entropy, m2mkd_loss};
use crate::meta::MetaModel;
use crate::optim::{OptimConfig, Optimizer};
use crate::stage::ModularModel;
use crate::stitch::{StitchKind, StitchPolicy, Stitched};

/// Every knob of module distillation (JSON-serialisable; the spec's open points).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistilConfig {
    /// α, τ, soft/hard, `kl_norm`, label smoothing of the built-in losses.
    pub kd: KdConfig,
    /// Named losses and weights (default: `m2mkd` with weight 1, eq. 2).
    pub losses: Vec<LossTerm>,
    /// Weight of `hidden_mse` (hidden-state matching through a learned projection); 0 = off.
    pub hidden_weight: f64,
    /// Optimiser steps per module.
    pub steps: u64,
    pub optim: OptimConfig,
    pub stitches: StitchPolicy,
    pub stitch_kind: StitchKind,
    /// Keep the stitches when assembling (default: dropped, as the paper).
    pub keep_stitches: bool,
    /// Distil modules on several threads.
    pub parallel: bool,
    /// Threads when parallel (0: one per module).
    pub threads: usize,
    pub seed: u64,
}

impl Default for DistilConfig {
    fn default() -> Self {
        Self {
            kd: KdConfig::default(),
            losses: vec![LossTerm::new("m2mkd", 1.0)],
            hidden_weight: 0.0,
            steps: 100,
            optim: OptimConfig::default(),
            stitches: StitchPolicy::Auto,
            stitch_kind: StitchKind::LayerNormLinear,
            keep_stitches: false,
            parallel: false,
            threads: 0,
            seed: 0,
        }
    }
}

impl DistilConfig {
    /// The loss terms of a run: `losses` plus `hidden_mse` when `hidden_weight > 0`.
    pub fn terms(&self) -> Vec<LossTerm> {
        let mut t = self.losses.clone();
        if self.hidden_weight > 0.0 {
            t.push(LossTerm::new("hidden_mse", self.hidden_weight));
        }
        t
    }

    pub fn validate(&self, registry: &LossRegistry) -> Result<()> {
        self.kd.validate()?;
        self.optim.validate()?;
        if self.steps == 0 {
            return Err(Error::config("steps must be positive"));
        }
        if !(self.hidden_weight.is_finite() && self.hidden_weight >= 0.0) {
            return Err(Error::config(format!(
                "hidden_weight must be finite and >= 0, got {}",
                self.hidden_weight
            )));
        }
        registry.check(&self.terms())
    }

    fn hybrid_options(&self, registry: &LossRegistry) -> Result<HybridOptions> {
        Ok(HybridOptions {
            stitches: self.stitches,
            stitch_kind: self.stitch_kind,
            hidden_projection: registry.uses_hidden(&self.terms())?,
        })
    }
}

/// One optimiser step's numbers.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub loss: f64,
    /// Each weighted loss term, by name (plus `aux` for auxiliary losses).
    pub parts: Vec<(String, f64)>,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

fn scalar(what: &str, t: &Tensor) -> Result<f64> {
    let v = t.f_double_value(&[])?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::NonFinite { what: what.into() })
    }
}

/// One distillation step of hybrid i: teacher and meta prefix without a
/// graph, the student hybrid with one; backward; AdamW on the student side.
/// Auxiliary losses that the student module adds to the context (an MoE's
/// balance loss) join the total.
pub fn distil_step(
    hybrid: &Hybrid,
    opt: &mut Optimizer,
    batch: &Batch,
    registry: &LossRegistry,
    terms: &[LossTerm],
) -> Result<StepOutput> {
    let mut ctx = batch.context(true);
    let h = hybrid.meta_prefix(&batch.input, &mut ctx)?;
    let teacher = match &hybrid.teacher {
        Some(_) => Some(hybrid.teacher_forward(&h, &mut ctx)?),
        None => None,
    };
    // Only the student side's auxiliary losses count.
    let _ = ctx.take_aux_losses();
    let student = hybrid.student_forward(&h, &mut ctx, true)?;
    let inputs = LossInputs {
        student_logits: &student.logits,
        teacher_logits: teacher.as_ref().map(|t| &t.logits),
        targets: &batch.targets,
        student_hidden: student.projected.as_ref(),
        teacher_hidden: teacher.as_ref().and_then(|t| t.hidden.as_ref()),
        mask: batch.mask.as_ref(),
    };
    let (mut loss, parts) = registry.combine(terms, &inputs)?;
    let mut parts: Vec<(String, f64)> = parts
        .iter()
        .map(|(n, t)| Ok((n.clone(), scalar(n, t)?)))
        .collect::<Result<_>>()?;
    if !ctx.aux_losses().is_empty() {
        let aux = ctx.aux_loss_total(student.logits.device())?;
        parts.push(("aux".into(), scalar("auxiliary loss", &aux)?));
        loss = loss.f_add(&aux)?;
    }
    let value = scalar("the distillation loss", &loss)?;
    opt.zero_grad()?;
    loss.f_backward()?;
    let grad_norm = opt.step()?;
    Ok(StepOutput {
        loss: value,
        parts,
        grad_norm,
    })
}

/// What distilling one module did.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub index: usize,
    pub steps: u64,
    pub first_loss: f64,
    /// Mean loss over the last 10% of the steps (at least one).
    pub final_loss: f64,
    pub seconds: f64,
    pub trainable_params: i64,
}

/// Train hybrid i's student side for `steps` steps on `data`.
pub fn distil_module(
    hybrid: &Hybrid,
    data: &dyn BatchSource,
    steps: u64,
    optim: &OptimConfig,
    registry: &LossRegistry,
    terms: &[LossTerm],
) -> Result<ModuleReport> {
    let start = Instant::now();
    let params = hybrid.trainable_parameters();
    let trainable_params = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt = Optimizer::new(params, optim.clone(), steps)?;
    let tail = (steps / 10).max(1);
    let (mut first, mut tail_sum) = (f64::NAN, 0.0);
    for s in 0..steps {
        let out = distil_step(hybrid, &mut opt, &data.batch(s)?, registry, terms)?;
        if s == 0 {
            first = out.loss;
        }
        if s >= steps - tail {
            tail_sum += out.loss;
        }
    }
    Ok(ModuleReport {
        index: hybrid.index(),
        steps,
        first_loss: first,
        final_loss: tail_sum / tail as f64,
        seconds: start.elapsed().as_secs_f64(),
        trainable_params,
    })
}

/// Run the hybrids' jobs, in parallel threads or one after the other; the
/// hybrids come back in index order with their reports.
fn run_jobs(
    hybrids: Vec<Hybrid>,
    data: &dyn BatchSource,
    cfg: &DistilConfig,
    registry: &LossRegistry,
    terms: &[LossTerm],
) -> Result<Vec<(Hybrid, ModuleReport)>> {
    let job = |h: &Hybrid| -> Result<ModuleReport> {
        manual_seed(cfg.seed.wrapping_add(h.index() as u64));
        distil_module(h, data, cfg.steps, &cfg.optim, registry, terms).map_err(|e| Error::Job {
            module: h.index(),
            source: Box::new(e),
        })
    };
    let threads = if cfg.threads == 0 {
        hybrids.len()
    } else {
        cfg.threads.min(hybrids.len())
    };
    let mut done: Vec<(Hybrid, ModuleReport)> = if cfg.parallel && threads > 1 {
        let queue = Mutex::new(hybrids.into_iter().rev().collect::<Vec<_>>());
        let results = Mutex::new(Vec::new());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        // Called inside `with_seed`, the workers seed under its lock.
        let held = holds_seed_lock();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    as_seed_lock_holder(held, || {
                        loop {
                            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                            let Some(h) = next else { break };
                            match job(&h) {
                                Ok(r) => results
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((h, r)),
                                Err(e) => {
                                    first_error
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get_or_insert(e);
                                }
                            }
                        }
                    })
                });
            }
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        results.into_inner().unwrap_or_else(|p| p.into_inner())
    } else {
        hybrids
            .into_iter()
            .map(|h| job(&h).map(|r| (h, r)))
            .collect::<Result<_>>()?
    };
    done.sort_by_key(|(h, _)| h.index());
    Ok(done)
}

/// A distilled student module with what it was trained with.
#[derive(Debug)]
pub struct DistilledModule {
    pub index: usize,
    pub module: Slot,
    /// Its hidden width (the student's).
    pub width: i64,
    pub meta_width: i64,
    pub pre: Option<Slot>,
    pub post: Option<Slot>,
    pub projection: Option<Slot>,
    pub report: ModuleReport,
}

/// The outcome of [`distil_all`]: the distilled modules, the teacher back, timings.
#[derive(Debug)]
pub struct Distillation {
    pub modules: Vec<DistilledModule>,
    pub teacher: ModularModel,
    pub wall_seconds: f64,
}

fn device_of(m: &dyn Module) -> Device {
    m.named_parameters()
        .first()
        .map_or(Device::Cpu, |(_, t)| t.device())
}

fn check_counts(meta: &MetaModel, teacher: usize, student: usize) -> Result<()> {
    if teacher != meta.len() || student != meta.len() {
        return Err(Error::config(format!(
            "the meta model has {} modules, the teacher {teacher}, the student {student}; they must agree",
            meta.len()
        )));
    }
    if !meta.is_frozen() {
        return Err(Error::config(
            "the meta model must be frozen before distillation (MetaModel::freeze)",
        ));
    }
    Ok(())
}

/// The seed module `i`'s stitches are initialised with, kept apart from the
/// jobs' dropout seeds (`seed + i`), so the two streams never coincide.
fn stitch_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_add(i as u64) ^ 0x5717_c4e5_0000_0000
}

/// Distil every student module from the matching teacher module (step 3).
/// Module `i`'s stitches are drawn under their own seed (from
/// [`DistilConfig::seed`]), so the same config gives the same start
/// whatever else the program draws, also from other threads.
pub fn distil_all(
    meta: &MetaModel,
    teacher: ModularModel,
    student: ModularModel,
    data: &dyn BatchSource,
    cfg: &DistilConfig,
    registry: &LossRegistry,
) -> Result<Distillation> {
    cfg.validate(registry)?;
    check_counts(meta, teacher.len(), student.len())?;
    let start = Instant::now();
    let device = device_of(meta.model());
    let opts = cfg.hybrid_options(registry)?;
    let (t_modules, t_widths) = teacher.into_modules();
    let (s_modules, s_widths) = student.into_modules();
    let mut hybrids = Vec::with_capacity(meta.len());
    for (i, (t, s)) in t_modules.into_iter().zip(s_modules).enumerate() {
        // Stitches (and a non-identity projection) start from their own
        // seed, not from whatever the global generator holds: other threads
        // of the program may be drawing from it at the same time.
        let replica = meta.replica()?;
        hybrids.push(with_seed(stitch_seed(cfg.seed, i), || {
            Hybrid::new(
                replica,
                i,
                Some((t, t_widths[i])),
                s,
                s_widths[i],
                opts,
                device,
            )
        })?);
    }
    let done = run_jobs(hybrids, data, cfg, registry, &cfg.terms())?;
    let mut modules = Vec::with_capacity(done.len());
    let mut teachers = Vec::with_capacity(done.len());
    for (h, report) in done {
        let (index, width, meta_width) = (h.index(), h.student_width(), h.meta_width());
        let (module, pre, post, projection, t) = h.into_parts();
        teachers.push(t.expect("distil_all builds every hybrid with its teacher"));
        modules.push(DistilledModule {
            index,
            module,
            width,
            meta_width,
            pre,
            post,
            projection,
            report,
        });
    }
    Ok(Distillation {
        modules,
        teacher: ModularModel::new(teachers, t_widths)?,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Deep Incubation's step: train each teacher module inside the frozen
/// meta model with the `ce` loss (no teacher), so that its hybrid
/// classifies well before it teaches. Returns the incubated teacher and the reports.
pub fn incubate(
    meta: &MetaModel,
    teacher: ModularModel,
    data: &dyn BatchSource,
    cfg: &DistilConfig,
    registry: &LossRegistry,
) -> Result<(ModularModel, Vec<ModuleReport>)> {
    let terms = vec![LossTerm::new("ce", 1.0)];
    registry.check(&terms)?;
    cfg.optim.validate()?;
    check_counts(meta, teacher.len(), teacher.len())?;
    let device = device_of(meta.model());
    let (modules, widths) = teacher.into_modules();
    let opts = HybridOptions {
        stitches: StitchPolicy::Never,
        ..HybridOptions::default()
    };
    let mut hybrids = Vec::new();
    for (i, mut m) in modules.into_iter().enumerate() {
        m.set_trainable("*", true);
        hybrids.push(Hybrid::new(
            meta.replica()?,
            i,
            None,
            m,
            widths[i],
            opts,
            device,
        )?);
    }
    let done = run_jobs(hybrids, data, cfg, registry, &terms)?;
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (h, r) in done {
        out.push(h.into_parts().0);
        reports.push(r);
    }
    Ok((ModularModel::new(out, widths)?, reports))
}

/// Step 4: the student from its distilled modules, stitches kept
/// (`post(S_i(pre(·)))` at the meta width) or dropped (every module must
/// then have one width). Every index `0..M` must be present exactly once.
pub fn assemble(mut modules: Vec<DistilledModule>, keep_stitches: bool) -> Result<ModularModel> {
    if modules.is_empty() {
        return Err(Error::Assembly("no distilled modules".into()));
    }
    modules.sort_by_key(|m| m.index);
    for (want, m) in modules.iter().enumerate() {
        if m.index != want {
            return Err(Error::Assembly(if m.index < want {
                format!("module {} is given twice", m.index)
            } else {
                format!("module {want} is missing")
            }));
        }
    }
    let mut slots = Vec::with_capacity(modules.len());
    let mut widths = Vec::with_capacity(modules.len());
    for m in modules {
        let stitched = m.pre.is_some() || m.post.is_some();
        if keep_stitches && stitched {
            widths.push(m.meta_width);
            slots.push(Box::new(Stitched {
                pre: m.pre,
                module: m.module,
                post: m.post,
            }) as Slot);
        } else {
            widths.push(m.width);
            slots.push(m.module);
        }
    }
    ModularModel::new(slots, widths).map_err(|e| match e {
        Error::WidthMismatch { module, width, meta, .. } => Error::Assembly(format!(
            "module {module} has width {width} but module {} writes width {meta}; keep the stitches (keep_stitches) or distil modules of one width",
            module - 1
        )),
        other => other,
    })
}

/// Save a distilled module, with its stitches (`stitch_pre.*`,
/// `stitch_post.*`) and projection (`projection.*`), to one safetensors file.
pub fn save_module(m: &DistilledModule, path: impl AsRef<Path>) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = m.module.named_parameters();
    for (prefix, part) in [
        ("stitch_pre", &m.pre),
        ("stitch_post", &m.post),
        ("projection", &m.projection),
    ] {
        if let Some(p) = part {
            named.extend(
                p.named_parameters()
                    .into_iter()
                    .map(|(n, t)| (format!("{prefix}.{n}"), t)),
            );
        }
    }
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([
        ("m2mkd.index".to_owned(), m.index.to_string()),
        ("m2mkd.width".to_owned(), m.width.to_string()),
        ("m2mkd.meta_width".to_owned(), m.meta_width.to_string()),
    ]);
    tensor_core::io::save(path, &refs, Some(meta))?;
    Ok(())
}

/// Load module `index` of `student` from a [`save_module`] file, the
/// stitches and projection left out (the paper's non-strict load). Every
/// parameter of the student module must be in the file; returns how many
/// were loaded and the names in the file that were not used.
pub fn load_module(
    student: &mut ModularModel,
    index: usize,
    path: impl AsRef<Path>,
) -> Result<(usize, Vec<String>)> {
    let path = path.as_ref();
    let file = tensor_core::io::SafetensorsFile::open(path)?;
    if let Some(i) = file.metadata().and_then(|m| m.get("m2mkd.index"))
        && i != &index.to_string()
    {
        return Err(Error::Assembly(format!(
            "{} holds module {i}, not module {index}",
            path.display()
        )));
    }
    let slot = student.module_mut(index)?;
    let device = device_of(slot.as_ref());
    let values = file.load_all_weights(device)?;
    let (own, skipped): (Vec<_>, Vec<_>) = values.into_iter().partition(|(n, _)| {
        !(n.starts_with("stitch_pre.")
            || n.starts_with("stitch_post.")
            || n.starts_with("projection."))
    });
    let missing = slot.load_named(&own, false)?;
    if let Some(first) = missing.first() {
        return Err(Error::Assembly(format!(
            "{}: no value for parameter '{first}' of module {index} ({} missing)",
            path.display(),
            missing.len()
        )));
    }
    let names: std::collections::HashSet<String> = slot
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut unused: Vec<String> = own
        .iter()
        .filter(|(n, _)| !names.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    if !unused.is_empty() {
        return Err(Error::Assembly(format!(
            "{}: parameter '{}' names nothing in module {index}",
            path.display(),
            unused[0]
        )));
    }
    unused.extend(skipped.into_iter().map(|(n, _)| n));
    Ok((names.len(), unused))
}

/// What an end-to-end run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub steps: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub seconds: f64,
}

/// Train `model` end to end for `steps` steps: CE on the labels, or eq. 2
/// against `teacher` (standard logit KD) when one is given. Used for the
/// meta model, the assembled student and the baselines.
pub fn train_end_to_end(
    model: &dyn Module,
    teacher: Option<&dyn Module>,
    data: &dyn BatchSource,
    steps: u64,
    optim: &OptimConfig,
    kd: &KdConfig,
    seed: u64,
) -> Result<TrainReport> {
    kd.validate()?;
    let start = Instant::now();
    let mut opt = Optimizer::new(model.trainable_parameters(), optim.clone(), steps)?;
    manual_seed(seed);
    let tail = (steps / 10).max(1);
    let (mut first, mut tail_sum) = (f64::NAN, 0.0);
    for s in 0..steps {
        let batch = data.batch(s)?;
        let zt = match teacher {
            Some(t) => {
                let mut ctx = batch.context(false);
                Some(tensor_core::tch::no_grad(|| {
                    t.forward(&batch.input, &mut ctx)
                })?)
            }
            None => None,
        };
        let mut ctx = batch.context(true);
        let zs = model.forward(&batch.input, &mut ctx)?;
        let mut loss = match &zt {
            Some(zt) => m2mkd_loss(&zs, zt, &batch.targets, kd)?.total,
            None => cross_entropy(&zs, &batch.targets, kd.label_smoothing)?,
        };
        if !ctx.aux_losses().is_empty() {
            loss = loss.f_add(&ctx.aux_loss_total(zs.device())?)?;
        }
        let value = scalar("the training loss", &loss)?;
        opt.zero_grad()?;
        loss.f_backward()?;
        opt.step()?;
        if s == 0 {
            first = value;
        }
        if s >= steps - tail {
            tail_sum += value;
        }
    }
    Ok(TrainReport {
        steps,
        first_loss: first,
        final_loss: tail_sum / tail as f64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Logits of `model` on `input` in evaluation mode, without a graph.
pub fn predict(model: &dyn Module, input: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let mut ctx = Context::eval();
    ctx.attention_mask = mask.map(Tensor::shallow_clone);
    let z = tensor_core::tch::no_grad(|| model.forward(input, &mut ctx))?;
    Ok(z.f_to_kind(Kind::Float)?)
}
