"""PyTorch references for benches/moe_router.rs, same shapes, same machine.

Prints `moe_router/CASE/pytorch SECONDS` (median). Every case is forward +
backward (torch.autograd.grad w.r.t. the input and all parameters).

- `moe_e16k2`, `moe_e64k8`: the per-expert Python loop MoE (as in Mixtral /
  fairseq reference code): linear router, softmax, top-k renormalised, Switch
  balance loss (DeepSpeed top-k form) + z-loss, then for each expert
  `tok, slot = where(top_i == e)`, GELU FFN of width 1536 / E, `index_add_`
  weighted by the gate. d = 384, 8192 tokens.
- `dense_equiv_e16k2`, `dense_equiv_e64k8`: a dense GELU FFN with the same
  active FLOPs, d_ff = k * 1536 / E = 192 for both.
- `sb_t512`, `sb_t1024`: stick-breaking attention as in
  shawntan/stickbreaking-attention `sb_ref.py` (SB variant, the remainder
  added to the current value as its test does): the reverse cumulative sum
  is an einsum with a [T, T] triangular matrix, O(T^3) time, O(T^2) memory
  (no [T, T, T] tensor is built, so T = 1024 with batch 1 and 4 heads of 64
  needs well under 4 GiB).

Peak memory: after the timings, each MoE/dense case runs once in a fresh
process (`--peak CASE`) and prints `# moe_router/CASE/pytorch peak +X MiB`:
on CPU the growth of the resident set over one cold forward + backward
(`VmHWM` after minus `VmRSS` before, Linux); with `--device cuda`
`torch.cuda.max_memory_allocated` minus the memory allocated before.
"""
import os
import subprocess
import sys
import math

import torch
import torch.nn.functional as F

from timing import median_seconds

TOKENS, D, FF = 8192, 384, 1536


DEVICE = "cpu"


def sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def moe_case(e, k):
    g = torch.Generator().manual_seed(1)
    f = FF // e
    wr = (torch.rand(e, D, generator=g) * 2 - 1) / math.sqrt(D)
    w1 = (torch.rand(e, f, D, generator=g) * 2 - 1) / math.sqrt(D)
    w2 = (torch.rand(e, D, f, generator=g) * 2 - 1) / math.sqrt(f)
    params = [t.to(DEVICE).requires_grad_() for t in (wr, w1, w2)]
    wr, w1, w2 = params
    x = torch.randn(TOKENS, D).to(DEVICE).requires_grad_()
    r = torch.randn(TOKENS, D).to(DEVICE)

    def step():
        logits = x @ wr.t()
        p = logits.softmax(-1)
        top_p, top_i = p.topk(k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        frac = torch.bincount(top_i.reshape(-1), minlength=e).float() / TOKENS
        bal = (e / k) * (frac * p.mean(0)).sum()
        z = logits.logsumexp(-1).square().mean()
        y = torch.zeros_like(x)
        for ex in range(e):
            tok, slot = torch.where(top_i == ex)
            if tok.numel() == 0:
                continue
            h = F.gelu(x[tok] @ w1[ex].t())
            y.index_add_(0, tok, (h @ w2[ex].t()) * gates[tok, slot, None])
        loss = (y * r).sum() + 1e-2 * bal + 1e-3 * z
        return sync(torch.autograd.grad(loss, params + [x]))

    return step


def dense_case(f):
    w1 = (torch.randn(f, D) * 0.05).to(DEVICE).requires_grad_()
    w2 = (torch.randn(D, f) * 0.05).to(DEVICE).requires_grad_()
    x = torch.randn(TOKENS, D).to(DEVICE).requires_grad_()
    r = torch.randn(TOKENS, D).to(DEVICE)

    def step():
        y = F.linear(F.gelu(F.linear(x, w1)), w2)
        return sync(torch.autograd.grad((y * r).sum(), [w1, w2, x]))

    return step


def sb_ref(q, k, v, mask, cum_weight):
    """shawntan/stickbreaking-attention sb_ref.py (SB, attend_current = False)."""
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    log_z = F.logsigmoid(logits).masked_fill(mask, -1e5)
    log_beta = F.logsigmoid(-logits).masked_fill(mask, 0)
    re_cum_log_beta = torch.einsum("bhij,jk->bhik", log_beta, cum_weight)
    att = (log_z + re_cum_log_beta).exp()
    return att @ v, 1 - att.sum(dim=-1)


def sb_case(t):
    q, k, v = (torch.randn(1, 4, t, 64).requires_grad_() for _ in range(3))
    r = torch.randn(1, 4, t, 64)
    mask = torch.ones(t, t).triu(0).bool()
    cum_weight = torch.ones(t, t).tril(-1)

    def step():
        o, rem = sb_ref(q, k, v, mask, cum_weight)
        o = o + rem[..., None] * v
        return torch.autograd.grad((o * r).sum(), [q, k, v])

    return step


def rss_kib():
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


PEAK_CASES = {
    "moe_e16k2": lambda: moe_case(16, 2),
    "moe_e64k8": lambda: moe_case(64, 8),
    "dense_equiv_e16k2": lambda: dense_case(2 * FF // 16),
    "dense_equiv_e64k8": lambda: dense_case(8 * FF // 64),
}


def peak_child(case):
    torch.manual_seed(0)
    step = PEAK_CASES[case]()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        print(f"# moe_router/{case}/pytorch peak +{peak / 2**20:.1f} MiB (cuda max_memory_allocated, one cold forward + backward)")
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base, _ = rss_kib()
    step()
    _, hwm = rss_kib()
    print(f"# moe_router/{case}/pytorch peak +{(hwm - base) / 1024:.1f} MiB over {base / 1024:.1f} MiB (one cold forward + backward)")


def main():
    global DEVICE
    args = sys.argv[1:]
    if "--device" in args:
        i = args.index("--device")
        DEVICE = args[i + 1]
        del args[i : i + 2]
    if len(args) == 2 and args[0] == "--peak":
        peak_child(args[1])
        return
    torch.manual_seed(0)
    for e, k in ((16, 2), (64, 8)):
        print(f"moe_router/moe_e{e}k{k}/pytorch {median_seconds(moe_case(e, k), warmup=2, reps=10):.6e}", flush=True)
        dense = median_seconds(dense_case(k * FF // e), warmup=2, reps=10)
        print(f"moe_router/dense_equiv_e{e}k{k}/pytorch {dense:.6e}", flush=True)
    if DEVICE == "cpu":
        for t in (512, 1024):
            print(f"moe_router/sb_t{t}/pytorch {median_seconds(sb_case(t), warmup=1, reps=5):.6e}", flush=True)
    for case in PEAK_CASES:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--device", DEVICE, "--peak", case],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        sys.stdout.write(out.stdout)


if __name__ == "__main__":
    main()
