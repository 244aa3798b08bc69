//! `modular distill`: module-to-module knowledge distillation (m2mKD, Lo et
//! al. 2024) of a BERT encoder (MiniLM by default) into a modular student,
//! through the `m2mkd` crate's pipeline:
//! 1. the teacher (encoder + mean-pool head) is fine-tuned on the data and
//!    split into M modules of consecutive layers;
//! 2. a meta model with one layer per module is trained briefly and frozen,
//!    and the teacher modules are incubated in it (Deep Incubation);
//! 3. each student module (one BERT layer of width W whose FFN is a top-2
//!    mixture of E experts) is distilled in its hybrid network
//!    `meta prefix -> stitch -> student module -> stitch -> meta suffix` with
//!    the loss `α·CE + (1−α)·τ²·KL(p_T^τ ‖ p_S^τ)`, modules in parallel;
//! 4. the student is assembled (stitches dropped) and trained end to end.
//!
//! Writes the distilled modules (with their stitches), the final student and
//! `distill.json` (options, accuracies, per-module throughput) atomically.

use std::path::PathBuf;
use std::time::Instant;

use model_zoo::source::ModelSource;
use serde_json::json;
use tensor_core::ModuleExt;
use tensor_core::tch::Tensor;

use super::tune::load_data;
use super::{AnyResult, AtomicDir, Flags, require_model_dir, spinner, usage};
use recipes::m2mkd::{Plan, Scores, baselines, m2mkd_arm, prepare};

pub const HELP: &str = "\
usage: modular distill --data FILE.jsonl|DIR --out DIR [--modules 3] [--student-width 192]
                       [--experts 4] [--steps 100] [--teacher-steps 100] [--meta-steps 40]
                       [--incubate-steps 30] [--batch 32] [--max-len 32] [--train-limit 3200]
                       [--eval-limit 600] [--seed 0] [--sequential] [--baselines] [--model DIR]
                       [--force] [--quiet]

Distil a BERT encoder (the packaged all-MiniLM-L6-v2 unless --model) into a modular
student with m2mKD: the teacher is fine-tuned as a classifier (mean pooling + linear
head) and split into M modules; a meta model (one layer per module) is trained and
frozen; each student module (one BERT layer of width W, 4 heads, FFN = top-2 mixture
of E GELU experts) is distilled in its hybrid network, all modules in parallel threads
unless --sequential; the student is assembled and trained end to end. Data: JSONL lines
{\"text\": \"...\", \"label\": 0}; a FILE is split 90/10 (seeded); a DIR holds
train.jsonl, validation.jsonl, test_id.jsonl and optionally test_ood.jsonl.

Writes DIR with:
  modules/module_<i>.safetensors  each distilled module with its stitches
                                  (stitch_pre.*, stitch_post.*; m2mkd::load_module reads them)
  student.safetensors             the assembled student after end-to-end training
  distill.json                    options, teacher / meta / student accuracies, per-module
                                  distillation seconds and steps/s

options:
  --data P            JSONL file or dataset folder (required)
  --out DIR           output folder (written atomically; --force replaces it)
  --modules M         teacher modules (layers split evenly) [3]
  --student-width W   student hidden width, a multiple of 4 [192]
  --experts E         experts per student FFN (top-2 routing) [4]
  --steps N           student steps: N/2 distillation per module, the rest end to end [100]
  --teacher-steps N   teacher fine-tuning steps [100]
  --meta-steps N      meta-model steps [40]    --incubate-steps N  [30]
  --batch N [32]      --max-len N [32]         --train-limit N [3200]   --eval-limit N [600]
  --seed S            student seed [0]
  --sequential        distil the modules one after the other
  --baselines         also train the same student from scratch and with logit KD
                      (same steps) and report them
  --model DIR         encoder folder (config.json, model.safetensors, tokenizer.json)
  --quiet             no spinner

examples:
  modular distill --data data/sentiment_domains --out students/sentiment
  modular distill --data reviews.jsonl --out students/r --modules 2 --student-width 128 --baselines
  modular distill --data data/sentiment_domains --out /tmp/s --steps 10 --teacher-steps 10 \\
                  --meta-steps 2 --incubate-steps 2 --eval-limit 64";

fn metrics(s: &Scores) -> serde_json::Value {
    let m = |m: &tensor_core::train::ClassificationMetrics| json!({"accuracy": m.accuracy, "macro_f1": m.macro_f1, "mcc": m.mcc, "examples": m.examples});
    json!({"test": m(&s.id), "test_ood": s.ood.first().map(|o| m(&o.metrics)), "seconds": s.seconds})
}

fn describe(s: &Scores) -> String {
    match s.ood.first() {
        Some(o) => format!("test {:.4}, OOD {:.4}", s.id.accuracy, o.metrics.accuracy),
        None => format!("test {:.4}", s.id.accuracy),
    }
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(f) = Flags::parse_options(
        "distill",
        args,
        &[
            "--data",
            "--out",
            "--modules",
            "--student-width",
            "--experts",
            "--steps",
            "--teacher-steps",
            "--meta-steps",
            "--incubate-steps",
            "--batch",
            "--max-len",
            "--train-limit",
            "--eval-limit",
            "--seed",
            "--model",
        ],
        &["--sequential", "--baselines", "--force", "--quiet"],
        HELP,
    )?
    else {
        return Ok(());
    };
    let data_path = PathBuf::from(f.required("--data")?);
    let out = PathBuf::from(f.required("--out")?);
    let d = Plan::default();
    let seed: u64 = f.parsed_or("--seed", 0)?;
    let p = Plan {
        seeds: vec![seed],
        steps: f.positive_or("--steps", d.steps as usize)? as u64,
        // Set below: `--steps N` is split N/2 distillation + the rest end to end.
        distil_steps: 0,
        batch: f.positive_or("--batch", d.batch)?,
        max_len: f.positive_or("--max-len", d.max_len)?,
        train_limit: f.positive_or("--train-limit", d.train_limit)?,
        eval_limit: f.positive_or("--eval-limit", d.eval_limit)?,
        teacher_steps: f.positive_or("--teacher-steps", d.teacher_steps as usize)? as _,
        teacher_lr: d.teacher_lr,
        meta_steps: f.positive_or("--meta-steps", d.meta_steps as usize)? as _,
        incubate_steps: f.positive_or("--incubate-steps", d.incubate_steps as usize)? as _,
        modules: f.positive_or("--modules", d.modules)?,
        student_width: f.positive_or("--student-width", d.student_width as usize)? as i64,
        experts: f.positive_or("--experts", d.experts)?,
        parallel: !f.switch("--sequential"),
        threads: 0,
        out: out.clone(),
    };
    if p.steps < 2 {
        return usage(
            "distill",
            "--steps must be at least 2 (distillation + end to end)",
        );
    }
    // The baselines train all N steps end to end; m2mKD splits them.
    let baseline_plan = p.clone();
    let mut p = p;
    p.distil_steps = p.steps / 2;
    p.steps -= p.distil_steps;
    if p.student_width % 4 != 0 {
        return usage(
            "distill",
            format!(
                "--student-width {} is not a multiple of the student's 4 attention heads",
                p.student_width
            ),
        );
    }
    if p.experts < 2 {
        return usage("distill", "--experts must be at least 2 (top-2 routing)");
    }
    if p.max_len < 4 {
        return usage("distill", "--max-len must be at least 4");
    }
    let quiet = f.switch("--quiet");
    let model_flag = f.path("--model");
    if let Some(m) = &model_flag {
        require_model_dir(m)?;
    }
    let source = ModelSource::resolve(model_flag.as_deref())?;
    let positions = model_zoo::config::JsonConfig::read(source.dir.join("config.json"))?
        .i64_or("max_position_embeddings", 512)?
        .max(4) as usize;
    let mut baseline_plan = baseline_plan;
    if p.max_len > positions {
        eprintln!(
            "modular distill: --max-len {} is above the model's {positions} positions; using {positions}",
            p.max_len
        );
        p.max_len = positions;
        baseline_plan.max_len = positions;
    }
    f.out_not_input(&out, &[("--data", &data_path), ("--model", &source.dir)])?;
    if !source.tokenizer_path().is_file() {
        return Err(format!(
            "model folder {} has no tokenizer.json (needed to read text)",
            source.dir.display()
        )
        .into());
    }
    let (data, _) = load_data(&data_path, seed)?;
    let depth = model_zoo::config::BertConfig::read(source.dir.join("config.json"))?
        .num_hidden_layers as usize;
    if p.modules > depth {
        return usage(
            "distill",
            format!(
                "--modules {} is more than the teacher's {depth} layers",
                p.modules
            ),
        );
    }
    let out_dir = AtomicDir::new(&out, f.switch("--force"))?;
    println!("modular distill");
    println!("  model    {source}");
    println!(
        "  data     {} ({} labels; train {}, test {}{})",
        data.dir.display(),
        data.num_labels,
        data.train.len(),
        data.test.len(),
        data.test_ood
            .as_ref()
            .map_or(String::new(), |o| format!(", OOD {}", o.len()))
    );
    println!(
        "  student  {} modules of width {} with {} experts; {} steps ({} distillation per module, {}), seed {seed}",
        p.modules,
        p.student_width,
        p.experts,
        baseline_plan.steps,
        p.distil_steps,
        if p.parallel { "parallel" } else { "sequential" }
    );
    let start = Instant::now();
    let sp = spinner("distill", quiet);
    sp.set_message("teacher, meta model, incubation");
    let mut prep = prepare(&p, &source, &data)?;
    println!(
        "  teacher  {} ({} layers in {} modules, {} training examples)",
        describe(&prep.teacher_scores),
        prep.depth,
        p.modules,
        prep.setup.train_examples()
    );
    println!("  meta     {}", describe(&prep.meta_scores));
    let base = if f.switch("--baselines") {
        sp.set_message("baselines");
        Some(baselines(&prep, &baseline_plan, seed, true)?)
    } else {
        None
    };
    sp.set_message("distilling the modules");
    let modules_dir = out_dir.path().join("modules");
    std::fs::create_dir_all(&modules_dir)
        .map_err(|e| format!("cannot create {}: {e}", modules_dir.display()))?;
    let m = m2mkd_arm(&mut prep, &p, seed, Some(&modules_dir))?;
    sp.finish_and_clear();
    let named = m.model.named_parameters();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let student_params: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
    tensor_core::io::save(out_dir.path().join("student.safetensors"), &refs, None)?;
    let per_module: Vec<serde_json::Value> = m
        .modules
        .iter()
        .enumerate()
        .map(|(i, (s, n, params))| {
            json!({"index": i, "seconds": s, "steps": n, "steps_per_second": *n as f64 / s.max(1e-9), "trainable_params": params})
        })
        .collect();
    let doc = json!({
        "format": "modular-distill",
        "version": 1,
        "base_model": source.dir.display().to_string(),
        "data": data.dir.display().to_string(),
        "num_labels": data.num_labels,
        "teacher_layers": prep.depth,
        "teacher_params": prep.teacher_parameters(),
        "divided_depths": prep.boundaries.divided_depths,
        "student_model": {
            "modules": p.modules, "width": p.student_width, "heads": 4,
            "experts": p.experts, "top_k": 2, "params": student_params,
        },
        "options": {
            "steps": baseline_plan.steps, "distil_steps": p.distil_steps, "end_to_end_steps": p.steps,
            "teacher_steps": p.teacher_steps, "meta_steps": p.meta_steps,
            "incubate_steps": p.incubate_steps, "batch": p.batch, "max_len": p.max_len,
            "train_limit": p.train_limit, "eval_limit": p.eval_limit, "seed": seed,
            "parallel": p.parallel,
        },
        "teacher": metrics(&prep.teacher_scores),
        "meta": metrics(&prep.meta_scores),
        "student_assembled": metrics(&m.assembled),
        "student": metrics(&m.trained),
        "baseline_scratch": base.as_ref().map(|b| metrics(&b.0)),
        "baseline_logit_kd": base.as_ref().and_then(|b| b.1.as_ref().map(metrics)),
        "distil_wall_seconds": m.distil_wall,
        "modules": per_module,
        "seconds": start.elapsed().as_secs_f64(),
    });
    super::write_json(&out_dir.path().join("distill.json"), &doc)?;
    let written = out_dir.commit()?;
    for (i, (s, n, _)) in m.modules.iter().enumerate() {
        println!(
            "  module {i} distilled {n} steps in {s:.1}s ({:.1} steps/s)",
            *n as f64 / s.max(1e-9)
        );
    }
    println!(
        "  student  {} after assembly; {} after end-to-end training ({:.2}M parameters)",
        describe(&m.assembled),
        describe(&m.trained),
        student_params as f64 / 1e6
    );
    if let Some((scratch, kd)) = &base {
        println!("  scratch  {}", describe(scratch));
        if let Some(kd) = kd {
            println!("  logit KD {}", describe(kd));
        }
    }
    println!(
        "  wrote    {} in {:.1}s",
        written.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
