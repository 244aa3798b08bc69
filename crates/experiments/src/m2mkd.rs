//! `cargo xtask experiment m2mkd`: module-to-module distillation (m2mKD)
//! with the paper's schedule and paired verdicts, on text and on images.
//!
//! Teacher: on text, all-MiniLM-L6-v2 fine-tuned on the dataset (mean
//! pooling + linear head); on images, m2mKD's own domain, a `model-zoo` ViT
//! trained here from scratch on Fashion-MNIST. Either is split into `M`
//! modules of equal depth. Meta model: one layer per module, initialised
//! from the teacher (its embeddings, the last layer of each module, its
//! head), trained briefly with CE, frozen; the teacher modules are incubated
//! in it (Deep Incubation's step).
//!
//! Student: a narrower modular network of the teacher's kind, `M` modules of
//! one layer whose FFN is `moe-router`'s `MoeLayer` (top-2 of `E` GELU
//! experts), with its own embeddings and head (on images, an MoE-ViT).
//! Arms, for every seed:
//! - **scratch N**: end-to-end CE for `N` steps;
//! - **scratch N + D**: the same for `N + D` steps (equal total updates);
//! - **logit KD**: end-to-end eq. 2 against the whole teacher, `N` steps;
//! - **m2mKD**: each module distilled in its hybrid network for `D` steps
//!   (LayerNorm + Linear stitches), scored assembled with its stitches and
//!   loaded into the student without them, then trained end to end for the
//!   baseline's full `N` steps, as the paper does.
//!
//! Datasets: the sentiment domains (movie reviews; Amazon and tweets out of
//! domain), the newsgroup topics (4 classes; other sub-groups out of
//! domain) and Fashion-MNIST (10 classes), scored on their full test sets;
//! every comparison is decided by [`crate::stats`].

use std::fmt::Write as _;
use std::time::Instant;

use crate::stats::{COMPARISON_HEADER, COMPARISON_RULE, compare, fmt_interval, mean_std};
use model_zoo::data::{TextClassification, fashion_mnist, load_jsonl};
use model_zoo::source::ModelSource;
use model_zoo::vit::VitConfig;
use recipes::flags::{AnyResult, Flags, usage};
use recipes::m2mkd::*;
use tensor_core::tch;

pub const M2MKD_HELP: &str = "usage: cargo xtask experiment m2mkd [--data sentiment,newsgroups,images] [--seeds 0,1,2] [--steps N]
                                    [--distil-steps D] [--batch N] [--max-len N] [--train-limit N]
                                    [--eval-limit N] [--teacher-steps N] [--meta-steps N] [--incubate-steps N]
                                    [--modules M] [--student-width N] [--experts N] [--sequential]
                                    [--image-steps N] [--image-distil-steps D] [--image-teacher-steps N]
                                    [--threads N] [--out DIR]
A teacher trained on each dataset (text: MiniLM fine-tuned; images: a ViT trained from scratch
on Fashion-MNIST) and split into M modules; a narrower modular student of the same kind
(M modules of one layer, FFN = moe-router's MoeLayer, top-2 of E experts) trained from
scratch for N and for N + D steps, with logit KD for N steps, and with m2mKD: D distillation
steps per module, then the baseline's full N end-to-end steps. Scores the distilled modules
assembled with and without their stitches. Full test sets (in-domain and every out-of-domain
set); every comparison paired over seeds and over examples.
Defaults: --data sentiment,newsgroups,images --seeds 0,1,2 --steps 100 --distil-steps 100
--max-len 32 --train-limit 3200 (text); images: N = D = 300 steps of batch 64 on all 10000
training images, a 2000-step teacher (--image-* change them), 100 meta and 50 incubation steps
(--meta-steps and --incubate-steps set both); all test examples.
Writes DIR/m2mkd.md (default docs/results/m2mkd.md).
A smoke run: --data sentiment --seeds 0 --steps 10 --distil-steps 10 --teacher-steps 10 --meta-steps 5
--incubate-steps 5 --eval-limit 64 --out /tmp/m2mkd";

/// A dataset the experiment knows.
struct Dataset {
    /// The `--data` value.
    flag: &'static str,
    dir: &'static str,
    title: &'static str,
    /// Names of the out-of-domain test sets: `test_ood.jsonl` first, then
    /// the files of `extra_ood`.
    ood_names: &'static [&'static str],
    /// Further out-of-domain files of the folder: (name, file).
    extra_ood: &'static [(&'static str, &'static str)],
}

const DATASETS: [Dataset; 3] = [
    Dataset {
        flag: "sentiment",
        dir: "data/sentiment_domains",
        title: "sentiment (movie reviews; Amazon and tweets out of domain)",
        ood_names: &["Amazon", "tweets"],
        extra_ood: &[("tweets", "test_ood_tweets.jsonl")],
    },
    Dataset {
        flag: "newsgroups",
        dir: "data/newsgroups_shift",
        title: "newsgroup topics (4 classes; other newsgroups of the same topics out of domain)",
        ood_names: &["other newsgroups"],
        extra_ood: &[],
    },
    Dataset {
        flag: "images",
        dir: "data/images/fashion_mnist",
        title: "Fashion-MNIST images (10 classes; a ViT teacher trained here, an MoE-ViT student)",
        ood_names: &[],
        extra_ood: &[],
    },
];

/// The ViT teacher of the image task: 28×28 grey images in 7×7 patches (16
/// patches + the class token), width 128, 6 layers of 4 heads, FFN 512,
/// dropout 0.1, 10 classes.
fn vit_teacher() -> VitConfig {
    VitConfig {
        image_size: 28,
        patch_size: 7,
        num_channels: 1,
        hidden_size: 128,
        num_hidden_layers: 6,
        num_attention_heads: 4,
        intermediate_size: 512,
        layer_norm_eps: 1e-6,
        num_labels: 10,
        hidden_act: "gelu".into(),
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.0,
        qkv_bias: true,
        initializer_range: 0.02,
    }
}

struct Options {
    /// The text datasets' plan.
    plan: Plan,
    /// The image dataset's plan.
    image_plan: Plan,
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
            "--image-steps",
            "--image-distil-steps",
            "--image-teacher-steps",
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
        teacher_lr: d.teacher_lr,
        meta_steps: f.parsed_or("--meta-steps", d.meta_steps)?,
        incubate_steps: f.parsed_or("--incubate-steps", d.incubate_steps)?,
        modules: f.parsed_or("--modules", d.modules)?,
        student_width: f.parsed_or("--student-width", d.student_width)?,
        experts: f.parsed_or("--experts", d.experts)?,
        parallel: !f.switch("--sequential"),
        threads: f.parsed_or("--threads", d.threads)?,
        out: f.path("--out").unwrap_or(d.out),
    };
    // Images: a ViT from scratch needs more steps and a larger learning
    // rate than fine-tuning MiniLM; the student is a width-64 MoE-ViT.
    let image_plan = Plan {
        steps: f.parsed_or("--image-steps", 300)?,
        distil_steps: f.parsed_or("--image-distil-steps", 300)?,
        teacher_steps: f.parsed_or("--image-teacher-steps", 2000)?,
        teacher_lr: 1e-3,
        batch: 64,
        train_limit: usize::MAX,
        meta_steps: f.parsed_or("--meta-steps", 100)?,
        incubate_steps: f.parsed_or("--incubate-steps", 50)?,
        student_width: 64,
        ..p.clone()
    };
    for q in [&p, &image_plan] {
        if q.steps < 1
            || q.distil_steps < 1
            || q.batch == 0
            || q.max_len < 4
            || q.train_limit == 0
            || q.eval_limit == 0
            || q.teacher_steps == 0
            || q.experts < 2
            || q.modules == 0
        {
            return usage(
                CMD,
                "need seeds, --steps, --distil-steps (and their --image-* forms) >= 1, --max-len >= 4, --experts >= 2, --modules >= 1 and positive sizes",
            );
        }
    }
    if p.student_width <= 0 || p.student_width % 4 != 0 {
        return usage(
            CMD,
            "--student-width must be a positive multiple of 4 heads",
        );
    }
    let teacher_depth = [6, vit_teacher().num_hidden_layers as usize];
    if let Some(depth) = teacher_depth.iter().find(|&&l| p.modules > l) {
        return usage(
            CMD,
            format!(
                "--modules {}: the teachers have {depth} layers to split",
                p.modules
            ),
        );
    }
    let mut data = Vec::new();
    for name in f
        .list::<String>("--data")?
        .unwrap_or_else(|| DATASETS.iter().map(|d| d.flag.to_owned()).collect())
    {
        match DATASETS.iter().find(|d| d.flag == name) {
            Some(d) if !data.contains(&d.flag) => data.push(d.flag),
            Some(_) => return usage(CMD, format!("--data: '{name}' appears twice")),
            None => {
                return usage(
                    CMD,
                    format!("--data: unknown dataset '{name}' (sentiment, newsgroups, images)"),
                );
            }
        }
    }
    let shown = recipes::flags::without_out(args);
    let command = format!("cargo xtask experiment m2mkd {}", shown.join(" "))
        .trim()
        .to_owned();
    Ok(Some(Options {
        plan: p,
        image_plan,
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
    set: &'static Dataset,
    plan: Plan,
    prep: Prepared,
    seeds: Vec<SeedResult>,
    minutes: f64,
}

impl DatasetRun {
    /// The scored test sets' names: in-domain first, then each out-of-domain set.
    fn set_names(&self) -> Vec<String> {
        let mut v = vec!["in-domain".to_owned()];
        v.extend(
            (0..self.prep.setup.test_ood.len())
                .map(|i| {
                    self.set
                        .ood_names
                        .get(i)
                        .copied()
                        .unwrap_or("out-of-domain")
                })
                .map(|n| format!("out-of-domain: {n}")),
        );
        v
    }
}

fn prepare_dataset(d: &Dataset, o: &Options, source: &ModelSource) -> AnyResult<(Plan, Prepared)> {
    let root = recipes::repo_root();
    if d.flag == "images" {
        let p = o.image_plan.clone();
        let (train, test) = (fashion_mnist("train")?, fashion_mnist("test")?);
        let prep = prepare_images(&p, vit_teacher(), &train, &test)?;
        return Ok((p, prep));
    }
    let p = o.plan.clone();
    let data = TextClassification::load(root.join(d.dir))?;
    if data.test_ood.is_none() {
        return Err(format!("{} has no test_ood.jsonl", d.dir).into());
    }
    let mut extra = Vec::new();
    for (name, file) in d.extra_ood {
        extra.push(((*name).to_owned(), load_jsonl(root.join(d.dir).join(file))?));
    }
    let prep = prepare_text(&p, source, &data, &extra)?;
    Ok((p, prep))
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(o) = parse(args)? else {
        return Ok(());
    };
    if o.plan.threads > 0 {
        tch::set_num_threads(o.plan.threads);
    }
    let start = Instant::now();
    let source = ModelSource::resolve(None)?;
    let mut runs = Vec::new();
    for name in &o.data {
        let set = DATASETS
            .iter()
            .find(|d| d.flag == *name)
            .ok_or("an unknown dataset")?;
        let t0 = Instant::now();
        eprintln!("{name}: teacher, meta model, incubation ...");
        let (plan, mut prep) = prepare_dataset(set, &o, &source)?;
        let mut seeds = Vec::new();
        for &seed in &plan.seeds {
            seeds.push(run_seed(&mut prep, &plan, seed)?);
        }
        runs.push(DatasetRun {
            set,
            plan,
            prep,
            seeds,
            minutes: t0.elapsed().as_secs_f64() / 60.0,
        });
    }
    let md = report(&o, &runs, start.elapsed().as_secs_f64() / 60.0)?;
    recipes::report::write(&o.plan.out, &md)
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

/// Per-example correctness on test set `set` (0 in-domain, then each
/// out-of-domain set).
fn correct(s: &Scores, set: usize) -> AnyResult<&[bool]> {
    Ok(match set {
        0 => &s.id_correct,
        i => {
            &s.ood
                .get(i - 1)
                .ok_or("a missing out-of-domain score")?
                .correct
        }
    })
}

fn accuracy(s: &Scores, set: usize) -> f64 {
    match set {
        0 => s.id.accuracy,
        i => s.ood.get(i - 1).map_or(f64::NAN, |o| o.metrics.accuracy),
    }
}

/// One decided comparison: dataset, arms A and B, test set, its name, the decision.
type Decided = (
    &'static str,
    usize,
    usize,
    usize,
    String,
    crate::stats::Comparison,
);

fn report(o: &Options, runs: &[DatasetRun], minutes: f64) -> AnyResult<String> {
    // Decide every comparison first: the headline needs them.
    let mut decided: Vec<Decided> = Vec::new();
    for run in runs {
        for (a, b) in PAIRS {
            for (set, set_name) in run.set_names().into_iter().enumerate() {
                let side = |k: usize| -> AnyResult<Vec<Vec<bool>>> {
                    run.seeds
                        .iter()
                        .map(|x| correct(ARMS[k].1(x), set).map(<[bool]>::to_vec))
                        .collect()
                };
                let c = compare(&side(a)?, &side(b)?)?;
                decided.push((run.set.flag, a, b, set, set_name, c));
            }
        }
    }
    let headline = decided
        .iter()
        .filter(|d| d.1 == 5 && (d.2 == 0 || (d.2 == 1 && d.3 == 0)))
        .map(|(name, _, b, _, set_name, c)| {
            format!(
                "{name} {set_name}: m2mKD − {} {} points, {}",
                ["scratch N", "scratch N + D", "logit KD"][*b],
                fmt_interval(&c.seeds),
                c.verdict
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let per_run: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{} N = {}, D = {} steps of batch {}",
                r.set.flag, r.plan.steps, r.plan.distil_steps, r.plan.batch
            )
        })
        .collect();
    let budget = format!(
        "{} dataset(s) × {} seeds × 6 arms ({}), {:.1} min on {:?}",
        runs.len(),
        o.plan.seeds.len(),
        per_run.join("; "),
        minutes,
        tensor_core::best()
    );
    let mut md = crate::index::block(&o.command, &budget, &headline);
    writeln!(
        md,
        "# m2mKD: module-to-module distillation of a monolithic teacher into a modular MoE student\n"
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
        "- Arms per seed: **scratch N**, end-to-end CE for N steps; **scratch N + D**, the same for N + D steps (as many updates as m2mKD in total); **logit KD**, N steps of eq. 2 (α = 0.5, τ = 1, `sum_over_BC`) against the whole teacher; **m2mKD**, D distillation steps per module (eq. 2 in the hybrid network, LayerNorm + Linear stitches, modules {}), then the baseline's full N end-to-end CE steps, as the paper schedules it. The distilled modules are also scored before end-to-end training, assembled with their stitches (the meta model's interface widths) and loaded into the student with the stitches dropped.",
        if o.plan.parallel {
            "in parallel threads"
        } else {
            "one after the other"
        },
    )?;
    writeln!(
        md,
        "- Student: M modules, each one layer of the teacher's kind (BERT on text, ViT on images) of a narrower width with 4 heads, whose FFN is `moe-router`'s `MoeLayer` (top-2 of {} GELU experts of half the width, dropless, Switch balance loss 0.01), own embeddings and head; AdamW lr {STUDENT_LR}, weight decay 0.01, linear schedule with 10% warm-up, clipping 1. Sizes per dataset below.",
        o.plan.experts
    )?;
    writeln!(
        md,
        "- Meta model: one teacher-width layer per module, initialised from the teacher (embeddings, the last layer of each module, head), trained and frozen; teacher modules incubated in it. Seeds {:?} (student initialisation, batch order, dropout); teacher, meta model and incubated modules are shared by the seeds. Scoring on every example of each test set. The arms trained end to end are bit-reproducible; with the modules distilled in parallel threads their dropout masks come from libtorch's one global generator in an interleaved order, so the m2mKD rows move a little from run to run (`--sequential` makes them reproducible, at about twice the distillation time).\n",
        o.plan.seeds
    )?;
    writeln!(md, "## The paper's claim next to ours\n")?;
    writeln!(
        md,
        "The paper (arXiv 2402.16918): m2mKD improves NAC by up to +5.6% on Tiny-ImageNet and +4.2% on Tiny-ImageNet-R, and V-MoE-Base by +3.5% on ImageNet-1k, over end-to-end training, with full-length schedules (100-epoch module runs, 100-400-epoch end-to-end runs) on images. Ours, decided by `crates/experiments/src/stats.rs` (Δ = first arm − second in accuracy points; `better` / `worse` needs the 95% interval over seeds to exclude 0 and McNemar's exact test over the examples, pooled over seeds, to reject at 5%):\n"
    )?;
    writeln!(md, "| dataset | comparison | test set {COMPARISON_HEADER}")?;
    writeln!(md, "|---|---|---{COMPARISON_RULE}")?;
    for (name, a, b, _, set_name, c) in &decided {
        writeln!(
            md,
            "| {name} | {} − {} | {set_name} {}",
            ARMS[*a].0,
            ARMS[*b].0,
            c.cells()
        )?;
    }
    for run in runs {
        write_dataset(&mut md, run)?;
    }
    writeln!(
        md,
        "\nThe per-seed lists follow the arm order of the tables. Caveats: a CPU-sized budget (a 6-layer ViT teacher of width 128 instead of DeiT, thousands of steps instead of hundreds of epochs), and a meta model initialised from the teacher rather than trained from scratch for 300 epochs."
    )?;
    Ok(md)
}

fn write_dataset(md: &mut String, run: &DatasetRun) -> AnyResult<()> {
    let (s, p) = (&run.prep.setup, &run.plan);
    let names = run.set_names();
    writeln!(md, "\n## {} ({:.1} min)\n", run.set.title, run.minutes)?;
    let teacher = match &s.arch {
        Arch::Bert(_) => format!(
            "all-MiniLM-L6-v2 + mean-pool head, fine-tuned {} steps (AdamW lr {:e}), max {} tokens",
            p.teacher_steps, p.teacher_lr, p.max_len
        ),
        Arch::Vit(c) => format!(
            "a ViT trained here from scratch ({} layers of width {}, {} heads, FFN {}, {}×{} patches of {}×{} images + the class token, dropout {}, final LayerNorm + linear head on the class token; {:.2}M parameters), {} steps of batch {} (AdamW lr {:e}, 10% warm-up, linear decay)",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            c.patch_size,
            c.patch_size,
            c.image_size,
            c.image_size,
            c.hidden_dropout_prob,
            run.prep.teacher_parameters() as f64 / 1e6,
            p.teacher_steps,
            p.batch,
            p.teacher_lr
        ),
    };
    let sizes: Vec<String> = std::iter::once(format!("{} in-domain", s.test_id.len()))
        .chain(
            names
                .iter()
                .skip(1)
                .zip(&s.test_ood)
                .map(|(n, (_, e))| format!("{} {n}", e.len())),
        )
        .collect();
    writeln!(
        md,
        "Teacher: {teacher}; split with `divided_depths = {:?}`; meta model trained {} steps, incubation {} steps. Student: {} modules of one {} of width {} with {} experts of width {}. N = {}, D = {}, batch {}. {} training examples; test examples: {}.\n",
        run.prep.boundaries.divided_depths,
        p.meta_steps,
        p.incubate_steps,
        p.modules,
        s.arch.layer_name(),
        p.student_width,
        p.experts,
        p.student_width / 2,
        p.steps,
        p.distil_steps,
        p.batch,
        s.train.len(),
        sizes.join(", "),
    )?;
    let header: Vec<String> = names.iter().map(|n| format!("{n} accuracy (%)")).collect();
    writeln!(
        md,
        "| model | {} | in-domain macro-F1 | wall s |",
        header.join(" | ")
    )?;
    writeln!(md, "|---|{}---|---|", "---|".repeat(names.len()))?;
    for (label, t) in [
        ("teacher", &run.prep.teacher_scores),
        ("meta model (frozen)", &run.prep.meta_scores),
    ] {
        let accs: Vec<String> = (0..names.len())
            .map(|i| format!("{:.1}", 100.0 * accuracy(t, i)))
            .collect();
        writeln!(
            md,
            "| {label} | {} | {:.1} | {:.0} |",
            accs.join(" | "),
            100.0 * t.id.macro_f1,
            t.seconds
        )?;
    }
    for (label, get) in ARMS {
        let col = |f: &dyn Fn(&Scores) -> f64| {
            pct(&run.seeds.iter().map(|x| f(get(x))).collect::<Vec<_>>())
        };
        let accs: Vec<String> = (0..names.len()).map(|i| col(&|s| accuracy(s, i))).collect();
        let (secs, _) = mean_std(&run.seeds.iter().map(|x| get(x).seconds).collect::<Vec<_>>());
        writeln!(
            md,
            "| {label} | {} | {} | {secs:.0} |",
            accs.join(" | "),
            col(&|s| s.id.macro_f1),
        )?;
    }
    writeln!(
        md,
        "\nPer seed ({} accuracy, %; distillation wall time):\n",
        names.join(" / ")
    )?;
    for x in &run.seeds {
        let cells: Vec<String> = ARMS
            .iter()
            .map(|(_, get)| {
                let s = get(x);
                (0..names.len())
                    .map(|i| format!("{:.1}", 100.0 * accuracy(s, i)))
                    .collect::<Vec<_>>()
                    .join(" / ")
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn defaults_run_both_datasets_on_full_test_sets_with_the_papers_schedule() {
        let o = parse(&[]).unwrap().unwrap();
        assert_eq!(o.data, vec!["sentiment", "newsgroups", "images"]);
        assert_eq!((o.image_plan.steps, o.image_plan.distil_steps), (300, 300));
        assert_eq!(o.image_plan.teacher_lr, 1e-3);
        assert_eq!(o.image_plan.eval_limit, usize::MAX);
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
            &["--data", "pictures"][..],
            &["--modules", "7"],
            &["--image-steps", "0"],
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
