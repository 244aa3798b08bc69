//! `modular tune`: parameter-efficient tuning of a BERT encoder (MiniLM by
//! default) as a sequence classifier on a JSONL dataset, through
//! `model_zoo::finetune::finetune_with` and pet-core's adapters:
//! - LoRA (Hu et al. 2021): `y = xWᵀ + b + (α/r)·x Aᵀ Bᵀ` on the query and
//!   value projections, `α = 2r`; saved as a PEFT folder;
//! - VL-PET (Hu et al., ICCV 2023): gated bottleneck modules
//!   `H' = s·(H + ΔH) ⊙ G` after every self-attention and FFN, encoder
//!   LayerNorms trainable; saved as its trainable tensors plus its config
//!   (PEFT has no VL-PET type).
//!
//! The classification head is trained with the adapter and saved beside it
//! (`head.safetensors`); `tune.json` records the run and its metrics.

use std::path::{Path, PathBuf};

use model_zoo::bert::SequenceClassifier;
use model_zoo::data::{TextClassification, TextExample, load_jsonl};
use model_zoo::finetune::{FinetuneOptions, TrainHooks, finetune_with};
use model_zoo::source::ModelSource;
use pet_core::{
    GateConfig, Granularity, LoraConfig, VlPetConfig, add_lora, apply_vlpet,
    mark_only_adapters_trainable, save_adapter, trainable_report,
};
use serde_json::json;
use tensor_core::ModuleExt;
use tensor_core::tch::Tensor;
use tensor_core::train::SplitMix64;

use super::{AnyResult, AtomicDir, Flags, require_model_dir, usage};

pub const ADAPTER: &str = "task";
pub const HEAD_FILE: &str = "head.safetensors";
pub const VLPET_CONFIG: &str = "vlpet_config.json";
pub const VLPET_WEIGHTS: &str = "vlpet_model.safetensors";

pub const HELP: &str = "\
usage: modular tune --data FILE.jsonl|DIR --out DIR [--method lora|vlpet] [--rank 8]
                    [--epochs 1] [--lr 1e-3] [--batch 32] [--max-len 64]
                    [--train-limit N] [--eval-limit N] [--seed S]
                    [--granularity large|middle-x|middle-y|small] [--model DIR]
                    [--force] [--quiet]

Tune a BERT encoder (the packaged all-MiniLM-L6-v2 unless --model) as a sequence
classifier (mean pooling + linear head) with LoRA or VL-PET, and print its
accuracy. With --model a Llama-family decoder folder (llama, mistral, qwen2, qwen3,
mixtral, qwen2_moe), tune LoRA (alpha = 2R) on q/k/v/o_proj for the next-token loss of
a JSONL file of {\"text\": \"...\"} lines (10% held out) and write a PEFT LoRA
folder for modular generate --adapters. Data: JSONL lines {\"text\": \"...\", \"label\": 0}; a FILE is split into
90% train / 10% held out for validation (seeded); a DIR holds train.jsonl,
validation.jsonl and test_id.jsonl, and is also scored on test_ood.jsonl when it has one.

Writes DIR with:
  lora:  adapter_config.json + adapter_model.safetensors (a PEFT LoRA folder on
         bert.encoder.layer.*.attention.self.{query,value}),
  vlpet: vlpet_config.json + vlpet_model.safetensors (every trained tensor),
  both:  head.safetensors (classifier.weight/bias) and tune.json (options, metrics).

options:
  --data P          JSONL file or dataset folder (required)
  --out DIR         output folder (written atomically; --force replaces it)
  --method M        lora or vlpet [lora]
  --rank R          LoRA rank (alpha = 2R), or VL-PET bottleneck width [8]
  --granularity G   VL-PET gate: large, middle-x, middle-y, small [large]
  --epochs N        [1]        --lr X   AdamW learning rate [1e-3]
  --batch N         [32]       --max-len N  tokens per text [64]
  --train-limit N   train on the first N examples (after a seeded shuffle)
  --eval-limit N    evaluate on at most N examples per split
  --seed S          [0]
  --model DIR       encoder folder (config.json, model.safetensors, tokenizer.json)
  --quiet           no progress bars

examples:
  modular tune --data data/sentiment_domains --out adapters/sentiment
  modular tune --data reviews.jsonl --out adapters/reviews --method vlpet --rank 48 --epochs 3
  modular tune --data reviews.jsonl --out runs/quick --train-limit 256 --model models/MiniLM-L6";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    Lora,
    VlPet(Granularity),
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::VlPet(_) => "vlpet",
        }
    }
}

fn granularity(s: &str) -> Option<Granularity> {
    match s.replace('_', "-").to_ascii_lowercase().as_str() {
        "large" => Some(Granularity::Large),
        "middle-x" => Some(Granularity::MiddleX),
        "middle-y" => Some(Granularity::MiddleY),
        "small" => Some(Granularity::Small),
        _ => None,
    }
}

/// Adds the adapter before training and writes it (with the head) into the
/// output folder before evaluation, while the recipe still holds the model.
struct Hooks {
    method: Method,
    rank: i64,
    seed: u64,
    dir: PathBuf,
    trainable: i64,
    total: i64,
    vlpet: Option<VlPetConfig>,
}

fn zoo(e: impl std::fmt::Display) -> model_zoo::Error {
    model_zoo::Error::invalid(e.to_string())
}

impl TrainHooks<SequenceClassifier, model_zoo::Error> for Hooks {
    fn prepare(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let d = model
            .encoder()
            .ok_or_else(|| zoo("the classifier holds no BERT encoder"))?
            .hidden_size();
        match self.method {
            Method::Lora => {
                let mut c = LoraConfig::new(self.rank, 2.0 * self.rank as f64, &["query", "value"]);
                c.seed = self.seed;
                add_lora(model, ADAPTER, &c).map_err(zoo)?;
                mark_only_adapters_trainable(model, &[], &["classifier.*"]);
            }
            Method::VlPet(g) => {
                let c = VlPetConfig {
                    r: self.rank,
                    heads: if self.rank % 4 == 0 { 4 } else { 1 },
                    gate: Some(GateConfig {
                        bottleneck: self.rank,
                        ..GateConfig::new(g)
                    }),
                    also_trainable: vec!["classifier.*".into()],
                    seed: self.seed,
                    ..VlPetConfig::default()
                };
                apply_vlpet(model, ADAPTER, &c, d).map_err(zoo)?;
                self.vlpet = Some(c);
            }
        }
        let rep = trainable_report(model);
        self.trainable = rep.trainable;
        self.total = rep.total;
        Ok(rep.to_string())
    }

    fn before_eval(&mut self, model: &mut SequenceClassifier) -> model_zoo::Result<String> {
        let head: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| n.starts_with("classifier."))
            .collect();
        let refs: Vec<(&str, &Tensor)> = head.iter().map(|(n, t)| (n.as_str(), t)).collect();
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| model_zoo::Error::file(&self.dir, format!("cannot create: {e}")))?;
        tensor_core::io::save(self.dir.join(HEAD_FILE), &refs, None)?;
        match self.method {
            Method::Lora => save_adapter(model, ADAPTER, &self.dir).map_err(zoo)?,
            Method::VlPet(_) => {
                let trained = model.trainable_parameters();
                let refs: Vec<(&str, &Tensor)> =
                    trained.iter().map(|(n, t)| (n.as_str(), t)).collect();
                tensor_core::io::save(self.dir.join(VLPET_WEIGHTS), &refs, None)?;
                let doc = json!({
                    "format": "modular-vlpet",
                    "adapter_name": ADAPTER,
                    "d_model": model.encoder().map(|b| b.hidden_size()),
                    "vlpet": serde_json::to_value(&self.vlpet).map_err(zoo)?,
                    "tensors": trained.len(),
                });
                super::write_json(&self.dir.join(VLPET_CONFIG), &doc).map_err(zoo)?;
            }
        }
        Ok(String::new())
    }
}

/// A JSONL file as a dataset: a seeded 90 / 10 split into train and a
/// held-out set, which serves as both validation and test.
fn from_file(path: &Path, seed: u64) -> AnyResult<TextClassification> {
    let mut all: Vec<TextExample> = load_jsonl(path)?;
    if all.len() < 2 {
        return Err(format!(
            "{}: {} example(s); need at least 2 (one to train on, one held out)",
            path.display(),
            all.len()
        )
        .into());
    }
    SplitMix64::new(seed ^ 0x5ba1_d0c5).shuffle(&mut all);
    let held = (all.len() / 10).max(1);
    let validation = all.split_off(all.len() - held);
    let num_labels =
        model_zoo::data::check_labels(path, &[("training", &all), ("held-out", &validation)])?;
    Ok(TextClassification {
        dir: path.to_owned(),
        train: all,
        test: validation.clone(),
        validation,
        test_ood: None,
        num_labels,
    })
}

/// `p` as a dataset: a folder (`train.jsonl`, `validation.jsonl`,
/// `test_id.jsonl`, optionally `test_ood.jsonl`) or one JSONL file split
/// 90 / 10; the flag says whether a real test split exists.
pub fn load_data(p: &Path, seed: u64) -> AnyResult<(TextClassification, bool)> {
    if !p.exists() {
        return Err(format!("data {} does not exist", p.display()).into());
    }
    if p.is_dir() {
        for f in ["train.jsonl", "validation.jsonl", "test_id.jsonl"] {
            if !p.join(f).is_file() {
                return Err(format!(
                    "dataset folder {} has no {f} (a folder needs train.jsonl, validation.jsonl, test_id.jsonl; or pass one JSONL file)",
                    p.display()
                )
                .into());
            }
        }
        Ok((TextClassification::load(p)?, true))
    } else {
        Ok((from_file(p, seed)?, false))
    }
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(f) = Flags::parse_options(
        "tune",
        args,
        &[
            "--data",
            "--out",
            "--method",
            "--rank",
            "--granularity",
            "--epochs",
            "--lr",
            "--batch",
            "--max-len",
            "--train-limit",
            "--eval-limit",
            "--seed",
            "--model",
        ],
        &["--force", "--quiet"],
        HELP,
    )?
    else {
        return Ok(());
    };
    let data_path = PathBuf::from(f.required("--data")?);
    let out = PathBuf::from(f.required("--out")?);
    let g = match f.get("--granularity") {
        None => Granularity::Large,
        Some(s) => match granularity(s) {
            Some(g) => g,
            None => {
                return usage(
                    "tune",
                    format!("--granularity '{s}': one of large, middle-x, middle-y, small"),
                );
            }
        },
    };
    let method = match f.get("--method").unwrap_or("lora") {
        "lora" => Method::Lora,
        "vlpet" | "vl-pet" => Method::VlPet(g),
        other => {
            return usage(
                "tune",
                format!("--method: unknown method '{other}' (one of: lora, vlpet)"),
            );
        }
    };
    if f.get("--granularity").is_some() && method == Method::Lora {
        return usage("tune", "--granularity applies to --method vlpet only");
    }
    let rank = f.positive_or("--rank", 8)? as i64;
    let seed: u64 = f.parsed_or("--seed", 0)?;
    let quiet = f.switch("--quiet");
    if let Some(m) = f.path("--model")
        && super::is_decoder(&m)
    {
        if method != Method::Lora {
            return usage("tune", "a decoder folder is tuned with --method lora only");
        }
        if f.get("--eval-limit").is_some() {
            return usage("tune", "--eval-limit applies to classifier tuning only");
        }
        require_model_dir(&m)?;
        let o = super::tune_lm::LmOptions {
            rank,
            epochs: f.positive_or("--epochs", 1)?,
            lr: f.learning_rate("--lr", 1e-3)?,
            batch: f.positive_or("--batch", 32)?,
            max_len: f.positive_or("--max-len", 64)?.max(2),
            seed,
            train_limit: f.parsed("--train-limit")?,
            quiet,
            force: f.switch("--force"),
        };
        return super::tune_lm::run(&f, &m, &data_path, &out, &o);
    }
    let opts = FinetuneOptions {
        epochs: f.positive_or("--epochs", 1)? as u64,
        batch_size: f.positive_or("--batch", 32)?,
        max_len: f.positive_or("--max-len", 64)?,
        lr: f.learning_rate("--lr", 1e-3)?,
        train_limit: f.parsed("--train-limit")?,
        eval_limit: f.parsed("--eval-limit")?,
        seed,
        progress: !quiet,
        ..FinetuneOptions::default()
    };
    if opts.max_len < 2 {
        return usage("tune", "--max-len must be at least 2 ([CLS] and [SEP])");
    }
    if opts.train_limit == Some(0) {
        return usage("tune", "--train-limit must be at least 1");
    }

    let model_flag = f.path("--model");
    if let Some(p) = &model_flag {
        require_model_dir(p)?;
    }
    let source = ModelSource::resolve(model_flag.as_deref())?;
    if !source.tokenizer_path().is_file() {
        return Err(format!(
            "model folder {} has no tokenizer.json (needed to read text)",
            source.dir.display()
        )
        .into());
    }
    f.out_not_input(&out, &[("--data", &data_path), ("--model", &source.dir)])?;
    let mut opts = opts;
    let positions = model_zoo::config::JsonConfig::read(source.dir.join("config.json"))?
        .i64_or("max_position_embeddings", 512)?
        .max(2) as usize;
    if opts.max_len > positions {
        eprintln!(
            "modular tune: --max-len {} is above the model's {positions} positions; using {positions}",
            opts.max_len
        );
        opts.max_len = positions;
    }
    let (data, has_test) = load_data(&data_path, seed)?;
    // Checked now, created only once training is done (before_eval).
    let out_dir = AtomicDir::deferred(&out, f.switch("--force"))?;
    let device = tensor_core::best();
    println!("modular tune");
    println!("  model    {source}");
    println!(
        "  data     {} ({} labels; train {}, validation {}{})",
        data.dir.display(),
        data.num_labels,
        data.train.len(),
        data.validation.len(),
        if has_test {
            format!(", test {}", data.test.len())
        } else {
            " held out".into()
        }
    );
    println!(
        "  method   {} rank {rank}{}; {} epoch(s), lr {}, batch {}, max-len {}, device {device:?}",
        method.name(),
        match method {
            Method::VlPet(g) => format!(", {g:?} gate"),
            Method::Lora => String::new(),
        },
        opts.epochs,
        opts.lr,
        opts.batch_size,
        opts.max_len
    );
    let mut hooks = Hooks {
        method,
        rank,
        seed,
        dir: out_dir.path().to_owned(),
        trainable: 0,
        total: 0,
        vlpet: None,
    };
    let r = finetune_with(&source, &data, &opts, device, &mut hooks)?;
    let metrics = |m: &tensor_core::train::ClassificationMetrics| json!({"accuracy": m.accuracy, "macro_f1": m.macro_f1, "mcc": m.mcc, "examples": m.examples});
    let doc = json!({
        "format": "modular-tune",
        "version": 1,
        "method": method.name(),
        "granularity": match method { Method::VlPet(g) => Some(g), Method::Lora => None },
        "rank": rank,
        "lora_alpha": (method == Method::Lora).then_some(2 * rank),
        "target_modules": (method == Method::Lora).then_some(["query", "value"]),
        "adapter_name": ADAPTER,
        "base_model": source.dir.display().to_string(),
        "data": data.dir.display().to_string(),
        "num_labels": data.num_labels,
        "head": HEAD_FILE,
        "options": {
            "epochs": opts.epochs, "lr": opts.lr, "batch_size": opts.batch_size,
            "max_len": opts.max_len, "train_limit": opts.train_limit,
            "eval_limit": opts.eval_limit, "seed": seed,
            "weight_decay": opts.weight_decay, "warmup_ratio": opts.warmup_ratio,
        },
        "train_examples": r.train_examples,
        "train_seconds": r.train_seconds,
        "final_train_loss": r.final_train_loss,
        "trainable_params": hooks.trainable,
        "total_params": hooks.total,
        "validation": metrics(&r.validation),
        "test": has_test.then(|| metrics(&r.test)),
        "test_ood": r.test_ood.as_ref().map(metrics),
        "test_majority": r.test_majority,
    });
    super::write_json(&out_dir.path().join("tune.json"), &doc)?;
    let written = out_dir.commit()?;
    println!(
        "  trained  {} examples x {} epoch(s) in {:.1}s, final loss {:.4}, {} of {} parameters trainable ({:.2}%)",
        r.train_examples,
        r.epochs,
        r.train_seconds,
        r.final_train_loss,
        hooks.trainable,
        hooks.total,
        100.0 * hooks.trainable as f64 / hooks.total.max(1) as f64
    );
    println!(
        "  accuracy validation {:.4} (macro-F1 {:.4}, {} examples)",
        r.validation.accuracy, r.validation.macro_f1, r.validation.examples
    );
    if has_test {
        println!(
            "  accuracy test_id    {:.4} (macro-F1 {:.4}, {} examples; majority class {:.4})",
            r.test.accuracy, r.test.macro_f1, r.test.examples, r.test_majority
        );
    }
    if let Some(m) = &r.test_ood {
        println!(
            "  accuracy test_ood   {:.4} (macro-F1 {:.4}, {} examples)",
            m.accuracy, m.macro_f1, m.examples
        );
    }
    println!("  wrote    {}", written.display());
    Ok(())
}
