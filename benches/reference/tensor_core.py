"""PyTorch references for benches/tensor_core.rs, same shapes, same machine.

Prints `tensor_core/CASE/pytorch SECONDS` (median) for each case; `cargo xtask
bench` pairs them with the criterion results. The MoE reference is the usual
eager PyTorch formulation (as in Hugging Face's Mixtral/Switch code): sort the
assignments by expert, one matmul per expert, index_add back.
"""
import math
import torch
import torch.nn.functional as F

from timing import median_seconds

TOKENS, D, FF, E, K = 32 * 128, 384, 1536, 8, 2

def main():
    torch.manual_seed(0)
    f = FF // E
    x = torch.randn(TOKENS, D)
    idx = torch.randint(E, (TOKENS, K))
    gates = torch.randn(TOKENS, K).softmax(-1)
    w1, b1 = torch.randn(E, f, D) * 0.05, torch.randn(E, f) * 0.05
    w2, b2 = torch.randn(E, D, f) * 0.05, torch.randn(E, D) * 0.05

    def moe(capacity=None):
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // K
        expert = flat[order]
        counts = torch.bincount(flat, minlength=E)
        xs = x.index_select(0, token)
        if capacity is None:
            outs = []
            for e, part in enumerate(xs.split(counts.tolist())):
                h = F.gelu(F.linear(part, w1[e], b1[e]))
                outs.append(F.linear(h, w2[e], b2[e]))
            y = torch.cat(outs)
        else:
            starts = counts.cumsum(0) - counts
            pos = torch.arange(len(order)) - starts[expert]
            kept = pos < capacity
            slot = torch.where(kept, expert * capacity + pos, E * capacity)
            buf = torch.zeros(E * capacity + 1, D).index_copy(0, slot, xs)
            h = torch.baddbmm(b1.unsqueeze(1), buf[:-1].view(E, capacity, D), w1.transpose(1, 2))
            h = F.gelu(h).reshape(E * capacity, f)
            hb = torch.cat([h, torch.zeros(1, f)]).index_select(0, slot)
            buf2 = torch.zeros(E * capacity + 1, f).index_copy(0, slot, hb)
            y = torch.baddbmm(b2.unsqueeze(1), buf2[:-1].view(E, capacity, f), w2.transpose(1, 2))
            y = torch.cat([y.reshape(E * capacity, D), torch.zeros(1, D)]).index_select(0, slot)
        w = gates.reshape(-1).index_select(0, order).unsqueeze(1)
        return torch.zeros(TOKENS, D).index_add(0, token, y * w)

    cap = math.ceil(1.25 * TOKENS * K / E)
    x3 = torch.randn(32, 128, D)
    ffn_w1, ffn_b1 = torch.randn(FF, D) * 0.05, torch.randn(FF) * 0.05
    ffn_w2, ffn_b2 = torch.randn(D, FF) * 0.05, torch.randn(D) * 0.05
    att = [torch.randn(D, D) * 0.05 for _ in range(4)]
    att_b = [torch.randn(D) * 0.05 for _ in range(4)]
    mask = torch.ones(32, 128, dtype=torch.long)
    mask[:8, 64:] = 0

    def attention():
        b, t, _ = x3.shape
        q, k, v = (F.linear(x3, att[i], att_b[i]).view(b, t, 12, D // 12).transpose(1, 2) for i in range(3))
        allowed = mask.ne(0).view(b, 1, 1, t)
        add = torch.zeros(1).masked_fill(~allowed, torch.finfo(torch.float32).min)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=add)
        return F.linear(o.transpose(1, 2).reshape(b, t, D), att[3], att_b[3])

    with torch.no_grad():
        cases = {
            "moe_top2_of_8": lambda: moe(None),
            "moe_top2_of_8_capacity": lambda: moe(cap),
            "ffn": lambda: F.linear(F.gelu(F.linear(x3, ffn_w1, ffn_b1)), ffn_w2, ffn_b2),
            "self_attention": attention,
        }
        for name, fn in cases.items():
            print(f"tensor_core/{name}/pytorch {median_seconds(fn):.6e}", flush=True)


if __name__ == "__main__":
    main()
