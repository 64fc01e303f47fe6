"""Time to the first training step: a fresh Python process until its first optimizer step has finished.

Everything a notebook's first cells pay counts: the imports, loading smollm2-135m, attaching
LoRA r=8 to q_proj and v_proj, tokenising the bundled ``radio_chat`` conversations and one
step on a batch of 8 of them. Two paths, each in its own fresh subprocess, alternating:

- reference: transformers (``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` on the same
  local safetensors folder) + peft (``get_peft_model``) + the chat template + a plain loop step;
- nbpeft: ``import nbpeft``, ``nbpeft.load_model``, ``nbpeft.attach``, ``nbpeft.train(steps=1)``
  with its defaults.

The time runs from just before the process is started to the moment the step is done (the
child prints the wall clock then). Run the reference in the benchmark venv (peft lives there):

    .venv-bench/bin/python benchmarks/first_step.py            # 3 rounds
    .venv-bench/bin/python benchmarks/first_step.py --quick    # 1 round
    .venv-bench/bin/python benchmarks/first_step.py --device cuda   # skips when no CUDA GPU is visible
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "nbpeft" / "datasets" / "radio_chat.jsonl"

REFERENCE = """
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, data, device = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
tokenizer = AutoTokenizer.from_pretrained(folder)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
rows = [json.loads(line) for line in open(data)]
encoded = [tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"] for row in rows]
group = encoded[:8]
width = max(map(len, group))
ids = torch.tensor([e + [tokenizer.pad_token_id or 0] * (width - len(e)) for e in group], device=device)
mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in group], device=device)
labels = ids.masked_fill(mask == 0, -100)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
model.train()
loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
loss.backward()
optimizer.step()
print("DONE", time.time(), float(loss))
"""

OURS = """
import sys, time
sys.path.insert(0, sys.argv[4])
import nbpeft
folder, data, device = sys.argv[1:4]
model, tokenizer = nbpeft.load_model("smollm2-135m")
nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
result = nbpeft.train(model, data, steps=1, batch_size=8, device=device, live=False, runs=False)
print("DONE", time.time(), result.history[-1]["loss"])
"""


def one(code: str, folder: str, device: str) -> float:
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code, folder, str(DATA), device, str(REPO_ROOT)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("DONE")]
    if done.returncode or not lines:
        raise SystemExit(f"first_step.py: a run failed:\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1]) - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("first_step.py --device cuda: skipped, no CUDA GPU is visible")
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    from nbpeft.models import resolve_name

    folder = resolve_name("smollm2-135m")  # converts the bundled GGUF once, before any timing
    rounds = 1 if args.quick else args.rounds
    times: dict[str, list[float]] = {"reference": [], "nbpeft": []}
    for _ in range(rounds):
        times["reference"].append(one(REFERENCE, folder, args.device))
        times["nbpeft"].append(one(OURS, folder, args.device))
    ref, ours = (statistics.median(times[k]) for k in ("reference", "nbpeft"))
    print(f"time to the first finished training step (fresh process; imports, smollm2-135m load, LoRA, radio_chat "
          f"tokenised, one step of 8), {args.device}, median of {rounds}, load average {os.getloadavg()[0]:.2f}:")
    print(f"  reference (transformers + peft + plain loop): {ref:6.1f} s   "
          f"nbpeft (load_model + attach + train): {ours:6.1f} s   nbpeft / reference {ours / ref:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
