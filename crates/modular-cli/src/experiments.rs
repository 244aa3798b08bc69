//! Real-task experiments behind `modular experiment NAME` (never run in CI).
//!
//! `emoe`: fine-tune all-MiniLM-L6-v2 dense vs EMoE (Qiu et al., 2024) on the
//! project's sentiment data, several seeds, in-domain (movie reviews) and
//! out-of-domain (Amazon product reviews) test sets; writes a markdown table.

use std::fmt::Write as _;
use std::path::PathBuf;

use emergent_split::{EmoeConfig, convert, refresh_gates};
use model_zoo::bert::SequenceClassifier;
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneHooks, FinetuneOptions, FinetuneReport, NoHooks, finetune_with};
use model_zoo::source::ModelSource;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn zoo_err(e: emergent_split::Error) -> model_zoo::Error {
    model_zoo::Error::invalid(format!("emergent-split: {e}"))
}

/// EMoE on the given layers: convert before training, refresh the avg-key
/// gates after every optimiser step (momentum 0), evaluate with top-k routing.
struct EmoeHooks {
    layers: Vec<usize>,
    config: EmoeConfig,
}

impl FinetuneHooks for EmoeHooks {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let report = convert(model, &self.layers, &self.config).map_err(zoo_err)?;
        Ok(format!("{report:?}"))
    }
    fn after_step(&mut self, model: &mut SequenceClassifier) -> Option<model_zoo::Result<()>> {
        Some(refresh_gates(model).map(|_| ()).map_err(zoo_err))
    }
}

struct Row {
    method: String,
    seed: u64,
    report: FinetuneReport,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = if xs.len() > 1 {
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v.sqrt())
}

pub const EMOE_HELP: &str = "usage: modular experiment emoe [--seeds 0,1,2] [--train-limit N] [--epochs N] [--experts N] [--top-k K] [--lr X] [--out FILE]
Dense vs EMoE fine-tuning of all-MiniLM-L6-v2 on data/sentiment_domains; EMoE converts every other
layer of the last half (layers 3 and 5 of 6) into N experts with top-k routing (default N=16, k=4).
Writes a markdown table (default docs/results/emoe.md).";

pub fn emoe(args: &[String]) -> AnyResult<()> {
    let mut seeds = vec![0u64, 1, 2];
    let mut opts = FinetuneOptions {
        train_limit: Some(3000),
        progress: false,
        ..FinetuneOptions::default()
    };
    let (mut experts, mut top_k) = (16usize, 4usize);
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/results/emoe.md");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{EMOE_HELP}"))
        };
        match a.as_str() {
            "--seeds" => {
                seeds = value("--seeds")?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--train-limit" => opts.train_limit = Some(value("--train-limit")?.parse()?),
            "--epochs" => opts.epochs = value("--epochs")?.parse()?,
            "--experts" => experts = value("--experts")?.parse()?,
            "--top-k" => top_k = value("--top-k")?.parse()?,
            "--lr" => opts.lr = value("--lr")?.parse()?,
            "--out" => out = PathBuf::from(value("--out")?),
            "--help" | "-h" => {
                println!("{EMOE_HELP}");
                return Ok(());
            }
            other => return Err(format!("unknown option '{other}'\n{EMOE_HELP}").into()),
        }
    }
    let source = ModelSource::resolve(None)?;
    let data = TextClassification::sentiment()?;
    let device = tensor_core::best();
    let layers = emergent_split::convert::every_other_in_last_half(6);
    let start = std::time::Instant::now();
    let mut rows = Vec::new();
    for &seed in &seeds {
        let o = FinetuneOptions {
            seed,
            ..opts.clone()
        };
        for method in ["dense", "EMoE"] {
            eprintln!("seed {seed}: {method} ...");
            let report = if method == "dense" {
                finetune_with(&source, &data, &o, device, &mut NoHooks)?
            } else {
                let mut hooks = EmoeHooks {
                    layers: layers.clone(),
                    config: EmoeConfig::new(experts, top_k),
                };
                finetune_with(&source, &data, &o, device, &mut hooks)?
            };
            let ood = report.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy);
            eprintln!(
                "  test_id {:.4}  test_ood {:.4}  ({:.0} s)",
                report.test.accuracy, ood, report.train_seconds
            );
            rows.push(Row {
                method: method.to_owned(),
                seed,
                report,
            });
        }
    }
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let mut md = String::new();
    writeln!(
        md,
        "# EMoE vs dense fine-tuning of all-MiniLM-L6-v2 (sentiment, in- and out-of-domain)\n"
    )?;
    writeln!(
        md,
        "Command: `cargo xtask experiment emoe` (= `modular experiment emoe --seeds {} --train-limit {} --epochs {} --experts {experts} --top-k {top_k}`).\n",
        seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        opts.train_limit.map_or("all".to_owned(), |n| n.to_string()),
        opts.epochs
    )?;
    writeln!(
        md,
        "Setting: full fine-tuning (mean pooling + linear head), AdamW lr {:.0e}, weight decay {}, linear warm-up {:.0}% then linear decay, clip 1, batch {}, max {} tokens, {} epoch(s) on a seeded subset of {} training sentences (movie reviews). EMoE: layers {:?} of 6 (every other layer of the last half) split into N={experts} experts of {} neurons by balanced k-means (seed 0), avg-key gate refreshed after every step, hard top-{top_k}, Tutel noise 1/N in training; evaluated with top-k routing. Seeds {:?}. Budget: {:.1} min on {:?} for all runs.\n",
        opts.lr,
        opts.weight_decay,
        opts.warmup_ratio * 100.0,
        opts.batch_size,
        opts.max_len,
        opts.epochs,
        opts.train_limit.map_or("all".to_owned(), |n| n.to_string()),
        layers,
        1536 / experts,
        seeds,
        minutes,
        device
    )?;
    writeln!(
        md,
        "| method | test_id accuracy (mean ± std) | test_ood accuracy (Amazon) | test_id macro-F1 | validation accuracy | train time / run |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let mut summary = Vec::new();
    for method in ["dense", "EMoE"] {
        let r: Vec<&Row> = rows.iter().filter(|r| r.method == method).collect();
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
            "| {method} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.0} s |",
            id.0, id.1, ood.0, ood.1, f1.0, f1.1, val.0, val.1, secs.0
        )?;
        summary.push((method, id.0, ood.0));
    }
    writeln!(md, "\nPer seed (test_id / test_ood accuracy):\n")?;
    for r in &rows {
        writeln!(
            md,
            "- {} seed {}: {:.4} / {:.4}",
            r.method,
            r.seed,
            r.report.test.accuracy,
            r.report.test_ood.as_ref().map_or(f64::NAN, |m| m.accuracy)
        )?;
    }
    let (d, e) = (summary[0], summary[1]);
    writeln!(
        md,
        "\nThe paper's claim: EMoE >= dense both in-domain and out-of-domain. Measured here: EMoE {} dense in-domain ({:+.4}) and {} dense out-of-domain ({:+.4}).",
        if e.1 >= d.1 { ">=" } else { "<" },
        e.1 - d.1,
        if e.2 >= d.2 { ">=" } else { "<" },
        e.2 - d.2
    )?;
    writeln!(
        md,
        "Majority class: test_id {:.4}. Not run yet: LoRA vs LoRA + EMoE (needs pet-core).",
        rows[0].report.test_majority
    )?;
    tensor_core::io::write_atomic(&out, |tmp| {
        std::fs::write(tmp, &md).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    println!("{md}");
    println!("written to {}", out.display());
    Ok(())
}
