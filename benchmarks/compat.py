"""Adapter files move between nbpeft and the reference peft, both ways, with equal logits.

The methods are those of nbpeft's registry whose ``peft_type`` the reference also has; the models are
the families of ``tests/families.py`` (tiny random models), built with ``LAYERS`` layers per stack
because one layer cannot show a mix-up of layers. For each family and method:

1. nbpeft attaches with its default targets, moves its adapter weights to random values (so the
   adapter is not an identity) and saves.
2. The reference's own round trip: it builds the same kind of adapter (``get_peft_model``, with the
   targets nbpeft chose), random weights, saves, and loads its own folder onto a fresh model. If it
   cannot, neither direction can say anything about nbpeft: both count as "reference cannot build
   or load", with the reference's error.
3. nbpeft -> reference: the reference loads nbpeft's folder (``PeftModel.from_pretrained``).
4. reference -> nbpeft: ``nbpeft.load_adapter`` loads the reference's folder.

Each direction ends as one of: passed (largest logit difference below 1e-4); refused by nbpeft by
design (``families.REFUSED``); reference cannot build or load (step 2 failed); or failed, which is
nbpeft's: it could not attach, save or load, or the reference could not load nbpeft's file although
it loads its own, or the logits differ. The script prints the table, a summary, every direction that
could not run or failed with its reason, and exits 1 when any direction failed.
Run it with the benchmark environment that holds the reference (``make compat``):
``.venv-bench/bin/python benchmarks/compat.py [family ...]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import peft  # noqa: E402

import nbpeft  # noqa: E402
from nbpeft.methods import get_method  # noqa: E402

from families import FAMILIES, FAST_OPTIONS, KIND, REFUSED, inputs, tiny_batch, tiny_model  # noqa: E402

TOLERANCE = 1e-4
# With two or more layers a stored layer read by the wrong model layer shows; three makes the
# reference's encoder-decoder prefix order (decoder layer i reads stored layer 2i mod L) a true permutation.
LAYERS = 3
TASK = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "speech-seq2seq": "SEQ_2_SEQ_LM",
        "classification": "SEQ_CLS", "image-classification": None}
DIRECTIONS = ("nbpeft -> reference", "reference -> nbpeft")


def reference_methods() -> list[str]:
    """nbpeft's methods that write a ``peft_type`` the reference knows, in nbpeft's listing order."""
    known = [get_method(info.name) for info in nbpeft.methods() if get_method(info.name).peft_type in peft.PeftType.__members__]
    return [m.name for m in sorted(known, key=lambda m: (m.listing_order, m.name))]


@dataclass
class Outcome:
    status: str  # "pass", "refused", "reference", "fail"
    diff: float | None = None
    reason: str = ""

    def cell(self) -> str:
        if self.status in ("pass", "fail") and self.diff is not None:
            return f"{'pass' if self.status == 'pass' else 'FAIL'} {self.diff:.1e}"
        return {"refused": "refused", "reference": "ref cannot", "fail": "fail (error)"}[self.status]


def compared(diff: float, what: str) -> Outcome:
    if diff < TOLERANCE:
        return Outcome("pass", diff)
    return Outcome("fail", diff, f"{what}: largest logit difference {diff:.2e} >= {TOLERANCE:.0e}")


def first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:200]}"


def model_of(family: str) -> torch.nn.Module:
    return tiny_model(family, layers=LAYERS)


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


def reference_config(family: str, saved: dict) -> peft.PeftConfig:
    """The reference's config for the kind of adapter nbpeft wrote (same targets), built by its own classes.

    Prompt and prefix tuning take only the number of virtual tokens: the reference sizes them from the
    model itself, which checks the sizes nbpeft wrote.
    """
    task = TASK[KIND[family]]
    kind = saved["peft_type"]
    if kind == "LORA":
        return peft.LoraConfig(task_type=task, r=saved["r"], lora_alpha=saved["lora_alpha"],
                               target_modules=saved["target_modules"], use_dora=bool(saved.get("use_dora")),
                               init_lora_weights=True)
    if kind == "IA3":
        return peft.IA3Config(task_type=task, target_modules=saved["target_modules"],
                              feedforward_modules=saved["feedforward_modules"], fan_in_fan_out=saved["fan_in_fan_out"])
    if kind == "PROMPT_TUNING":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=saved["num_virtual_tokens"])
    if kind == "PREFIX_TUNING":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=saved["num_virtual_tokens"])
    return peft.get_peft_config({**saved, "task_type": task})


def run_pair(family: str, method: str, tmp: Path) -> tuple[Outcome, Outcome]:
    ours_dir, ref_dir = tmp / "ours", tmp / "ref"
    # 1. nbpeft attaches and saves; without its file neither direction can run, and that is nbpeft's failure
    try:
        torch.manual_seed(0)
        model = model_of(family)
        nbpeft.attach(model, method, **FAST_OPTIONS.get(method, {}))
        randomise(nbpeft.core.trainable_parameters(model))
        ours = logits(model, family)
        nbpeft.save_adapter(model, ours_dir)
        saved = json.loads((ours_dir / "adapter_config.json").read_text())
    except Exception as err:  # noqa: BLE001  (a failure is a result of the table)
        failed = Outcome("fail", reason=f"nbpeft could not attach or save: {first_line(err)}")
        return failed, failed

    # 2. the reference's own round trip decides whether it can take this adapter on this model at all
    try:
        torch.manual_seed(0)
        ref = peft.get_peft_model(model_of(family), reference_config(family, saved))
        randomise([p for p in ref.parameters() if p.requires_grad])
        expected = logits(ref, family)
        ref.save_pretrained(ref_dir)
        own = (logits(peft.PeftModel.from_pretrained(model_of(family), ref_dir), family) - expected).abs().max().item()
    except Exception as err:  # noqa: BLE001
        unable = Outcome("reference", reason=f"the reference cannot build, save or load this itself: {first_line(err)}")
        return unable, unable
    if not own < TOLERANCE:
        unable = Outcome("reference", reason=f"the reference's own file reloads with logits {own:.2e} apart")
        return unable, unable

    # 3. nbpeft -> reference
    try:
        got = logits(peft.PeftModel.from_pretrained(model_of(family), ours_dir), family)
        there = compared((got - ours).abs().max().item(), "nbpeft -> reference")
    except Exception as err:  # noqa: BLE001
        there = Outcome("fail", reason=f"the reference loads its own file but not nbpeft's: {first_line(err)}")

    # 4. reference -> nbpeft
    try:
        model = model_of(family)
        nbpeft.load_adapter(model, ref_dir)
        back = compared((logits(model, family) - expected).abs().max().item(), "reference -> nbpeft")
    except Exception as err:  # noqa: BLE001
        back = Outcome("fail", reason=f"nbpeft cannot load the reference's file: {first_line(err)}")
    return there, back


def main() -> int:
    families = [f for f in FAMILIES if len(sys.argv) < 2 or f in sys.argv[1:]]
    methods = reference_methods()
    rows, results = [], []  # results: (family, method, direction, outcome)
    for family in families:
        row = [family]
        for method in methods:
            print(f"{family} {method}", file=sys.stderr)
            if (family, method) in REFUSED:
                pair = (Outcome("refused", reason=f"nbpeft refuses by design: {REFUSED[family, method]}"),) * 2
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    pair = run_pair(family, method, Path(tmp))
            results += [(family, method, d, o) for d, o in zip(DIRECTIONS, pair)]
            row.append(" / ".join(o.cell() for o in pair))
        rows.append(row)

    print(f"\nnbpeft {getattr(nbpeft, '__version__', '')} against peft {peft.__version__}, transformers "
          f"{transformers.__version__}, torch {torch.__version__}; tiny models, {LAYERS} layers per stack")
    print("each cell: nbpeft -> reference / reference -> nbpeft, with the largest logit difference\n")
    print("| family | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    count = {s: sum(o.status == s for *_, o in results) for s in ("pass", "refused", "reference", "fail")}
    print(f"\n{len(results)} directions: {count['pass']} passed, {count['refused']} refused by nbpeft by design, "
          f"{count['reference']} reference cannot build or load, {count['fail']} failed")
    for title, status in (("could not run", "refused"), ("could not run", "reference"), ("FAILED", "fail")):
        listed: dict[tuple[str, str, str], list[str]] = {}  # a reason shared by both directions prints once
        for family, method, direction, outcome in results:
            if outcome.status == status:
                listed.setdefault((family, method, outcome.reason), []).append(direction)
        for (family, method, reason), directions in listed.items():
            which = "both directions" if len(directions) == 2 else directions[0]
            print(f"  {title}: {family} {method} ({which}): {reason}")
    return 1 if count["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
