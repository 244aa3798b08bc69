//! `cargo xtask experiment m2mkd`: module-to-module distillation (m2mKD) on
//! text, with the paper's schedule and paired verdicts.
//!
//! Teacher: all-MiniLM-L6-v2 fine-tuned on the dataset (mean pooling +
//! linear head), split into `M` modules of equal depth. Meta model: one
//! layer per module, initialised from the teacher (its embeddings, the last
//! layer of each module, its head), trained briefly with CE, frozen; the
//! teacher modules are incubated in it (Deep Incubation's step).
//!
//! Student: a narrower modular encoder, `M` modules of one BERT layer whose
//! FFN is `moe-router`'s `MoeLayer` (top-2 of `E` GELU experts), with its
//! own embeddings and head. Arms, for every seed:
//! - **scratch N**: end-to-end CE for `N` steps;
//! - **scratch N + D**: the same for `N + D` steps (equal total updates);
//! - **logit KD**: end-to-end eq. 2 against the whole teacher, `N` steps;
//! - **m2mKD**: each module distilled in its hybrid network for `D` steps
//!   (LayerNorm + Linear stitches), scored assembled with its stitches and
//!   loaded into the student without them, then trained end to end for the
//!   baseline's full `N` steps, as the paper does.
//!
//! Datasets: the sentiment domains (movie reviews; Amazon out of domain) and
//! the newsgroup topics (4 classes; other sub-groups out of domain), scored
//! on their full test sets; every comparison is decided by [`crate::stats`].

use std::fmt::Write as _;
use std::time::Instant;

use crate::stats::{COMPARISON_HEADER, COMPARISON_RULE, compare, fmt_interval, mean_std};
use model_zoo::data::TextClassification;
use model_zoo::source::ModelSource;
use recipes::flags::{AnyResult, Flags, usage};
use recipes::m2mkd::*;
use tensor_core::tch;

pub const M2MKD_HELP: &str = "usage: cargo xtask experiment m2mkd [--data sentiment,newsgroups] [--seeds 0,1,2] [--steps N]
                                    [--distil-steps D] [--batch N] [--max-len N] [--train-limit N]
                                    [--eval-limit N] [--teacher-steps N] [--meta-steps N] [--incubate-steps N]
                                    [--modules M] [--student-width N] [--experts N] [--sequential]
                                    [--threads N] [--out DIR]
A MiniLM teacher fine-tuned on each dataset and split into M modules; a narrower modular
student (M modules of one BERT layer, FFN = moe-router's MoeLayer, top-2 of E experts)
trained from scratch for N and for N + D steps, with logit KD for N steps, and with m2mKD:
D distillation steps per module, then the baseline's full N end-to-end steps. Scores the
distilled modules assembled with and without their stitches. Full test sets (in-domain
and out-of-domain); every comparison paired over seeds and over examples.
Defaults: --data sentiment,newsgroups --seeds 0,1,2 --steps 100 --distil-steps 100 --max-len 32
--train-limit 3200, all test examples. Writes DIR/m2mkd.md (default docs/results/m2mkd.md).
A smoke run: --data sentiment --seeds 0 --steps 10 --distil-steps 10 --teacher-steps 10 --meta-steps 5
--incubate-steps 5 --eval-limit 64 --out /tmp/m2mkd";

/// The datasets the experiment knows: flag value, folder, title.
const DATASETS: [(&str, &str, &str); 2] = [
    (
        "sentiment",
        "data/sentiment_domains",
        "sentiment (movie reviews; Amazon out of domain)",
    ),
    (
        "newsgroups",
        "data/newsgroups_shift",
        "newsgroup topics (4 classes; other newsgroups of the same topics out of domain)",
    ),
];

struct Options {
    plan: Plan,
    data: Vec<&'static str>,
    command: String,
}

fn parse(args: &[String]) -> AnyResult<Option<Options>> {
    const CMD: &str = "experiment m2mkd";
    let Some(f) = Flags::parse_options(
        CMD,
        args,
        &[
            "--data",
            "--seeds",
            "--steps",
            "--distil-steps",
            "--batch",
            "--max-len",
            "--train-limit",
            "--eval-limit",
            "--teacher-steps",
            "--meta-steps",
            "--incubate-steps",
            "--modules",
            "--student-width",
            "--experts",
            "--threads",
            "--out",
        ],
        &["--sequential"],
        M2MKD_HELP,
    )?
    else {
        return Ok(None);
    };
    let d = Plan::default();
    let p = Plan {
        seeds: f.seeds(d.seeds)?,
        steps: f.parsed_or("--steps", d.steps)?,
        distil_steps: f.parsed_or("--distil-steps", d.distil_steps)?,
        batch: f.parsed_or("--batch", d.batch)?,
        max_len: f.parsed_or("--max-len", d.max_len)?,
        train_limit: f.parsed_or("--train-limit", d.train_limit)?,
        eval_limit: f.parsed_or("--eval-limit", usize::MAX)?,
        teacher_steps: f.parsed_or("--teacher-steps", d.teacher_steps)?,
        meta_steps: f.parsed_or("--meta-steps", d.meta_steps)?,
        incubate_steps: f.parsed_or("--incubate-steps", d.incubate_steps)?,
        modules: f.parsed_or("--modules", d.modules)?,
        student_width: f.parsed_or("--student-width", d.student_width)?,
        experts: f.parsed_or("--experts", d.experts)?,
        parallel: !f.switch("--sequential"),
        threads: f.parsed_or("--threads", d.threads)?,
        out: f.path("--out").unwrap_or(d.out),
    };
    if p.steps < 1
        || p.distil_steps < 1
        || p.batch == 0
        || p.max_len < 4
        || p.train_limit == 0
        || p.eval_limit == 0
        || p.teacher_steps == 0
        || p.experts < 2
        || p.modules == 0
    {
        return usage(
            CMD,
            "need seeds, --steps and --distil-steps >= 1, --max-len >= 4, --experts >= 2, --modules >= 1 and positive sizes",
        );
    }
    if p.student_width <= 0 || p.student_width % 4 != 0 {
        return usage(
            CMD,
            "--student-width must be a positive multiple of 4 heads",
        );
    }
    let mut data = Vec::new();
    for name in f
        .list::<String>("--data")?
        .unwrap_or_else(|| vec!["sentiment".into(), "newsgroups".into()])
    {
        match DATASETS.iter().find(|d| d.0 == name) {
            Some(d) if !data.contains(&d.0) => data.push(d.0),
            Some(_) => return usage(CMD, format!("--data: '{name}' appears twice")),
            None => {
                return usage(
                    CMD,
                    format!("--data: unknown dataset '{name}' (sentiment, newsgroups)"),
                );
            }
        }
    }
    let mut shown: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--out" {
            it.next();
        } else {
            shown.push(a);
        }
    }
    let command = format!("cargo xtask experiment m2mkd {}", shown.join(" "))
        .trim()
        .to_owned();
    Ok(Some(Options {
        plan: p,
        data,
        command,
    }))
}

/// One seed's arms.
struct SeedResult {
    seed: u64,
    scratch: Scores,
    scratch_total: Scores,
    kd: Scores,
    stitched: Scores,
    assembled: Scores,
    m2m: Scores,
    distil_wall: f64,
}

fn run_seed(prep: &mut Prepared, p: &Plan, seed: u64) -> AnyResult<SeedResult> {
    let (scratch_n, kd) = baselines(prep, p, seed, true)?;
    let kd = kd.ok_or("the logit-KD arm did not run")?;
    let scratch_total = scratch(prep, p, seed, p.steps + p.distil_steps)?;
    let m = m2mkd_arm(prep, p, seed, None)?;
    log_scores(&format!("seed {seed}: m2mKD assembled"), &m.assembled);
    log_scores(&format!("seed {seed}: m2mKD + end to end"), &m.trained);
    Ok(SeedResult {
        seed,
        scratch: scratch_n,
        scratch_total,
        kd,
        stitched: m.stitched,
        assembled: m.assembled,
        m2m: m.trained,
        distil_wall: m.distil_wall,
    })
}

/// One dataset's run.
struct DatasetRun {
    name: &'static str,
    title: &'static str,
    prep: Prepared,
    seeds: Vec<SeedResult>,
    minutes: f64,
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(o) = parse(args)? else {
        return Ok(());
    };
    let p = &o.plan;
    if p.threads > 0 {
        tch::set_num_threads(p.threads);
    }
    let start = Instant::now();
    let source = ModelSource::resolve(None)?;
    let mut runs = Vec::new();
    for name in &o.data {
        let (_, dir, title) = DATASETS
            .iter()
            .find(|d| d.0 == *name)
            .ok_or("an unknown dataset")?;
        let t0 = Instant::now();
        let data = TextClassification::load(recipes::repo_root().join(dir))?;
        if data.test_ood.is_none() {
            return Err(format!("{dir} has no test_ood.jsonl").into());
        }
        eprintln!("{name}: teacher, meta model, incubation ...");
        let mut prep = prepare(p, &source, &data)?;
        let mut seeds = Vec::new();
        for &seed in &p.seeds {
            seeds.push(run_seed(&mut prep, p, seed)?);
        }
        runs.push(DatasetRun {
            name,
            title,
            prep,
            seeds,
            minutes: t0.elapsed().as_secs_f64() / 60.0,
        });
    }
    let md = report(&o, &runs, start.elapsed().as_secs_f64() / 60.0)?;
    recipes::report::write(&p.out, &md)
}

// ------------------------------------------------------------ report

type Get = fn(&SeedResult) -> &Scores;

/// The arms in table order.
const ARMS: [(&str, Get); 6] = [
    ("student, scratch N", |x| &x.scratch),
    ("student, scratch N + D (equal total)", |x| &x.scratch_total),
    ("student, logit KD", |x| &x.kd),
    (
        "m2mKD modules assembled with stitches (before end to end)",
        |x| &x.stitched,
    ),
    (
        "m2mKD modules in the student, stitches dropped (before end to end)",
        |x| &x.assembled,
    ),
    ("student, m2mKD (D distillation + N end to end)", |x| &x.m2m),
];

/// The decided comparisons: `(A, B)` by index into [`ARMS`].
const PAIRS: [(usize, usize); 5] = [(5, 0), (5, 1), (5, 2), (4, 3), (4, 0)];

fn pct(v: &[f64]) -> String {
    let (m, s) = mean_std(v);
    format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * s)
}

fn correct(s: &Scores, ood: bool) -> AnyResult<&[bool]> {
    Ok(if ood {
        s.ood_correct.as_deref().ok_or("no out-of-domain scores")?
    } else {
        &s.id_correct
    })
}

fn report(o: &Options, runs: &[DatasetRun], minutes: f64) -> AnyResult<String> {
    let p = &o.plan;
    // Decide every comparison first: the headline needs them.
    let mut decided = Vec::new();
    for run in runs {
        for (a, b) in PAIRS {
            for ood in [false, true] {
                let side = |k: usize| -> AnyResult<Vec<Vec<bool>>> {
                    run.seeds
                        .iter()
                        .map(|x| correct(ARMS[k].1(x), ood).map(<[bool]>::to_vec))
                        .collect()
                };
                decided.push((run.name, a, b, ood, compare(&side(a)?, &side(b)?)?));
            }
        }
    }
    let headline = decided
        .iter()
        .filter(|d| d.1 == 5 && d.2 != 2)
        .map(|(name, _, b, ood, c)| {
            format!(
                "{name} {}: m2mKD − {} {} points, {}",
                if *ood { "OOD" } else { "ID" },
                ["scratch N", "scratch N + D", "logit KD"][*b],
                fmt_interval(&c.seeds),
                c.verdict
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let budget = format!(
        "{} dataset(s) × {} seeds × 6 arms, N = {} and D = {} steps of batch {}, {:.1} min on {:?}",
        runs.len(),
        p.seeds.len(),
        p.steps,
        p.distil_steps,
        p.batch,
        minutes,
        tensor_core::best()
    );
    let mut md = crate::index::block(&o.command, &budget, &headline);
    writeln!(
        md,
        "# m2mKD: module-to-module distillation of a MiniLM teacher into a modular MoE student\n"
    )?;
    writeln!(md, "Command: `{}`.\n", o.command)?;
    writeln!(
        md,
        "Budget: {budget} ({} libtorch thread(s); the machine has 2 cores, shared at times, so times are upper bounds).\n",
        tch::get_num_threads()
    )?;
    writeln!(md, "## Setting\n")?;
    writeln!(
        md,
        "- Student: {} modules, each one BERT layer of width {} (4 heads) whose FFN is `moe-router`'s `MoeLayer` (top-2 of {} GELU experts of width {}, dropless, Switch balance loss 0.01), own embeddings and head; AdamW lr {STUDENT_LR}, weight decay 0.01, linear schedule with 10% warm-up, clipping 1.",
        p.modules,
        p.student_width,
        p.experts,
        p.student_width / 2
    )?;
    writeln!(
        md,
        "- Arms per seed: **scratch N**, end-to-end CE for N = {n} steps; **scratch N + D**, the same for {t} steps (as many updates as m2mKD in total); **logit KD**, N steps of eq. 2 (α = 0.5, τ = 1, `sum_over_BC`) against the whole teacher; **m2mKD**, D = {d} distillation steps per module (eq. 2 in the hybrid network, LayerNorm + Linear stitches, modules {par}), then the baseline's full N end-to-end CE steps, as the paper schedules it. The distilled modules are also scored before end-to-end training, assembled with their stitches (the meta model's interface widths) and loaded into the student with the stitches dropped.",
        n = p.steps,
        t = p.steps + p.distil_steps,
        d = p.distil_steps,
        par = if p.parallel {
            "in parallel threads"
        } else {
            "one after the other"
        },
    )?;
    writeln!(
        md,
        "- Teacher: all-MiniLM-L6-v2 + mean-pool head, fine-tuned {} steps (AdamW lr 1e-4); meta model trained {} steps and frozen; teacher modules incubated {} steps. Training on a seeded subset of at most {} examples, max {} tokens; scoring on every example of each test set. Seeds {:?} (student initialisation, batch order, dropout); teacher, meta model and incubated modules are shared by the seeds.\n",
        p.teacher_steps, p.meta_steps, p.incubate_steps, p.train_limit, p.max_len, p.seeds
    )?;
    writeln!(md, "## The paper's claim next to ours\n")?;
    writeln!(
        md,
        "The paper (arXiv 2402.16918): m2mKD improves NAC by up to +5.6% on Tiny-ImageNet and +4.2% on Tiny-ImageNet-R, and V-MoE-Base by +3.5% on ImageNet-1k, over end-to-end training, with full-length schedules (100-epoch module runs, 100-400-epoch end-to-end runs) on images. Ours, decided by `crates/experiments/src/stats.rs` (Δ = first arm − second in accuracy points; `better` / `worse` needs the 95% interval over seeds to exclude 0 and McNemar's exact test over the examples, pooled over seeds, to reject at 5%):\n"
    )?;
    writeln!(md, "| dataset | comparison | test set {COMPARISON_HEADER}")?;
    writeln!(md, "|---|---|---{COMPARISON_RULE}")?;
    for (name, a, b, ood, c) in &decided {
        writeln!(
            md,
            "| {name} | {} − {} | {} {}",
            ARMS[*a].0,
            ARMS[*b].0,
            if *ood { "out-of-domain" } else { "in-domain" },
            c.cells()
        )?;
    }
    for run in runs {
        let s = &run.prep.setup;
        writeln!(md, "\n## {} ({:.1} min)\n", run.title, run.minutes)?;
        writeln!(
            md,
            "{} training examples; {} in-domain and {} out-of-domain test examples; teacher split with `divided_depths = {:?}`.\n",
            s.train.ids.len(),
            s.test_id.ids.len(),
            s.test_ood.as_ref().map_or(0, |t| t.ids.len()),
            run.prep.boundaries.divided_depths
        )?;
        writeln!(
            md,
            "| model | ID accuracy (%) | OOD accuracy (%) | ID macro-F1 | OOD macro-F1 | wall s |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for (label, t) in [
            ("teacher (MiniLM-L6, fine-tuned)", &run.prep.teacher_scores),
            ("meta model (frozen)", &run.prep.meta_scores),
        ] {
            writeln!(
                md,
                "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                100.0 * t.id.accuracy,
                100.0 * t.ood_accuracy(),
                100.0 * t.id.macro_f1,
                100.0 * t.ood_f1(),
                t.seconds
            )?;
        }
        for (label, get) in ARMS {
            let col = |f: &dyn Fn(&Scores) -> f64| {
                pct(&run.seeds.iter().map(|x| f(get(x))).collect::<Vec<_>>())
            };
            let (secs, _) = mean_std(&run.seeds.iter().map(|x| get(x).seconds).collect::<Vec<_>>());
            writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {secs:.0} |",
                col(&|s| s.id.accuracy),
                col(&|s| s.ood_accuracy()),
                col(&|s| s.id.macro_f1),
                col(&|s| s.ood_f1()),
            )?;
        }
        writeln!(
            md,
            "\nPer seed (ID / OOD accuracy, %; distillation wall time):\n"
        )?;
        for x in &run.seeds {
            let cells: Vec<String> = ARMS
                .iter()
                .map(|(_, get)| {
                    let s = get(x);
                    format!(
                        "{:.1} / {:.1}",
                        100.0 * s.id.accuracy,
                        100.0 * s.ood_accuracy()
                    )
                })
                .collect();
            writeln!(
                md,
                "- seed {}: {} (distillation {:.0} s)",
                x.seed,
                cells.join(" · "),
                x.distil_wall
            )?;
        }
    }
    writeln!(
        md,
        "\nThe per-seed lists follow the arm order of the tables. Caveats: a CPU-sized budget, text instead of images, and a meta model initialised from the teacher rather than trained from scratch for 300 epochs."
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn defaults_run_both_datasets_on_full_test_sets_with_the_papers_schedule() {
        let o = parse(&[]).unwrap().unwrap();
        assert_eq!(o.data, vec!["sentiment", "newsgroups"]);
        assert_eq!(o.plan.eval_limit, usize::MAX);
        assert_eq!((o.plan.steps, o.plan.distil_steps), (100, 100));
        assert_eq!(o.command, "cargo xtask experiment m2mkd");
        let o = parse(&args(&[
            "--data",
            "newsgroups",
            "--out",
            "/tmp/x",
            "--steps",
            "7",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(o.data, vec!["newsgroups"]);
        assert_eq!(
            o.command,
            "cargo xtask experiment m2mkd --data newsgroups --steps 7"
        );
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["--data", "images"][..],
            &["--data", "sentiment,sentiment"],
            &["--seeds", "2,2"],
            &["--distil-steps", "0"],
            &["--student-width", "30"],
        ] {
            let e = parse(&args(bad)).err().expect("an error");
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn every_pair_names_two_arms_and_m2mkd_is_compared_with_each_baseline() {
        for (a, b) in PAIRS {
            assert!(a < ARMS.len() && b < ARMS.len() && a != b);
        }
        for baseline in 0..3 {
            assert!(PAIRS.contains(&(5, baseline)));
        }
    }
}
