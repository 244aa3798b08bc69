"""PyTorch references for benches/decoder.rs: the same random Llama through
Hugging Face transformers (CPU, f32): 4 layers, hidden 512, 8 query / 2
key-value heads, intermediate 1408, vocabulary 32000, untied head; random
weights (timings do not depend on the values).

- `prefill_4x128`: `model(input_ids, attention_mask, use_cache=False).logits`, no_grad;
- `decode_4x32_new32`: `generate(max_new_tokens=32, min_new_tokens=32,
  do_sample=False)` after a 4 x 32 prompt (KV cache, prefill included);
- `decode_one_adapter_new32` / `decode_mixed4_new32` (when PEFT is
  installed): four LoRA adapters (r=8, alpha 8, q_proj/v_proj, non-zero B),
  `set_adapter("a0")`, or `adapter_names=["a0", "a1", "a2", "a3"]`.

Prints `decoder/CASE/pytorch SECONDS` (median) and `# ...` comments.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from timing import median_seconds


def report(case, seconds):
    print(f"decoder/{case}/pytorch {seconds:.6e}", flush=True)
    return seconds


def main():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 31100, (4, 128), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        report(
            "prefill_4x128",
            median_seconds(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False).logits, warmup=2, reps=10),
        )
    gids = torch.randint(100, 31100, (4, 32), generator=g)
    gmask = torch.ones_like(gids)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        report("decode_4x32_new32", median_seconds(lambda: model.generate(input_ids=gids, attention_mask=gmask, **kw), warmup=1, reps=5))
    try:
        import peft
    except ImportError:
        print("# PEFT not installed: adapter cases skipped", flush=True)
        return
    pm = None
    for i in range(4):
        cfg = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", cfg)
    pm.eval()
    pm.set_adapter("a0")
    with torch.no_grad():
        one = report(
            "decode_one_adapter_new32",
            median_seconds(lambda: pm.generate(input_ids=gids, attention_mask=gmask, **kw), warmup=1, reps=5),
        )
        mixed = report(
            "decode_mixed4_new32",
            median_seconds(
                lambda: pm.generate(input_ids=gids, attention_mask=gmask, adapter_names=["a0", "a1", "a2", "a3"], **kw),
                warmup=1,
                reps=5,
            ),
        )
    print(f"# PEFT per-request adapter overhead: {100 * (mixed / one - 1):.1f}%", flush=True)


if __name__ == "__main__":
    main()
