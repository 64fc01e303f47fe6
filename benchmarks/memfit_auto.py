"""batch_size="auto" on CPU: what it picks for SmolLM2-135M, how long the probe takes, and how close its estimate is.

Workload: the bundled SmolLM2-135M with LoRA r=8 on q_proj and v_proj, the bundled pirate chat
data, max_length 256, effective batch 16, fp32, 2 steps.

1. ``train(batch_size="auto", effective_batch=16)`` with the machine's free RAM: the micro-batch
   picked and the probe's time (from the start banner).
2. The same with free RAM capped (``--cap-gb``, default 2): what a smaller machine would get.
3. The estimate checked: for micro-batch m in (1, 2, 4), one step's peak resident set over the
   resident set before it (Linux: VmHWM reset through /proc/self/clear_refs), per example,
   against the probe's estimate per example (saved activations x ACTIVATION_OVERHEAD).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/memfit_auto.py
"""

from __future__ import annotations

import argparse
import time

import torch

import nbpeft
from nbpeft.data.batches import Batches
from nbpeft.datasets import load_dataset
from nbpeft.training import lm_loss, memory
from nbpeft.training.events import Listener


class Banner(Listener):
    def on_begin(self, begin) -> None:
        self.begin = begin


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def auto_run(model, tokenizer, data, label: str) -> None:
    banner = Banner()
    started = time.perf_counter()
    result = nbpeft.train(model, data, tokenizer=tokenizer, batch_size="auto", effective_batch=16, steps=1,
                          max_length=256, precision="fp32", compile=False, live=banner)
    print(f"{label}: micro-batch {banner.begin.batch_size} x {banner.begin.grad_accum} accumulated; "
          f"{banner.begin.batch_reason}; whole call incl. 1 step {time.perf_counter() - started:.1f} s; {result!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap-gb", type=float, default=2.0)
    args = parser.parse_args()
    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=8, targets=["q_proj", "v_proj"])
    data = load_dataset("pirate_chat")
    print(f"free RAM {memory.free_ram() / 1e9:.2f} GB, torch threads {torch.get_num_threads()}")

    auto_run(model, tokenizer, data, "free RAM")
    free_ram = memory.free_ram
    memory.free_ram = lambda: min(free_ram(), int(args.cap_gb * 1e9))
    auto_run(model, tokenizer, data, f"capped at {args.cap_gb} GB")
    memory.free_ram = free_ram

    batches = Batches(data, tokenizer, 16, 256, 0)
    def loss_of(batch):  # train()'s own loss: block-wise cross-entropy from the hidden states
        return lm_loss.model_loss(model, batch, {"use_cache": False})

    estimate = memory.saved_activation_bytes(model, memory.probe_batch(batches, 1), loss_of,
                                             torch.autocast("cpu", enabled=False))
    print(f"probe: saved activations {estimate / 1e6:.0f} MB an example (widest row "
          f"{memory.probe_batch(batches, 1)['input_ids'].shape[1]} tokens); "
          f"estimate with overhead {estimate * memory.ACTIVATION_OVERHEAD / 1e6:.0f} MB")
    model.train()
    for micro in (1, 2, 4):
        batch = memory.probe_batch(batches, micro)
        nbpeft.release(model)
        before = memory.resident_bytes()
        peak_rss_reset()
        loss_of(batch).backward()
        peak = peak_rss()
        model.zero_grad(set_to_none=True)
        print(f"micro-batch {micro}: step peak {(peak - before) / 1e6:.0f} MB over the resident set, "
              f"{(peak - before) / micro / 1e6:.0f} MB an example")
    model.eval()


if __name__ == "__main__":
    main()
