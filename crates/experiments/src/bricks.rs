//! `cargo xtask experiment bricks`: the real analysis of issue 9
//! (configurable-bricks) on all-MiniLM-L6-v2 and `data/functional_corpus`
//! (5 functionalities: code, prose, translation, math, shell).
//!
//! 1. Profile every FFN (6 × 1536 neurons) on the train split: per example,
//!    the mean |activation| over non-padding tokens, streamed to a
//!    safetensors file (`--profile`).
//! 2. FuncScore = AP per neuron and functionality; distribution per layer.
//! 3. Top-5% functional sets per layer (resident neurons removed), overlap
//!    matrix vs the random baseline.
//! 4. Losses on the test split. MiniLM has no masked-LM head (the packaged
//!    sentence-transformers checkpoint ships the encoder only), so two stated
//!    alternatives replace the survey's perplexity:
//!    - **probe CE**: cross-entropy of a linear 5-way functionality probe
//!      trained on the intact model's sentence embeddings (train split);
//!    - **embedding distortion**: `1 − cos(e_masked, e_intact)` of the
//!      normalised mean-pooled sentence embedding (0 for the intact model).
//! 5. Perturbation matrix (zero S_f, loss on every g), sparsity curve (mask
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
    AttributionConfig, FuncScores, Indicator, NeuronSet, OverlapFormula, Perturbation, Profile,
    SetConfig, SparsityPoint, TopScope, func_scores, functional_sets, overlap_matrix,
    perturbation_matrix, sparsity_curve, svg,
};
use model_zoo::bert::SentenceEncoder;
use model_zoo::source::ModelSource;
use recipes::bricks::*;
use recipes::flags::{AnyResult, Flags, usage};
use tensor_core::rng::SplitMix64;
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::{Context, Module};

/// One sparsity curve: indicator, points, per-point distortions.
type Curve = (Indicator, Vec<SparsityPoint>, Vec<Vec<f64>>);

pub const BRICKS_HELP: &str = "usage: cargo xtask experiment bricks [--train-per-function N] [--test-per-function N] [--batch N]
                                [--top-fraction X] [--bricks K] [--profile FILE] [--out FILE]
Functional bricks of all-MiniLM-L6-v2 on data/functional_corpus (code, prose, translation, math, shell):
profiles every FFN neuron on the train split (mean |activation| per example, safetensors), FuncScore = AP,
top-5% sets and their overlap vs random, perturbation matrix and sparsity curve on the test split
(probe cross-entropy and embedding distortion, as MiniLM has no MLM head), co-activation bricks.
Writes docs/results/bricks.md and docs/results/bricks/*.svg (or next to --out).
Defaults (about 15 min on one loaded CPU thread): 400 of the 640 train and 60 of the 160 test examples\nper functionality, batch 32, top 5%, 16 bricks; sparsity at k = 0, 30, 50, 70, 90%.
A smoke run: --train-per-function 40 --test-per-function 10 --out /tmp/bricks/bricks.md";

fn parse(args: &[String]) -> AnyResult<Option<Plan>> {
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
        train_per_function: f.parsed_or("--train-per-function", 400)?,
        test_per_function: f.parsed_or("--test-per-function", 60)?,
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
    Ok(Some(plan))
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(plan) = parse(args)? else {
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
    let test_b = batches(&enc, &test, plan.batch)?;

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
    let test_labels = Tensor::from_slice(
        &test_b
            .iter()
            .flat_map(|b| b.labels.iter().map(|&l| l as i64))
            .collect::<Vec<_>>(),
    );
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
    let mut evals = 0;
    let mut eval = |m: &dyn Module| -> configurable_bricks::Result<Vec<f64>> {
        let e = embed(m, &test_b)?.to_device(Device::Cpu);
        let (ce, dist) = losses(&e, &clean, &test_labels, &probe);
        distortion_log.borrow_mut().push(dist);
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
    let fractions = [0.0, 0.3, 0.5, 0.7, 0.9];
    let mut curves: Vec<Curve> = Vec::new();
    for ind in [Indicator::Activation, Indicator::OutputMagnitude] {
        let c = sparsity_curve(&mut enc.model, &sites, &fractions, ind, 5, &mut eval)?;
        let d: Vec<Vec<f64>> = distortion_log.borrow_mut().drain(..).collect();
        curves.push((ind, c, d));
    }
    let _ = eval;
    let mut norm_ind = NormalisedIndicator::new("*:act", &[0.05, 0.1, 0.2, 0.5]);
    let sink_batches = &test_b[..test_b.len().min(10)];
    let mut sink: Box<dyn tensor_core::module::ActivationSink> = Box::new(norm_ind);
    for b in sink_batches {
        let any: &mut dyn std::any::Any = sink.as_mut();
        any.downcast_mut::<NormalisedIndicator>()
            .expect("our sink")
            .set_mask(&b.mask);
        let mut ctx = Context::eval()
            .with_mask(b.mask.shallow_clone())
            .with_sink(sink);
        let _last_hidden = tch::no_grad(|| enc.model.forward(&b.ids, &mut ctx))?;
        sink = ctx.take_sink().expect("sink stays in the context");
    }
    let any: Box<dyn std::any::Any> = sink;
    norm_ind = *any.downcast::<NormalisedIndicator>().expect("our sink");

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
        &pert_dist,
        &curves,
        &norm_ind,
        &part_rows,
        probe_acc,
        minutes,
    )?;
    write(&plan.out, &md)
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
    pert_dist: &[Vec<f64>],
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
    let mut md = String::new();
    writeln!(
        md,
        "# Functional bricks in all-MiniLM-L6-v2 (configurable-bricks, issue 9)\n"
    )?;
    writeln!(
        md,
        "Command: `cargo xtask experiment bricks` (with `OMP_NUM_THREADS=1`; options: `--train-per-function {} --test-per-function {} --batch {} --top-fraction {} --bricks {}`). Total {minutes:.1} min on a shared 2-core CPU.\n",
        plan.train_per_function, plan.test_per_function, plan.batch, plan.top_fraction, plan.bricks
    )?;
    writeln!(
        md,
        "Data: `data/functional_corpus` (5 functionalities × {} train / {} test examples). Model: all-MiniLM-L6-v2, 6 FFNs × 1536 GELU neurons = {} neurons. Indicator: |activation|, averaged over each example's non-padding tokens. Profile: {} examples in {profile_s:.0} s ({:.1} examples/s, one CPU thread), streamed to safetensors.\n",
        plan.train_per_function,
        plan.test_per_function,
        summary.neurons,
        summary.examples,
        summary.examples_per_second()
    )?;
    writeln!(
        md,
        "**Loss.** The packaged MiniLM has no masked-LM head, so the survey's perplexity is replaced by two stated alternatives measured on the test split: (a) *probe CE*, the cross-entropy of a linear 5-way functionality probe trained on the intact model's normalised sentence embeddings (train split; intact test accuracy {:.1}%), and (b) *embedding distortion*, `1 − cos(e_masked, e_intact)` of the sentence embedding (0 when intact).\n",
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
    writeln!(md, "**Probe CE change, %** ((L_pruned − L) / L):\n")?;
    writeln!(md, "| zeroed \\ measured | {} |", f.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(f.len()))?;
    let mut pct = vec![vec![0.0; f.len()]; f.len()];
    for (i, row) in pct.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            *cell = pert.delta_percent(i, j);
        }
        writeln!(
            md,
            "| {} | {} |",
            f[i],
            row.iter()
                .map(|v| format!("{v:+.1}"))
                .collect::<Vec<_>>()
                .join(" | ")
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
            "Probe CE change % (row: zeroed set, column: measured)",
            &f,
            &f,
            &pct,
            true,
            |v| format!("{v:+.0}"),
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
        "| perturbation | diagonal dominant (Coding +112%, Math +147%, Translation +444% ΔPPL; off-diagonal 3–26%) | probe CE: {}/5 columns diagonal-dominant; distortion: {}/5 |",
        dom.iter().filter(|&&d| d).count(),
        dom_d.iter().filter(|&&d| d).count()
    )?;
    Ok(md)
}
