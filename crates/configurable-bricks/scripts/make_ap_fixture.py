"""Fixture for tests/attribution.rs: average precision by scikit-learn.

Run with the project's venv python (scikit-learn >= 1.3):
    ~/.cache/modular/torch-2.11.0/bin/python crates/configurable-bricks/scripts/make_ap_fixture.py

Writes tests/fixtures/ap_sklearn.json with
- `binary`: cases of (scores, labels, ap) from `average_precision_score`,
  including heavy ties (scores rounded to one decimal), all-tied scores and
  a single positive;
- `matrix`: a profile [examples, neurons] with labels in 0..F and the
  FuncScore matrices AP(y_f) and max(AP(y_f), AP(1 - y_f)) per neuron.
Seeded (numpy default_rng(20240901)); the values are float64.
"""
import json
import os

import numpy as np
import sklearn
from sklearn.metrics import average_precision_score

rng = np.random.default_rng(20240901)
cases = []
for n, decimals in [(4, None), (10, 1), (57, 1), (200, 2), (500, None), (31, 0)]:
    scores = rng.normal(size=n)
    if decimals is not None:
        scores = np.round(scores, decimals)
    labels = (rng.random(n) < 0.3).astype(int)
    if labels.sum() == 0:
        labels[0] = 1
    if labels.sum() == n:
        labels[0] = 0
    cases.append({"scores": scores.tolist(), "labels": labels.tolist(),
                  "ap": float(average_precision_score(labels, scores))})
# The spec's worked example, all scores tied, one positive.
for scores, labels in [([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]),
                       ([0.5] * 6, [0, 1, 0, 0, 1, 0]),
                       ([0.1, 0.4, 0.35, 0.8, 0.8, 0.2], [0, 0, 0, 0, 1, 0])]:
    cases.append({"scores": scores, "labels": labels,
                  "ap": float(average_precision_score(labels, scores))})

examples, neurons, functions = 90, 12, 3
labels = rng.integers(0, functions, size=examples)
profile = np.abs(rng.normal(size=(examples, neurons)))
profile[:, 0] += 1.5 * (labels == 0)          # a neuron for functionality 0
profile[:, 1] = np.round(profile[:, 1], 1)    # ties
profile[:, 2] = 0.25                          # a dead neuron: every score tied
ap = np.zeros((neurons, functions))
ap_sym = np.zeros((neurons, functions))
for n in range(neurons):
    for f in range(functions):
        y = (labels == f).astype(int)
        a = average_precision_score(y, profile[:, n])
        b = average_precision_score(1 - y, profile[:, n])
        ap[n, f] = a
        ap_sym[n, f] = max(a, b)

out = {
    "sklearn_version": sklearn.__version__,
    "binary": cases,
    "matrix": {
        "profile": profile.tolist(),
        "labels": labels.tolist(),
        "functions": functions,
        "ap": ap.tolist(),
        "ap_symmetric": ap_sym.tolist(),
    },
}
path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ap_sklearn.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", os.path.normpath(path), "sklearn", sklearn.__version__)
