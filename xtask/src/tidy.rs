//! `cargo xtask tidy`: the architecture rules no compiler checks, checked on
//! the repository's files (and run by `cargo xtask test`):
//!
//! 1. a method crate's `[dependencies]` name no workspace crate but
//!    `tensor-core` (the à-la-carte promise: one method, one crate);
//! 2. every Rust source file opens with a `//!` header;
//! 3. no library crate's `src/` (a published crate with a `lib.rs`) reaches
//!    outside the crate through `CARGO_MANIFEST_DIR` (test modules aside);
//! 4. every repository path cited in the docs and in comments exists, and
//!    nothing cites a path outside the repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The crates that implement one method each.
pub const METHOD_CRATES: &[&str] = &[
    "pet-core",
    "moe-router",
    "emergent-split",
    "m2mkd",
    "orthogonal-merge",
    "configurable-bricks",
];

/// Top-level folders whose paths docs and comments cite.
const CITED_ROOTS: &[&str] = &["crates/", "docs/", "data/", "xtask/", "benches/", ".ci/"];

/// Every rule broken under `root`, one line each (`FILE: what`); empty when
/// the tree is tidy.
pub fn check(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let crates = workspace_crates(root);
    let names: BTreeSet<&str> = crates.iter().map(|(n, _)| n.as_str()).collect();
    for (name, dir) in &crates {
        let manifest = read(&dir.join("Cargo.toml"));
        if METHOD_CRATES.contains(&name.as_str()) {
            for dep in dependencies(&manifest) {
                if names.contains(dep.as_str()) && dep != "tensor-core" {
                    out.push(format!(
                        "{}: method crate {name} depends on workspace crate {dep} \
                         (method crates may depend on tensor-core only)",
                        rel(root, &dir.join("Cargo.toml"))
                    ));
                }
            }
        }
        let library = dir.join("src/lib.rs").is_file() && !manifest.contains("publish = false");
        for file in rust_files(&dir.join("src")) {
            let text = read(&file);
            if library {
                let before_tests = text.split("#[cfg(test)]").next().unwrap_or("");
                if before_tests.contains("CARGO_MANIFEST_DIR") {
                    out.push(format!(
                        "{}: library code reaches outside its crate through CARGO_MANIFEST_DIR",
                        rel(root, &file)
                    ));
                }
            }
        }
    }
    let mut sources = Vec::new();
    for (_, dir) in &crates {
        for sub in ["src", "tests", "benches", "examples"] {
            sources.extend(rust_files(&dir.join(sub)));
        }
    }
    sources.extend(rust_files(&root.join("xtask/src")));
    sources.extend(rust_files(&root.join("benches")));
    for file in &sources {
        let text = read(file);
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.starts_with("//!") {
            out.push(format!(
                "{}: does not open with a `//!` header",
                rel(root, file)
            ));
        }
        let comments: String = text
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        out.extend(cited_paths(root, file, &comments, false));
    }
    let mut docs = vec![root.join("README.md")];
    docs.extend(files_with(&root.join("docs"), "md"));
    for (_, dir) in &crates {
        docs.extend(files_with(dir, "md"));
    }
    for file in docs.iter().filter(|f| f.is_file()) {
        out.extend(cited_paths(root, file, &read(file), true));
    }
    out.sort();
    out.dedup();
    out
}

/// `(package name, folder)` of each crate under `crates/`, sorted.
fn workspace_crates(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root.join("crates")) else {
        return out;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let manifest = read(&dir.join("Cargo.toml"));
        if let Some(name) = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = \""))
            .and_then(|r| r.strip_suffix('"'))
        {
            out.push((name.to_owned(), dir));
        }
    }
    out.sort();
    out
}

/// The names in a manifest's `[dependencies]` table.
fn dependencies(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            inside = l == "[dependencies]";
            continue;
        }
        if !inside || l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some(key) = l.split(['=', '.']).next() {
            out.push(key.trim().trim_matches('"').to_owned());
        }
    }
    out
}

/// Problems with the paths `text` (of `file`) cites: repository paths in
/// backticks, and, in markdown, relative link targets; anything naming
/// the project's shared folder (beside the repository, not in a clone) lies
/// outside the repository.
fn cited_paths(root: &Path, file: &Path, text: &str, markdown: bool) -> Vec<String> {
    let mut out = Vec::new();
    // Spelled in two pieces so that this file does not cite it.
    let outside = [concat!("shared", "/docs"), concat!("..", "/shared/")];
    if outside.iter().any(|o| text.contains(o)) {
        out.push(format!(
            "{}: cites a path outside the repository (the shared folder)",
            rel(root, file)
        ));
    }
    for quoted in text.split('`').skip(1).step_by(2) {
        let p = quoted.trim();
        if !CITED_ROOTS.iter().any(|r| p.starts_with(r)) || is_pattern(p) {
            continue;
        }
        let p = strip_suffixes(p);
        if !root.join(p).exists() {
            out.push(format!(
                "{}: cites `{p}`, which does not exist",
                rel(root, file)
            ));
        }
    }
    if markdown {
        for part in text.split("](").skip(1) {
            let Some(target) = part.split(')').next() else {
                continue;
            };
            let target = target.split_whitespace().next().unwrap_or("");
            if target.is_empty()
                || target.contains("://")
                || target.starts_with('#')
                || target.starts_with("mailto:")
                || is_pattern(target)
            {
                continue;
            }
            let p = strip_suffixes(target);
            let base = file.parent().unwrap_or(root);
            if !base.join(p).exists() {
                out.push(format!(
                    "{}: links to `{p}`, which does not exist",
                    rel(root, file)
                ));
            }
        }
    }
    out
}

/// A placeholder or pattern rather than a path (`crates/*/src`,
/// `docs/results/NAME.md`, `crates/<crate>`, `data/{a,b}`).
fn is_pattern(p: &str) -> bool {
    p.contains(['*', '<', '{', ' ', '$', '|'])
        || p.split('/').any(|seg| {
            let stem = seg.split('.').next().unwrap_or(seg);
            stem.len() > 1
                && stem.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                && stem != "README"
        })
}

/// A cited path without `#anchor`, `:LINE` or a trailing punctuation mark.
fn strip_suffixes(p: &str) -> &str {
    let p = p.split('#').next().unwrap_or(p);
    let p = match p.rsplit_once(':') {
        Some((a, b)) if b.chars().all(|c| c.is_ascii_digit() || c == '-') => a,
        _ => p,
    };
    p.trim_end_matches(['.', ',', ';', ')'])
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, "rs")
}

/// Files under `dir` (recursively, `target` and hidden folders skipped)
/// with extension `ext`, sorted.
fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" || name == "fixtures" {
            continue;
        }
        if p.is_dir() {
            out.extend(files_with(&p, ext));
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small tidy tree in a fresh temporary folder.
    fn tree(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("xtask-tidy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let w = |p: &str, s: &str| {
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, s).unwrap();
        };
        w(
            "README.md",
            "# x\nSee [docs](docs/pet-core.md) and `crates/pet-core/src/lib.rs`.\n",
        );
        w(
            "docs/pet-core.md",
            "# pet-core\n`crates/*/src` is a pattern; `docs/results/NAME.md` too.\n",
        );
        w(
            "crates/tensor-core/Cargo.toml",
            "[package]\nname = \"tensor-core\"\n[dependencies]\ntch = \"1\"\n",
        );
        w(
            "crates/tensor-core/src/lib.rs",
            "//! Core.\npub fn f() {}\n",
        );
        w(
            "crates/pet-core/Cargo.toml",
            "[package]\nname = \"pet-core\"\n[dependencies]\ntensor-core.workspace = true\n\
             serde = \"1\"\n[dev-dependencies]\nmodel-zoo = { path = \"../model-zoo\" }\n",
        );
        w(
            "crates/pet-core/src/lib.rs",
            "//! PET (`docs/pet-core.md`).\npub fn g() {}\n#[cfg(test)]\nmod t {\n    \
             const D: &str = env!(\"CARGO_MANIFEST_DIR\");\n}\n",
        );
        w(
            "crates/model-zoo/Cargo.toml",
            "[package]\nname = \"model-zoo\"\n",
        );
        w("crates/model-zoo/src/lib.rs", "//! Models.\n");
        w("xtask/src/main.rs", "//! Tasks.\nfn main() {}\n");
        root
    }

    #[test]
    fn a_tidy_tree_passes() {
        let root = tree("clean");
        assert_eq!(check(&root), Vec::<String>::new());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn each_planted_violation_is_reported() {
        let root = tree("planted");
        let w = |p: &str, s: &str| std::fs::write(root.join(p), s).unwrap();
        // 1. a method crate depending on another workspace crate;
        w(
            "crates/pet-core/Cargo.toml",
            "[package]\nname = \"pet-core\"\n[dependencies]\ntensor-core.workspace = true\n\
             model-zoo = { path = \"../model-zoo\" }\n",
        );
        // 2. a file without its header; 3. a library reaching out of its crate;
        w(
            "crates/model-zoo/src/lib.rs",
            "pub fn d() -> &'static str { env!(\"CARGO_MANIFEST_DIR\") }\n",
        );
        // 4. dead citations: a missing repository path, a broken link, a path outside.
        w(
            "docs/pet-core.md",
            "See `crates/pet-core/src/gone.rs`, [x](missing.md) and ../shared/docs/METHODS.md.\n",
        );
        let found = check(&root);
        let has = |needle: &str| found.iter().any(|l| l.contains(needle));
        assert!(
            has(
                "crates/pet-core/Cargo.toml: method crate pet-core depends on workspace crate model-zoo"
            ),
            "{found:#?}"
        );
        assert!(
            has("crates/model-zoo/src/lib.rs: does not open with a `//!` header"),
            "{found:#?}"
        );
        assert!(
            has("crates/model-zoo/src/lib.rs: library code reaches outside"),
            "{found:#?}"
        );
        assert!(
            has("docs/pet-core.md: cites `crates/pet-core/src/gone.rs`"),
            "{found:#?}"
        );
        assert!(has("docs/pet-core.md: links to `missing.md`"), "{found:#?}");
        assert!(
            has("docs/pet-core.md: cites a path outside the repository"),
            "{found:#?}"
        );
        assert_eq!(found.len(), 6, "{found:#?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
