"""Peak memory of a DPO run against an SFT run of the same batch and lengths.

SmolLM2-135M with LoRA (r=16 on every linear layer) trains a few steps on ``--batch`` rows:
SFT on ``{"prompt", "response"}`` rows, DPO on ``{"prompt", "chosen", "rejected"}`` rows whose
prompt and answers have the same lengths (``--prompt`` and ``--answer`` words). Each run is a
fresh process, so the peak of one is not the other's. On CUDA the peak is
``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set, printed both whole
and above what the process held before training (the model, loaded and attached), which is
what the run's activations and gradients add.

DPO computes the chosen and the rejected answer one after the other, each under
``torch.utils.checkpoint`` (see ``nbpeft.training.objectives.base``), so one answer's
activations are alive at a time; the reference pass runs without gradients.

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/preference_memory.py --batch 2 --prompt 20 --answer 40 --steps 1

Measured on a shared 2-core AMD EPYC (CPU, bf16 autocast, load average ~20): SFT peak 1,351 MiB
(887 MiB above the loaded model), DPO peak 1,360 MiB (896 MiB above): 1.01x. Times per step
under that load say nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1.3


def rows(objective: str, batch: int, prompt: int, answer: int) -> list[dict[str, str]]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    out = []
    for i in range(batch):
        ask = " ".join(words[(i + k) % 10] for k in range(prompt))
        good = " ".join(words[(i + 2 * k) % 10] for k in range(answer))
        bad = " ".join(words[(i + 3 * k) % 10] for k in range(answer))
        out.append({"prompt": ask, "chosen": good, "rejected": bad} if objective == "dpo"
                   else {"prompt": ask, "response": good})
    return out


def one(objective: str, batch: int, prompt: int, answer: int, steps: int) -> dict[str, float]:
    import torch

    sys.path.insert(0, str(ROOT))
    import nbpeft

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=16, targets="all-linear")
    cuda = torch.cuda.is_available()
    held = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        model.cuda()
        held = torch.cuda.memory_allocated()
    result = nbpeft.train(model, rows(objective, batch, prompt, answer), tokenizer=tokenizer, objective=objective,
                          steps=steps, batch_size=batch, max_length=1024, live=False, runs=False, compile=False)
    return {"peak": result.peak_mem_bytes, "held": held, "seconds": result.seconds / steps,
            "device": result.device, "precision": result.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=60, help="words in each prompt")
    parser.add_argument("--answer", type=int, default=120, help="words in each answer")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.prompt, args.answer, args.steps)))
        return
    found = {}
    for objective in ("sft", "dpo"):
        command = [sys.executable, __file__, "--one", objective, "--batch", str(args.batch), "--prompt",
                   str(args.prompt), "--answer", str(args.answer), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        found[objective] = json.loads(out.stdout.strip().splitlines()[-1])
    sft, dpo = found["sft"], found["dpo"]
    mib = 1 << 20
    print(f"{sft['device']} {sft['precision']}, batch {args.batch}, prompt {args.prompt} words, answers {args.answer} words")
    for name, run in found.items():
        print(f"{name}: peak {run['peak'] / mib:,.0f} MiB, {(run['peak'] - run['held']) / mib:,.0f} MiB above the "
              f"loaded model, {run['seconds']:.2f} s/step")
    whole = dpo["peak"] / sft["peak"]
    added = (dpo["peak"] - dpo["held"]) / max(sft["peak"] - sft["held"], 1)
    print(f"DPO / SFT peak: {whole:.2f}x whole, {added:.2f}x above the loaded model "
          f"({'within' if whole <= LIMIT else 'over'} the {LIMIT}x limit)")


if __name__ == "__main__":
    main()
