//! `modular demo` (what `cargo xtask demo` runs): every method crate on the
//! embedded default model (all-MiniLM-L6-v2) and the project's real data,
//! through the crates' public APIs as a user would call them. Prints one
//! summary table and writes `target/demo/report.md` with SVG plots.
//!
//! Steps: sentence embeddings and ranking; EMoE split of all six FFNs;
//! LoRA and VL-PET tuning; two orthogonal adapters trained on two tasks and
//! merged; functional bricks profiled on the five-functionality corpus and
//! each brick zeroed in turn; a modular MoE student distilled from the
//! fine-tuned MiniLM with m2mKD, against the same student trained from
//! scratch. `--fast` shrinks every budget (the test suite runs it).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use emergent_split::{EmoeConfig, EmoeFfn, convert};
use model_zoo::bert::SentenceEncoder;
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, finetune_with};
use model_zoo::source::ModelSource;
use orthogonal_merge::{BasisKind, FrozenSide, MergeConfig, Method, Registry, TaskDelta, merge};
use tensor_core::grouped::{Dispatch, grouped_linear};
use tensor_core::layers::{Activation, FeedForward};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::closeness;

use recipes::merge::{Arm, MergeHooks, TARGETS, encode, eval_subset, score_merged, tasks};
use recipes::svg;
use recipes::tune::{Kind as TuneKind, tune_once};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

pub const DEMO_HELP: &str = "usage: modular demo [--model DIR] [--fast] [--out DIR]
  Runs every method on all-MiniLM-L6-v2 (or --model DIR / $MODULAR_MODEL_DIR) and the project's
  data: EMoE split, LoRA and VL-PET tuning, orthogonal adapters merged, functional bricks profiled,
  a modular student distilled with m2mKD. Prints a summary table and writes DIR/report.md with SVG plots (default target/demo).
  --fast: tiny budgets (seconds per step), to check the pipeline.";

const CORPUS: &[&str] = &[
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome and the acting is superb.",
    "The film was boring and far too long.",
    "Low-rank adapters fine-tune large models cheaply.",
    "Mixture-of-experts layers route each token to a few experts.",
];
const QUERIES: &[&str] = &[
    "Someone is having a meal.",
    "I loved this film!",
    "parameter-efficient fine-tuning",
];

/// Budgets of one demo run.
#[derive(Debug, Clone)]
struct Budget {
    pub fast: bool,
    pub train_limit: usize,
    pub eval_limit: usize,
    pub max_len: usize,
}

impl Budget {
    fn new(fast: bool) -> Self {
        if fast {
            Self {
                fast,
                train_limit: 48,
                eval_limit: 48,
                max_len: 32,
            }
        } else {
            Self {
                fast,
                train_limit: 1600,
                eval_limit: 400,
                max_len: 64,
            }
        }
    }

    pub fn finetune(&self, lr: f64) -> FinetuneOptions {
        FinetuneOptions {
            lr,
            max_len: self.max_len,
            train_limit: Some(self.train_limit),
            eval_limit: Some(self.eval_limit),
            progress: !self.fast,
            ..FinetuneOptions::default()
        }
    }
}

/// One line of the summary table.
#[derive(Debug, Clone, Default)]
struct Step {
    pub what: String,
    pub result: String,
    pub accuracy: Option<f64>,
    pub trainable_percent: Option<f64>,
    pub seconds: f64,
}

/// Everything the report draws.
#[derive(Debug, Default)]
struct Report {
    steps: Vec<Step>,
    /// (label, accuracy) bars of the tuning and merging steps.
    accuracies: Vec<(String, f64)>,
    /// (task, alone, merged) of the merge step.
    merge: Vec<(String, f64, f64)>,
    /// Per layer: (k-means objective, random objective) of the EMoE split.
    objectives: Vec<(f64, f64)>,
    /// Functionalities and the bricks step's perturbation matrix (distortion).
    perturbation: Option<(Vec<String>, Vec<Vec<f64>>)>,
    notes: Vec<String>,
}

fn parse(args: &[String]) -> AnyResult<Option<(Option<PathBuf>, bool, PathBuf)>> {
    let mut model = None;
    let mut fast = false;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/demo");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{DEMO_HELP}"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--out" => out = PathBuf::from(value("--out")?),
            "--fast" => fast = true,
            "--help" | "-h" => {
                println!("{DEMO_HELP}");
                return Ok(None);
            }
            other => return Err(format!("unknown option '{other}'\n{DEMO_HELP}").into()),
        }
    }
    Ok(Some((model, fast, out)))
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some((model, fast, out)) = parse(args)? else {
        return Ok(());
    };
    let start = Instant::now();
    let device = tensor_core::best();
    let source = ModelSource::resolve(model.as_deref())?;
    let budget = Budget::new(fast);
    println!("modular demo{}", if fast { " (fast)" } else { "" });
    println!(
        "  device   {device:?} (CUDA available: {})",
        tensor_core::device::cuda_available()
    );
    println!("  model    {source}");
    let mut report = Report::default();
    report.steps.push(embed_step(&source, device)?);
    let step = emoe_step(&source, device, &budget, &mut report)?;
    report.steps.push(step);
    tune_steps(&source, device, &budget, &mut report)?;
    let step = merge_step(&source, device, &budget, &mut report)?;
    report.steps.push(step);
    let step = bricks_step(&source, device, &budget, &out, &mut report)?;
    report.steps.push(step);
    let step = m2mkd_step(&source, &budget, &mut report)?;
    report.steps.push(step);
    let total = start.elapsed().as_secs_f64();
    print_table(&report.steps, total);
    write_report(&out, &report, total, device, &budget)?;
    println!("  report   {}", out.join("report.md").display());
    Ok(())
}

/// Sentence embeddings and ranking, and tensor-core's grouped computation
/// on the model's own first FFN cut into 8 experts (all selected: must be
/// the dense FFN).
fn embed_step(source: &ModelSource, device: Device) -> AnyResult<Step> {
    let t = Instant::now();
    let enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let corpus = enc.embed(CORPUS)?;
    let queries = enc.embed(QUERIES)?;
    let scores = queries.matmul(&corpus.tr()).to_device(Device::Cpu);
    let mut hits = Vec::new();
    for (qi, q) in QUERIES.iter().enumerate() {
        let best = scores.get(qi as i64).argmax(-1, false).int64_value(&[]) as usize;
        println!("  query    \"{q}\" -> \"{}\"", CORPUS[best]);
        hits.push(best);
    }
    let ffn = enc.model.get_as::<FeedForward>("encoder.layer.0.(ffn)")?;
    let ids = enc.tokenizer.encode_batch(CORPUS, device)?;
    let x = tch::no_grad(|| enc.model.hidden_states(&ids.input_ids, &ids.attention_mask))?[0]
        .reshape([-1, 384]);
    let (e, f) = (8i64, 1536 / 8);
    let grouped = tch::no_grad(|| -> AnyResult<Tensor> {
        let w1 = ffn.w1()?.view([e, f, 384]);
        let b1 = ffn.b1()?.ok_or("no b1")?.view([e, f]);
        let w2 = ffn.w2()?.view([384, e, f]).permute([1, 0, 2]);
        let n = x.size()[0];
        let d = Dispatch::new(
            &Tensor::arange(e, (Kind::Int64, device)).expand([n, e], false),
            e,
        )?;
        let counts = d.counts_host()?;
        let h =
            Activation::Gelu.apply(&grouped_linear(&d.permute(&x)?, &counts, &w1, Some(&b1))?)?;
        let y = grouped_linear(&h, &counts, &w2, None)?;
        Ok(d.unpermute(&y, None)? + ffn.b2()?.ok_or("no b2")?)
    })?;
    let dense =
        tch::no_grad(|| tensor_core::Module::forward(ffn, &x, &mut tensor_core::Context::eval()))?;
    let c = closeness(&grouped, &dense, 1e-4, 1e-4)?;
    if !c.ok {
        return Err(format!(
            "grouped experts disagree with the dense FFN (max |err| {:.2e})",
            c.max_abs
        )
        .into());
    }
    Ok(Step {
        what: "embed + rank (all-MiniLM-L6-v2)".into(),
        result: format!(
            "{} queries ranked; 8 grouped experts = dense FFN (max |err| {:.1e})",
            QUERIES.len(),
            c.max_abs
        ),
        seconds: t.elapsed().as_secs_f64(),
        ..Step::default()
    })
}

/// EMoE: split all six FFNs into 16 experts by balanced k-means; all 16
/// selected reproduces the dense encoder; top-4 keeps the embeddings close
/// and computes a quarter of the FFN.
fn emoe_step(
    source: &ModelSource,
    device: Device,
    budget: &Budget,
    report: &mut Report,
) -> AnyResult<Step> {
    let t = Instant::now();
    let data = TextClassification::sentiment()?;
    let n_sent = if budget.fast { 16 } else { 256 };
    let texts: Vec<&str> = data
        .validation
        .iter()
        .take(n_sent)
        .map(|e| e.text.as_str())
        .collect();
    let dense_enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let dense = dense_enc.embed(&texts)?;
    let mut enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let layers: Vec<usize> = (0..enc.model.config.num_hidden_layers as usize).collect();
    let rep = convert(&mut enc.model, &layers, &EmoeConfig::new(16, 4))?;
    let split_s = t.elapsed().as_secs_f64();
    report.objectives = rep
        .layers
        .iter()
        .map(|l| (l.objective, l.random_objective))
        .collect();
    let set_k =
        |enc: &mut SentenceEncoder, k_of: &dyn Fn(Option<usize>) -> usize| -> AnyResult<()> {
            for l in &rep.layers {
                enc.model
                    .get_as_mut::<EmoeFfn>(&l.path)?
                    .set_top_k(k_of(l.layer))?;
            }
            Ok(())
        };
    set_k(&mut enc, &|_| 16)?;
    let all = enc.embed(&texts)?;
    let max_err = (&all - &dense).abs().max().double_value(&[]);
    // The reference placement: top-4 in one upper-half layer (4 of 6), the rest dense.
    let sparse_layers = emergent_split::convert::reference_layers(layers.len());
    set_k(&mut enc, &|l| {
        if l.is_some_and(|l| sparse_layers.contains(&l)) {
            4
        } else {
            16
        }
    })?;
    let mean_cos = |x: &Tensor| {
        (x * &dense)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let cos_paper = mean_cos(&enc.embed(&texts)?);
    set_k(&mut enc, &|_| 4)?;
    let cos_all = mean_cos(&enc.embed(&texts)?);
    let mean_obj = rep.layers.iter().map(|l| l.objective).sum::<f64>() / rep.layers.len() as f64;
    let mean_rand =
        rep.layers.iter().map(|l| l.random_objective).sum::<f64>() / rep.layers.len() as f64;
    report.notes.push(format!(
        "EMoE: {} layers split into 16 experts of 96 neurons in {split_s:.1} s; mean k-means objective {mean_obj:.2} vs {mean_rand:.2} for random balanced splits; with all 16 experts the embeddings equal the dense model's (max |err| {max_err:.1e}); with top-4 in layers {sparse_layers:?} (the EMoE reference's placement) the mean cosine of the sentence embeddings to the dense model's is {cos_paper:.3}, with top-4 in all six layers {cos_all:.3} ({} sentences).",
        rep.layers.len(),
        texts.len()
    ));
    if max_err > 1e-4 {
        return Err(
            format!("EMoE with all experts differs from the dense model: {max_err:.2e}").into(),
        );
    }
    Ok(Step {
        what: "EMoE split, 6 FFNs x 16 experts".into(),
        result: format!(
            "k-means objective {mean_obj:.0} (random {mean_rand:.0}); all experts = dense ({max_err:.0e}); top-4 in layers {sparse_layers:?}: embedding cosine {cos_paper:.3}"
        ),
        seconds: t.elapsed().as_secs_f64(),
        ..Step::default()
    })
}

/// LoRA and VL-PET (middle-Y gate) on the sentiment data.
fn tune_steps(
    source: &ModelSource,
    device: Device,
    budget: &Budget,
    report: &mut Report,
) -> AnyResult<()> {
    let data = TextClassification::sentiment()?;
    for kind in [
        TuneKind::Lora,
        TuneKind::VlPet(pet_core::Granularity::MiddleY),
    ] {
        let t = Instant::now();
        println!("  tuning   {} on movie-review sentiment ...", kind.name());
        let (rep, pct) = tune_once(kind, source, &data, &budget.finetune(1e-3), device)?;
        let ood = rep.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy);
        report.accuracies.push((kind.name(), rep.test.accuracy));
        report.steps.push(Step {
            what: format!("tune: {}", kind.name()),
            result: format!(
                "sentiment test {:.3} (Amazon OOD {:.3}), {} train sentences",
                rep.test.accuracy, ood, rep.train_examples
            ),
            accuracy: Some(rep.test.accuracy),
            trainable_percent: Some(pct),
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(())
}

/// Two orthogonal adapters (sentiment, topic), trained independently, then
/// summed into one encoder: each task's accuracy merged vs alone.
fn merge_step(
    source: &ModelSource,
    device: Device,
    budget: &Budget,
    report: &mut Report,
) -> AnyResult<Step> {
    let t = Instant::now();
    let all = tasks()?;
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|t| t.name == "sentiment" || t.name == "topic")
        .collect();
    let probe = model_zoo::bert::SequenceClassifier::new(
        model_zoo::bert::BertModel::from_source(source, device)?,
        2,
        model_zoo::bert::Pooling::Mean,
    )?;
    let mut registry = Registry::for_model(
        &probe,
        &TARGETS,
        BasisKind::QrBins,
        2024,
        8,
        FrozenSide::Output,
    )?;
    drop(probe);
    let bert_cfg = model_zoo::bert::BertModel::from_source(source, device)?.config;
    let tok = model_zoo::tokenizer::TextTokenizer::from_file(
        source.tokenizer_path(),
        budget.max_len,
        bert_cfg.vocab_size,
    )?;
    let pad = tok.pad_id as i64;
    let mut trained = Vec::new();
    let mut sets = Vec::new();
    let mut alone = Vec::new();
    for task in &chosen {
        registry.claim(task.name)?;
        println!("  training orthogonal adapter '{}' ...", task.name);
        let mut hooks = MergeHooks {
            arm: Arm::Orthogonal,
            task: task.name,
            registry: &registry,
            rank: 8,
            seed: 0,
            out: None,
        };
        finetune_with(
            source,
            &task.data,
            &budget.finetune(1e-3),
            device,
            &mut hooks,
        )?;
        let done = hooks.out.ok_or("the training run kept no adapter")?;
        let set = encode(&tok, &eval_subset(&task.data.test, Some(budget.eval_limit)))?;
        let m = merge(
            std::slice::from_ref(&done.delta),
            &MergeConfig::new(Method::Sum),
        )?;
        alone.push(
            score_merged(
                source,
                &m,
                std::slice::from_ref(&done),
                std::slice::from_ref(&set),
                pad,
                device,
            )?[0],
        );
        trained.push(done);
        sets.push(set);
    }
    let deltas: Vec<TaskDelta> = trained.iter().map(|t| t.delta.shallow_clone()).collect();
    let merged = merge(&deltas, &MergeConfig::new(Method::Sum))?;
    let together = score_merged(source, &merged, &trained, &sets, pad, device)?;
    let inter = orthogonal_merge::interference(&deltas)?;
    let mut drop_sum = 0.0;
    for ((task, a), m) in chosen.iter().zip(&alone).zip(&together) {
        report.merge.push((task.name.to_owned(), *a, *m));
        report.accuracies.push((format!("{} alone", task.name), *a));
        report
            .accuracies
            .push((format!("{} merged", task.name), *m));
        drop_sum += a - m;
    }
    let mean_drop = 100.0 * drop_sum / chosen.len() as f64;
    Ok(Step {
        what: "orthogonal adapters x2, summed".into(),
        result: format!(
            "merged vs alone: {}; mean drop {mean_drop:.1} points; |cos| between deltas {:.1e}",
            chosen
                .iter()
                .zip(alone.iter().zip(&together))
                .map(|(t, (a, m))| format!("{} {:.3}->{:.3}", t.name, a, m))
                .collect::<Vec<_>>()
                .join(", "),
            inter.mean_abs_cosine()
        ),
        accuracy: Some(together.iter().sum::<f64>() / together.len() as f64),
        seconds: t.elapsed().as_secs_f64(),
        ..Step::default()
    })
}

/// Functional bricks: profile every FFN neuron on the five-functionality
/// corpus (code, prose, translation, math, shell), FuncScore = AP, the top-5%
/// bricks per functionality, their overlap against random sets, and the
/// embedding distortion on every functionality with each brick zeroed.
fn bricks_step(
    source: &ModelSource,
    device: Device,
    budget: &Budget,
    out: &std::path::Path,
    report: &mut Report,
) -> AnyResult<Step> {
    let t = Instant::now();
    println!("  profiling functional bricks ...");
    let mut enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let (train, test) = if budget.fast { (8, 4) } else { (80, 20) };
    let b = recipes::bricks::demo(
        &mut enc,
        train,
        test,
        0.05,
        &out.join("bricks_profile.safetensors"),
        !budget.fast && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )?;
    let n = b.functions.len();
    let diag: Vec<f64> = (0..n).map(|f| b.perturbation.delta(f, f)).collect();
    let off: f64 = (0..n)
        .flat_map(|f| (0..n).filter(move |&g| g != f).map(move |g| (f, g)))
        .map(|(f, g)| b.perturbation.delta(f, g))
        .sum::<f64>()
        / (n * (n - 1)) as f64;
    let mean_diag = diag.iter().sum::<f64>() / n as f64;
    report.notes.push(format!(
        "Bricks: {} examples x {} FFN neurons profiled ({:.1} examples/s); top-5% bricks of different functionalities overlap {:.3} on average vs {:.3} for random sets of the same sizes; zeroing a functionality's brick raises the functionality probe's cross-entropy on that functionality by {mean_diag:+.4} nats on average vs {off:+.4} on the others, the diagonal dominating in {}/{n} columns. `cargo xtask experiment bricks` runs the full analysis (docs/results/bricks.md).",
        b.examples, b.neurons, b.examples_per_second, b.overlap, b.random_overlap, b.diagonal_dominant
    ));
    report.perturbation = Some((
        b.functions.clone(),
        (0..n)
            .map(|f| (0..n).map(|g| b.perturbation.delta(f, g)).collect())
            .collect(),
    ));
    Ok(Step {
        what: "functional bricks, 6 FFNs x 1536".into(),
        result: format!(
            "{} examples; top-5% overlap {:.3} (random {:.3}); zeroing a brick: probe CE own {mean_diag:+.3} vs others {off:+.3}, diagonal {}/{n}",
            b.examples, b.overlap, b.random_overlap, b.diagonal_dominant
        ),
        seconds: t.elapsed().as_secs_f64(),
        ..Step::default()
    })
}

/// m2mKD: MiniLM fine-tuned on movie reviews and split into three modules;
/// a narrower student of three MoE modules distilled module by module,
/// assembled and trained end to end, against the same student trained from
/// scratch for the same number of steps. The modules are distilled one after
/// the other: parallel jobs draw their dropout masks from libtorch's one
/// global generator in a racy order, and the demo must give the same numbers
/// on every run (`modular distill` and the experiment run them in parallel).
fn m2mkd_step(source: &ModelSource, budget: &Budget, report: &mut Report) -> AnyResult<Step> {
    use recipes::m2mkd::{Plan, baselines, m2mkd_arm, prepare};
    let t = Instant::now();
    println!("  distilling a modular student with m2mKD ...");
    let p = if budget.fast {
        Plan {
            seeds: vec![0],
            steps: 4,
            batch: 8,
            max_len: 24,
            train_limit: 64,
            eval_limit: budget.eval_limit,
            teacher_steps: 2,
            meta_steps: 1,
            incubate_steps: 1,
            parallel: false,
            ..Plan::default()
        }
    } else {
        Plan {
            seeds: vec![0],
            steps: 60,
            batch: 32,
            max_len: 32,
            train_limit: 1920,
            eval_limit: budget.eval_limit,
            teacher_steps: 60,
            meta_steps: 20,
            incubate_steps: 10,
            parallel: false,
            ..Plan::default()
        }
    };
    let data = TextClassification::sentiment()?;
    let mut prep = prepare(&p, source, &data)?;
    let (scratch, _) = baselines(&prep, &p, 0, false)?;
    let m = m2mkd_arm(&mut prep, &p, 0, None)?;
    let steps_per_s: Vec<String> = m
        .modules
        .iter()
        .map(|(s, n, _)| format!("{:.1}", *n as f64 / s.max(1e-9)))
        .collect();
    let student_params: i64 = m
        .model
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let ood = |s: &recipes::m2mkd::Scores| s.ood_accuracy();
    report
        .accuracies
        .push(("m2mKD teacher".into(), prep.teacher_scores.id.accuracy));
    report
        .accuracies
        .push(("m2mKD student, scratch".into(), scratch.id.accuracy));
    report
        .accuracies
        .push(("m2mKD student, m2mKD".into(), m.trained.id.accuracy));
    report.notes.push(format!(
        "m2mKD: teacher MiniLM ({} layers, {:.1}M parameters) fine-tuned {} steps, split into {} modules; student {} modules of one width-{} BERT layer with a top-2 mixture of {} experts ({:.2}M parameters); each student module distilled {} steps in its hybrid network (all modules in {:.1} s, one after the other; steps/s per module {}), then {} end-to-end steps. In-domain / Amazon OOD accuracy: teacher {:.3} / {:.3}, student from scratch ({} steps) {:.3} / {:.3}, m2mKD {:.3} / {:.3} (right after assembly {:.3}). `cargo xtask experiment m2mkd` runs the seeded comparison with logit KD (docs/results/m2mkd.md).",
        prep.depth,
        prep.teacher_parameters() as f64 / 1e6,
        p.teacher_steps,
        p.modules,
        p.modules,
        p.student_width,
        p.experts,
        student_params as f64 / 1e6,
        p.steps / 2,
        m.distil_wall,
        steps_per_s.join(", "),
        p.steps - p.steps / 2,
        prep.teacher_scores.id.accuracy,
        ood(&prep.teacher_scores),
        p.steps,
        scratch.id.accuracy,
        ood(&scratch),
        m.trained.id.accuracy,
        ood(&m.trained),
        m.assembled.id.accuracy,
    ));
    Ok(Step {
        what: "m2mKD: MiniLM -> 3 MoE modules".into(),
        result: format!(
            "teacher {:.3}; student scratch {:.3} vs m2mKD {:.3} (in-domain, {} steps each); distil {} steps/s per module",
            prep.teacher_scores.id.accuracy,
            scratch.id.accuracy,
            m.trained.id.accuracy,
            p.steps,
            steps_per_s.join("/")
        ),
        accuracy: Some(m.trained.id.accuracy),
        seconds: t.elapsed().as_secs_f64(),
        ..Step::default()
    })
}

fn print_table(steps: &[Step], total: f64) {
    println!(
        "\n  {:<36} {:>9} {:>11} {:>8}  result",
        "step", "accuracy", "trainable%", "time"
    );
    for s in steps {
        println!(
            "  {:<36} {:>9} {:>11} {:>7.1}s  {}",
            s.what,
            s.accuracy.map_or("-".into(), |a| format!("{a:.3}")),
            s.trainable_percent
                .map_or("-".into(), |p| format!("{p:.2}")),
            s.seconds,
            s.result
        );
    }
    println!("  total {total:.1} s");
}

fn write_report(
    out: &std::path::Path,
    report: &Report,
    total: f64,
    device: Device,
    budget: &Budget,
) -> AnyResult<()> {
    std::fs::create_dir_all(out)?;
    let mut md = String::from("# modular demo\n\n");
    let _ = writeln!(
        md,
        "all-MiniLM-L6-v2 on {device:?}; {} mode: at most {} training and {} evaluation examples per task, {} tokens; total {total:.1} s.\n",
        if budget.fast { "fast" } else { "default" },
        budget.train_limit,
        budget.eval_limit,
        budget.max_len
    );
    md.push_str(
        "| step | accuracy | trainable % | time (s) | result |\n|---|---:|---:|---:|---|\n",
    );
    for s in &report.steps {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} |",
            s.what,
            s.accuracy.map_or("-".into(), |a| format!("{a:.3}")),
            s.trainable_percent
                .map_or("-".into(), |p| format!("{p:.2}")),
            s.seconds,
            s.result.replace('|', "\\|")
        );
    }
    md.push('\n');
    for n in &report.notes {
        let _ = writeln!(md, "- {n}");
    }
    let mut plots = Vec::new();
    if !report.accuracies.is_empty() {
        plots.push((
            "accuracy.svg",
            "Test accuracy",
            svg::bars(
                "Test accuracy (tuning and merging steps)",
                &report.accuracies,
                Some(1.0),
            ),
        ));
    }
    if !report.objectives.is_empty() {
        let bars: Vec<(String, f64)> = report
            .objectives
            .iter()
            .enumerate()
            .flat_map(|(i, (o, r))| {
                [
                    (format!("layer {i} k-means"), *o),
                    (format!("layer {i} random"), *r),
                ]
            })
            .collect();
        plots.push((
            "emoe_objective.svg",
            "EMoE split objective",
            svg::bars(
                "Balanced k-means objective per layer (lower is better)",
                &bars,
                None,
            ),
        ));
    }
    if let Some((functions, m)) = &report.perturbation {
        plots.push((
            "bricks_perturbation.svg",
            "Functional bricks: perturbation",
            configurable_bricks::svg::heatmap(
                "Probe cross-entropy change on functionality g (columns) with brick f (rows) zeroed",
                functions,
                functions,
                m,
                true,
                |v| format!("{v:+.3}"),
            ),
        ));
    }
    for (file, title, text) in &plots {
        recipes::report::write_quiet(&out.join(file), text)?;
        let _ = writeln!(md, "\n## {title}\n\n![{title}]({file})");
    }
    recipes::report::write_quiet(&out.join("report.md"), &md)
}
