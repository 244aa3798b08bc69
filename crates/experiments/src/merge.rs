//! `cargo xtask experiment merge`: the orthogonal-merge real task (issue 7,
//! `docs/results/merge.md`).
//!
//! Four LoRA adapters are trained independently on four distinct real tasks
//! (sentiment of movie reviews, newsgroup topic, the functionality of a text
//! snippet, and the source of a review sentence), with orthogonal bases
//! (Po et al., 2024: each task owns one bin of a shared, seeded orthogonal
//! basis, the frozen side; once with the output side frozen, once with the
//! input side, the spec's open choice) and as plain LoRA. Each arm's adapters
//! are then merged by every method of `orthogonal_merge` and each task is
//! scored with the merged encoder and its own head, against the adapter alone.
//!
//! Heads: every task keeps its own linear head (trained with its adapter);
//! only the encoder deltas are merged, as in multi-task merging of encoders
//! with task-specific classifiers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::stats::mean_std;
use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use model_zoo::finetune::{FinetuneOptions, finetune_with};
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use model_zoo::train::{BatchPlan, SplitMix64, evaluate, pad_batch_with_labels};
use orthogonal_merge::{
    BasisKind, Features, FrozenSide, MergeConfig, Method, Registry, TaskDelta, apply_merged,
    interference_with_features, merge, merge_with_features, record_features,
};
use recipes::flags::{AnyResult, Flags, usage};
use recipes::merge::*;
use tensor_core::tch::{Device, Tensor};

pub const MERGE_HELP: &str = "usage: cargo xtask experiment merge [--seeds 0,1,2] [--arms LIST] [--train-limit N] [--eval-limit N] [--epochs N] [--rank R] [--lr X] [--lambda X] [--density X] [--out FILE]
  Train one LoRA adapter per task (sentiment, topic, functionality, source) with orthogonal
  bases and as plain LoRA, merge each arm with every method, and score every task merged vs alone.
  --arms: comma-separated from output (orthogonal, output side frozen), input (orthogonal,
  input side frozen) and plain (PEFT-style LoRA).
  Defaults: --seeds 0,1,2 --arms output,input,plain --train-limit 2000 --eval-limit 500
  --epochs 1 --rank 8 --lr 1e-3 --lambda 0.5 (task arithmetic) --density 0.2 (TIES / DARE /
  pruning) --out docs/results/merge.md";

#[derive(Debug, Clone)]
struct Settings {
    seeds: Vec<u64>,
    arms: Vec<Arm>,
    opts: FinetuneOptions,
    rank: i64,
    lambda: f64,
    density: f64,
    out: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seeds: vec![0, 1, 2],
            arms: Arm::ALL.to_vec(),
            opts: FinetuneOptions {
                lr: 1e-3,
                train_limit: Some(2000),
                eval_limit: Some(500),
                progress: false,
                ..FinetuneOptions::default()
            },
            rank: 8,
            lambda: 0.5,
            density: 0.2,
            out: repo_root().join("docs/results/merge.md"),
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
            "--eval-limit",
            "--epochs",
            "--rank",
            "--lr",
            "--lambda",
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
                Some(a) => s.arms.push(a),
                None => {
                    return usage(
                        CMD,
                        format!("--arms: unknown arm '{w}' (output, input, plain)"),
                    );
                }
            }
        }
        s.arms.sort();
        s.arms.dedup();
    }
    s.opts.train_limit = f.parsed("--train-limit")?.or(s.opts.train_limit);
    s.opts.eval_limit = f.parsed("--eval-limit")?.or(s.opts.eval_limit);
    s.opts.epochs = f.parsed_or("--epochs", s.opts.epochs)?;
    s.rank = f.parsed_or("--rank", s.rank)?;
    s.opts.lr = f.parsed_or("--lr", s.opts.lr)?;
    s.lambda = f.parsed_or("--lambda", s.lambda)?;
    s.density = f.parsed_or("--density", s.density)?;
    s.out = f.path("--out").unwrap_or(s.out);
    if s.arms.is_empty() {
        return usage(CMD, "--arms needs at least one value");
    }
    if s.rank <= 0 || s.opts.epochs == 0 {
        return usage(CMD, "--rank and --epochs must be positive");
    }
    Ok(Some(s))
}

/// The merge methods compared, with their settings.
fn methods(s: &Settings, rank: i64) -> Vec<(String, MergeConfig)> {
    let d = s.density;
    vec![
        ("sum (= cat, exact)".into(), MergeConfig::new(Method::Sum)),
        (
            format!("task arithmetic (λ = {})", s.lambda),
            MergeConfig::new(Method::Linear).with_lambda(s.lambda),
        ),
        (
            format!("SVD of the sum (rank {rank})"),
            MergeConfig::new(Method::Svd).with_svd_rank(rank),
        ),
        (
            format!("magnitude prune (ρ = {d})"),
            MergeConfig::new(Method::MagnitudePrune).with_density(d),
        ),
        (
            format!("TIES (ρ = {d}, λ = 1)"),
            MergeConfig::new(Method::Ties).with_density(d),
        ),
        (
            format!("DARE linear (ρ = {d})"),
            MergeConfig::new(Method::DareLinear).with_density(d),
        ),
        (
            format!("DARE TIES (ρ = {d})"),
            MergeConfig::new(Method::DareTies).with_density(d),
        ),
        (
            "least squares on features".into(),
            MergeConfig::new(Method::LeastSquares),
        ),
    ]
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
            let plan = BatchPlan::new(set.ids.len(), 64).map_err(zoo_om)?;
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

/// One arm's results for one seed.
struct ArmResult {
    alone: Vec<f64>,
    merged: Vec<(String, Vec<f64>)>,
    mean_abs_cosine: f64,
    /// Mean crosstalk `‖ΔW_j X_i‖ / ‖ΔW_i X_i‖` on the tasks' recorded inputs.
    mean_crosstalk: f64,
    trainable: i64,
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
    // One registry per frozen side for every trainer: the bases depend only
    // on layer paths (and the side's size).
    let probe = SequenceClassifier::new(bert, 2, Pooling::Mean)?;
    let mut registries = BTreeMap::new();
    for side in [FrozenSide::Output, FrozenSide::Input] {
        let mut registry =
            Registry::for_model(&probe, &TARGETS, BasisKind::QrBins, 2024, s.rank, side)?;
        for t in &tasks {
            registry.claim(t.name)?;
        }
        registries.insert(side == FrozenSide::Input, registry);
    }
    drop(probe);
    let sets: Vec<Encoded> = tasks
        .iter()
        .map(|t| encode(&tok, &eval_subset(&t.data.test, s.opts.eval_limit)))
        .collect::<AnyResult<_>>()?;
    eprintln!("recording features for the least-squares merge ...");
    let features = task_features(&source, &tasks, &tok, pad, device)?;

    let mut results: BTreeMap<(Arm, u64), ArmResult> = BTreeMap::new();
    for &seed in &s.seeds {
        for &arm in &s.arms {
            let registry = &registries[&(arm.frozen_side() == Some(FrozenSide::Input))];
            let mut trained = Vec::new();
            let mut trainable = 0;
            for t in &tasks {
                eprintln!("seed {seed}, {}: training '{}' ...", arm.name(), t.name);
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
                eprintln!(
                    "  validation {:.4}, test {:.4} ({:.0} s)",
                    rep.validation.accuracy, rep.test.accuracy, rep.train_seconds
                );
                trainable += rep.trainable_params;
                trained.push(hooks.out.ok_or("the training run kept no adapter")?);
            }
            let deltas: Vec<TaskDelta> = trained.iter().map(|t| t.delta.shallow_clone()).collect();
            let inter = interference_with_features(&deltas, &features)?;
            let mut alone = Vec::new();
            for (i, set) in sets.iter().enumerate() {
                let m = merge(
                    std::slice::from_ref(&deltas[i]),
                    &MergeConfig::new(Method::Sum),
                )?;
                let mut model = with_head(&source, &trained[i].head, device)?;
                apply_merged(&mut model, &m)?;
                alone.push(accuracy(&model, set, pad, device)?);
            }
            eprintln!("  alone: {alone:.4?}");
            let mut merged = Vec::new();
            for (name, cfg) in methods(&s, s.rank) {
                let cfg = cfg.with_seed(seed);
                let m = if cfg.method == Method::LeastSquares {
                    merge_with_features(&deltas, &features, &cfg)?
                } else {
                    merge(&deltas, &cfg)?
                };
                let acc = score_merged(&source, &m, &trained, &sets, pad, device)?;
                eprintln!("  {name}: {acc:.4?}");
                merged.push((name, acc));
            }
            results.insert(
                (arm, seed),
                ArmResult {
                    alone,
                    merged,
                    mean_abs_cosine: inter.mean_abs_cosine(),
                    mean_crosstalk: inter
                        .crosstalk
                        .as_ref()
                        .and_then(|c| c.mean())
                        .unwrap_or(f64::NAN),
                    trainable,
                },
            );
        }
    }
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let md = report(&s, &tasks, &results, minutes, device);
    recipes::report::write(&s.out, &md)
}

fn mean(x: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = x.into_iter().collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn report(
    s: &Settings,
    tasks: &[Task],
    results: &BTreeMap<(Arm, u64), ArmResult>,
    minutes: f64,
    device: Device,
) -> String {
    let mut md = String::new();
    let o = &s.opts;
    let _ = writeln!(
        md,
        "# orthogonal-merge: merging independently trained adapters (issue 7)\n"
    );
    let _ = writeln!(
        md,
        "Command: `cargo xtask experiment merge` (= `cargo xtask experiment merge --seeds {} --arms {} --train-limit {} --eval-limit {} --epochs {} --rank {} --lr {:e} --lambda {} --density {}`).\n",
        s.seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        s.arms
            .iter()
            .map(|a| a.flag())
            .collect::<Vec<_>>()
            .join(","),
        o.train_limit.map_or("all".into(), |n| n.to_string()),
        o.eval_limit.map_or("all".into(), |n| n.to_string()),
        o.epochs,
        s.rank,
        o.lr,
        s.lambda,
        s.density,
    );
    let _ = writeln!(
        md,
        "Setting: all-MiniLM-L6-v2, mean pooling + a linear head per task; one LoRA adapter per task on every query and value projection (r = {r}, α = {a}), trained alone with its head (AdamW lr {lr:e}, weight decay {wd}, 10% warm-up then linear decay, clip 1, batch {b}, max {ml} tokens, {ep} epoch(s) on a seeded subset of at most {tl} training examples). Orthogonal arms: a shared QR basis per layer (seed 2024) and each task owns one bin of r directions of it; with the output side frozen the bin is `B` (r output directions) and only `A` (and the head) is trained, zero-initialised; with the input side frozen the bin is `A = B_iᵀ` (r input directions) and only `B` is trained, zero-initialised. Plain arm: PEFT-style LoRA, `A` seeded Kaiming-uniform, `B = 0`, both trained. Merging acts on the encoder deltas only; each task is scored with its own head on a fixed subset of at most {el} test examples (the same examples alone and merged, so the drops are paired). Seeds {seeds:?}. Budget: {minutes:.1} min on {device:?} with {threads} intra-op threads for everything.\n",
        r = s.rank,
        a = 2 * s.rank,
        lr = o.lr,
        wd = o.weight_decay,
        b = o.batch_size,
        ml = o.max_len,
        ep = o.epochs,
        tl = o.train_limit.map_or("all".into(), |n| n.to_string()),
        el = o.eval_limit.map_or("all".into(), |n| n.to_string()),
        seeds = s.seeds,
        threads = tensor_core::tch::get_num_threads(),
    );
    let _ = writeln!(md, "Tasks:\n");
    for t in tasks {
        let _ = writeln!(
            md,
            "- **{}**: {} — {} classes, {} train / {} test examples",
            t.name,
            t.what,
            t.data.num_labels,
            t.data.train.len(),
            t.data.test.len()
        );
    }
    let _ = writeln!(md);
    let mut summary = Vec::new();
    for &arm in &s.arms {
        let runs: Vec<&ArmResult> = s
            .seeds
            .iter()
            .filter_map(|&seed| results.get(&(arm, seed)))
            .collect();
        let Some(first) = runs.first() else { continue };
        let _ = writeln!(md, "## {}\n", arm.name());
        let _ = writeln!(
            md,
            "Trainable parameters per adapter (encoder factors + head): {}. Mean |Frobenius cosine| between the tasks' deltas, over layers and pairs: {:.4}. Mean crosstalk ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ (another task's delta on task i's inputs at the base encoder, relative to task i's own), over layers and ordered pairs: {:.4}.\n",
            first.trainable / tasks.len() as i64,
            mean(runs.iter().map(|r| r.mean_abs_cosine)),
            mean(runs.iter().map(|r| r.mean_crosstalk))
        );
        let mut header = "| method |".to_owned();
        let mut rule = "|---|".to_owned();
        for t in tasks {
            let _ = write!(header, " {} |", t.name);
            rule.push_str("---:|");
        }
        header.push_str(" mean | mean drop (points) |");
        rule.push_str("---:|---:|");
        let _ = writeln!(
            md,
            "Accuracy (%) on each task's test subset, mean over seeds.\n\n{header}\n{rule}"
        );
        let alone: Vec<f64> = (0..tasks.len())
            .map(|i| 100.0 * mean(runs.iter().map(|r| r.alone[i])))
            .collect();
        let row = |name: &str, acc: &[f64]| {
            let mut line = format!("| {name} |");
            for a in acc {
                let _ = write!(line, " {a:.1} |");
            }
            let drop = mean(alone.iter().zip(acc).map(|(a, m)| a - m));
            let _ = write!(line, " {:.1} | {:.1} |", mean(acc.iter().copied()), drop);
            (line, drop)
        };
        let (line, _) = row("each adapter alone", &alone);
        let _ = writeln!(md, "{line}");
        for (k, (name, _)) in first.merged.iter().enumerate() {
            let acc: Vec<f64> = (0..tasks.len())
                .map(|i| 100.0 * mean(runs.iter().map(|r| r.merged[k].1[i])))
                .collect();
            let (line, drop) = row(name, &acc);
            let _ = writeln!(md, "{line}");
            summary.push((arm, name.clone(), drop));
        }
        let _ = writeln!(md);
        if runs.len() > 1 {
            let _ = writeln!(md, "Mean drop per seed (points):\n");
            let _ = writeln!(md, "| method | {} | mean ± sd |", seeds_header(&s.seeds));
            let _ = writeln!(md, "|---|{}---:|", "---:|".repeat(runs.len()));
            for (k, (name, _)) in first.merged.iter().enumerate() {
                let drops: Vec<f64> = runs
                    .iter()
                    .map(|r| 100.0 * mean(r.alone.iter().zip(&r.merged[k].1).map(|(a, m)| a - m)))
                    .collect();
                let cells: String = drops.iter().map(|d| format!(" {d:.1} |")).collect();
                let (m, sd) = mean_std(&drops);
                let _ = writeln!(md, "| {name} |{cells} {m:.1} ± {sd:.1} |");
            }
            let _ = writeln!(md);
        }
    }
    let drop_of = |arm: Arm| {
        summary
            .iter()
            .find(|(a, n, _)| *a == arm && n.starts_with("sum"))
            .map(|x| x.2)
    };
    if let Some(p) = drop_of(Arm::PlainLora) {
        let _ = writeln!(
            md,
            "## Reading\n\nGoal (issue 7): the orthogonal sum loses at most 1 point per task on average, where summing plain LoRA adapters loses clearly more. The plain LoRA sum loses {p:.1} points on average over seeds.\n"
        );
        for arm in [Arm::Orthogonal, Arm::OrthogonalInput] {
            if let Some(o) = drop_of(arm) {
                let _ = writeln!(
                    md,
                    "- {}: the sum loses {o:.1} points — the goal is {}.",
                    arm.name(),
                    if o <= 1.0 && p > o + 1.0 {
                        "met"
                    } else {
                        "not met"
                    }
                );
            }
        }
        let _ = writeln!(md);
    }
    md
}

fn seeds_header(seeds: &[u64]) -> String {
    seeds
        .iter()
        .map(|s| format!("seed {s}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use model_zoo::data::{TextClassification, TextExample};
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn flags_parse_and_bad_ones_are_usage_errors() {
        let s = parse(&[]).unwrap().unwrap();
        assert_eq!(s.seeds, vec![0, 1, 2]);
        assert_eq!(s.arms, Arm::ALL.to_vec());
        let s = parse(&args(&[
            "--arms",
            "plain,output",
            "--seeds=4",
            "--eval-limit",
            "7",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.arms, vec![Arm::Orthogonal, Arm::PlainLora]);
        assert_eq!(s.seeds, vec![4]);
        assert_eq!(s.opts.eval_limit, Some(7));
        for bad in [
            &["--arms", "diagonal"][..],
            &["--bogus"],
            &["--rank", "0"],
            &["--seeds", "x"],
            &["--lr"],
            &["stray"],
        ] {
            let e = parse(&args(bad)).err().unwrap();
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
        assert!(parse(&args(&["--help"])).unwrap().is_none());
    }

    fn task(name: &'static str) -> Task {
        let ex = TextExample {
            text: "x".into(),
            label: 0,
        };
        Task {
            name,
            what: "a task",
            data: TextClassification {
                dir: PathBuf::new(),
                train: vec![ex.clone()],
                validation: vec![ex.clone()],
                test: vec![ex],
                test_ood: None,
                num_labels: 2,
            },
        }
    }

    fn result(alone: [f64; 2], sum: [f64; 2]) -> ArmResult {
        ArmResult {
            alone: alone.to_vec(),
            merged: vec![("sum (= cat, exact)".into(), sum.to_vec())],
            mean_abs_cosine: 0.0,
            mean_crosstalk: 0.0,
            trainable: 20,
        }
    }

    /// The report averages over seeds, gives each seed's drop with the
    /// spread, and judges the goal per orthogonal arm from the mean drops.
    #[test]
    fn report_gives_per_seed_drops_and_the_goal_per_arm() {
        let s = Settings {
            seeds: vec![0, 1],
            arms: Arm::ALL.to_vec(),
            ..Settings::default()
        };
        let tasks = [task("a"), task("b")];
        let mut r = BTreeMap::new();
        // Output side: drops 1.0 and 0.0 points → mean 0.5 (met).
        r.insert((Arm::Orthogonal, 0), result([0.80, 0.90], [0.79, 0.89]));
        r.insert((Arm::Orthogonal, 1), result([0.80, 0.90], [0.80, 0.90]));
        // Input side: drops 3.0 and 1.0 → mean 2.0 (not met).
        r.insert(
            (Arm::OrthogonalInput, 0),
            result([0.80, 0.90], [0.77, 0.87]),
        );
        r.insert(
            (Arm::OrthogonalInput, 1),
            result([0.80, 0.90], [0.79, 0.89]),
        );
        // Plain: drops 20 and 10 → mean 15.
        r.insert((Arm::PlainLora, 0), result([0.80, 0.90], [0.60, 0.70]));
        r.insert((Arm::PlainLora, 1), result([0.80, 0.90], [0.70, 0.80]));
        let md = report(&s, &tasks, &r, 1.0, Device::Cpu);
        assert!(md.contains("--seeds 0,1 --arms output,input,plain"), "{md}");
        assert!(
            md.contains("| sum (= cat, exact) | 79.5 | 89.5 | 84.5 | 0.5 |"),
            "{md}"
        );
        assert!(
            md.contains("| sum (= cat, exact) | 1.0 | 0.0 | 0.5 ± 0.7 |"),
            "{md}"
        );
        assert!(
            md.contains("| sum (= cat, exact) | 3.0 | 1.0 | 2.0 ± 1.4 |"),
            "{md}"
        );
        assert!(md.contains("plain LoRA sum loses 15.0 points"), "{md}");
        assert!(
            md.contains(
                "output side frozen to the task's bin): the sum loses 0.5 points — the goal is met"
            ),
            "{md}"
        );
        assert!(
            md.contains("input side frozen to the task's bin): the sum loses 2.0 points — the goal is not met"),
            "{md}"
        );
    }
}
