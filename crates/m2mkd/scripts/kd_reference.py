"""PyTorch reference values for m2mkd's losses (crates/m2mkd/src/loss.rs).

The losses as `kamanphoebe/m2mKD` `deep_incubation/losses.py` (`m2mKDLoss`,
DeiT's `DistillationLoss`) computes them:

    soft:  F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1),
                    reduction='sum', log_target=True) * T * T / zs.numel()
    batchmean: the same sum * T * T / B
    hard:  F.cross_entropy(zs, zt.argmax(1))
    total: (1 - alpha) * CE(zs, y; label_smoothing) + alpha * kd

plus the gradient of the total w.r.t. the student logits. Inputs are drawn
here (float64 -> rounded to float32) and stored with the values, so the Rust
test reads exactly these inputs. Also the spec's test vector.

Writes crates/m2mkd/tests/fixtures/kd_reference.json. Run with the cache venv:

    ~/.cache/modular/torch-2.11.0/bin/python crates/m2mkd/scripts/kd_reference.py
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kd_reference.json"


def kd(zs, zt, tau, norm, kind):
    if kind == "hard":
        return F.cross_entropy(zs, zt.argmax(1))
    s = F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt / tau, 1), reduction="sum", log_target=True)
    n = zs.numel() if norm == "sum_over_bc" else zs.shape[0]
    return s * tau * tau / n


def case(name, zs, zt, y, tau, norm, kind, alpha, smoothing):
    zs = zs.clone().double().requires_grad_()
    zt = zt.double()
    k = kd(zs, zt, tau, norm, kind)
    ce = F.cross_entropy(zs, y, label_smoothing=smoothing)
    total = (1 - alpha) * ce + alpha * k
    (g,) = torch.autograd.grad(total, zs)
    return {
        "name": name,
        "zs": zs.detach().tolist(),
        "zt": zt.tolist(),
        "y": y.tolist() if y.dtype == torch.long else None,
        "y_soft": y.tolist() if y.dtype != torch.long else None,
        "tau": tau,
        "kl_norm": norm,
        "kd_type": kind,
        "alpha": alpha,
        "label_smoothing": smoothing,
        "kd": k.item(),
        "ce": ce.item(),
        "total": total.item(),
        "grad_zs": g.tolist(),
    }


def main():
    g = torch.Generator().manual_seed(20240226)
    cases = []
    # The spec's test vector (docs/m2mkd.md, Method, "Tests the spec asks for").
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.1, 0.0]])
    zt = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.3, 0.1]])
    y = torch.tensor([0, 1])
    for norm in ["sum_over_bc", "batch_mean"]:
        cases.append(case(f"spec_{norm}", zs, zt, y, 1.0, norm, "soft", 0.5, 0.0))
    for b, c in [(4, 5), (8, 3), (16, 10)]:
        zs = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2).float()
        zt = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2).float()
        y = torch.randint(0, c, (b,), generator=g)
        for tau in [1.0, 2.0, 4.0]:
            for norm in ["sum_over_bc", "batch_mean"]:
                cases.append(case(f"b{b}c{c}_tau{tau}_{norm}", zs, zt, y, tau, norm, "soft", 0.5, 0.0))
        cases.append(case(f"b{b}c{c}_hard", zs, zt, y, 1.0, "sum_over_bc", "hard", 0.5, 0.0))
        cases.append(case(f"b{b}c{c}_alpha0.3_ls0.1", zs, zt, y, 2.0, "sum_over_bc", "soft", 0.3, 0.1))
        probs = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), 1).float()
        cases.append(case(f"b{b}c{c}_soft_targets", zs, zt, probs, 1.0, "batch_mean", "soft", 0.7, 0.0))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
