//! The sentiment experiments (never run in CI): fine-tune all-MiniLM-L6-v2
//! on the whole of `data/sentiment_domains/train.jsonl` (movie reviews) with
//! several methods under the same seeds, score every run on the full
//! in-domain test set and both out-of-domain sets (Amazon products, tweets),
//! and decide each comparison with [`crate::stats`]:
//! - `emoe`: dense vs EMoE (Qiu et al., 2024), and LoRA vs LoRA + EMoE;
//! - `pet`: full fine-tuning, LoRA, a bottleneck adapter, VL-PET at its four
//!   gate granularities with the paper's `s = 1` and with the sigmoid gates
//!   starting at 1, and LoRA + G (Hu et al., ICCV 2023).
//!
//! A learning-rate grid (`--lr-grid`, `--pet-lr-grid`) picks each method's
//! rate by validation accuracy under the first seed; that run is kept as the
//! method's first seed.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::stats::{
    COMPARISON_HEADER, COMPARISON_RULE, Comparison, compare, fmt_interval, mean_std,
};
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, FinetuneReport, finetune_with};
use model_zoo::source::ModelSource;
use pet_core::Granularity;
use recipes::flags::{AnyResult, Flags, usage};
use recipes::tune::*;

/// One training run.
struct Row {
    kind: Kind,
    seed: u64,
    lr: f64,
    trainable_percent: f64,
    report: FinetuneReport,
}

/// A sentiment experiment: what to train, how, and which pairs to compare.
struct Plan {
    seeds: Vec<u64>,
    opts: FinetuneOptions,
    /// Learning rate of the parameter-efficient methods (full fine-tuning and EMoE use `opts.lr`).
    pet_lr: f64,
    lr_grid: Vec<f64>,
    pet_lr_grid: Vec<f64>,
    setup: Setup,
    kinds: Vec<Kind>,
    /// `(A, B)`: each comparison reports `A − B`.
    pairs: Vec<(Kind, Kind)>,
    out: PathBuf,
    /// The command line that reproduces the page (without `--out`).
    command: String,
}

/// The flags every sentiment experiment takes.
const COMMON_FLAGS: [&str; 9] = [
    "--seeds",
    "--lr-grid",
    "--pet-lr-grid",
    "--train-limit",
    "--eval-limit",
    "--epochs",
    "--lr",
    "--pet-lr",
    "--out",
];

impl Plan {
    /// The defaults: every training and test example, the given seeds and
    /// epochs, lr 5e-5 (full) and 1e-3 (parameter-efficient), no grid.
    fn new(name: &str, seeds: Vec<u64>, epochs: u64) -> Self {
        Plan {
            seeds,
            opts: FinetuneOptions {
                epochs,
                progress: false,
                ..FinetuneOptions::default()
            },
            pet_lr: 1e-3,
            lr_grid: Vec::new(),
            pet_lr_grid: Vec::new(),
            setup: Setup::default(),
            kinds: Vec::new(),
            pairs: Vec::new(),
            out: recipes::repo_root()
                .join("docs/results")
                .join(format!("{name}.md")),
            command: format!("cargo xtask experiment {name}"),
        }
    }

    /// Read the common flags from `f`.
    fn read_common(&mut self, cmd: &str, f: &Flags, args: &[String]) -> AnyResult<()> {
        self.seeds = f.seeds(std::mem::take(&mut self.seeds))?;
        self.opts.train_limit = f.parsed("--train-limit")?;
        self.opts.eval_limit = f.parsed("--eval-limit")?;
        self.opts.epochs = f.parsed_or("--epochs", self.opts.epochs)?;
        self.opts.lr = f.parsed_or("--lr", self.opts.lr)?;
        self.pet_lr = f.parsed_or("--pet-lr", self.pet_lr)?;
        self.lr_grid = f.list("--lr-grid")?.unwrap_or_default();
        self.pet_lr_grid = f.list("--pet-lr-grid")?.unwrap_or_default();
        self.out = f.path("--out").unwrap_or(std::mem::take(&mut self.out));
        if self.opts.epochs == 0 {
            return usage(cmd, "--epochs must be positive");
        }
        for lr in [self.opts.lr, self.pet_lr]
            .iter()
            .chain(&self.lr_grid)
            .chain(&self.pet_lr_grid)
        {
            if !(lr.is_finite() && *lr > 0.0) {
                return usage(cmd, format!("a learning rate of {lr} (need > 0)"));
            }
        }
        let shown = recipes::flags::without_out(args);
        if !shown.is_empty() {
            self.command = format!("{} {}", self.command, shown.join(" "));
        }
        Ok(())
    }

    fn lr_of(&self, kind: Kind) -> (f64, &[f64]) {
        if kind.parameter_efficient() {
            (self.pet_lr, &self.pet_lr_grid)
        } else {
            (self.opts.lr, &self.lr_grid)
        }
    }
}

/// The scored test sets: long name, short name, key.
const SETS: [(&str, &str, &str); 3] = [
    ("in-domain (movies, test_id)", "in-domain", "test_id"),
    ("out-of-domain: Amazon (test_ood)", "Amazon", "test_ood"),
    (
        "out-of-domain: tweets (test_ood_tweets)",
        "tweets",
        "tweets",
    ),
];

/// Accuracy and per-example correctness of a run on set `which`.
fn scored<'a>(r: &'a FinetuneReport, which: &str) -> AnyResult<(f64, &'a [bool])> {
    Ok(match which {
        "test_id" => (r.test.accuracy, r.test_correct.as_slice()),
        "test_ood" => (
            r.test_ood.as_ref().ok_or("no test_ood.jsonl")?.accuracy,
            r.test_ood_correct.as_deref().ok_or("no test_ood.jsonl")?,
        ),
        _ => {
            let (_, m, c) = r
                .extra_tests
                .iter()
                .find(|(n, _, _)| n == which)
                .ok_or("no test_ood_tweets.jsonl")?;
            (m.accuracy, c.as_slice())
        }
    })
}

fn run_one(
    source: &ModelSource,
    data: &TextClassification,
    p: &Plan,
    kind: Kind,
    seed: u64,
    lr: f64,
) -> AnyResult<Row> {
    let o = FinetuneOptions {
        seed,
        lr,
        ..p.opts.clone()
    };
    eprintln!("seed {seed}: {} at lr {lr:e} ...", kind.name());
    let mut hooks = Hooks::new(kind, p.setup.clone(), seed);
    let report = finetune_with(source, data, &o, tensor_core::best(), &mut hooks)?;
    eprintln!(
        "  validation {:.4}  test_id {:.4}  test_ood {:.4}  ({:.0} s)",
        report.validation.accuracy,
        report.test.accuracy,
        report.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy),
        report.train_seconds
    );
    Ok(Row {
        kind,
        seed,
        lr,
        trainable_percent: hooks.trainable_percent,
        report,
    })
}

/// Every run of the plan: rows, the grid's log, minutes.
fn run(p: &mut Plan) -> AnyResult<(Vec<Row>, Vec<String>, f64)> {
    let source = ModelSource::resolve(None)?;
    let data = TextClassification::sentiment()?;
    let tweets = model_zoo::data::load_jsonl(data.dir.join("test_ood_tweets.jsonl"))?;
    p.opts.extra_tests = vec![("tweets".to_owned(), tweets)];
    let start = std::time::Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut grid_log = Vec::new();
    for &kind in &p.kinds {
        let (default, grid) = p.lr_of(kind);
        let lr = if grid.is_empty() {
            default
        } else {
            let mut best: Option<Row> = None;
            for &lr in grid {
                let r = run_one(&source, &data, p, kind, p.seeds[0], lr)?;
                grid_log.push(format!(
                    "{} lr {lr:e}: validation {:.2}%",
                    kind.name(),
                    100.0 * r.report.validation.accuracy
                ));
                if best
                    .as_ref()
                    .is_none_or(|b| r.report.validation.accuracy > b.report.validation.accuracy)
                {
                    best = Some(r);
                }
            }
            let best = best.ok_or("an empty learning-rate grid")?;
            let lr = best.lr;
            rows.push(best);
            lr
        };
        for &seed in &p.seeds {
            if !rows.iter().any(|r| r.kind == kind && r.seed == seed) {
                rows.push(run_one(&source, &data, p, kind, seed, lr)?);
            }
        }
    }
    Ok((rows, grid_log, start.elapsed().as_secs_f64() / 60.0))
}

/// A method's rows in seed order.
fn rows_of<'a>(rows: &'a [Row], seeds: &[u64], kind: Kind) -> Vec<&'a Row> {
    let mut v: Vec<&Row> = rows.iter().filter(|r| r.kind == kind).collect();
    v.sort_by_key(|r| seeds.iter().position(|s| *s == r.seed));
    v
}

/// One decided comparison: label, long set name, short set name.
struct Decided {
    label: String,
    set: &'static str,
    short: &'static str,
    c: Comparison,
}

fn decide_pairs(p: &Plan, rows: &[Row]) -> AnyResult<Vec<Decided>> {
    let mut out = Vec::new();
    for &(a, b) in &p.pairs {
        for (set, short, which) in SETS {
            let correct = |k: Kind| -> AnyResult<Vec<Vec<bool>>> {
                rows_of(rows, &p.seeds, k)
                    .iter()
                    .map(|r| scored(&r.report, which).map(|x| x.1.to_vec()))
                    .collect()
            };
            out.push(Decided {
                label: format!("{} − {}", a.name(), b.name()),
                set,
                short,
                c: compare(&correct(a)?, &correct(b)?)?,
            });
        }
    }
    Ok(out)
}

fn headline(d: &[Decided]) -> String {
    d.iter()
        .map(|x| {
            format!(
                "{}, {}: {} points, {}",
                x.label,
                x.short,
                fmt_interval(&x.c.seeds),
                x.c.verdict
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn budget(p: &Plan, rows: &[Row], minutes: f64) -> String {
    format!(
        "{} seeds × {} methods, {} training sentences × {} epoch(s), {:.1} min on {:?}",
        p.seeds.len(),
        p.kinds.len(),
        rows.first().map_or(0, |r| r.report.train_examples),
        p.opts.epochs,
        minutes,
        tensor_core::best()
    )
}

/// The page's opening: index block, title, command, budget, training and scoring protocol.
fn opening(p: &Plan, rows: &[Row], minutes: f64, title: &str, d: &[Decided]) -> AnyResult<String> {
    let budget = budget(p, rows, minutes);
    let mut md = crate::index::block(&p.command, &budget, &headline(d));
    writeln!(md, "# {title}\n")?;
    writeln!(md, "Command: `{}`.\n", p.command)?;
    writeln!(
        md,
        "Budget: {budget} ({} intra-op threads; the machine has 2 cores, shared with builds at times, so times are upper bounds).\n",
        tensor_core::tch::get_num_threads()
    )?;
    let o = &p.opts;
    let first = rows.first().map(|r| &r.report);
    writeln!(
        md,
        "Training: mean pooling + linear head (always trainable), AdamW (weight decay {}, linear warm-up {:.0}% then linear decay, clip 1), batch {}, max {} tokens, {} epoch(s) over {} training sentences (movie reviews). Scoring: {} of each test set: {} in-domain, {} Amazon, {} tweets. Learning rates: {}.\n",
        o.weight_decay,
        o.warmup_ratio * 100.0,
        o.batch_size,
        o.max_len,
        o.epochs,
        o.train_limit
            .map_or("all".to_owned(), |n| format!("a seeded subset of {n}")),
        o.eval_limit.map_or("every example".to_owned(), |n| format!(
            "a fixed subset of at most {n}"
        )),
        first.map_or(0, |r| r.test_correct.len()),
        first
            .and_then(|r| r.test_ood_correct.as_ref())
            .map_or(0, Vec::len),
        first
            .and_then(|r| r.extra_tests.first())
            .map_or(0, |e| e.2.len()),
        if p.lr_grid.is_empty() && p.pet_lr_grid.is_empty() {
            format!(
                "fixed, {:e} for full fine-tuning and {:e} for the parameter-efficient methods (no grid was run)",
                o.lr, p.pet_lr
            )
        } else {
            format!(
                "chosen per method by validation accuracy under seed {} from the grids {:?} (full) and {:?} (parameter-efficient); the other methods at {:e} / {:e}",
                p.seeds[0], p.lr_grid, p.pet_lr_grid, o.lr, p.pet_lr
            )
        }
    )?;
    Ok(md)
}

/// The paper's claim, the comparison table, and every run.
fn write_results(
    md: &mut String,
    claim: &str,
    d: &[Decided],
    p: &Plan,
    rows: &[Row],
    grid_log: &[String],
) -> AnyResult<()> {
    writeln!(md, "## The paper's claim next to ours\n")?;
    writeln!(md, "{claim}. Ours, {VERDICT_RULE}:\n")?;
    write_decided(md, d)?;
    write_runs(md, p, rows, grid_log)
}

/// The comparison table.
fn write_decided(md: &mut String, d: &[Decided]) -> AnyResult<()> {
    writeln!(md, "| comparison | test set {COMPARISON_HEADER}")?;
    writeln!(md, "|---|---{COMPARISON_RULE}")?;
    for x in d {
        writeln!(md, "| {} | {} {}", x.label, x.set, x.c.cells())?;
    }
    Ok(())
}

/// Accuracy per method, per seed, the grid, the majority rate.
fn write_runs(md: &mut String, p: &Plan, rows: &[Row], grid_log: &[String]) -> AnyResult<()> {
    writeln!(md, "\n## Accuracy per method (%, mean ± std over seeds)\n")?;
    writeln!(
        md,
        "| method | lr | trainable % | in-domain | Amazon | tweets | validation | train time / run |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for &k in &p.kinds {
        let r = rows_of(rows, &p.seeds, k);
        let acc = |which: &str| -> AnyResult<(f64, f64)> {
            Ok(mean_std(
                &r.iter()
                    .map(|x| scored(&x.report, which).map(|s| 100.0 * s.0))
                    .collect::<AnyResult<Vec<_>>>()?,
            ))
        };
        let (id, am, tw) = (acc("test_id")?, acc("test_ood")?, acc("tweets")?);
        let val = mean_std(
            &r.iter()
                .map(|x| 100.0 * x.report.validation.accuracy)
                .collect::<Vec<_>>(),
        );
        let secs = mean_std(&r.iter().map(|x| x.report.train_seconds).collect::<Vec<_>>());
        writeln!(
            md,
            "| {} | {:e} | {:.3} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.0} s |",
            k.name(),
            r.first().map_or(f64::NAN, |x| x.lr),
            r.first().map_or(f64::NAN, |x| x.trainable_percent),
            id.0,
            id.1,
            am.0,
            am.1,
            tw.0,
            tw.1,
            val.0,
            val.1,
            secs.0
        )?;
    }
    writeln!(
        md,
        "\nPer seed (in-domain / Amazon / tweets accuracy, %):\n"
    )?;
    for &k in &p.kinds {
        for r in rows_of(rows, &p.seeds, k) {
            writeln!(
                md,
                "- {} seed {} (lr {:e}): {:.2} / {:.2} / {:.2}",
                r.kind.name(),
                r.seed,
                r.lr,
                100.0 * scored(&r.report, "test_id")?.0,
                100.0 * scored(&r.report, "test_ood")?.0,
                100.0 * scored(&r.report, "tweets")?.0
            )?;
        }
    }
    if !grid_log.is_empty() {
        writeln!(md, "\nLearning-rate grid (seed {}):\n", p.seeds[0])?;
        for g in grid_log {
            writeln!(md, "- {g}")?;
        }
    }
    writeln!(
        md,
        "\nMajority class: in-domain {:.2}%.",
        100.0 * rows.first().map_or(f64::NAN, |r| r.report.test_majority)
    )?;
    Ok(())
}

const VERDICT_RULE: &str = "decided by `crates/experiments/src/stats.rs`: Δ is the first method's accuracy minus the second's, in points; `better` / `worse` needs the 95% interval over seeds to exclude 0 and McNemar's exact test over the examples, pooled over seeds, to reject at 5%";

// ------------------------------------------------------------------ emoe

pub const EMOE_HELP: &str = "usage: cargo xtask experiment emoe [--seeds 0,1,2] [--arms full,lora] [--lr-grid X,..] [--pet-lr-grid X,..]
                                   [--train-limit N] [--eval-limit N] [--epochs N] [--experts N] [--top-k K]
                                   [--layers L,..] [--placement reference|every-other] [--no-regularisers]
                                   [--lr X] [--pet-lr X] [--out DIR]
Dense vs EMoE (arm `full`) and LoRA vs LoRA + EMoE (arm `lora`), fine-tuning all-MiniLM-L6-v2 on the
whole of data/sentiment_domains/train.jsonl, scored on the full in-domain test set and both
out-of-domain sets (Amazon, tweets); every comparison paired over seeds and over examples.
EMoE follows the reference: one FFN in the upper half (--placement reference: layer 4 of 6, as
BERT-base's 10 of 12; `every-other`: layers 3 and 5), N=16 experts, top-4, with dropout 0.1 inside
the experts, CV² loss 0.01 and capacity factor 1.5 (--no-regularisers turns the three off).
--lr-grid / --pet-lr-grid: pick each method's learning rate by validation accuracy under the first seed.
Defaults: --seeds 0,1,2 --arms full,lora --lr 5e-5 --pet-lr 1e-3, one epoch, all training and test examples
(about 45 minutes on 2 cores; add seeds for a longer run).
Writes DIR/emoe.md (default docs/results/emoe.md).";

fn parse_emoe(args: &[String]) -> AnyResult<Option<(Plan, &'static str)>> {
    let cmd = "experiment emoe";
    let mut valued = COMMON_FLAGS.to_vec();
    valued.extend(["--arms", "--experts", "--top-k", "--layers", "--placement"]);
    let Some(f) = Flags::parse_options(cmd, args, &valued, &["--no-regularisers"], EMOE_HELP)?
    else {
        return Ok(None);
    };
    let mut p = Plan::new("emoe", vec![0, 1, 2], 1);
    p.read_common(cmd, &f, args)?;
    p.setup.experts = f.parsed_or("--experts", p.setup.experts)?;
    p.setup.top_k = f.parsed_or("--top-k", p.setup.top_k)?;
    let placement = match f.get("--placement").unwrap_or("reference") {
        "reference" => "reference",
        "every-other" => "every-other",
        x => {
            return usage(
                cmd,
                format!("--placement: unknown '{x}' (reference, every-other)"),
            );
        }
    };
    p.setup.emoe_layers = match (f.list::<usize>("--layers")?, placement) {
        (Some(l), _) => Some(l),
        (None, "every-other") => Some(emergent_split::convert::every_other_in_last_half(6)),
        (None, _) => None,
    };
    p.setup.emoe_regularisers = !f.switch("--no-regularisers");
    for a in f
        .list::<String>("--arms")?
        .unwrap_or_else(|| vec!["full".into(), "lora".into()])
    {
        let (dense, split) = match a.as_str() {
            "full" => (Kind::Full, Kind::Emoe),
            "lora" => (Kind::Lora, Kind::LoraEmoe),
            _ => return usage(cmd, format!("--arms: unknown arm '{a}' (full, lora)")),
        };
        p.kinds.extend([dense, split]);
        p.pairs.push((split, dense));
    }
    Ok(Some((p, placement)))
}

pub fn emoe(args: &[String]) -> AnyResult<()> {
    let Some((mut p, placement)) = parse_emoe(args)? else {
        return Ok(());
    };
    let (rows, grid_log, minutes) = run(&mut p)?;
    let d = decide_pairs(&p, &rows)?;
    let mut md = opening(
        &p,
        &rows,
        minutes,
        "EMoE vs dense fine-tuning of all-MiniLM-L6-v2 (sentiment, in- and out-of-domain)",
        &d,
    )?;
    let (experts, top_k) = (p.setup.experts, p.setup.top_k);
    let layers = match (&p.setup.emoe_layers, placement) {
        (Some(l), "every-other") => format!(
            "layers {l:?} of 6 (every other layer of the last half; an option, not the reference)"
        ),
        (Some(l), _) => format!("layers {l:?} of 6 (given by --layers)"),
        (None, _) => format!(
            "layer {:?} of 6 (the reference placement: one FFN in the upper half, never the last, as BERT-base's layer 10 of 12)",
            emergent_split::convert::reference_layers(6)
        ),
    };
    writeln!(
        md,
        "EMoE: {layers} split into N = {experts} experts of {} neurons by balanced k-means (seed 0), avg-key gate refreshed after every step, hard top-{top_k}, Tutel noise 1/N in training, {}. LoRA: r = {}, α = {} on query/value (+ the head); \"EMoE (full)\" tunes every weight of the split model, \"LoRA + EMoE\" splits the frozen FFN and tunes LoRA + head.\n",
        1536 / experts,
        if p.setup.emoe_regularisers {
            "with the reference's Tutel-path regularisers (dropout 0.1 inside the experts, CV² loss weight 0.01 added to the training loss, capacity factor 1.5 with priority routing in training and evaluation)"
        } else {
            "without the Tutel-path regularisers (--no-regularisers)"
        },
        p.setup.lora_r,
        2 * p.setup.lora_r,
    )?;
    let claim = "The paper: EMoE at least matches dense fine-tuning in- and out-of-domain, on top of full fine-tuning and of LoRA (authors' plot data: BERT-base GLUE average 79.58 dense → 80.46 EMoE; LoRA BERT-large in-domain 84.35 → 85.09; every one of 18 avg-k configurations beat dense on MRPC, RTE and CoLA)";
    write_results(&mut md, claim, &d, &p, &rows, &grid_log)?;
    if let Some(r) = rows
        .iter()
        .find(|r| matches!(r.kind, Kind::Emoe | Kind::LoraEmoe))
    {
        writeln!(md, "EMoE runs' notes: {}.", r.report.notes.join(" "))?;
    }
    recipes::report::write(&p.out, &md)
}

// ------------------------------------------------------------------- pet

pub const PET_HELP: &str = "usage: cargo xtask experiment pet [--seeds 0,1,2] [--arms LIST] [--epochs N] [--lr-grid X,..] [--pet-lr-grid X,..]
                                  [--train-limit N] [--eval-limit N] [--lr X] [--pet-lr X] [--out DIR]
Full fine-tuning, LoRA, a bottleneck adapter (training the encoder LayerNorms, as VL-PET does),
VL-PET at its four gate granularities with the paper's s = 1 (sigmoid gates start at 0.5) and
with s = 2 (they start at 1), and LoRA + G, on all-MiniLM-L6-v2 with the whole of
data/sentiment_domains/train.jsonl; scored on the full in-domain and both out-of-domain test sets,
every comparison paired over seeds and over examples.
--arms: comma-separated from full, lora, adapter, large, middle-x, middle-y, small,
large-at-one, middle-x-at-one, small-at-one, lora-g (`all` = every one). The default,
full,lora,adapter,large,large-at-one, fits about 45 minutes on 2 cores with 3 seeds and one
epoch; every arm at 3 epochs is about 5 hours there.
Defaults: --seeds 0,1,2 --epochs 1 --lr 5e-5 --pet-lr 1e-3, all training and test examples.
Writes DIR/pet.md (default docs/results/pet.md).";

/// The arms `experiment pet` knows, by flag name, in the page's order.
const PET_ARMS: [(&str, Kind); 11] = {
    use Granularity::{Large, MiddleX, MiddleY, Small};
    [
        ("full", Kind::Full),
        ("lora", Kind::Lora),
        ("adapter", Kind::Adapter),
        ("large", Kind::VlPet(Large)),
        ("middle-x", Kind::VlPet(MiddleX)),
        ("middle-y", Kind::VlPet(MiddleY)),
        ("small", Kind::VlPet(Small)),
        ("large-at-one", Kind::VlPetAtOne(Large)),
        ("middle-x-at-one", Kind::VlPetAtOne(MiddleX)),
        ("small-at-one", Kind::VlPetAtOne(Small)),
        ("lora-g", Kind::LoraGate),
    ]
};

/// The arms run without `--arms`: what 45 minutes on 2 cores hold.
const PET_DEFAULT_ARMS: [&str; 5] = ["full", "lora", "adapter", "large", "large-at-one"];

fn parse_pet(args: &[String]) -> AnyResult<Option<Plan>> {
    let cmd = "experiment pet";
    let mut valued = COMMON_FLAGS.to_vec();
    valued.push("--arms");
    let Some(f) = Flags::parse_options(cmd, args, &valued, &[], PET_HELP)? else {
        return Ok(None);
    };
    let mut p = Plan::new("pet", vec![0, 1, 2], 1);
    p.read_common(cmd, &f, args)?;
    let names: Vec<String> = match f.list::<String>("--arms")? {
        Some(a) if a.len() == 1 && a[0] == "all" => {
            PET_ARMS.iter().map(|(n, _)| n.to_string()).collect()
        }
        Some(a) => a,
        None => PET_DEFAULT_ARMS.iter().map(|n| n.to_string()).collect(),
    };
    let mut chosen = Vec::new();
    for n in &names {
        let Some(&(_, k)) = PET_ARMS.iter().find(|(name, _)| name == n) else {
            let known: Vec<&str> = PET_ARMS.iter().map(|(n, _)| *n).collect();
            return usage(
                cmd,
                format!("--arms: unknown arm '{n}' ({}, all)", known.join(", ")),
            );
        };
        if chosen.contains(&k) {
            return usage(cmd, format!("--arms: '{n}' given twice"));
        }
        chosen.push(k);
    }
    p.kinds = PET_ARMS
        .iter()
        .map(|&(_, k)| k)
        .filter(|k| chosen.contains(k))
        .collect();
    use Granularity::{Large, MiddleX, MiddleY, Small};
    let every_pair = [
        (Kind::VlPet(Large), Kind::Adapter),
        (Kind::VlPet(Large), Kind::Lora),
        (Kind::VlPet(Large), Kind::Full),
        (Kind::Adapter, Kind::Lora),
        (Kind::VlPet(MiddleX), Kind::Adapter),
        (Kind::VlPet(MiddleY), Kind::Adapter),
        (Kind::VlPet(Small), Kind::Adapter),
        (Kind::VlPetAtOne(Large), Kind::VlPet(Large)),
        (Kind::VlPetAtOne(MiddleX), Kind::VlPet(MiddleX)),
        (Kind::VlPetAtOne(Small), Kind::VlPet(Small)),
        (Kind::VlPetAtOne(Large), Kind::Adapter),
        (Kind::VlPetAtOne(Large), Kind::Full),
        (Kind::LoraGate, Kind::Lora),
    ];
    p.pairs = every_pair
        .into_iter()
        .filter(|(a, b)| p.kinds.contains(a) && p.kinds.contains(b))
        .collect();
    if p.pairs.is_empty() {
        return usage(
            cmd,
            format!("--arms {}: no comparison among these arms", names.join(",")),
        );
    }
    Ok(Some(p))
}

pub fn pet(args: &[String]) -> AnyResult<()> {
    let Some(mut p) = parse_pet(args)? else {
        return Ok(());
    };
    let (rows, grid_log, minutes) = run(&mut p)?;
    let d = decide_pairs(&p, &rows)?;
    let mut md = opening(
        &p,
        &rows,
        minutes,
        "Parameter-efficient tuning of all-MiniLM-L6-v2 (sentiment, in- and out-of-domain)",
        &d,
    )?;
    let r = p.setup.adapter_r;
    writeln!(
        md,
        "Methods: LoRA r = {}, α = {} on query/value. Bottleneck adapter (Houlsby placement, after self-attention and after the FFN, `H + ΔH(H)`): r = {r} (= d/8, VL-PET's r = 96 on d = 768 scaled to d = 384), 4 heads, GELU-tanh, N(0, 0.02²) init, with the encoder LayerNorms trainable like VL-PET's, so the two differ by the gate only. VL-PET: the same sites with `H' = s·(H + ΔH) ⊙ G` (r_g = {r}), encoder LayerNorms trainable; the paper's BART setting has s = 1, so the sigmoid gates (large, middle-X, small) start at 0.5 and halve each site's output at step 0; \"s·G starts at 1\" uses s = 2 for them, leaving the frozen encoder's output untouched at step 0 (middle-Y, `1 + z`, starts at 1 either way). LoRA + G: the large gate on each LoRA'd projection.\n",
        p.setup.lora_r,
        2 * p.setup.lora_r,
    )?;
    let skipped: Vec<String> = PET_ARMS
        .iter()
        .filter(|(_, k)| !p.kinds.contains(k))
        .map(|(n, k)| format!("{} (`{n}`)", k.name()))
        .collect();
    if !skipped.is_empty() {
        writeln!(
            md,
            "Not run here: {}. Each parameter-efficient run takes about 2.5 min per epoch on the 2 cores and full fine-tuning about 4.5, so every arm at 3 seeds × 3 epochs would take about 5 hours; the default keeps the arms the paper's headline and the gate-start question need, at one epoch (243 steps). Add them with `--arms` (`--arms all --epochs 3` is the paper-sized run).\n",
            skipped.join(", ")
        )?;
    }
    let claim = "The paper (BART-base and T5-base on VQAv2, GQA, NLVR², COCO; 3 seeds): VL-PET large > VL-PET small / middle-X / middle-Y > VL-Adapter > LoRA, and VL-PET large > full fine-tuning (BART-base 79.18 vs 76.93 VL-Adapter, 76.60 LoRA, 77.33 full)";
    write_results(&mut md, claim, &d, &p, &rows, &grid_log)?;
    recipes::report::write(&p.out, &md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn emoe_flags_build_the_pairs_and_the_command() {
        let (p, placement) =
            parse_emoe(&args(&["--arms", "full", "--seeds", "3,4", "--out", "/x"]))
                .unwrap()
                .unwrap();
        assert_eq!(p.kinds, vec![Kind::Full, Kind::Emoe]);
        assert_eq!(p.pairs, vec![(Kind::Emoe, Kind::Full)]);
        assert_eq!(p.seeds, vec![3, 4]);
        assert_eq!(placement, "reference");
        assert_eq!(p.setup.emoe_layers, None);
        assert!(p.setup.emoe_regularisers);
        assert_eq!(
            p.command,
            "cargo xtask experiment emoe --arms full --seeds 3,4"
        );
        assert_eq!(p.out, PathBuf::from("/x"));
        let (p, _) = parse_emoe(&args(&["--placement", "every-other", "--no-regularisers"]))
            .unwrap()
            .unwrap();
        assert_eq!(p.setup.emoe_layers, Some(vec![3, 5]));
        assert!(!p.setup.emoe_regularisers);
        assert_eq!(p.seeds, vec![0, 1, 2]);
        assert_eq!(p.opts.train_limit, None);
        assert_eq!(p.opts.eval_limit, None);
    }

    #[test]
    fn bad_emoe_and_pet_flags_are_usage_errors() {
        for bad in [
            &["--arms", "dense"][..],
            &["--placement", "middle"],
            &["--seeds", "1,1"],
            &["--lr-grid", "0,1e-5"],
            &["--epochs", "0"],
        ] {
            let e = parse_emoe(&args(bad)).err().expect("an error");
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
        let e = parse_pet(&args(&["--experts", "4"]))
            .err()
            .expect("an error");
        assert_eq!(exit_code(e.as_ref()), 2);
    }

    #[test]
    fn pet_compares_each_gate_start_with_the_paper_setting() {
        let p = parse_pet(&[]).unwrap().unwrap();
        assert_eq!(p.opts.epochs, 1);
        assert_eq!(p.seeds, vec![0, 1, 2]);
        assert_eq!(p.kinds.len(), PET_DEFAULT_ARMS.len());
        for &(a, b) in &p.pairs {
            assert!(p.kinds.contains(&a) && p.kinds.contains(&b), "{a:?} {b:?}");
        }
        assert!(p.pairs.contains(&(
            Kind::VlPetAtOne(Granularity::Large),
            Kind::VlPet(Granularity::Large)
        )));
        let all = parse_pet(&args(&["--arms", "all"])).unwrap().unwrap();
        assert_eq!(all.kinds.len(), PET_ARMS.len());
        assert_eq!(all.pairs.len(), 13);
        let two = parse_pet(&args(&["--arms", "small-at-one,small"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            two.kinds,
            vec![
                Kind::VlPet(Granularity::Small),
                Kind::VlPetAtOne(Granularity::Small)
            ]
        );
        assert_eq!(two.pairs.len(), 1);
        for bad in [
            &["--arms", "huge"][..],
            &["--arms", "lora,lora"],
            &["--arms", "full,middle-y"],
        ] {
            let e = parse_pet(&args(bad)).err().expect("an error");
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
    }
}
