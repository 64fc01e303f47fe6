"""The quickstart's training run in fp32 and at the default precision: does it learn the same?

The run of notebooks/01_quickstart.ipynb: smollm2-135m, LoRA r=8 alpha 16 on q_proj+v_proj,
30 steps of 4 pirate_chat examples cut to 96 tokens, lr 2e-3, evaluated on pirate_eval every
6 steps. Each precision runs in a fresh process from the same initial adapter; the script
prints the eval losses, the step times, the notebook's own checks (the eval loss falls,
at least two of three answers start with "Arr") and whether the final eval loss at the
default precision is within 2% of fp32's (exit 1 if not).

    .venv/bin/python benchmarks/quickstart_precision.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PROMPTS = [
    "What is the capital of Portugal?",
    "Which planet is known as the Red Planet?",
    "What should I pack for a day at the beach?",
]
TOLERANCE = 0.02  # relative, on the final eval loss


def run(precision: str) -> dict:
    import torch

    import nbpeft
    from nbpeft.datasets import load_dataset
    from nbpeft.training.precision import choose

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    torch.manual_seed(0)
    nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    result = nbpeft.train(model, load_dataset("pirate_chat"), tokenizer=tokenizer, eval_data=load_dataset("pirate_eval"),
                          steps=30, batch_size=4, lr=2e-3, max_length=96, precision=precision, live=False)
    answers = nbpeft.generate(model, tokenizer, PROMPTS, max_new_tokens=40)
    return {"asked": precision, "precision": result.precision, "reason": choose(torch.device(result.device), precision).reason,
            "eval_losses": result.eval_losses, "median_step_s": statistics.median(result.history[i]["step_time_s"]
                                                                                 for i in range(2, result.steps)),
            "seconds": result.seconds, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run(args.run)))
        return 0
    runs = {}
    for precision in ("fp32", "auto"):
        done = subprocess.run([sys.executable, __file__, "--run", precision], capture_output=True, text=True, cwd=REPO_ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"the {precision} run failed (exit {done.returncode})")
        runs[precision] = json.loads(lines[-1])
        r = runs[precision]
        arr = sum(answer.startswith("Arr") for answer in r["answers"])
        losses = ", ".join(f"{loss:.4f}" for _, loss in r["eval_losses"])
        print(f"precision={precision!r} -> {r['precision']} ({r['reason']})")
        print(f"  eval loss by step {[step for step, _ in r['eval_losses']]}: {losses}")
        print(f"  answers starting with 'Arr': {arr}/3; eval loss falls: {r['eval_losses'][-1][1] < r['eval_losses'][0][1]}",
              flush=True)
    fp32, auto = runs["fp32"]["eval_losses"][-1][1], runs["auto"]["eval_losses"][-1][1]
    within = abs(auto - fp32) <= TOLERANCE * fp32
    print(f"final eval loss: fp32 {fp32:.4f}, auto ({runs['auto']['precision']}) {auto:.4f}, "
          f"difference {100 * (auto - fp32) / fp32:+.2f}% ({'within' if within else 'NOT within'} {TOLERANCE:.0%})")
    checks = all(r["eval_losses"][-1][1] < r["eval_losses"][0][1] and sum(a.startswith("Arr") for a in r["answers"]) >= 2
                 for r in runs.values())
    if not (within and checks):  # times of runs that did not learn alike are no result
        print("a check failed: no times reported")
        return 1
    for precision, r in runs.items():
        print(f"precision={precision!r}: median step {r['median_step_s']:.3f} s, whole run {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
