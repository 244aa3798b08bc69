//! The project's real text-classification data: JSONL files, one object per
//! line with `text` (string) and `label` (integer), as in `data/`.
//!
//! A malformed line is an error naming the file and the line, never skipped
//! silently.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextExample {
    pub text: String,
    pub label: i64,
}

/// The environment variable naming the project's `data/` folder.
pub const DATA_DIR_VAR: &str = "MODULAR_DATA_DIR";

/// The project's `data/` folder, found at run time (the library bakes in no
/// path of the checkout it was built in): `$MODULAR_DATA_DIR` when set, else
/// the `data/` folder beside a `Cargo.toml` in the current directory or the
/// nearest parent that has one (a checkout of this repository).
pub fn data_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os(DATA_DIR_VAR).filter(|d| !d.is_empty()) {
        let p = PathBuf::from(d);
        return if p.is_dir() {
            Ok(p)
        } else {
            Err(Error::file(&p, format!("{DATA_DIR_VAR} names no folder")))
        };
    }
    let cwd = std::env::current_dir()
        .map_err(|e| Error::file(".", format!("cannot read the current folder: {e}")))?;
    cwd.ancestors()
        .find(|d| d.join("data").is_dir() && d.join("Cargo.toml").is_file())
        .map(|d| d.join("data"))
        .ok_or_else(|| {
            Error::file(
                &cwd,
                format!(
                    "no data/ folder here or in a parent (run inside the repository, or set {DATA_DIR_VAR})"
                ),
            )
        })
}

/// The most classes a text classifier may have: a label id at or above it is
/// refused where it is read (FILE:LINE), before anything is allocated for it.
pub const MAX_LABELS: i64 = 100_000;

/// The number of classes the labelled `sets` (name, examples) imply, once
/// they are checked: the labels, over all sets, must be exactly `0..K` with
/// no id missing, and `train` (the first set) must hold at least two. A
/// missing id is an error listing it (a classifier would otherwise train
/// classes that never occur), as is a training set of one class.
pub fn check_labels(what: &Path, sets: &[(&str, &[TextExample])]) -> Result<i64> {
    let mut seen = std::collections::BTreeSet::new();
    for (_, set) in sets {
        seen.extend(set.iter().map(|e| e.label));
    }
    let Some(&max) = seen.last() else {
        return Err(Error::file(what, "no labelled examples"));
    };
    if let Some((name, train)) = sets.first() {
        let distinct: Vec<i64> = train
            .iter()
            .map(|e| e.label)
            .collect::<std::collections::BTreeSet<i64>>()
            .into_iter()
            .collect();
        if distinct.len() < 2 {
            return Err(Error::file(
                what,
                format!(
                    "the {name} examples have {} distinct label(s) ({:?}); a classifier needs at least two",
                    distinct.len(),
                    distinct
                ),
            ));
        }
    }
    let missing: Vec<i64> = (0..=max).filter(|l| !seen.contains(l)).collect();
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(8).map(i64::to_string).collect();
        let more = if missing.len() > 8 { ", ..." } else { "" };
        return Err(Error::file(
            what,
            format!(
                "labels must be the class ids 0..{max} with none missing, but {} never occur(s): {}{more} \
                 (renumber the labels 0..K-1)",
                missing.len(),
                shown.join(", ")
            ),
        ));
    }
    Ok(max + 1)
}

/// The non-blank lines of a JSONL file, each parsed as a JSON object, with
/// its 1-based line number. A UTF-8 byte-order mark and CRLF line ends are
/// accepted; invalid UTF-8, invalid JSON or a line that is not an object is
/// an error at FILE:LINE, and so is a file with no rows.
pub fn jsonl_rows(path: impl AsRef<Path>) -> Result<Vec<(usize, Value)>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let err = |line: usize, reason: String| Error::Data {
        path: path.to_owned(),
        line,
        reason,
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let raw = std::str::from_utf8(raw).map_err(|e| {
            err(
                n,
                format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
            )
        })?;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(raw).map_err(|e| err(n, format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(err(n, "not a JSON object".into()));
        }
        rows.push((n, v));
    }
    if rows.is_empty() {
        return Err(Error::file(path, "no examples"));
    }
    Ok(rows)
}

/// The `text` of one row, or an error at FILE:LINE.
fn row_text(path: &Path, n: usize, v: &Value) -> Result<String> {
    let err = |reason: &str| Error::Data {
        path: path.to_owned(),
        line: n,
        reason: reason.to_owned(),
    };
    v.get("text")
        .ok_or_else(|| err("no 'text' field"))?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| err("'text' is not a string"))
}

/// The texts of a JSONL file's rows (any other field is ignored).
pub fn load_texts(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    jsonl_rows(path)?
        .iter()
        .map(|(n, v)| row_text(path, *n, v))
        .collect()
}

/// Read a JSONL file of `{"text": ..., "label": ...}` rows.
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<Vec<TextExample>> {
    let path = path.as_ref();
    let err = |line: usize, reason: String| Error::Data {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut out = Vec::new();
    for (n, v) in jsonl_rows(path)? {
        let text = row_text(path, n, &v)?;
        let label = v
            .get("label")
            .ok_or_else(|| err(n, "no 'label' field".into()))?
            .as_i64()
            .ok_or_else(|| err(n, format!("'label' is not an integer: {}", v["label"])))?;
        if label < 0 {
            return Err(err(n, format!("negative label {label}")));
        }
        if label >= MAX_LABELS {
            return Err(err(
                n,
                format!(
                    "label {label} is above the largest class id supported ({}); \
                     labels are class ids 0..K-1",
                    MAX_LABELS - 1
                ),
            ));
        }
        out.push(TextExample { text, label });
    }
    Ok(out)
}

/// A labelled text-classification dataset with its splits.
#[derive(Debug, Clone)]
pub struct TextClassification {
    pub dir: PathBuf,
    pub train: Vec<TextExample>,
    pub validation: Vec<TextExample>,
    /// In-domain test set.
    pub test: Vec<TextExample>,
    /// Out-of-domain test set (`test_ood.jsonl`), when present.
    pub test_ood: Option<Vec<TextExample>>,
    pub num_labels: i64,
}

impl TextClassification {
    /// `train.jsonl`, `validation.jsonl`, `test_id.jsonl` and, when present, `test_ood.jsonl` from `dir`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        let train = load_jsonl(dir.join("train.jsonl"))?;
        let validation = load_jsonl(dir.join("validation.jsonl"))?;
        let test = load_jsonl(dir.join("test_id.jsonl"))?;
        let ood = dir.join("test_ood.jsonl");
        let test_ood = if ood.is_file() {
            Some(load_jsonl(ood)?)
        } else {
            None
        };
        let num_labels = check_labels(
            &dir,
            &[
                ("train.jsonl", &train),
                ("validation.jsonl", &validation),
                ("test_id.jsonl", &test),
            ],
        )?;
        if let Some(ood) = &test_ood
            && let Some(e) = ood.iter().find(|e| e.label >= num_labels)
        {
            return Err(Error::file(
                dir.join("test_ood.jsonl"),
                format!(
                    "label {} is not one of the {num_labels} classes of the in-domain splits",
                    e.label
                ),
            ));
        }
        Ok(Self {
            dir,
            train,
            validation,
            test,
            test_ood,
            num_labels,
        })
    }

    /// The project's sentiment data (`data/sentiment_domains` in the repository).
    pub fn sentiment() -> Result<Self> {
        Self::load(data_root()?.join("sentiment_domains"))
    }
}

/// Share of the most frequent label: the accuracy to beat.
pub fn majority_rate(examples: &[TextExample]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for e in examples {
        *counts.entry(e.label).or_insert(0usize) += 1;
    }
    counts.values().copied().max().unwrap_or(0) as f64 / examples.len().max(1) as f64
}

/// A labelled image set: `images [N, 1, rows, cols]` f32 scaled to 0..1, `labels [N]` i64.
#[derive(Debug)]
pub struct ImageSet {
    pub images: tensor_core::tch::Tensor,
    pub labels: tensor_core::tch::Tensor,
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .map_err(|e| Error::file(path, format!("not a valid gzip file: {e}")))?;
    Ok(out)
}

fn be_u32(path: &Path, b: &[u8], at: usize) -> Result<usize> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| Error::file(path, "truncated IDX header"))
}

/// Read `{split}-images-idx3-ubyte.gz` and `{split}-labels-idx1-ubyte.gz`
/// (the MNIST IDX format) from `dir`; pixels are divided by `max_pixel`
/// (16 for the 8x8 digits, 255 for MNIST).
pub fn load_idx(dir: impl AsRef<Path>, split: &str, max_pixel: f32) -> Result<ImageSet> {
    let dir = dir.as_ref();
    let ip = dir.join(format!("{split}-images-idx3-ubyte.gz"));
    let lp = dir.join(format!("{split}-labels-idx1-ubyte.gz"));
    let (img, lab) = (read_gz(&ip)?, read_gz(&lp)?);
    if be_u32(&ip, &img, 0)? != 0x0803 {
        return Err(Error::file(
            &ip,
            "not an IDX image file (magic != 0x00000803)",
        ));
    }
    if be_u32(&lp, &lab, 0)? != 0x0801 {
        return Err(Error::file(
            &lp,
            "not an IDX label file (magic != 0x00000801)",
        ));
    }
    let (n, rows, cols) = (
        be_u32(&ip, &img, 4)?,
        be_u32(&ip, &img, 8)?,
        be_u32(&ip, &img, 12)?,
    );
    if be_u32(&lp, &lab, 4)? != n {
        return Err(Error::file(
            &lp,
            format!("{} labels for {n} images", be_u32(&lp, &lab, 4)?),
        ));
    }
    let pixels = img.get(16..16 + n * rows * cols).ok_or_else(|| {
        Error::file(
            &ip,
            format!("truncated: {n} images of {rows}x{cols} need more bytes"),
        )
    })?;
    let labels = lab
        .get(8..8 + n)
        .ok_or_else(|| Error::file(&lp, "truncated"))?;
    let pixels: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / max_pixel).collect();
    let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    Ok(ImageSet {
        images: tensor_core::tch::Tensor::from_slice(&pixels).f_view([
            n as i64,
            1,
            rows as i64,
            cols as i64,
        ])?,
        labels: tensor_core::tch::Tensor::from_slice(&labels),
    })
}

/// The project's 8x8 digits (`data/images/digits`), pixels in 0..1.
pub fn digits(split: &str) -> Result<ImageSet> {
    load_idx(data_root()?.join("images/digits"), split, 16.0)
}

/// The project's Fashion-MNIST subset (`data/images/fashion_mnist`: 28x28,
/// 1000 training and 200 test images per class), pixels in 0..1.
pub fn fashion_mnist(split: &str) -> Result<ImageSet> {
    load_idx(data_root()?.join("images/fashion_mnist"), split, 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_core::tch::Tensor;

    #[test]
    fn malformed_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let cases = [
            ("{\"text\": \"ok\", \"label\": 1}\n{broken\n", 2, "JSON"),
            ("{\"label\": 1}\n", 1, "'text'"),
            ("{\"text\": \"a\", \"label\": \"pos\"}\n", 1, "'label'"),
            ("\n{\"text\": 3, \"label\": 1}\n", 2, "'text'"),
            ("{\"text\": \"a\", \"label\": -1}\n", 1, "negative"),
            // A huge class id is refused where it is read, before any allocation.
            (
                "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1000000000000}\n",
                2,
                "above the largest class id",
            ),
        ];
        for (content, line, what) in cases {
            std::fs::write(&p, content).unwrap();
            let e = load_jsonl(&p).unwrap_err().to_string();
            assert!(
                e.contains(&format!("d.jsonl:{line}:")) && e.contains(what),
                "{e}"
            );
        }
        // Invalid UTF-8 is named by line; a byte-order mark and CRLF are fine.
        std::fs::write(
            &p,
            b"{\"text\": \"a\", \"label\": 0}\n{\"text\": \"\xff\", \"label\": 1}\n",
        )
        .unwrap();
        let e = load_jsonl(&p).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl:2:") && e.contains("not valid UTF-8"),
            "{e}"
        );
        std::fs::write(
            &p,
            "\u{feff}{\"text\": \"a\", \"label\": 0}\r\n{\"text\": \"b\", \"label\": 1}\r\n",
        )
        .unwrap();
        let rows = load_jsonl(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].text, "a");
        std::fs::write(&p, "").unwrap();
        assert!(
            load_jsonl(&p)
                .unwrap_err()
                .to_string()
                .contains("no examples")
        );
    }

    #[test]
    fn labels_must_be_dense_class_ids_with_two_in_training() {
        let ex = |labels: &[i64]| -> Vec<TextExample> {
            labels
                .iter()
                .map(|&label| TextExample {
                    text: "t".into(),
                    label,
                })
                .collect()
        };
        let p = Path::new("d.jsonl");
        let (train, held) = (ex(&[0, 1, 2, 1]), ex(&[2, 0]));
        assert_eq!(
            check_labels(p, &[("train", &train), ("held", &held)]).unwrap(),
            3
        );
        // One label only in training.
        let e = check_labels(p, &[("train", &ex(&[1, 1])), ("held", &ex(&[0]))])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.jsonl") && e.contains("1 distinct label(s) ([1])"),
            "{e}"
        );
        // Labels 0 and 7 only: the unused ids are named.
        let e = check_labels(p, &[("train", &ex(&[0, 7, 0])), ("held", &ex(&[7]))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("6 never occur(s): 1, 2, 3, 4, 5, 6"), "{e}");
        // A class seen only outside training still counts as present.
        assert_eq!(
            check_labels(p, &[("train", &ex(&[0, 1])), ("held", &ex(&[2]))]).unwrap(),
            3
        );
        // Through a dataset folder, and an out-of-domain label beyond the classes.
        let dir = tempfile::tempdir().unwrap();
        let line = |l: i64| format!("{{\"text\": \"x\", \"label\": {l}}}\n");
        for (f, ls) in [
            ("train.jsonl", vec![0, 3]),
            ("validation.jsonl", vec![0]),
            ("test_id.jsonl", vec![3]),
        ] {
            std::fs::write(
                dir.path().join(f),
                ls.into_iter().map(line).collect::<String>(),
            )
            .unwrap();
        }
        let e = TextClassification::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 never occur(s): 1, 2"), "{e}");
        std::fs::write(dir.path().join("train.jsonl"), line(0) + &line(1)).unwrap();
        std::fs::write(dir.path().join("test_id.jsonl"), line(1)).unwrap();
        std::fs::write(dir.path().join("test_ood.jsonl"), line(5)).unwrap();
        let e = TextClassification::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test_ood.jsonl") && e.contains("label 5 is not one of the 2 classes"),
            "{e}"
        );
    }

    #[test]
    fn the_sentiment_data_loads() {
        let d = TextClassification::sentiment().unwrap();
        assert_eq!(
            (d.train.len(), d.validation.len(), d.test.len()),
            (7770, 800, 1500)
        );
        assert_eq!(d.num_labels, 2);
        let m = majority_rate(&d.test);
        assert!((m - 762.0 / 1500.0).abs() < 1e-9, "{m}");
    }

    #[test]
    fn fashion_mnist_is_class_balanced_and_scaled() {
        let test = fashion_mnist("test").unwrap();
        assert_eq!(test.images.size(), [2000, 1, 28, 28]);
        let counts = test.labels.bincount::<Tensor>(None, 10);
        assert_eq!(Vec::<i64>::try_from(&counts).unwrap(), vec![200; 10]);
        let (lo, hi) = (
            test.images.min().double_value(&[]),
            test.images.max().double_value(&[]),
        );
        assert!(lo == 0.0 && hi == 1.0, "{lo} {hi}");
    }

    #[test]
    fn the_digits_load_and_bad_files_are_named() {
        let train = digits("train").unwrap();
        let test = digits("test").unwrap();
        assert_eq!(train.images.size(), [1438, 1, 8, 8]);
        assert_eq!(test.labels.size(), [359]);
        assert!(train.images.max().double_value(&[]) <= 1.0);
        assert_eq!(train.labels.max().int64_value(&[]), 9);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x-images-idx3-ubyte.gz"), b"not gzip").unwrap();
        std::fs::write(dir.path().join("x-labels-idx1-ubyte.gz"), b"not gzip").unwrap();
        let e = load_idx(dir.path(), "x", 1.0).unwrap_err().to_string();
        assert!(
            e.contains("x-images-idx3-ubyte.gz") && e.contains("gzip"),
            "{e}"
        );
    }
}
