//! `cargo xtask experiment merge`: merging independently trained adapters
//! (orthogonal-merge), decided per task with paired statistics.
//!
//! One LoRA adapter per task is trained alone with its own head on seven
//! real tasks (movie-review sentiment, newsgroup topic, and each of the
//! functional corpus's five functionalities as a one-vs-rest task), in four
//! arms: orthogonal adaptation as the paper defines it (Po et al., CVPR
//! 2024: each task owns one bin of a shared, seeded orthogonal basis and
//! that bin is its frozen **input** factor), the same with the output side
//! frozen, the input side with a Gaussian (only near-orthogonal) basis, and
//! plain PEFT-style LoRA. Each arm's adapters are merged by the plain sum
//! (the paper's merge) and by the standard baselines (task arithmetic with λ
//! chosen on validation, TIES, DARE, least squares on recorded features);
//! every task is scored on its full test set with the merged encoder and its
//! own head, against its adapter alone. The crosstalk `‖ΔW_j X_i‖ /
//! ‖ΔW_i X_i‖` on each task's recorded inputs explains why one side merges
//! and the other does not.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use crate::stats::{
    COMPARISON_HEADER, COMPARISON_RULE, Comparison, compare, compare_macro, fmt_interval, mean_std,
};
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::data::TextExample;
use model_zoo::finetune::{FinetuneOptions, finetune_with};
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use orthogonal_merge::{
    Features, MergeConfig, Merged, Method, Registry, TaskDelta, apply_merged,
    interference_with_features, merge, merge_with_features, record_features,
};
use recipes::flags::{AnyResult, Flags, usage};
use recipes::merge::*;
use tensor_core::tch::{Device, Tensor};
use tensor_core::train::{BatchPlan, SplitMix64, evaluate, pad_batch_with_labels};

pub const MERGE_HELP: &str = "usage: cargo xtask experiment merge [--seeds 0,1,2] [--arms LIST] [--train-limit N] [--epochs N]
                                    [--rank R] [--lr X] [--lambdas X,..] [--density X] [--out DIR]
  Train one LoRA adapter per task (sentiment, newsgroup topic, and the functional corpus's five
  functionalities as one-vs-rest tasks) in each arm, merge each arm's adapters by the sum and the
  standard baselines, and score every task on its full test set merged vs alone, paired over
  seeds and examples.
  --arms: comma-separated from input (orthogonal, input side frozen: the paper's variant),
  output (orthogonal, output side frozen), gaussian (input side, Gaussian basis) and plain
  (PEFT-style LoRA).
  --lambdas: the task-arithmetic grid, λ chosen per arm and seed by mean validation accuracy.
  Defaults: --seeds 0,1,2 --arms input,output,gaussian,plain --train-limit 2000 --epochs 1
  --rank 8 --lr 1e-3 --lambdas 0.3,0.5,0.7,1 --density 0.2 (TIES / DARE). Measured on 2 cores: about 9 minutes per arm and seed
  (7 adapters trained, 6 merges scored on every test set), so about 110 minutes for the
  defaults; --arms input,plain or --seeds 0,1,2 with fewer arms shortens it.
  Writes DIR/merge.md (default docs/results/merge.md).";

#[derive(Debug, Clone)]
struct Settings {
    seeds: Vec<u64>,
    arms: Vec<Arm>,
    opts: FinetuneOptions,
    rank: i64,
    lambdas: Vec<f64>,
    density: f64,
    out: PathBuf,
    command: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seeds: vec![0, 1, 2],
            arms: Arm::ALL.to_vec(),
            opts: FinetuneOptions {
                lr: 1e-3,
                train_limit: Some(2000),
                // Only the training run's own validation/test report; the
                // page scores every test example itself.
                eval_limit: Some(64),
                progress: false,
                ..FinetuneOptions::default()
            },
            rank: 8,
            lambdas: vec![0.3, 0.5, 0.7, 1.0],
            density: 0.2,
            out: recipes::repo_root().join("docs/results/merge.md"),
            command: "cargo xtask experiment merge".into(),
        }
    }
}

fn parse(args: &[String]) -> AnyResult<Option<Settings>> {
    const CMD: &str = "experiment merge";
    let Some(f) = Flags::parse_options(
        CMD,
        args,
        &[
            "--seeds",
            "--arms",
            "--train-limit",
            "--epochs",
            "--rank",
            "--lr",
            "--lambdas",
            "--density",
            "--out",
        ],
        &[],
        MERGE_HELP,
    )?
    else {
        return Ok(None);
    };
    let mut s = Settings::default();
    s.seeds = f.seeds(s.seeds)?;
    if let Some(words) = f.list::<String>("--arms")? {
        s.arms = Vec::new();
        for w in words {
            match Arm::ALL.into_iter().find(|a| a.flag() == w) {
                Some(a) if !s.arms.contains(&a) => s.arms.push(a),
                Some(_) => return usage(CMD, format!("--arms: '{w}' given twice")),
                None => {
                    return usage(
                        CMD,
                        format!("--arms: unknown arm '{w}' (input, output, gaussian, plain)"),
                    );
                }
            }
        }
        s.arms.sort();
    }
    s.opts.train_limit = f.parsed("--train-limit")?.or(s.opts.train_limit);
    s.opts.epochs = f.parsed_or("--epochs", s.opts.epochs)?;
    s.rank = f.parsed_or("--rank", s.rank)?;
    s.opts.lr = f.parsed_or("--lr", s.opts.lr)?;
    s.lambdas = f.list("--lambdas")?.unwrap_or(s.lambdas);
    s.density = f.parsed_or("--density", s.density)?;
    s.out = f.path("--out").unwrap_or(s.out);
    if s.arms.is_empty() {
        return usage(CMD, "--arms needs at least one value");
    }
    if s.rank <= 0 || s.opts.epochs == 0 || s.opts.train_limit == Some(0) {
        return usage(CMD, "--rank, --epochs and --train-limit must be positive");
    }
    if !(s.opts.lr.is_finite() && s.opts.lr > 0.0) {
        return usage(CMD, "--lr must be a positive number");
    }
    if s.lambdas.is_empty() || s.lambdas.iter().any(|l| !(l.is_finite() && *l > 0.0)) {
        return usage(CMD, "--lambdas needs positive numbers");
    }
    if !(s.density > 0.0 && s.density <= 1.0) {
        return usage(CMD, "--density must be in (0, 1]");
    }
    let shown = recipes::flags::without_out(args);
    if !shown.is_empty() {
        s.command = format!("{} {}", s.command, shown.join(" "));
    }
    Ok(Some(s))
}

/// A merge method of the page; task arithmetic's λ is picked on validation.
#[derive(Debug, Clone)]
enum Spec {
    Fixed(MergeConfig),
    LinearOnValidation,
}

fn methods(s: &Settings) -> Vec<(String, Spec)> {
    let d = s.density;
    vec![
        (
            "sum (the paper's merge)".into(),
            Spec::Fixed(MergeConfig::new(Method::Sum)),
        ),
        (
            format!("task arithmetic (λ on validation from {:?})", s.lambdas),
            Spec::LinearOnValidation,
        ),
        (
            format!("TIES (ρ = {d}, λ = 1)"),
            Spec::Fixed(MergeConfig::new(Method::Ties).with_density(d)),
        ),
        (
            format!("DARE linear (ρ = {d})"),
            Spec::Fixed(MergeConfig::new(Method::DareLinear).with_density(d)),
        ),
        (
            "least squares on features".into(),
            Spec::Fixed(MergeConfig::new(Method::LeastSquares)),
        ),
    ]
}

/// The inputs of one evaluation set and the labels of each task scored on it.
struct Group {
    /// Indices into the task list.
    tasks: Vec<usize>,
    ids: Vec<Vec<i64>>,
    labels: Vec<Vec<i64>>,
}

/// One [`Group`] per distinct `Task::group`, from the examples `split` picks.
fn groups(
    tasks: &[Task],
    tok: &TextTokenizer,
    split: impl Fn(&Task) -> Vec<TextExample>,
) -> AnyResult<Vec<Group>> {
    let mut out: Vec<(&str, Group)> = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let e = encode(tok, &split(t))?;
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, g)) => {
                if g.ids != e.ids {
                    return Err(format!(
                        "task '{}' is in group '{}' but its inputs differ from the group's",
                        t.name, t.group
                    )
                    .into());
                }
                g.tasks.push(i);
                g.labels.push(e.labels);
            }
            None => out.push((
                t.group,
                Group {
                    tasks: vec![i],
                    ids: e.ids,
                    labels: vec![e.labels],
                },
            )),
        }
    }
    Ok(out.into_iter().map(|(_, g)| g).collect())
}

/// Per-example correctness of every task (indexed like `trained`) with
/// `merged` on the base encoder and each task's own head.
fn score_all(
    source: &ModelSource,
    merged: &Merged,
    trained: &[Trained],
    sets: &[Group],
    pad: i64,
    device: Device,
) -> AnyResult<Vec<Vec<bool>>> {
    let mut model = with_head(source, &trained[0].head, device)?;
    apply_merged(&mut model, merged)?;
    let mut out = vec![Vec::new(); trained.len()];
    for g in sets {
        let heads: Vec<_> = g.tasks.iter().map(|&t| &trained[t].head).collect();
        let labels: Vec<&[i64]> = g.labels.iter().map(Vec::as_slice).collect();
        let c = correct_stacked(&mut model, &heads, &g.ids, &labels, pad, device)?;
        for (&t, v) in g.tasks.iter().zip(c) {
            out[t] = v;
        }
    }
    Ok(out)
}

/// Task `t` alone: its delta only, its head, its own test set.
fn score_alone(
    source: &ModelSource,
    trained: &[Trained],
    t: usize,
    sets: &[Group],
    pad: i64,
    device: Device,
) -> AnyResult<Vec<bool>> {
    let g = sets
        .iter()
        .find(|g| g.tasks.contains(&t))
        .ok_or("a task without a test set")?;
    let k = g
        .tasks
        .iter()
        .position(|&x| x == t)
        .ok_or("a task missing from its own test group")?;
    let m = merge(
        std::slice::from_ref(&trained[t].delta),
        &MergeConfig::new(Method::Sum),
    )?;
    let mut model = with_head(source, &trained[t].head, device)?;
    apply_merged(&mut model, &m)?;
    let c = correct_stacked(
        &mut model,
        &[&trained[t].head],
        &g.ids,
        &[&g.labels[k]],
        pad,
        device,
    )?;
    c.into_iter()
        .next()
        .ok_or_else(|| format!("task {t}: no scores came back").into())
}

/// Input Grams of the target layers of the base encoder on 256 training examples of each task.
fn task_features(
    source: &ModelSource,
    tasks: &[Task],
    tok: &TextTokenizer,
    pad: i64,
    device: Device,
) -> AnyResult<Vec<Features>> {
    let bert = BertModel::from_source(source, device)?;
    let mut model = SequenceClassifier::new(bert, 2, Pooling::Mean)?;
    let mut out = Vec::new();
    for t in tasks {
        let mut train = t.data.train.clone();
        SplitMix64::new(0xfea7).shuffle(&mut train);
        train.truncate(256);
        let set = encode(tok, &train)?;
        let f = record_features(&mut model, &TARGETS, |m| {
            let plan = BatchPlan::new(set.ids.len(), 64)?;
            evaluate(plan.epoch(0), false, |idx| -> model_zoo::Result<Tensor> {
                let seqs: Vec<&[i64]> = idx.iter().map(|&i| set.ids[i].as_slice()).collect();
                let b = pad_batch_with_labels(&seqs, &vec![0; idx.len()], pad, None, device)?;
                m.logits(&b.input_ids, &b.attention_mask, false)
            })
            .map_err(zoo_om)?;
            Ok(())
        })?;
        out.push(f);
    }
    Ok(out)
}

fn zoo_om(e: model_zoo::Error) -> orthogonal_merge::Error {
    orthogonal_merge::Error::config(e.to_string())
}

/// One arm's results for one seed; correctness vectors are indexed by task.
struct ArmResult {
    alone: Vec<Vec<bool>>,
    /// Per method (in [`methods`] order): correctness per task.
    merged: Vec<Vec<Vec<bool>>>,
    /// Task arithmetic's λ, picked on validation.
    lambda: f64,
    mean_abs_cosine: f64,
    /// Mean crosstalk per ordered pair `(on, from)`, over layers.
    crosstalk: Vec<(usize, usize, f64)>,
    trainable: i64,
}

fn mean_acc(v: &[Vec<bool>]) -> f64 {
    let accs: Vec<f64> = v
        .iter()
        .map(|x| 100.0 * x.iter().filter(|b| **b).count() as f64 / x.len().max(1) as f64)
        .collect();
    accs.iter().sum::<f64>() / accs.len().max(1) as f64
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(s) = parse(args)? else {
        return Ok(());
    };
    let start = Instant::now();
    let source = ModelSource::resolve(None)?;
    let device = tensor_core::best();
    let tasks = tasks()?;
    let bert = BertModel::from_source(&source, device)?;
    let tok = TextTokenizer::from_file(
        source.tokenizer_path(),
        s.opts.max_len,
        bert.config.vocab_size,
    )?;
    let pad = tok.pad_id as i64;
    // One registry per arm: the bases depend only on the layer paths, the
    // basis kind and the frozen side's size.
    let probe = SequenceClassifier::new(bert, 2, Pooling::Mean)?;
    let mut registries = BTreeMap::new();
    for &arm in &s.arms {
        if let (Some(side), Some(basis)) = (arm.frozen_side(), arm.basis()) {
            let mut registry = Registry::for_model(&probe, &TARGETS, basis, 2024, s.rank, side)?;
            for t in &tasks {
                registry.claim(t.name)?;
            }
            registries.insert(arm, registry);
        }
    }
    // Plain LoRA ignores the registry; any one serves its hooks.
    let fallback = Registry::for_model(
        &probe,
        &TARGETS,
        Default::default(),
        2024,
        s.rank,
        Default::default(),
    )?;
    drop(probe);
    let test_sets = groups(&tasks, &tok, |t| t.data.test.clone())?;
    let val_sets = groups(&tasks, &tok, |t| eval_subset(&t.data.validation, Some(256)))?;
    eprintln!("recording features for the least-squares merge and the crosstalk ...");
    let features = task_features(&source, &tasks, &tok, pad, device)?;

    let mut results: BTreeMap<(Arm, u64), ArmResult> = BTreeMap::new();
    for &seed in &s.seeds {
        for &arm in &s.arms {
            let registry = registries.get(&arm).unwrap_or(&fallback);
            let mut trained = Vec::new();
            let mut trainable = 0;
            for t in &tasks {
                eprintln!("seed {seed}, {}: training '{}' ...", arm.flag(), t.name);
                let mut hooks = MergeHooks {
                    arm,
                    task: t.name,
                    registry,
                    rank: s.rank,
                    seed,
                    out: None,
                };
                let o = FinetuneOptions {
                    seed,
                    ..s.opts.clone()
                };
                let rep = finetune_with(&source, &t.data, &o, device, &mut hooks)?;
                trainable += rep.trainable_params;
                trained.push(hooks.out.ok_or("the training run kept no adapter")?);
            }
            let deltas: Vec<TaskDelta> = trained.iter().map(|t| t.delta.shallow_clone()).collect();
            let inter = interference_with_features(&deltas, &features)?;
            let alone = (0..tasks.len())
                .map(|t| score_alone(&source, &trained, t, &test_sets, pad, device))
                .collect::<AnyResult<Vec<_>>>()?;
            eprintln!("  alone: {:.2}", mean_acc(&alone));
            let mut lambda = f64::NAN;
            let mut merged = Vec::new();
            for (name, spec) in methods(&s) {
                let cfg = match spec {
                    Spec::Fixed(c) => c,
                    Spec::LinearOnValidation => {
                        let mut best = (f64::NEG_INFINITY, s.lambdas[0]);
                        for &l in &s.lambdas {
                            let m =
                                merge(&deltas, &MergeConfig::new(Method::Linear).with_lambda(l))?;
                            let v = mean_acc(&score_all(
                                &source, &m, &trained, &val_sets, pad, device,
                            )?);
                            if v > best.0 {
                                best = (v, l);
                            }
                        }
                        lambda = best.1;
                        MergeConfig::new(Method::Linear).with_lambda(lambda)
                    }
                }
                .with_seed(seed);
                let m = if cfg.method == Method::LeastSquares {
                    merge_with_features(&deltas, &features, &cfg)?
                } else {
                    merge(&deltas, &cfg)?
                };
                let c = score_all(&source, &m, &trained, &test_sets, pad, device)?;
                eprintln!("  {name}: {:.2}", mean_acc(&c));
                merged.push(c);
            }
            results.insert(
                (arm, seed),
                ArmResult {
                    alone,
                    merged,
                    lambda,
                    mean_abs_cosine: inter.mean_abs_cosine(),
                    crosstalk: inter
                        .crosstalk
                        .as_ref()
                        .map(|c| c.per_pair())
                        .unwrap_or_default(),
                    trainable,
                },
            );
        }
    }
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let md = report(&s, &tasks, &results, minutes)?;
    recipes::report::write(&s.out, &md)
}

/// The runs of one arm, in seed order.
fn runs_of<'a>(
    s: &Settings,
    results: &'a BTreeMap<(Arm, u64), ArmResult>,
    arm: Arm,
) -> AnyResult<Vec<&'a ArmResult>> {
    s.seeds
        .iter()
        .map(|&seed| {
            results
                .get(&(arm, seed))
                .ok_or_else(|| format!("no run of arm {} under seed {seed}", arm.flag()).into())
        })
        .collect()
}

fn report(
    s: &Settings,
    tasks: &[Task],
    results: &BTreeMap<(Arm, u64), ArmResult>,
    minutes: f64,
) -> AnyResult<String> {
    let names = methods(s);
    // Merged − alone, over all tasks (macro) and per task, for every arm and method.
    let mut overall: Vec<(Arm, usize, Comparison)> = Vec::new();
    let mut per_task: Vec<(Arm, usize, Comparison)> = Vec::new();
    for &arm in &s.arms {
        let runs = runs_of(s, results, arm)?;
        let alone: Vec<Vec<Vec<bool>>> = runs.iter().map(|r| r.alone.clone()).collect();
        for k in 0..names.len() {
            let m: Vec<Vec<Vec<bool>>> = runs.iter().map(|r| r.merged[k].clone()).collect();
            overall.push((arm, k, compare_macro(&m, &alone)?));
        }
        for t in 0..tasks.len() {
            let a: Vec<Vec<bool>> = runs.iter().map(|r| r.merged[0][t].clone()).collect();
            let b: Vec<Vec<bool>> = runs.iter().map(|r| r.alone[t].clone()).collect();
            per_task.push((arm, t, compare(&a, &b)?));
        }
    }
    // The paper's variant against each other arm, merged by the sum.
    let mut across: Vec<(Arm, Comparison)> = Vec::new();
    if s.arms.contains(&Arm::OrthogonalInput) {
        let head = runs_of(s, results, Arm::OrthogonalInput)?;
        let a: Vec<Vec<Vec<bool>>> = head.iter().map(|r| r.merged[0].clone()).collect();
        for &arm in s.arms.iter().filter(|a| **a != Arm::OrthogonalInput) {
            let b: Vec<Vec<Vec<bool>>> = runs_of(s, results, arm)?
                .iter()
                .map(|r| r.merged[0].clone())
                .collect();
            across.push((arm, compare_macro(&a, &b)?));
        }
    }
    let headline = overall
        .iter()
        .filter(|(_, k, _)| *k == 0)
        .map(|(arm, _, c)| {
            let within = per_task
                .iter()
                .filter(|(a, _, p)| a == arm && p.seeds.mean >= -1.0)
                .count();
            format!(
                "{} sum − alone {} points (mean over {} tasks), {}; within 1 point on {within}/{} tasks",
                arm.flag(),
                fmt_interval(&c.seeds),
                tasks.len(),
                c.verdict,
                tasks.len()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let o = &s.opts;
    let budget = format!(
        "{} tasks × {} arms × {} seeds, {} training examples per task × {} epoch(s), {:.1} min on {:?}",
        tasks.len(),
        s.arms.len(),
        s.seeds.len(),
        o.train_limit.map_or("all".into(), |n| format!("≤ {n}")),
        o.epochs,
        minutes,
        tensor_core::best()
    );
    let mut md = crate::index::block(&s.command, &budget, &headline);
    writeln!(
        md,
        "# orthogonal-merge: merging independently trained adapters\n"
    )?;
    writeln!(md, "Command: `{}`.\n", s.command)?;
    writeln!(
        md,
        "Budget: {budget} ({} intra-op threads; the machine has 2 cores, shared at times, so times are upper bounds).\n",
        tensor_core::tch::get_num_threads()
    )?;
    writeln!(
        md,
        "Setting: all-MiniLM-L6-v2, mean pooling + a linear head per task; one adapter per task on every query and value projection (r = {r}, α = {a}), trained alone with its head (AdamW lr {lr:e}, weight decay {wd}, 10% warm-up then linear decay, clip 1, batch {b}, max {ml} tokens, {ep} epoch(s) on a seeded subset of at most {tl} training examples). Orthogonal arms: a shared seeded basis per layer (seed 2024), each task owns one bin of r directions of it as its frozen factor and trains the other (zero-initialised) with its head. **input** (the paper's variant, the library default): `A = B_iᵀ` frozen on the input side, QR basis, so task j's delta ignores inputs in task i's bin; **output**: `B = B_i` frozen on the output side, QR basis, so the tasks write into orthogonal output subspaces; **gaussian**: the input side with scaled Gaussian columns, only near-orthogonal. **plain**: PEFT-style LoRA, `A` seeded Kaiming-uniform, `B = 0`, both trained. Merging acts on the encoder deltas only; each task keeps its head. Task arithmetic's λ is chosen per arm and seed by the mean accuracy over the tasks' validation sets (256 examples each); TIES and DARE use density ρ = {d}; least squares uses the input Grams recorded on 256 training examples of each task. Every task is scored on its full test set, alone and merged, so the differences are paired by example. Seeds {seeds:?}.\n",
        r = s.rank,
        a = 2 * s.rank,
        lr = o.lr,
        wd = o.weight_decay,
        b = o.batch_size,
        ml = o.max_len,
        ep = o.epochs,
        tl = o.train_limit.map_or("all".into(), |n| n.to_string()),
        d = s.density,
        seeds = s.seeds,
    )?;
    writeln!(md, "Tasks:\n")?;
    for t in tasks {
        let majority = model_zoo::data::majority_rate(&t.data.test);
        writeln!(
            md,
            "- **{}**: {} — {} classes, {} train / {} validation / {} test examples (majority class {:.1}% of test)",
            t.name,
            t.what,
            t.data.num_labels,
            t.data.train.len(),
            t.data.validation.len(),
            t.data.test.len(),
            100.0 * majority
        )?;
    }
    writeln!(md, "\n## The paper's claim next to ours\n")?;
    writeln!(
        md,
        "The paper (Po et al., CVPR 2024, orthogonal adaptation for modular customisation of diffusion models): adapters trained with orthogonal frozen input factors can be merged by a plain sum with almost no loss of identity per concept, where summing plain LoRAs loses clearly more; the goal here is the sum within 1 point per task of each adapter alone. Ours, decided by `crates/experiments/src/stats.rs` (Δ = merged − alone in accuracy points; `better` / `worse` needs the 95% interval over seeds to exclude 0 and McNemar's exact test over the examples, pooled over seeds (and tasks, for the mean), to reject at 5%; `within 1 point` reads the mean Δ ≥ −1).\n"
    )?;
    writeln!(
        md,
        "### Every merge against the adapters alone, mean over the {} tasks\n",
        tasks.len()
    )?;
    writeln!(md, "| arm | merge {COMPARISON_HEADER}")?;
    writeln!(md, "|---|---{COMPARISON_RULE}")?;
    for (arm, k, c) in &overall {
        writeln!(md, "| {} | {} {}", arm.name(), names[*k].0, c.cells())?;
    }
    if !across.is_empty() {
        writeln!(
            md,
            "\n### The paper's variant against the other arms, both merged by the sum (mean over tasks)\n"
        )?;
        writeln!(md, "| comparison {COMPARISON_HEADER}")?;
        writeln!(md, "|---{COMPARISON_RULE}")?;
        for (arm, c) in &across {
            writeln!(
                md,
                "| {} − {} {}",
                Arm::OrthogonalInput.name(),
                arm.name(),
                c.cells()
            )?;
        }
    }
    writeln!(md, "\n### The sum against each adapter alone, per task\n")?;
    writeln!(md, "| arm | task {COMPARISON_HEADER} within 1 point |")?;
    writeln!(md, "|---|---{COMPARISON_RULE}---|")?;
    for (arm, t, c) in &per_task {
        writeln!(
            md,
            "| {} | {} {} {} |",
            arm.name(),
            tasks[*t].name,
            c.cells(),
            if c.seeds.mean >= -1.0 { "yes" } else { "no" }
        )?;
    }
    for &arm in &s.arms {
        write_arm(&mut md, s, tasks, &runs_of(s, results, arm)?, arm)?;
    }
    Ok(md)
}

fn write_arm(
    md: &mut String,
    s: &Settings,
    tasks: &[Task],
    runs: &[&ArmResult],
    arm: Arm,
) -> AnyResult<()> {
    let names = methods(s);
    let Some(first) = runs.first() else {
        return Ok(());
    };
    writeln!(md, "\n## {}\n", arm.name())?;
    let lambdas: Vec<String> = runs.iter().map(|r| format!("{}", r.lambda)).collect();
    let cos = mean_std(&runs.iter().map(|r| r.mean_abs_cosine).collect::<Vec<_>>()).0;
    writeln!(
        md,
        "Trainable parameters per adapter (encoder factors + head, mean over tasks): {}. Mean |Frobenius cosine| between the tasks' deltas, over layers and pairs: {cos:.4}. Task arithmetic's λ per seed: {}.\n",
        first.trainable / tasks.len() as i64,
        lambdas.join(", ")
    )?;
    let mut header = "| method |".to_owned();
    let mut rule = "|---|".to_owned();
    for t in tasks {
        write!(header, " {} |", t.name)?;
        rule.push_str("---:|");
    }
    header.push_str(" mean |");
    rule.push_str("---:|");
    writeln!(
        md,
        "Accuracy (%) on each task's full test set, mean ± sd over seeds.\n\n{header}\n{rule}"
    )?;
    let row = |label: &str, get: &dyn Fn(&ArmResult) -> &Vec<Vec<bool>>| -> AnyResult<String> {
        let mut line = format!("| {label} |");
        for t in 0..tasks.len() {
            let v: Vec<f64> = runs
                .iter()
                .map(|r| mean_acc(std::slice::from_ref(&get(r)[t])))
                .collect();
            let (m, sd) = mean_std(&v);
            write!(line, " {m:.1} ± {sd:.1} |")?;
        }
        let (m, sd) = mean_std(&runs.iter().map(|r| mean_acc(get(r))).collect::<Vec<_>>());
        write!(line, " {m:.1} ± {sd:.1} |")?;
        Ok(line)
    };
    writeln!(md, "{}", row("each adapter alone", &|r| &r.alone)?)?;
    for (k, (name, _)) in names.iter().enumerate() {
        writeln!(md, "{}", row(name, &|r| &r.merged[k])?)?;
    }
    // Crosstalk: mean over seeds and layers, per ordered pair.
    if !first.crosstalk.is_empty() {
        writeln!(
            md,
            "\nCrosstalk ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ (row: the inputs of task i, recorded at the base encoder; column: the delta of task j), mean over layers and seeds; the mean over ordered pairs is {:.3}.\n",
            mean_std(
                &runs
                    .iter()
                    .flat_map(|r| r.crosstalk.iter().filter(|c| c.0 != c.1).map(|c| c.2))
                    .collect::<Vec<_>>()
            )
            .0
        )?;
        let mut header = "| inputs of ↓ / delta of → |".to_owned();
        for t in tasks {
            write!(header, " {} |", t.name)?;
        }
        writeln!(md, "{header}\n|---|{}", "---:|".repeat(tasks.len()))?;
        for (i, ti) in tasks.iter().enumerate() {
            let mut line = format!("| {} |", ti.name);
            for j in 0..tasks.len() {
                let v: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.crosstalk.iter().find(|c| c.0 == i && c.1 == j))
                    .map(|c| c.2)
                    .collect();
                if i == j || v.is_empty() {
                    line.push_str(" – |");
                } else {
                    write!(line, " {:.3} |", mean_std(&v).0)?;
                }
            }
            writeln!(md, "{line}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn flags_parse_and_bad_ones_are_usage_errors() {
        let s = parse(&[]).unwrap().unwrap();
        assert_eq!(s.seeds, vec![0, 1, 2]);
        assert_eq!(s.arms, Arm::ALL.to_vec());
        assert_eq!(s.arms[0], Arm::OrthogonalInput);
        assert_eq!(s.command, "cargo xtask experiment merge");
        let s = parse(&args(&[
            "--arms",
            "plain,output",
            "--seeds=4",
            "--lambdas",
            "0.5,1",
            "--out",
            "/tmp/x.md",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.arms, vec![Arm::Orthogonal, Arm::PlainLora]);
        assert_eq!(s.seeds, vec![4]);
        assert_eq!(s.lambdas, vec![0.5, 1.0]);
        assert_eq!(s.out, PathBuf::from("/tmp/x.md"));
        assert_eq!(
            s.command,
            "cargo xtask experiment merge --arms plain,output --seeds=4 --lambdas 0.5,1"
        );
        for bad in [
            &["--arms", "diagonal"][..],
            &["--arms", "input,input"],
            &["--bogus"],
            &["--rank", "0"],
            &["--seeds", "x"],
            &["--lr"],
            &["--lambdas", "0,1"],
            &["--density", "1.5"],
            &["stray"],
        ] {
            let e = parse(&args(bad)).err().unwrap();
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
        assert!(parse(&args(&["--help"])).unwrap().is_none());
    }

    #[test]
    fn seven_tasks_and_the_functional_ones_share_their_test_inputs() {
        let tasks = tasks().unwrap();
        let names: Vec<&str> = tasks.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "sentiment",
                "topic",
                "code",
                "math",
                "prose",
                "shell",
                "translation"
            ]
        );
        let functional: Vec<&Task> = tasks.iter().filter(|t| t.group == "functional").collect();
        assert_eq!(functional.len(), 5);
        // One vs rest: each functionality is 160 of the 800 test snippets,
        // and every snippet is positive in exactly one task.
        for t in &functional {
            assert_eq!(t.data.num_labels, 2);
            assert_eq!(t.data.test.len(), 800);
            assert_eq!(t.data.test.iter().filter(|e| e.label == 1).count(), 160);
        }
        for i in 0..800 {
            let pos = functional
                .iter()
                .filter(|t| t.data.test[i].label == 1)
                .count();
            assert_eq!(pos, 1, "snippet {i}");
            assert!(
                functional
                    .iter()
                    .all(|t| t.data.test[i].text == functional[0].data.test[i].text)
            );
        }
    }

    fn run_of(alone: &[&[bool]], sum: &[&[bool]]) -> ArmResult {
        let v = |x: &[&[bool]]| x.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
        ArmResult {
            alone: v(alone),
            merged: vec![v(sum); 5],
            lambda: 0.5,
            mean_abs_cosine: 0.0,
            crosstalk: vec![(0, 1, 0.25), (1, 0, 0.75)],
            trainable: 20,
        }
    }

    /// The report decides merged against alone per task and over tasks,
    /// the paper's variant against the other arms, and prints the crosstalk.
    #[test]
    fn report_decides_every_comparison_and_shows_the_crosstalk() {
        let s = Settings {
            seeds: vec![0, 1],
            arms: vec![Arm::OrthogonalInput, Arm::PlainLora],
            ..Settings::default()
        };
        let mut all = tasks().unwrap();
        all.truncate(2);
        let t = [true; 10];
        let mut half = [true; 10];
        half[5..].fill(false);
        let mut r = BTreeMap::new();
        // Input side: the sum equals alone.
        r.insert((Arm::OrthogonalInput, 0), run_of(&[&t, &t], &[&t, &t]));
        r.insert((Arm::OrthogonalInput, 1), run_of(&[&t, &t], &[&t, &t]));
        // Plain: task 0 loses half its examples under both seeds.
        r.insert((Arm::PlainLora, 0), run_of(&[&t, &t], &[&half, &t]));
        r.insert((Arm::PlainLora, 1), run_of(&[&t, &t], &[&half, &t]));
        let md = report(&s, &all, &r, 1.0).unwrap();
        assert!(
            md.contains("input sum − alone +0.00 [+0.00, +0.00] points"),
            "{md}"
        );
        assert!(md.contains("within 1 point on 2/2 tasks"), "{md}");
        assert!(
            md.contains("plain sum − alone -25.00 [-25.00, -25.00] points"),
            "{md}"
        );
        assert!(md.contains("within 1 point on 1/2 tasks"), "{md}");
        // Per task: plain's task 0 loses 50 points, 10 discordant examples.
        assert!(md.contains("| plain LoRA | sentiment | -50.00 [-50.00, -50.00] | < 1e-4 | 0 / 10 | 0.002 | worse | no |"), "{md}");
        assert!(md.contains("| no |"), "{md}");
        // The paper's variant beats plain LoRA by 25 points on the mean.
        assert!(
            md.contains("− plain LoRA | +25.00 [+25.00, +25.00]"),
            "{md}"
        );
        assert!(md.contains("| sentiment | – | 0.250 |"), "{md}");
        assert!(md.contains("| topic | 0.750 | – |"), "{md}");
    }
}
