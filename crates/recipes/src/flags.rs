//! The command-line flag parser shared by the `modular` binary and the
//! experiments: `--flag value` / `--flag=value` with switches and positional
//! arguments, each value parsed with an error naming the flag, and
//! [`UsageError`] for a malformed command line (exit code 2; every other
//! error exits with 1).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Any error, boxed: what the commands return.
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
    // The experiments run through xtask; every other command is `modular`'s.
    let program = if cmd.starts_with("experiment") {
        "cargo xtask"
    } else {
        "modular"
    };
    Err(Box::new(UsageError(format!(
        "{msg}\n(run `{program} {cmd} --help` for usage)"
    ))))
}

/// Exit code for an error: 2 for a usage error, 1 for anything else.
/// The arguments without `--out X` (and `--out=X`): the part of an
/// experiment's command line that its page shows, since `--out` only says
/// where the page goes.
pub fn without_out(args: &[String]) -> Vec<&str> {
    let mut shown = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--out" {
            it.next();
        } else if !a.starts_with("--out=") {
            shown.push(a.as_str());
        }
    }
    shown
}

pub fn exit_code(e: &(dyn std::error::Error + 'static)) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}

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

    /// `--seeds` as a list (default `default`): at least one, none twice, as
    /// paired comparisons need distinct seeds.
    pub fn seeds(&self, default: Vec<u64>) -> AnyResult<Vec<u64>> {
        let seeds = self.list("--seeds")?.unwrap_or(default);
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if seeds.is_empty() {
            return usage(self.cmd, "--seeds needs at least one value");
        }
        if distinct.len() != seeds.len() {
            return usage(
                self.cmd,
                "--seeds: a seed appears twice (pairs need distinct seeds)",
            );
        }
        Ok(seeds)
    }

    /// A learning rate: a finite number above 0 (and at most 1, beyond which
    /// no optimiser here converges), checked alike in every command.
    pub fn learning_rate(&self, name: &str, default: f64) -> AnyResult<f64> {
        let lr: f64 = self.parsed_or(name, default)?;
        if !(lr.is_finite() && lr > 0.0 && lr <= 1.0) {
            return usage(
                self.cmd,
                format!("{name} must be a number in (0, 1], got {lr}"),
            );
        }
        Ok(lr)
    }

    /// A comma-separated list in which no value appears twice.
    pub fn distinct_list<T: FromStr + PartialEq + fmt::Display>(
        &self,
        name: &str,
    ) -> AnyResult<Option<Vec<T>>>
    where
        T::Err: fmt::Display,
    {
        let Some(v) = self.list::<T>(name)? else {
            return Ok(None);
        };
        if let Some(x) = v
            .iter()
            .enumerate()
            .find_map(|(i, x)| v[..i].contains(x).then_some(x))
        {
            return usage(self.cmd, format!("{name}: {x} is given twice"));
        }
        Ok(Some(v))
    }

    /// The `--out` path must not be one of the inputs (nor inside one, nor
    /// hold one): writing it would replace what is being read.
    pub fn out_not_input(&self, out: &Path, inputs: &[(&str, &Path)]) -> AnyResult<()> {
        let o = absolute(out);
        for (flag, input) in inputs {
            let i = absolute(input);
            if o == i || o.starts_with(&i) || i.starts_with(&o) {
                return usage(
                    self.cmd,
                    format!(
                        "--out {} would overwrite the input {flag} {}; choose another output",
                        out.display(),
                        input.display()
                    ),
                );
            }
        }
        Ok(())
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

/// `p` made absolute and with symbolic links resolved as far as it exists
/// (an output usually does not exist yet).
fn absolute(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    // `a/b/../c` as `a/c` (lexically), so a path that does not exist yet
    // still compares by what it names.
    let mut abs_clean = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                abs_clean.pop();
            }
            std::path::Component::CurDir => {}
            other => abs_clean.push(other),
        }
    }
    let abs = abs_clean;
    let mut head = abs.clone();
    let mut tail = Vec::new();
    while !head.exists() {
        match (head.file_name().map(|n| n.to_owned()), head.parent()) {
            (Some(n), Some(parent)) => {
                tail.push(n);
                head = parent.to_owned();
            }
            _ => return abs,
        }
    }
    let mut out = head.canonicalize().unwrap_or(head);
    for n in tail.into_iter().rev() {
        out.push(n);
    }
    out
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
    fn learning_rates_lists_and_outputs_are_checked_alike() {
        let f = |xs: &[&str]| Flags::parse("t", &args(xs), &["--lr", "--layers"], &[]).unwrap();
        assert_eq!(f(&[]).learning_rate("--lr", 1e-3).unwrap(), 1e-3);
        assert_eq!(
            f(&["--lr", "5e-5"]).learning_rate("--lr", 1e-3).unwrap(),
            5e-5
        );
        for bad in ["0", "-1e-3", "nan", "inf", "2"] {
            let e = f(&["--lr", bad]).learning_rate("--lr", 1e-3).unwrap_err();
            assert_eq!(exit_code(e.as_ref()), 2);
            assert!(
                e.to_string().contains("--lr must be a number in (0, 1]"),
                "{e}"
            );
        }
        assert_eq!(
            f(&["--layers", "3,1"])
                .distinct_list::<usize>("--layers")
                .unwrap(),
            Some(vec![3, 1])
        );
        let e = f(&["--layers", "1,3,1"])
            .distinct_list::<usize>("--layers")
            .unwrap_err();
        assert_eq!(exit_code(e.as_ref()), 2);
        assert!(e.to_string().contains("--layers: 1 is given twice"), "{e}");
        // --out may not be an input, inside one, or hold one (through `..` too).
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("adapters/a");
        std::fs::create_dir_all(&input).unwrap();
        let g = f(&[]);
        g.out_not_input(&dir.path().join("merged"), &[("ADAPTER", &input)])
            .unwrap();
        for out in [
            input.clone(),
            input.join("x"),
            dir.path().join("adapters"),
            dir.path().join("adapters/b/../a"),
        ] {
            let e = g.out_not_input(&out, &[("ADAPTER", &input)]).unwrap_err();
            assert_eq!(exit_code(e.as_ref()), 2);
            assert!(
                e.to_string().contains("would overwrite the input ADAPTER"),
                "{e}"
            );
        }
    }

    #[test]
    fn seeds_default_parse_and_must_be_distinct() {
        let seeds = |xs: &[&str]| {
            Flags::parse("t", &args(xs), &["--seeds"], &[]).and_then(|f| f.seeds(vec![0, 1, 2]))
        };
        assert_eq!(seeds(&[]).unwrap(), vec![0, 1, 2]);
        assert_eq!(seeds(&["--seeds", "4,2"]).unwrap(), vec![4, 2]);
        let twice = seeds(&["--seeds", "2,2"]).unwrap_err();
        assert_eq!(exit_code(twice.as_ref()), 2);
        assert!(twice.to_string().contains("appears twice"));
        assert!(
            seeds(&["--seeds", "1,x"])
                .unwrap_err()
                .to_string()
                .contains("--seeds")
        );
    }
}
