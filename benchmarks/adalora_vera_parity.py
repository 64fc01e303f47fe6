"""AdaLoRA's rank allocation, step for step, against the reference peft; and VeRA's projections drawn from the key.

AdaLoRA: the reference builds an adapter and saves it untrained; nbpeft loads that file, so both start
from the same ``P``, ``Λ``, ``Q``. Both then train the same steps on the same batches with AdamW (dropout
off): the reference with its penalty in the loss and ``update_and_allocate(step)`` after each step, nbpeft
through the hooks ``train()`` calls (``Method.extra_loss``, ``Method.after_step``). At the end the
allocations (``rank_pattern``) must be equal and the logits equal to 1e-5; each side's saved file then
loads on the other with equal logits.

VeRA: the reference writes a file with ``save_projection=False``, so nbpeft must draw the same ``A`` and
``B`` from ``projection_prng_key`` to load it to the same logits.

Run with the benchmark environment: ``.venv-bench/bin/python benchmarks/adalora_vera_parity.py`` (``make compat`` runs it).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import peft  # noqa: E402

import nbpeft  # noqa: E402
from nbpeft.training import method_steps  # noqa: E402

from families import inputs, outputs, tiny_batch, tiny_model  # noqa: E402

TOLERANCE = 1e-5
TARGETS = {"gpt2": ["c_attn"], "t5": ["q", "v"]}
CASES = [  # family, steps, AdaLoraConfig options
    ("llama", 8, {"init_r": 4, "target_r": 2}),
    ("llama", 10, {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 2, "lora_alpha": 16}),
    ("gpt2", 8, {"init_r": 4, "target_r": 2, "orth_reg_weight": 0.1}),
    ("t5", 6, {"init_r": 4, "target_r": 1, "beta1": 0.7, "beta2": 0.9}),
]


@torch.no_grad()
def ref_logits(model: peft.PeftModel, batch: dict) -> torch.Tensor:
    return model(**inputs(model.get_base_model(), batch)).logits


def adalora_case(family: str, steps: int, options: dict, tmp: Path) -> list[str]:
    """The failures of one case (empty when it passes)."""
    torch.manual_seed(0)
    config = peft.AdaLoraConfig(total_step=steps, target_modules=TARGETS.get(family, ["q_proj", "v_proj"]), **options)
    ref = peft.get_peft_model(tiny_model(family, layers=2), config)
    ref.save_pretrained(tmp / "start")
    ours = tiny_model(family, layers=2)
    nbpeft.load_adapter(ours, tmp / "start")
    batches = [tiny_batch(family, seed=s) for s in (1, 2, 3)]
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=5e-2)
    our_opt = torch.optim.AdamW(nbpeft.core.trainable_parameters(ours), lr=5e-2)
    ref.eval(), ours.eval()  # no dropout: both sides see the same forward
    for step in range(1, steps + 1):
        batch = batches[step % len(batches)]
        ref.base_model(**batch).loss.backward()  # the tuner's forward adds the orthogonality penalty
        ref_opt.step()
        ref.base_model.update_and_allocate(step)
        ref_opt.zero_grad()
        ours(**batch).loss.backward()
        method_steps.backward_extra_loss(ours)
        our_opt.step()
        method_steps.after_step(ours, step, steps)
        our_opt.zero_grad()
    failures = []
    theirs = {k.removesuffix(".default").removesuffix(".lora_E"): v for k, v in ref.peft_config["default"].rank_pattern.items()}
    mine = nbpeft.core.state(ours).adapters["default"].config.rank_pattern
    if theirs != mine:
        failures.append("the allocations differ")
    expected = ref_logits(ref, batches[0])
    diffs = {"trained": (outputs(ours, batches[0]) - expected).abs().max().item()}
    ref.save_pretrained(tmp / "theirs")
    loaded = tiny_model(family, layers=2)
    nbpeft.load_adapter(loaded, tmp / "theirs")
    diffs["reference -> nbpeft"] = (outputs(loaded, batches[0]) - expected).abs().max().item()
    nbpeft.save_adapter(ours, tmp / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model(family, layers=2), tmp / "ours").eval()
    diffs["nbpeft -> reference"] = (ref_logits(back, batches[0]) - outputs(ours, batches[0])).abs().max().item()
    failures += [f"{what}: logits {diff:.1e} apart" for what, diff in diffs.items() if not diff < TOLERANCE]
    ranks = [sum(kept) for kept in mine.values()]
    print(f"adalora {family} {options}: ranks {ranks}, " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return failures


def vera_case(family: str, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    config = peft.VeraConfig(r=8, target_modules=TARGETS.get(family, ["q_proj", "v_proj"]), save_projection=False,
                             projection_prng_key=7)
    ref = peft.get_peft_model(tiny_model(family, layers=2), config)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ref.eval()
    batch = tiny_batch(family)
    ref.save_pretrained(tmp / "vera")
    ours = tiny_model(family, layers=2)
    nbpeft.load_adapter(ours, tmp / "vera")
    diff = (outputs(ours, batch) - ref_logits(ref, batch)).abs().max().item()
    print(f"vera {family} without saved projections: reference -> nbpeft {diff:.1e}")
    return [] if diff < TOLERANCE else [f"vera {family}: logits {diff:.1e} apart"]


def main() -> int:
    warnings.simplefilter("ignore")  # the reference warns about every file saved without projections
    failures = []
    for family, steps, options in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            failures += [f"adalora {family} {options}: {f}" for f in adalora_case(family, steps, options, Path(tmp))]
    for family in ("llama", "gpt2", "bart"):
        with tempfile.TemporaryDirectory() as tmp:
            failures += vera_case(family, Path(tmp))
    for failure in failures:
        print("FAILED:", failure)
    print(f"peft {peft.__version__}: {'all passed' if not failures else f'{len(failures)} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
