//! `modular inspect`: what a folder holds, read from file headers only (no
//! tensor is loaded): a model folder (parameters, dtypes, shapes grouped
//! over repeated layers), a PEFT adapter folder (type, rank, alpha,
//! targets, per-layer ranks), a split folder from `modular split` (experts
//! per layer), a VL-PET folder or merged deltas from `modular tune` /
//! `modular merge`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tensor_core::io::SafetensorsFile;

use super::{AnyResult, Flags, human_count, read_json, require_dir, usage};

pub const HELP: &str = "\
usage: modular inspect DIR [--tensors]

Summarise a folder:
  - a model folder (config.json + model.safetensors): architecture, parameter
    count, dtypes, tensor shapes (repeated layers grouped as layer.*);
  - a PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
    type, rank, alpha, target modules, the rank of every adapted layer;
  - a split folder from `modular split` (emoe.json): experts per layer (N, top-k,
    neurons per expert, k-means objective), plus the model summary;
  - a `modular tune` folder (tune.json, head.safetensors, vlpet_*): method,
    metrics, head; a `modular merge` folder (merge.json, merged_deltas.safetensors).

options:
  --tensors   list every tensor (name, dtype, shape) instead of grouping

examples:
  modular inspect models/MiniLM-L6
  modular inspect adapters/sst2
  modular inspect models/minilm-emoe --tensors";

pub fn run(args: &[String]) -> AnyResult<()> {
    let f = Flags::parse("inspect", args, &[], &["--tensors"])?;
    if f.help {
        println!("{HELP}");
        return Ok(());
    }
    let dir = match f.positional.as_slice() {
        [d] => Path::new(d),
        [] => return usage("inspect", "no folder given"),
        [_, extra, ..] => return usage("inspect", format!("unexpected argument '{extra}'")),
    };
    let all = f.switch("--tensors");
    require_dir(dir, "folder")?;
    let has = |name: &str| dir.join(name).is_file();
    let mut shown = false;
    println!("{}", dir.display());
    if has("config.json") && has("model.safetensors") {
        model(dir, all)?;
        shown = true;
    }
    if has("emoe.json") {
        split(dir)?;
        shown = true;
    }
    if has("adapter_config.json") {
        adapter(dir, all)?;
        shown = true;
    }
    if has(super::tune::VLPET_CONFIG) {
        vlpet(dir, all)?;
        shown = true;
    }
    if has("tune.json") {
        tune(dir)?;
        shown = true;
    }
    if has("merge.json") || has(super::merge::DELTAS_FILE) {
        merged(dir, all)?;
        shown = true;
    }
    if !shown {
        return Err(format!(
            "{} is not a model, adapter or split folder: it has none of config.json + model.safetensors, adapter_config.json, emoe.json, tune.json, merge.json",
            dir.display()
        )
        .into());
    }
    Ok(())
}

/// Tensor headers of a safetensors file: name, dtype, shape.
fn headers(path: &Path) -> AnyResult<Vec<(String, String, Vec<i64>)>> {
    let file = SafetensorsFile::open(path)?;
    let mut names = file.names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let (kind, shape) = file.info(&n)?;
            Ok((n, format!("{kind:?}"), shape))
        })
        .collect()
}

fn numel(shape: &[i64]) -> i64 {
    shape.iter().product()
}

/// `encoder.layer.3.attention.self.query.weight` → `encoder.layer.*.attention.self.query.weight`.
fn group_name(name: &str) -> String {
    name.split('.')
        .map(|s| {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Parameter count, dtypes and shapes (grouped over layer indices unless `all`).
fn tensor_summary(path: &Path, all: bool, indent: &str) -> AnyResult<i64> {
    let h = headers(path)?;
    let total: i64 = h.iter().map(|(_, _, s)| numel(s)).sum();
    let mut dtypes: BTreeMap<&str, (usize, i64)> = BTreeMap::new();
    for (_, d, s) in &h {
        let e = dtypes.entry(d.as_str()).or_default();
        e.0 += 1;
        e.1 += numel(s);
    }
    let dt: Vec<String> = dtypes
        .iter()
        .map(|(d, (n, p))| format!("{d} {n} tensors / {}", human_count(*p)))
        .collect();
    println!(
        "{indent}{}: {} tensors, {} parameters ({total}); {}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        h.len(),
        human_count(total),
        dt.join(", ")
    );
    if all {
        for (n, d, s) in &h {
            println!("{indent}  {n:<60} {d:<9} {s:?}");
        }
    } else {
        // Same group, dtype and shape: one line with a count.
        let mut groups: Vec<(String, String, Vec<i64>, usize)> = Vec::new();
        for (n, d, s) in &h {
            let g = group_name(n);
            match groups
                .iter_mut()
                .find(|(gn, gd, gs, _)| *gn == g && gd == d && gs == s)
            {
                Some(x) => x.3 += 1,
                None => groups.push((g, d.clone(), s.clone(), 1)),
            }
        }
        for (g, d, s, c) in &groups {
            let times = if *c > 1 {
                format!(" x{c}")
            } else {
                String::new()
            };
            println!("{indent}  {g:<60} {d:<9} {s:?}{times}");
        }
    }
    Ok(total)
}

fn model(dir: &Path, all: bool) -> AnyResult<()> {
    let cfg = read_json(&dir.join("config.json"))?;
    let get = |k: &str| {
        cfg.get(k)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    };
    println!("model folder");
    println!(
        "  config   model_type {}, hidden_size {}, layers {}, heads {}, intermediate_size {}, vocab {}",
        get("model_type").trim_matches('"'),
        get("hidden_size"),
        get("num_hidden_layers"),
        get("num_attention_heads"),
        get("intermediate_size"),
        get("vocab_size")
    );
    tensor_summary(&dir.join("model.safetensors"), all, "  ")?;
    let tok = ["tokenizer.json", "vocab.txt"]
        .iter()
        .filter(|f| dir.join(f).is_file())
        .copied()
        .collect::<Vec<_>>();
    println!(
        "  tokenizer {}",
        if tok.is_empty() {
            "none".to_owned()
        } else {
            tok.join(", ")
        }
    );
    Ok(())
}

fn split(dir: &Path) -> AnyResult<()> {
    let p = dir.join("emoe.json");
    let doc = read_json(&p)?;
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    println!("experts (emoe.json)");
    println!(
        "  gate     {} experts, top-{}, {} neurons each; split {}",
        n(&doc, "num_experts").map_or("?".into(), |x| x.to_string()),
        n(&doc, "top_k").map_or("?".into(), |x| x.to_string()),
        n(&doc, "expert_size").map_or("?".into(), |x| x.to_string()),
        doc.get("split").map_or("?".into(), |s| s.to_string())
    );
    let layers = doc
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{}: no 'layers' list", p.display()))?;
    println!("  | layer | path | d_ff | N | k | size | k-means J | random J |");
    println!("  |---|---|---|---|---|---|---|---|");
    for l in layers {
        let perm_ok = l
            .get("permutation")
            .and_then(Value::as_array)
            .is_some_and(|a| a.len() as u64 == n(l, "d_ff").unwrap_or(0));
        if !perm_ok {
            return Err(format!(
                "{}: layer {} has no permutation of length d_ff",
                p.display(),
                l.get("path").unwrap_or(&Value::Null)
            )
            .into());
        }
        let f = |k: &str| {
            l.get(k)
                .and_then(Value::as_f64)
                .map_or("-".into(), |x| format!("{x:.4}"))
        };
        let u = |k: &str| n(l, k).map_or("-".into(), |x| x.to_string());
        println!(
            "  | {} | {} | {} | {} | {} | {} | {} | {} |",
            u("layer"),
            l.get("path").and_then(Value::as_str).unwrap_or("?"),
            u("d_ff"),
            u("num_experts"),
            u("top_k"),
            u("expert_size"),
            f("objective"),
            f("random_objective")
        );
    }
    Ok(())
}

fn adapter(dir: &Path, all: bool) -> AnyResult<()> {
    let p = dir.join("adapter_config.json");
    let cfg = read_json(&p)?;
    let peft_type = cfg
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: missing 'peft_type'", p.display()))?;
    println!("PEFT adapter ({peft_type})");
    let s = |k: &str| {
        cfg.get(k)
            .filter(|v| !v.is_null())
            .map_or("-".into(), |v| v.to_string())
    };
    if peft_type == "LORA" {
        println!(
            "  lora     r {}, lora_alpha {}, dropout {}, rslora {}, dora {}",
            s("r"),
            s("lora_alpha"),
            s("lora_dropout"),
            s("use_rslora"),
            s("use_dora")
        );
    }
    let targets: Vec<String> = match cfg.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().unwrap_or("?").to_owned())
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let shown = if targets.len() > 6 {
        format!(
            "{}, ... ({} more)",
            targets[..4].join(", "),
            targets.len() - 4
        )
    } else {
        targets.join(", ")
    };
    println!("  targets  {} module(s): {shown}", targets.len());
    if let Some(m) = cfg.get("modules_to_save").filter(|v| !v.is_null()) {
        println!("  modules_to_save {m}");
    }
    if let Some(m) = cfg.get("modular_orthogonal").filter(|v| !v.is_null()) {
        println!("  orthogonal {m}");
    }
    let w = dir.join("adapter_model.safetensors");
    if !w.is_file() {
        return Err(format!("{} has no adapter_model.safetensors", dir.display()).into());
    }
    // Rank per adapted layer, from the lora_A shapes `[r, in]`.
    let h = headers(&w)?;
    let mut ranks: BTreeMap<i64, usize> = BTreeMap::new();
    for (n, _, shape) in &h {
        if n.ends_with("lora_A.weight") {
            *ranks.entry(shape[0]).or_default() += 1;
        }
    }
    if !ranks.is_empty() {
        let r: Vec<String> = ranks
            .iter()
            .map(|(r, c)| format!("rank {r} on {c} layer(s)"))
            .collect();
        println!("  layers   {}", r.join(", "));
    }
    tensor_summary(&w, all, "  ")?;
    Ok(())
}

fn vlpet(dir: &Path, all: bool) -> AnyResult<()> {
    let doc = read_json(&dir.join(super::tune::VLPET_CONFIG))?;
    let v = doc.get("vlpet").cloned().unwrap_or(Value::Null);
    println!("VL-PET adapter");
    println!(
        "  config   r {}, heads {}, gate {}, sites {}",
        v.get("r").unwrap_or(&Value::Null),
        v.get("heads").unwrap_or(&Value::Null),
        v.get("gate").unwrap_or(&Value::Null),
        v.get("encoder_sites").unwrap_or(&Value::Null)
    );
    let w = dir.join(super::tune::VLPET_WEIGHTS);
    if w.is_file() {
        tensor_summary(&w, all, "  ")?;
    }
    Ok(())
}

fn tune(dir: &Path) -> AnyResult<()> {
    let doc = read_json(&dir.join("tune.json"))?;
    let g = |k: &str| doc.get(k).cloned().unwrap_or(Value::Null);
    println!("tuning run (tune.json)");
    println!(
        "  method   {} rank {}, {} labels, base {}",
        g("method").as_str().unwrap_or("?"),
        g("rank"),
        g("num_labels"),
        g("base_model").as_str().unwrap_or("?")
    );
    println!(
        "  trained  {} examples, {} of {} parameters trainable",
        g("train_examples"),
        g("trainable_params"),
        g("total_params")
    );
    for split in ["validation", "test"] {
        if let Some(a) = doc
            .get(split)
            .and_then(|m| m.get("accuracy"))
            .and_then(Value::as_f64)
        {
            println!("  accuracy {split} {a:.4}");
        }
    }
    let head = dir.join(super::tune::HEAD_FILE);
    if head.is_file() {
        let h = headers(&head)?;
        let shapes: Vec<String> = h.iter().map(|(n, _, s)| format!("{n} {s:?}")).collect();
        println!("  head     {}", shapes.join(", "));
    }
    Ok(())
}

fn merged(dir: &Path, all: bool) -> AnyResult<()> {
    println!("merge result");
    let p = dir.join("merge.json");
    if p.is_file() {
        let doc = read_json(&p)?;
        let cfg = doc.get("config").cloned().unwrap_or(Value::Null);
        println!(
            "  method   {} of {} ({}), density {}, lambda {}",
            cfg.get("method").and_then(Value::as_str).unwrap_or("?"),
            doc.get("tasks").unwrap_or(&Value::Null),
            doc.get("result").and_then(Value::as_str).unwrap_or("?"),
            cfg.get("density").unwrap_or(&Value::Null),
            cfg.get("lambda").unwrap_or(&Value::Null)
        );
        if let Some(c) = doc
            .get("interference")
            .and_then(|i| i.get("mean_abs_cosine"))
            .and_then(Value::as_f64)
        {
            println!("  interference mean |cos| {c:.4}");
        }
    }
    let w = dir.join(super::merge::DELTAS_FILE);
    if w.is_file() {
        tensor_summary(&w, all, "  ")?;
    }
    Ok(())
}
