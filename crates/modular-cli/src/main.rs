//! `modular`: the project's command-line entry point.
//!
//! - `modular demo [--model DIR]`: what `cargo xtask demo` runs. Loads the
//!   embedded default model (all-MiniLM-L6-v2 from PyPI, or the folder given
//!   / `MODULAR_MODEL_DIR`), embeds sentences, ranks them against queries,
//!   and checks `tensor-core`'s grouped expert computation on the model's own
//!   first FFN cut into 8 experts.
//! - `modular finetune [options]`: fine-tune the encoder on the project's
//!   sentiment data (see `modular finetune --help`).
//! - the results tables of `docs/results/` are not here: they are the
//!   `experiments` crate's, run by `cargo xtask experiment NAME`.
//! - `modular split | merge | tune | profile | inspect`: the user subcommands
//!   (EMoE split of a model folder, PEFT adapter merging, LoRA / VL-PET tuning
//!   on a JSONL dataset, functional-brick profiling, folder summaries), in
//!   `cli/`; see `docs/cli.md`.
//!
//! Exit codes: 0 success, 1 the work failed, 2 a malformed command line.

mod cli;
mod demo;

use std::process::ExitCode;

use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, finetune};
use model_zoo::source::ModelSource;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

const FINETUNE_HELP: &str =
    "usage: modular finetune [--model DIR] [--data DIR] [--epochs N] [--batch N] [--max-len N]
                        [--lr X] [--train-limit N] [--seed N] [--quiet]
Fine-tunes the encoder (mean pooling + linear head, full fine-tuning, AdamW,
linear warm-up/decay) on DIR/{train,validation,test_id}.jsonl
(default: the project's data/sentiment_domains) and prints the metrics.";

fn finetune_cmd(args: &[String]) -> AnyResult<()> {
    let Some(f) = cli::Flags::parse_options(
        "finetune",
        args,
        &[
            "--model",
            "--data",
            "--epochs",
            "--batch",
            "--max-len",
            "--lr",
            "--train-limit",
            "--seed",
        ],
        &["--quiet"],
        FINETUNE_HELP,
    )?
    else {
        return Ok(());
    };
    let d = FinetuneOptions::default();
    let opts = FinetuneOptions {
        epochs: f.positive_or("--epochs", d.epochs as usize)? as u64,
        batch_size: f.positive_or("--batch", d.batch_size)?,
        max_len: f.positive_or("--max-len", d.max_len)?,
        lr: f.learning_rate("--lr", d.lr)?,
        train_limit: match f.get("--train-limit") {
            None => None,
            Some(_) => Some(f.positive_or("--train-limit", 1)?),
        },
        seed: f.parsed_or("--seed", d.seed)?,
        progress: !f.switch("--quiet"),
        ..d
    };
    if opts.max_len < 2 {
        return cli::usage("finetune", "--max-len must be at least 2 ([CLS] and [SEP])");
    }
    let model = f.path("--model");
    let data = f.path("--data");
    let source = ModelSource::resolve(model.as_deref())?;
    let data = match data {
        Some(d) => TextClassification::load(d)?,
        None => TextClassification::sentiment()?,
    };
    let device = tensor_core::best();
    println!("model  {source}");
    println!(
        "data   {} (train {}, validation {}, test {})",
        data.dir.display(),
        data.train.len(),
        data.validation.len(),
        data.test.len()
    );
    println!("device {device:?}; {opts:?}");
    let r = finetune(&source, &data, &opts, device)?;
    println!(
        "trained on {} examples x {} epoch(s) in {:.0}s, final epoch loss {:.4}, {} trainable parameters",
        r.train_examples, r.epochs, r.train_seconds, r.final_train_loss, r.trainable_params
    );
    println!("| split | accuracy | macro-F1 | MCC |");
    println!("|---|---|---|---|");
    println!(
        "| validation | {:.4} | {:.4} | {:.4} |",
        r.validation.accuracy, r.validation.macro_f1, r.validation.mcc
    );
    println!(
        "| test_id | {:.4} | {:.4} | {:.4} |",
        r.test.accuracy, r.test.macro_f1, r.test.mcc
    );
    println!("majority class on test_id: {:.4}", r.test_majority);
    Ok(())
}

const USAGE: &str = "usage: modular <command> [options]   (modular <command> --help for each)
  modular demo [--model DIR]                                      the demo (default command)
  modular finetune [options]                                      full fine-tuning on the sentiment data
  (the real-task results tables: `cargo xtask experiment NAME`, crates/experiments)";

/// A panic is a bug, but even then the user sees one readable line, not
/// libtorch's C++ stack (a tch call that panics carries it in its message);
/// `MODULAR_TORCH_BACKTRACE=1` keeps the full text.
fn install_panic_message() {
    use tensor_core::error::{TORCH_BACKTRACE_VAR, trim_torch_text};
    if std::env::var(TORCH_BACKTRACE_VAR).is_ok_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "modular: internal error{at}: {}\n(this is a bug; {TORCH_BACKTRACE_VAR}=1 shows the full text)",
            trim_torch_text(&payload)
        );
    }));
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    cli::install_interrupt_cleanup();
    install_panic_message();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(&args[1..]),
        None => demo::run(&[]),
        Some("finetune") => finetune_cmd(&args[1..]),
        Some(
            cmd @ ("split" | "merge" | "tune" | "inspect" | "distill" | "profile" | "eval"
            | "predict" | "embed" | "generate"),
        ) => cli::run(cmd, &args[1..]),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}\n{}", cli::SUMMARY);
            return ExitCode::SUCCESS;
        }
        Some("experiment") => Err(Box::<dyn std::error::Error>::from(cli::UsageError(
            "the experiments moved to their own crate: run `cargo xtask experiment NAME` \
             (emoe, pet, moe, merge, m2mkd, bricks)"
                .into(),
        ))),
        Some(other) => {
            eprintln!(
                "modular: unknown command '{other}'\n{USAGE}\n{}",
                cli::SUMMARY
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // 2: a malformed command line (cli::UsageError); 1: the work failed.
        Err(e) => {
            eprintln!("modular: {e}");
            ExitCode::from(cli::exit_code(e.as_ref()))
        }
    }
}
