//! `modular generate`: text from a Llama-family decoder folder (Llama,
//! Mistral, Qwen2, Qwen3), one prompt streamed to the terminal or a JSONL
//! file of prompts batched with left padding, greedy or sampled, optionally
//! with a different PEFT LoRA adapter per prompt in the same batch
//! (pet-core's mixed-adapter batches).

use std::io::Write;
use std::path::{Path, PathBuf};

use model_zoo::chat::{ChatMessage, ChatTemplate};
use model_zoo::data::jsonl_rows;
use model_zoo::llama::{GenerateOptions, LlamaForCausalLM, Sampling};
use model_zoo::tokenizer::TextTokenizer;
use pet_core::{BASE, MixedBatch};
use serde_json::{Value, json};
use tensor_core::Context;
use tensor_core::tch::{Device, Kind, Tensor};

use super::{AnyResult, Flags, require_dir};

pub const HELP: &str = "\
usage: modular generate --model DIR (--prompt TEXT | --data FILE.jsonl) [--out FILE.jsonl]
                        [--max-new-tokens 64] [--temperature X [--top-k K] [--top-p P] [--seed 0]]
                        [--batch 8] [--adapters NAME=DIR,...] [--chat [--system TEXT]]

Continue text with a Llama-family decoder (config.json with model_type llama, mistral,
qwen2 or qwen3; model.safetensors or sharded weights; tokenizer.json). Decoding is greedy
unless --temperature is given; it stops at the config's eos_token_id.

  --prompt TEXT   one prompt; the continuation streams to stdout as it is generated
                  (with --out, a one-line JSONL file is written instead)
  --data FILE     JSONL, one {\"prompt\": \"...\"} per line, optionally with \"adapter\": NAME;
                  output: one {\"line\": N, \"prompt\", \"completion\", \"tokens\", \"adapter\"}
                  per input line, to --out or stdout

options:
  --model DIR            decoder folder (required)
  --out FILE             JSONL output, written atomically
  --max-new-tokens N     tokens to add at most [64]
  --temperature X        sample from softmax(logits / X) instead of taking the most likely token
  --top-k K, --top-p P   keep the K most likely tokens, then the smallest set reaching P (sampling only)
  --seed N               sampling seed [0]; the same seed gives the same text
  --batch N              prompts per forward pass [8]
  --chat                 render each prompt as a user message with the folder's chat template
                         (tokenizer_config.json), opening the assistant's turn; --data lines may
                         give \"messages\": [{\"role\", \"content\"}, ...] instead of a prompt
  --system TEXT          with --chat: a system message before each prompt
  --adapters N=D,...     PEFT LoRA folders loaded as adapters NAME; a --data line's \"adapter\"
                         picks one for that prompt (none: the base model), all in one batch
  --adapter NAME         with --prompt: the loaded adapter to generate with

exit codes: 0 written, 1 a file is missing or malformed, 2 a malformed command line.

examples:
  modular generate --model models/Qwen2.5-0.5B --prompt \"The capital of France is\"
  modular generate --model models/Llama-3.2-1B --data prompts.jsonl --out out.jsonl --temperature 0.7 --top-p 0.9
  modular generate --model models/Llama-3.2-1B --data prompts.jsonl --adapters sql=adapters/sql,chat=adapters/chat";

/// One request: its prompt (or chat messages) and adapter (`None`: the base model).
struct Request {
    prompt: String,
    messages: Option<Vec<ChatMessage>>,
    adapter: Option<String>,
}

fn read_requests(path: &Path) -> AnyResult<Vec<Request>> {
    let mut out = Vec::new();
    for (n, v) in jsonl_rows(path)? {
        let at = format!("{}:{n}", path.display());
        let messages: Option<Vec<ChatMessage>> = match v.get("messages") {
            None | Some(Value::Null) => None,
            Some(m) => Some(serde_json::from_value(m.clone()).map_err(|e| {
                format!("{at}: \"messages\" must be a list of {{\"role\", \"content\"}}: {e}")
            })?),
        };
        let prompt = match (v.get("prompt").and_then(Value::as_str), &messages) {
            (Some(p), _) => p,
            (None, Some(_)) => "",
            (None, None) => {
                return Err(
                    format!("{at}: needs a string field \"prompt\" (or \"messages\")").into(),
                );
            }
        };
        let adapter = match v.get("adapter") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(x) => return Err(format!("{at}: \"adapter\" must be a string, got {x}").into()),
        };
        out.push(Request {
            prompt: prompt.to_owned(),
            messages,
            adapter,
        });
    }
    Ok(out)
}

fn sampling(f: &Flags) -> AnyResult<Sampling> {
    let temperature: Option<f64> = f.parsed("--temperature")?;
    let top_k: Option<i64> = f.parsed("--top-k")?;
    let top_p: Option<f64> = f.parsed("--top-p")?;
    let seed: u64 = f.parsed_or("--seed", 0)?;
    match temperature {
        None if top_k.is_some() || top_p.is_some() => super::usage(
            "generate",
            "--top-k and --top-p filter sampled tokens: give --temperature too",
        ),
        None => Ok(Sampling::Greedy),
        Some(t) => Ok(Sampling::Sample {
            temperature: t,
            top_k,
            top_p,
            seed,
        }),
    }
}

pub fn run(args: &[String]) -> AnyResult<()> {
    let Some(f) = Flags::parse_options(
        "generate",
        args,
        &[
            "--model",
            "--prompt",
            "--data",
            "--out",
            "--max-new-tokens",
            "--temperature",
            "--top-k",
            "--top-p",
            "--seed",
            "--batch",
            "--adapters",
            "--system",
            "--adapter",
        ],
        &["--chat"],
        HELP,
    )?
    else {
        return Ok(());
    };
    let model_dir = PathBuf::from(f.required("--model")?);
    let (prompt, data) = (f.get("--prompt"), f.path("--data"));
    let requests = match (prompt, &data) {
        (Some(p), None) => vec![Request {
            prompt: p.to_owned(),
            messages: None,
            adapter: f.get("--adapter").map(str::to_owned),
        }],
        (None, Some(d)) => {
            if !d.is_file() {
                return Err(format!("data {} is not a file", d.display()).into());
            }
            read_requests(d)?
        }
        _ => return super::usage("generate", "give exactly one of --prompt and --data"),
    };
    if f.get("--adapter").is_some() && prompt.is_none() {
        return super::usage(
            "generate",
            "--adapter picks the adapter of --prompt; --data lines name theirs in \"adapter\"",
        );
    }
    let out = f.path("--out");
    if let Some(o) = &out {
        let mut inputs: Vec<(&str, &Path)> = vec![("--model", &model_dir)];
        if let Some(d) = &data {
            inputs.push(("--data", d));
        }
        f.out_not_input(o, &inputs)?;
    }
    let max_new = f.positive_or("--max-new-tokens", 64)? as i64;
    let batch = f.positive_or("--batch", 8)?;
    let sampling = sampling(&f)?;
    let adapters: Vec<(String, PathBuf)> = match f.list::<String>("--adapters")? {
        None => Vec::new(),
        Some(items) => items
            .iter()
            .map(|s| match s.split_once('=') {
                Some((n, d)) if !n.is_empty() && !d.is_empty() => {
                    Ok((n.to_owned(), PathBuf::from(d)))
                }
                _ => Err(format!("--adapters: '{s}' is not NAME=DIR")),
            })
            .collect::<Result<_, _>>()?,
    };
    for r in &requests {
        if let Some(a) = &r.adapter
            && !adapters.iter().any(|(n, _)| n == a)
        {
            let known: Vec<&str> = adapters.iter().map(|(n, _)| n.as_str()).collect();
            return Err(format!(
                "a prompt asks for adapter '{a}', which --adapters does not load (loaded: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
            .into());
        }
    }
    require_dir(&model_dir, "model folder")?;
    let device = tensor_core::best();
    let mut model = LlamaForCausalLM::from_folder(&model_dir, device)?;
    for (name, dir) in &adapters {
        require_dir(dir, "adapter folder")?;
        pet_core::load_adapter(&mut model, name, dir)?;
        pet_core::set_adapter(&mut model, &[])?;
    }
    let chat = f.switch("--chat") || requests.iter().any(|r| r.messages.is_some());
    let template = if chat {
        Some(ChatTemplate::from_folder(&model_dir)?.ok_or_else(|| {
            format!(
                "model folder {} has no chat template (tokenizer_config.json's chat_template or chat_template.jinja)",
                model_dir.display()
            )
        })?)
    } else {
        if f.get("--system").is_some() {
            return super::usage("generate", "--system applies to --chat only");
        }
        None
    };
    let system = f.get("--system").map(str::to_owned);
    let config = model.config().clone();
    let tok = TextTokenizer::for_decoder(
        model_dir.join("tokenizer.json"),
        config.vocab_size,
        config.pad_token_id,
    )?;
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling,
        stop_tokens: config.eos_token_ids.clone(),
        pad_token_id: config.pad_token_id.unwrap_or(i64::from(tok.pad_id)),
    };
    let stream = prompt.is_some() && out.is_none();
    let mut lines = String::new();
    let mut done = 0usize;
    for chunk in requests.chunks(batch) {
        let texts: Vec<String> = match &template {
            None => chunk.iter().map(|r| r.prompt.clone()).collect(),
            Some(t) => chunk
                .iter()
                .map(|r| {
                    let messages = match &r.messages {
                        Some(m) => m.clone(),
                        None => system
                            .iter()
                            .map(|s| ChatMessage {
                                role: "system".into(),
                                content: s.clone(),
                            })
                            .chain(std::iter::once(ChatMessage {
                                role: "user".into(),
                                content: r.prompt.clone(),
                            }))
                            .collect(),
                    };
                    t.render(&messages, true)
                })
                .collect::<model_zoo::Result<_>>()?,
        };
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        // A rendered chat carries its own special tokens.
        let enc = tok.encode_batch_with(&refs, device, template.is_none())?;
        let mut ctx = Context::eval();
        if !adapters.is_empty() {
            let names: Vec<&str> = chunk
                .iter()
                .map(|r| r.adapter.as_deref().unwrap_or(BASE))
                .collect();
            ctx.insert(MixedBatch::new(&names, device)?);
        }
        let mut shown = String::new();
        let mut so_far: Vec<i64> = Vec::new();
        let mut on_step = |next: &Tensor| -> model_zoo::Result<()> {
            if stream {
                so_far.push(next.int64_value(&[0]));
                let text = tok.decode(&so_far, true)?;
                if let Some(new) = text.strip_prefix(shown.as_str()) {
                    print!("{new}");
                    let _ = std::io::stdout().flush();
                }
                shown = text;
            }
            Ok(())
        };
        let output = model.generate_with(
            &enc.input_ids,
            Some(&enc.attention_mask),
            &opts,
            ctx,
            &mut on_step,
        )?;
        if stream {
            println!();
            continue;
        }
        let t = enc.input_ids.size()[1];
        let new = output
            .f_narrow(1, t, output.size()[1] - t)?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Int64)?;
        for (i, r) in chunk.iter().enumerate() {
            let row: Vec<i64> = Vec::try_from(new.f_get(i as i64)?)?;
            // Up to and including the first stop token; the rest is padding.
            let end = row
                .iter()
                .position(|t| opts.stop_tokens.contains(t))
                .map_or(row.len(), |p| p + 1);
            let tokens = &row[..end];
            done += 1;
            lines.push_str(
                &json!({
                    "line": done,
                    "prompt": r.prompt,
                    "messages": r.messages,
                    "completion": tok.decode(tokens, true)?,
                    "tokens": tokens,
                    "adapter": r.adapter,
                })
                .to_string(),
            );
            lines.push('\n');
        }
    }
    match (&out, stream) {
        (_, true) => {}
        (Some(o), _) => {
            super::write_text(o, &lines)?;
            eprintln!(
                "modular generate: {done} completion(s) of up to {max_new} tokens written to {}",
                o.display()
            );
        }
        (None, _) => print!("{lines}"),
    }
    Ok(())
}
