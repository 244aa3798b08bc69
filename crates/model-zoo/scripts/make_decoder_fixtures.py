#!/usr/bin/env python3
"""Tiny random Llama-family decoders with Hugging Face transformers' outputs,
for the parity tests of `model-zoo` (`src/llama.rs`).

Run with the project's venv (no network needed):

    ~/.cache/modular/torch-2.11.0/bin/python crates/model-zoo/scripts/make_decoder_fixtures.py

It writes, under `crates/model-zoo/tests/fixtures/`, one folder per family,
each with `config.json` and `model.safetensors` from
`save_pretrained(safe_serialization=True)` and `expected.safetensors`:

- `tiny-llama/`: Llama with Llama 3 RoPE scaling (factor 8, low/high
  frequency factors 1/4, original context 16, so every band of the scaling
  is exercised), q/k/v/o and MLP biases, an untied LM head;
- `tiny-qwen2/`: Qwen2 (q/k/v biases, no o bias), tied embeddings;
- `tiny-qwen3/`: Qwen3 (RMSNorm on each query and key head), an explicit
  `head_dim` of 16 (not hidden/heads = 8), YaRN RoPE scaling (factor 4,
  original context 16: interpolated, ramped and kept dimensions, and the
  attention factor on cos/sin);
- `tiny-mistral/`: Mistral with a sliding window of 4 tokens (shorter than the
  inputs, so the window matters);
- `tiny-mixtral/`: Mixtral, 4 experts, top-2 (probabilities renormalised),
  stored as transformers writes it (`block_sparse_moe.experts.{i}.w1/w2/w3`);
- `tiny-qwen2moe/`: Qwen2-MoE, 4 experts of width 16, top-2 without
  renormalisation, a shared expert of width 24 with its sigmoid gate, layer 1
  dense (`mlp_only_layers`).

All: vocab 96, hidden 32, intermediate 48, 2 layers, 4 query heads and 2
key/value heads (grouped-query attention), float32. Every parameter is redrawn
from a seeded generator (RMSNorm weights around 1, matrices with std 0.15) so
that activations stay O(1) and no code path sees only ones and zeros.

`expected.safetensors`:
- `input_ids`, `attention_mask` [3, 9] i64: row 0 full, row 1 right-padded
  (3 pads), row 2 left-padded (3 pads); pad id 0;
- `position_ids` [3, 9] i64: `cumsum(mask) - 1`, 1 on padding (what
  `generate` uses);
- `logits` [3, 9, 96] f32 from `model(input_ids, attention_mask, position_ids)`;
- `gen_input_ids`, `gen_attention_mask` [2, 6] i64 (row 1 left-padded by 2)
  and `gen_output` [2, 14] i64: greedy `generate` of 8 new tokens
  (`do_sample=False`, no stop token, pad id 0).

`tiny-llama/` also gets a `tokenizer.json`: a word-level vocabulary
(`<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3, `<|im_start|>` 4, `<|im_end|>` 5
(all special), then the words of a few English
sentences in sorted order, then `w{i}` up to id 95, so it is the same on
every run and every id decodes), adding `<s>` in
front of every text, and `generate.json`: three
prompts with the text `generate` continues them with (greedy, 8 new tokens,
stopping at `</s>`, prompts left-padded in one batch, the new tokens decoded
without special tokens), which the `modular generate` test compares with;
`tokenizer_config.json` with a ChatML-style chat template (a loop, a role
check with `raise_exception`, `.strip()`), and `chat.json`: two messages, the
text `apply_chat_template(add_generation_prompt=True)` renders, its ids
(encoded without added special tokens) and the greedy continuation (6 tokens).
"""

import os
import shutil

import json

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    PreTrainedTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def families():
    yield "tiny-llama", LlamaForCausalLM, LlamaConfig(
        **COMMON,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    yield "tiny-qwen2", Qwen2ForCausalLM, Qwen2Config(
        **COMMON, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}
    )
    yield "tiny-qwen3", Qwen3ForCausalLM, Qwen3Config(
        **COMMON, head_dim=16, tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    yield "tiny-mistral", MistralForCausalLM, MistralConfig(
        **COMMON, sliding_window=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    yield "tiny-mixtral", MixtralForCausalLM, MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    yield "tiny-qwen2moe", Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[1],
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def redraw(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    ids = ids * mask  # pad id 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    gen_ids = torch.randint(3, 96, (2, 6), generator=g)
    gen_mask = torch.ones(2, 6, dtype=torch.int64)
    gen_mask[1, :2] = 0
    gen_ids = gen_ids * gen_mask
    return ids, mask, pos, gen_ids, gen_mask


CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'].strip() }}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
CHAT = [
    {"role": "system", "content": "  rust is fast  "},
    {"role": "user", "content": "the cat sat on the mat"},
]
CORPUS = [
    "system user assistant",
    "the cat sat on the mat",
    "a dog ran in the park",
    "we read books at night",
    "she likes green tea and toast",
    "models predict the next token",
    "rust is fast and safe",
]
PROMPTS = ["the cat sat", "rust is", "we read books at"]


def tiny_tokenizer():
    words = sorted({w for line in CORPUS for w in line.split()})
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tokens = special + words
    tokens += [f"w{i}" for i in range(len(tokens), 96)]  # every id of the model decodes
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(special)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= 96, tok.get_vocab_size()
    return tok


def text_generation(model, out):
    tok = tiny_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    enc = fast(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2
        )
    new = gen[:, enc["input_ids"].shape[1]:]
    rows = [
        {"prompt": p, "completion": fast.decode(n, skip_special_tokens=True), "tokens": n.tolist()}
        for p, n in zip(PROMPTS, new)
    ]
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    # The chat template, as transformers stores and renders it.
    fast.chat_template = CHAT_TEMPLATE
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
        f.write("\n")
    text = fast.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = fast(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    new = gen[0, ids["input_ids"].shape[1]:]
    chat = {
        "messages": CHAT,
        "rendered": text,
        "input_ids": ids["input_ids"][0].tolist(),
        "completion": fast.decode(new, skip_special_tokens=True),
        "tokens": new.tolist(),
    }
    with open(os.path.join(out, "chat.json"), "w") as f:
        json.dump(chat, f, indent=1)
        f.write("\n")
    return rows, chat


def main():
    torch.set_num_threads(1)
    for i, (name, cls, config) in enumerate(families()):
        torch.manual_seed(0)
        model = cls(config).float().eval()
        redraw(model, 100 + i)
        if config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        out = os.path.join(FIXTURES, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        gc = os.path.join(out, "generation_config.json")
        if os.path.exists(gc):
            os.remove(gc)
        ids, mask, pos, gen_ids, gen_mask = inputs(200 + i)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            gen = model.generate(
                input_ids=gen_ids,
                attention_mask=gen_mask,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert gen.shape == (2, 14), gen.shape
        save_file(
            {
                "input_ids": ids.contiguous(),
                "attention_mask": mask.contiguous(),
                "position_ids": pos.contiguous(),
                "logits": logits.contiguous(),
                "gen_input_ids": gen_ids.contiguous(),
                "gen_attention_mask": gen_mask.contiguous(),
                "gen_output": gen.contiguous(),
            },
            os.path.join(out, "expected.safetensors"),
        )
        if name == "tiny-llama":
            print(text_generation(model, out))
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: {sorted(os.listdir(out))}, {size} B, logits |max| {logits.abs().max():.3f}, generated {gen[:, 6:].tolist()}")


if __name__ == "__main__":
    main()
