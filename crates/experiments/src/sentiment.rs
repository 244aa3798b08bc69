//! Real-task experiments behind `cargo xtask experiment NAME` (never run in CI).
//!
//! Each fine-tunes all-MiniLM-L6-v2 on the project's sentiment data (movie
//! reviews; in-domain test, and Amazon product reviews out of domain) with
//! several methods and seeds, and writes a markdown table:
//! - `emoe`: dense vs EMoE (Qiu et al., 2024), and LoRA vs LoRA + EMoE;
//! - `pet`: full fine-tuning, LoRA, a bottleneck adapter, VL-PET at its four
//!   gate granularities, and LoRA + G (Hu et al., ICCV 2023).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::stats::mean_std;
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, FinetuneReport, finetune_with};
use model_zoo::source::ModelSource;
use pet_core::Granularity;
use recipes::flags::{AnyResult, Flags, usage};
use recipes::tune::*;

struct Row {
    kind: Kind,
    seed: u64,
    trainable_percent: f64,
    report: FinetuneReport,
}

/// Options shared by the experiments.
struct Plan {
    seeds: Vec<u64>,
    opts: FinetuneOptions,
    /// Learning rate of the parameter-efficient methods (full fine-tuning uses `opts.lr`).
    pet_lr: f64,
    setup: Setup,
    out: PathBuf,
}

fn parse(
    cmd: &'static str,
    args: &[String],
    help: &str,
    mut plan: Plan,
) -> AnyResult<Option<Plan>> {
    let Some(f) = Flags::parse_options(
        cmd,
        args,
        &[
            "--seeds",
            "--train-limit",
            "--eval-limit",
            "--epochs",
            "--experts",
            "--top-k",
            "--lr",
            "--pet-lr",
            "--out",
        ],
        &[],
        help,
    )?
    else {
        return Ok(None);
    };
    plan.seeds = f.list("--seeds")?.unwrap_or(plan.seeds);
    plan.opts.train_limit = f.parsed("--train-limit")?.or(plan.opts.train_limit);
    plan.opts.eval_limit = f.parsed("--eval-limit")?.or(plan.opts.eval_limit);
    plan.opts.epochs = f.parsed_or("--epochs", plan.opts.epochs)?;
    plan.setup.experts = f.parsed_or("--experts", plan.setup.experts)?;
    plan.setup.top_k = f.parsed_or("--top-k", plan.setup.top_k)?;
    plan.opts.lr = f.parsed_or("--lr", plan.opts.lr)?;
    plan.pet_lr = f.parsed_or("--pet-lr", plan.pet_lr)?;
    plan.out = f.path("--out").unwrap_or(plan.out);
    if plan.seeds.is_empty() || plan.opts.epochs == 0 {
        return usage(
            cmd,
            "--seeds needs at least one value and --epochs must be positive",
        );
    }
    Ok(Some(plan))
}

fn run(plan: &Plan, kinds: &[Kind]) -> AnyResult<(Vec<Row>, f64)> {
    let source = ModelSource::resolve(None)?;
    let data = TextClassification::sentiment()?;
    let device = tensor_core::best();
    let start = std::time::Instant::now();
    let mut rows = Vec::new();
    for &seed in &plan.seeds {
        for &kind in kinds {
            let o = FinetuneOptions {
                seed,
                lr: if kind.parameter_efficient() {
                    plan.pet_lr
                } else {
                    plan.opts.lr
                },
                ..plan.opts.clone()
            };
            eprintln!("seed {seed}: {} ...", kind.name());
            let mut hooks = Hooks {
                kind,
                setup: plan.setup.clone(),
                seed,
                trainable_percent: 100.0,
            };
            let report = finetune_with(&source, &data, &o, device, &mut hooks)?;
            let ood = report.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy);
            eprintln!(
                "  test_id {:.4}  test_ood {:.4}  trainable {:.3}%  ({:.0} s)",
                report.test.accuracy, ood, hooks.trainable_percent, report.train_seconds
            );
            rows.push(Row {
                kind,
                seed,
                trainable_percent: hooks.trainable_percent,
                report,
            });
        }
    }
    Ok((rows, start.elapsed().as_secs_f64() / 60.0))
}

/// `(test_id mean, test_ood mean)` per kind, and the markdown table.
fn table(md: &mut String, rows: &[Row], kinds: &[Kind]) -> AnyResult<Vec<(Kind, f64, f64)>> {
    writeln!(
        md,
        "| method | trainable % | test_id accuracy (mean ± std) | test_ood accuracy (Amazon) | test_id macro-F1 | validation accuracy | train time / run |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let mut summary = Vec::new();
    for &kind in kinds {
        let r: Vec<&Row> = rows.iter().filter(|r| r.kind == kind).collect();
        let pick = |f: &dyn Fn(&FinetuneReport) -> f64| {
            mean_std(&r.iter().map(|x| f(&x.report)).collect::<Vec<_>>())
        };
        let id = pick(&|x| x.test.accuracy);
        let ood = pick(&|x| x.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy));
        let f1 = pick(&|x| x.test.macro_f1);
        let val = pick(&|x| x.validation.accuracy);
        let secs = pick(&|x| x.train_seconds);
        writeln!(
            md,
            "| {} | {:.3} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.0} s |",
            kind.name(),
            r.first().map_or(f64::NAN, |x| x.trainable_percent),
            id.0,
            id.1,
            ood.0,
            ood.1,
            f1.0,
            f1.1,
            val.0,
            val.1,
            secs.0
        )?;
        summary.push((kind, id.0, ood.0));
    }
    writeln!(md, "\nPer seed (test_id / test_ood accuracy):\n")?;
    for r in rows {
        writeln!(
            md,
            "- {} seed {}: {:.4} / {:.4}",
            r.kind.name(),
            r.seed,
            r.report.test.accuracy,
            r.report.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy)
        )?;
    }
    Ok(summary)
}

fn setting(plan: &Plan, minutes: f64) -> String {
    let o = &plan.opts;
    format!(
        "Setting: mean pooling + linear head (always trainable), AdamW (lr {:.0e} for full fine-tuning, {:.0e} for the parameter-efficient methods), weight decay {}, linear warm-up {:.0}% then linear decay, clip 1, batch {}, max {} tokens, {} epoch(s) on a seeded subset of {} training sentences (movie reviews); evaluation on {} examples of each evaluation set. Seeds {:?}. Budget: {:.1} min on {:?} for all runs.",
        o.lr,
        plan.pet_lr,
        o.weight_decay,
        o.warmup_ratio * 100.0,
        o.batch_size,
        o.max_len,
        o.epochs,
        o.train_limit.map_or("all".to_owned(), |n| n.to_string()),
        o.eval_limit.map_or("all".to_owned(), |n| format!(
            "a fixed seeded subset of at most {n}"
        )),
        plan.seeds,
        minutes,
        tensor_core::best()
    )
}

fn seeds_arg(seeds: &[u64]) -> String {
    seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Write `md` to `out` atomically.
pub(crate) fn write_quiet(out: &std::path::Path, md: &str) -> AnyResult<()> {
    tensor_core::io::write_atomic(out, |tmp| {
        std::fs::write(tmp, md).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    Ok(())
}

/// Write `md` to `out` atomically and print it.
pub(crate) fn write(out: &std::path::Path, md: &str) -> AnyResult<()> {
    write_quiet(out, md)?;
    println!("{md}");
    println!("written to {}", out.display());
    Ok(())
}

fn default_plan(file: &str, train_limit: usize, eval_limit: Option<usize>) -> Plan {
    Plan {
        seeds: vec![0, 1, 2],
        opts: FinetuneOptions {
            train_limit: Some(train_limit),
            eval_limit,
            progress: false,
            ..FinetuneOptions::default()
        },
        pet_lr: 1e-3,
        setup: Setup {
            lora_r: 8,
            adapter_r: 48,
            experts: 16,
            top_k: 4,
            emoe_layers: None,
        },
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs/results")
            .join(file),
    }
}

pub const EMOE_HELP: &str = "usage: cargo xtask experiment emoe [--seeds 0,1,2] [--train-limit N] [--eval-limit N] [--epochs N] [--experts N] [--top-k K] [--lr X] [--pet-lr X] [--out FILE]
Dense vs EMoE, and LoRA vs LoRA + EMoE, fine-tuning all-MiniLM-L6-v2 on data/sentiment_domains;
EMoE converts every other layer of the last half (layers 3 and 5 of 6) into N experts with top-k
routing (default N=16, k=4). Writes a markdown table (default docs/results/emoe.md).";

pub fn emoe(args: &[String]) -> AnyResult<()> {
    let Some(plan) = parse(
        "experiment emoe",
        args,
        EMOE_HELP,
        default_plan("emoe.md", 2000, Some(1000)),
    )?
    else {
        return Ok(());
    };
    let kinds = [Kind::Full, Kind::Emoe, Kind::Lora, Kind::LoraEmoe];
    let (rows, minutes) = run(&plan, &kinds)?;
    let (experts, top_k) = (plan.setup.experts, plan.setup.top_k);
    let mut md = String::new();
    writeln!(
        md,
        "# EMoE vs dense fine-tuning of all-MiniLM-L6-v2 (sentiment, in- and out-of-domain)\n"
    )?;
    writeln!(
        md,
        "Command: `cargo xtask experiment emoe` (= `cargo xtask experiment emoe --seeds {} --train-limit {} --epochs {} --experts {experts} --top-k {top_k}`).\n",
        seeds_arg(&plan.seeds),
        plan.opts
            .train_limit
            .map_or("all".to_owned(), |n| n.to_string()),
        plan.opts.epochs
    )?;
    writeln!(
        md,
        "{} EMoE: layers [3, 5] of 6 (every other layer of the last half) split into N={experts} experts of {} neurons by balanced k-means (seed 0), avg-key gate refreshed after every step, hard top-{top_k}, Tutel noise 1/N in training; evaluated with top-k routing. LoRA: r={}, α={} on query/value (+ the head). \"EMoE (full)\" tunes every weight of the split model; \"LoRA + EMoE\" splits the frozen FFNs and tunes LoRA + head.\n",
        setting(&plan, minutes),
        1536 / experts,
        plan.setup.lora_r,
        2 * plan.setup.lora_r
    )?;
    let s = table(&mut md, &rows, &kinds)?;
    let verdict = |a: (Kind, f64, f64), b: (Kind, f64, f64)| {
        format!(
            "{} {} {} in-domain ({:+.4}) and {} out-of-domain ({:+.4})",
            b.0.name(),
            if b.1 >= a.1 { ">=" } else { "<" },
            a.0.name(),
            b.1 - a.1,
            if b.2 >= a.2 { ">=" } else { "<" },
            b.2 - a.2
        )
    };
    writeln!(
        md,
        "\nThe paper's claim: EMoE >= dense both in-domain and out-of-domain (also on top of LoRA). Measured here: {}; {}.",
        verdict(s[0], s[1]),
        verdict(s[2], s[3])
    )?;
    writeln!(
        md,
        "Majority class: test_id {:.4}.",
        rows[0].report.test_majority
    )?;
    write(&plan.out, &md)
}

pub const PET_HELP: &str = "usage: cargo xtask experiment pet [--seeds 0,1,2] [--train-limit N] [--eval-limit N] [--epochs N] [--lr X] [--pet-lr X] [--out FILE]
Full fine-tuning, LoRA, a bottleneck adapter, VL-PET (large / middle-X / middle-Y / small gates) and
LoRA + G on all-MiniLM-L6-v2 with data/sentiment_domains, same budget, several seeds.
Writes a markdown table (default docs/results/pet.md).";

pub fn pet(args: &[String]) -> AnyResult<()> {
    let Some(plan) = parse(
        "experiment pet",
        args,
        PET_HELP,
        default_plan("pet.md", 2000, Some(1000)),
    )?
    else {
        return Ok(());
    };
    let kinds = [
        Kind::Full,
        Kind::Lora,
        Kind::Adapter,
        Kind::VlPet(Granularity::Large),
        Kind::VlPet(Granularity::MiddleX),
        Kind::VlPet(Granularity::MiddleY),
        Kind::VlPet(Granularity::Small),
        Kind::LoraGate,
    ];
    let (rows, minutes) = run(&plan, &kinds)?;
    let mut md = String::new();
    writeln!(
        md,
        "# Parameter-efficient tuning of all-MiniLM-L6-v2 (sentiment, in- and out-of-domain)\n"
    )?;
    writeln!(
        md,
        "Command: `cargo xtask experiment pet` (= `cargo xtask experiment pet --seeds {} --train-limit {} --epochs {}`).\n",
        seeds_arg(&plan.seeds),
        plan.opts
            .train_limit
            .map_or("all".to_owned(), |n| n.to_string()),
        plan.opts.epochs
    )?;
    writeln!(
        md,
        "{} LoRA: r={}, α={} on query/value. Bottleneck adapter (Houlsby placement, after self-attention and after the FFN, `H + ΔH(H)`): r={} (= d/8, VL-PET's r=96 on d=768 scaled to d=384), GELU-tanh, N(0, 0.02²) init. VL-PET: the same sites with the gate `H' = (H + ΔH) ⊙ G` (s = 1, r_g = {}), encoder LayerNorms trainable. LoRA + G: the large gate on each LoRA'd projection.\n",
        setting(&plan, minutes),
        plan.setup.lora_r,
        2 * plan.setup.lora_r,
        plan.setup.adapter_r,
        plan.setup.adapter_r
    )?;
    let s = table(&mut md, &rows, &kinds)?;
    let best = s
        .iter()
        .skip(1)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .copied()
        .unwrap_or(s[0]);
    let vl_large = s[3];
    writeln!(
        md,
        "\nThe paper (VL-PET, BART-base, vision-language tasks): VL-PET large > VL-PET small/middle > VL-Adapter > LoRA, and VL-PET large > full fine-tuning. Measured here: best parameter-efficient method {} ({:.4} test_id, full fine-tuning {:.4}); VL-PET large {:.4} vs bottleneck adapter {:.4} vs LoRA {:.4}.",
        best.0.name(),
        best.1,
        s[0].1,
        vl_large.1,
        s[2].1,
        s[1].1
    )?;
    writeln!(
        md,
        "Majority class: test_id {:.4}.",
        rows[0].report.test_majority
    )?;
    write(&plan.out, &md)
}
