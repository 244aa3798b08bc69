//! The user subcommands of `modular`: `split`, `merge`, `tune`, `eval`,
//! `predict`, `embed`, `generate`, `distill`, `profile`, `inspect`.
//!
//! Each lives in its own file and goes only through the method crates'
//! public APIs (what a user of the libraries would write). Shared here:
//! - [`UsageError`] and [`Flags`] (from `recipes::flags`): a bad command
//!   line exits with code 2, every other error with 1;
//! - input checks with errors naming the path ([`require_dir`]);
//! - [`AtomicDir`]: folder outputs are built in a temporary sibling folder
//!   and renamed into place only when complete;
//! - progress bars (`indicatif`, on stderr, hidden when it is not a terminal).

pub mod distill;
pub mod embed;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod predict;
pub mod profile;
pub mod split;
pub mod tune;
pub mod tune_lm;
pub mod tuned;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub use recipes::flags::{AnyResult, Flags, UsageError, exit_code, usage};

/// Run subcommand `cmd` (`split`, `merge`, `tune`, `inspect`) on `args`
/// (the arguments after the subcommand's name).
pub fn run(cmd: &str, args: &[String]) -> AnyResult<()> {
    match cmd {
        "split" => split::run(args),
        "merge" => merge::run(args),
        "tune" => tune::run(args),
        "inspect" => inspect::run(args),
        "profile" => profile::run(args),
        "distill" => distill::run(args),
        "eval" => eval::run(args),
        "predict" => predict::run(args),
        "embed" => embed::run(args),
        "generate" => generate::run(args),
        other => usage("--help", format!("unknown command '{other}'")),
    }
}

/// One line per subcommand, for the top-level usage text.
pub const SUMMARY: &str = "\
  modular split   --model DIR --out DIR [--experts N] [--top-k K]   EMoE: split FFNs into experts
  modular merge   ADAPTER_DIR... --out DIR [--method ties]          merge PEFT LoRA adapters
  modular tune    --data FILE|DIR --out DIR [--method lora|vlpet]   LoRA / VL-PET on a JSONL dataset
  modular distill --data FILE|DIR --out DIR [--modules 3]            m2mKD: distil MiniLM into a modular student
  modular profile --data FILE|DIR --out DIR [--top-fraction X]      neuron profile, FuncScores, functional bricks
  modular eval    TUNED_DIR [--data FILE|DIR]                      score what tune wrote (accuracy, F1, MCC, confusion)
  modular predict TUNED_DIR --data FILE [--out FILE]               labels and probabilities as JSONL
  modular embed   --data FILE --out FILE.safetensors|.jsonl         sentence embeddings
  modular generate --model DIR --prompt TEXT|--data FILE [--out FILE]  text from a Llama/Mistral/Qwen decoder
  modular inspect DIR                                             parameters, adapters, experts";

/// Does the model folder's `config.json` name a Llama-family decoder
/// (`model_zoo::llama::MODEL_TYPES`)? A missing or unreadable config says no;
/// the encoder loader then reports it.
pub fn is_decoder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("model_type")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .is_some_and(|t| model_zoo::llama::MODEL_TYPES.contains(&t.as_str()))
}

/// `dir` must be an existing folder; `what` says what it should hold.
pub fn require_dir(dir: &Path, what: &str) -> AnyResult<()> {
    if !dir.exists() {
        return Err(format!("{what} {} does not exist", dir.display()).into());
    }
    if !dir.is_dir() {
        return Err(format!("{what} {} is not a folder", dir.display()).into());
    }
    Ok(())
}

/// `dir` must be a model folder: `config.json` and `model.safetensors`.
pub fn require_model_dir(dir: &Path) -> AnyResult<()> {
    require_dir(dir, "model folder")?;
    for f in ["config.json", "model.safetensors"] {
        if !dir.join(f).is_file() {
            return Err(format!(
                "model folder {} has no {f} (a Hugging Face model folder holds config.json and model.safetensors)",
                dir.display()
            )
            .into());
        }
    }
    Ok(())
}

/// A folder output built beside its destination and renamed into place.
///
/// [`AtomicDir::new`] creates `.<name>.tmp-<pid>` next to `dest`; the caller
/// writes into [`AtomicDir::path`]; [`AtomicDir::commit`] renames it to
/// `dest` (an existing `dest` is replaced only with `force`, and moved aside
/// first so that a failed rename leaves it in place). Dropped without a
/// commit, the temporary folder is removed: a failed run leaves no half
/// output behind.
#[derive(Debug)]
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

/// The temporary folders this process is building, for the interrupt
/// handler ([`install_interrupt_cleanup`]).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// On SIGINT or SIGTERM, remove the temporary output folders of this
/// process, then let the signal's default action end it (the shell sees
/// 130 or 143). The clean-up runs on its own thread, not in the handler.
pub fn install_interrupt_cleanup() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            for p in live().drain(..) {
                let _ = std::fs::remove_dir_all(&p);
            }
            let _ = signal_hook::low_level::emulate_default_handler(sig);
            std::process::exit(128 + sig);
        }
    });
}

/// Whether process `pid` is running (Linux: its `/proc` entry; elsewhere
/// every process counts as running, so nothing is swept).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Remove `.NAME.tmp-PID` folders and files in `parent` left by processes
/// that no longer run (a crash or a `kill -9`); returns what was removed.
pub fn sweep_stale(parent: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}.tmp-");
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return removed;
    };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if gone.is_ok() {
            removed.push(p);
        }
    }
    removed
}

impl AtomicDir {
    /// Check that `dest` may be written (absent, an empty folder, or
    /// `force`), and create the temporary folder.
    pub fn new(dest: &Path, force: bool) -> AnyResult<Self> {
        let d = Self::deferred(dest, force)?;
        d.create()?;
        Ok(d)
    }

    /// Create the temporary folder (again, if it was removed).
    pub fn create(&self) -> AnyResult<()> {
        std::fs::create_dir_all(&self.tmp)
            .map_err(|e| format!("cannot create {}: {e}", self.tmp.display()))?;
        Ok(())
    }

    /// Check that `dest` may be written, as [`AtomicDir::new`] does, and
    /// sweep stale temporary outputs of dead processes, but create nothing
    /// yet: the caller runs [`AtomicDir::create`] when results are about to
    /// be written, so a run stopped before then leaves no folder at all.
    pub fn deferred(dest: &Path, force: bool) -> AnyResult<Self> {
        if dest.exists() {
            let empty_dir = dest.is_dir()
                && std::fs::read_dir(dest)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !dest.is_dir() {
                return Err(format!("output {} exists and is not a folder", dest.display()).into());
            }
            if !empty_dir && !force {
                return Err(format!(
                    "output folder {} already exists and is not empty (pass --force to replace it)",
                    dest.display()
                )
                .into());
            }
        }
        let name = dest
            .file_name()
            .ok_or_else(|| format!("output {} has no folder name", dest.display()))?
            .to_string_lossy()
            .into_owned();
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot create folder {}: {e}", parent.display()))?;
        for p in sweep_stale(&parent, &name) {
            eprintln!(
                "modular: removed {}, left by an interrupted run",
                p.display()
            );
        }
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| format!("cannot clear {}: {e}", tmp.display()))?;
        }
        live().push(tmp.clone());
        Ok(Self {
            tmp,
            dest: dest.to_owned(),
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Move the finished folder to its destination.
    pub fn commit(mut self) -> AnyResult<PathBuf> {
        let aside = self.tmp.with_extension("old");
        let had_dest = self.dest.exists();
        if had_dest {
            std::fs::rename(&self.dest, &aside)
                .map_err(|e| format!("cannot move {} aside: {e}", self.dest.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
            if had_dest {
                let _ = std::fs::rename(&aside, &self.dest);
            }
            return Err(format!("cannot rename output into {}: {e}", self.dest.display()).into());
        }
        self.committed = true;
        live().retain(|p| p != &self.tmp);
        if had_dest {
            let _ = std::fs::remove_dir_all(&aside);
        }
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
            live().retain(|p| p != &self.tmp);
        }
    }
}

/// Write `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> AnyResult<()> {
    write_text(
        path,
        &format!(
            "{}
",
            serde_json::to_string_pretty(value)?
        ),
    )
}

/// Write `text` to `path`, atomically.
pub fn write_text(path: &Path, text: &str) -> AnyResult<()> {
    tensor_core::io::write_atomic(path, |tmp| {
        std::fs::write(tmp, text).map_err(|source| tensor_core::Error::Io {
            path: path.to_owned(),
            source,
        })
    })?;
    Ok(())
}

/// The one positional argument `cmd` takes, or a usage error.
pub fn one_positional(cmd: &str, f: &Flags, what: &str) -> AnyResult<PathBuf> {
    match f.positional.as_slice() {
        [d] => Ok(PathBuf::from(d)),
        [] => usage(cmd, format!("no {what} given")),
        [_, extra, ..] => usage(cmd, format!("unexpected argument '{extra}'")),
    }
}

/// Read and parse a JSON file, naming it in every error.
pub fn read_json(path: &Path) -> AnyResult<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", path.display()).into())
}

/// A progress bar over `len` steps on stderr (hidden when `quiet` or when
/// stderr is not a terminal).
pub fn progress(len: u64, label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}] {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(label.to_owned());
    pb
}

/// A spinner for work of unknown length.
pub fn spinner(label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(s) = ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]") {
        pb.set_style(s);
    }
    pb.set_prefix(label.to_owned());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// `"1.2M"`-style parameter counts.
pub fn human_count(n: i64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_dir_replaces_only_when_committed_or_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        {
            let d = AtomicDir::new(&dest, false).unwrap();
            std::fs::write(d.path().join("f"), "1").unwrap();
            // dropped: nothing appears, the temporary folder is gone
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        let d = AtomicDir::new(&dest, false).unwrap();
        std::fs::write(d.path().join("f"), "1").unwrap();
        d.commit().unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "1");
        let e = AtomicDir::new(&dest, false).unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        let d = AtomicDir::new(&dest, true).unwrap();
        std::fs::write(d.path().join("g"), "2").unwrap();
        d.commit().unwrap();
        assert!(!dest.join("f").exists() && dest.join("g").is_file());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn deferred_outputs_create_nothing_until_asked_and_stale_ones_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        // A dead process's leftovers (pid far above any pid_max) are swept;
        // a live process's (our parent's) and unrelated names are kept.
        let dead = tmp.path().join(".out.tmp-4294967295");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("half"), "x").unwrap();
        let dead_file = tmp.path().join(".out.tmp-4294967294");
        std::fs::write(&dead_file, "x").unwrap();
        let alive = tmp
            .path()
            .join(format!(".out.tmp-{}", std::os::unix::process::parent_id()));
        std::fs::create_dir(&alive).unwrap();
        let other = tmp.path().join(".other.tmp-4294967295");
        std::fs::create_dir(&other).unwrap();
        let d = AtomicDir::deferred(&dest, false).unwrap();
        assert!(!dead.exists() && !dead_file.exists());
        assert!(alive.exists() && other.exists());
        assert!(
            !d.path().exists(),
            "nothing is created before results exist"
        );
        assert!(live().contains(&d.path().to_owned()));
        drop(d);
        assert!(!live().iter().any(|p| p.starts_with(tmp.path())));
        let d = AtomicDir::deferred(&dest, false).unwrap();
        d.create().unwrap();
        std::fs::write(d.path().join("f"), "1").unwrap();
        d.commit().unwrap();
        assert!(dest.join("f").is_file());
        assert!(!live().iter().any(|p| p.starts_with(tmp.path())));
    }
}
