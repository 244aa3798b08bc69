//! The user subcommands of `modular`: `split`, `merge`, `tune`, `profile`, `inspect`.
//!
//! Each lives in its own file and goes only through the method crates'
//! public APIs (what a user of the libraries would write). Shared here:
//! - [`UsageError`]: a bad command line (unknown or missing flag, a value
//!   that does not parse, an unknown method); `main` maps it to exit code 2,
//!   every other error to 1;
//! - [`Flags`]: `--flag value` / `--flag=value` parsing with positional
//!   arguments, each value parsed with an error naming the flag;
//! - input checks with errors naming the path ([`require_dir`]);
//! - [`AtomicDir`]: folder outputs are built in a temporary sibling folder
//!   and renamed into place only when complete;
//! - progress bars (`indicatif`, on stderr, hidden when it is not a terminal).

pub mod distill;
pub mod inspect;
pub mod merge;
pub mod profile;
pub mod split;
pub mod tune;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A malformed command line: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `Err(UsageError)` with `msg` and a pointer to the subcommand's help.
pub fn usage<T>(cmd: &str, msg: impl fmt::Display) -> AnyResult<T> {
    Err(Box::new(UsageError(format!(
        "{msg}\n(run `modular {cmd} --help` for usage)"
    ))))
}

/// Exit code for an error: 2 for a usage error, 1 for anything else.
pub fn exit_code(e: &(dyn std::error::Error + 'static)) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}

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
  modular inspect DIR                                             parameters, adapters, experts";

/// Parsed `--flag value` pairs, boolean switches and positional arguments.
///
/// Built from the declared value flags and switches, so an unknown flag or a
/// flag without its value is reported at once, by name.
#[derive(Debug, Default)]
pub struct Flags {
    cmd: &'static str,
    values: Vec<(String, String)>,
    switches: Vec<String>,
    pub positional: Vec<String>,
    pub help: bool,
}

impl Flags {
    /// Parse `args` for subcommand `cmd`; `valued` lists the flags that take
    /// a value, `switches` those that do not. `-h` / `--help` sets `help`.
    pub fn parse(
        cmd: &'static str,
        args: &[String],
        valued: &[&str],
        switches: &[&str],
    ) -> AnyResult<Self> {
        let mut f = Flags {
            cmd,
            ..Flags::default()
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-h" || a == "--help" {
                f.help = true;
                continue;
            }
            if a == "--" {
                f.positional.extend(it.by_ref().cloned());
                break;
            }
            if !a.starts_with('-') || a == "-" {
                f.positional.push(a.clone());
                continue;
            }
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (a.as_str(), None),
            };
            if valued.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => match it.next() {
                        Some(v) => v.clone(),
                        None => return usage(cmd, format!("{name} needs a value")),
                    },
                };
                if f.values.iter().any(|(n, _)| n == name) {
                    return usage(cmd, format!("{name} is given twice"));
                }
                f.values.push((name.to_owned(), v));
            } else if switches.contains(&name) {
                if inline.is_some() {
                    return usage(cmd, format!("{name} takes no value"));
                }
                f.switches.push(name.to_owned());
            } else {
                let mut known: Vec<&str> = valued.iter().chain(switches).copied().collect();
                known.sort_unstable();
                return usage(
                    cmd,
                    format!(
                        "unknown option '{name}' for `modular {cmd}` (options: {}, --help)",
                        known.join(", ")
                    ),
                );
            }
        }
        Ok(f)
    }

    /// [`Flags::parse`] for a subcommand that takes options only: on `-h` /
    /// `--help` prints `help` and gives `None`; a positional argument is a
    /// usage error.
    pub fn parse_options(
        cmd: &'static str,
        args: &[String],
        valued: &[&str],
        switches: &[&str],
        help: &str,
    ) -> AnyResult<Option<Self>> {
        let f = Self::parse(cmd, args, valued, switches)?;
        if f.help {
            println!("{help}");
            return Ok(None);
        }
        f.no_positional()?;
        Ok(Some(f))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|n| n == name)
    }

    /// A required value.
    pub fn required(&self, name: &str) -> AnyResult<&str> {
        match self.get(name) {
            Some(v) => Ok(v),
            None => usage(self.cmd, format!("missing {name}")),
        }
    }

    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.get(name).map(PathBuf::from)
    }

    /// A value parsed as `T`, or `None` when the flag is absent.
    pub fn parsed<T: FromStr>(&self, name: &str) -> AnyResult<Option<T>>
    where
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<T>() {
                Ok(x) => Ok(Some(x)),
                Err(e) => usage(self.cmd, format!("{name} '{v}': {e}")),
            },
        }
    }

    /// A parsed value with a default.
    pub fn parsed_or<T: FromStr>(&self, name: &str, default: T) -> AnyResult<T>
    where
        T::Err: fmt::Display,
    {
        Ok(self.parsed(name)?.unwrap_or(default))
    }

    /// A positive integer with a default.
    pub fn positive_or(&self, name: &str, default: usize) -> AnyResult<usize> {
        let v: usize = self.parsed_or(name, default)?;
        if v == 0 {
            return usage(self.cmd, format!("{name} must be at least 1"));
        }
        Ok(v)
    }

    /// A comma-separated list (`1,0.5`), or `None` when the flag is absent.
    pub fn list<T: FromStr>(&self, name: &str) -> AnyResult<Option<Vec<T>>>
    where
        T::Err: fmt::Display,
    {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for item in v.split(',') {
            match item.trim().parse::<T>() {
                Ok(x) => out.push(x),
                Err(e) => {
                    return usage(self.cmd, format!("{name} '{v}': item '{item}': {e}"));
                }
            }
        }
        Ok(Some(out))
    }

    /// Fail on positional arguments the subcommand does not take.
    pub fn no_positional(&self) -> AnyResult<()> {
        match self.positional.first() {
            None => Ok(()),
            Some(p) => usage(
                self.cmd,
                format!("unexpected argument '{p}' for `modular {}`", self.cmd),
            ),
        }
    }
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

impl AtomicDir {
    /// Check that `dest` may be written (absent, an empty folder, or
    /// `force`), and create the temporary folder.
    pub fn new(dest: &Path, force: bool) -> AnyResult<Self> {
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
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| format!("cannot clear {}: {e}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
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
        }
    }
}

/// Write `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> AnyResult<()> {
    let text = serde_json::to_string_pretty(value)?;
    tensor_core::io::write_atomic(path, |tmp| {
        std::fs::write(tmp, format!("{text}\n")).map_err(|source| tensor_core::Error::Io {
            path: path.to_owned(),
            source,
        })
    })?;
    Ok(())
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

    fn args(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| (*s).to_owned()).collect()
    }

    fn parse(xs: &[&str]) -> AnyResult<Flags> {
        Flags::parse("t", &args(xs), &["--out", "--n", "--w"], &["--quiet"])
    }

    fn usage_msg(r: AnyResult<Flags>) -> String {
        let e = r.unwrap_err();
        assert_eq!(exit_code(e.as_ref()), 2, "{e}");
        e.to_string()
    }

    #[test]
    fn flags_values_switches_and_positionals() {
        let f = parse(&["a", "--out=x", "--n", "3", "--quiet", "b", "--", "--w"]).unwrap();
        assert_eq!(f.positional, ["a", "b", "--w"]);
        assert_eq!(f.get("--out"), Some("x"));
        assert_eq!(f.parsed_or::<usize>("--n", 1).unwrap(), 3);
        assert!(f.switch("--quiet") && !f.help);
        assert_eq!(f.parsed::<f64>("--w").unwrap(), None);
        let f = parse(&["--w", "1, -0.5,2e-1"]).unwrap();
        assert_eq!(f.list::<f64>("--w").unwrap(), Some(vec![1.0, -0.5, 0.2]));
        assert!(parse(&["-h"]).unwrap().help);
    }

    #[test]
    fn flag_mistakes_are_usage_errors_naming_the_flag() {
        assert!(usage_msg(parse(&["--out"])).contains("--out needs a value"));
        assert!(usage_msg(parse(&["--out", "a", "--out", "b"])).contains("--out is given twice"));
        assert!(usage_msg(parse(&["--quiet=1"])).contains("--quiet takes no value"));
        let m = usage_msg(parse(&["--outt", "x"]));
        assert!(m.contains("unknown option '--outt'") && m.contains("--n, --out, --quiet, --w"));
        let f = parse(&["--n", "0", "--w", "1,a"]).unwrap();
        assert!(
            usage_msg(f.positive_or("--n", 1).map(|_| Flags::default()))
                .contains("--n must be at least 1")
        );
        assert!(usage_msg(f.list::<f64>("--w").map(|_| Flags::default())).contains("item 'a'"));
        assert!(usage_msg(f.required("--out").map(|_| Flags::default())).contains("missing --out"));
        let other: Box<dyn std::error::Error> = "disk full".into();
        assert_eq!(exit_code(other.as_ref()), 1);
    }

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
}
