//! Hugging Face `config.json`, read key by key ([`JsonConfig`]) and checked
//! value by value ([`Checks`]), so that every problem names the file and the
//! key; [`write_json`] writes a config back.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tensor_core::Error as TensorError;
use tensor_core::io;
use tensor_core::layers::Activation;

use crate::error::{Error, Result};

/// A parsed JSON config with typed, key-checked access.
#[derive(Debug, Clone)]
pub struct JsonConfig {
    pub path: PathBuf,
    pub value: Value,
}

impl JsonConfig {
    /// Read and parse `path`; a missing or malformed file is an error naming it.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                let name = path.file_name().unwrap_or(path.as_os_str()).display();
                Error::file(path, format!("missing (a model folder needs {name})"))
            } else {
                Error::file(path, format!("cannot read: {e}"))
            }
        })?;
        Self::parse(path, &text)
    }

    /// Parse JSON text; `path` is only used in error messages.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Self> {
        let path = path.as_ref();
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        Self::from_value(path, value)
    }

    /// Wrap a parsed value, which must be a JSON object.
    pub fn from_value(path: impl AsRef<Path>, value: Value) -> Result<Self> {
        let path = path.as_ref().to_owned();
        if !value.is_object() {
            let got = kind_name(&value);
            return Err(Error::file(
                &path,
                format!("expected a JSON object, got {got}"),
            ));
        }
        Ok(Self { path, value })
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(&self.path, key, reason)
    }

    /// The value at `key`, `None` when absent or `null`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// The value at `key` read by `read`, `None` when absent or `null`; a
    /// value `read` rejects is an error saying it expected `what`.
    fn opt<'a, T>(
        &'a self,
        key: &str,
        what: &str,
        read: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => read(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected {what}, got {v}"))),
        }
    }

    /// Like [`JsonConfig::opt`], but an absent key is an error too.
    fn required<'a, T>(
        &'a self,
        key: &str,
        what: &str,
        read: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<T> {
        self.opt(key, what, read)?
            .ok_or_else(|| self.err(key, format!("missing ({what} is required)")))
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        self.opt(key, "an integer", Value::as_i64)
    }

    pub fn i64(&self, key: &str) -> Result<i64> {
        self.required(key, "an integer", Value::as_i64)
    }

    pub fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        Ok(self.opt_i64(key)?.unwrap_or(default))
    }

    /// A positive integer.
    pub fn positive(&self, key: &str) -> Result<i64> {
        let v = self.i64(key)?;
        Checks(&self.path).positive(&[(key, v)])?;
        Ok(v)
    }

    /// An integer or a square `[n, n]` pair (Hugging Face allows both for
    /// image and patch sizes); `default` when absent.
    pub fn square_or(&self, key: &str, default: i64) -> Result<i64> {
        if let Some(v @ Value::Array(a)) = self.get(key) {
            let sides: Vec<Option<i64>> = a.iter().map(Value::as_i64).collect();
            return match sides.as_slice() {
                [Some(h), Some(w)] if h == w => Ok(*h),
                _ => Err(self.err(key, format!("only square sizes are supported, got {v}"))),
            };
        }
        self.i64_or(key, default)
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.required(key, "a number", Value::as_f64)
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt(key, "a number", Value::as_f64)?.unwrap_or(default))
    }

    /// A probability in [0, 1).
    pub fn dropout_or(&self, key: &str, default: f64) -> Result<f64> {
        let p = self.f64_or(key, default)?;
        Checks(&self.path).probabilities(&[(key, p)])?;
        Ok(p)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self
            .opt(key, "true or false", Value::as_bool)?
            .unwrap_or(default))
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        self.required(key, "a string", Value::as_str)
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        Ok(self.opt(key, "a string", Value::as_str)?.unwrap_or(default))
    }

    /// The number of entries of an object-valued key (`id2label`), if present.
    pub fn object_len(&self, key: &str) -> Result<Option<usize>> {
        self.opt(key, "an object", |v| v.as_object().map(|m| m.len()))
    }

    pub fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        Checks(&self.path).activation(key, self.str_or(key, default)?)
    }

    /// Check `model_type` against the architectures a loader supports.
    pub fn expect_model_type(&self, supported: &[&str]) -> Result<String> {
        let key = "model_type";
        let list = supported.join(", ");
        match self.get(key) {
            Some(Value::String(t)) if supported.contains(&t.as_str()) => Ok(t.clone()),
            Some(Value::String(t)) => Err(self.err(
                key,
                format!("unknown architecture '{t}' (supported here: {list})"),
            )),
            Some(v) => Err(self.err(
                key,
                format!("unknown architecture: expected a string, got {v}"),
            )),
            None => Err(self.err(
                key,
                format!("unknown architecture: the key is missing (supported here: {list})"),
            )),
        }
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Write `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    io::write_atomic(path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|source| TensorError::Io {
            path: tmp.to_owned(),
            source,
        })
    })?;
    Ok(())
}

/// `tensor_core::Error::Config`'s message without its `invalid config: ` prefix.
fn strip_config_prefix(e: &TensorError) -> String {
    match e {
        TensorError::Config(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Checks of config values, read from a file or built in memory: every error
/// names the file (or what stands for it) and the key.
#[derive(Debug, Clone, Copy)]
pub struct Checks<'a>(pub &'a Path);

impl Checks<'_> {
    fn err(&self, key: &str, reason: String) -> Error {
        Error::config(self.0, key, reason)
    }

    /// Every value is a positive integer.
    pub fn positive(&self, values: &[(&str, i64)]) -> Result<()> {
        match values.iter().find(|(_, v)| *v <= 0) {
            Some((key, v)) => Err(self.err(key, format!("must be positive, got {v}"))),
            None => Ok(()),
        }
    }

    /// `num` is a multiple of `den`; the error names `den`'s key.
    pub fn divisible(&self, (num_key, num): (&str, i64), (key, den): (&str, i64)) -> Result<()> {
        if den == 0 || num % den != 0 {
            return Err(self.err(
                key,
                format!("{num_key} {num} is not divisible by {key} {den}"),
            ));
        }
        Ok(())
    }

    /// A positive, finite number (a LayerNorm epsilon).
    pub fn positive_float(&self, key: &str, v: f64) -> Result<()> {
        if !(v > 0.0 && v.is_finite()) {
            return Err(self.err(key, format!("must be positive, got {v}")));
        }
        Ok(())
    }

    /// A non-negative, finite number (an init standard deviation).
    pub fn non_negative(&self, key: &str, v: f64) -> Result<()> {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(self.err(key, format!("must be non-negative, got {v}")));
        }
        Ok(())
    }

    /// Every value is a probability in [0, 1).
    pub fn probabilities(&self, values: &[(&str, f64)]) -> Result<()> {
        match values.iter().find(|(_, p)| !(0.0..1.0).contains(p)) {
            Some((key, p)) => Err(self.err(key, format!("must be in [0, 1), got {p}"))),
            None => Ok(()),
        }
    }

    /// A non-linearity `tensor-core` knows (Hugging Face names).
    pub fn activation(&self, key: &str, name: &str) -> Result<Activation> {
        name.parse()
            .map_err(|e| self.err(key, strip_config_prefix(&e)))
    }
}

/// A BERT-family encoder's configuration (Hugging Face `BertConfig` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: Activation,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub pad_token_id: i64,
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape.
    pub fn minilm_l6() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            hidden_act: Activation::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }

    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        c.expect_model_type(&["bert"])?;
        let pe = c.str_or("position_embedding_type", "absolute")?;
        if pe != "absolute" {
            return Err(Error::config(
                &c.path,
                "position_embedding_type",
                format!("'{pe}' is not supported (only 'absolute')"),
            ));
        }
        let cfg = Self {
            vocab_size: c.positive("vocab_size")?,
            hidden_size: c.positive("hidden_size")?,
            num_hidden_layers: c.positive("num_hidden_layers")?,
            num_attention_heads: c.positive("num_attention_heads")?,
            intermediate_size: c.positive("intermediate_size")?,
            hidden_act: c.activation("hidden_act", "gelu")?,
            hidden_dropout_prob: c.dropout_or("hidden_dropout_prob", 0.1)?,
            attention_probs_dropout_prob: c.dropout_or("attention_probs_dropout_prob", 0.1)?,
            max_position_embeddings: c.positive("max_position_embeddings")?,
            type_vocab_size: c.i64_or("type_vocab_size", 2)?,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-12)?,
            pad_token_id: c.i64_or("pad_token_id", 0)?,
        };
        let check = Checks(&c.path);
        check.divisible(
            ("hidden_size", cfg.hidden_size),
            ("num_attention_heads", cfg.num_attention_heads),
        )?;
        check.positive_float("layer_norm_eps", cfg.layer_norm_eps)?;
        Ok(cfg)
    }

    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&JsonConfig::read(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":32}"#;
        assert_eq!(
            BertConfig::read(write(dir.path(), ok)).unwrap().hidden_size,
            8
        );
        let cases = [
            (ok.replace("\"bert\"", "\"t5\""), "model_type"),
            (
                ok.replace("\"hidden_size\":8", "\"hidden_size\":\"8\""),
                "hidden_size",
            ),
            (
                ok.replace("\"num_attention_heads\":2", "\"num_attention_heads\":3"),
                "num_attention_heads",
            ),
            (
                ok.replace(",\"intermediate_size\":16", ""),
                "intermediate_size",
            ),
            (
                ok.replace("\"vocab_size\":10", "\"vocab_size\":0"),
                "vocab_size",
            ),
            (ok.replace("}", ",\"hidden_act\":\"mish\"}"), "hidden_act"),
        ];
        for (text, key) in cases {
            let e = BertConfig::read(write(dir.path(), &text))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("config.json") && e.contains(&format!("'{key}'")),
                "{key}: {e}"
            );
        }
        let e = BertConfig::read(write(dir.path(), "{not json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
        let e = BertConfig::read(dir.path().join("absent.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.json"), "{e}");
    }
}
