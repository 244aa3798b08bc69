//! `modular merge`: merge PEFT LoRA adapter folders with any of
//! `orthogonal_merge`'s operators (sum, task arithmetic, concatenation,
//! truncated SVD, magnitude pruning, TIES, DARE), after checking that they
//! fit together (and, with `--model`, the base model).
//!
//! A result in LoRA form (`cat`, `svd`, `--low-rank`, or `sum` / `linear`
//! when the library keeps factors) is written as a PEFT folder; a result
//! that is a full `ΔW` per layer (TIES, DARE, pruning, task arithmetic) as
//! `merged_deltas.safetensors` (one `[out, in]` tensor per layer path).
//! `merge.json` records the inputs, the config and the interference summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use model_zoo::bert::{BertModel, Pooling, SequenceClassifier};
use orthogonal_merge::{
    MergeConfig, MergedDelta, Method, SaveOptions, SignMethod, TaskDelta, check_against_model,
    check_tasks, interference, merge, read_adapter, save_task,
};
use serde_json::json;
use tensor_core::tch::{Device, Tensor};

use super::{AnyResult, AtomicDir, Flags, require_dir, require_model_dir, spinner, usage};

pub const DELTAS_FILE: &str = "merged_deltas.safetensors";

pub const HELP: &str = "\
usage: modular merge ADAPTER_DIR... --out DIR [--method ties] [--weights 1,1]
                     [--density 0.2] [--lambda 1] [--svd-rank R] [--seed S]
                     [--sign total|frequency] [--low-rank] [--factorwise]
                     [--model DIR] [--force] [--quiet]

Merge PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors,
as written by PEFT, pet-core or orthogonal-merge) into one. Prints the
interference between the adapters (Frobenius cosine of their weight changes and
the overlap of their subspaces) and writes:
  - a PEFT LoRA folder when the result is low-rank (cat, svd, --low-rank, and
    sum/linear of LoRA inputs), or
  - merged_deltas.safetensors (one full [out, in] delta per layer path) when the
    method gives full deltas (ties, magnitude_prune, dare_linear, dare_ties,
    linear with pruning...),
  plus merge.json (inputs, config, interference).

methods: sum, linear, cat, svd, magnitude_prune, ties, dare_linear, dare_ties

options:
  --out DIR        output folder (written atomically; --force replaces it)
  --method M       merge operator [ties]
  --weights W,...  one weight per adapter [1 each]; sum needs all 1
  --density D      fraction of entries kept by ties / magnitude_prune / dare [0.2]
  --lambda L       factor on the merged delta [1]
  --svd-rank R     rank of svd / --low-rank results [largest input rank]
  --seed S         seed of DARE's random masks [0]
  --sign S         TIES sign election: total or frequency [total]
  --low-rank       truncate a full result to LoRA factors by SVD (PEFT's *_svd)
  --factorwise     merge the A and B factors separately (PEFT's default for LoRA)
  --model DIR      check every adapted layer against this base model folder
  --quiet          no spinner

examples:
  modular merge adapters/sst2 adapters/imdb --out adapters/merged --method ties --density 0.2
  modular merge a b c --out merged --method linear --weights 1,1,-0.5
  modular merge a b --out merged --method cat --model models/MiniLM-L6";

pub fn run(args: &[String]) -> AnyResult<()> {
    let f = Flags::parse(
        "merge",
        args,
        &[
            "--out",
            "--method",
            "--weights",
            "--density",
            "--lambda",
            "--svd-rank",
            "--seed",
            "--sign",
            "--model",
        ],
        &["--low-rank", "--factorwise", "--force", "--quiet"],
    )?;
    if f.help {
        println!("{HELP}");
        return Ok(());
    }
    if f.positional.is_empty() {
        return usage("merge", "no adapter folders given");
    }
    let out = PathBuf::from(f.required("--out")?);
    let method_name = f.get("--method").unwrap_or("ties");
    let method = match Method::parse(method_name) {
        Ok(Method::LeastSquares) => {
            return usage(
                "merge",
                "--method least_squares needs features recorded from each task's data; use the orthogonal_merge library (merge_with_features)",
            );
        }
        Ok(m) => m,
        Err(e) => return usage("merge", format!("--method: {e}")),
    };
    let mut cfg = MergeConfig::new(method);
    cfg.weights = f.list::<f64>("--weights")?;
    if let Some(w) = &cfg.weights
        && w.len() != f.positional.len()
    {
        return usage(
            "merge",
            format!(
                "--weights gives {} weights for {} adapters",
                w.len(),
                f.positional.len()
            ),
        );
    }
    cfg.density = f.parsed_or("--density", cfg.density)?;
    let dare = matches!(method, Method::DareLinear | Method::DareTies);
    if cfg.density.is_nan()
        || cfg.density > 1.0
        || cfg.density < 0.0
        || (dare && cfg.density == 0.0)
    {
        return usage(
            "merge",
            format!(
                "--density {} must be in {} (the fraction of entries kept)",
                cfg.density,
                if dare { "(0, 1]" } else { "[0, 1]" }
            ),
        );
    }
    cfg.lambda = f.parsed_or("--lambda", cfg.lambda)?;
    cfg.seed = f.parsed_or("--seed", 0)?;
    cfg.svd_rank = f.parsed::<i64>("--svd-rank")?;
    cfg.majority_sign = match f.get("--sign") {
        None | Some("total") => SignMethod::Total,
        Some("frequency") => SignMethod::Frequency,
        Some(s) => return usage("merge", format!("--sign '{s}': one of total, frequency")),
    };
    cfg.low_rank = f.switch("--low-rank");
    cfg.factorwise = f.switch("--factorwise");
    let quiet = f.switch("--quiet");
    // The library validates the rest (density range, sum's unit weights, ...):
    // a config it rejects is a usage error.
    let dirs: Vec<PathBuf> = f.positional.iter().map(PathBuf::from).collect();
    let mut inputs: Vec<(&str, &Path)> =
        dirs.iter().map(|d| ("ADAPTER_DIR", d.as_path())).collect();
    let model_flag = f.path("--model");
    if let Some(m) = &model_flag {
        inputs.push(("--model", m));
    }
    f.out_not_input(&out, &inputs)?;
    if cfg.density == 0.0 && f.get("--density").is_some() {
        eprintln!(
            "modular merge: warning: --density 0 keeps no entry of any task vector; \
             the merged adapter will be all zeros"
        );
    }
    let t = Instant::now();

    let tasks = read_tasks(&dirs)?;
    check_tasks(&tasks)?;
    if let Some(m) = f.path("--model") {
        require_model_dir(&m)?;
        check_model(&m, &tasks)?;
    }
    let sp = spinner(&format!("merging ({})", method.name()), quiet);
    let report = interference(&tasks)?;
    let merged = match merge(&tasks, &cfg) {
        Ok(m) => m,
        Err(orthogonal_merge::Error::Config(msg)) => {
            sp.finish_and_clear();
            return usage("merge", msg);
        }
        Err(e) => return Err(e.into()),
    };
    sp.finish_and_clear();

    let lora = merged
        .layers
        .values()
        .all(|d| matches!(d, MergedDelta::Lora(_)));
    let out_dir = AtomicDir::new(&out, f.switch("--force"))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    if lora {
        save_task(
            &merged.to_task(&name),
            out_dir.path(),
            &[],
            &SaveOptions::default(),
        )?;
    } else {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (l, d) in &merged.layers {
            tensors.push((l.clone(), d.weight()?));
        }
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let meta = std::collections::HashMap::from([
            ("format".to_owned(), "modular-merged-deltas".to_owned()),
            ("method".to_owned(), method.name().to_owned()),
        ]);
        tensor_core::io::save(out_dir.path().join(DELTAS_FILE), &refs, Some(meta))?;
    }
    let pairs: Vec<_> = report
        .per_pair()
        .into_iter()
        .map(|(i, j, c)| json!({"a": report.tasks[i], "b": report.tasks[j], "mean_abs_cosine": c}))
        .collect();
    let doc = json!({
        "format": "modular-merge",
        "version": 1,
        "adapters": dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "tasks": tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "config": serde_json::to_value(&cfg)?,
        "result": if lora { "lora" } else { "full_deltas" },
        "layers": merged.layers.iter().map(|(l, d)| json!({"layer": l, "rank": d.rank()})).collect::<Vec<_>>(),
        "interference": {
            "mean_abs_cosine": report.mean_abs_cosine(),
            "mean_input_overlap": report.mean_input_overlap(),
            "mean_output_overlap": report.mean_output_overlap(),
            "pairs": pairs,
        },
    });
    super::write_json(&out_dir.path().join("merge.json"), &doc)?;
    let written = out_dir.commit()?;

    println!("modular merge");
    for (t, d) in tasks.iter().zip(&dirs) {
        let ranks: Vec<i64> = t.layers.values().filter_map(|d| d.rank()).collect();
        println!(
            "  adapter  {} ({}): {} layers, rank {}",
            t.name,
            d.display(),
            t.layers.len(),
            rank_range(&ranks)
        );
    }
    for line in report.to_string().lines() {
        println!("  {line}");
    }
    println!(
        "  merged   {} layers with {} in {:.2}s -> {}",
        merged.layers.len(),
        method.name(),
        t.elapsed().as_secs_f64(),
        if lora {
            let ranks: Vec<i64> = merged.layers.values().filter_map(|d| d.rank()).collect();
            format!("PEFT LoRA folder, rank {}", rank_range(&ranks))
        } else {
            format!("full deltas ({DELTAS_FILE})")
        }
    );
    println!("  wrote    {}", written.display());
    Ok(())
}

fn rank_range(ranks: &[i64]) -> String {
    match (ranks.iter().min(), ranks.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}..{b}"),
        _ => "-".into(),
    }
}

/// Read every folder as a task; names follow the adapter's concept or
/// folder name, made unique by a `#i` suffix.
fn read_tasks(dirs: &[PathBuf]) -> AnyResult<Vec<TaskDelta>> {
    let mut tasks: Vec<TaskDelta> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        require_dir(d, "adapter folder")?;
        if !d.join("adapter_config.json").is_file() {
            return Err(format!(
                "adapter folder {} has no adapter_config.json (expected a PEFT LoRA folder)",
                d.display()
            )
            .into());
        }
        let mut t = read_adapter(d, None)?.task;
        if tasks.iter().any(|u| u.name == t.name) {
            t.name = format!("{}#{}", t.name, i + 1);
        }
        tasks.push(t);
    }
    Ok(tasks)
}

/// Check the tasks against the encoder at `dir`; adapters trained on a
/// sequence classifier name their layers `bert.…`, so those are checked
/// against the encoder inside a classifier.
fn check_model(dir: &Path, tasks: &[TaskDelta]) -> AnyResult<()> {
    if super::is_decoder(dir) {
        let model = model_zoo::llama::LlamaForCausalLM::from_folder(dir, Device::Cpu)?;
        return check_against_model(&model, tasks)
            .map_err(|e| format!("adapters do not fit the model {}: {e}", dir.display()).into());
    }
    let bert = BertModel::from_folder(dir, Device::Cpu)?;
    let in_classifier = tasks
        .iter()
        .flat_map(|t| t.layers.keys())
        .any(|l| l.starts_with("bert."));
    let r = if in_classifier {
        let clf = SequenceClassifier::new(bert, 2, Pooling::Mean)?;
        check_against_model(&clf, tasks)
    } else {
        check_against_model(&bert, tasks)
    };
    r.map_err(|e| format!("adapters do not fit the model {}: {e}", dir.display()).into())
}
