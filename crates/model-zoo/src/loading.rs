//! Hugging Face model folders in and out: one checked path from a
//! `model.safetensors` to `load_named` for every model of this crate
//! ([`load_checkpoint`]), and the writing of `config.json` plus
//! `model.safetensors` ([`save_folder`]).
//!
//! Loading maps each checkpoint key to a parameter name (or deliberately
//! ignores it: tied heads, buffers), then requires every parameter once, with
//! the shape the config implies in the file's [`Layout`], and no key left
//! over. All is checked from the file's header before any tensor is read, and
//! every error names the file and the tensor.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::Value;
use tensor_core::TchResultExt;
use tensor_core::io::{self, SafetensorsFile};
use tensor_core::module::{Module, ModuleExt};
use tensor_core::tch::{Device, Tensor};

use crate::config::write_json;
use crate::{Error, Result};

/// How a checkpoint stores a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As the parameter itself.
    AsIs,
    /// With the first two dimensions swapped: a `Linear` weight `[out, in]`
    /// stored as `[in, out]` (GPT-2's `Conv1D`).
    Transposed,
}

impl Layout {
    /// The shape the file stores for a parameter of shape `shape`.
    pub fn stored_shape(self, shape: &[i64]) -> Vec<i64> {
        let mut s = shape.to_vec();
        if self == Layout::Transposed && s.len() >= 2 {
            s.swap(0, 1);
        }
        s
    }

    /// Turn a stored tensor into the parameter's layout or back (a transpose
    /// is its own inverse); `name` labels a failure.
    pub fn convert(self, t: Tensor, name: &str) -> Result<Tensor> {
        match self {
            Layout::AsIs => Ok(t),
            Layout::Transposed => Ok(t
                .f_transpose(0, 1)
                .and_then(|t| t.f_contiguous())
                .op(name)?),
        }
    }
}

/// What a model tells [`load_checkpoint`] for its messages.
#[derive(Debug, Clone)]
pub struct Checkpoint<'a> {
    /// The model ("GPT-2").
    pub model: &'a str,
    /// The config values that fix the parameter shapes ("n_layer 2, n_embd 32").
    pub config: String,
    /// The prefix a key may carry before the parameter name
    /// (`transformer.`), or "" for none.
    pub prefix: &'a str,
}

/// The device of a module's parameters (that of the first; CPU when it has none).
pub fn device_of(m: &dyn Module) -> Device {
    m.named_parameters()
        .first()
        .map_or(Device::Cpu, |(_, t)| t.device())
}

/// `dir` must be a folder; else an error saying a `model` folder was expected.
pub fn expect_folder(dir: &Path, model: &str) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            format!("not a folder (expected a {model} model folder)"),
        ));
    }
    Ok(())
}

/// Open a model folder's weights; a missing file is an error naming it.
pub fn open_weights(path: &Path, model: &str) -> Result<SafetensorsFile> {
    if !path.is_file() {
        return Err(Error::file(
            path,
            format!(
                "missing: file not found (a {model} model folder needs \
                 model.safetensors beside config.json)"
            ),
        ));
    }
    Ok(SafetensorsFile::open(path)?)
}

/// Refuse a config whose parameters (`implied` values, computed from
/// `config`) far outnumber the values `file` holds (over 4 times, plus a
/// million): loading could only fail later, after allocating a model of
/// that size. Smaller disagreements are left to [`load_checkpoint`], whose
/// message names each mis-shaped tensor.
pub fn check_implied_size(file: &SafetensorsFile, config: &Path, implied: f64) -> Result<()> {
    let mut held = 0f64;
    for name in file.names() {
        let (_, shape) = file.info(&name)?;
        held += shape.iter().map(|&d| d as f64).product::<f64>();
    }
    if !implied.is_finite() || implied > 4.0 * held + 1e6 {
        return Err(Error::file(
            config,
            format!(
                "implies {implied:.3e} parameter values, but {} holds only {held:.0}; \
                 config.json does not describe these weights",
                file.path().display()
            ),
        ));
    }
    Ok(())
}

/// `key` without `prefix` when it has it, else `key` itself.
pub fn strip_optional_prefix<'k>(key: &'k str, prefix: &str) -> &'k str {
    key.strip_prefix(prefix).unwrap_or(key)
}

/// Copy a checkpoint's tensors into `model`. `key_to_name` maps each key of
/// `file` to a parameter name, or to `None` for a key to ignore; `layout`
/// says how the file stores the parameter of a given name. Every parameter
/// must come from exactly one key with the shape [`Layout::stored_shape`]
/// gives; a key that names no parameter is an error. Tensors are read onto
/// the model's device and put in place with `load_named`.
pub fn load_checkpoint(
    model: &mut dyn Module,
    file: &SafetensorsFile,
    about: &Checkpoint,
    key_to_name: impl Fn(&str) -> Option<String>,
    layout: impl Fn(&str) -> Layout,
) -> Result<()> {
    load_checkpoint_shards(
        model,
        std::slice::from_ref(file),
        about,
        key_to_name,
        layout,
    )
}

/// [`load_checkpoint`] over the shards of one checkpoint: a key may stand
/// in any shard, but in one only; errors name the shard.
pub fn load_checkpoint_shards(
    model: &mut dyn Module,
    files: &[SafetensorsFile],
    about: &Checkpoint,
    key_to_name: impl Fn(&str) -> Option<String>,
    layout: impl Fn(&str) -> Layout,
) -> Result<()> {
    load_checkpoint_stacked(model, files, about, key_to_name, layout, |_| None)
}

/// [`load_checkpoint_shards`] where some parameters are stacks of
/// per-expert checkpoint tensors: `stacked(key)` gives `(parameter, i)` for
/// a key that holds row `i` of a stacked parameter `[E, ...]` (Mixtral's
/// `experts.3.w1.weight` → `experts.w1`, row 3). Every row must come from
/// exactly one key with the shape of one row.
pub fn load_checkpoint_stacked(
    model: &mut dyn Module,
    files: &[SafetensorsFile],
    about: &Checkpoint,
    key_to_name: impl Fn(&str) -> Option<String>,
    layout: impl Fn(&str) -> Layout,
    stacked: impl Fn(&str) -> Option<(String, i64)>,
) -> Result<()> {
    let Some(first_file) = files.first() else {
        return Err(Error::invalid("load_checkpoint: no weight files"));
    };
    let device = device_of(model);
    let params: Vec<(String, Vec<i64>)> = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    let known: HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let described = format!("this {} ({})", about.model, about.config);

    // Which key (in which shard) holds each parameter, or each row of a stacked one.
    let mut keys: HashMap<String, (String, usize)> = HashMap::new();
    let mut rows: HashMap<String, Vec<(i64, String, usize)>> = HashMap::new();
    let mut unexpected: Vec<(String, usize)> = Vec::new();
    for (fi, file) in files.iter().enumerate() {
        for key in file.names() {
            if let Some((name, i)) = stacked(&key)
                && known.contains(name.as_str())
            {
                rows.entry(name).or_default().push((i, key, fi));
                continue;
            }
            let Some(name) = key_to_name(&key) else {
                continue;
            };
            if !known.contains(name.as_str()) {
                unexpected.push((key, fi));
            } else if let Some((first, _)) = keys.get(&name) {
                return Err(Error::file(
                    file.path(),
                    format!("tensor '{name}' is stored twice ('{first}' and '{key}')"),
                ));
            } else {
                keys.insert(name, (key, fi));
            }
        }
    }
    if let Some(((first, fi), rest)) = unexpected.split_first() {
        let rest: Vec<String> = rest.iter().map(|(k, _)| k.clone()).collect();
        return Err(Error::file(
            files[*fi].path(),
            format!(
                "tensor '{first}' is not a parameter of {described}{}; \
                 is config.json from the same model?",
                and_more(&rest)
            ),
        ));
    }

    // Stacked parameters: rows 0..E, each once, each of one row's shape.
    let mut stacks: HashMap<String, Vec<(String, usize)>> = HashMap::new();
    for (name, mut r) in rows {
        let shape = &params.iter().find(|(n, _)| *n == name).expect("known").1;
        r.sort_by_key(|x| x.0);
        let e = shape.first().copied().unwrap_or(0);
        let idx: Vec<i64> = r.iter().map(|x| x.0).collect();
        if idx != (0..e).collect::<Vec<_>>() {
            return Err(Error::file(
                files[r[0].2].path(),
                format!(
                    "the checkpoint holds rows {idx:?} of '{name}' (per-expert tensors such as '{}'), but config.json implies {e} experts",
                    r[0].1
                ),
            ));
        }
        for (_, key, fi) in &r {
            let (_, stored) = files[*fi].info(key)?;
            if stored[..] != shape[1..] {
                return Err(Error::file(
                    files[*fi].path(),
                    format!(
                        "'{key}': shape {stored:?} in the file, {:?} expected for {described}",
                        &shape[1..]
                    ),
                ));
            }
        }
        stacks.insert(name, r.into_iter().map(|(_, k, f)| (k, f)).collect());
    }

    let missing: Vec<String> = params
        .iter()
        .filter(|(n, _)| !keys.contains_key(n) && !stacks.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect();
    if let Some((first, rest)) = missing.split_first() {
        let also = if about.prefix.is_empty() {
            String::new()
        } else {
            format!(" (also looked for '{}{first}')", about.prefix)
        };
        let place = if files.len() == 1 {
            first_file.path().to_owned()
        } else {
            first_file
                .path()
                .parent()
                .map_or_else(|| first_file.path().to_owned(), Path::to_owned)
        };
        return Err(Error::file(
            place,
            format!("missing tensor '{first}'{also}{}", and_more(rest)),
        ));
    }

    let mut mismatched = Vec::new();
    for (name, shape) in &params {
        let Some((key, fi)) = keys.get(name) else {
            continue; // stacked, checked row by row above
        };
        let l = layout(name);
        let expected = l.stored_shape(shape);
        let (_, stored) = files[*fi].info(key)?;
        if stored != expected {
            let transposed = if l == Layout::Transposed {
                format!(" (the parameter {shape:?}, stored transposed)")
            } else {
                String::new()
            };
            mismatched.push(format!(
                "'{key}': shape {stored:?} in the file, {expected:?}{transposed} expected"
            ));
        }
    }
    if !mismatched.is_empty() {
        const SHOWN: usize = 4;
        let more = mismatched.len().saturating_sub(SHOWN);
        let more = if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        };
        let n = mismatched.len();
        let shown = mismatched[..n.min(SHOWN)].join("; ");
        let head = if n == 1 {
            "tensor".to_owned()
        } else {
            format!("{n} tensors")
        };
        return Err(Error::file(
            first_file.path(),
            format!(
                "{head} with a shape other than config.json implies for {described}: \
                 {shown}{more}"
            ),
        ));
    }

    let mut values = Vec::with_capacity(params.len());
    for (name, _) in &params {
        let t = match (keys.get(name), stacks.get(name)) {
            (Some((key, fi)), _) => {
                layout(name).convert(files[*fi].load_weight(key, device)?, key)?
            }
            (None, Some(r)) => {
                let parts = r
                    .iter()
                    .map(|(k, fi)| files[*fi].load_weight(k, device))
                    .collect::<tensor_core::Result<Vec<_>>>()?;
                Tensor::f_stack(&parts, 0).op(name)?
            }
            (None, None) => unreachable!("missing parameters were reported above"),
        };
        values.push((name.clone(), t));
    }
    model.load_named(&values, true)?;
    Ok(())
}

/// The weight files of a model folder: `model.safetensors`, or the shards
/// that `model.safetensors.index.json` lists (its `weight_map` must name an
/// existing shard for every key, and each key must be in the shard named).
pub fn open_folder_weights(dir: &Path, model: &str) -> Result<Vec<SafetensorsFile>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() || !index.is_file() {
        return Ok(vec![open_weights(&single, model)?]);
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| Error::file(&index, format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
        return Err(Error::file(
            &index,
            "expected an object 'weight_map' (key -> shard file)",
        ));
    };
    let mut shards: Vec<String> = Vec::new();
    for (key, f) in map {
        let Some(f) = f.as_str() else {
            return Err(Error::file(
                &index,
                format!("weight_map['{key}'] is not a file name"),
            ));
        };
        if f.contains('/') || f.contains("..") {
            return Err(Error::file(
                &index,
                format!("weight_map['{key}'] = '{f}' is not a file of this folder"),
            ));
        }
        if !shards.iter().any(|s| s == f) {
            shards.push(f.to_owned());
        }
    }
    shards.sort();
    let files = shards
        .iter()
        .map(|f| open_weights(&dir.join(f), model))
        .collect::<Result<Vec<_>>>()?;
    for (key, f) in map {
        let f = f.as_str().unwrap_or_default();
        let i = shards.iter().position(|s| s == f).expect("listed above");
        if !files[i].names().iter().any(|n| n == key) {
            return Err(Error::file(
                files[i].path(),
                format!("the index names this shard for tensor '{key}', which it does not hold"),
            ));
        }
    }
    Ok(files)
}

/// ` (and N more: 'a', 'b', 'c', ...)` for what follows the first offender;
/// "" when nothing does.
fn and_more(rest: &[String]) -> String {
    const SHOWN: usize = 3;
    if rest.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = rest.iter().take(SHOWN).map(|k| format!("'{k}'")).collect();
    let dots = if rest.len() > SHOWN { ", ..." } else { "" };
    format!(" (and {} more: {}{dots})", rest.len(), shown.join(", "))
}

/// Write `config` as `config.json` and `tensors` as `model.safetensors` (with
/// the `format: pt` metadata `transformers` writes) into `dir`, which is
/// created if needed.
pub fn save_folder(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))?;
    write_json(&dir.join("config.json"), config)?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    io::save(dir.join("model.safetensors"), &refs, Some(meta))?;
    Ok(())
}

/// The model files' test fixtures: Hugging Face folders under `tests/fixtures`.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use serde_json::{Map, Value};
    use tensor_core::io;
    use tensor_core::tch::{Device, Tensor};

    /// `tests/fixtures/<name>`.
    pub fn folder(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// What `transformers` computed for the fixture: its `expected.safetensors`
    /// by name, on the host.
    pub fn expected(folder: &Path) -> HashMap<String, Tensor> {
        io::load(folder.join("expected.safetensors"), Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    }

    /// The fixture's `config.json`, changed by `edit`, written to `dir/config.json`.
    pub fn write_config(
        folder: &Path,
        dir: &Path,
        edit: impl FnOnce(&mut Map<String, Value>),
    ) -> PathBuf {
        let text = std::fs::read_to_string(folder.join("config.json")).unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        edit(v.as_object_mut().unwrap());
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        path
    }
}

#[cfg(test)]
mod tests {
    use tensor_core::layers::Linear;
    use tensor_core::tch::Kind;

    use super::*;

    /// A `Linear` 3 -> 2 on the test device whose weight a file stores
    /// transposed, under keys that may carry `p.`; `buffer` is ignored.
    fn load(tensors: &[(&str, Tensor)]) -> Result<Linear> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        io::save(&path, &refs, None).unwrap();
        let mut model = Linear::new(3, 2, true, tensor_core::testing::device()).unwrap();
        let about = Checkpoint {
            model: "toy",
            config: "in 3, out 2".into(),
            prefix: "p.",
        };
        let key_to_name =
            |key: &str| (key != "buffer").then(|| strip_optional_prefix(key, "p.").to_owned());
        let layout = |name: &str| {
            if name == "weight" {
                Layout::Transposed
            } else {
                Layout::AsIs
            }
        };
        let file = open_weights(&path, "toy")?;
        load_checkpoint(&mut model, &file, &about, key_to_name, layout)?;
        Ok(model)
    }

    /// The file's contents, on the host.
    fn t(shape: &[i64]) -> Tensor {
        Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu)).view(shape)
    }

    fn err(tensors: &[(&str, Tensor)]) -> String {
        load(tensors).unwrap_err().to_string()
    }

    #[test]
    fn maps_keys_transposes_and_ignores() {
        let w = t(&[3, 2]);
        let m = load(&[
            ("p.weight", w.copy()),
            ("bias", t(&[2])),
            ("buffer", t(&[7])),
        ])
        .unwrap();
        assert_eq!(m.weight.device(), tensor_core::testing::device());
        assert!(m.weight.to_device(Device::Cpu).equal(&w.tr()));
        assert!(m.bias.unwrap().to_device(Device::Cpu).equal(&t(&[2])));
        assert_eq!(Layout::Transposed.stored_shape(&[2, 3]), [3, 2]);
        assert_eq!(Layout::AsIs.stored_shape(&[2, 3]), [2, 3]);
    }

    #[test]
    fn errors_name_the_file_and_the_tensors() {
        let e = err(&[
            ("p.weight", t(&[3, 2])),
            ("bias", t(&[2])),
            ("p.bias", t(&[2])),
        ]);
        assert!(
            e.contains("model.safetensors") && e.contains("'bias' is stored twice"),
            "{e}"
        );
        let e = err(&[
            ("p.weight", t(&[3, 2])),
            ("bias", t(&[2])),
            ("p.extra", t(&[1])),
        ]);
        assert!(
            e.contains("'p.extra' is not a parameter of this toy (in 3, out 2)"),
            "{e}"
        );
        let e = err(&[("bias", t(&[2]))]);
        assert!(
            e.contains("missing tensor 'weight' (also looked for 'p.weight')"),
            "{e}"
        );
        let e = err(&[("p.weight", t(&[2, 3])), ("bias", t(&[3]))]);
        assert!(
            e.contains("2 tensors")
                && e.contains("'p.weight': shape [2, 3] in the file, [3, 2] (the parameter [2, 3], stored transposed) expected")
                && e.contains("'bias': shape [3] in the file, [2] expected"),
            "{e}"
        );
        let e = err(&[]);
        assert!(
            e.contains("missing tensor 'weight'") && e.contains("(and 1 more: 'bias')"),
            "{e}"
        );
        // An integer weight is refused, not reinterpreted; so are NaN and Inf.
        let e = err(&[
            ("p.weight", t(&[3, 2]).to_kind(Kind::Int)),
            ("bias", t(&[2])),
        ]);
        assert!(
            e.contains("model.safetensors: p.weight: stored as Int"),
            "{e}"
        );
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = err(&[
                ("p.weight", t(&[3, 2])),
                ("bias", Tensor::full([2], bad, (Kind::Float, Device::Cpu))),
            ]);
            assert!(
                e.contains("model.safetensors: bias: holds 2 non-finite value(s)"),
                "{e}"
            );
        }
        // Half-precision weights are still accepted (and upcast to the model's dtype).
        let m = load(&[
            ("p.weight", t(&[3, 2]).to_kind(Kind::Half)),
            ("bias", t(&[2]).to_kind(Kind::BFloat16)),
        ])
        .unwrap();
        assert_eq!(m.weight.kind(), Kind::Float);
        let e = open_weights(Path::new("/nonexistent/model.safetensors"), "toy")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/model.safetensors") && e.contains("missing"),
            "{e}"
        );
    }
}
