//! BERT-family encoders (Devlin et al., 2019), as Hugging Face's `BertModel`
//! computes them, with its parameter names:
//!
//! - embeddings: `E = LayerNorm(word[ids] + position[0..T] + token_type[tt])`
//! - each layer (post-LN): `A = LayerNorm(H + Attention(H))`,
//!   `H' = LayerNorm(A + W2 act(W1 A + b1) + b2)`
//! - optional pooler: `tanh(W_p H'[:, 0] + b_p)`
//!
//! Sentence embeddings follow sentence-transformers: the mean of the last
//! hidden states over the attention mask, optionally L2-normalised.
//!
//! Paths (what the method crates address): `embeddings.*`,
//! `encoder.layer.N.attention` (an `Attention` with `self.query`, `self.key`,
//! `self.value`, `output.dense`), `encoder.layer.N.attention.output.LayerNorm`,
//! `encoder.layer.N.(ffn)` (a `FeedForward` with `intermediate.dense`,
//! `output.dense`), `encoder.layer.N.output.LayerNorm`, `pooler.dense`.

use std::collections::HashSet;
use std::path::Path;

use tensor_core::io::SafetensorsFile;
use tensor_core::layers::{
    Attention, AttentionConfig, AttentionNames, Embedding, FeedForward, FfnNames, LayerNorm, Linear,
};
use tensor_core::module::{Context, Module, ModuleExt, Slot};
use tensor_core::tch::{self, Device, Kind, Tensor};
use tensor_core::{Error as TensorError, TchResultExt};

use crate::config::{BertConfig, JsonConfig};
use crate::error::{Error, Result};
use crate::loading::{self, Checkpoint, Layout};
use crate::source::ModelSource;
use crate::tokenizer::TextTokenizer;

/// Token type ids for a batch (`[B, T]`), put into the context by the caller;
/// absent means all zeros.
#[derive(Debug)]
pub struct TokenTypeIds(pub Tensor);

/// Inverted dropout with probability `p` while training, the identity
/// otherwise; `op` labels a failure. The GPT-2 and ViT layers use it too.
pub(crate) fn dropout(xs: Tensor, p: f64, train: bool, op: &str) -> tensor_core::Result<Tensor> {
    if train && p > 0.0 {
        xs.f_dropout(p, true).op(op)
    } else {
        Ok(xs)
    }
}

/// Run `m` on `input_ids` under `attention_mask` (`[B, T]`, 1 = token), in
/// training or evaluation mode.
fn forward_masked(
    m: &dyn Module,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let mut ctx = if train {
        Context::train()
    } else {
        Context::eval()
    };
    ctx.attention_mask = Some(attention_mask.shallow_clone());
    Ok(m.forward(input_ids, &mut ctx)?)
}

#[derive(Debug, Module)]
#[module(kind = "BertEmbeddings", forward = forward_impl)]
pub struct BertEmbeddings {
    #[child]
    pub word_embeddings: Slot,
    #[child]
    pub position_embeddings: Slot,
    #[child]
    pub token_type_embeddings: Slot,
    #[child(name = "LayerNorm")]
    pub layer_norm: Slot,
    pub dropout: f64,
}

impl BertEmbeddings {
    /// `input_ids: [B, T]` int64 -> `[B, T, d]`.
    fn forward_impl(&self, ids: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let s = ids.size();
        if s.len() != 2 {
            return Err(TensorError::shape(
                "BertEmbeddings input_ids",
                "[batch, seq]",
                s,
            ));
        }
        let (b, t) = (s[0], s[1]);
        let pos = Tensor::f_arange(t, (Kind::Int64, ids.device()))?.f_unsqueeze(0)?;
        let tt = match ctx.get::<TokenTypeIds>() {
            Some(TokenTypeIds(tt)) if tt.size() == s => tt.shallow_clone(),
            Some(TokenTypeIds(tt)) => {
                return Err(TensorError::shape(
                    "token_type_ids",
                    format!("[{b}, {t}]"),
                    tt.size(),
                ));
            }
            None => Tensor::f_zeros([b, t], (Kind::Int64, ids.device()))?,
        };
        let w = ctx.call("word_embeddings", self.word_embeddings.as_ref(), ids)?;
        let p = ctx.call(
            "position_embeddings",
            self.position_embeddings.as_ref(),
            &pos,
        )?;
        let ty = ctx.call(
            "token_type_embeddings",
            self.token_type_embeddings.as_ref(),
            &tt,
        )?;
        let e = w.f_add(&p)?.f_add(&ty)?;
        let e = ctx.call("LayerNorm", self.layer_norm.as_ref(), &e)?;
        dropout(e, self.dropout, ctx.train, "dropout")
    }
}

/// One post-LN transformer layer with BERT's names.
#[derive(Debug, Module)]
#[module(kind = "BertLayer", forward = forward_impl)]
pub struct BertLayer {
    #[child]
    pub attention: Slot,
    #[child(name = "attention.output.LayerNorm")]
    pub attention_norm: Slot,
    #[child(name = "(ffn)")]
    pub ffn: Slot,
    #[child(name = "output.LayerNorm")]
    pub output_norm: Slot,
    pub dropout: f64,
}

impl BertLayer {
    fn forward_impl(&self, h: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let a = ctx.call("attention", self.attention.as_ref(), h)?;
        let a = dropout(a, self.dropout, ctx.train, "dropout")?;
        let a = ctx.call(
            "attention.output.LayerNorm",
            self.attention_norm.as_ref(),
            &h.f_add(&a)?,
        )?;
        // The FeedForward applies its own output dropout.
        let f = ctx.call("(ffn)", self.ffn.as_ref(), &a)?;
        let out = ctx.call("output.LayerNorm", self.output_norm.as_ref(), &a.f_add(&f)?)?;
        ctx.record("hidden", &out)?;
        Ok(out)
    }
}

/// The stack of layers, named `layer.0`, `layer.1`, ...
#[derive(Debug, Module)]
#[module(kind = "BertEncoder", forward = forward_impl)]
pub struct BertEncoder {
    names: Vec<String>,
    #[children(names = "names")]
    pub layers: Vec<Slot>,
}

impl BertEncoder {
    fn forward_impl(&self, h: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let mut h = h.shallow_clone();
        for (n, l) in self.names.iter().zip(&self.layers) {
            h = ctx.call(n, l.as_ref(), &h)?;
        }
        Ok(h)
    }
}

/// A BERT encoder: `input_ids [B, T]` (mask in `ctx.attention_mask`) -> last hidden states `[B, T, d]`.
#[derive(Debug, Module)]
#[module(kind = "BertModel", forward = forward_impl)]
pub struct BertModel {
    pub config: BertConfig,
    #[child]
    pub embeddings: Slot,
    #[child]
    pub encoder: Slot,
    /// `pooler.dense`, when the checkpoint has one.
    #[child(name = "pooler.dense")]
    pub pooler: Option<Slot>,
}

impl BertModel {
    /// A freshly initialised encoder (BERT's init: weights `N(0, 0.02)`, biases 0, LayerNorm 1/0).
    pub fn new(config: BertConfig, with_pooler: bool, device: Device) -> Result<Self> {
        let c = &config;
        let d = c.hidden_size;
        let ln =
            || -> Result<Slot> { Ok(Box::new(LayerNorm::new(d, c.layer_norm_eps, true, device)?)) };
        let embeddings = BertEmbeddings {
            word_embeddings: Box::new(Embedding::new(c.vocab_size, d, device)?),
            position_embeddings: Box::new(Embedding::new(c.max_position_embeddings, d, device)?),
            token_type_embeddings: Box::new(Embedding::new(c.type_vocab_size.max(1), d, device)?),
            layer_norm: ln()?,
            dropout: c.hidden_dropout_prob,
        };
        let mut layers: Vec<Slot> = Vec::new();
        for _ in 0..c.num_hidden_layers {
            let mut acfg = AttentionConfig::new(d, c.num_attention_heads);
            acfg.dropout = c.attention_probs_dropout_prob;
            let mut ffn = FeedForward::new(
                d,
                c.intermediate_size,
                c.hidden_act,
                FfnNames::bert(),
                device,
            )?;
            ffn.dropout = c.hidden_dropout_prob;
            layers.push(Box::new(BertLayer {
                attention: Box::new(Attention::new(acfg, AttentionNames::bert(), device)?),
                attention_norm: ln()?,
                ffn: Box::new(ffn),
                output_norm: ln()?,
                dropout: c.hidden_dropout_prob,
            }));
        }
        let encoder = BertEncoder {
            names: (0..layers.len()).map(|i| format!("layer.{i}")).collect(),
            layers,
        };
        let pooler: Option<Slot> = if with_pooler {
            Some(Box::new(Linear::new(d, d, true, device)?))
        } else {
            None
        };
        let mut model = Self {
            config,
            embeddings: Box::new(embeddings),
            encoder: Box::new(encoder),
            pooler,
        };
        model.init_weights()?;
        Ok(model)
    }

    fn init_weights(&mut self) -> Result<()> {
        tch::no_grad(|| {
            self.for_each_param_mut(&mut |name, p| {
                if name.ends_with("LayerNorm.weight") {
                    let _ = p.f_fill_(1.0)?;
                } else if name.ends_with(".bias") {
                    let _ = p.f_zero_()?;
                } else {
                    let _ = p.f_normal_(0.0, 0.02)?;
                }
                Ok(())
            })
        })?;
        Ok(())
    }

    /// Load `config.json` and `model.safetensors` from a Hugging Face folder.
    /// Every encoder tensor must be present with its exact shape; a `bert.`
    /// prefix (as in `BertFor*` checkpoints) is accepted.
    pub fn from_folder(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = BertConfig::from_json(&JsonConfig::read(dir.join("config.json"))?)?;
        let file = loading::open_weights(&dir.join("model.safetensors"), "BERT")?;
        let prefix = if file.contains("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let with_pooler = file.contains(&format!("{prefix}pooler.dense.weight"));
        // Refuse, before allocating anything, a config that implies more
        // parameters than the file holds (a corrupt or foreign config.json
        // could otherwise ask for terabytes).
        let c = &config;
        let (h, inter) = (c.hidden_size as f64, c.intermediate_size as f64);
        let layer = 4.0 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 4.0 * h;
        let implied = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) as f64 * h
            + 2.0 * h
            + c.num_hidden_layers as f64 * layer
            + if with_pooler { h * h + h } else { 0.0 };
        loading::check_implied_size(&file, &dir.join("config.json"), implied)?;
        let mut model = Self::new(config, with_pooler, Device::Cpu)?;
        model.load_file(&file, prefix)?;
        model.to_device(device)?;
        Ok(model)
    }

    /// The packaged default (all-MiniLM-L6-v2) or whatever [`ModelSource`] resolves.
    pub fn from_source(source: &ModelSource, device: Device) -> Result<Self> {
        Self::from_folder(&source.dir, device)
    }

    /// Copy the encoder's tensors from `file`, whose keys carry `prefix`
    /// ("" or `bert.`). Keys that name no parameter of the encoder (heads,
    /// the `position_ids` buffer) are ignored.
    fn load_file(&mut self, file: &SafetensorsFile, prefix: &str) -> Result<()> {
        let c = &self.config;
        let about = Checkpoint {
            model: "BERT",
            config: format!(
                "num_hidden_layers {}, vocab_size {}, hidden_size {}, intermediate_size {}, \
                 max_position_embeddings {}, type_vocab_size {}",
                c.num_hidden_layers,
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.max_position_embeddings,
                c.type_vocab_size
            ),
            prefix,
        };
        let names: HashSet<String> = self
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let key_to_name = |key: &str| {
            let name = loading::strip_optional_prefix(key, prefix);
            names.contains(name).then(|| name.to_owned())
        };
        loading::load_checkpoint(self, file, &about, key_to_name, |_| Layout::AsIs)
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// Last hidden states for `input_ids` with `attention_mask` (`[B, T]`, 1 = token).
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        forward_masked(self, input_ids, attention_mask, train)
    }

    /// Hidden states after the embeddings (index 0) and after each layer
    /// (1..=L), as Hugging Face's `output_hidden_states`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let mut ctx = Context::eval();
        ctx.attention_mask = Some(attention_mask.shallow_clone());
        let mut h = ctx.call("embeddings", self.embeddings.as_ref(), input_ids)?;
        let mut out = vec![h.shallow_clone()];
        let enc = self.encoder.children();
        for (name, layer) in enc {
            let path = format!("encoder.{name}");
            h = ctx.call(&path, layer, &h)?;
            out.push(h.shallow_clone());
        }
        Ok(out)
    }
}

impl BertModel {
    fn forward_impl(&self, input_ids: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(TensorError::DType {
                op: "BertModel input_ids".into(),
                expected: "int64 token ids".into(),
                actual: input_ids.kind(),
            });
        }
        let t = input_ids.size().last().copied().unwrap_or(0);
        if t > self.config.max_position_embeddings {
            return Err(TensorError::shape(
                "BertModel input_ids",
                format!(
                    "[batch, <= {}] (max_position_embeddings)",
                    self.config.max_position_embeddings
                ),
                input_ids.size(),
            ));
        }
        let h = ctx.call("embeddings", self.embeddings.as_ref(), input_ids)?;
        ctx.call("encoder", self.encoder.as_ref(), &h)
    }
}

/// Mean of `hidden [B, T, d]` over the tokens where `mask [B, T]` is 1.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.f_to_kind(hidden.kind())?.f_unsqueeze(-1)?;
    let sum = hidden
        .f_mul(&m)?
        .f_sum_dim_intlist(1, false, hidden.kind())?;
    let count = m
        .f_sum_dim_intlist(1, false, hidden.kind())?
        .f_clamp_min(1e-9)?;
    Ok(sum.f_div(&count)?)
}

/// `x / max(||x||_2, 1e-12)` row-wise, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.f_norm_scalaropt_dim(2, [-1], true)?.f_clamp_min(1e-12)?;
    Ok(x.f_div(&n)?)
}

/// Text in, sentence embeddings out (sentence-transformers' Transformer ->
/// Pooling(mean) -> optional Normalize).
#[derive(Debug)]
pub struct SentenceEncoder {
    pub model: BertModel,
    pub tokenizer: TextTokenizer,
    pub normalize: bool,
    pub device: Device,
}

impl SentenceEncoder {
    /// Load model and tokenizer from a folder. The maximum sequence length is
    /// `sentence_bert_config.json`'s `max_seq_length` when present (256 for
    /// all-MiniLM-L6-v2), else `max_position_embeddings`; normalisation is on
    /// when `modules.json` lists a Normalize module.
    pub fn from_folder(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let model = BertModel::from_folder(dir, device)?;
        let st = dir.join("sentence_bert_config.json");
        let max_len = if st.is_file() {
            JsonConfig::read(&st)?.i64_or("max_seq_length", model.config.max_position_embeddings)?
        } else {
            model.config.max_position_embeddings
        };
        let max_len = max_len.min(model.config.max_position_embeddings) as usize;
        let normalize = std::fs::read_to_string(dir.join("modules.json"))
            .is_ok_and(|m| m.contains("Normalize"));
        let tokenizer =
            TextTokenizer::from_file(dir.join("tokenizer.json"), max_len, model.config.vocab_size)?;
        Ok(Self {
            model,
            tokenizer,
            normalize,
            device,
        })
    }

    /// `[N, d]` embeddings of `texts` (no gradient).
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let enc = self.tokenizer.encode_batch(texts, self.device)?;
        tch::no_grad(|| {
            let h = self
                .model
                .encode(&enc.input_ids, &enc.attention_mask, false)?;
            let e = mean_pool(&h, &enc.attention_mask)?;
            if self.normalize {
                l2_normalize(&e)
            } else {
                Ok(e)
            }
        })
    }
}

/// How a classifier summarises the token states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the mask (sentence-transformers style; the default).
    Mean,
    /// The `[CLS]` token's state.
    Cls,
    /// BERT's pooler (`tanh(W [CLS] + b)`); needs `pooler.dense`.
    Pooler,
}

/// `BertForSequenceClassification`-style head: `bert.*` and `classifier.*`.
#[derive(Debug, Module)]
#[module(kind = "SequenceClassifier", forward = forward_impl)]
pub struct SequenceClassifier {
    #[child]
    pub bert: Slot,
    #[child]
    pub classifier: Slot,
    pub pooling: Pooling,
    pub dropout: f64,
    pub num_labels: i64,
}

impl SequenceClassifier {
    /// Put a fresh classifier (`N(0, 0.02)`, bias 0) on an encoder.
    pub fn new(bert: BertModel, num_labels: i64, pooling: Pooling) -> Result<Self> {
        if num_labels < 2 {
            return Err(Error::invalid(format!(
                "SequenceClassifier: num_labels must be >= 2, got {num_labels}"
            )));
        }
        if pooling == Pooling::Pooler && bert.pooler.is_none() {
            return Err(Error::invalid(
                "Pooling::Pooler needs a checkpoint with pooler.dense",
            ));
        }
        let device = loading::device_of(&bert);
        let d = bert.hidden_size();
        let mut classifier = Linear::new(d, num_labels, true, device)?;
        tch::no_grad(|| -> Result<()> {
            let _ = classifier.weight.f_normal_(0.0, 0.02)?;
            if let Some(b) = &mut classifier.bias {
                let _ = b.f_zero_()?;
            }
            Ok(())
        })?;
        let dropout = bert.config.hidden_dropout_prob;
        Ok(Self {
            bert: Box::new(bert),
            classifier: Box::new(classifier),
            pooling,
            dropout,
            num_labels,
        })
    }

    /// The encoder, if it is still a plain `BertModel` (not wrapped).
    pub fn encoder(&self) -> Option<&BertModel> {
        tensor_core::module::downcast_ref::<BertModel>(self.bert.as_ref())
    }

    /// Logits `[B, num_labels]`; the mask is read from `ctx.attention_mask`.
    pub fn logits(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        forward_masked(self, input_ids, attention_mask, train)
    }

    /// [`Self::logits`] and the sum of the auxiliary losses the modules added
    /// to the forward context (`None` when they added none).
    pub fn logits_with_aux(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut ctx = if train {
            Context::train()
        } else {
            Context::eval()
        };
        ctx.attention_mask = Some(attention_mask.shallow_clone());
        let logits = self.forward(input_ids, &mut ctx)?;
        let aux = if ctx.aux_losses().is_empty() {
            None
        } else {
            Some(ctx.aux_loss_total(input_ids.device())?)
        };
        Ok((logits, aux))
    }
}

impl SequenceClassifier {
    fn forward_impl(&self, input_ids: &Tensor, ctx: &mut Context) -> tensor_core::Result<Tensor> {
        let h = ctx.call("bert", self.bert.as_ref(), input_ids)?;
        let pooled = match self.pooling {
            Pooling::Mean => {
                let mask = match &ctx.attention_mask {
                    Some(m) => m.shallow_clone(),
                    None => Tensor::f_ones(input_ids.size(), (Kind::Int64, input_ids.device()))?,
                };
                mean_pool(&h, &mask).map_err(|e| match e {
                    Error::Tensor(t) => t,
                    other => TensorError::config(other.to_string()),
                })?
            }
            Pooling::Cls => h.f_select(1, 0)?,
            Pooling::Pooler => {
                let bert = self.encoder().ok_or_else(|| {
                    TensorError::module("bert", "Pooling::Pooler needs an unwrapped BertModel")
                })?;
                let p = bert
                    .pooler
                    .as_ref()
                    .ok_or_else(|| TensorError::module("bert", "no pooler.dense"))?;
                ctx.call("bert.pooler.dense", p.as_ref(), &h.f_select(1, 0)?)?
                    .f_tanh()?
            }
        };
        let pooled = dropout(pooled, self.dropout, ctx.train, "dropout")?;
        ctx.call("classifier", self.classifier.as_ref(), &pooled)
    }
}
