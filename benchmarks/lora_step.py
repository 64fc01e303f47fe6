"""LoRA training-step benchmark: nbpeft against the reference `peft` package.

Workload: LoRA r=8 (alpha 16, dropout 0) on q_proj and v_proj of smollm2-135m,
one fixed random batch of 4 x 128 tokens, AdamW lr 2e-4, fp32 on CPU. Every loop does
what nbpeft.train does each step (linear warm-up then decay of the learning rate, weight
decay 0, gradient clipping at 1.0), so all implementations follow the same loss curve.

Run it from the repo root in the benchmark venv (the only place `peft` is installed):

    bash benchmarks/setup_ref_venv.sh && .venv-bench/bin/python benchmarks/lora_step.py

Without --impl, this process is the parent: it runs every measurement in a fresh
subprocess (so peak RSS is per run), alternating reference and nbpeft for --rounds
rounds, prints a table and checks that the step-1 losses agree (exit 1 if not).

Correctness first: before timing, a short check run of every implementation with MKL's
reproducible mode on (MKL_CBWR=COMPATIBLE: without it MKL's reductions vary run to run,
and AdamW's first steps amplify that to ~1e-3 after a few steps) must match the
reference's loss at every step within 1e-4 relative.

With --impl NAME it is one measurement; --json prints one JSON line.
  peft                  peft.get_peft_model + the plain torch loop below
  nbpeft                nbpeft.attach        + the same plain torch loop
  nbpeft-train          nbpeft.attach        + nbpeft.train (its default path)
  nbpeft-train-compile  nbpeft.attach        + nbpeft.train(compile=True) (opt-in; the
                        compile time is reported separately)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Measure the working tree's nbpeft even when it is not pip-installed.
sys.path.insert(0, str(REPO_ROOT))

MODEL = "smollm2-135m"
BATCH_SIZE = 4
SEQ_LEN = 128
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.0
TARGETS = ["q_proj", "v_proj"]
LR = 2e-4
DATA_SEED = 1234
ADAPTER_SEED = 0
LOSS_TOLERANCE = 1e-4  # relative
CHECK_STEPS = 4
IMPLS = ("peft", "nbpeft", "nbpeft-train", "nbpeft-train-compile")
MEMORY_METHOD = (
    "peak RSS during training (resource.getrusage ru_maxrss, high-water mark reset via "
    "/proc/self/clear_refs after load) minus VmRSS from /proc/self/status after model load"
)


# ---------------------------------------------------------------- memory probes


def current_rss_mib() -> float:
    """Resident set size now, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark so the model load's peak does not count.

    Writing 5 to /proc/self/clear_refs resets VmHWM, which ru_maxrss reads.
    Returns False where the kernel does not allow it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- one measurement


def load_model() -> torch.nn.Module:
    """The base model in fp32 on CPU, loaded the same way for every implementation."""
    import nbpeft

    model, _tokenizer = nbpeft.load_model(MODEL)
    return model


def fault_in_weights(model: torch.nn.Module) -> None:
    """Read every weight once so that it is resident before the RSS baseline is taken.

    The safetensors cache is memory-mapped: untouched weights are not yet in RSS and
    would otherwise be paged in during the first forward and counted as training memory.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def make_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """One fixed batch of random token ids; labels are the input ids."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    input_ids = torch.randint(0, vocab_size, (BATCH_SIZE, SEQ_LEN), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }


def attach_reference(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def attach_nbpeft(model: torch.nn.Module) -> torch.nn.Module:
    import nbpeft

    nbpeft.attach(model, "lora", r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, targets=TARGETS)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lr_factor(step: int, total: int) -> float:
    """nbpeft.train's schedule: linear warm-up over min(10, total/10) steps, then linear decay to 10%."""
    warmup = min(10, max(1, total // 10))
    if step <= warmup:
        return step / warmup
    return 1.0 - 0.9 * (step - warmup) / max(total - warmup, 1)


def plain_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> tuple[list[float], list[float]]:
    """Forward with labels, backward, clip, AdamW step, zero_grad. Returns (losses, step times)."""
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    times: list[float] = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_factor(step, steps)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times


def nbpeft_train_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
                      compile: bool | None = None) -> tuple[list[float], list[float]]:
    """nbpeft.train over a list of the same batch. Returns (losses, step times) from its history."""
    import nbpeft

    loader = [batch] * steps
    result = nbpeft.train(model, loader, steps=steps, lr=LR, device="cpu", precision="fp32", live=False,
                          compile=compile)
    history = sorted(result.history, key=lambda row: row["step"])
    return [float(row["loss"]) for row in history], [float(row["step_time_s"]) for row in history]


def measure(impl: str, steps: int, warmup: int) -> dict[str, Any]:
    """Load, attach, train `steps` steps; time and memory exclude the first `warmup` steps' timing."""
    load_start = time.perf_counter()
    model = load_model()
    fault_in_weights(model)
    load_s = time.perf_counter() - load_start
    batch = make_batch(model.config.vocab_size)

    torch.manual_seed(ADAPTER_SEED)
    model = attach_reference(model) if impl == "peft" else attach_nbpeft(model)
    n_trainable = sum(p.numel() for p in trainable_parameters(model))

    gc.collect()
    baseline_mib = current_rss_mib()
    peak_reset = reset_peak_rss()

    if impl == "nbpeft-train-compile":
        losses, times = nbpeft_train_loop(model, batch, steps, compile=True)
    elif impl == "nbpeft-train":
        losses, times = nbpeft_train_loop(model, batch, steps)
    else:
        losses, times = plain_loop(model, batch, steps)

    timed = times[warmup:] or times
    median = statistics.median(timed)
    return {
        "impl": impl,
        "steps": steps,
        "warmup": warmup,
        "load_s": round(load_s, 3),
        "trainable_params": n_trainable,
        "step1_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "median_step_s": median,
        "run_s": round(sum(times), 3),
        # time the warm-up steps took beyond steady-state steps: the compile time where there is one
        "warmup_extra_s": round(sum(times[:warmup]) - warmup * median, 2),
        "step_times_s": [round(t, 4) for t in times],
        "baseline_rss_mib": round(baseline_mib, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_mem_mib": round(peak_rss_mib() - baseline_mib, 1),
        "peak_reset": peak_reset,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------- parent: alternate runs, report


def run_child(impl: str, steps: int, warmup: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement in a fresh interpreter; returns its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--impl", impl,
               "--steps", str(steps), "--warmup", str(warmup), "--json"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    json_lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not json_lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"measurement --impl {impl} failed (exit {done.returncode})")
    return json.loads(json_lines[-1])


def device_label() -> str:
    return f"cpu ({os.cpu_count()} cores)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


LABELS = {
    "nbpeft": "plain loop + attach",
    "nbpeft-train": "nbpeft.train (default)",
    "nbpeft-train-compile": "nbpeft.train(compile=True)",
}


def print_table(results: dict[str, list[dict[str, Any]]]) -> None:
    ref = results["peft"]
    device = device_label()
    print("| workload | reference | nbpeft | ratio | device |")
    print("| --- | ---: | ---: | ---: | --- |")
    for impl, label in LABELS.items():
        if not results.get(impl):
            continue
        for what, key, fmt in (("step time (s)", "median_step_s", "{:.3f}"), ("peak memory (MiB)", "peak_mem_mib", "{:.0f}"),
                               (f"whole run of {ref[0]['steps']} steps (s)", "run_s", "{:.1f}")):
            reference, ours = median_of(ref, key), median_of(results[impl], key)
            ratio = ours / reference if reference else float("nan")
            print(f"| LoRA step, {label}: {what} | {fmt.format(reference)} | {fmt.format(ours)} | {ratio:.2f} | {device} |")
    if results.get("nbpeft-train-compile"):
        extra = median_of(results["nbpeft-train-compile"], "warmup_extra_s")
        print(f"| LoRA step, nbpeft.train(compile=True): one-off compile (s) | - | {extra:.1f} | - | {device} |")
    print("(nbpeft.train's default compiles by itself once two timed steps show the remaining steps pay the compile back)")


def check_losses(results: dict[str, dict[str, Any]]) -> bool:
    """Same weights, same batch, same optimizer math: every step's loss must match the reference's."""
    reference = results["peft"]
    ok = True
    for impl, run in results.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"]))
        same_params = run["trainable_params"] == reference["trainable_params"]
        good = worst <= LOSS_TOLERANCE and same_params and len(run["losses"]) == len(reference["losses"])
        ok = ok and good
        curve = ", ".join(f"{loss:.6f}" for loss in run["losses"])
        print(f"  {impl:<21} losses {curve} (max rel. diff {worst:.1e}), trainable params "
              f"{run['trainable_params']:,}{'' if same_params else ' (MISMATCH)'}{'' if good else '  <-- FAIL'}")
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict}: every step's loss agrees with the reference within {LOSS_TOLERANCE:g} relative "
          f"and trainable parameter counts match ({reference['trainable_params']:,})")
    return ok


def run_parent(rounds: int, steps: int, warmup: int, impls: list[str], check_steps: int, cold_compile: bool = False) -> int:
    print(f"LoRA r={LORA_R} alpha={LORA_ALPHA} dropout={LORA_DROPOUT} on {'+'.join(TARGETS)} of {MODEL}; "
          f"batch {BATCH_SIZE}x{SEQ_LEN}, AdamW lr {LR:g} (nbpeft.train's schedule and clipping), fp32, CPU")
    print(f"machine: {cpu_model()}, {device_label()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"memory: {MEMORY_METHOD}")
    print()
    checked = True
    if check_steps:
        print(f"correctness: {check_steps} steps of each implementation with MKL_CBWR=COMPATIBLE (reproducible sums)")
        check = {impl: run_child(impl, check_steps, 0, {"MKL_CBWR": "COMPATIBLE"}) for impl in impls}
        checked = check_losses(check)
        print()
    print(f"timing: {rounds} round(s) x {steps} steps{' (empty compile cache per run)' if cold_compile else ''} ({warmup} warm-up, excluded from step time); "
          f"each run in a fresh subprocess; order per round: {', '.join(impls)}")
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    for round_index in range(1, rounds + 1):
        for impl in impls:
            if cold_compile:
                with tempfile.TemporaryDirectory() as cache:
                    run = run_child(impl, steps, warmup, {"TORCHINDUCTOR_CACHE_DIR": cache})
            else:
                run = run_child(impl, steps, warmup)
            results[impl].append(run)
            print(f"round {round_index} {impl:<21} median step {run['median_step_s']:.3f} s, "
                  f"peak mem {run['peak_mem_mib']:.0f} MiB, warm-up extra {run['warmup_extra_s']:.1f} s, "
                  f"loss {run['losses'][0]:.6f} -> {run['losses'][-1]:.6f}, load avg {os.getloadavg()[0]:.2f}",
                  flush=True)
    if not all(run["peak_reset"] for runs in results.values() for run in runs):
        print("warning: the peak-RSS reset failed in some runs; their peak may include the model load")
    print()
    print_table(results)
    print("ratio = nbpeft / reference (target: step time <= 0.9, memory <= 1.0); medians over rounds")
    return 0 if checked else 1


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, help="run one measurement (default: parent mode)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="parent: comma-separated implementations to run")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time")
    parser.add_argument("--rounds", type=int, default=3, help="parent: rounds of alternating runs")
    parser.add_argument("--check-steps", type=int, default=CHECK_STEPS, help="parent: steps of the loss check (0: skip)")
    parser.add_argument("--json", action="store_true", help="--impl: print one JSON line")
    parser.add_argument("--cold-compile", action="store_true",
                        help="parent: give every run an empty torch compile cache (first-use compile times)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 steps, 1 warm-up, 2-step check")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.check_steps = 1, 3, 1, 2
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.check_steps < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup and --check-steps >= 0")
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if "peft" not in impls or any(impl not in IMPLS for impl in impls):
        parser.error(f"--impls must include peft and name only {', '.join(IMPLS)}")
    args.impls = impls
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.impl is None:
        return run_parent(args.rounds, args.steps, args.warmup, args.impls, args.check_steps, args.cold_compile)
    result = measure(args.impl, args.steps, args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
