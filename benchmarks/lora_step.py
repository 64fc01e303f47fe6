"""LoRA training-step benchmark: nbpeft against the reference `peft` package.

Workload: LoRA r=8 (alpha 16, dropout 0) on q_proj and v_proj of smollm2-135m,
one fixed random batch of 4 x 128 tokens, AdamW lr 2e-4 on CPU. Every loop does what
nbpeft.train does each step (linear warm-up then decay of the learning rate, weight decay 0,
gradient clipping at 1.0), so all implementations follow the same loss curve. nbpeft.train
runs at its default precision ("auto": bf16 autocast on CPUs that compute bf16 natively,
fp32 elsewhere); the reference runs both ways, its plain fp32 loop and the same loop under
torch.autocast("cpu", dtype=torch.bfloat16), its best CPU setting.

Run it from the repo root in the benchmark venv (the only place `peft` is installed):

    bash benchmarks/setup_ref_venv.sh && .venv-bench/bin/python benchmarks/lora_step.py

Without --impl, this process is the parent: it runs every measurement in a fresh
subprocess (so peak RSS is per run), alternating reference and nbpeft for --rounds
rounds, then one long run of each of peft, peft-bf16 and nbpeft-train (--long-steps, long
enough for nbpeft.train's default to compile), and prints one table: nbpeft against both
reference settings side by side, step time and peak memory, short (eager) and long runs.

Correctness first: before timing, a short check run of every implementation with MKL's
reproducible mode on (MKL_CBWR=COMPATIBLE: without it MKL's reductions vary run to run,
and AdamW's first steps amplify that to ~1e-3 after a few steps) must match the
reference's loss of the same precision at every step: within 1e-4 relative in fp32, 2e-3 in
bf16 (where kernels that round differently, e.g. the blocked loss, legitimately differ).

With --impl NAME it is one measurement; --json prints one JSON line.
  peft                  peft.get_peft_model + the plain torch loop below, fp32
  peft-bf16             peft.get_peft_model + the same loop under CPU bf16 autocast
  nbpeft                nbpeft.attach        + the plain torch loop, fp32
  nbpeft-train          nbpeft.attach        + nbpeft.train (its defaults: precision, compile)
  nbpeft-train-compile  nbpeft.attach        + nbpeft.train(compile=True) (the compiled
                        steps of a long run; the compile time is reported separately)
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
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-3}  # relative
CHECK_STEPS = 4
LONG_STEPS = 200
IMPLS = ("peft", "peft-bf16", "nbpeft", "nbpeft-train", "nbpeft-train-compile")
REFERENCES = {"fp32": "peft", "bf16": "peft-bf16"}
LONG_IMPLS = ("peft", "peft-bf16", "nbpeft-train")
# --avx2: every measurement runs as on an AVX2-only CPU without native bf16 (torch, oneDNN and MKL held to
# AVX2; nbpeft shown no bf16 flags, so precision="auto" takes fp32, as binder/check.py --avx2 does).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "binder" / "cpu_without_bf16"), str(REPO_ROOT)])}
CHILD_ENV: dict[str, str] = {}
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


def plain_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
               bf16: bool = False) -> tuple[list[float], list[float]]:
    """Forward with labels (under bf16 autocast if asked), backward, clip, AdamW step, zero_grad.

    Returns (losses, step times).
    """
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    times: list[float] = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_factor(step, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times


def nbpeft_train_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
                      compile: bool | None = None) -> tuple[list[float], list[float], str]:
    """nbpeft.train at its default precision over a list of the same batch.

    Returns (losses, step times, precision) from its result.
    """
    import nbpeft

    loader = [batch] * steps
    result = nbpeft.train(model, loader, steps=steps, lr=LR, device="cpu", live=False, compile=compile)
    history = sorted(result.history, key=lambda row: row["step"])
    return [float(row["loss"]) for row in history], [float(row["step_time_s"]) for row in history], result.precision


def count_compiles() -> list[int]:
    """Record each call of nbpeft's block compiler (train() reaches it through the module) in the list returned."""
    from nbpeft.training import compiling

    calls: list[int] = []
    compile_blocks = compiling.compile_blocks

    def counted(model: torch.nn.Module) -> list[torch.nn.Module]:
        calls.append(1)
        return compile_blocks(model)

    compiling.compile_blocks = counted
    return calls


def measure(impl: str, steps: int, warmup: int) -> dict[str, Any]:
    """Load, attach, train `steps` steps; time and memory exclude the first `warmup` steps' timing."""
    load_start = time.perf_counter()
    model = load_model()
    fault_in_weights(model)
    load_s = time.perf_counter() - load_start
    batch = make_batch(model.config.vocab_size)

    torch.manual_seed(ADAPTER_SEED)
    model = attach_reference(model) if impl.startswith("peft") else attach_nbpeft(model)
    n_trainable = sum(p.numel() for p in trainable_parameters(model))

    gc.collect()
    baseline_mib = current_rss_mib()
    peak_reset = reset_peak_rss()

    compiles = count_compiles()
    if impl == "nbpeft-train-compile":
        losses, times, precision = nbpeft_train_loop(model, batch, steps, compile=True)
    elif impl == "nbpeft-train":
        losses, times, precision = nbpeft_train_loop(model, batch, steps)
    else:
        precision = "bf16" if impl == "peft-bf16" else "fp32"
        losses, times = plain_loop(model, batch, steps, bf16=precision == "bf16")

    timed = times[warmup:] or times
    median = statistics.median(timed)
    return {
        "impl": impl,
        "precision": precision,
        "compiled": bool(compiles),
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
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, **CHILD_ENV, **(env or {})})
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
TARGETS_TEXT = "targets: step time <= 0.6x the reference's fp32 loop and <= 0.9x its bf16 autocast loop"


def table_row(run: str, label: str, what: str, refs: list[float | None], ours: float, fmt: str) -> str:
    cells = [fmt.format(ref) if ref is not None else "-" for ref in refs]
    ratios = [f"{ours / ref:.2f}" if ref else "-" for ref in refs]
    return f"| {run} | {label}: {what} | {' | '.join(cells)} | {fmt.format(ours)} | {' | '.join(ratios)} |"


def print_table(short: dict[str, list[dict[str, Any]]], long: dict[str, dict[str, Any]]) -> None:
    """nbpeft against the reference's fp32 loop and its bf16 autocast loop, side by side."""
    print(f"device: {device_label()}; ratio = nbpeft / reference; {TARGETS_TEXT}")
    print("| run | workload | ref fp32 | ref bf16 autocast | nbpeft | ratio vs fp32 | ratio vs bf16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    measures = (("step time (s)", "median_step_s", "{:.3f}"), ("peak memory (MiB)", "peak_mem_mib", "{:.0f}"))

    def refs_of(runs: dict[str, Any], key: str, pick: Any) -> list[float | None]:
        return [pick(runs[ref], key) if runs.get(ref) else None for ref in ("peft", "peft-bf16")]

    steps = short["peft"][0]["steps"]
    for impl, label in LABELS.items():
        if not short.get(impl):
            continue
        label = f"{label} [{short[impl][0]['precision']}]"
        for what, key, fmt in measures:
            print(table_row(f"short, {steps} steps", label, what, refs_of(short, key, median_of), median_of(short[impl], key), fmt))
    if short.get("nbpeft-train-compile"):
        extra = median_of(short["nbpeft-train-compile"], "warmup_extra_s")
        print(f"| short, {steps} steps | nbpeft.train(compile=True): one-off compile (s) | - | - | {extra:.1f} | - | - |")
    ours = long.get("nbpeft-train")
    if ours:
        compiled = "compiled after step 2" if ours["compiled"] else "did not compile"
        run = f"long, {ours['steps']} steps"
        label = f"nbpeft.train (default) [{ours['precision']}, {compiled}]"
        for what, key, fmt in (*measures, ("whole run (s)", "run_s", "{:.1f}")):
            print(table_row(run, label, what, refs_of(long, key, lambda r, k: r[k]), ours[key], fmt))
    print("(short runs: medians over rounds; a short run on the defaults stays eager, compile=True shows the "
          "compiled steps a long run gets)")


def check_losses(results: dict[str, dict[str, Any]]) -> bool:
    """Same weights, same batch, same optimizer math: every step's loss must match the reference of its precision."""
    ok = True
    for impl, run in results.items():
        reference = results.get(REFERENCES[run["precision"]])
        if reference is None:
            print(f"  {impl:<21} {run['precision']}: no reference run of that precision in --impls; not checked")
            continue
        tolerance = LOSS_TOLERANCE[run["precision"]]
        worst = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"]))
        same_params = run["trainable_params"] == reference["trainable_params"]
        good = worst <= tolerance and same_params and len(run["losses"]) == len(reference["losses"])
        ok = ok and good
        curve = ", ".join(f"{loss:.6f}" for loss in run["losses"])
        print(f"  {impl:<21} {run['precision']} losses {curve} (max rel. diff from {reference['impl']} {worst:.1e}, "
              f"allowed {tolerance:g}), trainable params {run['trainable_params']:,}"
              f"{'' if same_params else ' (MISMATCH)'}{'' if good else '  <-- FAIL'}")
    print(f"{'PASS' if ok else 'FAIL'}: every step's loss agrees with the reference run of the same precision "
          "and trainable parameter counts match")
    return ok


def run_one(impl: str, steps: int, warmup: int, cold_compile: bool) -> dict[str, Any]:
    if not cold_compile:
        return run_child(impl, steps, warmup)
    with tempfile.TemporaryDirectory() as cache:
        return run_child(impl, steps, warmup, {"TORCHINDUCTOR_CACHE_DIR": cache})


def progress(what: str, run: dict[str, Any]) -> None:
    print(f"{what} {run['impl']:<21} {run['precision']} median step {run['median_step_s']:.3f} s, "
          f"peak mem {run['peak_mem_mib']:.0f} MiB, warm-up extra {run['warmup_extra_s']:.1f} s, "
          f"loss {run['losses'][0]:.6f} -> {run['losses'][-1]:.6f}, load avg {os.getloadavg()[0]:.2f}", flush=True)


def run_parent(rounds: int, steps: int, warmup: int, impls: list[str], check_steps: int, cold_compile: bool = False,
               long_steps: int = 0) -> int:
    print(f"LoRA r={LORA_R} alpha={LORA_ALPHA} dropout={LORA_DROPOUT} on {'+'.join(TARGETS)} of {MODEL}; "
          f"batch {BATCH_SIZE}x{SEQ_LEN}, AdamW lr {LR:g} (nbpeft.train's schedule and clipping), CPU")
    print(f"machine: {cpu_model()}, {device_label()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"memory: {MEMORY_METHOD}")
    if CHILD_ENV:
        print("as an AVX2-only CPU without native bf16: " + " ".join(f"{k}={v}" for k, v in CHILD_ENV.items()
                                                                     if k != "PYTHONPATH")
              + ", nbpeft shown no bf16 flags (binder/cpu_without_bf16)")
    print()
    checked = True
    if check_steps:
        print(f"correctness: {check_steps} steps of each implementation with MKL_CBWR=COMPATIBLE (reproducible sums)")
        check = {impl: run_child(impl, check_steps, 0, {"MKL_CBWR": "COMPATIBLE"}) for impl in impls}
        checked = check_losses(check)
        print()
        if not checked:  # a speed of code that computes something else is no result
            print("the correctness check failed: no timings reported")
            return 1
    print(f"short runs: {rounds} round(s) x {steps} steps{' (empty compile cache per run)' if cold_compile else ''} "
          f"({warmup} warm-up, excluded from step time); each run in a fresh subprocess; order per round: {', '.join(impls)}")
    short: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    for round_index in range(1, rounds + 1):
        for impl in impls:
            short[impl].append(run_one(impl, steps, warmup, cold_compile))
            progress(f"round {round_index}", short[impl][-1])
    long: dict[str, dict[str, Any]] = {}
    if long_steps:
        print(f"long runs: {long_steps} steps each ({warmup} warm-up excluded from step time; the whole run counts "
              "every step, a compile included)")
        for impl in [impl for impl in LONG_IMPLS if impl in impls]:
            long[impl] = run_one(impl, long_steps, warmup, cold_compile)
            progress("long", long[impl])
    if not all(run["peak_reset"] for run in [*long.values(), *(r for runs in short.values() for r in runs)]):
        print("warning: the peak-RSS reset failed in some runs; their peak may include the model load")
    print()
    print_table(short, long)
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
    parser.add_argument("--long-steps", type=int, default=LONG_STEPS,
                        help=f"parent: steps of the long runs of {', '.join(LONG_IMPLS)} (0: skip them)")
    parser.add_argument("--avx2", action="store_true",
                        help="run every measurement as on an AVX2-only CPU without native bf16 (fp32 everywhere)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, 3 steps, 1 warm-up, 2-step check, no long runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.check_steps, args.long_steps = 1, 3, 1, 2, 0
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.check_steps < 0 or args.long_steps < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup, --check-steps and --long-steps >= 0")
    if args.avx2 and args.impls == ",".join(IMPLS):  # bf16 is emulated there: only the fp32 runs mean anything
        args.impls = "peft,nbpeft,nbpeft-train"
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if "peft" not in impls or any(impl not in IMPLS for impl in impls):
        parser.error(f"--impls must include peft and name only {', '.join(IMPLS)}")
    args.impls = impls
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.avx2:
        CHILD_ENV.update(AVX2_ENV)
    if args.impl is None:
        return run_parent(args.rounds, args.steps, args.warmup, args.impls, args.check_steps, args.cold_compile,
                          args.long_steps)
    result = measure(args.impl, args.steps, args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
