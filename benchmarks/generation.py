"""Generation speed: ``nbpeft.generate`` with an unmerged LoRA adapter against transformers' ``generate``
on the same model with the adapter merged.

Workload: smollm2-135m in fp32, LoRA r=8 on q_proj and v_proj (random B, so the adapter changes
the answers), chat prompts through the chat template, ``--new-tokens`` new tokens, greedy and
sampled (temperature 0.7, top_p 0.9), batches of 1 and 8 prompts. Columns:

- merged, transformers: ``nbpeft.merge`` then ``model.generate`` on the same input ids;
- nbpeft.generate: the adapter attached and unmerged, as after training (``generate`` folds a
  plain fp32 LoRA into the weights while it answers and puts the exact weights back);
- nbpeft.generate, kept unmerged: the same with that folding turned off, for comparison.

Speed is decoding steps × rows per second (every row of a batch is computed each step, finished
or not), counted by a forward hook on the model, so each side is credited with the same work.
The kinds take turns round by round. Correctness first: greedy answers must be the same text on
every side, or no speed is printed.

    PYTHONPATH=. python benchmarks/generation.py             # 3 rounds
    PYTHONPATH=. python benchmarks/generation.py --quick     # 1 round, 16 new tokens
    PYTHONPATH=. python benchmarks/generation.py --device cuda   # skips when no CUDA GPU is visible
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbpeft  # noqa: E402
from nbpeft.data.batches import chat_prompt  # noqa: E402
from nbpeft.inference import generate as generation  # noqa: E402

PROMPTS = ["Tell me about the sea.", "How do radios work?", "Describe a steamship's engine room.",
           "What is the best breakfast?", "Why is the sky blue?", "Write a short poem about rain.",
           "Explain how a compass works.", "What do sailors eat on long voyages?"]
SAMPLING = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}


def cpu_line() -> str:
    from nbpeft.training.precision import choose

    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                "unknown CPU")
    bf16 = "native bf16" if choose(torch.device("cpu"), "auto").autocast_dtype == torch.bfloat16 else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {bf16}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 16 new tokens")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("generation.py --device cuda: skipped, no CUDA GPU is visible")
        return 0
    if args.quick:
        args.rounds, args.new_tokens = 1, 16
    model, tokenizer = nbpeft.load_model("smollm2-135m")
    model.to(args.device)
    torch.manual_seed(0)
    nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"], init="random")
    steps = [0]
    model.register_forward_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))

    def merged_transformers(prompts: list[str], sampling: dict) -> list[str]:
        rows = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=args.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=args.device)
        options = {"do_sample": False} if not sampling["temperature"] else {
            "do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": 0}
        nbpeft.merge(model)
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **options)
        finally:
            nbpeft.unmerge(model)
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def ours(prompts: list[str], sampling: dict) -> list[str]:
        return nbpeft.generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, seed=0, **sampling)

    def ours_unmerged(prompts: list[str], sampling: dict) -> list[str]:
        limit = generation.MERGE_LIMIT_BYTES
        generation.MERGE_LIMIT_BYTES = 0
        try:
            return ours(prompts, sampling)
        finally:
            generation.MERGE_LIMIT_BYTES = limit

    kinds = {"merged, transformers": merged_transformers, "nbpeft.generate": ours,
             "nbpeft.generate, kept unmerged": ours_unmerged}
    rates: dict[tuple[str, int, str], list[float]] = {}
    answers: dict[tuple[str, int, str], list[str]] = {}
    for run in kinds.values():  # warm-up: first calls build caches and kernels
        run(PROMPTS[:1], SAMPLING["greedy"])
    for _ in range(args.rounds):
        for mode, sampling in SAMPLING.items():
            for batch in (1, 8):
                for kind, run in kinds.items():
                    steps[0] = 0
                    start = time.perf_counter()
                    answers[mode, batch, kind] = run(PROMPTS[:batch], sampling)
                    seconds = time.perf_counter() - start
                    rates.setdefault((mode, batch, kind), []).append(steps[0] * batch / seconds)
    print(f"generation, smollm2-135m fp32 + LoRA r=8 q/v, {args.new_tokens} new tokens, {args.rounds} round(s); "
          f"device {args.device} · {cpu_line() if args.device == 'cpu' else torch.cuda.get_device_name()} · "
          f"{torch.get_num_threads()} threads · load average {os.getloadavg()[0]:.2f}")
    for batch in (1, 8):
        same = len({tuple(answers["greedy", batch, kind]) for kind in kinds}) == 1
        if not same:
            print(f"batch {batch}: CHECK FAILED: greedy answers differ between the kinds; no speed reported")
            return 1
    print(f"{'':18}" + "".join(f"{kind:>32}" for kind in kinds) + f"{'nbpeft / merged':>17}")
    for mode in SAMPLING:
        for batch in (1, 8):
            median = {kind: statistics.median(rates[mode, batch, kind]) for kind in kinds}
            print(f"{mode + ', batch ' + str(batch):18}" + "".join(f"{median[k]:26.1f} tok/s" for k in kinds)
                  + f"{median['nbpeft.generate'] / median['merged, transformers']:16.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
