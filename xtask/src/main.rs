//! `cargo xtask <command>`: everything a fresh machine needs, in one place.
//!
//! - `setup`   install PyTorch into the per-user cache venv and configure cargo
//! - `test`    setup, then `cargo fmt --check`, clippy (`-D warnings`), build, tests
//! - `bench`   setup, criterion benchmarks, the PyTorch references, ratio table
//! - `demo`    setup, then the demo binary
//! - `finetune` setup, then fine-tune MiniLM on the project's sentiment data
//! - `doctor`  what is installed, and whether test executables link libtorch_cuda
//! - `env`     shell `export` lines for running a built binary by hand
//!
//! Every command takes `-p CRATE` (repeatable) to narrow it to crates.

mod bench;
mod gpu;
mod setup;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// A failure with what failed and what to do about it.
#[derive(Debug)]
pub struct Fail {
    stage: String,
    what: String,
    todo: String,
}

impl Fail {
    pub fn new(stage: &str, what: impl Into<String>, todo: impl Into<String>) -> Self {
        Self {
            stage: stage.to_owned(),
            what: what.into(),
            todo: todo.into(),
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

/// Parsed command line: the command, `-p` crates, flags, and arguments after `--`.
#[derive(Debug, Default)]
pub struct Args {
    pub command: String,
    pub packages: Vec<String>,
    pub flags: Vec<String>,
    pub rest: Vec<String>,
    /// Everything after the command, in order (for commands that forward their arguments).
    pub raw: Vec<String>,
}

fn parse(argv: Vec<String>) -> Result<Args, Fail> {
    let mut a = Args::default();
    let mut it = argv.into_iter();
    while let Some(s) = it.next() {
        if !a.command.is_empty() && s != "--" {
            a.raw.push(s.clone());
        }
        match s.as_str() {
            "--" => {
                a.rest = it.collect();
                a.raw.extend(a.rest.iter().cloned());
                break;
            }
            "-p" | "--package" => match it.next() {
                Some(p) => {
                    a.raw.push(p.clone());
                    a.packages.push(p);
                }
                None => {
                    return Err(Fail::new(
                        "arguments",
                        "-p needs a crate name",
                        "e.g. `cargo xtask test -p tensor-core`",
                    ));
                }
            },
            _ if s.starts_with("--package=") => a.packages.push(s["--package=".len()..].to_owned()),
            _ if s.starts_with('-') => a.flags.push(s),
            _ if a.command.is_empty() => a.command = s,
            _ => a.rest.push(s),
        }
    }
    Ok(a)
}

/// `-p X -p Y`, or `--workspace` when none was given.
pub fn package_args(pkgs: &[String]) -> Vec<String> {
    if pkgs.is_empty() {
        vec!["--workspace".into()]
    } else {
        pkgs.iter()
            .flat_map(|p| ["-p".to_owned(), p.clone()])
            .collect()
    }
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(repo_root());
    c
}

/// Run a command to completion, inheriting stdio; a non-zero exit is a `Fail`.
pub fn run(stage: &str, mut cmd: Command) -> Result<(), Fail> {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("xtask: {stage}: {shown}");
    let status = cmd.status().map_err(|e| {
        Fail::new(
            stage,
            format!("could not start {shown}: {e}"),
            "check the toolchain installation",
        )
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Fail::new(
            stage,
            format!("{shown} exited with {status}"),
            "see the output above",
        ))
    }
}

struct Timer(Vec<(String, f64)>);

impl Timer {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T, Fail>) -> Result<T, Fail> {
        let t = Instant::now();
        let r = f();
        self.0.push((name.to_owned(), t.elapsed().as_secs_f64()));
        r
    }
    fn report(&self) {
        let parts: Vec<String> = self.0.iter().map(|(n, s)| format!("{n} {s:.1}s")).collect();
        println!("xtask: timings: {}", parts.join(", "));
    }
}

/// proptest's seed variable. `cargo xtask test` (CI) fixes it, so a run is
/// reproducible and a red CI replays exactly; plain `cargo test`, or this
/// variable set to another value, explores other cases.
const PROPTEST_SEED_VAR: &str = "PROPTEST_RNG_SEED";

/// The seed the property tests run under: `PROPTEST_RNG_SEED` when set,
/// else a fixed one.
fn proptest_seed() -> String {
    proptest_seed_from(std::env::var(PROPTEST_SEED_VAR).ok().as_deref())
}

/// [`proptest_seed`] for an explicit value of the variable.
fn proptest_seed_from(from_env: Option<&str>) -> String {
    match from_env.map(str::trim) {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "20261128".to_owned(),
    }
}

fn test(a: &Args) -> Result<(), Fail> {
    let mut timer = Timer(Vec::new());
    timer.time("setup", || setup::ensure(true))?;
    let pkgs = package_args(&a.packages);
    timer.time("fmt", || {
        let mut c = cargo();
        c.arg("fmt");
        if a.packages.is_empty() {
            c.arg("--all");
        } else {
            c.args(&pkgs);
        }
        c.args(["--", "--check"]);
        run("format check", c)
    })?;
    timer.time("tidy", tidy_cmd)?;
    if a.packages.is_empty() {
        // xtask is not a default member: its own tests (tidy on a planted
        // tree among them) run here.
        timer.time("xtask tests", || {
            let mut c = cargo();
            c.args(["test", "-q", "-p", "xtask"]);
            run("xtask tests", c)
        })?;
    }
    timer.time("clippy", || {
        let mut c = cargo();
        c.arg("clippy")
            .args(&pkgs)
            .args(["--all-targets", "--", "-D", "warnings"]);
        run("clippy", c)
    })?;
    timer.time("build", || {
        let mut c = cargo();
        c.arg("test").args(&pkgs).arg("--no-run");
        run("build tests", c)
    })?;
    // `--cuda`: every suite computes on CUDA device 0 (tensor_core::testing::device).
    let cuda = a.flags.iter().any(|f| f == "--cuda");
    let flags: Vec<&String> = a.flags.iter().filter(|f| *f != "--cuda").collect();
    let r = timer.time("tests", || {
        let mut c = cargo();
        c.arg("test").args(&pkgs).args(flags);
        if cuda {
            c.env("MODULAR_TEST_DEVICE", "cuda");
        }
        let seed = proptest_seed();
        println!("xtask: property tests draw from {PROPTEST_SEED_VAR}={seed}");
        c.env(PROPTEST_SEED_VAR, &seed);
        if !a.rest.is_empty() {
            c.arg("--").args(&a.rest);
        }
        run("tests", c)
    });
    timer.report();
    r
}

fn demo(a: &Args) -> Result<(), Fail> {
    setup::ensure(false)?;
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "modular-cli", "--", "demo"])
        .args(&a.rest);
    run("demo", c)
}

/// The real-task fine-tuning run (not part of CI); see `modular finetune --help`.
fn finetune(a: &Args) -> Result<(), Fail> {
    setup::ensure(false)?;
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "modular-cli", "--", "finetune"])
        .args(&a.raw);
    run("finetune", c)
}

/// A real-task experiment (not part of CI), from the `experiments` crate:
/// `cargo xtask experiment NAME [--out DIR] [options]`.
fn experiment(a: &Args) -> Result<(), Fail> {
    setup::ensure(false)?;
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "experiments", "--"])
        .args(&a.raw);
    run("experiment", c)
}

fn doctor(a: &Args) -> Result<(), Fail> {
    let t = setup::ensure(true)?;
    println!("torch       {}", t.version);
    println!("venv        {}", t.venv.display());
    println!("lib         {}", t.lib_dir.display());
    println!(
        "cuda lib    {}",
        if t.has_cuda_lib() {
            "present"
        } else {
            "absent (CPU-only wheel)"
        }
    );
    let pkgs = if a.packages.is_empty() {
        vec!["tensor-core".to_owned()]
    } else {
        a.packages.clone()
    };
    let out = cargo()
        .args(["test", "--no-run", "--message-format=json"])
        .args(package_args(&pkgs))
        .output()
        .map_err(|e| Fail::new("doctor", e.to_string(), "check the toolchain"))?;
    if !out.status.success() {
        return Err(Fail::new(
            "doctor",
            "building the test executables failed",
            "run `cargo xtask test` to see why",
        ));
    }
    let mut bad = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(i) = line.find("\"executable\":\"") else {
            continue;
        };
        let rest = &line[i + 14..];
        let Some(exe) = rest.split('"').next() else {
            continue;
        };
        let ldd = Command::new("ldd").arg(exe).output();
        let text = ldd
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let linked = text.lines().find(|l| l.contains("libtorch_cuda.so"));
        match linked {
            Some(l) => println!("ok          {exe}\n            {}", l.trim()),
            None => {
                bad += 1;
                println!("MISSING     {exe}: ldd lists no libtorch_cuda.so");
            }
        }
    }
    if bad > 0 && t.has_cuda_lib() {
        return Err(Fail::new(
            "doctor",
            format!("{bad} executable(s) do not link libtorch_cuda"),
            "run `cargo xtask setup` (it writes .cargo/torch.toml and the linker wrapper) and rebuild",
        ));
    }
    Ok(())
}

fn tidy_cmd() -> Result<(), Fail> {
    let found = tidy::check(&repo_root());
    if found.is_empty() {
        println!(
            "xtask: tidy: method crates depend on tensor-core only; every source file has its //! header; no library reaches outside its crate; every cited path exists"
        );
        return Ok(());
    }
    for line in &found {
        eprintln!("tidy: {line}");
    }
    Err(Fail::new(
        "tidy",
        format!("{} problem(s), listed above", found.len()),
        "fix each file named above (the rules are in xtask/src/tidy.rs)",
    ))
}

fn env_cmd() -> Result<(), Fail> {
    let t = setup::ensure(false)?;
    println!("export LIBTORCH_USE_PYTORCH=1");
    println!("export VIRTUAL_ENV={}", t.venv.display());
    println!("export PATH={}/bin:$PATH", t.venv.display());
    println!(
        "export LD_LIBRARY_PATH={}:${{LD_LIBRARY_PATH:-}}",
        t.lib_dir.display()
    );
    Ok(())
}

const USAGE: &str = "usage: cargo xtask <setup|test|tidy|bench|demo|finetune|experiment|doctor|env|gpu-check> [-p CRATE]... [-- ARGS]
  tidy              the architecture rules: method crates depend on tensor-core only, //! headers,
                    no library reaching outside its crate, every cited path exists
  test [--cuda]     fmt, clippy, build and run the tests (--cuda: every suite on CUDA device 0)
  bench [--quick] [TOPIC]...   criterion benches + Python references, target/bench/report.md";

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(f) => return report(f),
    };
    let r = match args.command.as_str() {
        "setup" => setup::ensure(true).map(|_| ()),
        "test" => test(&args),
        "bench" => bench::bench(&args),
        "demo" => demo(&args),
        "finetune" => finetune(&args),
        "experiment" => experiment(&args),
        "doctor" => doctor(&args),
        "gpu-check" => gpu::gpu_check(),
        "tidy" => tidy_cmd(),
        "env" => env_cmd(),
        "" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Fail::new(
            "arguments",
            format!("unknown command '{other}'"),
            USAGE,
        )),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(f),
    }
}

fn report(f: Fail) -> ExitCode {
    eprintln!(
        "xtask: {} failed: {}\n  what to do: {}",
        f.stage, f.what, f.todo
    );
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_packages_flags_and_rest() {
        let a = parse(
            [
                "test",
                "-p",
                "tensor-core",
                "--package=model-zoo",
                "--release",
                "--",
                "grouped",
            ]
            .map(String::from)
            .to_vec(),
        )
        .unwrap();
        assert_eq!(a.command, "test");
        assert_eq!(a.packages, ["tensor-core", "model-zoo"]);
        assert_eq!(a.flags, ["--release"]);
        assert_eq!(a.rest, ["grouped"]);
        assert_eq!(
            a.raw,
            [
                "-p",
                "tensor-core",
                "--package=model-zoo",
                "--release",
                "grouped"
            ]
        );
        let f = parse(
            ["finetune", "--epochs", "2", "--quiet"]
                .map(String::from)
                .to_vec(),
        )
        .unwrap();
        assert_eq!(f.raw, ["--epochs", "2", "--quiet"]);
        assert_eq!(
            package_args(&a.packages),
            ["-p", "tensor-core", "-p", "model-zoo"]
        );
        assert_eq!(package_args(&[]), ["--workspace"]);
        assert!(parse(vec!["test".into(), "-p".into()]).is_err());
    }

    #[test]
    fn property_tests_get_a_fixed_seed_unless_one_is_given() {
        assert_eq!(proptest_seed_from(None), proptest_seed_from(Some("  ")));
        assert!(proptest_seed_from(None).parse::<u64>().is_ok());
        assert_eq!(proptest_seed_from(Some(" 42 ")), "42");
    }
}
