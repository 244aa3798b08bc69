//! `cargo xtask bench`: criterion benchmarks and their PyTorch references in
//! one run, then a ratio table.
//!
//! Convention: a criterion benchmark with full id `TOPIC/CASE/rust` is paired
//! with the line `TOPIC/CASE/pytorch SECONDS` printed by
//! `benches/reference/TOPIC.py` (run with the cache venv's python, same
//! machine, same run, once before and once after our criterion run, averaged).
//! The ratio is `pytorch / rust` (above 1 = we are faster).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::{Args, Fail, cargo, repo_root, run, setup};

mod report;

pub fn bench(a: &Args) -> Result<(), Fail> {
    let torch = setup::ensure(false)?;
    let root = repo_root();
    // Benchmarks are selected by topic: `-p` names a method crate, the
    // topic files follow the crates' names with `_` (tensor-core -> tensor_core).
    let manifest = root.join("benches").join("Cargo.toml");
    let text = fs::read_to_string(&manifest).map_err(|e| {
        Fail::new(
            "bench",
            format!("{}: {e}", manifest.display()),
            "is the benches/ folder there?",
        )
    })?;
    let all = bench_targets(&text);
    let topics: Vec<String> = if a.packages.is_empty() {
        all.clone()
    } else {
        a.packages.iter().map(|p| p.replace('-', "_")).collect()
    };
    if let Some(t) = topics.iter().find(|t| !all.contains(t)) {
        return Err(Fail::new(
            "bench",
            format!("no benchmark '{t}' in benches/Cargo.toml"),
            format!("pick one of: {}", all.join(", ")),
        ));
    }
    // Per topic: the PyTorch reference, our criterion run, the reference
    // again; the reference time is the mean of its two runs. Bracketing
    // cancels the drift of a shared machine's speed over minutes.
    let mut reference: BTreeMap<String, f64> = BTreeMap::new();
    for t in &topics {
        let script = root
            .join("benches")
            .join("reference")
            .join(format!("{t}.py"));
        let has_ref = script.exists();
        let before = if has_ref {
            run_reference(&torch.python, &script, &root)?
        } else {
            BTreeMap::new()
        };
        let mut c = cargo();
        c.args(["bench", "-p", "modular-benches", "--bench", t, "--"]);
        if a.flags.iter().any(|f| f == "--quick") {
            c.arg("--quick");
        }
        c.args(&a.rest);
        run("criterion", c)?;
        if has_ref {
            let after = run_reference(&torch.python, &script, &root)?;
            for (case, secs) in before {
                let mean = after.get(&case).map_or(secs, |s2| 0.5 * (secs + s2));
                reference.insert(case, mean);
            }
        }
    }
    let ours = criterion_medians(&root.join("target").join("criterion"));
    let mut figures = Vec::new();
    for (id, ns) in &ours {
        let Some(case) = id.strip_suffix("/rust") else {
            continue;
        };
        if !topics.iter().any(|t| case.starts_with(&format!("{t}/"))) {
            continue;
        }
        figures.push(Figure {
            case: case.to_owned(),
            rust_s: ns * 1e-9,
            reference_s: reference.get(case).copied(),
        });
    }
    println!(
        "\n{:<48} {:>12} {:>12} {:>8}",
        "benchmark", "rust", "pytorch", "ratio"
    );
    for f in &figures {
        match f.reference_s {
            Some(r) => println!(
                "{:<48} {:>12} {:>12} {:>7.2}x",
                f.case,
                fmt_s(f.rust_s),
                fmt_s(r),
                r / f.rust_s
            ),
            None => println!(
                "{:<48} {:>12} {:>12} {:>8}",
                f.case,
                fmt_s(f.rust_s),
                "-",
                "-"
            ),
        }
    }
    let quick = a.flags.iter().any(|f| f == "--quick");
    let out = root.join("target").join("bench");
    report::write(
        &out,
        &report::Meta::collect(&root, quick, &topics),
        &figures,
    )
    .map_err(|e| {
        Fail::new(
            "bench: report",
            e.to_string(),
            "check target/bench is writable",
        )
    })?;
    println!(
        "\nxtask: wrote {0}/report.md, {0}/report.json and {0}/ratios.svg",
        out.display()
    );
    Ok(())
}

/// One benchmark: our median time and, when the reference printed the same case, its time.
#[derive(Debug, Clone)]
pub struct Figure {
    pub case: String,
    pub rust_s: f64,
    pub reference_s: Option<f64>,
}

impl Figure {
    /// `reference / ours`: above 1 means we are faster.
    pub fn ratio(&self) -> Option<f64> {
        self.reference_s.map(|r| r / self.rust_s)
    }
}

/// Run a reference script; `TOPIC/CASE -> seconds` from its `TOPIC/CASE/pytorch SECONDS` lines.
fn run_reference(python: &Path, script: &Path, root: &Path) -> Result<BTreeMap<String, f64>, Fail> {
    println!("xtask: reference: {}", script.display());
    let out = Command::new(python)
        .arg(script)
        .current_dir(root)
        .output()
        .map_err(|e| Fail::new("bench: reference", e.to_string(), "check the venv"))?;
    if !out.status.success() {
        return Err(Fail::new(
            "bench: reference",
            format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            "fix the reference script",
        ));
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace();
        if let (Some(id), Some(s)) = (it.next(), it.next())
            && let (Some(case), Ok(secs)) = (id.strip_suffix("/pytorch"), s.parse::<f64>())
        {
            found.insert(case.to_owned(), secs);
        }
    }
    Ok(found)
}

pub fn fmt_s(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `full_id -> median ns` from criterion's `new/benchmark.json` + `estimates.json`.
fn criterion_medians(dir: &Path) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "benchmark.json")
                && p.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|n| n == "new")
            {
                let (Ok(b), Ok(est)) = (
                    fs::read_to_string(&p),
                    fs::read_to_string(p.with_file_name("estimates.json")),
                ) else {
                    continue;
                };
                if let (Some(id), Some(median)) = (json_str(&b, "full_id"), json_median(&est)) {
                    out.insert(id, median);
                }
            }
        }
    }
    out
}

fn json_str(text: &str, key: &str) -> Option<String> {
    let i = text.find(&format!("\"{key}\":\""))? + key.len() + 4;
    Some(text[i..].split('"').next()?.to_owned())
}

fn json_median(text: &str) -> Option<f64> {
    let i = text.find("\"median\":")?;
    let j = text[i..].find("\"point_estimate\":")? + i + 17;
    text[j..].split([',', '}']).next()?.trim().parse().ok()
}

/// The `[[bench]]` targets' names in the benches manifest, sorted (the
/// `[[example]]`s there, such as `gpu-check`, are not benchmarks).
fn bench_targets(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_bench = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
            continue;
        }
        if !in_bench {
            continue;
        }
        if let Some(rest) = line.strip_prefix("name")
            && let Some(v) = rest.trim_start().strip_prefix('=')
        {
            names.push(v.trim().trim_matches('"').to_owned());
        }
    }
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::bench_targets;

    #[test]
    fn bench_targets_are_the_manifests_benches_not_its_examples() {
        let t = bench_targets(include_str!("../../benches/Cargo.toml"));
        assert!(t.contains(&"moe_router".to_owned()) && t.contains(&"m2mkd".to_owned()));
        assert!(!t.iter().any(|n| n.contains("gpu")), "{t:?}");
        let toy = "[package]\nname = \"x\"\n[[bench]]\nname = \"b\"\n[[example]]\nname = \"e\"\n[[bench]]\nharness = false\nname = \"a\"\n";
        assert_eq!(bench_targets(toy), ["a", "b"]);
    }
}
