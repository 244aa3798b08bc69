//! `modular profile`: functional-brick profiling of a BERT encoder (MiniLM by
//! default) on a JSONL corpus, through configurable-bricks (Xiao et al. 2024,
//! "Configurable Foundation Models"; attribution after Zhang et al. 2023):
//!
//! 1. every FFN's hidden activation `a = act(x W1ᵀ + b1)` is reduced per
//!    example to `P[e, n] = mean_{t ∈ tokens(e)} |a_n(t)|` over the
//!    non-padding tokens (`Profiler`), streamed batch by batch into
//!    `profile.safetensors` (`profile_corpus`);
//! 2. with at least two distinct labels, FuncScore(n, f) = AP(P[:, n], y_f)
//!    (`func_scores`, exact as scikit-learn) is saved as
//!    `func_scores.safetensors` (`[labels, neurons]`);
//! 3. the top `--top-fraction` neurons per layer and label are the functional
//!    sets `S_f` (`functional_sets`, resident neurons kept); `bricks.json`
//!    holds them with the overlap `O(f, g) = |S_f ∩ S_g| / |S_f|` per layer
//!    and over the model (`overlap_matrix`), next to random sets of the same
//!    sizes (`random_overlap_baseline`, whose expectation is the fraction).
//!
//! `profile.json` records the options and a summary.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use configurable_bricks::profile::ProfileBatch;
use configurable_bricks::sets::random_overlap_baseline;
use configurable_bricks::{
    AttributionConfig, FfnSite, FuncScores, NeuronSet, OverlapFormula, Profile, ProfileConfig,
    Profiler, ResidentRule, SetConfig, TopScope, func_scores, functional_sets, overlap_matrix,
    profile_corpus,
};
use model_zoo::bert::BertModel;
use model_zoo::llama::LlamaForCausalLM;
use model_zoo::source::ModelSource;
use model_zoo::tokenizer::TextTokenizer;
use serde_json::json;
use tensor_core::Module;

use super::{AnyResult, AtomicDir, Flags, require_model_dir, usage};

pub const PROFILE_FILE: &str = "profile.safetensors";
pub const SCORES_FILE: &str = "func_scores.safetensors";
pub const BRICKS_FILE: &str = "bricks.json";
pub const SUMMARY_FILE: &str = "profile.json";
/// The tensor of [`SCORES_FILE`]: `[labels, neurons]` float64.
pub const SCORES_TENSOR: &str = "func_scores";
/// Draws of random sets for the overlap baseline, and their seed.
const RANDOM_TRIALS: usize = 100;
const RANDOM_SEED: u64 = 0;

pub const HELP: &str = "\
usage: modular profile --data FILE.jsonl|DIR --out DIR [--model DIR] [--batch 32]
                       [--max-len 64] [--limit N] [--top-fraction 0.05]
                       [--label-field label] [--force] [--quiet]

Profile every FFN neuron of a BERT encoder (the packaged all-MiniLM-L6-v2 unless
--model) on a JSONL corpus: per example, the mean |activation| over its
non-padding tokens. With at least two distinct labels, also attribute neurons to
labels: FuncScore = average precision of a neuron's profile for one label
against the rest, the top --top-fraction neurons per layer and label (the
functional sets), and their overlap between labels against random sets of the
same sizes. Data: JSONL lines {\"text\": \"...\", \"label\": 0} (label: an integer
or a string, or in the field --label-field names; leave it out on every line
to profile only); a DIR means its train.jsonl.

Writes DIR with:
  profile.safetensors      one [examples, d_ff] f32 tensor per FFN (by path),
                           example_labels, and the sites as metadata
  func_scores.safetensors  func_scores [labels, neurons] f64 (2+ labels)
  bricks.json              per layer and label the top neuron indices, the
                           overlap matrix and its random baseline (2+ labels)
  profile.json             options, model, examples, neurons per layer, time,
                           examples/s, labels and a summary

options:
  --data P            JSONL file, or a folder holding train.jsonl (required)
  --out DIR           output folder (written atomically; --force replaces it)
  --model DIR         encoder folder (config.json, model.safetensors,
                      tokenizer.json); default: the packaged all-MiniLM-L6-v2
                      or $MODULAR_MODEL_DIR
  --batch N           examples per forward pass [32]
  --max-len N         tokens per text, at most the model's positions [64]
  --limit N           profile only the first N examples of the file
  --label-field F     the JSON field holding the label [label]
  --top-fraction X    share of each layer's neurons in a functional set,
                      in (0, 1] [0.05]
  --quiet             no progress bar

examples:
  modular profile --data data/functional_corpus/functional.jsonl --label-field function --out runs/bricks
  modular profile --data data/sentiment_domains --out runs/sentiment --limit 2000
  modular profile --data texts.jsonl --out runs/texts --model models/MiniLM-L6 --top-fraction 0.1";

/// One example: its text and its label's index into the label names.
struct Corpus {
    file: PathBuf,
    texts: Vec<String>,
    /// `None`: no line has a label.
    labels: Option<Vec<usize>>,
    names: Vec<String>,
}

/// A label as written: an integer or a string.
enum Label {
    Int(i64),
    Str(String),
}

impl Label {
    fn name(&self) -> String {
        match self {
            Label::Int(i) => i.to_string(),
            Label::Str(s) => s.clone(),
        }
    }
}

/// Read `{"text": ..., "label": ...}` lines (the label, in field `field`,
/// optional, but on all lines or on none), stopping after `limit` examples.
/// `explicit`: the field was named by `--label-field`, so a file in which no
/// line has it is a usage error (exit 2) rather than an unlabelled corpus.
fn read_corpus(
    data: &Path,
    field: &str,
    explicit: bool,
    limit: Option<usize>,
) -> AnyResult<Corpus> {
    if !data.exists() {
        return Err(format!("data {} does not exist", data.display()).into());
    }
    let file = if data.is_dir() {
        let f = data.join("train.jsonl");
        if !f.is_file() {
            return Err(format!(
                "dataset folder {} has no train.jsonl (pass a JSONL file, or a folder holding train.jsonl)",
                data.display()
            )
            .into());
        }
        f
    } else {
        data.to_owned()
    };
    let at = |line: usize, reason: String| format!("{}:{line}: {reason}", file.display());
    let reader = std::io::BufReader::new(
        std::fs::File::open(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?,
    );
    let mut texts = Vec::new();
    let mut raw: Vec<Option<Label>> = Vec::new();
    // The first line with, and the first without, a label.
    let (mut with, mut without) = (None, None);
    for (i, line) in reader.lines().enumerate() {
        if limit.is_some_and(|l| texts.len() >= l) {
            break;
        }
        let n = i + 1;
        let line = line.map_err(|e| at(n, format!("cannot read: {e}")))?;
        // A UTF-8 byte-order mark on the first line is accepted.
        let line = match (n, line.strip_prefix('\u{feff}')) {
            (1, Some(rest)) => rest.to_owned(),
            _ => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| at(n, format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(at(n, "not a JSON object".into()).into());
        }
        let text = match v.get("text") {
            None => return Err(at(n, "no 'text' field".into()).into()),
            Some(t) => t
                .as_str()
                .ok_or_else(|| at(n, format!("'text' is not a string: {t}")))?,
        };
        let label = match v.get(field) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(Label::Str(s.clone())),
            Some(l) => Some(Label::Int(l.as_i64().ok_or_else(|| {
                at(n, format!("'{field}' is not an integer or a string: {l}"))
            })?)),
        };
        match (&label, with, without) {
            (Some(_), _, Some(w)) => {
                return Err(at(
                    n,
                    format!("has a '{field}' but line {w} has none (label every line or none)"),
                )
                .into());
            }
            (None, Some(w), _) => {
                return Err(at(
                    n,
                    format!("no '{field}' field but line {w} has one (label every line or none)"),
                )
                .into());
            }
            (Some(_), None, _) => with = Some(n),
            (None, _, None) => without = Some(n),
            _ => {}
        }
        texts.push(text.to_owned());
        raw.push(label);
    }
    if texts.is_empty() {
        return Err(format!("{}: no examples", file.display()).into());
    }
    if explicit && with.is_none() {
        return usage(
            "profile",
            format!(
                "--label-field '{field}': no line of {} has this field",
                file.display()
            ),
        );
    }
    if with.is_none() {
        return Ok(Corpus {
            file,
            texts,
            labels: None,
            names: Vec::new(),
        });
    }
    // Label names sorted: numerically when all are integers, else as text
    // (an integer and a string that read the same are one label).
    let mut distinct: Vec<&Label> = Vec::new();
    for l in raw.iter().flatten() {
        if !distinct.iter().any(|d| d.name() == l.name()) {
            distinct.push(l);
        }
    }
    if distinct.iter().all(|l| matches!(l, Label::Int(_))) {
        distinct.sort_by_key(|l| match l {
            Label::Int(i) => *i,
            Label::Str(_) => 0,
        });
    } else {
        distinct.sort_by_key(|l| l.name());
    }
    let names: Vec<String> = distinct.iter().map(|l| l.name()).collect();
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let labels = raw
        .iter()
        .flatten()
        .map(|l| index[l.name().as_str()])
        .collect();
    Ok(Corpus {
        file,
        texts,
        labels: Some(labels),
        names,
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn mean_off_diagonal(m: &[Vec<f64>]) -> f64 {
    let off: Vec<f64> = m
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.iter().enumerate().filter(move |(j, _)| *j != i))
        .map(|(_, v)| *v)
        .collect();
    mean(&off)
}

/// Functional sets, overlaps and summary of a labelled profile.
struct Attribution {
    scores: FuncScores,
    bricks: serde_json::Value,
    /// Per label: (best layer by mean FuncScore, that mean, best neuron's layer, index, AP).
    best: Vec<(usize, f64, usize, usize, f64)>,
    set_sizes: Vec<usize>,
    mean_overlap: f64,
    mean_random_overlap: f64,
}

fn attribute(
    profile: &Profile,
    top_fraction: f64,
    out_dir: &Path,
    names: &[String],
) -> AnyResult<Attribution> {
    let sites: &[FfnSite] = &profile.sites;
    let scores = func_scores(
        &profile.matrix()?,
        &profile.labels,
        &profile.functions,
        &AttributionConfig::default(),
    )?;
    let tensor = scores.to_tensor()?.f_transpose(0, 1)?.f_contiguous()?;
    let meta = HashMap::from([
        ("format".to_owned(), "modular-func-scores/1".to_owned()),
        ("functions".to_owned(), serde_json::to_string(names)?),
        ("sites".to_owned(), serde_json::to_string(sites)?),
    ]);
    tensor_core::io::save(
        out_dir.join(SCORES_FILE),
        &[(SCORES_TENSOR, &tensor)],
        Some(meta),
    )?;

    let set_cfg = SetConfig {
        top_fraction,
        top_scope: TopScope::PerLayer,
        resident_rule: ResidentRule::None,
    };
    let sets = functional_sets(&scores, sites, &set_cfg, None)?;
    let formula = OverlapFormula::OverSize;
    let overlap = overlap_matrix(&sets, formula)?;
    let baseline = random_overlap_baseline(
        &sets,
        sites,
        TopScope::PerLayer,
        formula,
        RANDOM_TRIALS,
        RANDOM_SEED,
    )?;
    let nf = names.len();
    let mut layers = Vec::new();
    let mut layer_means = vec![vec![0.0; sites.len()]; nf];
    for (li, s) in sites.iter().enumerate() {
        let (a, b) = (s.offset as usize, (s.offset + s.d_ff) as usize);
        let local: Vec<NeuronSet> = sets
            .iter()
            .map(|set| {
                set.iter()
                    .filter(|&&n| n >= a && n < b)
                    .map(|&n| n - a)
                    .collect()
            })
            .collect();
        let one = [FfnSite {
            path: s.path.clone(),
            d_ff: s.d_ff,
            offset: 0,
        }];
        let o = overlap_matrix(&local, formula)?;
        let r = random_overlap_baseline(
            &local,
            &one,
            TopScope::PerLayer,
            formula,
            RANDOM_TRIALS,
            RANDOM_SEED,
        )?;
        let means: Vec<f64> = (0..nf).map(|f| mean(&scores.column(f)[a..b])).collect();
        for (f, m) in means.iter().enumerate() {
            layer_means[f][li] = *m;
        }
        layers.push(json!({
            "layer": li,
            "path": s.path,
            "d_ff": s.d_ff,
            "offset": s.offset,
            "sets": local,
            "mean_func_score": means,
            "overlap": o,
            "random_overlap": r,
            "mean_overlap": mean_off_diagonal(&o),
            "mean_random_overlap": mean_off_diagonal(&r),
        }));
    }
    let mut best = Vec::new();
    for (f, lm) in layer_means.iter().enumerate() {
        let (bl, bm) =
            lm.iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |acc, (i, m)| {
                        if m > acc.1 { (i, m) } else { acc }
                    },
                );
        let col = scores.column(f);
        let (bn, ap) =
            col.iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |acc, (i, v)| {
                        if v > acc.1 { (i, v) } else { acc }
                    },
                );
        let site = sites
            .iter()
            .position(|s| (bn as i64) < s.offset + s.d_ff)
            .unwrap_or(0);
        best.push((bl, bm, site, bn - sites[site].offset as usize, ap));
    }
    let (mean_overlap, mean_random_overlap) =
        (mean_off_diagonal(&overlap), mean_off_diagonal(&baseline));
    let bricks = json!({
        "format": "modular-bricks",
        "version": 1,
        "labels": names,
        "set_config": set_cfg,
        "overlap_formula": formula,
        "overlap_definition": "|S_f ∩ S_g| / |S_f| (row f, column g)",
        "random_baseline": {"trials": RANDOM_TRIALS, "seed": RANDOM_SEED},
        "indices": "per layer: neuron indices within that layer's FFN (0..d_ff), one sorted list per label in the order of 'labels'",
        "layers": layers,
        "model": {
            "overlap": overlap,
            "random_overlap": baseline,
            "mean_overlap": mean_overlap,
            "mean_random_overlap": mean_random_overlap,
        },
    });
    Ok(Attribution {
        scores,
        bricks,
        best,
        set_sizes: sets.iter().map(Vec::len).collect(),
        mean_overlap,
        mean_random_overlap,
    })
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(f) = Flags::parse_options(
        "profile",
        args,
        &[
            "--data",
            "--out",
            "--model",
            "--batch",
            "--max-len",
            "--limit",
            "--top-fraction",
            "--label-field",
        ],
        &["--force", "--quiet"],
        HELP,
    )?
    else {
        return Ok(());
    };
    let data_path = PathBuf::from(f.required("--data")?);
    let out = PathBuf::from(f.required("--out")?);
    let batch = f.positive_or("--batch", 32)?;
    let max_len: usize = f.positive_or("--max-len", 64)?;
    if max_len < 2 {
        return usage("profile", "--max-len must be at least 2 ([CLS] and [SEP])");
    }
    let limit = match f.get("--limit") {
        None => None,
        Some(_) => Some(f.positive_or("--limit", 1)?),
    };
    let top_fraction: f64 = f.parsed_or("--top-fraction", 0.05)?;
    if !(top_fraction.is_finite() && top_fraction > 0.0 && top_fraction <= 1.0) {
        return usage(
            "profile",
            format!("--top-fraction must be in (0, 1], got {top_fraction}"),
        );
    }
    let quiet = f.switch("--quiet");
    let label_field = f.get("--label-field").unwrap_or("label");
    if label_field.is_empty() || label_field == "text" {
        return usage(
            "profile",
            format!("--label-field '{label_field}': name a JSON field other than 'text'"),
        );
    }

    let model_flag = f.path("--model");
    if let Some(p) = &model_flag {
        require_model_dir(p)?;
    }
    let source = ModelSource::resolve(model_flag.as_deref())?;
    f.out_not_input(&out, &[("--data", &data_path), ("--model", &source.dir)])?;
    if !source.tokenizer_path().is_file() {
        return Err(format!(
            "model folder {} has no tokenizer.json (needed to read text)",
            source.dir.display()
        )
        .into());
    }
    let corpus = read_corpus(
        &data_path,
        label_field,
        f.get("--label-field").is_some(),
        limit,
    )?;
    let out_dir = AtomicDir::new(&out, f.switch("--force"))?;
    let device = tensor_core::best();
    // An encoder (BERT family) or a Llama-family decoder, by config.json's model_type.
    let (model, tok, max_len): (Box<dyn Module>, TextTokenizer, usize) =
        if super::is_decoder(&source.dir) {
            let m = LlamaForCausalLM::from_folder(&source.dir, device)?;
            let c = m.config().clone();
            let tok =
                TextTokenizer::for_decoder(source.tokenizer_path(), c.vocab_size, c.pad_token_id)?;
            (Box::new(m), tok, max_len)
        } else {
            let m = BertModel::from_folder(&source.dir, device)?;
            let positions = m.config.max_position_embeddings.max(2) as usize;
            let max_len = max_len.min(positions);
            let tok =
                TextTokenizer::from_file(source.tokenizer_path(), max_len, m.config.vocab_size)?;
            (Box::new(m), tok, max_len)
        };
    let config = ProfileConfig::default();
    let profiler = Profiler::new(model.as_ref(), config.clone())?;
    let n = corpus.texts.len();
    let (labels, functions): (Vec<usize>, Vec<String>) = match &corpus.labels {
        Some(l) => (l.clone(), corpus.names.clone()),
        None => (vec![0; n], vec!["unlabelled".to_owned()]),
    };
    let counts: Vec<usize> = (0..functions.len())
        .map(|f| labels.iter().filter(|&&l| l == f).count())
        .collect();

    println!("modular profile");
    println!("  model    {source}");
    println!(
        "  data     {} ({n} examples{})",
        corpus.file.display(),
        if corpus.labels.is_some() {
            format!(
                "; labels {}",
                functions
                    .iter()
                    .zip(&counts)
                    .map(|(l, c)| format!("{l} {c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            ", no labels: profile only".to_owned()
        }
    );
    println!(
        "  profile  {} FFNs, {} neurons; mean |activation| over non-padding tokens; batch {batch}, max-len {max_len}, device {device:?}",
        profiler.sites.len(),
        profiler.neurons()
    );

    // Tokenise batch by batch as profiling streams; a tokenizer error is
    // kept here and reported as itself.
    let tok_error: RefCell<Option<model_zoo::Error>> = RefCell::new(None);
    let batches = corpus.texts.chunks(batch).map(|c| {
        let texts: Vec<&str> = c.iter().map(String::as_str).collect();
        match tok.encode_batch(&texts, device) {
            Ok(e) => Ok(ProfileBatch {
                input: e.input_ids,
                attention_mask: e.attention_mask,
                scope: None,
            }),
            Err(e) => {
                *tok_error.borrow_mut() = Some(e);
                Err(configurable_bricks::Error::config("tokenization failed"))
            }
        }
    });
    let profile_path = out_dir.path().join(PROFILE_FILE);
    let summary = match profile_corpus(
        &profiler,
        batches,
        &labels,
        &functions,
        &profile_path,
        !quiet,
        |b, ctx| model.forward(&b.input, ctx),
    ) {
        Ok(s) => s,
        Err(e) => {
            return Err(match tok_error.into_inner() {
                Some(t) => t.into(),
                None => e.into(),
            });
        }
    };
    println!(
        "  profiled {} examples in {:.2}s ({:.1} examples/s)",
        summary.examples,
        summary.seconds,
        summary.examples_per_second()
    );

    let attribution = if functions.len() >= 2 {
        let profile = Profile::open(&profile_path)?;
        Some(attribute(
            &profile,
            top_fraction,
            out_dir.path(),
            &functions,
        )?)
    } else {
        None
    };
    if let Some(a) = &attribution {
        super::write_json(&out_dir.path().join(BRICKS_FILE), &a.bricks)?;
    }

    let sites = &profiler.sites;
    let summary_doc = match &attribution {
        None => json!({
            "attribution": if corpus.labels.is_some() {
                "one label: FuncScores need at least two"
            } else {
                "no labels"
            },
        }),
        Some(a) => json!({
            "mean_overlap": a.mean_overlap,
            "mean_random_overlap": a.mean_random_overlap,
            "set_sizes": a.set_sizes,
            "per_label": functions.iter().enumerate().map(|(fi, name)| {
                let (bl, bm, nl, ni, ap) = a.best[fi];
                json!({
                    "label": name,
                    "examples": counts[fi],
                    "chance_ap": counts[fi] as f64 / n as f64,
                    "mean_func_score": mean(&a.scores.column(fi)),
                    "best_layer": bl,
                    "best_layer_mean_func_score": bm,
                    "best_neuron": {"layer": nl, "index": ni, "func_score": ap},
                })
            }).collect::<Vec<_>>(),
        }),
    };
    let doc = json!({
        "format": "modular-profile",
        "version": 1,
        "model": source.dir.display().to_string(),
        "model_source": source.to_string(),
        "data": corpus.file.display().to_string(),
        "options": {
            "batch": batch, "max_len": max_len, "limit": limit,
            "top_fraction": top_fraction, "label_field": label_field,
        },
        "profile_config": config,
        "device": format!("{device:?}"),
        "examples": summary.examples,
        "labelled": corpus.labels.is_some(),
        "labels": corpus.labels.as_ref().map(|_| &functions),
        "label_counts": corpus.labels.as_ref().map(|_| &counts),
        "sites": sites,
        "neurons_per_layer": sites.iter().map(|s| s.d_ff).collect::<Vec<_>>(),
        "neurons": summary.neurons,
        "seconds": summary.seconds,
        "examples_per_second": summary.examples_per_second(),
        "files": {
            "profile": PROFILE_FILE,
            "func_scores": attribution.as_ref().map(|_| SCORES_FILE),
            "bricks": attribution.as_ref().map(|_| BRICKS_FILE),
        },
        "summary": summary_doc,
    });
    super::write_json(&out_dir.path().join(SUMMARY_FILE), &doc)?;
    let written = out_dir.commit()?;

    match &attribution {
        None if corpus.labels.is_some() => {
            println!("  labels   one label only: no FuncScores (they need at least two)")
        }
        None => println!("  labels   none: profile only"),
        Some(a) => {
            println!(
                "  | label | examples | chance AP | mean FuncScore | best layer (mean) | best neuron layer:index (AP) |"
            );
            println!("  |---|---|---|---|---|---|");
            for (fi, name) in functions.iter().enumerate() {
                let (bl, bm, nl, ni, ap) = a.best[fi];
                println!(
                    "  | {name} | {} | {:.3} | {:.3} | {bl} ({bm:.3}) | {nl}:{ni} ({ap:.3}) |",
                    counts[fi],
                    counts[fi] as f64 / n as f64,
                    mean(&a.scores.column(fi)),
                );
            }
            let d_ff = sites[0].d_ff as usize;
            let k = ((top_fraction * d_ff as f64).round() as usize).clamp(1, d_ff);
            println!(
                "  overlap  top {}% per layer ({k} of {d_ff} neurons): mean {:.3} between labels vs {:.3} for random sets",
                top_fraction * 100.0,
                a.mean_overlap,
                a.mean_random_overlap
            );
        }
    }
    println!("  wrote    {}", written.display());
    Ok(())
}
