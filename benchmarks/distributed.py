"""Data parallel on this machine: bytes all-reduced per step, and the step time of 1 vs 2 processes.

    PYTHONPATH=. .venv/bin/python benchmarks/distributed.py            # SmolLM2-135M, LoRA r=8
    PYTHONPATH=. .venv/bin/python benchmarks/distributed.py --tiny     # a tiny random Llama (seconds)

nbpeft only (the reference package has no notebook launcher to compare with). Both runs
train on the same global batches (1 process × batch 2b, 2 processes × batch b); the script
checks that their losses agree before it prints times. On a CPU machine the 2 processes share
its cores, so this shows the overhead of the all-reduce and the duplicated data work, not GPU
scaling; the all-reduce volume is what a multi-GPU projection needs.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import transformers

import nbpeft


def build(tiny: bool) -> tuple[torch.nn.Module, object]:
    if tiny:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        from tests.conftest import char_tokenizer

        return transformers.LlamaForCausalLM(config), char_tokenizer(chat=False)
    return nbpeft.load_model("smollm2-135m")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="the global batch (each of 2 processes takes half)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the 1-process run; each of 2 gets half")
    args = parser.parse_args()

    data = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}. " * 3 for i in range(64)]
    runs = {}
    for processes in (1, 2):
        model, tokenizer = build(args.tiny)
        torch.set_num_threads(args.threads)  # after build: the tests' conftest sets its own thread count
        torch.manual_seed(1)
        nbpeft.attach(model, "lora", r=8)
        result = nbpeft.train(model, data, tokenizer=tokenizer, steps=args.steps, batch_size=args.batch // processes,
                              max_length=args.max_length, precision="fp32", live=False, processes=processes,
                              compile=False)
        runs[processes] = result
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.testing.assert_close(runs[2].losses, runs[1].losses, rtol=1e-4, atol=1e-5)

    print(f"model: {'tiny Llama' if args.tiny else 'SmolLM2-135M'}, LoRA r=8, global batch {args.batch}, "
          f"max_length {args.max_length}, fp32, {torch.get_num_threads()} threads in the parent")
    print(f"all-reduced per step: {grads:,} bytes of adapter gradients (+ 4 bytes of loss per micro-batch and "
          f"4 of the stop flag); the whole model's gradients would be {base:,} bytes ({base / grads:,.0f}x)")
    print("| processes | batch per process | median step time (s, steps 2..) | tokens/s (run) | final loss |")
    print("| --- | --- | --- | --- | --- |")
    for processes, result in runs.items():
        median = statistics.median(row["step_time_s"] for row in result.history[1:])
        print(f"| {processes} | {args.batch // processes} | {median:.3f} | {result.tokens_per_s:,.0f} | "
              f"{result.final_loss:.4f} |")


if __name__ == "__main__":
    main()
