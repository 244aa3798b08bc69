//! The functional-bricks analysis pieces shared by `cargo xtask experiment
//! bricks` and the demo (configurable-bricks on all-MiniLM-L6-v2 and
//! `data/functional_corpus`, five functionalities): the corpus, its
//! length-sorted batches, the FFN profile streamed with the sentence
//! embeddings, a linear functionality probe and its losses, and the demo's
//! short analysis (FuncScores, top sets, overlap against the random
//! baseline, the perturbation matrix).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use crate::{AnyResult, repo_root};
use configurable_bricks::profile::{ProfileBatch, ProfileSummary};
use configurable_bricks::sets::random_overlap_baseline;
use configurable_bricks::{
    AttributionConfig, OverlapFormula, Perturbation, Profile, ProfileConfig, Profiler, SetConfig,
    TopScope, func_scores, functional_sets, overlap_matrix, perturbation_matrix, profile_corpus,
};
use model_zoo::bert::{SentenceEncoder, l2_normalize, mean_pool};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::{Context, Module};

pub const FUNCTIONS: [&str; 5] = ["code", "prose", "translation", "math", "shell"];

/// The analysis' sizes and outputs.
pub struct Plan {
    /// Examples per functionality taken from each split, in file order.
    pub train_per_function: usize,
    pub test_per_function: usize,
    pub batch: usize,
    /// Share of a layer's neurons in each functionality's top set.
    pub top_fraction: f64,
    /// Co-activation bricks per layer.
    pub bricks: usize,
    /// Where the profile is streamed.
    pub profile: PathBuf,
    /// The results page.
    pub out: PathBuf,
}

/// One corpus example: its text and functionality index.
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// Train and test examples, the first N per functionality of each split, in file order.
pub fn load_corpus(plan: &Plan) -> AnyResult<(Vec<Example>, Vec<Example>)> {
    let path = repo_root().join("data/functional_corpus/functional.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    let mut counts = [[0usize; 5]; 2];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        let field = |k: &str| {
            v[k].as_str()
                .ok_or_else(|| format!("{}:{}: no string field '{k}'", path.display(), i + 1))
        };
        let f = field("function")?;
        let label = FUNCTIONS
            .iter()
            .position(|&x| x == f)
            .ok_or_else(|| format!("unknown function '{f}'"))?;
        let (split, limit) = match field("split")? {
            "train" => (0, plan.train_per_function),
            "test" => (1, plan.test_per_function),
            s => return Err(format!("{}:{}: unknown split '{s}'", path.display(), i + 1).into()),
        };
        if counts[split][label] < limit {
            counts[split][label] += 1;
            let ex = Example {
                text: field("text")?.to_owned(),
                label,
            };
            if split == 0 {
                train.push(ex)
            } else {
                test.push(ex)
            }
        }
    }
    Ok((train, test))
}

/// A tokenised batch with its functionality labels.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Vec<usize>,
}

/// Tokenised batches, examples sorted by length (less padding); labels follow.
pub fn batches(enc: &SentenceEncoder, examples: &[Example], batch: usize) -> AnyResult<Vec<Batch>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let lens: Vec<usize> = examples
        .iter()
        .map(|e| enc.tokenizer.encode_ids(&e.text).map(|v| v.len()))
        .collect::<Result<_, _>>()?;
    order.sort_by_key(|&i| (lens[i], i));
    order
        .chunks(batch)
        .map(|c| {
            let texts: Vec<&str> = c.iter().map(|&i| examples[i].text.as_str()).collect();
            let e = enc.tokenizer.encode_batch(&texts, enc.device)?;
            Ok(Batch {
                ids: e.input_ids,
                mask: e.attention_mask,
                labels: c.iter().map(|&i| examples[i].label).collect(),
            })
        })
        .collect()
}

/// The functionality labels of every batch, concatenated (int64, CPU).
pub fn label_tensor(batches: &[Batch]) -> Tensor {
    Tensor::from_slice(
        &batches
            .iter()
            .flat_map(|b| b.labels.iter().map(|&l| l as i64))
            .collect::<Vec<_>>(),
    )
}

/// Normalised sentence embeddings of every batch, concatenated `[n, d]`.
pub fn embed(model: &dyn Module, batches: &[Batch]) -> tensor_core::Result<Tensor> {
    let mut out = Vec::new();
    for b in batches {
        let mut ctx = Context::eval().with_mask(b.mask.shallow_clone());
        let h = tch::no_grad(|| model.forward(&b.ids, &mut ctx))?;
        out.push(
            l2_normalize(
                &mean_pool(&h, &b.mask).map_err(|e| tensor_core::Error::config(e.to_string()))?,
            )
            .map_err(|e| tensor_core::Error::config(e.to_string()))?,
        );
    }
    Ok(Tensor::cat(&out, 0))
}

/// Linear softmax probe on embeddings, full-batch Adam, seeded.
pub fn train_probe(x: &Tensor, labels: &[usize]) -> AnyResult<(Tensor, Tensor)> {
    let (n, d) = (x.size()[0], x.size()[1]);
    let y = Tensor::from_slice(&labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
    let w = tensor_core::seed::randn_seeded(&[5, d], 7, Device::Cpu)?
        .f_mul_scalar(0.01)?
        .set_requires_grad(true);
    let b = Tensor::zeros([5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt_state: Vec<(Tensor, Tensor)> = [&w, &b]
        .iter()
        .map(|p| (p.zeros_like(), p.zeros_like()))
        .collect();
    let x = x.to_device(Device::Cpu).detach();
    for t in 1..=500 {
        let logits = x.linear(&w, Some(&b)) * 10.0;
        let loss =
            logits.cross_entropy_for_logits(&y) + w.square().sum(Kind::Float) * (1e-3 / n as f64);
        let g = Tensor::run_backward(&[loss], &[&w, &b], false, false);
        tch::no_grad(|| {
            for ((p, g), (m, v)) in [&w, &b].iter().zip(&g).zip(opt_state.iter_mut()) {
                *m = &*m * 0.9 + g * 0.1;
                *v = &*v * 0.999 + g.square() * 0.001;
                let mh = &*m / (1.0 - 0.9f64.powi(t));
                let vh = &*v / (1.0 - 0.999f64.powi(t));
                let _ = p.shallow_clone().f_sub_(&(mh / (vh.sqrt() + 1e-8) * 0.01));
            }
        });
    }
    Ok((w.detach(), b.detach()))
}

/// The probe's cross-entropy of every example, `[n]` (logits scaled by 10,
/// as the embeddings are unit vectors).
pub fn probe_ce(emb: &Tensor, labels: &Tensor, probe: &(Tensor, Tensor)) -> Tensor {
    (emb.linear(&probe.0, Some(&probe.1)) * 10.0)
        .log_softmax(-1, Kind::Float)
        .gather(1, &labels.unsqueeze(1), false)
        .squeeze_dim(1)
        .neg()
}

/// Per functionality: probe cross-entropy and embedding distortion `1 − cos`.
pub fn losses(
    emb: &Tensor,
    clean: &Tensor,
    labels: &Tensor,
    probe: &(Tensor, Tensor),
) -> (Vec<f64>, Vec<f64>) {
    let ce = probe_ce(emb, labels, probe);
    let dist = (emb * clean).sum_dim_intlist(1, false, Kind::Float).neg() + 1.0;
    let per = |t: &Tensor| -> Vec<f64> {
        (0..5i64)
            .map(|f| {
                let m = labels.eq(f).to_kind(Kind::Float);
                ((t * &m).sum(Kind::Double) / m.sum(Kind::Double)).double_value(&[])
            })
            .collect()
    };
    (per(&ce), per(&dist))
}

pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn names() -> Vec<String> {
    FUNCTIONS.iter().map(|s| s.to_string()).collect()
}

/// Profile every FFN on `batches` into `path` (streamed to safetensors),
/// collecting the intact model's normalised sentence embeddings on the way:
/// `(summary, labels, embeddings [n, d] on the CPU)`.
pub fn profile_with_embeddings(
    model: &dyn Module,
    batches: &[Batch],
    path: &Path,
    progress: bool,
) -> AnyResult<(ProfileSummary, Vec<usize>, Tensor)> {
    let profiler = Profiler::new(model, ProfileConfig::default())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let labels: Vec<usize> = batches
        .iter()
        .flat_map(|b| b.labels.iter().copied())
        .collect();
    let pb: Vec<_> = batches
        .iter()
        .map(|b| {
            Ok(ProfileBatch {
                input: b.ids.shallow_clone(),
                attention_mask: b.mask.shallow_clone(),
                scope: None,
            })
        })
        .collect();
    let emb = RefCell::new(Vec::new());
    let summary = profile_corpus(
        &profiler,
        pb,
        &labels,
        &names(),
        path,
        progress,
        |b, ctx| {
            let h = model.forward(&b.input, ctx)?;
            let e = mean_pool(&h, &b.attention_mask)
                .and_then(|e| l2_normalize(&e))
                .map_err(|e| tensor_core::Error::config(e.to_string()))?;
            emb.borrow_mut().push(e);
            Ok(h)
        },
    )?;
    let emb = Tensor::cat(&emb.into_inner(), 0).to_device(Device::Cpu);
    Ok((summary, labels, emb))
}

/// What the demo's bricks step reports.
pub struct BricksDemo {
    pub examples: usize,
    pub examples_per_second: f64,
    pub neurons: i64,
    /// Mean off-diagonal overlap of the top sets (resident neurons kept) and
    /// its random baseline.
    pub overlap: f64,
    pub random_overlap: f64,
    /// Probe cross-entropy on functionality g with S_f zeroed, `[f][g]`.
    pub perturbation: Perturbation,
    pub diagonal_dominant: usize,
    pub functions: Vec<String>,
}

pub fn mean_off_diagonal(m: &[Vec<f64>]) -> f64 {
    let n = m.len();
    let mut sum = 0.0;
    for (i, row) in m.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            if i != j {
                sum += v;
            }
        }
    }
    sum / (n * n.saturating_sub(1)).max(1) as f64
}

/// The demo's short version of the analysis on `enc`: profile
/// `train_per_function` examples per functionality into `profile_path`,
/// FuncScores, top-`top_fraction` sets, their overlap against the random
/// baseline, and the perturbation matrix of a linear functionality probe's
/// cross-entropy on `test_per_function` examples per functionality.
pub fn demo(
    enc: &mut SentenceEncoder,
    train_per_function: usize,
    test_per_function: usize,
    top_fraction: f64,
    profile_path: &Path,
    progress: bool,
) -> AnyResult<BricksDemo> {
    let plan = Plan {
        train_per_function,
        test_per_function,
        batch: 32,
        top_fraction,
        bricks: 16,
        profile: profile_path.to_owned(),
        out: profile_path.with_extension("md"),
    };
    let (train, test) = load_corpus(&plan)?;
    let train_b = batches(enc, &train, plan.batch)?;
    let test_b = batches(enc, &test, plan.batch)?;
    let (summary, labels, train_emb) =
        profile_with_embeddings(&enc.model, &train_b, profile_path, progress)?;
    let profile = Profile::open(profile_path)?;
    let scores = func_scores(
        &profile.matrix()?,
        &profile.labels,
        &profile.functions,
        &AttributionConfig::default(),
    )?;
    let sites = profile.sites.clone();
    let set_cfg = SetConfig {
        top_fraction,
        resident_rule: configurable_bricks::ResidentRule::None,
        ..SetConfig::default()
    };
    let sets = functional_sets(&scores, &sites, &set_cfg, None)?;
    let overlap = overlap_matrix(&sets, OverlapFormula::OverSize)?;
    let baseline = random_overlap_baseline(
        &sets,
        &sites,
        TopScope::PerLayer,
        OverlapFormula::OverSize,
        50,
        1,
    )?;
    // The loss: a linear functionality probe on the intact train embeddings
    // (MiniLM ships no MLM head), as in the full analysis.
    let probe = train_probe(&train_emb, &labels)?;
    let test_labels = label_tensor(&test_b);
    let clean = embed(&enc.model, &test_b)?.to_device(Device::Cpu);
    let eval = |m: &dyn Module| -> configurable_bricks::Result<Vec<f64>> {
        let e = embed(m, &test_b)?.to_device(Device::Cpu);
        Ok(losses(&e, &clean, &test_labels, &probe).0)
    };
    let perturbation = perturbation_matrix(&mut enc.model, &sites, &names(), &sets, eval)?;
    Ok(BricksDemo {
        examples: summary.examples,
        examples_per_second: summary.examples_per_second(),
        neurons: summary.neurons,
        overlap: mean_off_diagonal(&overlap),
        random_overlap: mean_off_diagonal(&baseline),
        diagonal_dominant: perturbation
            .diagonal_dominant_columns()
            .iter()
            .filter(|&&d| d)
            .count(),
        perturbation,
        functions: names(),
    })
}
