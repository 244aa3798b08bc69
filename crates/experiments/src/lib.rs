//! The real-task experiments behind `docs/results/`, run by
//! `cargo xtask experiment NAME [--out DIR] [options]` and never in CI.
//!
//! Each experiment composes `model-zoo`'s architectures with one method crate
//! through the `recipes` crate (the same compositions the `modular` binary
//! runs), trains every arm under the same seeds, scores the full test sets
//! and writes one results page whole. Every comparison on a page goes through
//! [`stats`]: a paired difference with a 95% interval over seeds, a paired
//! test over examples, and a verdict.
//!
//! - [`sentiment`]: `emoe` (dense vs EMoE, LoRA vs LoRA + EMoE) and `pet`
//!   (full fine-tuning, LoRA, a bottleneck adapter, VL-PET's granularities,
//!   LoRA + G) on the sentiment domains;
//! - [`moe`]: the `moe-router` real task;
//! - [`merge`]: orthogonal adaptation and merging;
//! - [`m2mkd`]: module-to-module distillation;
//! - [`bricks`]: neuron profiling and functional bricks;
//! - [`index`]: `docs/results/README.md`, generated from the pages' headlines.

pub mod bricks;
pub mod index;
pub mod m2mkd;
pub mod merge;
pub mod moe;
pub mod sentiment;
pub mod stats;

/// Command-line arguments from string literals, for the flag tests.
#[cfg(test)]
pub(crate) fn test_args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

use recipes::AnyResult;
use recipes::flags::UsageError;

/// One experiment: its name, its page under the output folder, its usage, its entry point.
pub struct Experiment {
    pub name: &'static str,
    pub page: &'static str,
    pub help: &'static str,
    pub run: fn(&[String]) -> AnyResult<()>,
}

/// Every experiment, in the order of the results index.
pub const EXPERIMENTS: &[Experiment] = &[
    Experiment {
        name: "emoe",
        page: "emoe.md",
        help: sentiment::EMOE_HELP,
        run: sentiment::emoe,
    },
    Experiment {
        name: "pet",
        page: "pet.md",
        help: sentiment::PET_HELP,
        run: sentiment::pet,
    },
    Experiment {
        name: "moe",
        page: "moe.md",
        help: moe::MOE_HELP,
        run: moe::run,
    },
    Experiment {
        name: "merge",
        page: "merge.md",
        help: merge::MERGE_HELP,
        run: merge::run,
    },
    Experiment {
        name: "m2mkd",
        page: "m2mkd.md",
        help: m2mkd::M2MKD_HELP,
        run: m2mkd::run,
    },
    Experiment {
        name: "bricks",
        page: "bricks.md",
        help: bricks::BRICKS_HELP,
        run: bricks::run,
    },
];

/// The usage of `cargo xtask experiment`.
pub fn usage() -> String {
    let mut s = String::from(
        "usage: cargo xtask experiment NAME [--out DIR] [options]\n\
         NAME: emoe | pet | moe | merge | m2mkd | bricks | index\n\
         --out DIR: where the page goes (default docs/results/; the page is DIR/NAME.md)\n\
         index: regenerate DIR/README.md from the pages in DIR\n",
    );
    for e in EXPERIMENTS {
        s.push('\n');
        s.push_str(e.help);
        s.push('\n');
    }
    s
}

/// Run `cargo xtask experiment NAME [--out DIR] [options]`: `--out DIR` becomes
/// the experiment's own `--out DIR/PAGE`.
pub fn dispatch(args: &[String]) -> AnyResult<()> {
    let Some(name) = args.first() else {
        return Err(UsageError(format!("an experiment name is required\n{}", usage())).into());
    };
    if matches!(name.as_str(), "--help" | "-h" | "help") {
        println!("{}", usage());
        return Ok(());
    }
    let mut rest: Vec<String> = Vec::new();
    let mut dir = None;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        if a == "--out" {
            let Some(d) = it.next() else {
                return Err(UsageError("--out needs a folder".into()).into());
            };
            dir = Some(std::path::PathBuf::from(d));
        } else {
            rest.push(a.clone());
        }
    }
    let dir = dir.unwrap_or_else(|| recipes::repo_root().join("docs/results"));
    if name == "index" {
        if !rest.is_empty() {
            return Err(UsageError(format!("index takes only --out DIR, not {rest:?}")).into());
        }
        return index::write(&dir);
    }
    let Some(e) = EXPERIMENTS.iter().find(|e| e.name == name) else {
        return Err(UsageError(format!("unknown experiment '{name}'\n{}", usage())).into());
    };
    if !rest.iter().any(|a| a == "--help" || a == "-h") {
        rest.push("--out".into());
        rest.push(dir.join(e.page).display().to_string());
    }
    (e.run)(&rest)
}
