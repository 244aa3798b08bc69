"""PyTorch reference for benches/m2mkd.rs, same shapes, same machine.

Prints `m2mkd/CASE/pytorch SECONDS` (median).

- `kd_loss_b256c1000`: the m2mKD loss of `kamanphoebe/m2mKD`
  `deep_incubation/losses.py` (DeiT's soft distillation, `sum_over_BC`),
  alpha 0.5, tau 2, mixed with cross-entropy, forward + backward w.r.t. the
  student logits [256, 1000] (torch.autograd.grad).
"""
import torch
import torch.nn.functional as F

from timing import median_seconds


def kd_case():
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(256, 1000, generator=g).requires_grad_()
    zt = torch.randn(256, 1000, generator=g)
    y = torch.randint(0, 1000, (256,), generator=g)
    tau, alpha = 2.0, 0.5

    def step():
        kd = F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt / tau, 1), reduction="sum", log_target=True)
        kd = kd * tau * tau / zs.numel()
        loss = (1 - alpha) * F.cross_entropy(zs, y) + alpha * kd
        return torch.autograd.grad(loss, [zs])

    return step


def main():
    torch.manual_seed(0)
    print(f"m2mkd/kd_loss_b256c1000/pytorch {median_seconds(kd_case()):.6e}")


if __name__ == "__main__":
    main()
