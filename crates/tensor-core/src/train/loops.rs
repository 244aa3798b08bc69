//! Model-agnostic training and evaluation loops.
//!
//! The caller owns the model and the data; a loop only sees index batches
//! and a closure. Per training step (the order of a Hugging Face `Trainer`
//! step without gradient accumulation):
//!
//! ```text
//! lr ← base_lr · schedule.factor(optimizer.step_count())   if a schedule is given
//! loss ← f(indices)                                        must be a finite scalar
//! loss.backward();  clip_grad_norm(params, max_norm)       if a clip norm is given
//! optimizer.step();  optimizer.zero_grad()
//! ```
//!
//! The schedule's step is the optimiser's global step count, so one schedule
//! spans every epoch. Reading the loss for the NaN check and the running mean
//! costs one host synchronisation per step. An `indicatif` progress bar shows
//! the running mean loss on stderr, hidden when stderr is not a terminal or
//! when the `CI` environment variable is set.

use std::io::IsTerminal;
use std::time::Instant;

use crate::TchResultExt;
use crate::tch::{self, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::clip::clip_grad_norm;
use super::metrics::{ClassificationMetrics, class_ids};
use super::optim::AdamW;
use super::schedule::LrSchedule;
use crate::error::{Error, Result};

/// What a training epoch does besides forward/backward/step.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Scales the optimiser's base learning rate before each step.
    pub schedule: Option<LrSchedule>,
    /// Clip the global gradient L2 norm to this value (> 0).
    pub clip_norm: Option<f64>,
    /// Show a progress bar (still hidden off a terminal or under `CI`).
    pub progress: bool,
    /// Progress bar prefix.
    pub label: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            schedule: None,
            clip_norm: None,
            progress: true,
            label: "train".to_owned(),
        }
    }
}

impl TrainOptions {
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    pub fn with_clip_norm(mut self, max_norm: f64) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// No progress bar.
    pub fn quiet(mut self) -> Self {
        self.progress = false;
        self
    }
}

/// What one training epoch did.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStats {
    /// Mean of the per-step losses.
    pub mean_loss: f64,
    /// Loss of the last step.
    pub last_loss: f64,
    pub steps: usize,
    pub examples: usize,
    pub seconds: f64,
    pub examples_per_sec: f64,
    /// Learning rate of the last step.
    pub last_lr: f64,
    /// Largest gradient norm before clipping (when clipping).
    pub max_grad_norm: Option<f64>,
}

impl std::fmt::Display for EpochStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loss {:.4} over {} steps ({} examples, {:.1} examples/s, lr {:.3e})",
            self.mean_loss, self.steps, self.examples, self.examples_per_sec, self.last_lr
        )
    }
}

fn progress_bar(len: usize, show: bool, label: &str) -> ProgressBar {
    let visible = show && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
    if !visible {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(label.to_owned());
    pb
}

fn per_sec(examples: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        examples as f64 / seconds
    } else {
        0.0
    }
}

/// One pass over `batches`: for each index batch, `loss_fn` computes a scalar
/// loss (forward pass in training mode), then backward, optional clipping,
/// `opt.step()` and `opt.zero_grad()` (see the module docs). A NaN or
/// infinite loss stops the epoch with an error naming the step. The
/// closure's error type is the caller's (any error a kit error converts
/// into), so a data error from inside the closure comes back unchanged.
pub fn train_epoch<I, F, E>(
    batches: I,
    opt: &mut AdamW,
    options: &TrainOptions,
    mut loss_fn: F,
) -> Result<EpochStats, E>
where
    I: IntoIterator<Item = Vec<usize>>,
    F: FnMut(&[usize]) -> Result<Tensor, E>,
    E: From<Error>,
{
    if let Some(s) = &options.schedule {
        s.validate()?;
    }
    if let Some(c) = options.clip_norm
        && !(c.is_finite() && c > 0.0)
    {
        return Err(E::from(Error::invalid(format!(
            "train_epoch: clip norm must be finite and > 0, got {c}"
        ))));
    }
    let params = opt.parameters();
    let batches = batches.into_iter();
    let pb = progress_bar(batches.size_hint().0, options.progress, &options.label);
    let start = Instant::now();
    let (mut steps, mut examples) = (0usize, 0usize);
    let (mut loss_sum, mut last_loss) = (0.0f64, f64::NAN);
    let mut max_grad_norm: Option<f64> = None;
    opt.zero_grad()?;
    for indices in batches {
        let step = opt.step_count();
        if indices.is_empty() {
            return Err(E::from(Error::invalid(format!(
                "train_epoch: step {step}: empty index batch"
            ))));
        }
        if let Some(s) = &options.schedule {
            opt.set_lr(opt.base_lr() * s.factor(step))?;
        }
        let loss = loss_fn(&indices)?;
        if loss.numel() != 1 {
            return Err(E::from(Error::invalid(format!(
                "train_epoch: step {step}: the loss must be a scalar, got shape {:?}",
                loss.size()
            ))));
        }
        let value = loss
            .f_detach()
            .and_then(|l| l.f_flatten(0, -1))
            .and_then(|l| l.f_double_value(&[0]))
            .op("train_epoch: loss")?;
        if !value.is_finite() {
            pb.abandon();
            return Err(E::from(Error::invalid(format!(
                "train_epoch: the loss is {value} at step {step} (batch {steps} of this epoch); stopping"
            ))));
        }
        loss.f_backward().op("train_epoch: backward")?;
        if let Some(max_norm) = options.clip_norm {
            let norm = clip_grad_norm(&params, max_norm)
                .map_err(|e| Error::invalid(format!("train_epoch: step {step}: {e}")))?;
            max_grad_norm = Some(max_grad_norm.map_or(norm, |m| m.max(norm)));
        }
        opt.step()?;
        opt.zero_grad()?;
        steps += 1;
        examples += indices.len();
        loss_sum += value;
        last_loss = value;
        pb.inc(1);
        pb.set_message(format!(
            "loss {:.4} lr {:.2e}",
            loss_sum / steps as f64,
            opt.lr()
        ));
    }
    pb.finish_and_clear();
    if steps == 0 {
        return Err(E::from(Error::invalid(
            "train_epoch: no batches (is the dataset smaller than a batch with drop_last?)",
        )));
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(EpochStats {
        mean_loss: loss_sum / steps as f64,
        last_loss,
        steps,
        examples,
        seconds,
        examples_per_sec: per_sec(examples, seconds),
        last_lr: opt.lr(),
        max_grad_norm,
    })
}

/// Predictions of one evaluation pass, in the order the examples were visited.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOutput {
    /// Example indices, as visited.
    pub indices: Vec<usize>,
    /// The predicted class of `indices[i]` at position `i`.
    pub predictions: Vec<i64>,
    pub steps: usize,
    pub seconds: f64,
    pub examples_per_sec: f64,
}

impl EvalOutput {
    /// The labels of the visited examples, in visiting order, from the
    /// labels of the whole dataset.
    pub fn labels_for(&self, all_labels: &[i64]) -> Result<Vec<i64>> {
        self.indices
            .iter()
            .map(|&i| {
                all_labels.get(i).copied().ok_or_else(|| {
                    Error::invalid(format!(
                        "EvalOutput: example {i} has no label ({} labels given)",
                        all_labels.len()
                    ))
                })
            })
            .collect()
    }

    /// Accuracy, macro-F1 and MCC against the dataset's labels.
    pub fn metrics(&self, all_labels: &[i64]) -> Result<ClassificationMetrics> {
        ClassificationMetrics::new(&self.predictions, &self.labels_for(all_labels)?)
    }
}

/// One pass over `batches` under `no_grad`: `predict` returns, for an index
/// batch, class ids (`[B]`, any integer dtype) or scores (`[B, C]`, argmax
/// taken), one per index.
pub fn evaluate<I, F, E>(batches: I, show_progress: bool, mut predict: F) -> Result<EvalOutput, E>
where
    I: IntoIterator<Item = Vec<usize>>,
    F: FnMut(&[usize]) -> Result<Tensor, E>,
    E: From<Error>,
{
    let batches = batches.into_iter();
    let pb = progress_bar(batches.size_hint().0, show_progress, "eval");
    let start = Instant::now();
    let mut out = EvalOutput {
        indices: Vec::new(),
        predictions: Vec::new(),
        steps: 0,
        seconds: 0.0,
        examples_per_sec: 0.0,
    };
    for indices in batches {
        let step = out.steps;
        let scores = tch::no_grad(|| predict(&indices))?;
        let ids = class_ids(&scores)?;
        if ids.len() != indices.len() {
            pb.abandon();
            return Err(E::from(Error::invalid(format!(
                "evaluate: batch {step}: {} predictions (shape {:?}) for {} examples",
                ids.len(),
                scores.size(),
                indices.len()
            ))));
        }
        out.indices.extend_from_slice(&indices);
        out.predictions.extend(ids);
        out.steps += 1;
        pb.inc(1);
    }
    pb.finish_and_clear();
    if out.steps == 0 {
        return Err(E::from(Error::invalid("evaluate: no batches")));
    }
    out.seconds = start.elapsed().as_secs_f64();
    out.examples_per_sec = per_sec(out.indices.len(), out.seconds);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use crate::tch::{Device, Kind, Reduction};
    use crate::testing::{device, randn_seeded, with_seed};
    use crate::train::batch::BatchPlan;
    use crate::train::optim::AdamWConfig;
    use crate::train::schedule::ScheduleKind;
    use crate::{Context, Module};

    /// y = x·[1.5, −2, 0.5] + 0.3, fitted by a Linear(3, 1) with AdamW, a
    /// cosine schedule with warm-up and clipping.
    #[test]
    fn fits_linear_regression() {
        let device = device();
        let x = randn_seeded(&[64, 3], 1, device).unwrap();
        let w = Tensor::from_slice(&[1.5f32, -2.0, 0.5])
            .to_device(device)
            .reshape([3, 1]);
        let y = x.matmul(&w) + 0.3;
        let model = with_seed(2, || Linear::new(3, 1, true, device)).unwrap();
        let mut opt =
            AdamW::for_module(&model, AdamWConfig::new(0.1).with_weight_decay(0.0)).unwrap();
        let plan = BatchPlan::new(64, 8).unwrap().shuffled(3);
        let epochs = 40u64;
        let total = epochs * plan.num_batches() as u64;
        let options = TrainOptions::default()
            .with_schedule(LrSchedule::new(ScheduleKind::Cosine, 10, total).unwrap())
            .with_clip_norm(5.0)
            .quiet();
        let mut first = None;
        let mut stats = None;
        for epoch in 0..epochs {
            let s = train_epoch(plan.epoch(epoch), &mut opt, &options, |idx| {
                let idx_t = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>())
                    .to_device(device);
                let pred = model.forward(&x.index_select(0, &idx_t), &mut Context::train())?;
                Ok::<_, Error>(pred.mse_loss(&y.index_select(0, &idx_t), Reduction::Mean))
            })
            .unwrap();
            first.get_or_insert(s.mean_loss);
            stats = Some(s);
        }
        let s = stats.unwrap();
        assert_eq!(opt.step_count(), total);
        assert_eq!((s.steps, s.examples), (8, 64));
        assert!(s.max_grad_norm.is_some());
        assert!(
            s.last_lr < 0.1 * 0.01,
            "cosine schedule ends near 0, got {}",
            s.last_lr
        );
        assert!(
            s.mean_loss < 1e-3,
            "loss {} (first epoch {})",
            s.mean_loss,
            first.unwrap()
        );
        eprintln!(
            "linear regression: first epoch loss {:.4}, last {:.2e}",
            first.unwrap(),
            s.mean_loss
        );
    }

    /// Two separable blobs, Linear(2, 2) with cross-entropy; evaluate gives accuracy 1.
    #[test]
    fn fits_classification_and_evaluates() {
        let device = device();
        let n = 80i64;
        let labels: Vec<i64> = (0..n).map(|i| i % 2).collect();
        let centers = Tensor::from_slice(&labels)
            .to_device(device)
            .to_kind(Kind::Float)
            * 4.0
            - 2.0;
        let x = randn_seeded(&[n, 2], 5, device).unwrap() * 0.5 + centers.unsqueeze(1);
        let y = Tensor::from_slice(&labels).to_device(device);
        let model = with_seed(6, || Linear::new(2, 2, true, device)).unwrap();
        let mut opt = AdamW::for_module(&model, AdamWConfig::new(0.05)).unwrap();
        let plan = BatchPlan::new(n as usize, 16).unwrap().shuffled(7);
        let options = TrainOptions::default().quiet();
        let rows = |idx: &[usize]| {
            Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device)
        };
        let mut last = f64::INFINITY;
        for epoch in 0..30 {
            last = train_epoch(plan.epoch(epoch), &mut opt, &options, |idx| {
                let i = rows(idx);
                let logits = model.forward(&x.index_select(0, &i), &mut Context::train())?;
                Ok::<_, Error>(logits.cross_entropy_for_logits(&y.index_select(0, &i)))
            })
            .unwrap()
            .mean_loss;
        }
        assert!(last < 0.05, "loss {last}");
        let eval_plan = BatchPlan::new(n as usize, 32).unwrap();
        let out = evaluate(eval_plan.epoch(0), false, |idx| {
            model.forward(&x.index_select(0, &rows(idx)), &mut Context::eval())
        })
        .unwrap();
        assert_eq!(out.indices, (0..n as usize).collect::<Vec<_>>());
        assert_eq!(out.steps, 3);
        let m = out.metrics(&labels).unwrap();
        assert_eq!((m.accuracy, m.mcc), (1.0, 1.0));
        assert!(out.labels_for(&labels[..3]).is_err());
    }

    #[test]
    fn nan_loss_names_the_step() {
        let p = Tensor::ones([2], (Kind::Float, device())).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let plan = BatchPlan::new(10, 2).unwrap();
        let mut calls = 0;
        let e = train_epoch(
            plan.epoch(0),
            &mut opt,
            &TrainOptions::default().quiet(),
            |_| {
                calls += 1;
                let l = p.sum(Kind::Float);
                Ok::<_, Error>(if calls == 3 { l * f64::NAN } else { l })
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the loss is NaN at step 2"), "{e}");
        assert_eq!(opt.step_count(), 2);
    }

    #[test]
    fn bad_loops_are_errors() {
        // Refused settings and results, checked on the host: nothing to compute.
        let p = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let quiet = TrainOptions::default().quiet();
        let e = train_epoch(vec![vec![0, 1]], &mut opt, &quiet, |_| {
            Ok::<_, Error>(&p * 2.0)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be a scalar"), "{e}");
        let e = train_epoch(Vec::<Vec<usize>>::new(), &mut opt, &quiet, |_| {
            Ok::<_, Error>(p.sum(Kind::Float))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("no batches"), "{e}");
        let bad = TrainOptions::default().quiet().with_clip_norm(-1.0);
        assert!(
            train_epoch(vec![vec![0]], &mut opt, &bad, |_| Ok::<_, Error>(
                p.sum(Kind::Float)
            ))
            .is_err()
        );
        let bad_schedule = TrainOptions {
            schedule: Some(LrSchedule {
                warmup_steps: 5,
                total_steps: 2,
                kind: ScheduleKind::Linear,
                warmup_start: Default::default(),
            }),
            ..quiet.clone()
        };
        let e = train_epoch(vec![vec![0]], &mut opt, &bad_schedule, |_| {
            Ok::<_, Error>(p.sum(Kind::Float))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("exceeds total_steps"), "{e}");
        // The closure's own error comes back unchanged.
        let e = train_epoch(vec![vec![0]], &mut opt, &quiet, |_| {
            Err(Error::invalid("boom"))
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, "boom");
        let e = evaluate(vec![vec![0, 1, 2]], false, |_| {
            Ok::<_, Error>(Tensor::from_slice(&[1i64, 0]))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("2 predictions"), "{e}");
        assert_eq!(opt.step_count(), 0);
    }
}
