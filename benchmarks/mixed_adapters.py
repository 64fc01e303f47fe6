"""One adapter per row against a loop over adapters: the forward time of a batch of 8.

Workload: the bundled SmolLM2-135M with 8 LoRA adapters (r=16 on every linear layer of the
blocks, random B so that each one changes the output), a batch of 8 prompts of --seq-len
tokens. For 1, 2, 4 and 8 distinct adapters in the batch (rows assigned round-robin):

  mixed  one forward, ``model(ids, adapter_names=[...])``: the base runs once on all 8 rows,
         each LoRA layer runs each adapter on its own rows;
  loop   for each adapter, ``set_adapter`` and a forward of its rows only (what one would do
         without per-row adapters).

Before timing, the mixed logits are checked against the loop's, row by row. Times are the
median of --repeats runs after two warm-up runs, in milliseconds, the two ways taking turns.

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/mixed_adapters.py [--device cuda] [--model smollm2-4]
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

BATCH = 8
COUNTS = (1, 2, 4, 8)


def build(model_kind: str, device: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if model_kind == "tiny":  # the code paths in seconds
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
    elif model_kind == "smollm2-4":  # SmolLM2-135M's widths, 4 of its 30 blocks, random weights
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        model, _ = nbpeft.load_model("smollm2-135m", dtype=torch.float32)
    model.to(device).eval()
    for i in range(max(COUNTS)):
        nbpeft.attach(model, "lora", name=f"a{i}", r=16, targets="all-linear", init="random")
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.mul_(5)
    return model


def timed(fns: list, repeats: int, device: str) -> list[float]:
    """Median milliseconds of each of ``fns``, run in turn (so a busy machine slows each alike)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 2):
        for fn, kept in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                kept.append(time.perf_counter() - start)
    return [statistics.median(kept) * 1000 for kept in times]


# Mixed-batch logits must match the adapter-by-adapter loop's to this share of the largest logit.
LOGIT_TOLERANCE = 1e-3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", choices=("smollm2", "smollm2-4", "tiny"), default="smollm2",
                        help="the bundled SmolLM2-135M, a 4-block Llama of its widths, or a tiny Llama")
    args = parser.parse_args()
    device = args.device
    model = build(args.model, device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    print(f"model: {args.model}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {BATCH} x {args.seq_len} tokens, LoRA r=16 on all linear layers")
    print(f"{'adapters':>8} {'mixed ms':>9} {'loop ms':>9} {'loop/mixed':>10} {'max |diff|':>11}")
    failed = False
    for count in COUNTS:
        names = [f"a{i % count}" for i in range(BATCH)]
        groups = {n: [i for i, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}

        def mixed(names: list[str] = names) -> torch.Tensor:
            return model(ids, adapter_names=names).logits

        def loop(groups: dict[str, list[int]] = groups) -> torch.Tensor:
            out = torch.empty(BATCH, args.seq_len, vocab, device=device)
            for name, rows in groups.items():
                nbpeft.set_adapter(model, name)
                out[rows] = model(ids[rows]).logits
            return out

        with torch.no_grad():
            want = loop()
            diff = (mixed() - want).abs().max().item()
            if diff > LOGIT_TOLERANCE * max(1.0, want.abs().max().item()):  # no time for logits that differ
                print(f"{count:>8} CHECK FAILED: mixed logits differ from the loop's by {diff:.1e}; no timing")
                failed = True
                continue
            mixed_ms, loop_ms = timed([mixed, loop], args.repeats, device)
        print(f"{count:>8} {mixed_ms:>9.1f} {loop_ms:>9.1f} {loop_ms / mixed_ms:>9.2f}x {diff:>11.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
