"""LoRA on mixture-of-experts weights (``target_parameters``): files both ways with the reference peft.

A tiny random Mixtral (experts stored as 3-D parameters). nbpeft attaches
``lora(target_parameters='experts')``, random weights, saves; the reference loads the folder and
the logits are compared. Then the reference builds ``LoraConfig(target_parameters=[...])``,
random weights, saves; nbpeft loads it. Also checks that merged logits equal unmerged ones.
Run with the benchmark environment: ``.venv-bench/bin/python benchmarks/moe_parity.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import peft  # noqa: E402

import nbpeft  # noqa: E402

from families import inputs, tiny_batch, tiny_model  # noqa: E402

TOLERANCE = 1e-5


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(**inputs(model, tiny_batch("mixtral"))).logits


@torch.no_grad()
def randomise(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.add_(torch.randn_like(p) * 0.1)


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = tiny_model("mixtral")
        nbpeft.attach(model, "lora", target_parameters="experts", r=4, alpha=8)
        randomise(nbpeft.core.trainable_parameters(model))
        ours = logits(model)
        nbpeft.save_adapter(model, Path(tmp) / "ours")
        config = json.loads((Path(tmp) / "ours" / "adapter_config.json").read_text())
        ref = peft.PeftModel.from_pretrained(tiny_model("mixtral"), Path(tmp) / "ours")
        results["nbpeft -> reference"] = (logits(ref) - ours).abs().max().item()
        nbpeft.merge(model)
        results["nbpeft merged vs unmerged"] = (logits(model) - ours).abs().max().item()

        torch.manual_seed(1)
        ref = peft.get_peft_model(tiny_model("mixtral"), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        randomise([p for p in ref.parameters() if p.requires_grad])
        expected = logits(ref)
        ref.save_pretrained(Path(tmp) / "ref")
        model = tiny_model("mixtral")
        nbpeft.load_adapter(model, Path(tmp) / "ref")
        results["reference -> nbpeft"] = (logits(model) - expected).abs().max().item()
    print(f"target_parameters written by nbpeft: {config.get('target_parameters')}")
    failed = 0
    for what, diff in results.items():
        ok = diff < TOLERANCE
        failed += not ok
        print(f"{what}: {'pass' if ok else 'FAIL'} (largest logit difference {diff:.1e})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
