"""Adapter files move between nbpeft and the reference peft, both ways, with equal logits.

For each family of ``tests/families.py`` (tiny random models) and each of LoRA, DoRA, (IA)³,
prompt and prefix tuning:

- nbpeft -> reference: nbpeft attaches with its default targets, its adapter weights are set
  to random values (so the adapter is not an identity), it saves; the reference loads the
  folder onto a fresh copy of the model (``PeftModel.from_pretrained``) and the logits are compared.
- reference -> nbpeft: the reference builds the same adapter (``get_peft_model`` with the
  targets nbpeft chose), random weights, saves; ``nbpeft.load_adapter`` loads it onto a fresh copy.

A pair passes when the largest logit difference is below 1e-4. Pairs that nbpeft refuses
(``families.REFUSED``) are shown as such, and so are those the reference itself cannot build,
load or run ("reference fails"; the error is printed to stderr). Run with the benchmark environment that holds the
reference (``make compat``): ``.venv-bench/bin/python benchmarks/compat.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import peft  # noqa: E402

import nbpeft  # noqa: E402

from families import FAMILIES, KIND, REFUSED, inputs, tiny_batch, tiny_model  # noqa: E402

METHODS = ("lora", "dora", "ia3", "prompt", "prefix")
OPTIONS = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4}}
TASK = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "speech-seq2seq": "SEQ_2_SEQ_LM",
        "classification": "SEQ_CLS", "image-classification": None}
TOLERANCE = 1e-4


class ReferenceFailed(Exception):
    """The reference itself could not build, load or run the adapter (not a difference of nbpeft's)."""


@torch.no_grad()
def logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    model.eval()
    batch = inputs(model, tiny_batch(family))
    if isinstance(model, peft.PeftModel) and "input_features" in batch:
        # The reference's seq2seq wrapper reads the batch size from input_ids, which Whisper has not;
        # its adapters run inside the base model, and its prefix is what get_prompt() returns.
        base = model.get_base_model()
        if model.active_peft_config.is_prompt_learning:
            return base(**batch, past_key_values=model.get_prompt(batch["input_features"].shape[0])).logits.float()
        return base(**batch).logits.float()
    return model(**batch).logits.float()


@torch.no_grad()
def randomise(params: list[torch.nn.Parameter]) -> None:
    """Move every trainable tensor away from its start, so that no adapter is an identity."""
    for p in params:
        p.add_(torch.randn_like(p) * 0.1)


def reference_config(method: str, family: str, saved: dict) -> peft.PeftConfig:
    """The reference's config for the adapter nbpeft wrote (same targets), as its own classes build it."""
    task = TASK[KIND[family]]
    if method in ("lora", "dora"):
        return peft.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=saved["target_modules"],
                               use_dora=method == "dora", init_lora_weights=True)
    if method == "ia3":
        return peft.IA3Config(task_type=task, target_modules=saved["target_modules"],
                              feedforward_modules=saved["feedforward_modules"], fan_in_fan_out=saved["fan_in_fan_out"])
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4)


def ours_to_reference(family: str, method: str, folder: Path, saved: dict) -> float:
    torch.manual_seed(0)
    model = tiny_model(family)
    nbpeft.attach(model, method, **OPTIONS.get(method, {}))
    randomise(nbpeft.core.trainable_parameters(model))
    expected = logits(model, family)
    nbpeft.save_adapter(model, folder)
    saved.update(json.loads((folder / "adapter_config.json").read_text()))
    try:
        got = logits(peft.PeftModel.from_pretrained(tiny_model(family), folder), family)
    except Exception as err:
        raise ReferenceFailed(f"{type(err).__name__}: {err}") from err
    return (got - expected).abs().max().item()


def reference_to_ours(family: str, method: str, saved: dict, folder: Path) -> float:
    torch.manual_seed(0)
    try:
        ref = peft.get_peft_model(tiny_model(family), reference_config(method, family, saved))
        randomise([p for p in ref.parameters() if p.requires_grad])
        expected = logits(ref, family)
        ref.save_pretrained(folder)
    except Exception as err:
        raise ReferenceFailed(f"{type(err).__name__}: {err}") from err
    model = tiny_model(family)
    nbpeft.load_adapter(model, folder)
    return (logits(model, family) - expected).abs().max().item()


def cell(run, *args) -> str:
    try:
        diff = run(*args)
    except ReferenceFailed as err:
        print(f"    reference: {str(err).splitlines()[0][:160]}", file=sys.stderr)
        return "reference fails"
    except Exception as err:  # noqa: BLE001  (a failure is a result of the table)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"    {type(err).__name__}: {first[:160]}", file=sys.stderr)
        if "-v" in sys.argv:
            traceback.print_exc()
        return "fail (error)"
    return f"{'pass' if diff < TOLERANCE else 'FAIL'} {diff:.1e}"


def main() -> int:
    families = [f for f in FAMILIES if len(sys.argv) < 2 or f in sys.argv[1:]]
    rows, failures, skipped = [], 0, 0
    for family in families:
        row = [family]
        for method in METHODS:
            if (family, method) in REFUSED:
                row.append("refused by nbpeft")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                saved: dict = {}
                print(f"{family} {method}", file=sys.stderr)
                there = cell(ours_to_reference, family, method, Path(tmp) / "ours", saved)
                back = cell(reference_to_ours, family, method, saved, Path(tmp) / "ref") if saved else "not run"
            failures += sum(c.startswith(("FAIL", "fail")) for c in (there, back))
            skipped += sum(c == "reference fails" for c in (there, back))
            row.append(f"{there} / {back}")
        rows.append(row)
    print("\nnbpeft -> reference / reference -> nbpeft: pass or FAIL, largest logit difference\n")
    print("| family | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    total = 2 * sum(1 for f in families for m in METHODS if (f, m) not in REFUSED)
    print(f"\n{failures} direction(s) failed, {skipped} could not run in the reference, of {total}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
