"""Packing against padding: useful (non-padding) tokens per second on the shipped chat data.

Workload: LoRA r=8 (alpha 16) on q_proj and v_proj of smollm2-135m, fp32 on CPU, the
``radio_chat`` conversations (44, 59-107 tokens each) rendered with SmolLM2's chat
template. Padded: batches of ``--batch-size`` conversations, each padded to its batch's
longest rounded up to 16 tokens (what ``nbpeft.train`` does by default). Packed: rows of ``--max-length`` tokens
filled with whole conversations (``packing=True``), ``--rows`` rows a batch. Both see the
same conversations in the same shuffled order, a training step is the loss, backward and
an AdamW step as in ``nbpeft.train``, and the two alternate step by step so that a busy
machine slows both alike. Useful tokens are the conversations' own tokens; padding is not.

    PYTHONPATH=. python benchmarks/packing.py            # ~2 minutes on 2 idle cores
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
from nbpeft import fast  # noqa: E402
from nbpeft.data import PAD_MULTIPLE, Batches, collate, collate_packed, pack  # noqa: E402
from nbpeft.datasets import load_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per padded batch")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=3, help="packed rows per batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="3 timed steps of each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    examples = Batches(load_dataset("radio_chat"), tokenizer, 1, args.max_length, 0).examples
    pad_id = tokenizer.pad_token_id
    def batches(packed: bool):
        generator = torch.Generator().manual_seed(0)  # each stream its own: both see the same orders
        while True:
            order = [examples[j] for j in torch.randperm(len(examples), generator=generator).tolist()]
            if packed:
                rows = pack(order, args.max_length)
                for i in range(0, len(rows) - args.rows + 1, args.rows):
                    chunk = rows[i:i + args.rows]
                    yield collate_packed(chunk, pad_id), sum(len(e["input_ids"]) for row in chunk for e in row)
            else:
                for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    chunk = order[i:i + args.batch_size]
                    yield collate(chunk, pad_id, PAD_MULTIPLE, args.max_length), sum(len(e["input_ids"]) for e in chunk)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    model.train()
    streams = {"padded": batches(False), "packed": batches(True)}
    timings = {name: [] for name in streams}
    for step in range(steps + 2):
        for name, stream in streams.items():
            batch, useful = next(stream)
            start = time.perf_counter()
            loss = fast.model_loss(model, batch, {"use_cache": False})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            if step >= 2:
                timings[name].append((useful, batch["input_ids"].numel(), seconds))

    print(f"smollm2-135m, LoRA r=8 q/v, fp32, {torch.get_num_threads()} threads, radio_chat; "
          f"padded: {args.batch_size} conversations a batch; packed: {args.rows} rows of {args.max_length}")
    print(f"{'':8} {'useful tok/s':>12} {'tok/step':>9} {'padding':>8} {'s/step (median)':>16}")
    rates = {}
    for name, rows in timings.items():
        useful, total, seconds = (sum(col) for col in zip(*rows))
        rates[name] = useful / seconds
        median = statistics.median(s for _, _, s in rows)
        print(f"{name:8} {rates[name]:12.0f} {useful / len(rows):9.0f} {1 - useful / total:8.1%} {median:16.3f}")
    print(f"packed / padded useful tokens per second: {rates['packed'] / rates['padded']:.2f}x")


if __name__ == "__main__":
    main()
