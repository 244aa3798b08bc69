//! Cached expert labels: the spec's `labels_from_file` (docs/emergent-split.md,
//! Method, part 1, open choices). Different balanced k-means solvers reach different
//! labellings `a: [d_ff] → [N]` of equal quality, so reproducing a published
//! EMoE / MoEfication split (Qiu et al. 2023; Zhang et al. 2022) means
//! loading its labels rather than re-clustering.
//!
//! One labelling per FFN, keyed by its layer index (`"3"`) or its module path
//! (`"encoder.layer.3.(ffn)"`; an exact path wins over the index). Formats,
//! chosen by the file extension:
//! - **JSON** (`.json`): `{"num_experts": N, "labels": {"3": [0, 5, ...], ...}}`
//!   (`num_experts` optional), or the bare map `{"3": [...], ...}`;
//! - **safetensors** (`.safetensors`): one 1-D integer tensor per key;
//!   `num_experts` may sit in the metadata.
//!
//! Every labelling is checked before use ([`LabelFile::split_for`]): length
//! `d_ff`, each label in `0..N`, and balance (exactly `m = d_ff / N` neurons
//! per expert); errors name the file, the key and the first offending entry.
//! [`save_labels`] writes either format, e.g. to cache a k-means split.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tensor_core::tch::{Device, Kind, Tensor};

use crate::convert::layer_index;
use crate::error::{Error, Result, check_split};
use crate::split::{ExpertSplit, SplitMethod};

/// The labellings of one file, by key.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelFile {
    pub path: PathBuf,
    /// `N` the file declares, if any.
    pub num_experts: Option<usize>,
    /// Raw labels by key (validated only when used).
    pub entries: BTreeMap<String, Vec<i64>>,
}

fn err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Labels {
        file: path.display().to_string(),
        reason: reason.into(),
    }
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

impl LabelFile {
    /// Read a `.json` or `.safetensors` label file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if is_json(path) {
            Self::load_json(path)
        } else if is_safetensors(path) {
            Self::load_safetensors(path)
        } else {
            Err(err(
                path,
                "unknown format: the name must end in .json or .safetensors",
            ))
        }
    }

    fn load_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(path, format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err(path, "expected a JSON object of labels by layer"))?;
        let num_experts = match obj.get("num_experts") {
            None | Some(serde_json::Value::Null) => None,
            Some(n) => Some(n.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                err(
                    path,
                    format!("num_experts must be a positive integer, got {n}"),
                )
            })? as usize),
        };
        let map = match obj.get("labels") {
            Some(l) => l
                .as_object()
                .ok_or_else(|| err(path, "\"labels\" must be an object of arrays by layer"))?,
            None => obj,
        };
        let mut entries = BTreeMap::new();
        for (key, arr) in map {
            if obj.get("labels").is_none() && key == "num_experts" {
                continue;
            }
            let arr = arr
                .as_array()
                .ok_or_else(|| err(path, format!("`{key}`: expected an array of expert labels")))?;
            let labels = arr
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_i64().ok_or_else(|| {
                        err(
                            path,
                            format!("`{key}`: entry {i} is not an integer label ({x})"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            entries.insert(key.clone(), labels);
        }
        if entries.is_empty() {
            return Err(err(path, "no labels in the file"));
        }
        Ok(Self {
            path: path.to_owned(),
            num_experts,
            entries,
        })
    }

    fn load_safetensors(path: &Path) -> Result<Self> {
        let f = tensor_core::io::SafetensorsFile::open(path)?;
        let num_experts = match f.metadata().and_then(|m| m.get("num_experts")) {
            None => None,
            Some(s) => Some(s.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                err(
                    path,
                    format!("metadata num_experts = {s:?} is not a positive integer"),
                )
            })?),
        };
        let mut entries = BTreeMap::new();
        for name in f.names() {
            let t = f.load(&name, Device::Cpu)?;
            let kind = t.kind();
            if !matches!(
                kind,
                Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
            ) {
                return Err(err(
                    path,
                    format!("`{name}`: labels must be an integer tensor, found {kind:?}"),
                ));
            }
            if t.dim() != 1 {
                return Err(err(
                    path,
                    format!("`{name}`: labels must be 1-D [d_ff], found {:?}", t.size()),
                ));
            }
            let v = Vec::<i64>::try_from(&t.to_kind(Kind::Int64))?;
            entries.insert(name, v);
        }
        if entries.is_empty() {
            return Err(err(path, "no labels in the file"));
        }
        Ok(Self {
            path: path.to_owned(),
            num_experts,
            entries,
        })
    }

    /// The keys, in sorted order.
    pub fn keys(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// The raw labels for the FFN at `ffn_path`: the exact path's entry, else
    /// its layer index's.
    pub fn labels_for(&self, ffn_path: &str) -> Result<(&str, &[i64])> {
        if let Some((k, v)) = self.entries.get_key_value(ffn_path) {
            return Ok((k, v));
        }
        let layer = layer_index(ffn_path);
        if let Some(l) = layer
            && let Some((k, v)) = self.entries.get_key_value(&l.to_string())
        {
            return Ok((k, v));
        }
        Err(err(
            &self.path,
            format!(
                "no labels for the FFN at `{ffn_path}` ({}); the file has: {}",
                layer.map_or("no layer index".into(), |l| format!("layer {l}")),
                self.keys().join(", ")
            ),
        ))
    }

    /// The validated split of the FFN at `ffn_path` with `d_ff` neurons into
    /// `num_experts` experts: length, range and balance are checked.
    pub fn split_for(
        &self,
        ffn_path: &str,
        d_ff: usize,
        num_experts: usize,
    ) -> Result<ExpertSplit> {
        if let Some(n) = self.num_experts
            && n != num_experts
        {
            return Err(err(
                &self.path,
                format!(
                    "the file holds splits into N = {n} experts, the config asks for N = {num_experts}"
                ),
            ));
        }
        let (key, raw) = self.labels_for(ffn_path)?;
        let bad = |reason: String| err(&self.path, format!("`{key}`: {reason}"));
        let m = check_split(d_ff as i64, num_experts)? as usize;
        if raw.len() != d_ff {
            return Err(bad(format!(
                "{} labels for an FFN of d_ff = {d_ff} neurons",
                raw.len()
            )));
        }
        let mut load = vec![0usize; num_experts];
        let mut labels = Vec::with_capacity(d_ff);
        for (i, &l) in raw.iter().enumerate() {
            if l < 0 || l as u64 >= num_experts as u64 {
                return Err(bad(format!(
                    "label {l} of neuron {i} is not an expert of N = {num_experts} (labels are 0..{})",
                    num_experts - 1
                )));
            }
            load[l as usize] += 1;
            labels.push(l as usize);
        }
        if let Some(e) = load.iter().position(|&c| c != m) {
            return Err(bad(format!(
                "unbalanced: expert {e} has {} neurons, every expert needs exactly d_ff / N = {m}",
                load[e]
            )));
        }
        let mut s = ExpertSplit::from_labels(labels, num_experts)?;
        s.method = SplitMethod::FromFile;
        Ok(s)
    }
}

/// Write splits by key (layer index or FFN path) to a `.json` or
/// `.safetensors` file that [`LabelFile::load`] reads back. All splits must
/// have the same `N`.
pub fn save_labels(path: impl AsRef<Path>, splits: &[(String, &ExpertSplit)]) -> Result<()> {
    let path = path.as_ref();
    let n = splits
        .first()
        .map(|(_, s)| s.num_experts)
        .ok_or_else(|| err(path, "nothing to save"))?;
    if let Some((k, s)) = splits.iter().find(|(_, s)| s.num_experts != n) {
        return Err(err(
            path,
            format!("`{k}` has N = {}, the others N = {n}", s.num_experts),
        ));
    }
    if is_json(path) {
        let labels: BTreeMap<&str, &[usize]> = splits
            .iter()
            .map(|(k, s)| (k.as_str(), s.labels.as_slice()))
            .collect();
        let v = serde_json::json!({ "num_experts": n, "labels": labels });
        let text = serde_json::to_string(&v).map_err(|e| err(path, e.to_string()))?;
        tensor_core::io::write_atomic(path, |tmp| {
            std::fs::write(tmp, text.as_bytes()).map_err(|e| tensor_core::Error::Io {
                path: tmp.to_owned(),
                source: e,
            })
        })?;
        Ok(())
    } else if is_safetensors(path) {
        let tensors: Vec<(String, Tensor)> = splits
            .iter()
            .map(|(k, s)| {
                let v: Vec<i64> = s.labels.iter().map(|&l| l as i64).collect();
                (k.clone(), Tensor::from_slice(&v))
            })
            .collect();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let meta = HashMap::from([("num_experts".to_owned(), n.to_string())]);
        tensor_core::io::save(path, &refs, Some(meta))?;
        Ok(())
    } else {
        Err(err(
            path,
            "unknown format: the name must end in .json or .safetensors",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::random_split;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn reason(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn round_trip_both_formats_and_lookup_by_path_or_layer() {
        let dir = tempfile::tempdir().unwrap();
        let a = random_split(24, 4, 1).unwrap();
        let b = random_split(24, 4, 2).unwrap();
        for name in ["l.json", "l.safetensors"] {
            let p = dir.path().join(name);
            save_labels(
                &p,
                &[("3".into(), &a), ("encoder.layer.5.(ffn)".into(), &b)],
            )
            .unwrap();
            let f = LabelFile::load(&p).unwrap();
            assert_eq!(f.num_experts, Some(4));
            let s = f.split_for("encoder.layer.3.(ffn)", 24, 4).unwrap();
            assert_eq!(s.labels, a.labels);
            assert_eq!(s.method, SplitMethod::FromFile);
            assert_eq!(
                f.split_for("encoder.layer.5.(ffn)", 24, 4).unwrap().labels,
                b.labels
            );
            let e = reason(f.split_for("encoder.layer.7.(ffn)", 24, 4).unwrap_err());
            assert!(
                e.contains("layer 7") && e.contains("3, encoder.layer.5.(ffn)"),
                "{e}"
            );
            let e = reason(f.split_for("encoder.layer.3.(ffn)", 24, 8).unwrap_err());
            assert!(e.contains("N = 4") && e.contains("N = 8"), "{e}");
        }
        // The bare map form, without num_experts.
        let p = write(dir.path(), "bare.json", r#"{"0": [0, 1, 1, 0]}"#);
        let f = LabelFile::load(&p).unwrap();
        assert_eq!(f.num_experts, None);
        assert_eq!(
            f.split_for("h.0.(ffn)", 4, 2).unwrap().labels,
            vec![0, 1, 1, 0]
        );
    }

    #[test]
    fn invalid_labels_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"labels": {"1": [0, 1, 1]}}"#,
                "3 labels for an FFN of d_ff = 4",
            ),
            (
                r#"{"labels": {"1": [0, 1, 2, 1]}}"#,
                "label 2 of neuron 2 is not an expert of N = 2",
            ),
            (
                r#"{"labels": {"1": [0, -1, 1, 1]}}"#,
                "label -1 of neuron 1",
            ),
            (
                r#"{"labels": {"1": [0, 1, 1, 1]}}"#,
                "unbalanced: expert 0 has 1 neurons",
            ),
            (
                r#"{"labels": {"1": [0, 1.5, 1, 0]}}"#,
                "entry 1 is not an integer label",
            ),
            (r#"{"labels": {"1": "0101"}}"#, "expected an array"),
            (r#"[0, 1, 1, 0]"#, "expected a JSON object"),
            (
                r#"{"num_experts": 0, "labels": {"1": [0, 1, 1, 0]}}"#,
                "positive integer",
            ),
            (r#"{"labels": {}}"#, "no labels"),
            ("not json", "not JSON"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let p = write(dir.path(), &format!("c{i}.json"), text);
            let e = LabelFile::load(&p).and_then(|f| f.split_for("encoder.layer.1.(ffn)", 4, 2));
            let e = reason(e.unwrap_err());
            assert!(
                e.contains(want) && e.contains(&format!("c{i}.json")),
                "{text}: {e}"
            );
        }
        let e = reason(LabelFile::load(dir.path().join("x.txt")).unwrap_err());
        assert!(e.contains(".json or .safetensors"), "{e}");
        assert!(LabelFile::load(dir.path().join("missing.json")).is_err());
        // Float tensors are not labels.
        let p = dir.path().join("f.safetensors");
        tensor_core::io::save(&p, &[("1", &Tensor::from_slice(&[0f32, 1.0]))], None).unwrap();
        let e = reason(LabelFile::load(&p).unwrap_err());
        assert!(e.contains("integer tensor"), "{e}");
    }
}
