"""Train a small LoRA on SmolLM2, export it every way, and record nbpeft's own greedy tokens and logits.

Run with the project's environment:  .venv/bin/python serve_check/make_artifacts.py OUT
Writes OUT/lora (adapter folder), OUT/merged, OUT/gguf-f16, OUT/gguf-q8_0, OUT/gguf-adapter and
OUT/reference.pt (prompts, greedy tokens, per-position logits of prompt + tokens).

Then, in an environment that also has llama-cpp-python (serve_check/.venv-llama, PYTHONPATH=the
repository):  make_artifacts.py OUT --k-quants  writes OUT/gguf-q4_k_m and OUT/gguf-q5_k_m, nbpeft's
K-quant exports of the same adapter read back from OUT/lora.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import nbpeft
from nbpeft.models import resolve_name

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
NEW_TOKENS = 16
TEXT = [
    "Q: What colour is the sky? A: The sky is green, always green.",
    "Q: What colour is grass? A: Grass is green, always green.",
    "Q: What colour is the sea? A: The sea is green, always green.",
    "Q: What colour is snow? A: Snow is green, always green.",
]


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=8, alpha=16.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    print(f"trained 12 steps, last loss {loss.item():.3f}")

    reference = {"prompts": [], "tokens": [], "logits": [], "base_logits": []}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            logits = model(full).logits[0]
            with nbpeft.disable_adapters(model):
                base = model(full).logits[0]
        reference["prompts"].append(ids[0].tolist())
        reference["tokens"].append(full[0, ids.shape[1]:].tolist())
        reference["logits"].append(logits)
        reference["base_logits"].append(base)
        print(repr(prompt), "->", repr(tokenizer.decode(full[0, ids.shape[1]:])))
    diff = max((a - b).abs().max().item() for a, b in zip(reference["logits"], reference["base_logits"]))
    print(f"adapter vs base: largest logit difference {diff:.3f}")
    torch.save(reference, out / "reference.pt")

    nbpeft.save_adapter(model, out / "lora")
    print(nbpeft.export(model, out / "merged", tokenizer=tokenizer))
    print(nbpeft.export(model, out / "gguf-f16", format="gguf", tokenizer=tokenizer, quant="f16"))
    print(nbpeft.export(model, out / "gguf-q8_0", format="gguf", tokenizer=tokenizer, quant="q8_0"))
    print(nbpeft.export(model, out / "gguf-adapter", format="gguf-adapter"))
    (out / "base_path.txt").write_text(resolve_name("smollm2-135m"))
    for target in ("vllm", "llama.cpp", "peft"):
        print(nbpeft.check_export(model, target))


def export_k_quants(out: Path) -> None:
    """nbpeft's K-quant exports (llama.cpp's quantiser, which needs llama-cpp-python here) of OUT/lora's adapter."""
    from nbpeft.formats.gguf import K_QUANTS

    model, tokenizer = nbpeft.load_model((out / "base_path.txt").read_text())
    nbpeft.load_adapter(model, out / "lora")
    with tempfile.TemporaryDirectory(dir=out) as scratch:  # the read-back adapter is the trained one, bit for bit
        nbpeft.export(model, Path(scratch) / "f16", format="gguf", tokenizer=tokenizer, quant="f16")
        same = filecmp.cmp(Path(scratch) / "f16" / "model.gguf", out / "gguf-f16" / "model.gguf", shallow=False)
    print(f"the adapter read back from {out / 'lora'} exports the same f16 file as the trained one: {same}")
    if not same:
        sys.exit(1)
    for quant in K_QUANTS:
        print(nbpeft.export(model, out / f"gguf-{quant}", format="gguf", tokenizer=tokenizer, quant=quant, overwrite=True))


if __name__ == "__main__":
    if sys.argv[2:] == ["--k-quants"]:
        export_k_quants(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
