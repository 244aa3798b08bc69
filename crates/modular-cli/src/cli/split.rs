//! `modular split`: EMoE (Qiu et al. 2023, "Emergent Modularity in
//! Pre-trained Transformers") on a Hugging Face BERT-style encoder folder
//! or a Llama-family decoder folder (gated FFNs, clustered on the gate rows).
//!
//! Each chosen FFN's neurons are clustered by balanced k-means of their
//! normalised keys (`emergent_split::convert`) and permuted into contiguous
//! expert blocks: rows of `W1`/`b1`, columns of `W2`, by `π`. Permuting the
//! hidden neurons of `W2 act(W1 x + b1) + b2` leaves the dense function
//! unchanged, so the written `model.safetensors` is still the same dense
//! model; `emoe.json` records the gate (`N`, `k`) and the permutations, and
//! its `emoe_config` (split `contiguous`) rebuilds exactly the k-means experts
//! from the permuted weights:
//!
//! ```text
//! let cfg = EmoeConfig::from_json(&emoe_json["emoe_config"].to_string())?;
//! convert(&mut BertModel::from_folder(out)?, &layers, &cfg)?;
//! ```

use std::path::Path;
use std::time::Instant;

use emergent_split::convert::{convert, emoe_paths, reference_layers};
use emergent_split::{EmoeConfig, EmoeFfn, SplitStrategy};
use model_zoo::bert::BertModel;
use model_zoo::llama::LlamaForCausalLM;
use serde_json::json;
use tensor_core::module::{Module, ModuleExt, Slot};
use tensor_core::tch::{Device, Tensor};

use super::{AnyResult, AtomicDir, Flags, human_count, progress, require_model_dir, usage};

pub const HELP: &str = "\
usage: modular split --model DIR --out DIR [--experts N] [--top-k K] [--layers 4|3,5|all]
                     [--seed S] [--n-init N] [--force] [--quiet]

Split the feed-forward layers of a Hugging Face BERT-style model folder into
emergent experts (EMoE): balanced k-means of each FFN's key vectors, neurons
permuted into contiguous expert blocks. Writes a model folder (config.json,
model.safetensors with the permuted weights - the same dense function -, the
tokenizer files) plus emoe.json: experts, top-k, the permutation of every
split layer, its k-means objective, and the EmoeConfig that rebuilds the
experts from the permuted weights.

options:
  --model DIR     model folder (config.json + model.safetensors); default: the
                  packaged all-MiniLM-L6-v2 or $MODULAR_MODEL_DIR
  --out DIR       output folder (written atomically; --force replaces it)
  --experts N     experts per layer, must divide intermediate_size [16]
  --top-k K       experts selected per token [4]
  --layers L      comma-separated layer indices, or 'all'
                  [the reference's one upper-half layer, never the last:
                   4 for 6 layers, 10 for 12]
  --seed S        k-means seed [0]
  --n-init N      k-means restarts [10]
  --quiet         no progress bar

examples:
  modular split --model models/MiniLM-L6 --out models/minilm-emoe
  modular split --model models/bert-base --out out/bert-emoe --experts 64 --top-k 16 --layers 7,9,11";

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(f) = Flags::parse_options(
        "split",
        args,
        &[
            "--model",
            "--out",
            "--experts",
            "--top-k",
            "--layers",
            "--seed",
            "--n-init",
        ],
        &["--force", "--quiet"],
        HELP,
    )?
    else {
        return Ok(());
    };
    let out = f.required("--out")?.to_owned();
    let experts = f.positive_or("--experts", 16)?;
    let top_k = f.positive_or("--top-k", 4)?;
    if top_k > experts {
        return usage(
            "split",
            format!("--top-k {top_k} is larger than --experts {experts}"),
        );
    }
    let seed: u64 = f.parsed_or("--seed", 0)?;
    let n_init = f.positive_or("--n-init", 10)?;
    let layers_flag = match f.get("--layers") {
        None => None,
        Some("all") => Some(Vec::new()),
        Some(_) => Some(f.distinct_list::<usize>("--layers")?.unwrap_or_default()),
    };
    let quiet = f.switch("--quiet");

    let model_flag = f.path("--model");
    if let Some(p) = &model_flag {
        require_model_dir(p)?;
    }
    let source = model_zoo::source::ModelSource::resolve(model_flag.as_deref())?;
    f.out_not_input(Path::new(&out), &[("--model", &source.dir)])?;
    let dir = source.dir.clone();
    // An encoder (BERT family) or a Llama-family decoder (gated FFNs
    // `model.layers.N.mlp`, clustered on their gate rows), by model_type.
    let (mut model, num_layers, d_ff): (Box<dyn Module>, usize, usize) = if super::is_decoder(&dir)
    {
        let m = LlamaForCausalLM::from_folder(&dir, Device::Cpu)?;
        let c = m.config().clone();
        if c.moe.is_some() {
            return Err(format!(
                "{} is already a sparse mixture-of-experts model ({:?}); split splits dense FFNs",
                dir.display(),
                c.family
            )
            .into());
        }
        (
            Box::new(m),
            c.num_hidden_layers as usize,
            c.intermediate_size as usize,
        )
    } else {
        let m = BertModel::from_folder(&dir, Device::Cpu)?;
        let (l, f) = (
            m.config.num_hidden_layers as usize,
            m.config.intermediate_size as usize,
        );
        (Box::new(m), l, f)
    };
    let model = model.as_mut();
    let layers = match layers_flag {
        None => reference_layers(num_layers),
        Some(v) if v.is_empty() => (0..num_layers).collect(),
        Some(v) => v,
    };
    if let Some(&l) = layers.iter().find(|&&l| l >= num_layers) {
        return usage(
            "split",
            format!(
                "--layers: layer {l} does not exist ({} has {num_layers} layers: 0..{})",
                dir.display(),
                num_layers - 1
            ),
        );
    }
    if !d_ff.is_multiple_of(experts) {
        return usage(
            "split",
            format!("--experts {experts} does not divide the FFN width intermediate_size = {d_ff}"),
        );
    }

    let cfg = EmoeConfig {
        split: SplitStrategy::KMeans {
            seed,
            max_iters: 1000,
            n_init,
            kmeans_solver: Default::default(),
            swap_refine: true,
        },
        ..EmoeConfig::new(experts, top_k)
    };
    println!("modular split");
    println!("  model    {source}");
    println!(
        "  split    {} of {num_layers} layers, d_ff {d_ff} -> {experts} experts of {}, top-{top_k}",
        layers.len(),
        d_ff / experts
    );

    // One layer at a time, for the progress bar; `convert` checks each.
    let t = Instant::now();
    let pb = progress(layers.len() as u64, "k-means", quiet);
    let mut reports = Vec::new();
    for &l in &layers {
        pb.set_message(format!("layer {l}"));
        let r = convert(model, &[l], &cfg)?;
        reports.extend(r.layers);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let seconds = t.elapsed().as_secs_f64();

    // Replace every expert FFN by its dense form in the permuted order.
    let mut layer_json = Vec::new();
    for path in emoe_paths(model) {
        let e = model.get_as::<EmoeFfn>(&path)?;
        let perm = e.permutation().to_vec();
        let dense = e.to_dense(false)?;
        let rep = reports
            .iter()
            .find(|r| r.path == path)
            .ok_or_else(|| format!("internal: no report for {path}"))?;
        layer_json.push(json!({
            "layer": rep.layer,
            "path": path,
            "d_ff": rep.d_ff,
            "num_experts": rep.num_experts,
            "expert_size": rep.d_ff / rep.num_experts,
            "top_k": rep.top_k,
            "objective": rep.objective,
            "random_objective": rep.random_objective,
            "kmeans_iterations": rep.kmeans_iterations,
            "permutation": perm,
        }));
        model.replace(&path, Box::new(dense) as Slot)?;
    }

    let out_dir = AtomicDir::new(Path::new(&out), f.switch("--force"))?;
    copy_side_files(&dir, out_dir.path())?;
    let params = model.named_parameters();
    let refs: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    tensor_core::io::save(out_dir.path().join("model.safetensors"), &refs, Some(meta))?;
    let reload = EmoeConfig {
        split: SplitStrategy::Contiguous,
        ..cfg.clone()
    };
    let total: f64 = reports.iter().map(|r| r.objective).sum();
    let total_random: f64 = reports.iter().map(|r| r.random_objective).sum();
    let doc = json!({
        "format": "modular-emoe-split",
        "version": 1,
        "source_model": dir.display().to_string(),
        "num_experts": experts,
        "top_k": top_k,
        "expert_size": d_ff / experts,
        "layers_split": layers,
        "split": serde_json::to_value(&cfg.split)?,
        "emoe_config": serde_json::to_value(&reload)?,
        "objective_total": total,
        "random_objective_total": total_random,
        "seconds": seconds,
        "layers": layer_json,
        "note": "model.safetensors holds the permuted dense weights (the same function as the source); \
                 convert its layers with emoe_config (split 'contiguous') to get the k-means experts",
    });
    super::write_json(&out_dir.path().join("emoe.json"), &doc)?;
    let written = out_dir.commit()?;

    println!("  | layer | d_ff | experts x size | top-k | k-means J | random J | iterations |");
    println!("  |---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "  | {} | {} | {} x {} | {} | {:.4} | {:.4} | {} |",
            r.layer.map_or("-".to_owned(), |l| l.to_string()),
            r.d_ff,
            r.num_experts,
            r.d_ff / r.num_experts,
            r.top_k,
            r.objective,
            r.random_objective,
            r.kmeans_iterations
        );
    }
    println!(
        "  objective {total:.4} (random balanced split {total_random:.4}, {:.1}% lower) in {seconds:.2}s",
        if total_random > 0.0 {
            100.0 * (1.0 - total / total_random)
        } else {
            0.0
        }
    );
    println!(
        "  wrote    {} ({} parameters, emoe.json)",
        written.display(),
        human_count(params.iter().map(|(_, t)| t.numel() as i64).sum())
    );
    Ok(())
}

/// Copy what a model folder holds besides its weights (config, tokenizer,
/// sentence-transformers files) from `src` to `dst`.
pub fn copy_side_files(src: &Path, dst: &Path) -> AnyResult<()> {
    const WEIGHTS: [&str; 7] = ["safetensors", "bin", "pt", "h5", "msgpack", "onnx", "ot"];
    for entry in
        std::fs::read_dir(src).map_err(|e| format!("cannot list {}: {e}", src.display()))?
    {
        let entry = entry?;
        let p = entry.path();
        let name = entry.file_name();
        let target = dst.join(&name);
        if p.is_dir() {
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            std::fs::create_dir_all(&target)?;
            copy_side_files(&p, &target)?;
        } else if p.is_file() {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if WEIGHTS.contains(&ext) {
                continue;
            }
            std::fs::copy(&p, &target)
                .map_err(|e| format!("cannot copy {} to {}: {e}", p.display(), target.display()))?;
        }
    }
    Ok(())
}
