//! `cargo xtask gpu-check`: gather what a GPU machine runs into `.gpu/`
//! (git-ignored), following docs/gpu.md: release builds made here
//! against the same PyTorch, checked to link `libtorch_cuda`, and one run
//! script. On the GPU machine, from the repository root:
//!
//! ```text
//! bash .gpu/run.sh          # results under $OUT (default ./gpu-out)
//! ```
//!
//! `.gpu/` holds `gpu-check` (correctness on the device vs the CPU, and the
//! GPU benchmarks: LoRA step vs PEFT, MoE and EMoE fractions of the bf16
//! matmul rate, stick-breaking vs SDPA) and the release test executables of
//! the library crates, stripped and packed into one solid `tests.tar.xz`
//! (the executables share most of their code, so the archive is a fraction
//! of their size), within the 64 MiB a device run may carry. `run.sh` runs
//! them with `MODULAR_TEST_DEVICE=cuda`, so every suite computes on the GPU
//! (`tensor_core::testing::device`). Fixture paths are compiled in as
//! absolute paths; `run.sh` links the build's repository root to the
//! checkout it runs in when they differ. (The demo and the MiniLM parity
//! tests need the 88 MB MiniLM folder, more than a run carries; `gpu-check`
//! falls back to a randomly initialised MiniLM-shaped BERT.)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Fail, cargo, repo_root, run, setup};

/// The run script written to `.gpu/run.sh`.
const RUN_SH: &str = r###"#!/usr/bin/env bash
# Written by `cargo xtask gpu-check`. Run on the GPU machine from the repository root.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TL=$(timeout 30 "$PY" -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')")
export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# 1. gpu-check + the PyTorch reference (benches/gpu_run.sh prints the table).
OUT="$OUT" bash benches/gpu_run.sh "$@"
# 2. The crates' test executables, every suite on the GPU (MODULAR_TEST_DEVICE).
BUILD_ROOT="@BUILD_ROOT@"
if [ "$BUILD_ROOT" != "$PWD" ] && [ ! -e "$BUILD_ROOT" ]; then
  mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$PWD" "$BUILD_ROOT" \
    || echo "cannot link $BUILD_ROOT -> $PWD: tests reading fixtures will fail"
fi
if [ -f .gpu/tests.tar.xz ]; then tar -xJf .gpu/tests.tar.xz -C .gpu; fi
export MODULAR_TEST_DEVICE=${MODULAR_TEST_DEVICE:-cuda}
export PROPTEST_RNG_SEED=${PROPTEST_RNG_SEED:-@PROPTEST_SEED@}
echo "| test executable | exit | result |"
echo "|---|---|---|"
for t in .gpu/tests/*; do
  [ -x "$t" ] || continue
  n=$(basename "$t")
  timeout -k 5 120 "$t" --test-threads 4 > "$OUT/$n.log" 2>&1
  echo "| $n | $? | $(grep -E '^test result' "$OUT/$n.log" | tail -n 1) |"
done
"###;

/// The packages whose test executables are carried (modular-cli's need the
/// MiniLM folder and the binary, which a device run does not have).
const TEST_PACKAGES: &[&str] = &[
    "tensor-core",
    "model-zoo",
    "pet-core",
    "moe-router",
    "emergent-split",
    "orthogonal-merge",
    "m2mkd",
    "configurable-bricks",
];
/// What a device run may carry, with room for the working tree.
const CARRY_LIMIT: u64 = 56 << 20;

fn copy_exe(from: &Path, to: &Path) -> Result<u64, Fail> {
    fs::copy(from, to).map_err(|e| {
        Fail::new(
            "gpu-check: copy",
            format!("{} -> {}: {e}", from.display(), to.display()),
            "check the build output",
        )
    })
}

/// Copy `from` to `to` without symbols and debug information (`strip`), or
/// as it is where `strip` is missing.
fn strip_exe(from: &Path, to: &Path) -> Result<u64, Fail> {
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(to)
        .arg(from)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if stripped {
        Ok(fs::metadata(to).map(|m| m.len()).unwrap_or(0))
    } else {
        copy_exe(from, to)
    }
}

fn links_torch_cuda(exe: &Path) -> bool {
    Command::new("ldd")
        .arg(exe)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libtorch_cuda"))
        .unwrap_or(false)
}

/// Release test executables of `pkg` (`cargo test --no-run --message-format=json`).
fn test_executables(pkg: &str) -> Result<Vec<PathBuf>, Fail> {
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json",
        "-p",
        pkg,
    ]);
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Fail::new("gpu-check: build tests", e.to_string(), "check cargo"))?;
    if !out.status.success() {
        return Err(Fail::new(
            "gpu-check: build tests",
            format!("cargo test --no-run -p {pkg} failed"),
            "run `cargo xtask test` to see why",
        ));
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains("\"reason\":\"compiler-artifact\"") || !line.contains("\"test\":true") {
            continue;
        }
        if let Some(i) = line.find("\"executable\":\"") {
            let rest = &line[i + 14..];
            if let Some(end) = rest.find('"') {
                exes.push(PathBuf::from(&rest[..end]));
            }
        }
    }
    Ok(exes)
}

pub fn gpu_check() -> Result<(), Fail> {
    let torch = setup::ensure(false)?;
    if !torch.has_cuda_lib() {
        return Err(Fail::new(
            "gpu-check",
            format!("{} has no libtorch_cuda.so", torch.lib_dir.display()),
            "install the CUDA build of PyTorch 2.11.0 (`cargo xtask setup`)",
        ));
    }
    let root = repo_root();
    let dir = root.join(".gpu");
    let tests_dir = dir.join("tests");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&tests_dir)
        .map_err(|e| Fail::new("gpu-check", e.to_string(), "check .gpu is writable"))?;
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "-p",
        "modular-benches",
        "--example",
        "gpu-check",
    ]);
    run("gpu-check: build", c)?;
    let release = root.join("target").join("release");
    let to = dir.join("gpu-check");
    let mut total = strip_exe(&release.join("examples").join("gpu-check"), &to)?;
    if !links_torch_cuda(&to) {
        return Err(Fail::new(
            "gpu-check",
            format!("{} does not link libtorch_cuda", to.display()),
            "check .cargo/torch.toml (the linker wrapper keeps libtorch_cuda with --no-as-needed)",
        ));
    }
    let mut count = 0;
    for pkg in TEST_PACKAGES {
        for exe in test_executables(pkg)? {
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            strip_exe(&exe, &tests_dir.join(&name))?;
            count += 1;
        }
    }
    let archive = dir.join("tests.tar.xz");
    let mut tar = Command::new("tar");
    tar.env("XZ_OPT", "-9e -T0")
        .arg("-cJf")
        .arg(&archive)
        .arg("-C")
        .arg(&dir)
        .arg("tests");
    run("gpu-check: pack tests", tar)?;
    let _ = fs::remove_dir_all(&tests_dir);
    total += fs::metadata(&archive).map(|m| m.len()).unwrap_or(u64::MAX);
    if total > CARRY_LIMIT {
        return Err(Fail::new(
            "gpu-check",
            format!(
                "{} holds {:.1} MiB, more than the {} MiB a device run may carry",
                dir.display(),
                total as f64 / (1 << 20) as f64,
                CARRY_LIMIT >> 20
            ),
            "trim TEST_PACKAGES in xtask/src/gpu.rs",
        ));
    }
    let script = dir.join("run.sh");
    let root_str = root.display().to_string();
    fs::write(
        &script,
        RUN_SH
            .replace("@BUILD_ROOT@", &root_str)
            .replace("@PROPTEST_SEED@", &crate::proptest_seed()),
    )
    .map_err(|e| Fail::new("gpu-check", e.to_string(), "check .gpu is writable"))?;
    println!(
        "xtask: gathered {:.1} MiB in {} (gpu-check and {count} test executables in tests.tar.xz)",
        total as f64 / (1 << 20) as f64,
        dir.display(),
    );
    println!("xtask: on the GPU machine, from the repository root: bash .gpu/run.sh");
    Ok(())
}
