//! `modular`: the project's command-line entry point.
//!
//! - `modular demo [--model DIR]`: what `cargo xtask demo` runs. Loads the
//!   embedded default model (all-MiniLM-L6-v2 from PyPI, or the folder given
//!   / `MODULAR_MODEL_DIR`), embeds sentences, ranks them against queries,
//!   and checks `tensor-core`'s grouped expert computation on the model's own
//!   first FFN cut into 8 experts.
//! - `modular finetune [options]`: fine-tune the encoder on the project's
//!   sentiment data (see `modular finetune --help`).
//! - `modular experiment emoe [options]`: the EMoE results table
//! - `modular experiment pet [options]`: the parameter-efficient tuning results table
//!   (`docs/results/emoe.md`).
//! - `modular experiment moe [options]`: the moe-router real task, a small
//!   ModuleFormer-style decoder with and without the MI loss, and pruning
//!   (`docs/results/moe.md`).

mod experiments;
mod moe_experiment;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use model_zoo::bert::SentenceEncoder;
use model_zoo::data::TextClassification;
use model_zoo::finetune::{FinetuneOptions, finetune};
use model_zoo::source::ModelSource;
use tensor_core::grouped::{Dispatch, grouped_linear};
use tensor_core::layers::{Activation, FeedForward};
use tensor_core::module::ModuleExt;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::testing::closeness;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

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

fn demo(model: Option<PathBuf>) -> AnyResult<()> {
    let device = tensor_core::best();
    let source = ModelSource::resolve(model.as_deref())?;
    println!("modular demo");
    println!(
        "  device   {device:?} (CUDA available: {})",
        tensor_core::device::cuda_available()
    );
    println!("  model    {source}");
    let t = Instant::now();
    let enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let count = enc.model.param_count();
    println!(
        "  loaded   {} layers, d_model {}, {:.1}M parameters, max {} tokens, in {:.2}s",
        enc.model.config.num_hidden_layers,
        enc.model.config.hidden_size,
        count.total as f64 / 1e6,
        enc.tokenizer.max_len,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let corpus = enc.embed(CORPUS)?;
    let queries = enc.embed(QUERIES)?;
    println!(
        "  embedded {} sentences in {:.0} ms -> {:?}",
        CORPUS.len() + QUERIES.len(),
        t.elapsed().as_secs_f64() * 1e3,
        corpus.size()
    );
    // Normalised embeddings: cosine similarity is a dot product.
    let scores = queries.matmul(&corpus.tr()).to_device(Device::Cpu);
    for (qi, q) in QUERIES.iter().enumerate() {
        let row = scores.get(qi as i64);
        let (top, idx) = row.topk(2, -1, true, true);
        println!("  query    \"{q}\"");
        for k in 0..2 {
            println!(
                "             {:.3}  {}",
                top.double_value(&[k]),
                CORPUS[idx.int64_value(&[k]) as usize]
            );
        }
    }

    // tensor-core on the real model: cut layer 0's FFN into 8 experts of 192
    // neurons and send every token to all of them; the grouped computation
    // must give back the dense FFN.
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
    let dense = tch::no_grad(|| ffn.forward_dense(&x))?;
    let c = closeness(&grouped, &dense, 1e-4, 1e-4)?;
    println!(
        "  experts  encoder.layer.0.(ffn) as 8 x 192-neuron experts, all selected: max |err| vs dense {:.1e} ({})",
        c.max_abs,
        if c.ok { "ok" } else { "MISMATCH" }
    );
    if !c.ok {
        return Err("grouped experts disagree with the dense FFN".into());
    }
    Ok(())
}

/// `FeedForward::forward` with a fresh eval context.
trait DenseForward {
    fn forward_dense(&self, x: &Tensor) -> tensor_core::Result<Tensor>;
}

impl DenseForward for FeedForward {
    fn forward_dense(&self, x: &Tensor) -> tensor_core::Result<Tensor> {
        tensor_core::Module::forward(self, x, &mut tensor_core::Context::eval())
    }
}

const FINETUNE_HELP: &str =
    "usage: modular finetune [--model DIR] [--data DIR] [--epochs N] [--batch N] [--max-len N]
                        [--lr X] [--train-limit N] [--seed N] [--quiet]
Fine-tunes the encoder (mean pooling + linear head, full fine-tuning, AdamW,
linear warm-up/decay) on DIR/{train,validation,test_id}.jsonl
(default: the project's data/sentiment_domains) and prints the metrics.";

fn finetune_cmd(args: &[String]) -> AnyResult<()> {
    let mut opts = FinetuneOptions::default();
    let mut model = None;
    let mut data = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{FINETUNE_HELP}"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--data" => data = Some(PathBuf::from(value("--data")?)),
            "--epochs" => opts.epochs = value("--epochs")?.parse()?,
            "--batch" => opts.batch_size = value("--batch")?.parse()?,
            "--max-len" => opts.max_len = value("--max-len")?.parse()?,
            "--lr" => opts.lr = value("--lr")?.parse()?,
            "--train-limit" => opts.train_limit = Some(value("--train-limit")?.parse()?),
            "--seed" => opts.seed = value("--seed")?.parse()?,
            "--quiet" => opts.progress = false,
            "--help" | "-h" => {
                println!("{FINETUNE_HELP}");
                return Ok(());
            }
            other => return Err(format!("unknown option '{other}'\n{FINETUNE_HELP}").into()),
        }
    }
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") | None => {
            let model = args
                .iter()
                .position(|a| a == "--model")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from);
            demo(model)
        }
        Some("finetune") => finetune_cmd(&args[1..]),
        Some("experiment") => match args.get(1).map(String::as_str) {
            Some("emoe") => experiments::emoe(&args[2..]),
            Some("pet") => experiments::pet(&args[2..]),
            Some("moe") => moe_experiment::run(&args[2..]),
            _ => Err(format!(
                "usage: modular experiment emoe|pet|moe [options]\n{}\n{}\n{}",
                experiments::EMOE_HELP,
                experiments::PET_HELP,
                moe_experiment::MOE_HELP
            )
            .into()),
        },
        Some(other) => {
            eprintln!(
                "unknown command '{other}'\nusage: modular demo [--model DIR] | modular finetune [options]"
            );
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modular: {e}");
            ExitCode::FAILURE
        }
    }
}
