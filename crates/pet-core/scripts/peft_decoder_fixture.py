"""PEFT LoRA on a Llama-family decoder, for pet-core's decoder test
(`tests/decoder.rs`): the base is model-zoo's tiny Llama fixture
(`crates/model-zoo/tests/fixtures/tiny-llama`, made by
`crates/model-zoo/scripts/make_decoder_fixtures.py`).

Run with the cache venv (torch, transformers, safetensors, peft 0.21.2):

    ~/.cache/modular/torch-2.11.0/bin/python crates/pet-core/scripts/peft_decoder_fixture.py

Writes `crates/pet-core/tests/fixtures/peft-llama/`:
  lora/   LoRA r=4, alpha=8 on q_proj, k_proj, v_proj, o_proj, gate_proj,
          up_proj, down_proj, rank_pattern {"model.layers.1.mlp.down_proj": 2},
          every factor redrawn from a seeded generator (A ~ 0.3 randn,
          B ~ 0.1 randn); adapter_config.json + adapter_model.safetensors
  expected.safetensors
    input_ids, attention_mask [3, 9] (the tiny Llama fixture's batch: full,
    right-padded, left-padded rows), logits [3, 9, 96] of the PEFT model with
    position_ids = cumsum(mask) - 1 (1 on padding), merged_logits after
    merge_and_unload.
"""
import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

HERE = Path(os.path.dirname(os.path.abspath(__file__)))
BASE = HERE.parent.parent / "model-zoo" / "tests" / "fixtures" / "tiny-llama"
OUT = HERE.parent / "tests" / "fixtures" / "peft-llama"


def base():
    return LlamaForCausalLM.from_pretrained(str(BASE)).float().eval()


def run(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().contiguous()


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"model.layers.1.mlp.down_proj": 2},
        lora_dropout=0.0,
        bias="none",
    )
    pm = get_peft_model(base(), cfg)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(OUT / "lora"))
    c = json.loads((OUT / "lora" / "adapter_config.json").read_text())
    c["target_modules"] = sorted(c["target_modules"])
    c["base_model_name_or_path"] = None
    (OUT / "lora" / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    readme = OUT / "lora" / "README.md"
    if readme.exists():
        readme.unlink()
    e = load_file(str(BASE / "expected.safetensors"))
    ids, mask = e["input_ids"], e["attention_mask"]
    reloaded = PeftModel.from_pretrained(base(), str(OUT / "lora"))
    logits = run(reloaded, ids, mask)
    merged = run(PeftModel.from_pretrained(base(), str(OUT / "lora")).merge_and_unload(), ids, mask)
    d = (logits - run(base(), ids, mask)).abs().max().item()
    print(f"max|lora - base| = {d:.4f}, max|merged - lora| = {(merged - logits).abs().max().item():.2e}")
    assert d > 1e-2
    save_file(
        {"input_ids": ids, "attention_mask": mask, "logits": logits, "merged_logits": merged},
        str(OUT / "expected.safetensors"),
    )


if __name__ == "__main__":
    main()
