#!/usr/bin/env python3
"""Tiny random GPT-2 and ViT checkpoints, with Hugging Face transformers'
outputs, for the parity tests of `model-zoo` (`src/gpt.rs`, `src/vit.rs`).

Run with the project's venv (no network needed):

    ~/.cache/modular/torch-2.11.0/bin/python crates/model-zoo/scripts/make_gpt_vit_fixtures.py

It writes, under `crates/model-zoo/tests/fixtures/`:

- `tiny-gpt2/`: `config.json` and `model.safetensors` from
  `GPT2LMHeadModel.save_pretrained(safe_serialization=True)` (keys carry the
  `transformer.` prefix, Conv1D weights are `[in, out]`, `lm_head` is tied and
  not stored), and `expected.safetensors` with
  `input_ids` [3, 12] i64, `attention_mask` [3, 12] i64 (row 0 full, row 1
  right-padded, row 2 left-padded), `logits` [3, 12, 97] f32,
  `hidden` [3, 12, 32] f32 (last hidden state after `ln_f`), and `loss` [] f32:
  the causal-LM loss of rows 0 and 1 (labels = input_ids, -100 on padding).
- `tiny-vit/`: `config.json` and `model.safetensors` from
  `ViTForImageClassification.save_pretrained` (keys carry the `vit.` prefix
  except `classifier.*`), and `expected.safetensors` with `pixel_values`
  [2, 3, 16, 16] f32, `logits` [2, 5] f32 and `hidden` [2, 17, 32] f32 (last
  hidden state after the final `layernorm`).

Every parameter is redrawn from a seeded generator with a scale that keeps
activations O(1) (Hugging Face's own init leaves LayerNorms at 1/0 and biases
at 0, which would leave those code paths untested). Models run in eval mode
in float32 on the CPU; outputs are deterministic for a given torch version.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded random values of a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "ln" in name or "layernorm" in name:
                # LayerNorm: weight around 1, bias around 0.
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "wte" in name or "wpe" in name or "cls_token" in name or "position_embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                fan_in = p.shape[0] if p.dim() == 2 and "transformer" in name else p[0].numel()
                p.copy_(noise / fan_in**0.5)


def clean(folder: str) -> None:
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)


def keep_only(folder: str, names: set) -> None:
    for f in os.listdir(folder):
        if f not in names:
            os.remove(os.path.join(folder, f))


def make_gpt2() -> None:
    out = os.path.join(FIXTURES, "tiny-gpt2")
    clean(out)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    redraw(model, 1)
    model.tie_weights()

    g = torch.Generator().manual_seed(2)
    b, t = 3, 12
    input_ids = torch.randint(1, config.vocab_size, (b, t), generator=g)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, :4] = 0  # left padding
    input_ids[attention_mask == 0] = 0  # the pad token

    with torch.no_grad():
        out_all = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        labels = input_ids[:2].clone()
        labels[attention_mask[:2] == 0] = -100
        loss = model(input_ids=input_ids[:2], attention_mask=attention_mask[:2], labels=labels).loss

    model.save_pretrained(out, safe_serialization=True)
    keep_only(out, {"config.json", "model.safetensors"})
    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "logits": out_all.logits.float().contiguous(),
            "hidden": out_all.hidden_states[-1].float().contiguous(),
            "loss": loss.float().reshape(()).contiguous(),
        },
        os.path.join(out, "expected.safetensors"),
    )
    print("tiny-gpt2: loss", float(loss), "logits", tuple(out_all.logits.shape))


def make_vit() -> None:
    out = os.path.join(FIXTURES, "tiny-vit")
    clean(out)
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        num_labels=5,
    )
    model = ViTForImageClassification(config).eval()
    redraw(model, 3)

    g = torch.Generator().manual_seed(4)
    pixel_values = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        res = model(pixel_values=pixel_values, output_hidden_states=True)
        # The last entry of hidden_states is before the final layernorm.
        hidden = model.vit(pixel_values=pixel_values).last_hidden_state

    model.save_pretrained(out, safe_serialization=True)
    keep_only(out, {"config.json", "model.safetensors"})
    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "logits": res.logits.float().contiguous(),
            "hidden": hidden.float().contiguous(),
        },
        os.path.join(out, "expected.safetensors"),
    )
    print("tiny-vit: logits", res.logits.tolist())


if __name__ == "__main__":
    make_gpt2()
    make_vit()
    for sub in ("tiny-gpt2", "tiny-vit"):
        folder = os.path.join(FIXTURES, sub)
        sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
        print(sub, json.dumps(sizes))
