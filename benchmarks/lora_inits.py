"""LoRA initialisations and LoRA+ on the bundled SmolLM2-135M: loss at each step, side by side.

Every run trains LoRA r=8 (alpha 16) on the query and value projections with the same
batches (pirate_chat, seed 0), the same steps and the same learning rate; only the init or
the learning-rate ratio differs:

- ``default``: A random, B zero;
- ``pissa``: the top-8 singular triplets of each weight in B·A, the residual in the base;
- ``olora``: QR of each weight;
- ``lora+``: the default init with B learning ``--lr-ratio`` (16, the LoRA+ paper's) times faster;
- ``qlora`` and ``qlora loftq``: the same on a 4-bit NF4 base, with B·A starting at zero or
  cancelling the quantisation error (LoftQ, one iteration); ``--no-qlora`` skips them.

It prints the training loss at a few steps, the mean of the last five and the held-out loss
(pirate_eval) after the last step, and for the qlora runs the mean |logit - full-precision
logit| at attach. ``--json PATH`` also writes every curve.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/lora_inits.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import nbpeft
import nbpeft.datasets

RUNS = {
    "default": ("lora", {}, 1.0),
    "pissa": ("lora", {"init": "pissa"}, 1.0),
    "olora": ("lora", {"init": "olora"}, 1.0),
    "lora+": ("lora", {}, None),  # None: --lr-ratio
    "qlora": ("qlora", {}, 1.0),
    "qlora loftq": ("qlora", {"init": "loftq"}, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-ratio", type=float, default=16.0)
    parser.add_argument("--no-qlora", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these (names as in the table)")
    parser.add_argument("--json", help="write the curves here")
    args = parser.parse_args()

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    data = nbpeft.datasets.load_dataset("pirate_chat")
    held_out = nbpeft.datasets.load_dataset("pirate_eval")[:16]
    probe = tokenizer(["Ahoy, where be the treasure buried?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full_logits = model(probe).logits

    names = [n for n in RUNS if (not args.no_qlora or not n.startswith("qlora")) and (not args.only or n in args.only)]
    results, gaps = {}, {}
    for name in names:
        method, options, ratio = RUNS[name]
        ratio = args.lr_ratio if ratio is None else ratio
        started = time.perf_counter()
        nbpeft.attach(model, method, r=8, alpha=16, **options)
        attach_s = time.perf_counter() - started
        with torch.no_grad():
            gaps[name] = (model(probe).logits - full_logits).abs().mean().item()
        run = nbpeft.train(model, data, tokenizer=tokenizer, steps=args.steps, batch_size=args.batch_size,
                           max_length=args.max_length, lr=args.lr, lr_ratio=ratio, eval_data=held_out,
                           eval_every=args.steps, live=False, seed=0, compile=False)
        nbpeft.detach(model)
        results[name] = {"losses": run.losses, "held_out": run.eval_losses[-1][1], "attach_s": attach_s,
                         "train_s": time.perf_counter() - started - attach_s}
        print(f"{name}: {run.losses[-1]:.4f} after {args.steps} steps ({results[name]['train_s']:.0f} s)", flush=True)
        if args.json:  # after every run: a long benchmark keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results, "logit_gap_at_attach": gaps}, f, indent=1)

    marks = sorted({1, 5, 10, 20, args.steps} & set(range(1, args.steps + 1)))
    print(f"\nSmolLM2-135M, lora r=8 alpha=16 on q/v, {args.steps} steps of {args.batch_size}x{args.max_length} tokens, "
          f"lr={args.lr:g} (lora+: B at {args.lr_ratio:g}x), torch threads={torch.get_num_threads()}")
    header = f"{'run':<12}" + "".join(f"{'step ' + str(s):>9}" for s in marks)
    print(header + f"{'last-5 mean':>12}{'held-out':>10}{'|Δlogit| at attach':>20}{'attach s':>10}")
    for name, r in results.items():
        losses = r["losses"]
        row = f"{name:<12}" + "".join(f"{losses[s - 1]:>9.4f}" for s in marks)
        tail = sum(losses[-5:]) / len(losses[-5:])
        print(row + f"{tail:>12.4f}{r['held_out']:>10.4f}{gaps[name]:>20.4f}{r['attach_s']:>10.2f}")


if __name__ == "__main__":
    main()
