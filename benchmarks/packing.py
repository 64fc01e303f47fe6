"""Packing against padding: useful (non-padding) tokens per second on the shipped chat data.

Workload: LoRA r=8 (alpha 16) on q_proj and v_proj of smollm2-135m on CPU (fp32, or bf16
autocast with ``--bf16``), the ``radio_chat`` conversations (44, 59-107 tokens each) rendered
with SmolLM2's chat template. Padded: batches of ``--batch-size`` conversations, each padded
to its batch's longest rounded up to 16 tokens (what ``nbpeft.train`` does by default).
Packed, for each layout ``RxN`` of ``--packed``: batches of R rows of at most N tokens filled
with whole conversations (``packing=True``, ``batch_size=R``, ``max_length=N``). All streams
see the same conversations in the same shuffled orders, a training step is the loss,
backward and an AdamW step as in ``nbpeft.train``, and the streams take turns step by step
so that a busy machine slows all alike. Useful tokens are the conversations' own tokens;
padding is not.

    PYTHONPATH=. python benchmarks/packing.py            # ~3 minutes on 2 idle cores
    PYTHONPATH=. python benchmarks/packing.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbpeft  # noqa: E402
from nbpeft.data.batches import PAD_MULTIPLE, Batches, collate, collate_packed, pack  # noqa: E402
from nbpeft.datasets import load_dataset  # noqa: E402
from nbpeft.training import lm_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per padded batch")
    parser.add_argument("--packed", default="3x256,1x768",
                        help="packed layouts to time, ROWSxLENGTH each (rows a batch, tokens a row), comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true", help="run the steps under bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="3 timed steps of each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    layouts = [tuple(int(n) for n in shape.split("x")) for shape in args.packed.split(",")]
    max_length = max(length for _, length in layouts)
    examples = Batches(load_dataset("radio_chat"), tokenizer, 1, max_length, 0).examples
    pad_id = tokenizer.pad_token_id
    def batches(rows_per_batch: int = 0, length: int = 0):  # padded without a layout
        generator = torch.Generator().manual_seed(0)  # each stream its own: all see the same orders
        while True:
            order = [examples[j] for j in torch.randperm(len(examples), generator=generator).tolist()]
            if rows_per_batch:
                rows = pack(order, length)
                for i in range(0, len(rows) - rows_per_batch + 1, rows_per_batch):
                    chunk = rows[i:i + rows_per_batch]
                    yield collate_packed(chunk, pad_id), sum(len(e["input_ids"]) for row in chunk for e in row)
            else:
                for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    chunk = order[i:i + args.batch_size]
                    yield collate(chunk, pad_id, PAD_MULTIPLE, max_length), sum(len(e["input_ids"]) for e in chunk)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    model.train()
    streams = {"padded": batches(), **{f"packed {r}x{n}": batches(r, n) for r, n in layouts}}
    timings = {name: [] for name in streams}
    for step in range(steps + 2):
        for name, stream in streams.items():
            batch, useful = next(stream)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = lm_loss.model_loss(model, batch, {"use_cache": False})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            if step >= 2:
                timings[name].append((useful, batch["input_ids"].numel(), seconds))

    print(f"smollm2-135m, LoRA r=8 q/v, {'bf16 autocast' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, radio_chat; "
          f"padded: {args.batch_size} conversations a batch; packed RxN: R rows of N tokens a batch")
    print(f"{'':14} {'useful tok/s':>12} {'tok/step':>9} {'padding':>8} {'s/step (median)':>16} {'vs padded':>10}")
    rates = {}
    for name, rows in timings.items():
        useful, total, seconds = (sum(col) for col in zip(*rows))
        rates[name] = useful / seconds
        median = statistics.median(s for _, _, s in rows)
        print(f"{name:14} {rates[name]:12.0f} {useful / len(rows):9.0f} {1 - useful / total:8.1%} {median:16.3f} "
              f"{rates[name] / rates['padded']:9.2f}x")


if __name__ == "__main__":
    main()
