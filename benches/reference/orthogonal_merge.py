"""PEFT references for benches/orthogonal_merge.rs: merging 8 LoRA adapters
(r = 8, s = 2) on the 36 Linear layers of a MiniLM-shaped encoder (6 layers x
{query, key, value, attention.output.dense, intermediate.dense, output.dense},
d = 384, d_ff = 1536), per method, with PEFT 0.21.2's merge utilities.

Same values as the Rust side: adapter t's factors on layer li are
`torch.manual_seed(1000 t + 10 li); A = randn(8, in)` and
`torch.manual_seed(... + 1); B = 0.01 randn(out, 8)` (random, not trained;
libtorch's CPU generator, as tensor_core::testing::randn_seeded draws them).

Timed per case, for all 36 layers: the deltas `B @ A * s` (PEFT's
`get_delta_weight`) and then, per layer,
- `sum`: `merge_utils.task_arithmetic` with weights 1;
- `linear`: `task_arithmetic` with w = [1, .5, 1, .5, 1, .5, 1, -.5];
- `cat`: PEFT's `cat` combination (`add_weighted_adapter`): A rows scaled by
  w * s, concatenated, B concatenated (no deltas needed);
- `svd`: PEFT's `svd` combination: `task_arithmetic`, then
  `torch.linalg.svd(full_matrices=True)` (PEFT's default) truncated to rank 8;
- `magnitude_prune`, `ties` (density 0.2, "total"), `dare_linear`,
  `dare_ties` (density 0.1): the `merge_utils` functions of those names.

Prints `orthogonal_merge/CASE/pytorch SECONDS` (median) and `# ...` lines
with each case's peak RSS growth, measured in a fresh process per case.
Without PEFT installed, `PEFT_MERGE_UTILS=/path/to/merge_utils.py` loads that
file alone (it needs only torch).
"""
import importlib.util
import os
import subprocess
import sys
import time

import torch

from timing import median_seconds

ADAPTERS, RANK, SCALE, D, FF = 8, 8, 2.0, 384, 1536
WEIGHTS = [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, -0.5]
CASES = ["sum", "linear", "cat", "svd", "magnitude_prune", "ties", "dare_linear", "dare_ties"]


def merge_utils():
    path = os.environ.get("PEFT_MERGE_UTILS")
    if path:
        spec = importlib.util.spec_from_file_location("merge_utils", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from peft.utils import merge_utils as mu

    return mu


def device():
    if os.environ.get("MODULAR_FORCE_CPU"):
        return torch.device("cpu")
    if os.environ.get("MODULAR_DEVICE"):
        return torch.device(os.environ["MODULAR_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def layers():
    out = []
    for l in range(6):
        for name, o, i in [
            ("attention.self.query", D, D),
            ("attention.self.key", D, D),
            ("attention.self.value", D, D),
            ("attention.output.dense", D, D),
            ("intermediate.dense", FF, D),
            ("output.dense", D, FF),
        ]:
            out.append((f"encoder.layer.{l}.{name}", o, i))
    return out


def adapters(dev):
    """adapters[t][li] = (A, B)."""
    result = []
    for t in range(ADAPTERS):
        per = []
        for li, (_, o, i) in enumerate(layers()):
            seed = 1000 * t + 10 * li
            torch.manual_seed(seed)
            a = torch.randn(RANK, i)
            torch.manual_seed(seed + 1)
            b = torch.randn(o, RANK) * 0.01
            per.append((a.to(dev), b.to(dev)))
        result.append(per)
    return result


def make_case(case, mu, ad, dev):
    n_layers = len(layers())
    w = torch.tensor([1.0] * ADAPTERS if case == "sum" else WEIGHTS, device=dev)

    def deltas(li):
        return [ad[t][li][1] @ ad[t][li][0] * SCALE for t in range(ADAPTERS)]

    def one_layer(li):
        if case in ("sum", "linear"):
            return mu.task_arithmetic(deltas(li), w)
        if case == "cat":
            a = torch.cat([ad[t][li][0] * WEIGHTS[t] * SCALE for t in range(ADAPTERS)], dim=0)
            b = torch.cat([ad[t][li][1] for t in range(ADAPTERS)], dim=1)
            return a, b
        if case == "svd":
            d = mu.task_arithmetic(deltas(li), w)
            u, s, vh = torch.linalg.svd(d, full_matrices=True)
            u = u[:, :RANK] @ torch.diag(s[:RANK])
            return vh[:RANK, :], u
        if case == "magnitude_prune":
            return mu.magnitude_prune(deltas(li), w, 0.2)
        if case == "ties":
            return mu.ties(deltas(li), w, 0.2, "total")
        if case == "dare_linear":
            return mu.dare_linear(deltas(li), w, 0.1)
        if case == "dare_ties":
            return mu.dare_ties(deltas(li), w, 0.1, "total")
        raise ValueError(case)

    def run():
        with torch.no_grad():
            out = [one_layer(li) for li in range(n_layers)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def rss_kib():
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def peak_child(case):
    dev = device()
    mu = merge_utils()
    run = make_case(case, mu, adapters(dev), dev)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base, _ = rss_kib()
    t = time.perf_counter()
    run()
    secs = time.perf_counter() - t
    _, hwm = rss_kib()
    print(
        f"# orthogonal_merge/{case}/pytorch peak +{(hwm - base) / 1024:.1f} MiB over "
        f"{base / 1024:.1f} MiB of inputs and runtime (first run {secs:.3f} s)"
    )


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        peak_child(sys.argv[2])
        return
    dev = device()
    mu = merge_utils()
    ad = adapters(dev)
    print(f"# device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    for case in CASES:
        run = make_case(case, mu, ad, dev)
        # One warm-up run decides the repetitions: the slow cases take seconds each.
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        reps = 10 if first < 0.5 else 5 if first < 3 else 3
        secs = median_seconds(run, warmup=0, reps=reps)
        print(f"orthogonal_merge/{case}/pytorch {secs:.6e}", flush=True)
    for case in CASES:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--peak", case],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        sys.stdout.write(out.stdout)


if __name__ == "__main__":
    main()
