//! Chat templates: the Jinja `chat_template` of a model folder's
//! `tokenizer_config.json` (or its `chat_template.jinja`), rendered the way
//! transformers' `apply_chat_template` renders it: blocks trimmed
//! (`trim_blocks`, `lstrip_blocks`), `messages` as a list of
//! `{"role", "content"}` maps, `add_generation_prompt`, the special tokens
//! (`bos_token`, `eos_token`, ...) as variables, `raise_exception(msg)`
//! failing the render with the template's message, and Python's string
//! methods (`.strip()`, `.startswith()`) on strings. The rendered text
//! carries the special tokens itself, so it is encoded without adding any
//! (`TextTokenizer::encode_batch_with(..., false)`).

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value as Jinja};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A folder's chat template with the special tokens it may use.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    path: PathBuf,
    specials: Vec<(String, String)>,
}

/// A special token's text in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of model folder `dir`, `None` when it has none:
    /// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of `{name, template}` whose `default` is taken).
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| Error::file(&cfg_path, format!("cannot read: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, path) = if jinja.is_file() {
            let t = std::fs::read_to_string(&jinja)
                .map_err(|e| Error::file(&jinja, format!("cannot read: {e}")))?;
            (t, jinja)
        } else {
            match cfg.get("chat_template") {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(t)) => (t.clone(), cfg_path.clone()),
                Some(Value::Array(list)) => {
                    let t = list
                        .iter()
                        .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                        .and_then(|e| e.get("template").and_then(Value::as_str))
                        .ok_or_else(|| {
                            Error::file(
                                &cfg_path,
                                "'chat_template' lists no template named 'default'",
                            )
                        })?;
                    (t.to_owned(), cfg_path.clone())
                }
                Some(v) => {
                    return Err(Error::file(
                        &cfg_path,
                        format!("'chat_template' must be a string or a list, got {v}"),
                    ));
                }
            }
        };
        let specials = [
            "bos_token",
            "eos_token",
            "pad_token",
            "unk_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ]
        .iter()
        .filter_map(|k| {
            cfg.get(*k)
                .and_then(token_text)
                .map(|t| ((*k).to_owned(), t))
        })
        .collect();
        let t = Self {
            source,
            path,
            specials,
        };
        t.environment()?;
        Ok(Some(t))
    }

    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Jinja, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::file(&self.path, format!("chat template does not parse: {e}")))?;
        Ok(env)
    }

    /// The prompt text of `messages`, ending with the assistant's turn
    /// opener when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid("a chat needs at least one message"));
        }
        let env = self.environment()?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::file(&self.path, e.to_string()))?;
        let mut ctx: std::collections::BTreeMap<String, Jinja> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), Jinja::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Jinja::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Jinja::from(add_generation_prompt),
        );
        tmpl.render(Jinja::from(ctx)).map_err(|e| {
            Error::file(
                &self.path,
                format!(
                    "rendering the chat template failed: {}",
                    e.detail().unwrap_or(&e.to_string())
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loading::fixtures;
    use crate::tokenizer::TextTokenizer;
    use tensor_core::tch::Device;

    fn chat_fixture() -> Value {
        let p = fixtures::folder("tiny-llama").join("chat.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// The template renders the text transformers rendered, and encoding it
    /// without added special tokens gives transformers' ids.
    #[test]
    fn renders_and_encodes_as_transformers() {
        let dir = fixtures::folder("tiny-llama");
        let t = ChatTemplate::from_folder(&dir)
            .unwrap()
            .expect("a template");
        let want = chat_fixture();
        let messages: Vec<ChatMessage> = serde_json::from_value(want["messages"].clone()).unwrap();
        let text = t.render(&messages, true).unwrap();
        assert_eq!(text, want["rendered"].as_str().unwrap());
        let tok = TextTokenizer::for_decoder(dir.join("tokenizer.json"), 96, Some(0)).unwrap();
        let enc = tok.encode_batch_with(&[&text], Device::Cpu, false).unwrap();
        let ids: Vec<i64> = Vec::try_from(enc.input_ids.flatten(0, -1)).unwrap();
        let want_ids: Vec<i64> = serde_json::from_value(want["input_ids"].clone()).unwrap();
        assert_eq!(ids, want_ids);
        // The template's own check: an unknown role fails with its message.
        let bad = [ChatMessage {
            role: "robot".into(),
            content: "hi".into(),
        }];
        let e = t.render(&bad, true).unwrap_err().to_string();
        assert!(e.contains("unknown role robot"), "{e}");
        assert!(
            ChatTemplate::from_folder(fixtures::folder("tiny-qwen2"))
                .unwrap()
                .is_none()
        );
    }
}
