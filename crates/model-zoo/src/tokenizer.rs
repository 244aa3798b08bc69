//! Hugging Face `tokenizer.json` through the `tokenizers` crate, set up the
//! way sentence-transformers uses it: special tokens added, truncation to
//! the model's maximum sequence length, right padding to the longest text
//! of the batch. For decoders ([`TextTokenizer::for_decoder`]): no
//! truncation, left padding (so every row's last token is its newest), and
//! [`TextTokenizer::decode`]. Special tokens written in a text (a chat
//! template's `<|im_start|>`) are matched as the single tokens
//! `tokenizer.json` declares them to be.

use std::path::{Path, PathBuf};

use tensor_core::tch::{Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// Token ids and their attention mask for a batch of texts.
#[derive(Debug)]
pub struct Encoded {
    /// `[batch, seq]` int64
    pub input_ids: Tensor,
    /// `[batch, seq]` int64, 1 for tokens, 0 for padding
    pub attention_mask: Tensor,
}

#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    pub max_len: usize,
    pub pad_id: u32,
}

impl TextTokenizer {
    /// Load `tokenizer.json`; `vocab_size` is the model's embedding rows: a
    /// tokenizer that can produce ids beyond it does not belong to the model.
    pub fn from_file(path: impl AsRef<Path>, max_len: usize, vocab_size: i64) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let tok_err = |reason: String| Error::Tokenizer {
            path: path.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(tok_err("file not found".into()));
        }
        if max_len < 2 {
            return Err(tok_err(format!(
                "max_len {max_len} leaves no room for [CLS] and [SEP]"
            )));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| tok_err(e.to_string()))?;
        let n = inner.get_vocab_size(true) as i64;
        if n > vocab_size {
            return Err(tok_err(format!(
                "its vocabulary has {n} tokens but the model's embedding has {vocab_size} rows (wrong tokenizer for this model?)"
            )));
        }
        let (pad_id, pad_token) = ["[PAD]", "<pad>", "<|endoftext|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t).map(|id| (id, (*t).to_owned())))
            .ok_or_else(|| tok_err("no padding token ([PAD], <pad>, <|endoftext|>)".into()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        Ok(Self {
            inner,
            path,
            max_len,
            pad_id,
        })
    }

    /// Load a decoder's `tokenizer.json`: special tokens added as its post
    /// processor says (Llama's `<s>`), no truncation, left padding with
    /// `pad_id` (the config's `pad_token_id`), else the first of `<pad>`,
    /// `<|endoftext|>`, `</s>`, `<|end_of_text|>` the vocabulary has.
    pub fn for_decoder(
        path: impl AsRef<Path>,
        vocab_size: i64,
        pad_id: Option<i64>,
    ) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let tok_err = |reason: String| Error::Tokenizer {
            path: path.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(tok_err("file not found".into()));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| tok_err(e.to_string()))?;
        let n = inner.get_vocab_size(true) as i64;
        if n > vocab_size {
            return Err(tok_err(format!(
                "its vocabulary has {n} tokens but the model's embedding has {vocab_size} rows (wrong tokenizer for this model?)"
            )));
        }
        let (pad_id, pad_token) = match pad_id {
            Some(id) => {
                let id =
                    u32::try_from(id).map_err(|_| tok_err(format!("pad id {id} is negative")))?;
                let tok = inner
                    .id_to_token(id)
                    .ok_or_else(|| tok_err(format!("pad id {id} is not in the vocabulary")))?;
                (id, tok)
            }
            None => ["<pad>", "<|endoftext|>", "</s>", "<|end_of_text|>"]
                .iter()
                .find_map(|t| inner.token_to_id(t).map(|id| (id, (*t).to_owned())))
                .ok_or_else(|| {
                    tok_err("no padding token (pad_token_id, <pad>, <|endoftext|>, </s>)".into())
                })?,
        };
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: tokenizers::PaddingDirection::Left,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        Ok(Self {
            inner,
            path,
            max_len: usize::MAX,
            pad_id,
        })
    }

    /// The text of `ids`; special tokens left out when `skip_special`.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner
            .decode(&ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of one text (special tokens added, truncated, not padded).
    pub fn encode_ids(&self, text: &str) -> Result<Vec<i64>> {
        let e = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(e.get_ids()
            .iter()
            .zip(e.get_attention_mask())
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i as i64)
            .collect())
    }

    /// Encode a batch of texts onto `device`.
    pub fn encode_batch(&self, texts: &[&str], device: Device) -> Result<Encoded> {
        self.encode_batch_with(texts, device, true)
    }

    /// [`TextTokenizer::encode_batch`], adding the special tokens of the
    /// tokenizer's post processor or not (a rendered chat template carries its own).
    pub fn encode_batch_with(
        &self,
        texts: &[&str],
        device: Device,
        add_special: bool,
    ) -> Result<Encoded> {
        if texts.is_empty() {
            return Err(Error::invalid("encode_batch: no texts"));
        }
        let enc = self
            .inner
            .encode_batch(texts.to_vec(), add_special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        let (b, t) = (enc.len() as i64, enc[0].len() as i64);
        let mut ids = Vec::with_capacity((b * t) as usize);
        let mut mask = Vec::with_capacity((b * t) as usize);
        for e in &enc {
            ids.extend(e.get_ids().iter().map(|&i| i as i64));
            mask.extend(e.get_attention_mask().iter().map(|&m| m as i64));
        }
        let to = |v: Vec<i64>| -> Result<Tensor> {
            Ok(Tensor::from_slice(&v)
                .f_view([b, t])?
                .f_to_device(device)?
                .f_to_kind(Kind::Int64)?)
        };
        Ok(Encoded {
            input_ids: to(ids)?,
            attention_mask: to(mask)?,
        })
    }
}
