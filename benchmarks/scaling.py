"""How nbpeft.train's step time and memory grow with LoRA rank, sequence length and adapters (CPU).

Model smollm2-135m, fp32, nbpeft.train's default path, LoRA alpha = 2r on q_proj and v_proj.
Three sweeps, each from the same starting point:

  rank      r = 8, 32, 128, 256                  batch 4 x 128
  sequence  T = 256, 512, 1024, 2048, 4096       batch 1 (so the longest fits a small CPU in time)
  adapters  N = 1, 2, 4, 8 attached              batch 4 x 128; one active, then all N active

Each row runs in a fresh subprocess (peak RSS is per row). "FLOP ratio" is the arithmetic:
matmul FLOPs of one step (forward and backward, frozen weights need only input gradients,
causal attention, the vocabulary head) relative to the sweep's first row; "time ratio"
should follow it, with no cliff.

    .venv-bench/bin/python benchmarks/scaling.py            # all sweeps (about 5 minutes on 2 cores)
    .venv-bench/bin/python benchmarks/scaling.py --sweep rank
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_step  # noqa: E402  (the memory probes and model loading are shared)

SWEEPS: dict[str, list[dict[str, Any]]] = {
    "rank": [{"r": r, "batch": 4, "seq": 128, "adapters": 1, "active": 1} for r in (8, 32, 128, 256)],
    "sequence": [{"r": 8, "batch": 1, "seq": t, "adapters": 1, "active": 1} for t in (256, 512, 1024, 2048, 4096)],
    "adapters": [{"r": 8, "batch": 4, "seq": 128, "adapters": n, "active": a}
                 for n in (1, 2, 4, 8) for a in sorted({1, n})],
}
TARGETS = ["q_proj", "v_proj"]


def step_flops(config: Any, r: int, batch: int, seq: int, active: int) -> float:
    """Matmul FLOPs of one training step.

    Frozen linear: 2·in·out per token forward + 2·in·out backward (input gradient only).
    LoRA: 2·r·(in+out) forward + 4·r·(in+out) backward (input and weight gradients).
    Causal attention: about 2·T·d per token and layer forward (QK^T and AV, halved by the
    mask), twice that backward. Head: 2·V·H forward + 2·V·H backward per token.
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    frozen = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter  # q, o, k, v, gate, up, down
    lora = active * r * ((hidden + hidden) + (hidden + kv))  # q_proj and v_proj
    tokens = batch * seq
    per_token = layers * (4 * frozen + 6 * lora + 3 * 2 * seq * hidden) + 4 * vocab * hidden
    return per_token * tokens


def measure(row: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    import nbpeft

    model = lora_step.load_model()
    lora_step.fault_in_weights(model)
    torch.manual_seed(0)
    names = [f"a{i}" for i in range(row["adapters"])]
    for name in names:
        nbpeft.attach(model, "lora", name=name, r=row["r"], alpha=2 * row["r"], targets=TARGETS)
    nbpeft.set_adapter(model, names[: row["active"]])
    generator = torch.Generator().manual_seed(lora_step.DATA_SEED)
    ids = torch.randint(0, model.config.vocab_size, (row["batch"], row["seq"]), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    gc.collect()
    baseline = lora_step.current_rss_mib()
    lora_step.reset_peak_rss()
    start = time.perf_counter()
    result = nbpeft.train(model, [batch] * steps, steps=steps, device="cpu", precision="fp32", live=False)
    times = [r["step_time_s"] for r in result.history]
    return {**row, "median_step_s": statistics.median(times[warmup:] or times),
            "peak_mem_mib": lora_step.peak_rss_mib() - baseline, "wall_s": time.perf_counter() - start,
            "flops": step_flops(model.config, row["r"], row["batch"], row["seq"], row["active"]),
            "loss": result.losses[-1]}


def run_child(row: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(row),
               "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, cwd=lora_step.REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"scaling row {row} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def print_sweep(name: str, rows: list[dict[str, Any]]) -> None:
    first = rows[0]
    print(f"\n{name} sweep")
    print("| r | batch x seq | adapters (active) | step (s) | time ratio | FLOP ratio | tokens/s | peak mem (MiB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        tokens = row["batch"] * row["seq"]
        print(f"| {row['r']} | {row['batch']} x {row['seq']} | {row['adapters']} ({row['active']}) | "
              f"{row['median_step_s']:.3f} | {row['median_step_s'] / first['median_step_s']:.2f} | "
              f"{row['flops'] / first['flops']:.2f} | {tokens / row['median_step_s']:.0f} | {row['peak_mem_mib']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=[*SWEEPS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(measure(json.loads(args.row), args.steps, args.warmup)))
        return 0
    print(f"machine: {lora_step.cpu_model()}, {lora_step.device_label()}, torch {torch.__version__}; "
          f"{args.steps} steps per row, median of the last {args.steps - args.warmup}")
    for name in SWEEPS if args.sweep == "all" else [args.sweep]:
        rows = []
        for row in SWEEPS[name]:
            rows.append(run_child(row, args.steps, args.warmup))
            print(f"  {name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})}",
                  flush=True)
        print_sweep(name, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
