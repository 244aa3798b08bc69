"""PyTorch references for the GPU check (`benches/gpu_check.rs`, docs/gpu.md),
same shapes, run on the GPU machine with its own `python3` (PyTorch only;
transformers + PEFT when importable, else the LoRA cases print
"skipped: peft not installed").

Prints `name value unit` lines (median of timed runs, CUDA synchronised
around each run), `#` lines for notes:

- `matmul_bf16_N^3`: plain bf16 matmul, the achieved peak (TFLOP/s);
- `lora_step_BxT_{bf16,f32}`: PEFT LoRA (r=8, alpha=8, dropout 0, query/value)
  on a transformers `BertModel` with all-MiniLM-L6-v2's config (hidden 384,
  6 layers, 12 heads, intermediate 1536, vocab 30522), random init, a
  Linear(384, 2) head on mean-pooled states (F.dropout 0.1), cross-entropy
  (f32), backward, torch.optim.AdamW(lr 1e-3, wd 0.01, PyTorch's default
  implementation) over LoRA + head, zero_grad; batch 32x128, the first quarter
  of the rows padded in the second half; bf16 = the whole model, LoRA, head
  and optimiser state in bf16 (as the Rust check). Reported as tokens/s (B*T
  per step) and ms;
- `moe_loop_e{16,64}k{2,8}_bf16`: the per-expert Python loop MoE of
  `reference/moe_router.py` (linear router in f32, softmax top-k renormalised,
  balance + z losses, `where(top_i == e)`, GELU FFN of width 1536/E,
  `index_add_`), forward + backward (autograd.grad w.r.t. input and all
  parameters), 8192 tokens, d=384, bf16: ms and active TFLOP/s
  (2*3*tokens*k*(2*d*d_expert));
- `dense_equiv_e{16,64}k{2,8}_bf16`: the dense GELU FFN with the same active
  FLOPs (d_ff = k*1536/E = 192), forward + backward;
- `merge_CASE_peft`: PEFT's merge utilities on the device, the cases of
  `reference/orthogonal_merge.py` (8 LoRA adapters, r=8, on the 36 Linear
  layers of a MiniLM-shaped encoder; sum, linear, cat, svd, magnitude_prune,
  ties, dare_linear, dare_ties), ms per merge of all layers (the Rust side:
  gpu-check's `merge_* time` rows); "skipped: peft not installed" without PEFT;
- `bricks_profile_BxT_pytorch`: activation profiling with forward hooks on
  every `BertIntermediate` of a transformers `BertModel` with MiniLM's config
  (random init, f32), as `reference/configurable_bricks.py`, 8 batches of
  32x128 (the first quarter of the rows padded in the second half):
  examples/s (the Rust side: gpu-check's `bricks_profile_*` rows).

`--cpu`: tiny sizes on the CPU (a dry run of the code paths).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

D, FF = 384, 1536


def out(name, value, unit):
    print(f"{name} {value:.6g} {unit}", flush=True)


def median_ms(fn, dev, warmup, reps):
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - t > 2.0:
        reps = min(reps, 3)
    for _ in range(warmup - 1):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def matmul_peak(a, dev):
    n = a.matmul_n
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = median_ms(lambda: x @ y, dev, a.warmup, a.reps)
    out(f"matmul_bf16_{n}^3", 2 * n**3 / (ms * 1e-3) / 1e12, "TFLOP/s")


def lora_step(a, dev, dtype, tag):
    try:
        import peft
        import transformers
    except ImportError as e:
        print(f"lora_step_{tag} skipped: peft not installed ({e})", flush=True)
        return
    b, t = a.lora
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    )
    head = torch.nn.Linear(384, 2)
    model.to(device=dev, dtype=dtype)
    head.to(device=dev, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ids = torch.randint(1000, 30000, (b, t), device=dev)
    mask = torch.ones(b, t, dtype=torch.long, device=dev)
    mask[: max(b // 4, 1), t // 2 :] = 0
    labels = torch.randint(0, 2, (b,), device=dev)
    model.train()

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        loss = F.cross_entropy(head(F.dropout(pooled, 0.1)).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    ms = median_ms(step, dev, a.warmup, min(a.reps, 11))
    out(f"lora_step_{b}x{t}_{tag}", b * t / (ms * 1e-3), "tokens/s")
    out(f"lora_step_{b}x{t}_{tag}_ms", ms, "ms")


def moe_loop(a, dev, e, k):
    dt = torch.bfloat16
    tokens = a.tokens
    g = torch.Generator().manual_seed(1)
    f = FF // e
    wr = (torch.rand(e, D, generator=g) * 2 - 1) / math.sqrt(D)
    w1 = (torch.rand(e, f, D, generator=g) * 2 - 1) / math.sqrt(D)
    w2 = (torch.rand(e, D, f, generator=g) * 2 - 1) / math.sqrt(f)
    params = [t.to(dev, dt).requires_grad_() for t in (wr, w1, w2)]
    wr, w1, w2 = params
    x = torch.randn(tokens, D).to(dev, dt).requires_grad_()
    r = torch.randn(tokens, D).to(dev, dt)

    def step():
        logits = x.float() @ wr.float().t()  # the router in f32, as ours
        p = logits.softmax(-1)
        top_p, top_i = p.topk(k, dim=-1)
        gates = (top_p / top_p.sum(-1, keepdim=True)).to(dt)
        frac = torch.bincount(top_i.reshape(-1), minlength=e).float() / tokens
        bal = (e / k) * (frac * p.mean(0)).sum()
        z = logits.logsumexp(-1).square().mean()
        y = torch.zeros_like(x)
        for ex in range(e):
            tok, slot = torch.where(top_i == ex)
            if tok.numel() == 0:
                continue
            h = F.gelu(x[tok] @ w1[ex].t())
            y.index_add_(0, tok, (h @ w2[ex].t()) * gates[tok, slot, None])
        loss = (y * r).float().sum() + 1e-2 * bal + 1e-3 * z
        return torch.autograd.grad(loss, params + [x])

    ms = median_ms(step, dev, a.warmup, a.reps)
    flops = 2 * 3 * tokens * k * (2 * D * f)
    out(f"moe_loop_e{e}k{k}_bf16", ms, "ms")
    out(f"moe_loop_e{e}k{k}_bf16_tflops", flops / (ms * 1e-3) / 1e12, "TFLOP/s")

    fd = k * f
    w1d = (torch.randn(fd, D) * 0.05).to(dev, dt).requires_grad_()
    w2d = (torch.randn(D, fd) * 0.05).to(dev, dt).requires_grad_()

    def dense():
        y = F.linear(F.gelu(F.linear(x, w1d)), w2d)
        return torch.autograd.grad((y * r).float().sum(), [w1d, w2d, x])

    ms = median_ms(dense, dev, a.warmup, a.reps)
    out(f"dense_equiv_e{e}k{k}_bf16", ms, "ms")


def peft_merge(a, dev):
    """PEFT's merge utilities on `dev`, via benches/reference/orthogonal_merge.py."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
    if here not in sys.path:
        sys.path.insert(0, here)
    import orthogonal_merge as om

    try:
        mu = om.merge_utils()
    except ImportError as e:
        print(f"merge_peft skipped: peft not installed ({e})", flush=True)
        return
    if a.merge_layers < 6:
        full = om.layers()
        om.layers = lambda: full[: 6 * a.merge_layers]
    ad = om.adapters(dev)
    for case in om.CASES:
        run = om.make_case(case, mu, ad, dev)
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        reps = a.merge_reps if first < 1.0 else 3
        out(f"merge_{case}_peft", median_ms(run, dev, 1, reps), "ms")


def bricks_profile(a, dev):
    try:
        import transformers
    except ImportError as e:
        print(f"bricks_profile skipped: transformers not installed ({e})", flush=True)
        return
    b, t = a.bricks
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).to(dev).eval()
    batches = []
    for _ in range(a.bricks_batches):
        ids = torch.randint(1000, 30000, (b, t), device=dev)
        mask = torch.ones(b, t, dtype=torch.long, device=dev)
        mask[: max(b // 4, 1), t // 2 :] = 0
        batches.append((ids, mask, mask.float() / mask.float().sum(1, keepdim=True)))
    rows = []
    current = {}

    def hook(_module, _inputs, output):
        rows.append(torch.einsum("btn,bt->bn", output.abs(), current["w"]))

    handles = [layer.intermediate.register_forward_hook(hook) for layer in model.encoder.layer]

    def profile_all():
        outs = []
        with torch.no_grad():
            for ids, mask, w in batches:
                rows.clear()
                current["w"] = w
                model(input_ids=ids, attention_mask=mask)
                outs.append(torch.cat(rows, 1))
        return torch.cat(outs, 0)

    assert profile_all().shape == (a.bricks_batches * b, 9216)
    ms = median_ms(profile_all, dev, 1, min(a.reps, 5))
    for h in handles:
        h.remove()
    out(f"bricks_profile_{b}x{t}_pytorch", a.bricks_batches * b / (ms * 1e-3), "examples/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    a = ap.parse_args()
    if a.cpu:
        dev = torch.device("cpu")
        a.tokens, a.lora, a.matmul_n, a.warmup, a.reps = 512, (2, 32), 512, 1, 3
        a.merge_layers, a.merge_reps, a.bricks, a.bricks_batches = 1, 2, (2, 16), 2
    else:
        if not torch.cuda.is_available():
            print("CUDA not available", flush=True)
            sys.exit(2)
        dev = torch.device("cuda")
        a.tokens, a.lora, a.matmul_n, a.warmup, a.reps = 8192, (32, 128), 8192, 3, 21
        a.merge_layers, a.merge_reps, a.bricks, a.bricks_batches = 6, 5, (32, 128), 8
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__} on {name}", flush=True)
    cases = [
        ("matmul", lambda: matmul_peak(a, dev)),
        ("lora bf16", lambda: lora_step(a, dev, torch.bfloat16, "bf16")),
        ("lora f32", lambda: lora_step(a, dev, torch.float32, "f32")),
        ("moe e16k2", lambda: moe_loop(a, dev, 16, 2)),
        ("moe e64k8", lambda: moe_loop(a, dev, 64, 8)),
        ("merge peft", lambda: peft_merge(a, dev)),
        ("bricks profile", lambda: bricks_profile(a, dev)),
    ]
    for what, fn in cases:
        try:
            fn()
        except Exception as e:  # one failure must not stop the rest
            print(f"# {what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)


if __name__ == "__main__":
    main()
