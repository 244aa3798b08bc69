"""PEFT interoperability fixture for pet-core (and a checker for adapters that
pet-core writes), so that LoRA / IA3 adapters cross the Rust <-> PEFT boundary
both ways with the same numbers.

Run with the cache venv (torch, transformers, safetensors, peft 0.21.2):

    ~/.cache/modular/torch-2.11.0/bin/python crates/pet-core/scripts/peft_fixture.py

Mode (a), no arguments: writes crates/pet-core/tests/fixtures/peft/ (the repo
root is found from this script's own path; `--out DIR` overrides it):
  base/        a tiny random transformers.BertModel (seed 0; vocab 128,
               hidden 32, 2 layers, 4 heads, intermediate 64, 64 positions,
               2 token types, exact GELU, eps 1e-12, no pooler), f32,
               save_pretrained(safe_serialization=True): config.json +
               model.safetensors, keys without a "bert." prefix
               (embeddings.word_embeddings.weight, encoder.layer.0.attention.self.query.weight, ...).
  lora/        LoRA r=4, alpha=8, on query/value
  lora_rs/     rsLoRA r=4, alpha=8, on query/value/intermediate.dense, with
               rank_pattern / alpha_pattern {"encoder.layer.1.attention.self.value": 2 / 3}
  ia3/         IA3 on key/value (scale outputs, [out, 1]) and the FFN output
               dense of both layers (feedforward: scale inputs, [1, in])
  loha/        LoHa r=4, alpha=8, on query/value/intermediate.dense, with
               rank_pattern / alpha_pattern {"encoder.layer.1.attention.self.value": 2 / 3}
               Each adapter: save_pretrained -> adapter_config.json + adapter_model.safetensors,
               with seeded non-trivial weights (LoRA B ~ 0.1 * randn, IA3 ~ 1 + 0.2 * randn,
               every LoHa factor ~ 0.3 * randn).
  inputs.safetensors
    input_ids, attention_mask   [2, 7] int64 (row 1: last two positions are padding, id 0, mask 0)
    base, lora, lora_rs, ia3, loha
                                [2, 7, 32] f32 last_hidden_state of the base model / with that adapter
    lora_merged, loha_merged    the lora / loha model after merge_and_unload (== it up to float rounding)
    lora_mixed                  one PeftModel holding "lora" and "lora_rs", forward with
                                adapter_names=["lora", "__base__"] (row 0 with lora, row 1 plain)

Mode (b), `--check DIR [--base BASEDIR]`: DIR holds an adapter written by
pet-core (adapter_config.json + adapter_model.safetensors, LoRA or IA3 -- PEFT
reads the type from the config) and expected.safetensors with input_ids,
attention_mask, last_hidden_state. Loads the base BertModel from BASEDIR
(default: the fixture's base/), PeftModel.from_pretrained(base, DIR), runs it
in eval mode and prints `max_abs_err=<value>`; exit 0 if <= 1e-5 (`--tol`),
else exit 1.

Deterministic: everything is seeded and runs on CPU in f32.
"""
import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import json

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model

HERE = Path(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = HERE.parent / "tests" / "fixtures" / "peft"  # crates/pet-core/tests/fixtures/peft
TOL = 1e-5


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = BertModel(config, add_pooling_layer=False).float().eval()
    return model


def load_base(base_dir):
    return BertModel.from_pretrained(str(base_dir), add_pooling_layer=False).float().eval()


def make_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 7), generator=g, dtype=torch.int64)
    mask = torch.ones(2, 7, dtype=torch.int64)
    ids[1, 5:] = 0
    mask[1, 5:] = 0
    return ids, mask


def run(model, ids, mask, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state.float().contiguous()


def fill_lora(peft_model, seed):
    """LoRA B is zero at init; fill every lora_B (and re-draw lora_A) with seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def fill_ia3(peft_model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def fill_loha(peft_model, seed):
    """LoHa's hada_w2_b is zero at init; re-draw every factor with seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, bias="none")
LORA_RS = dict(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    target_modules=["query", "value", "intermediate.dense"],
    rank_pattern={"encoder.layer.1.attention.self.value": 2},
    alpha_pattern={"encoder.layer.1.attention.self.value": 3},
    lora_dropout=0.0,
    bias="none",
)
LOHA = dict(
    r=4,
    alpha=8,
    target_modules=["query", "value", "intermediate.dense"],
    rank_pattern={"encoder.layer.1.attention.self.value": 2},
    alpha_pattern={"encoder.layer.1.attention.self.value": 3},
)
IA3 = dict(
    target_modules=["key", "value", "layer.0.output.dense", "layer.1.output.dense"],
    feedforward_modules=["layer.0.output.dense", "layer.1.output.dense"],
)


def tidy_adapter_folder(folder):
    """Make the saved adapter reproducible and portable. PEFT 0.21.2 stores
    target_modules / feedforward_modules as Python sets, so their JSON order
    follows string hashing (changes from run to run): sort them. It also
    records the absolute base path, which is machine-specific: null it. The
    model card README.md it writes is dropped."""
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "feedforward_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    cfg["base_model_name_or_path"] = None
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = folder / "README.md"
    if readme.exists():
        readme.unlink()


def describe(folder):
    sd = load_file(str(folder / "adapter_model.safetensors"))
    for k in sorted(sd):
        print(f"    {k} {list(sd[k].shape)}")


def generate(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = tiny_bert()
    base.save_pretrained(str(out / "base"), safe_serialization=True)
    base_keys = sorted(load_file(str(out / "base" / "model.safetensors")))
    print(f"base/model.safetensors: {len(base_keys)} tensors, e.g. {base_keys[:3]} ... {base_keys[-1]}")
    assert not any(k.startswith("bert.") for k in base_keys)

    ids, mask = make_inputs()
    tensors = {"input_ids": ids, "attention_mask": mask}
    tensors["base"] = run(load_base(out / "base"), ids, mask)

    # Each adapter is created on a freshly loaded base (get_peft_model mutates it in place).
    for name, cfg, fill, seed in [
        ("lora", LoraConfig(**LORA), fill_lora, 10),
        ("lora_rs", LoraConfig(**LORA_RS), fill_lora, 11),
        ("ia3", IA3Config(**IA3), fill_ia3, 12),
        ("loha", LoHaConfig(**LOHA), fill_loha, 13),
    ]:
        pm = get_peft_model(load_base(out / "base"), cfg)
        fill(pm, seed)
        pm.save_pretrained(str(out / name))
        tidy_adapter_folder(out / name)
        # Reference output from a clean reload of the saved folder (what pet-core must match).
        reloaded = PeftModel.from_pretrained(load_base(out / "base"), str(out / name))
        tensors[name] = run(reloaded, ids, mask)
        live = run(pm, ids, mask)
        assert (live - tensors[name]).abs().max().item() == 0.0, name
        print(f"{name}/adapter_model.safetensors:")
        describe(out / name)

    merged = PeftModel.from_pretrained(load_base(out / "base"), str(out / "lora")).merge_and_unload()
    tensors["lora_merged"] = run(merged, ids, mask)
    merged = PeftModel.from_pretrained(load_base(out / "base"), str(out / "loha")).merge_and_unload()
    tensors["loha_merged"] = run(merged, ids, mask)

    mixed = PeftModel.from_pretrained(load_base(out / "base"), str(out / "lora"), adapter_name="lora")
    mixed.load_adapter(str(out / "lora_rs"), adapter_name="lora_rs")
    mixed.set_adapter("lora_rs")  # the active adapter must not matter with adapter_names
    tensors["lora_mixed"] = run(mixed, ids, mask, adapter_names=["lora", "__base__"])

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "inputs.safetensors"))

    b = tensors["base"]
    for name in ["lora", "lora_rs", "ia3", "loha", "lora_merged", "loha_merged"]:
        d = (tensors[name] - b).abs().max().item()
        print(f"max|{name} - base| = {d:.4e}")
        assert d > 1e-3, f"{name} barely changes the output"
    for name in ["lora", "loha"]:
        d = (tensors[f"{name}_merged"] - tensors[name]).abs().max().item()
        print(f"max|{name}_merged - {name}| = {d:.4e}")
        assert d <= 1e-5
    d0 = (tensors["lora_mixed"][0] - tensors["lora"][0]).abs().max().item()
    d1 = (tensors["lora_mixed"][1] - b[1]).abs().max().item()
    print(f"lora_mixed: max|row0 - lora row0| = {d0:.4e}, max|row1 - base row1| = {d1:.4e}")
    assert d0 <= 1e-5 and d1 <= 1e-5

    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.relative_to(out)}  {p.stat().st_size} B")
    print(f"total {total} B")


def check(adapter_dir, base_dir, tol):
    adapter_dir = Path(adapter_dir)
    expected = load_file(str(adapter_dir / "expected.safetensors"))
    for k in ("input_ids", "attention_mask", "last_hidden_state"):
        if k not in expected:
            print(f"error: {adapter_dir / 'expected.safetensors'} has no tensor {k!r}", file=sys.stderr)
            return 1
    model = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir))
    got = run(model, expected["input_ids"].long(), expected["attention_mask"].long())
    want = expected["last_hidden_state"].float()
    if got.shape != want.shape:
        print(f"error: shape {list(got.shape)} from PEFT, expected {list(want.shape)}", file=sys.stderr)
        return 1
    err = (got - want).abs().max().item()
    print(f"max_abs_err={err:.6e}")
    if not err <= tol:
        print(
            f"FAIL: PEFT ({model.peft_config['default'].peft_type.value}) output differs from "
            f"expected by {err:.3e} > {tol:.1e}",
            file=sys.stderr,
        )
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", metavar="DIR", help="adapter folder written by pet-core, with expected.safetensors")
    ap.add_argument("--base", metavar="BASEDIR", default=str(DEFAULT_OUT / "base"))
    ap.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT))
    ap.add_argument("--tol", type=float, default=TOL)
    ap.add_argument("--self-test", action="store_true",
                    help="run --check on the fixture's own lora/, ia3/ and loha/ folders")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.check:
        return check(args.check, args.base, args.tol)
    if args.self_test:
        out = Path(args.out)
        inp = load_file(str(out / "inputs.safetensors"))
        rc = 0
        for name in ("lora", "ia3", "loha"):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    (tmp / f).write_bytes((out / name / f).read_bytes())
                save_file({"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"],
                           "last_hidden_state": inp[name]}, str(tmp / "expected.safetensors"))
                print(f"{name}: ", end="", flush=True)
                rc |= check(tmp, out / "base", args.tol)
        return rc
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
