#!/usr/bin/env python3
"""Reference values for model-zoo's training kit (src/train/).

Writes JSON fixtures under crates/tensor-core/tests/fixtures/train/:
- adamw.json:    torch.optim.AdamW, two parameter groups (decay / no decay),
                 5 steps on 3 small tensors with given gradients, one tensor
                 without a gradient for the first two steps, lr changed
                 before step 4;
- clip.json:     torch.nn.utils.clip_grad_norm_ (clipping and not clipping);
- schedule.json: transformers' get_{constant,linear,cosine}_schedule_with_warmup
                 multipliers at every step;
- metrics.json:  sklearn's accuracy_score, f1_score(average='macro',
                 zero_division=0), matthews_corrcoef and confusion_matrix.

Run with the project's venv (torch 2.11, sklearn, transformers):

    ~/.cache/modular/torch-2.11.0/bin/python crates/tensor-core/scripts/train_reference.py

Float32 values are written as Python floats (exact: every float32 is a
float64 and `json` writes the shortest repr that round-trips).
"""

import json
import math
import pathlib
import warnings

import numpy as np
import sklearn
import torch
import transformers
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "train"


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def adamw():
    torch.manual_seed(1234)
    specs = [
        ("dense.weight", [3, 4], True),
        ("dense.bias", [3], False),
        ("encoder.LayerNorm.weight", [4], False),
    ]
    params = {n: torch.randn(s, dtype=torch.float32).requires_grad_(True) for n, s, _ in specs}
    init = {n: flat(p) for n, p in params.items()}
    lr, betas, eps, wd = 1e-2, (0.9, 0.98), 1e-6, 0.1
    opt = torch.optim.AdamW(
        [
            {"params": [params[n] for n, _, d in specs if d], "weight_decay": wd},
            {"params": [params[n] for n, _, d in specs if not d], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
        foreach=False,
    )
    steps = []
    for step in range(5):
        lr_now = lr if step < 3 else 5e-3
        for g in opt.param_groups:
            g["lr"] = lr_now
        grads = {}
        for n, s, _ in specs:
            if n == "encoder.LayerNorm.weight" and step < 2:
                params[n].grad = None
                grads[n] = None
            else:
                g = torch.randn(s, dtype=torch.float32) * (step + 1)
                params[n].grad = g.clone()
                grads[n] = flat(g)
        opt.step()
        steps.append(
            {
                "lr": lr_now,
                "grads": grads,
                "expected": {n: flat(p) for n, p in params.items()},
            }
        )
    return {
        "torch": torch.__version__,
        "lr": lr,
        "betas": list(betas),
        "eps": eps,
        "weight_decay": wd,
        "params": [{"name": n, "shape": s, "decay": d, "init": init[n]} for n, s, d in specs],
        "steps": steps,
    }


def clip():
    torch.manual_seed(99)
    shapes = [[2, 3], [5], [1, 4]]
    grads = [torch.randn(s, dtype=torch.float32) * 3 for s in shapes]
    cases = []
    for max_norm in [1.0, 0.5, 1000.0]:
        ps = [torch.zeros(s, requires_grad=True) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        cases.append(
            {
                "max_norm": max_norm,
                "total_norm": float(total),
                "clipped": [flat(p.grad) for p in ps],
            }
        )
    return {
        "torch": torch.__version__,
        "shapes": shapes,
        "grads": [flat(g) for g in grads],
        "cases": cases,
    }


def schedule():
    cases = []
    for kind, warmup, total in [
        ("constant", 4, 10),
        ("constant", 0, 5),
        ("linear", 3, 10),
        ("linear", 0, 7),
        ("linear", 10, 10),
        ("cosine", 3, 10),
        ("cosine", 0, 8),
        ("cosine", 5, 17),
    ]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        if kind == "constant":
            sch = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup)
        elif kind == "linear":
            sch = transformers.get_linear_schedule_with_warmup(
                opt, num_warmup_steps=warmup, num_training_steps=total
            )
        else:
            sch = transformers.get_cosine_schedule_with_warmup(
                opt, num_warmup_steps=warmup, num_training_steps=total
            )
        f = sch.lr_lambdas[0]
        cases.append(
            {
                "kind": kind,
                "warmup": warmup,
                "total": total,
                "factors": [float(f(s)) for s in range(total + 3)],
            }
        )
    return {"transformers": transformers.__version__, "cases": cases}


def metrics():
    arrays = [
        ("mixed3", [0, 1, 2, 2, 1, 0, 1, 2, 0, 1], [0, 2, 2, 2, 1, 0, 0, 2, 1, 1]),
        ("binary", [1, 0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 1, 1, 0]),
        ("perfect", [3, 1, 2, 3], [3, 1, 2, 3]),
        ("all_one_class", [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),
        ("pred_one_class", [0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 2, 0]),
        ("true_one_class", [0, 1, 2, 0, 1], [2, 2, 2, 2, 2]),
        ("pred_label_unseen", [0, 1, 4, 1, 0, 4, 1], [0, 1, 1, 1, 0, 0, 1]),
        ("negative_labels", [-1, 5, -1, 5, 7, 7, -1], [-1, 5, 5, 5, 7, -1, -1]),
        ("all_wrong", [1, 0, 1, 0], [0, 1, 0, 1]),
    ]
    cases = []
    for name, preds, labels in arrays:
        y_true, y_pred = np.array(labels), np.array(preds)
        names = sorted(set(labels) | set(preds))
        cases.append(
            {
                "name": name,
                "preds": preds,
                "labels": labels,
                "accuracy": float(accuracy_score(y_true, y_pred)),
                "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
                "mcc": float(matthews_corrcoef(y_true, y_pred)),
                "confusion_labels": names,
                "confusion": confusion_matrix(y_true, y_pred, labels=names).tolist(),
            }
        )
    return {"sklearn": sklearn.__version__, "cases": cases}


def main():
    # sklearn warns that a one-label confusion matrix may be misshapen; we pass labels=.
    warnings.filterwarnings("ignore", message="A single label was found")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in [("adamw", adamw), ("clip", clip), ("schedule", schedule), ("metrics", metrics)]:
        data = fn()
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    # What the metrics fixture holds, for the report.
    for c in json.loads((OUT / "metrics.json").read_text())["cases"]:
        print(f"{c['name']:>18}: acc {c['accuracy']:.6f} macro-F1 {c['macro_f1']:.6f} MCC {c['mcc']:.6f}")
    assert not any(math.isnan(c["mcc"]) for c in json.loads((OUT / "metrics.json").read_text())["cases"])


if __name__ == "__main__":
    main()
