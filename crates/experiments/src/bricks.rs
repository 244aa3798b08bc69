//! `cargo xtask experiment bricks`: the survey's functional-brick analysis
//! (configurable-bricks) on all-MiniLM-L6-v2 and `data/functional_corpus`
//! (5 functionalities: code, prose, translation, math, shell), with controls.
//!
//! 1. Profile every FFN (6 × 1536 neurons) on the train split: per example,
//!    the mean |activation| over non-padding tokens, streamed to a
//!    safetensors file (`--profile`).
//! 2. FuncScore = AP per neuron and functionality; distribution per layer;
//!    a label-permutation null for the mean FuncScore of each top set.
//! 3. Top-5% functional sets per layer (resident neurons removed), overlap
//!    matrix vs the random baseline.
//! 4. Losses on the test split. MiniLM has no masked-LM head (the packaged
//!    sentence-transformers checkpoint ships the encoder only), so two stated
//!    alternatives replace the survey's perplexity:
//!    - **probe CE**: cross-entropy of a linear 5-way functionality probe
//!      trained on the intact model's sentence embeddings (train split);
//!    - **embedding distortion**: `1 − cos(e_masked, e_intact)` of the
//!      normalised mean-pooled sentence embedding (0 for the intact model).
//! 5. Perturbation matrix (zero S_f, absolute loss change on every g with a
//!    bootstrap interval over g's examples); each S_f against two controls
//!    with its per-layer counts (random sets, ≥ 10 draws; the busiest
//!    neurons by mean activation), decided per functionality; sparsity curve (mask
//!    the lowest k% per token, by |a| and by |a|·‖W_O[:, n]‖), the share of
//!    neurons whose normalised indicator is below 0.2.
//! 6. Balanced co-activation bricks (16 per layer) vs a random partition.
//!
//! Writes `docs/results/bricks.md` and SVG figures in `docs/results/bricks/`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use configurable_bricks::analysis::NormalisedIndicator;
use configurable_bricks::partition::{
    Partition, PartitionConfig, coactivation_partition, within_brick_correlation,
};
use configurable_bricks::sets::random_overlap_baseline;
use configurable_bricks::{
    AttributionConfig, FuncScores, Indicator, NeuronSet, NullDistribution, OverlapFormula,
    Perturbation, Profile, SetConfig, SparsityPoint, TopScope, func_score_null, func_scores,
    functional_sets, matched_random_sets, matched_top_sets, overlap_matrix, perturbation_matrix,
    sparsity_curve, svg, zeroed_losses,
};
use model_zoo::bert::SentenceEncoder;
use model_zoo::source::ModelSource;
use recipes::bricks::*;
use recipes::flags::{AnyResult, Flags, usage};
use tensor_core::rng::SplitMix64;
use tensor_core::tch::{self, Device, Kind};
use tensor_core::{Context, Module};

use crate::stats::{Bootstrap, bootstrap_mean_diff, fmt_p, paired_t};

/// One sparsity curve: indicator, points, per-point distortions.
type Curve = (Indicator, Vec<SparsityPoint>, Vec<Vec<f64>>);

pub const BRICKS_HELP: &str = "usage: cargo xtask experiment bricks [--train-per-function N] [--test-per-function N] [--batch N]
                                [--top-fraction X] [--bricks K] [--random-draws R] [--permutations K]
                                [--profile FILE] [--out FILE]
Functional bricks of all-MiniLM-L6-v2 on data/functional_corpus (code, prose, translation, math, shell):
profiles every FFN neuron on the train split (mean |activation| per example, safetensors), FuncScore = AP
against a label-permutation null, top-5% sets and their overlap vs random, perturbation matrix (absolute
probe-CE changes with bootstrap intervals) and two controls per set (R random sets with the same per-layer
counts, the busiest neurons by mean activation), sparsity curve, co-activation bricks. Loss: probe
cross-entropy and embedding distortion, as MiniLM has no MLM head.
Writes docs/results/bricks.md and docs/results/bricks/*.svg (or next to --out).
Defaults (about 25 min on 2 cores): every train (640) and test (160) example per functionality, batch 32,
top 5%, 16 bricks, 10 random draws, 50 permutations; sparsity at k = 0, 30, 50, 70, 90%.
A smoke run: --train-per-function 40 --test-per-function 10 --random-draws 2 --permutations 3 --out /tmp/bricks";

/// The controls' sizes: random draws per set and label permutations.
struct Controls {
    random_draws: usize,
    permutations: usize,
}

fn parse(args: &[String]) -> AnyResult<Option<(Plan, Controls)>> {
    const CMD: &str = "experiment bricks";
    let Some(f) = Flags::parse_options(
        CMD,
        args,
        &[
            "--train-per-function",
            "--test-per-function",
            "--batch",
            "--top-fraction",
            "--bricks",
            "--random-draws",
            "--permutations",
            "--profile",
            "--out",
        ],
        &[],
        BRICKS_HELP,
    )?
    else {
        return Ok(None);
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let plan = Plan {
        train_per_function: f.parsed_or("--train-per-function", 640)?,
        test_per_function: f.parsed_or("--test-per-function", 160)?,
        batch: f.parsed_or("--batch", 32)?,
        top_fraction: f.parsed_or("--top-fraction", 0.05)?,
        bricks: f.parsed_or("--bricks", 16)?,
        profile: f
            .path("--profile")
            .unwrap_or_else(|| root.join("target/bricks/minilm_functional_profile.safetensors")),
        out: f
            .path("--out")
            .unwrap_or_else(|| root.join("docs/results/bricks.md")),
    };
    if plan.batch == 0 || plan.train_per_function < 2 || plan.test_per_function < 1 {
        return usage(
            CMD,
            "--batch, --train-per-function (>= 2) and --test-per-function must be positive",
        );
    }
    let controls = Controls {
        random_draws: f.parsed_or("--random-draws", 10)?,
        permutations: f.parsed_or("--permutations", 50)?,
    };
    if controls.random_draws < 2 || controls.permutations < 1 {
        return usage(
            CMD,
            "--random-draws must be at least 2 and --permutations at least 1",
        );
    }
    Ok(Some((plan, controls)))
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some((plan, controls)) = parse(args)? else {
        return Ok(());
    };
    let start = Instant::now();
    let device = tensor_core::best();
    let source = ModelSource::resolve(None)?;
    let mut enc = SentenceEncoder::from_folder(&source.dir, device)?;
    let (train, test) = load_corpus(&plan)?;
    eprintln!(
        "bricks: {} train / {} test examples, device {device:?}, {} threads",
        train.len(),
        test.len(),
        tch::get_num_threads()
    );
    let train_b = batches(&enc, &train, plan.batch)?;
    // Test batches grouped by functionality (length-sorted within each), so
    // that one functionality's examples are one contiguous block of every
    // evaluation and the controls can score that block alone.
    let mut test_b = Vec::new();
    let mut blocks = Vec::new(); // (batch range, example range) per functionality
    let mut by_f: Vec<Vec<Example>> = names().iter().map(|_| Vec::new()).collect();
    for e in test {
        by_f[e.label].push(e);
    }
    let mut first_example = 0;
    for examples in &by_f {
        let start = test_b.len();
        test_b.extend(batches(&enc, examples, plan.batch)?);
        blocks.push((
            start..test_b.len(),
            first_example..first_example + examples.len(),
        ));
        first_example += examples.len();
    }

    // 1. Profile (streamed to safetensors), collecting the intact train embeddings on the way.
    let t = Instant::now();
    let (summary, labels, train_emb) = profile_with_embeddings(
        &enc.model,
        &train_b,
        &plan.profile,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )?;
    let profile_s = t.elapsed().as_secs_f64();
    eprintln!(
        "profiled {} examples x {} neurons in {profile_s:.0} s ({:.1} examples/s) -> {}",
        summary.examples,
        summary.neurons,
        summary.examples_per_second(),
        plan.profile.display()
    );

    // 2. FuncScores from the file (layer blocks concatenated).
    let profile = Profile::open(&plan.profile)?;
    let p = profile.matrix()?;
    let scores = func_scores(
        &p,
        &profile.labels,
        &profile.functions,
        &AttributionConfig::default(),
    )?;
    let sites = profile.sites.clone();
    let t = Instant::now();
    let null = func_score_null(
        &p,
        &profile.labels,
        &profile.functions,
        &AttributionConfig::default(),
        controls.permutations,
        17,
        |s| Ok(top_set_mean(s, &sites, plan.top_fraction)),
    )?;
    eprintln!(
        "label-permutation null: {} permutations in {:.0} s",
        controls.permutations,
        t.elapsed().as_secs_f64()
    );

    // 3. Sets and overlap.
    let set_cfg = SetConfig {
        top_fraction: plan.top_fraction,
        ..SetConfig::default()
    };
    let sets = functional_sets(&scores, &sites, &set_cfg, None)?;
    let overlap = overlap_matrix(&sets, OverlapFormula::OverSize)?;
    let raw_sets = functional_sets(
        &scores,
        &sites,
        &SetConfig {
            resident_rule: configurable_bricks::ResidentRule::None,
            ..set_cfg
        },
        None,
    )?;
    let baseline = random_overlap_baseline(
        &raw_sets,
        &sites,
        TopScope::PerLayer,
        OverlapFormula::OverSize,
        200,
        1,
    )?;
    let raw_overlap = overlap_matrix(&raw_sets, OverlapFormula::OverSize)?;

    // 4. Probe on intact train embeddings; intact test embeddings.
    let probe = train_probe(&train_emb, &labels)?;
    let test_labels = label_tensor(&test_b);
    let clean = embed(&enc.model, &test_b)?.to_device(Device::Cpu);
    let probe_acc = f64::try_from(
        clean
            .linear(&probe.0, Some(&probe.1))
            .argmax(-1, false)
            .eq_tensor(&test_labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float),
    )?;
    let distortion_log = RefCell::new(Vec::new());
    let ce_log: RefCell<Vec<Vec<f64>>> = RefCell::new(Vec::new());
    let mut evals = 0;
    let mut eval = |m: &dyn Module| -> configurable_bricks::Result<Vec<f64>> {
        let e = embed(m, &test_b)?.to_device(Device::Cpu);
        let (ce, dist) = losses(&e, &clean, &test_labels, &probe);
        distortion_log.borrow_mut().push(dist);
        ce_log.borrow_mut().push(Vec::<f64>::try_from(
            probe_ce(&e, &test_labels, &probe).to_kind(Kind::Double),
        )?);
        evals += 1;
        eprintln!(
            "  eval {evals} ({:.0} s): probe CE {:?}",
            start.elapsed().as_secs_f64(),
            ce.iter()
                .map(|x| (x * 1e4).round() / 1e4)
                .collect::<Vec<_>>()
        );
        Ok(ce)
    };

    // 5. Perturbation and sparsity.
    let pert = perturbation_matrix(&mut enc.model, &sites, &names(), &sets, &mut eval)?;
    let pert_dist: Vec<Vec<f64>> = distortion_log.borrow_mut().drain(..).collect();
    let pert_ce: Vec<Vec<f64>> = ce_log.borrow_mut().drain(..).collect();
    let example_ranges: Vec<_> = blocks.iter().map(|(_, e)| e.clone()).collect();
    let matrix = absolute_matrix(&pert_ce, &example_ranges)?;

    // Controls: per functionality, S_f against random sets with its per-layer
    // counts and against the busiest neurons, on that functionality's test examples.
    let mean_act = Vec::<f64>::try_from(p.mean_dim(0, false, Kind::Double))?;
    let top_sets = matched_top_sets(&sets, &sites, TopScope::PerLayer, &mean_act)?;
    let mut rng = SplitMix64::new(29);
    let draws: Vec<Vec<NeuronSet>> = (0..controls.random_draws)
        .map(|_| matched_random_sets(&sets, &sites, TopScope::PerLayer, &mut rng))
        .collect::<configurable_bricks::Result<_>>()?;
    let mut control_rows = Vec::new();
    for (fi, name) in names().iter().enumerate() {
        let (batch_range, example_range) = blocks[fi].clone();
        let fb = &test_b[batch_range];
        let labels_f =
            test_labels.slice(0, example_range.start as i64, example_range.end as i64, 1);
        let mut candidates: Vec<NeuronSet> = draws.iter().map(|d| d[fi].clone()).collect();
        candidates.push(top_sets[fi].clone());
        let per = zeroed_losses(&mut enc.model, &sites, &candidates, |m| {
            let e = embed(m, fb)?.to_device(Device::Cpu);
            Ok(Vec::<f64>::try_from(
                probe_ce(&e, &labels_f, &probe).to_kind(Kind::Double),
            )?)
        })?;
        eprintln!(
            "  controls for {name} ({:.0} s)",
            start.elapsed().as_secs_f64()
        );
        // Intact and S_f zeroed: this block of the perturbation matrix's evaluations.
        let (random, top) = per.split_at(controls.random_draws);
        control_rows.push(ControlRow::new(
            name,
            &pert_ce[0][example_range.clone()],
            &pert_ce[1 + fi][example_range],
            random,
            &top[0],
        )?);
    }
    let fractions = [0.0, 0.3, 0.5, 0.7, 0.9];
    let mut curves: Vec<Curve> = Vec::new();
    for ind in [Indicator::Activation, Indicator::OutputMagnitude] {
        let c = sparsity_curve(&mut enc.model, &sites, &fractions, ind, 5, &mut eval)?;
        let d: Vec<Vec<f64>> = distortion_log.borrow_mut().drain(..).collect();
        curves.push((ind, c, d));
    }
    let _ = eval;
    let mut norm_ind = NormalisedIndicator::new("*:act", &[0.05, 0.1, 0.2, 0.5]);
    // Two batches of every functionality.
    let sink_batches = blocks
        .iter()
        .flat_map(|(r, _)| &test_b[r.start..r.end.min(r.start + 2)]);
    let mut sink: Box<dyn tensor_core::module::ActivationSink> = Box::new(norm_ind);
    let lost = "the normalised-indicator sink left the context";
    for b in sink_batches {
        let any: &mut dyn std::any::Any = sink.as_mut();
        any.downcast_mut::<NormalisedIndicator>()
            .ok_or(lost)?
            .set_mask(&b.mask);
        let mut ctx = Context::eval()
            .with_mask(b.mask.shallow_clone())
            .with_sink(sink);
        let _last_hidden = tch::no_grad(|| enc.model.forward(&b.ids, &mut ctx))?;
        sink = ctx.take_sink().ok_or(lost)?;
    }
    let any: Box<dyn std::any::Any> = sink;
    norm_ind = *any.downcast::<NormalisedIndicator>().map_err(|_| lost)?;

    // 6. Co-activation bricks per layer vs random partition.
    let mut part_rows = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let act = profile.layer(i)?;
        let part = coactivation_partition(
            &act,
            &PartitionConfig {
                bricks: plan.bricks,
                max_iter: 30,
                seed: i as u64,
            },
        )?;
        let mut ids: Vec<usize> = (0..s.d_ff as usize).map(|n| n % plan.bricks).collect();
        SplitMix64::new(100 + i as u64).shuffle(&mut ids);
        let random = Partition {
            brick_of: ids,
            bricks: plan.bricks,
            objective: f64::NAN,
            iterations: 0,
        };
        part_rows.push((
            within_brick_correlation(&act, &part)?,
            within_brick_correlation(&act, &random)?,
            part.iterations,
        ));
    }

    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let md = report(
        &plan,
        &summary,
        profile_s,
        &scores,
        &sites,
        &sets,
        &overlap,
        &raw_overlap,
        &baseline,
        &pert,
        &matrix,
        &pert_dist,
        &null,
        &control_rows,
        &controls,
        &curves,
        &norm_ind,
        &part_rows,
        probe_acc,
        minutes,
    )?;
    write(&plan.out, &md)
}

/// Per functionality: the mean FuncScore of its top `fraction` of neurons in
/// every layer (the raw top set, before residents are removed).
fn top_set_mean(s: &FuncScores, sites: &[configurable_bricks::FfnSite], fraction: f64) -> Vec<f64> {
    (0..s.functions.len())
        .map(|f| {
            let col = s.column(f);
            let (mut sum, mut n) = (0.0, 0usize);
            for site in sites {
                let mut v = col[site.offset as usize..(site.offset + site.d_ff) as usize].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                let k = ((v.len() as f64 * fraction).round() as usize).clamp(1, v.len());
                sum += v[..k].iter().sum::<f64>();
                n += k;
            }
            sum / n as f64
        })
        .collect()
}

const RESAMPLES: usize = 2000;

/// `Δ(f → g)`: probe CE with `S_f` zeroed minus intact, on `g`'s test
/// examples (`examples_of[g]`), with a bootstrap interval. `per[0]` is the
/// intact model's per-example CE, `per[1 + f]` the model with `S_f` zeroed.
fn absolute_matrix(
    per: &[Vec<f64>],
    examples_of: &[std::ops::Range<usize>],
) -> AnyResult<Vec<Vec<Bootstrap>>> {
    let nf = examples_of.len();
    if per.len() != nf + 1 {
        return Err(format!(
            "perturbation: {} evaluations, expected {}",
            per.len(),
            nf + 1
        )
        .into());
    }
    (0..nf)
        .map(|f| {
            examples_of
                .iter()
                .enumerate()
                .map(|(g, r)| {
                    bootstrap_mean_diff(
                        &per[1 + f][r.clone()],
                        &per[0][r.clone()],
                        RESAMPLES,
                        (10 * f + g) as u64,
                    )
                    .map_err(Into::into)
                })
                .collect()
        })
        .collect()
}

/// One functionality's set against its two controls, on its own test examples.
struct ControlRow {
    name: String,
    examples: usize,
    /// `S_f` zeroed minus intact.
    own: Bootstrap,
    /// Random sets zeroed (per example, the mean over draws) minus intact.
    random: Bootstrap,
    /// The busiest neurons zeroed minus intact.
    top: Bootstrap,
    vs_random: Bootstrap,
    vs_random_p: f64,
    vs_top: Bootstrap,
    vs_top_p: f64,
    /// Random draws whose mean change is at least `S_f`'s.
    draws_at_least: usize,
    draws: usize,
}

impl ControlRow {
    /// Per-example probe CE of f's test examples: intact, with `S_f` zeroed,
    /// with each random draw zeroed, with the busiest neurons zeroed.
    fn new(
        name: &str,
        intact: &[f64],
        own: &[f64],
        random_sets: &[Vec<f64>],
        top: &[f64],
    ) -> AnyResult<Self> {
        let draws = random_sets.len();
        if draws == 0 {
            return Err(format!("controls for {name}: no random draws").into());
        }
        let n = intact.len();
        if let Some(r) = random_sets.iter().find(|r| r.len() != n) {
            return Err(format!("controls for {name}: {} and {n} examples", r.len()).into());
        }
        let random: Vec<f64> = (0..n)
            .map(|i| random_sets.iter().map(|r| r[i]).sum::<f64>() / draws as f64)
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let own_mean = mean(own);
        let b = |a: &[f64], c: &[f64], seed: u64| bootstrap_mean_diff(a, c, RESAMPLES, seed);
        Ok(Self {
            name: name.to_owned(),
            examples: n,
            own: b(own, intact, 1)?,
            random: b(&random, intact, 2)?,
            top: b(top, intact, 3)?,
            vs_random: b(own, &random, 4)?,
            vs_random_p: paired_t(own, &random)?.p,
            vs_top: b(own, top, 5)?,
            vs_top_p: paired_t(own, top)?.p,
            draws_at_least: random_sets.iter().filter(|r| mean(r) >= own_mean).count(),
            draws,
        })
    }

    fn specific(&self) -> bool {
        verdict(&self.vs_random, self.vs_random_p) == HURTS_MORE
            && verdict(&self.vs_top, self.vs_top_p) == HURTS_MORE
    }
}

const HURTS_MORE: &str = "hurts more";

/// `hurts more` / `hurts less` when the bootstrap interval excludes 0 and
/// the paired t-test over examples rejects at 5%; otherwise no significant difference.
fn verdict(b: &Bootstrap, p: f64) -> &'static str {
    if b.low > 0.0 && p < 0.05 {
        HURTS_MORE
    } else if b.high < 0.0 && p < 0.05 {
        "hurts less"
    } else {
        "no significant difference"
    }
}

fn fmt_b(b: &Bootstrap) -> String {
    format!("{:+.3} [{:+.3}, {:+.3}]", b.diff, b.low, b.high)
}

fn write(out: &Path, md: &str) -> AnyResult<()> {
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    recipes::report::write(out, md)
}

fn write_svg(dir: &Path, name: &str, body: &str) -> AnyResult<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    tensor_core::io::write_atomic(&path, |tmp| {
        std::fs::write(tmp, body).map_err(|source| tensor_core::Error::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    plan: &Plan,
    summary: &configurable_bricks::profile::ProfileSummary,
    profile_s: f64,
    scores: &FuncScores,
    sites: &[configurable_bricks::FfnSite],
    sets: &[NeuronSet],
    overlap: &[Vec<f64>],
    raw_overlap: &[Vec<f64>],
    baseline: &[Vec<f64>],
    pert: &Perturbation,
    matrix: &[Vec<Bootstrap>],
    pert_dist: &[Vec<f64>],
    null: &NullDistribution,
    control_rows: &[ControlRow],
    controls: &Controls,
    curves: &[Curve],
    norm_ind: &NormalisedIndicator,
    part_rows: &[(f64, f64, usize)],
    probe_acc: f64,
    minutes: f64,
) -> AnyResult<String> {
    let fig_dir = plan.out.with_extension("");
    let fig_rel = fig_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let f = names();
    let layers: Vec<String> = (0..sites.len()).map(|i| format!("layer {i}")).collect();
    let specific: Vec<&ControlRow> = control_rows.iter().filter(|r| r.specific()).collect();
    let above_null: Vec<usize> = (0..f.len()).filter(|&i| null.p_value(i) < 0.05).collect();
    let command = "cargo xtask experiment bricks";
    let budget = format!(
        "{} train / {} test examples per functionality, {} random draws, {} permutations, {minutes:.1} min on a 2-core CPU",
        plan.train_per_function.min(640),
        plan.test_per_function.min(160),
        controls.random_draws,
        controls.permutations
    );
    let headline = format!(
        "zeroing a functionality's top-{:.0}% FFN neurons hurts it significantly more than both controls (same-shape random sets, the busiest neurons) for {}/{} functionalities{}; Δ probe CE against the random sets: {}; FuncScore of the top sets above the label-permutation null for {}/{}",
        plan.top_fraction * 100.0,
        specific.len(),
        f.len(),
        if specific.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                specific
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        control_rows
            .iter()
            .map(|r| format!("{} {}", r.name, fmt_b(&r.vs_random)))
            .collect::<Vec<_>>()
            .join(", "),
        above_null.len(),
        f.len()
    );
    let mut md = crate::index::block(command, &budget, &headline);
    writeln!(
        md,
        "# Functional bricks in all-MiniLM-L6-v2 (configurable-bricks)\n"
    )?;
    writeln!(
        md,
        "Command: `{command}` (options: `--train-per-function {} --test-per-function {} --batch {} --top-fraction {} --bricks {} --random-draws {} --permutations {}`).\n\nBudget: {budget}; {} intra-op threads, the machine shared with builds at times, so times are upper bounds.\n",
        plan.train_per_function,
        plan.test_per_function,
        plan.batch,
        plan.top_fraction,
        plan.bricks,
        controls.random_draws,
        controls.permutations,
        tch::get_num_threads()
    )?;
    writeln!(md, "**Headline.** {headline}.\n")?;
    writeln!(
        md,
        "Data: `data/functional_corpus` (5 functionalities; {} train examples profiled, {} test examples scored). Model: all-MiniLM-L6-v2, 6 FFNs × 1536 GELU neurons = {} neurons. Indicator: |activation|, averaged over each example's non-padding tokens. Profile: {} examples in {profile_s:.0} s ({:.1} examples/s), streamed to safetensors.\n",
        summary.examples,
        control_rows.iter().map(|r| r.examples).sum::<usize>(),
        summary.neurons,
        summary.examples,
        summary.examples_per_second()
    )?;
    writeln!(
        md,
        "**Loss.** The packaged MiniLM has no masked-LM head, so the survey's perplexity is replaced by two stated alternatives measured on the test split: (a) *probe CE*, the cross-entropy (nats) of a linear 5-way functionality probe trained on the intact model's normalised sentence embeddings (train split; intact test accuracy {:.1}%), and (b) *embedding distortion*, `1 − cos(e_masked, e_intact)` of the sentence embedding (0 when intact). Changes are absolute (pruned − intact), averaged over the measured functionality's test examples, with a 95% percentile-bootstrap interval over those examples ({RESAMPLES} resamples); the survey's percentages are not used because the intact probe CE is close to 0.\n",
        100.0 * probe_acc
    )?;

    // FuncScore distribution.
    writeln!(md, "## FuncScore (AP) per layer\n")?;
    writeln!(
        md,
        "Chance level of AP(y) is the positive rate, 0.20. Per layer and functionality: mean over the 1536 neurons / mean of the best 5‰ (8 neurons) / best neuron.\n"
    )?;
    writeln!(md, "| layer | {} |", f.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(f.len()))?;
    let mut best = vec![vec![0.0; f.len()]; sites.len()];
    for (li, s) in sites.iter().enumerate() {
        let mut row = format!("| {li} |");
        for (fi, best_f) in best[li].iter_mut().enumerate() {
            let col = scores.column(fi);
            let mut v: Vec<f64> = col[s.offset as usize..(s.offset + s.d_ff) as usize].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let k = ((v.len() as f64) * 0.005).round().max(1.0) as usize;
            let top = v[..k].iter().sum::<f64>() / k as f64;
            *best_f = v[0];
            write!(row, " {mean:.3} / {top:.3} / {:.3} |", v[0])?;
        }
        writeln!(md, "{row}")?;
    }
    let all: Vec<f64> = {
        let mut a = scores.scores.clone();
        a.sort_by(|x, y| x.total_cmp(y));
        a
    };
    writeln!(
        md,
        "\nAll neuron × functionality scores: median {:.3}, 95th percentile {:.3}, 99.9th {:.3}; share above 0.8: {:.2}%.\n",
        quantile(&all, 0.5),
        quantile(&all, 0.95),
        quantile(&all, 0.999),
        100.0 * all.iter().filter(|&&x| x > 0.8).count() as f64 / all.len() as f64
    )?;
    write_svg(
        &fig_dir,
        "funcscore_best.svg",
        &svg::heatmap(
            "Best neuron's FuncScore (AP) per layer",
            &layers,
            &f,
            &best,
            false,
            |v| format!("{v:.2}"),
        ),
    )?;
    writeln!(
        md,
        "![best FuncScore per layer]({fig_rel}/funcscore_best.svg)\n"
    )?;

    // Label-permutation null.
    writeln!(md, "## FuncScore against the label-permutation null\n")?;
    writeln!(
        md,
        "The statistic: mean FuncScore of the functionality's top {:.0}% of neurons in every layer. The null: the same statistic after shuffling the functionality labels across the profiled examples ({} permutations, seeded; the profile is kept). p = (1 + #null ≥ observed) / (1 + permutations).\n",
        plan.top_fraction * 100.0,
        null.null.len()
    )?;
    writeln!(
        md,
        "| functionality | observed | null mean | null 95th percentile | p | verdict |\n|---|---|---|---|---|---|"
    )?;
    for (i, name) in f.iter().enumerate() {
        let pv = null.p_value(i);
        writeln!(
            md,
            "| {name} | {:.3} | {:.3} | {:.3} | {} | {} |",
            null.observed[i],
            null.null_mean(i),
            null.quantile(i, 0.95),
            fmt_p(pv),
            if pv < 0.05 {
                "above the null"
            } else {
                "not distinguishable from the null"
            }
        )?;
    }
    writeln!(md)?;

    // Overlap.
    writeln!(
        md,
        "## Top-{:.0}% functional sets: overlap O(f,g) = |S_f ∩ S_g| / |S_f|\n",
        plan.top_fraction * 100.0
    )?;
    writeln!(
        md,
        "Sets chosen per layer, then resident neurons (in all five sets) removed; set sizes {:?}. Random sets of the same sizes give {:.3} on average (200 draws).\n",
        sets.iter().map(Vec::len).collect::<Vec<_>>(),
        baseline[0][1]
    )?;
    writeln!(md, "| S_f \\ S_g | {} |", f.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(f.len()))?;
    for (i, r) in overlap.iter().enumerate() {
        writeln!(
            md,
            "| {} | {} |",
            f[i],
            r.iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(" | ")
        )?;
    }
    let off: Vec<f64> = (0..f.len())
        .flat_map(|i| (0..f.len()).filter(move |&j| j != i).map(move |j| (i, j)))
        .map(|(i, j)| raw_overlap[i][j])
        .collect();
    writeln!(
        md,
        "\nBefore removing residents, off-diagonal overlap ranges {:.3}–{:.3} (mean {:.3}).\n",
        off.iter().cloned().fold(f64::INFINITY, f64::min),
        off.iter().cloned().fold(0.0, f64::max),
        off.iter().sum::<f64>() / off.len() as f64
    )?;
    write_svg(
        &fig_dir,
        "overlap.svg",
        &svg::heatmap(
            "Overlap of top-5% sets (random: 0.05)",
            &f,
            &f,
            overlap,
            false,
            |v| format!("{v:.3}"),
        ),
    )?;
    writeln!(md, "![overlap]({fig_rel}/overlap.svg)\n")?;

    // Perturbation.
    writeln!(
        md,
        "## Perturbation: zero S_f (rows), loss on g (columns)\n"
    )?;
    writeln!(
        md,
        "Intact probe CE per functionality: {}.\n",
        pert.base
            .iter()
            .zip(&f)
            .map(|(b, n)| format!("{n} {b:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        md,
        "**Probe CE change** (nats, L_pruned − L on the measured functionality's test examples, 95% bootstrap interval):\n"
    )?;
    writeln!(md, "| zeroed \\ measured | {} |", f.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(f.len()))?;
    let abs: Vec<Vec<f64>> = matrix
        .iter()
        .map(|r| r.iter().map(|b| b.diff).collect())
        .collect();
    for (i, row) in matrix.iter().enumerate() {
        writeln!(
            md,
            "| {} | {} |",
            f[i],
            row.iter().map(fmt_b).collect::<Vec<_>>().join(" | ")
        )?;
    }
    // pert_dist[0] is the intact eval; rows 1.. are the zeroed sets.
    writeln!(md, "\n**Embedding distortion 1 − cos** (×1000):\n")?;
    writeln!(md, "| zeroed \\ measured | {} |", f.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(f.len()))?;
    let dist: Vec<Vec<f64>> = pert_dist
        .iter()
        .skip(1)
        .map(|r| r.iter().map(|v| v * 1000.0).collect())
        .collect();
    for (i, r) in dist.iter().enumerate() {
        writeln!(
            md,
            "| {} | {} |",
            f[i],
            r.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(" | ")
        )?;
    }
    let dom = pert.diagonal_dominant_columns();
    let dom_d: Vec<bool> = (0..f.len())
        .map(|g| (0..f.len()).all(|r| r == g || dist[g][g] > dist[r][g]))
        .collect();
    writeln!(
        md,
        "\nDiagonal dominant (zeroing S_g hurts g more than zeroing any other set) — probe CE: {}/5 columns ({}); distortion: {}/5 columns ({}).\n",
        dom.iter().filter(|&&d| d).count(),
        f.iter()
            .zip(&dom)
            .filter(|(_, d)| **d)
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        dom_d.iter().filter(|&&d| d).count(),
        f.iter()
            .zip(&dom_d)
            .filter(|(_, d)| **d)
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    write_svg(
        &fig_dir,
        "perturbation_ce.svg",
        &svg::heatmap(
            "Probe CE change, nats (row: zeroed set, column: measured)",
            &f,
            &f,
            &abs,
            true,
            |v| format!("{v:+.2}"),
        ),
    )?;
    write_svg(
        &fig_dir,
        "perturbation_distortion.svg",
        &svg::heatmap(
            "Embedding distortion ×1000 (row: zeroed set)",
            &f,
            &f,
            &dist,
            false,
            |v| format!("{v:.1}"),
        ),
    )?;
    writeln!(
        md,
        "![perturbation CE]({fig_rel}/perturbation_ce.svg) ![perturbation distortion]({fig_rel}/perturbation_distortion.svg)\n"
    )?;

    // Controls.
    writeln!(md, "## Each set against two controls\n")?;
    writeln!(
        md,
        "For each functionality f, on f's {} test examples: zero S_f; zero {} random sets with S_f's count in every layer (per example, the mean over draws); zero the busiest neurons (highest mean |activation| over all training examples) with S_f's count in every layer. Δ = probe CE change (nats) with a 95% bootstrap interval; the paired t-test runs over examples. `hurts more` needs the interval to exclude 0 and p < 0.05. *Draws ≥* counts the random draws whose mean change reaches S_f's.\n",
        control_rows.first().map_or(0, |r| r.examples),
        controls.random_draws
    )?;
    writeln!(
        md,
        "| f | Δ zero S_f | Δ random (mean) | Δ busiest | S_f − random | p | verdict | draws ≥ | S_f − busiest | p | verdict | specific |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in control_rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} |",
            r.name,
            fmt_b(&r.own),
            fmt_b(&r.random),
            fmt_b(&r.top),
            fmt_b(&r.vs_random),
            fmt_p(r.vs_random_p),
            verdict(&r.vs_random, r.vs_random_p),
            r.draws_at_least,
            r.draws,
            fmt_b(&r.vs_top),
            fmt_p(r.vs_top_p),
            verdict(&r.vs_top, r.vs_top_p),
            if r.specific() { "yes" } else { "no" }
        )?;
    }
    writeln!(md)?;

    // Sparsity.
    writeln!(md, "## Sparsity\n")?;
    writeln!(
        md,
        "Share of (token, neuron) pairs whose |a| / max over the layer's neurons for that token is below 0.05 / 0.1 / 0.2 / 0.5 ({} test batches): {}.\n",
        10,
        norm_ind
            .shares()
            .iter()
            .map(|s| format!("{:.1}%", s * 100.0))
            .collect::<Vec<_>>()
            .join(" / ")
    )?;
    writeln!(
        md,
        "Masking the lowest k% of neurons per token in every layer (mean over the five functionalities):\n"
    )?;
    writeln!(
        md,
        "| k | probe CE (by act) | distortion ×1000 (by act) | probe CE (by act·‖W_O‖) | distortion ×1000 (by act·‖W_O‖) |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut series = Vec::new();
    for (i, frac) in curves[0].1.iter().map(|p| p.fraction).enumerate() {
        let c = |k: usize| (mean(&curves[k].1[i].losses), mean(&curves[k].2[i]) * 1000.0);
        let (a, b) = (c(0), c(1));
        writeln!(
            md,
            "| {:.0}% | {:.4} | {:.2} | {:.4} | {:.2} |",
            frac * 100.0,
            a.0,
            a.1,
            b.0,
            b.1
        )?;
    }
    for (ind, pts, d) in curves {
        let name = match ind {
            Indicator::Activation => "by |a|",
            Indicator::OutputMagnitude => "by |a|·‖W_O‖",
        };
        series.push((
            format!("distortion, {name}"),
            pts.iter()
                .zip(d)
                .map(|(p, d)| (p.fraction * 100.0, mean(d) * 1000.0))
                .collect::<Vec<_>>(),
        ));
    }
    write_svg(
        &fig_dir,
        "sparsity.svg",
        &svg::line_chart(
            "Masking the lowest k% neurons per token",
            "k (% of neurons masked)",
            "embedding distortion ×1000",
            &series,
        ),
    )?;
    writeln!(md, "\n![sparsity]({fig_rel}/sparsity.svg)\n")?;

    // Partition.
    writeln!(md, "## Co-activation bricks\n")?;
    writeln!(
        md,
        "Balanced k-means of each layer's neurons on their (centred, normalised) per-example activation profiles into {} bricks of {}; mean correlation of neuron pairs within a brick, against a random balanced partition:\n",
        plan.bricks,
        sites[0].d_ff as usize / plan.bricks
    )?;
    writeln!(
        md,
        "| layer | within-brick corr. (co-activation) | within-brick corr. (random) | k-means iterations |"
    )?;
    writeln!(md, "|---|---|---|---|")?;
    for (i, (a, r, it)) in part_rows.iter().enumerate() {
        writeln!(md, "| {i} | {a:.3} | {r:.3} | {it} |")?;
    }
    writeln!(
        md,
        "\n## Survey (Llama-3-8B / Mistral-7B, arXiv 2409.02877 §4) next to ours\n"
    )?;
    writeln!(md, "| finding | survey | MiniLM here |\n|---|---|---|")?;
    writeln!(
        md,
        "| sparsity | 80% of neurons have normalised indicator < 0.2; masking ~70% (activation) / ~80% (output magnitude) costs almost nothing | {:.0}% below 0.2; see the sparsity table |",
        norm_ind.shares()[2] * 100.0
    )?;
    writeln!(
        md,
        "| specialisation | best neuron per layer > 0.8 for Coding, Math, Translation in most layers; mean near random | best neuron per layer: see the FuncScore table and figure |"
    )?;
    writeln!(
        md,
        "| overlap | 0.00–0.04 vs random 0.05; Linguistic–Translation 0.08–0.09 | see the overlap table |"
    )?;
    writeln!(
        md,
        "| perturbation | diagonal dominant (Coding +112%, Math +147%, Translation +444% ΔPPL; off-diagonal 3–26%); no control sets reported | probe CE: {}/5 columns diagonal-dominant; distortion: {}/5; hurts its functionality more than both controls: {}/5 |",
        dom.iter().filter(|&&d| d).count(),
        dom_d.iter().filter(|&&d| d).count(),
        specific.len()
    )?;
    writeln!(
        md,
        "| attribution | FuncScore (AP) picks specialised neurons; no null reported | top sets above the label-permutation null: {}/5 |",
        above_null.len()
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use recipes::flags::exit_code;

    use crate::test_args as args;

    #[test]
    fn defaults_score_every_example_and_bad_flags_are_usage_errors() {
        let (plan, c) = parse(&[]).unwrap().unwrap();
        assert_eq!(
            (plan.train_per_function, plan.test_per_function),
            (640, 160)
        );
        assert_eq!((c.random_draws, c.permutations), (10, 50));
        for bad in [
            &["--random-draws", "1"][..],
            &["--permutations", "0"],
            &["--batch", "0"],
            &["--random-draws", "ten"],
        ] {
            let e = parse(&args(bad)).err().expect("an error");
            assert_eq!(exit_code(e.as_ref()), 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn verdicts_need_the_interval_and_the_test() {
        let b = |low, high| Bootstrap {
            diff: (low + high) / 2.0,
            low,
            high,
        };
        assert_eq!(verdict(&b(0.1, 0.3), 0.01), HURTS_MORE);
        assert_eq!(verdict(&b(0.1, 0.3), 0.2), "no significant difference");
        assert_eq!(verdict(&b(-0.1, 0.3), 0.01), "no significant difference");
        assert_eq!(verdict(&b(-0.3, -0.1), 0.01), "hurts less");
    }

    #[test]
    fn control_rows_average_the_draws_per_example() {
        // intact, S_f, two random draws, busiest; four examples.
        let intact = vec![0.0; 4];
        let own = vec![1.0, 1.2, 0.8, 1.0];
        let random = vec![vec![0.1; 4], vec![0.3; 4]];
        let top = vec![0.0, 0.1, 0.0, 0.1];
        let r = ControlRow::new("code", &intact, &own, &random, &top).unwrap();
        assert!((r.own.diff - 1.0).abs() < 1e-12);
        assert!((r.random.diff - 0.2).abs() < 1e-12);
        assert!((r.vs_random.diff - 0.8).abs() < 1e-12);
        assert!((r.top.diff - 0.05).abs() < 1e-12);
        assert_eq!((r.draws_at_least, r.draws), (0, 2));
        assert!(r.specific());
        assert!(ControlRow::new("code", &intact, &own, &[], &top).is_err());
        assert!(ControlRow::new("code", &intact, &own, &[vec![0.1; 3]], &top).is_err());
    }
}
