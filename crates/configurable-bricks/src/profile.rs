//! Activation profiling (survey §4, "Profile"): hook every FFN's hidden
//! activation `a = act(x W1ᵀ + b1)` (gated: `act(x W_Gᵀ) ⊙ (x W_Iᵀ)`) and
//! average a per-neuron indicator over each example's tokens,
//!
//! `P[e, n] = (1 / |T_e|) Σ_{t ∈ T_e} ind_n(t)`, with
//! `ind_n = |a_n|` (`Indicator::Activation`) or `|a_n| · ‖W_O[:, n]‖`
//! (`Indicator::OutputMagnitude`),
//!
//! where `T_e` is the example's non-padding tokens (`TokenScope::All`) or
//! only those a scope mask marks, e.g. the prompt (`TokenScope::Scoped`).
//!
//! Any model works: every `tensor_core` [`FeedForward`] offers its hidden
//! activation to the forward [`Context`]'s sink as `PATH:act`; a
//! [`Profiler`] installs a sink that reduces each `[B, T, d_ff]` activation to
//! `[B, d_ff]` at once, so nothing larger than one batch's rows is held.
//! [`profile_corpus`] streams batches into a safetensors file written in
//! place (header first, rows seek-written per batch, renamed at the end):
//! memory stays bounded by one batch however many examples there are.

use std::any::Any;
use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tensor_core::io::{SafetensorsFile, write_atomic};
use tensor_core::layers::FeedForward;
use tensor_core::module::{ActivationSink, Context, Module, ModuleExt, downcast_ref, glob_match};
use tensor_core::tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Per-neuron indicator of how much a neuron contributes to a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    /// `|a_n|` (the survey's default).
    #[default]
    Activation,
    /// `|a_n| · ‖W_O[:, n]‖`: the size of the neuron's contribution to the output.
    OutputMagnitude,
}

/// Which tokens an example's mean runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    /// Every token the attention mask marks (padding excluded).
    #[default]
    All,
    /// Only tokens a per-batch scope mask marks (e.g. the prompt, excluding the response).
    Scoped,
}

/// Open points of profiling (JSON-serialisable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileConfig {
    pub indicator: Indicator,
    pub token_scope: TokenScope,
    /// Glob over FFN paths (`*` = every `FeedForward` of the model).
    pub ffn_pattern: String,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            indicator: Indicator::Activation,
            token_scope: TokenScope::All,
            ffn_pattern: "*".into(),
        }
    }
}

/// One profiled FFN: its path, width, and first column in the profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FfnSite {
    pub path: String,
    pub d_ff: i64,
    /// Index of this FFN's neuron 0 among all profiled neurons.
    pub offset: i64,
}

/// The FFNs of `model` whose path matches `pattern`, in model order.
pub fn ffn_sites(model: &dyn Module, pattern: &str) -> Result<Vec<FfnSite>> {
    let mut sites = Vec::new();
    let mut offset = 0;
    let mut all = Vec::new();
    for (path, m) in model.named_modules() {
        let Some(ffn) = downcast_ref::<FeedForward>(m) else {
            continue;
        };
        all.push(path.clone());
        if !glob_match(pattern, &path) || sites.iter().any(|s: &FfnSite| s.path == path) {
            continue;
        }
        let d_ff = ffn.w1()?.size()[0];
        sites.push(FfnSite { path, d_ff, offset });
        offset += d_ff;
    }
    if sites.is_empty() {
        return Err(Error::Unknown {
            what: "FeedForward matching".into(),
            name: pattern.into(),
            known: all,
        });
    }
    Ok(sites)
}

/// Profiles the FFNs of one model, batch by batch.
#[derive(Debug)]
pub struct Profiler {
    pub config: ProfileConfig,
    pub sites: Vec<FfnSite>,
    /// `‖W_O[:, n]‖` per site, for `Indicator::OutputMagnitude`.
    out_norms: Vec<Option<Tensor>>,
}

impl Profiler {
    pub fn new(model: &dyn Module, config: ProfileConfig) -> Result<Self> {
        let sites = ffn_sites(model, &config.ffn_pattern)?;
        let mut out_norms = Vec::new();
        for s in &sites {
            out_norms.push(match config.indicator {
                Indicator::Activation => None,
                Indicator::OutputMagnitude => {
                    let ffn = model.get_as::<FeedForward>(&s.path)?;
                    let w2 = ffn.w2()?.f_detach()?.f_to_kind(Kind::Float)?;
                    Some(w2.f_norm_scalaropt_dim(2, [0], false)?)
                }
            });
        }
        Ok(Self {
            config,
            sites,
            out_norms,
        })
    }

    /// Total number of profiled neurons (columns of a profile).
    pub fn neurons(&self) -> i64 {
        self.sites.iter().map(|s| s.d_ff).sum()
    }

    /// Run `forward` once under a profiling sink and return `P` for the
    /// batch, `[B, neurons]` f32 on the activations' device.
    /// `attention_mask` is `[B, T]` (1 = token); `scope` (same shape) is
    /// required for `TokenScope::Scoped` and refused otherwise.
    pub fn profile_with(
        &self,
        attention_mask: &Tensor,
        scope: Option<&Tensor>,
        forward: impl FnOnce(&mut Context) -> tensor_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let weights = token_weights(attention_mask, scope, self.config.token_scope)?;
        let sink = MeanSink {
            keys: self
                .sites
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{}:act", s.path), i))
                .collect(),
            weights,
            norms: self
                .out_norms
                .iter()
                .map(|n| n.as_ref().map(Tensor::shallow_clone))
                .collect(),
            out: (0..self.sites.len()).map(|_| None).collect(),
            error: None,
        };
        let mut ctx = Context::eval()
            .with_mask(attention_mask.shallow_clone())
            .with_sink(Box::new(sink));
        let _last_hidden = tensor_core::tch::no_grad(|| forward(&mut ctx))?;
        let sink = ctx
            .take_sink()
            .ok_or_else(|| Error::config("profiling sink was removed during the forward pass"))?;
        let any: Box<dyn Any> = sink;
        let sink = any
            .downcast::<MeanSink>()
            .map_err(|_| Error::config("profiling sink was replaced during the forward pass"))?;
        if let Some(e) = sink.error {
            return Err(e);
        }
        let mut cols = Vec::with_capacity(sink.out.len());
        for (s, o) in self.sites.iter().zip(sink.out) {
            cols.push(o.ok_or_else(|| {
                Error::config(format!(
                    "FFN {} recorded no activation in this forward pass (was it run?)",
                    s.path
                ))
            })?);
        }
        Ok(Tensor::f_cat(&cols, 1)?)
    }

    /// [`Profiler::profile_with`] for a model whose forward takes `input` and reads the mask from the context.
    pub fn profile_batch(
        &self,
        model: &dyn Module,
        input: &Tensor,
        attention_mask: &Tensor,
        scope: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.profile_with(attention_mask, scope, |ctx| model.forward(input, ctx))
    }
}

/// `[B, T, 1]` weights `1/|T_e|` on the tokens in scope, 0 elsewhere.
fn token_weights(mask: &Tensor, scope: Option<&Tensor>, token_scope: TokenScope) -> Result<Tensor> {
    let size = mask.size();
    if size.len() != 2 {
        return Err(Error::mismatch(
            "attention_mask",
            "shape [batch, seq]",
            format!("{size:?}"),
        ));
    }
    let mut w = mask.f_ne(0)?.f_to_kind(Kind::Float)?;
    match (token_scope, scope) {
        (TokenScope::All, None) => {}
        (TokenScope::All, Some(_)) => {
            return Err(Error::config(
                "a scope mask was given but token_scope is 'all' (set token_scope: scoped)",
            ));
        }
        (TokenScope::Scoped, None) => {
            return Err(Error::config(
                "token_scope 'scoped' needs a scope mask [batch, seq] for every batch",
            ));
        }
        (TokenScope::Scoped, Some(s)) => {
            if s.size() != size {
                return Err(Error::mismatch(
                    "scope mask",
                    format!("the attention mask's shape {size:?}"),
                    format!("{:?}", s.size()),
                ));
            }
            w = w.f_mul(&s.f_to_device(w.device())?.f_ne(0)?.f_to_kind(Kind::Float)?)?;
        }
    }
    let count = w.f_sum_dim_intlist(1, true, Kind::Float)?;
    let empty = count.f_eq(0)?.f_nonzero()?;
    if empty.size()[0] > 0 {
        let row = empty.f_int64_value(&[0, 0])?;
        return Err(Error::config(format!(
            "example {row} of the batch has no token in scope (empty mean)"
        )));
    }
    Ok(w.f_div(&count)?.f_unsqueeze(-1)?)
}

/// Reduces each FFN's `[B, T, d_ff]` activation to its per-example token mean at once.
struct MeanSink {
    keys: HashMap<String, usize>,
    weights: Tensor,
    norms: Vec<Option<Tensor>>,
    out: Vec<Option<Tensor>>,
    /// The first failure; `record` errors would abort the forward with a less specific message.
    error: Option<Error>,
}

impl MeanSink {
    fn reduce(&mut self, i: usize, key: &str, a: &Tensor) -> Result<Tensor> {
        let w = &self.weights;
        let (ws, s) = (w.size(), a.size());
        if s.len() != 3 || s[0] != ws[0] || s[1] != ws[1] {
            return Err(Error::mismatch(
                key,
                format!(
                    "an activation [{}, {}, d_ff] (batch, seq of the mask)",
                    ws[0], ws[1]
                ),
                format!("{s:?}"),
            ));
        }
        if self.out[i].is_some() {
            return Err(Error::config(format!(
                "{key} was recorded twice in one forward pass (a shared FFN?): profile it once"
            )));
        }
        let mut ind = a.f_detach()?.f_to_kind(Kind::Float)?.f_abs()?;
        if let Some(n) = &self.norms[i] {
            ind = ind.f_mul(&n.f_to_device(ind.device())?)?;
        }
        Ok(ind
            .f_mul(&w.f_to_device(ind.device())?)?
            .f_sum_dim_intlist(1, false, Kind::Float)?)
    }
}

impl ActivationSink for MeanSink {
    fn wants(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }
    fn record(&mut self, key: &str, value: &Tensor) -> tensor_core::Result<()> {
        let Some(&i) = self.keys.get(key) else {
            return Ok(());
        };
        match self.reduce(i, key, value) {
            Ok(t) => self.out[i] = Some(t),
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(e);
                }
            }
        }
        Ok(())
    }
}

/// One batch of a corpus to profile.
#[derive(Debug)]
pub struct ProfileBatch {
    pub input: Tensor,
    /// `[B, T]`, 1 = token.
    pub attention_mask: Tensor,
    /// `[B, T]` scope mask for `TokenScope::Scoped`.
    pub scope: Option<Tensor>,
}

/// What [`profile_corpus`] wrote.
#[derive(Debug, Clone)]
pub struct ProfileSummary {
    pub examples: usize,
    pub neurons: i64,
    pub seconds: f64,
}

impl ProfileSummary {
    pub fn examples_per_second(&self) -> f64 {
        self.examples as f64 / self.seconds.max(1e-9)
    }
}

const FORMAT: &str = "configurable-bricks-profile/1";
const LABELS: &str = "example_labels";

fn progress(len: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    if let Ok(s) = ProgressStyle::with_template(
        "profile [{bar:30}] {pos}/{len} examples [{elapsed_precise}<{eta_precise}] {per_sec}",
    ) {
        pb.set_style(s.progress_chars("=> "));
    }
    pb
}

/// Profile a labelled corpus into `path` (safetensors): one `[examples,
/// d_ff]` f32 tensor per FFN, named by its path, plus `example_labels`
/// (int64), with the config, sites and functionality names as metadata.
/// `labels[i]` indexes `functions`. Batches must cover exactly
/// `labels.len()` examples, in order; `forward` runs the model on one batch.
#[allow(clippy::too_many_arguments)]
pub fn profile_corpus<I>(
    profiler: &Profiler,
    batches: I,
    labels: &[usize],
    functions: &[String],
    path: &Path,
    show_progress: bool,
    mut forward: impl FnMut(&ProfileBatch, &mut Context) -> tensor_core::Result<Tensor>,
) -> Result<ProfileSummary>
where
    I: IntoIterator<Item = Result<ProfileBatch>>,
{
    let n = labels.len();
    if n == 0 {
        return Err(Error::config("profile_corpus: no examples"));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= functions.len()) {
        return Err(Error::mismatch(
            "profile_corpus label",
            format!(
                "an index below {} ({})",
                functions.len(),
                functions.join(", ")
            ),
            bad,
        ));
    }
    // Header: every site's tensor, then the labels, laid out back to back.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut starts = Vec::new();
    for s in &profiler.sites {
        let bytes = n * s.d_ff as usize * 4;
        header.insert(
            s.path.clone(),
            serde_json::json!({"dtype": "F32", "shape": [n, s.d_ff], "data_offsets": [offset, offset + bytes]}),
        );
        starts.push(offset);
        offset += bytes;
    }
    header.insert(
        LABELS.into(),
        serde_json::json!({"dtype": "I64", "shape": [n], "data_offsets": [offset, offset + 8 * n]}),
    );
    let labels_at = offset;
    let total = offset + 8 * n;
    header.insert(
        "__metadata__".into(),
        serde_json::json!({
            "format": FORMAT,
            "config": json(&profiler.config),
            "sites": json(&profiler.sites),
            "functions": json(&functions.to_vec()),
        }),
    );
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::config(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let data_start = 8 + head.len() as u64;

    let start = std::time::Instant::now();
    let pb = progress(n, show_progress);
    let io = |p: &Path, source: std::io::Error| {
        Error::Tensor(tensor_core::Error::Io {
            path: p.to_owned(),
            source,
        })
    };
    let mut failure: Option<Error> = None;
    let written = write_atomic(path, |tmp| {
        let run = || -> Result<()> {
            let mut f = std::fs::File::create(tmp).map_err(|e| io(tmp, e))?;
            f.write_all(&(head.len() as u64).to_le_bytes())
                .and_then(|()| f.write_all(&head))
                .and_then(|()| f.set_len(data_start + total as u64))
                .map_err(|e| io(tmp, e))?;
            let mut row = 0usize;
            for batch in batches {
                let batch = batch?;
                let p =
                    profiler.profile_with(&batch.attention_mask, batch.scope.as_ref(), |ctx| {
                        forward(&batch, ctx)
                    })?;
                let b = p.size()[0] as usize;
                if row + b > n {
                    return Err(Error::mismatch(
                        "profile_corpus batches",
                        format!("{n} examples (one per label)"),
                        format!("more than {n}"),
                    ));
                }
                crate::error::check_finite("profile batch", &p)?;
                let p = p.f_to_device(Device::Cpu)?;
                for (s, &st) in profiler.sites.iter().zip(&starts) {
                    let block = p.f_narrow(1, s.offset, s.d_ff)?.f_contiguous()?;
                    let mut bytes = vec![0u8; b * s.d_ff as usize * 4];
                    block.f_copy_data_u8(&mut bytes, b * s.d_ff as usize)?;
                    let at = data_start + (st + row * s.d_ff as usize * 4) as u64;
                    f.seek(SeekFrom::Start(at))
                        .and_then(|_| f.write_all(&bytes))
                        .map_err(|e| io(tmp, e))?;
                }
                row += b;
                pb.inc(b as u64);
            }
            if row != n {
                return Err(Error::mismatch(
                    "profile_corpus batches",
                    format!("{n} examples (one per label)"),
                    row,
                ));
            }
            let lab: Vec<u8> = labels
                .iter()
                .flat_map(|&l| (l as i64).to_le_bytes())
                .collect();
            f.seek(SeekFrom::Start(data_start + labels_at as u64))
                .and_then(|_| f.write_all(&lab))
                .and_then(|()| f.flush())
                .map_err(|e| io(tmp, e))
        };
        run().map_err(|e| {
            failure = Some(e);
            tensor_core::Error::config("profiling failed")
        })
    });
    pb.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    written?;
    Ok(ProfileSummary {
        examples: n,
        neurons: profiler.neurons(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Metadata values are strings: structured ones are stored as JSON text.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A profile read back from a file.
#[derive(Debug)]
pub struct Profile {
    pub config: ProfileConfig,
    pub sites: Vec<FfnSite>,
    pub functions: Vec<String>,
    pub labels: Vec<usize>,
    file: SafetensorsFile,
}

impl Profile {
    /// Open and validate a file written by [`profile_corpus`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |reason: String| Error::ProfileFile {
            file: path.display().to_string(),
            reason,
        };
        let file = SafetensorsFile::open(path)?;
        let meta = file
            .metadata()
            .ok_or_else(|| bad("no metadata: not a profile".into()))?;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT}",
                meta.get("format")
            )));
        }
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata lacks '{k}'")))
        };
        let config: ProfileConfig =
            serde_json::from_str(field("config")?).map_err(|e| bad(format!("config: {e}")))?;
        let sites: Vec<FfnSite> =
            serde_json::from_str(field("sites")?).map_err(|e| bad(format!("sites: {e}")))?;
        let functions: Vec<String> = serde_json::from_str(field("functions")?)
            .map_err(|e| bad(format!("functions: {e}")))?;
        let (kind, shape) = file.info(LABELS)?;
        if kind != Kind::Int64 || shape.len() != 1 {
            return Err(bad(format!(
                "{LABELS} is {kind:?} {shape:?}, expected int64 [n]"
            )));
        }
        let n = shape[0];
        let raw = file.load(LABELS, Device::Cpu)?;
        let mut labels = vec![0i64; n as usize];
        raw.f_copy_data(&mut labels, n as usize)?;
        let labels: Vec<usize> = labels
            .into_iter()
            .map(|l| {
                usize::try_from(l)
                    .ok()
                    .filter(|&l| l < functions.len())
                    .ok_or_else(|| {
                        bad(format!(
                            "label {l} out of range for {} functions",
                            functions.len()
                        ))
                    })
            })
            .collect::<Result<_>>()?;
        let mut offset = 0;
        for s in &sites {
            let (kind, shape) = file.info(&s.path)?;
            if kind != Kind::Float || shape != [n, s.d_ff] || s.offset != offset {
                return Err(bad(format!(
                    "{} is {kind:?} {shape:?} at column {}, expected f32 [{n}, {}] at column {offset}",
                    s.path, s.offset, s.d_ff
                )));
            }
            offset += s.d_ff;
        }
        Ok(Self {
            config,
            sites,
            functions,
            labels,
            file,
        })
    }

    pub fn examples(&self) -> usize {
        self.labels.len()
    }

    pub fn neurons(&self) -> i64 {
        self.sites.iter().map(|s| s.d_ff).sum()
    }

    /// One FFN's `[examples, d_ff]` block (layer-by-layer processing).
    pub fn layer(&self, site: usize) -> Result<Tensor> {
        let s = self.sites.get(site).ok_or_else(|| Error::Unknown {
            what: "profile site".into(),
            name: site.to_string(),
            known: self.sites.iter().map(|s| s.path.clone()).collect(),
        })?;
        Ok(self.file.load(&s.path, Device::Cpu)?)
    }

    /// The whole `[examples, neurons]` matrix.
    pub fn matrix(&self) -> Result<Tensor> {
        let blocks = (0..self.sites.len())
            .map(|i| self.layer(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_cat(&blocks, 1)?)
    }
}
