//! Fine-tuning a BERT encoder for text classification: the recipe behind
//! `cargo xtask finetune` (and `modular finetune`).
//!
//! Mean pooling + dropout + linear head on the encoder (the sentence-
//! transformers view of MiniLM), cross-entropy, AdamW with the usual
//! no-decay group, linear warm-up then linear decay, gradient clipping at 1.
//! Every step is seeded: the same options give the same run on the CPU.

use std::time::Instant;

use tensor_core::ModuleExt;
use tensor_core::seed::with_seed;
use tensor_core::tch::{Device, Tensor};
use tensor_core::train::{
    AdamW, AdamWConfig, Batch, BatchPlan, ClassificationMetrics, LrSchedule, ScheduleKind,
    SplitMix64, TrainOptions, evaluate, pad_batch_with_labels, train_epoch,
};

pub use tensor_core::train::{NoHooks, TrainHooks};

use crate::bert::{BertModel, Pooling, SequenceClassifier};
use crate::data::{TextClassification, TextExample, majority_rate};
use crate::error::{Error, Result};
use crate::source::ModelSource;
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub epochs: u64,
    pub batch_size: usize,
    /// Tokens per text, special tokens included.
    pub max_len: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    /// Use only the first N training examples (after a seeded shuffle).
    pub train_limit: Option<usize>,
    /// Evaluate on at most N examples of each evaluation set (the same
    /// seeded subset in every run), to fit experiments into a time budget.
    pub eval_limit: Option<usize>,
    pub seed: u64,
    pub progress: bool,
    /// Further test sets scored after training, by name (e.g. a second
    /// out-of-domain set); each gets metrics and per-example correctness in
    /// [`FinetuneReport::extra_tests`].
    pub extra_tests: Vec<(String, Vec<TextExample>)>,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            max_len: 64,
            lr: 5e-5,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            train_limit: None,
            eval_limit: None,
            seed: 0,
            progress: true,
            extra_tests: Vec::new(),
        }
    }
}

/// The hooks of this recipe: any [`TrainHooks`] on a [`SequenceClassifier`]
/// with model-zoo's error (implement `TrainHooks<SequenceClassifier,
/// model_zoo::Error>`; this trait follows). Through them a method crate
/// converts FFNs into experts or wraps projections before training,
/// refreshes a gate after each step, and folds back or merges before
/// evaluation, without model-zoo knowing it.
pub trait FinetuneHooks: TrainHooks<SequenceClassifier, Error> {}

impl<T: TrainHooks<SequenceClassifier, Error> + ?Sized> FinetuneHooks for T {}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct FinetuneReport {
    pub train_examples: usize,
    pub epochs: u64,
    pub train_seconds: f64,
    pub final_train_loss: f64,
    pub validation: ClassificationMetrics,
    pub test: ClassificationMetrics,
    /// The out-of-domain test set, when the data has one.
    pub test_ood: Option<ClassificationMetrics>,
    /// What the hooks did.
    pub notes: Vec<String>,
    /// Share of the majority class in the test set: the accuracy to beat.
    pub test_majority: f64,
    pub trainable_params: i64,
    /// Whether each scored test example (file order; the subset under
    /// `eval_limit`) was classified correctly: what a paired test over
    /// examples needs.
    pub test_correct: Vec<bool>,
    /// The same for the out-of-domain test set.
    pub test_ood_correct: Option<Vec<bool>>,
    /// `FinetuneOptions::extra_tests`: name, metrics, per-example correctness.
    pub extra_tests: Vec<(String, ClassificationMetrics, Vec<bool>)>,
}

fn encode(tok: &TextTokenizer, examples: &[TextExample]) -> Result<Vec<Vec<i64>>> {
    examples.iter().map(|e| tok.encode_ids(&e.text)).collect()
}

/// Examples per evaluation batch (fine-tuning's scoring and [`class_logits`]
/// batch alike, so the two give the same logits bit for bit).
pub const EVAL_BATCH: usize = 64;

/// The class logits `[n, classes]` (on the host) of `texts` under `model`
/// in evaluation mode, in consecutive batches of [`EVAL_BATCH`] padded as
/// fine-tuning's scoring pads them.
pub fn class_logits(
    model: &SequenceClassifier,
    tok: &TextTokenizer,
    texts: &[&str],
    device: Device,
) -> Result<Tensor> {
    let pad = tok.pad_id as i64;
    let plan = BatchPlan::new(texts.len(), EVAL_BATCH)?;
    let mut out = Vec::new();
    for idx in plan.epoch(0) {
        let seqs = idx
            .iter()
            .map(|&i| tok.encode_ids(texts[i]))
            .collect::<Result<Vec<_>>>()?;
        let b = pad_batch_with_labels(&seqs, &vec![0; idx.len()], pad, None, device)?;
        let logits =
            tensor_core::tch::no_grad(|| model.logits(&b.input_ids, &b.attention_mask, false))?;
        out.push(logits.f_to_device(Device::Cpu)?);
    }
    Ok(Tensor::f_cat(&out, 0)?)
}

/// Fine-tune the encoder at `source` on `data`, evaluate on validation and test.
pub fn finetune(
    source: &ModelSource,
    data: &TextClassification,
    opts: &FinetuneOptions,
    device: Device,
) -> Result<FinetuneReport> {
    finetune_with(source, data, opts, device, &mut NoHooks)
}

/// [`finetune`] with [`FinetuneHooks`].
pub fn finetune_with(
    source: &ModelSource,
    data: &TextClassification,
    opts: &FinetuneOptions,
    device: Device,
    hooks: &mut dyn FinetuneHooks,
) -> Result<FinetuneReport> {
    if opts.epochs == 0 || opts.batch_size == 0 {
        return Err(Error::invalid(
            "finetune: epochs and batch_size must be positive",
        ));
    }
    let bert = BertModel::from_source(source, device)?;
    let tok = TextTokenizer::from_file(
        source.tokenizer_path(),
        opts.max_len,
        bert.config.vocab_size,
    )?;
    let pad = tok.pad_id as i64;
    let mut model = with_seed(opts.seed, || {
        SequenceClassifier::new(bert, data.num_labels, Pooling::Mean)
    })?;
    let mut notes = vec![hooks.prepare(&mut model)?];

    let mut train: Vec<TextExample> = data.train.clone();
    let mut rng = SplitMix64::new(opts.seed);
    rng.shuffle(&mut train);
    if let Some(n) = opts.train_limit {
        train.truncate(n);
    }
    let train_ids = encode(&tok, &train)?;
    let train_labels: Vec<i64> = train.iter().map(|e| e.label).collect();

    let plan = BatchPlan::new(train.len(), opts.batch_size)?.shuffled(opts.seed);
    let total = plan.num_batches() as u64 * opts.epochs;
    let schedule = LrSchedule::with_warmup_ratio(ScheduleKind::Linear, opts.warmup_ratio, total)?;
    let mut opt = AdamW::new(
        model.trainable_parameters(),
        AdamWConfig::new(opts.lr).with_weight_decay(opts.weight_decay),
    )?;
    let mut options = TrainOptions::default()
        .with_schedule(schedule)
        .with_clip_norm(1.0);
    options.progress = opts.progress;

    let start = Instant::now();
    let mut last = 0.0;
    let batch_of = |idx: &[usize]| -> Result<Batch> {
        let seqs: Vec<&[i64]> = idx.iter().map(|&i| train_ids[i].as_slice()).collect();
        let labels: Vec<i64> = idx.iter().map(|&i| train_labels[i]).collect();
        Ok(pad_batch_with_labels(&seqs, &labels, pad, None, device)?)
    };
    // Cross-entropy plus whatever auxiliary losses the model's modules added
    // to the forward context (already weighted by the modules: a MoE layer's
    // balance loss, EMoE's CV² loss).
    let loss_of = |model: &SequenceClassifier, b: &Batch| -> Result<Tensor> {
        let (logits, aux) = model.logits_with_aux(&b.input_ids, &b.attention_mask, true)?;
        let y = b
            .labels
            .as_ref()
            .ok_or_else(|| Error::invalid("finetune: a training batch without labels"))?;
        let ce = logits.f_cross_entropy_loss::<Tensor>(
            y,
            None,
            tensor_core::tch::Reduction::Mean,
            -100,
            0.0,
        )?;
        Ok(match aux {
            Some(a) => ce.f_add(&a)?,
            None => ce,
        })
    };
    for epoch in 0..opts.epochs {
        // Dropout masks are drawn from libtorch's global generator: seed it per epoch.
        tensor_core::seed::manual_seed(opts.seed.wrapping_add(epoch));
        let label = format!("epoch {}", epoch + 1);
        let stats = if hooks.after_step(&mut model).is_none() {
            train_epoch(
                plan.epoch(epoch),
                &mut opt,
                &options.clone().with_label(label),
                |idx| loss_of(&model, &batch_of(idx)?),
            )?
        } else {
            // One step at a time, so the hook can act on the model in between.
            let quiet = options.clone().quiet();
            let (mut sum, mut steps, mut stats) = (0.0, 0usize, None);
            for idx in plan.epoch(epoch) {
                let s = train_epoch(std::iter::once(idx), &mut opt, &quiet, |idx| {
                    loss_of(&model, &batch_of(idx)?)
                })?;
                if let Some(r) = hooks.after_step(&mut model) {
                    r?;
                }
                sum += s.mean_loss;
                steps += 1;
                stats = Some(s);
            }
            let mut s = stats.ok_or_else(|| Error::invalid("finetune: no training batches"))?;
            s.mean_loss = sum / steps as f64;
            s.steps = steps;
            s
        };
        last = stats.mean_loss;
        if opts.progress {
            eprintln!("epoch {}: {stats}", epoch + 1);
        }
    }
    let train_seconds = start.elapsed().as_secs_f64();

    notes.push(hooks.before_eval(&mut model)?);
    notes.retain(|n| !n.is_empty());
    let eval = |examples: &[TextExample]| -> Result<(ClassificationMetrics, Vec<bool>)> {
        let subset: Vec<TextExample>;
        let examples = match opts.eval_limit {
            Some(n) if n < examples.len() => {
                // One fixed subset per set, independent of the run's seed.
                let mut idx: Vec<usize> = (0..examples.len()).collect();
                SplitMix64::new(0x5eed_e7a1).shuffle(&mut idx);
                subset = idx[..n].iter().map(|&i| examples[i].clone()).collect();
                &subset[..]
            }
            _ => examples,
        };
        let ids = encode(&tok, examples)?;
        let labels: Vec<i64> = examples.iter().map(|e| e.label).collect();
        let plan = BatchPlan::new(examples.len(), EVAL_BATCH)?;
        let out = evaluate(plan.epoch(0), opts.progress, |idx| -> Result<Tensor> {
            let seqs: Vec<&[i64]> = idx.iter().map(|&i| ids[i].as_slice()).collect();
            let b = pad_batch_with_labels(&seqs, &vec![0; idx.len()], pad, None, device)?;
            model.logits(&b.input_ids, &b.attention_mask, false)
        })?;
        let mut correct = vec![false; labels.len()];
        for (&i, &p) in out.indices.iter().zip(&out.predictions) {
            correct[i] = p == labels[i];
        }
        Ok((out.metrics(&labels)?, correct))
    };
    let (validation, _) = eval(&data.validation)?;
    let (test, test_correct) = eval(&data.test)?;
    let (test_ood, test_ood_correct) = match data.test_ood.as_deref().map(eval).transpose()? {
        Some((m, c)) => (Some(m), Some(c)),
        None => (None, None),
    };
    let extra_tests = opts
        .extra_tests
        .iter()
        .map(|(name, set)| eval(set).map(|(m, c)| (name.clone(), m, c)))
        .collect::<Result<Vec<_>>>()?;
    Ok(FinetuneReport {
        train_examples: train.len(),
        epochs: opts.epochs,
        train_seconds,
        final_train_loss: last,
        validation,
        test,
        test_ood,
        notes,
        test_majority: majority_rate(&data.test),
        // (over the full test set, also when evaluation is subsampled)
        trainable_params: model.param_count().trainable,
        test_correct,
        test_ood_correct,
        extra_tests,
    })
}
