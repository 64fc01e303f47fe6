"""Useful tokens per second: ``nbpeft.train`` with its defaults against the reference's plain loop.

Useful tokens are labelled ones: the assistant tokens a chat fine-tune learns (prompt and
system tokens are masked, padding is waste). Workload: LoRA r=8 (alpha 16, dropout 0) on
q_proj and v_proj of smollm2-135m, batches of 8 conversations, one epoch, AdamW lr 2e-4 with
nbpeft's schedule (warm-up, linear decay to 10%, clipping at 1.0) on both sides.

- reference: transformers + peft (``get_peft_model``), conversations in random batches padded
  to the longest (what a TRL user gets by default), ``model(**batch).loss``, backward, AdamW.
- nbpeft: ``nbpeft.attach`` + ``nbpeft.train`` with its defaults (``batching="auto"``).

Data: ``chat``, conversations built here with a realistic spread of lengths (user turns of
5-120 words, answers log-normal around 60 words, 8-400), from the words of the bundled data
sets; ``radio_chat``, the bundled conversations (59-107 tokens). Both sides tokenise the same
conversations with nbpeft's chat encoding, so they learn the same labelled tokens; each side's
time runs from its tokenising to its last step.

Precision: ``fp32`` (precision="fp32" against the plain fp32 loop), ``avx2`` (the same in
processes with ATEN_CPU_CAPABILITY=avx2, standing for a CPU without native bf16, where
nbpeft's default precision is fp32), ``bf16`` (nbpeft's default on a CPU with native bf16
against the plain loop under torch.autocast bf16).

Correctness first: after the epoch both sides' eval loss on held-out conversations (fp32,
the same code) must agree within 3%; a configuration whose check fails prints no speed.
Runs alternate reference and nbpeft, each in a fresh subprocess, for --rounds rounds; the
figure is the ratio of the medians.

    bash benchmarks/setup_ref_venv.sh
    .venv-bench/bin/python benchmarks/useful_tokens.py                     # chat and radio_chat, fp32, avx2, bf16
    .venv-bench/bin/python benchmarks/useful_tokens.py --quick             # fewer examples, one round
    .venv-bench/bin/python benchmarks/useful_tokens.py --device cuda       # skips when no CUDA GPU is visible
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]
BATCH, LR, SEED, TOLERANCE = 8, 2e-4, 0, 0.03
# config: (nbpeft's precision=, environment). avx2 forces fp32 too: nbpeft reads native bf16 from the CPU's
# flags, which the environment variable does not change.
CONFIGS = {"fp32": ("fp32", {}), "avx2": ("fp32", {"ATEN_CPU_CAPABILITY": "avx2"}), "bf16": ("auto", {})}


# ---------------------------------------------------------------- data


def chat_data(count: int, seed: int) -> list[dict[str, Any]]:
    """Conversations with a realistic spread of lengths, from the words of the bundled data sets."""
    from nbpeft.datasets import load_dataset

    words = []
    for name in ("radio_chat", "pirate_chat"):
        for row in load_dataset(name):
            texts = [turn["content"] for turn in row["messages"]] if "messages" in row else [
                v for v in row.values() if isinstance(v, str)]
            for text in texts:
                words += text.split()
    rng = random.Random(seed)

    def text(n: int) -> str:
        start = rng.randrange(len(words))
        return " ".join(words[(start + i) % len(words)] for i in range(n))

    rows = []
    for _ in range(count):
        answer = min(400, max(8, round(rng.lognormvariate(math.log(60), 0.8))))
        rows.append({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": text(rng.randint(5, 120))},
                                  {"role": "assistant", "content": text(answer)}]})
    return rows


def datasets(name: str, quick: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) conversations."""
    if name == "chat":
        rows = chat_data(48 + 16 if quick else 160 + 32, SEED)
        return (rows[:48], rows[48:]) if quick else (rows[:160], rows[160:])
    from nbpeft.datasets import load_dataset

    train = list(load_dataset("radio_chat"))
    held = list(load_dataset("radio_eval"))
    return train, held


# ---------------------------------------------------------------- one run (a child process)


def encode_all(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, list[int]]]:
    from nbpeft.data import chat

    out = []
    for row in rows:
        ids, labels = chat.encode(tokenizer, row["messages"])
        out.append({"input_ids": ids[:512], "labels": labels[:512]})
    return out


def labelled(examples: list[dict[str, list[int]]]) -> int:
    """Tokens the loss learns: labelled positions after the first (nothing predicts the first)."""
    return sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)


def pad(group: list[dict[str, list[int]]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded to the group's longest, padding masked (a data collator's default)."""
    width = max(len(e["input_ids"]) for e in group)
    ids = torch.full((len(group), width), pad_id)
    labels = torch.full((len(group), width), -100)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for i, e in enumerate(group):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def lr_factor(step: int, total: int) -> float:
    """nbpeft.train's default schedule: warm-up over min(10, total/10) steps, then linear decay to 10%."""
    warmup = min(10, max(1, total // 10))
    return step / warmup if step <= warmup else 1.0 - 0.9 * (step - warmup) / max(total - warmup, 1)


def reference(model: Any, tokenizer: Any, rows: list[dict[str, Any]], precision: str, device: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(SEED)
    start = time.perf_counter()
    examples = encode_all(rows, tokenizer)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SEED)).tolist()
    batches = [[examples[j] for j in order[i:i + BATCH]] for i in range(0, len(order), BATCH)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    bf16 = precision == "bf16"
    model.train()
    padded = total = 0
    for step, group in enumerate(batches, 1):
        for g in optimizer.param_groups:
            g["lr"] = LR * lr_factor(step, len(batches))
        batch = pad(group, tokenizer.pad_token_id, device)
        padded += batch["input_ids"].numel()
        total += int(batch["attention_mask"].sum())
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"model": model, "seconds": seconds, "labelled": labelled(examples), "steps": len(batches),
            "batching": f"random padded batches (padding {1 - total / padded:.1%})", "precision": "bf16" if bf16 else "fp32"}


def ours(model: Any, tokenizer: Any, rows: list[dict[str, Any]], precision: str, device: str) -> dict[str, Any]:
    import nbpeft

    nbpeft.attach(model, "lora", r=8, alpha=16, dropout=0.0, targets=TARGETS)
    begin: dict[str, Any] = {}

    def listen(event: str, payload: Any) -> None:
        if event == "begin":
            begin.update(batching=payload.batching, precision=payload.precision)

    start = time.perf_counter()
    result = nbpeft.train(model, rows, tokenizer=tokenizer, batch_size=BATCH, lr=LR, seed=SEED, device=device,
                          live=listen, runs=False, **({} if precision == "auto" else {"precision": precision}))
    seconds = time.perf_counter() - start
    return {"model": model, "seconds": seconds, "labelled": labelled(encode_all(rows, tokenizer)),
            "steps": result.steps, "batching": begin.get("batching", ""), "precision": result.precision}


@torch.no_grad()
def eval_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]], device: str) -> float:
    """Mean loss per labelled token of the held-out conversations, one at a time in fp32."""
    model.eval()
    total = count = 0.0
    for e in encode_all(rows, tokenizer):
        batch = pad([e], tokenizer.pad_token_id, device)
        n = labelled([e])
        total += model(**batch, use_cache=False).loss.float().item() * n
        count += n
    return total / count


def child(side: str, data: str, precision: str, quick: bool, device: str) -> dict[str, Any]:
    import nbpeft

    torch.manual_seed(SEED)
    model, tokenizer = nbpeft.load_model(MODEL)
    model.to(device)
    train_rows, held = datasets(data, quick)
    if side == "ref":
        from nbpeft.training.precision import choose

        ref_precision = "bf16" if precision == "auto" and choose(
            torch.device(device), "auto").autocast_dtype == torch.bfloat16 else "fp32"
        run = reference(model, tokenizer, train_rows, ref_precision, device)
    else:
        run = ours(model, tokenizer, train_rows, precision, device)
    run["eval_loss"] = eval_loss(run.pop("model"), tokenizer, held, device)
    run["useful_per_s"] = run["labelled"] / run["seconds"]
    return run


# ---------------------------------------------------------------- the parent


def cpu_line() -> str:
    from nbpeft.training.precision import choose

    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                "unknown CPU")
    bf16 = "native bf16" if choose(torch.device("cpu"), "auto").autocast_dtype == torch.bfloat16 else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__}"


def run_child(side: str, data: str, config: str, quick: bool, device: str) -> dict[str, Any]:
    precision, env = CONFIGS[config]
    command = [sys.executable, __file__, "--child", side, "--data", data, "--precision", precision, "--device", device]
    done = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO_ROOT)
    if done.returncode:
        raise SystemExit(f"useful_tokens.py: the {side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parent(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("useful_tokens.py --device cuda: skipped, no CUDA GPU is visible")
        return 0
    configs = [c for c in args.configs.split(",") if c]
    if args.device == "cuda":
        configs = [c for c in configs if c != "avx2"]
    print(f"useful tokens/s, {MODEL} LoRA r=8 q/v, batches of {BATCH}, one epoch; "
          f"{args.rounds} round(s), each run a fresh process; load average {os.getloadavg()[0]:.2f}")
    print(f"device: {args.device} · {cpu_line() if args.device == 'cpu' else torch.cuda.get_device_name()}")
    failed = False
    for data in args.data.split(","):
        for config in configs:
            runs: dict[str, list[dict[str, Any]]] = {"ref": [], "nbpeft": []}
            for _ in range(args.rounds):
                for side in runs:
                    runs[side].append(run_child(side, data, config, args.quick, args.device))
            ref, ours_ = runs["ref"][-1], runs["nbpeft"][-1]
            gap = abs(ours_["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"]
            label = f"{data:10} {config:5}"
            if gap > TOLERANCE:
                failed = True
                print(f"{label} CHECK FAILED: eval loss {ours_['eval_loss']:.4f} (nbpeft) vs {ref['eval_loss']:.4f} "
                      f"(reference) differ by {gap:.1%} > {TOLERANCE:.0%}; no speed reported")
                continue
            speed = {side: statistics.median(r["useful_per_s"] for r in rs) for side, rs in runs.items()}
            print(f"{label} reference ({ref['precision']}, {ref['batching']}): {speed['ref']:7.0f} useful tok/s · "
                  f"nbpeft ({ours_['precision']}, {ours_['batching']}): {speed['nbpeft']:7.0f} useful tok/s · "
                  f"{speed['nbpeft'] / speed['ref']:.2f}x · eval loss {ours_['eval_loss']:.4f} vs {ref['eval_loss']:.4f} "
                  f"({gap:.1%} apart), {ref['steps']} steps of {BATCH}, {ref['labelled']} labelled tokens")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="chat,radio_chat", help="chat, radio_chat or both (comma-separated)")
    parser.add_argument("--configs", default="fp32,avx2,bf16", help="fp32, avx2, bf16 (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--quick", action="store_true", help="48 chat conversations, one round")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--child", choices=("ref", "nbpeft"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.precision, args.quick, args.device)))
        return 0
    if args.quick:
        args.rounds = 1
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
