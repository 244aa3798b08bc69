"""Fixtures for tests/peft_parity.rs: PEFT 0.21.2's merge utilities on small tensors.

Run with the cache venv's python (PEFT installed there):

    ~/.cache/modular/torch-2.11.0/bin/python crates/orthogonal-merge/scripts/peft_merge_fixture.py

Writes crates/orthogonal-merge/tests/fixtures/:
- `peft_merge.safetensors`:
  - `task_{0,1,2}`: three task tensors [6, 10] ~ N(0, 1) (torch.manual_seed(0)),
    merged with weights W = [1.0, 0.5, -0.7] by `peft.utils.merge_utils`:
    `task_arithmetic`, `magnitude_prune` (density 0.3), `ties` (density 0.4 and 1.0,
    `total` and `frequency`);
  - DARE: PEFT draws `torch.bernoulli(torch.full_like(t, density))` per task, in
    order, from the global generator. After `torch.manual_seed(1234)` the masks
    are recorded (`dare_mask_{i}`, density 0.5), then the generator is reseeded
    and `dare_linear` / `dare_ties` run, so their outputs are on exactly those
    masks (checked here against the masks). `seed7_mask_{i}`: the masks drawn
    after `torch.manual_seed(7)` at density 0.3, to check that the Rust side
    draws the same ones;
  - the TIES test vector of docs/orthogonal-merge.md, Method, part 2 (`tv_*`);
  - LoRA merging through `add_weighted_adapter` on a one-Linear model (in 10,
    out 6): adapters a0, a1, a2 with r = 2 and lora_alpha 2, 4, 1 (s = 1, 2, 0.5),
    random A and B (`lora_{A,B}_{i}`), weights W; for each combination type the
    merged adapter's `{type}_A`, `{type}_B` and its delta `{type}_delta`
    (= B @ A, since PEFT sets alpha = r on the merged adapter).
- `peft_lora/`: adapter a1 saved by PEFT's `save_pretrained`, and
  `peft_lora_delta` (in peft_merge.safetensors) its `get_delta_weight`.

`--check DIR...` (used by tests/peft_parity.rs when `MODULAR_VENV` has PEFT):
load each adapter folder DIR, written by this crate for the one-Linear model,
with `PeftModel.from_pretrained`, and compare its `get_delta_weight` with
`DIR/expected.safetensors` (`delta`).
"""
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

import peft
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils as mu

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")
W = [1.0, 0.5, -0.7]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(10, 6)

    def forward(self, x):
        return self.lin(x)


def main():
    assert peft.__version__ == "0.21.2", peft.__version__
    os.makedirs(OUT, exist_ok=True)
    out = {}
    torch.manual_seed(0)
    tasks = [torch.randn(6, 10) for _ in range(3)]
    for i, t in enumerate(tasks):
        out[f"task_{i}"] = t
    w = torch.tensor(W)
    out["task_arithmetic"] = mu.task_arithmetic(tasks, w)
    out["magnitude_prune_0.3"] = mu.magnitude_prune(tasks, w, 0.3)
    for d in (0.4, 1.0):
        for m in ("total", "frequency"):
            out[f"ties_{m}_{d}"] = mu.ties(tasks, w, d, m)

    torch.manual_seed(1234)
    masks = [torch.bernoulli(torch.full_like(t, 0.5)) for t in tasks]
    for i, m in enumerate(masks):
        out[f"dare_mask_{i}"] = m
    torch.manual_seed(1234)
    out["dare_linear_0.5"] = mu.dare_linear(tasks, w, 0.5)
    manual = sum(wi * t * m / 0.5 for wi, t, m in zip(W, tasks, masks))
    assert torch.allclose(out["dare_linear_0.5"], manual, atol=1e-6), "mask reproduction failed"
    for m in ("total", "frequency"):
        torch.manual_seed(1234)
        out[f"dare_ties_{m}_0.5"] = mu.dare_ties(tasks, w, 0.5, m)
    torch.manual_seed(7)
    for i, t in enumerate(tasks):
        out[f"seed7_mask_{i}"] = torch.bernoulli(torch.full_like(t, 0.3))

    tv = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([-3.0, 1.0, 0.5, 2.0])]
    ones = torch.ones(2)
    out["tv_total_1.0"] = mu.ties(tv, ones, 1.0, "total")
    out["tv_frequency_1.0"] = mu.ties(tv, ones, 1.0, "frequency")
    out["tv_total_0.5"] = mu.ties(tv, ones, 0.5, "total")

    # LoRA merging on a one-Linear model.
    torch.manual_seed(1)
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"]), adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    model.add_adapter("a2", LoraConfig(r=2, lora_alpha=1, target_modules=["lin"]))
    lin = model.base_model.model.lin
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, name in enumerate(["a0", "a1", "a2"]):
            lin.lora_A[name].weight.copy_(torch.randn(2, 10, generator=g))
            lin.lora_B[name].weight.copy_(torch.randn(6, 2, generator=g))
            out[f"lora_A_{i}"] = lin.lora_A[name].weight.detach().clone()
            out[f"lora_B_{i}"] = lin.lora_B[name].weight.detach().clone()
    kinds = {
        "linear": {},
        "cat": {},
        "svd": {"svd_rank": 3},
        "ties": {"density": 0.5},
        "magnitude_prune": {"density": 0.5},
        "ties_svd": {"density": 0.5, "svd_rank": 3},
        "magnitude_prune_svd": {"density": 0.5, "svd_rank": 3},
    }
    for kind, kw in kinds.items():
        name = f"m_{kind}"
        model.base_model.add_weighted_adapter(["a0", "a1", "a2"], W, name, combination_type=kind, **kw)
        a = lin.lora_A[name].weight.detach().clone()
        b = lin.lora_B[name].weight.detach().clone()
        assert abs(lin.scaling[name] - 1.0) < 1e-12
        out[f"{kind}_A"] = a
        out[f"{kind}_B"] = b
        out[f"{kind}_delta"] = b @ a

    # A PEFT-written adapter folder (adapter a1 only).
    out["peft_lora_delta"] = lin.get_delta_weight("a1").detach().clone()
    tmp = tempfile.mkdtemp()
    model.save_pretrained(tmp, selected_adapters=["a1"])
    dst = os.path.join(OUT, "peft_lora")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(tmp, "a1"), dst)
    shutil.rmtree(tmp)
    if os.path.exists(os.path.join(dst, "README.md")):
        os.remove(os.path.join(dst, "README.md"))

    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "peft_merge.safetensors"))
    print(f"wrote {len(out)} tensors to {OUT}")


def check(folders):
    from safetensors.torch import load_file
    from peft import PeftModel

    worst = 0.0
    for folder in folders:
        want = load_file(os.path.join(folder, "expected.safetensors"))["delta"]
        model = PeftModel.from_pretrained(Tiny(), folder)
        got = model.base_model.model.lin.get_delta_weight("default")
        err = (got - want).abs().max().item()
        worst = max(worst, err)
        print(f"PEFT loaded {folder}: max |delta error| {err:.3e}")
    sys.exit(0 if worst < 1e-6 else 1)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--check":
        check(sys.argv[2:])
    else:
        main()
