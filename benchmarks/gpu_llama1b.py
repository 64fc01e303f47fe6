"""GPU LoRA training throughput: nbpeft against the reference `peft` package on a Llama-3.2-1B shape.

Workload: a Llama with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads,
MLP 8192, vocabulary 128256, tied embeddings), random weights in bf16, SDPA attention,
one fixed random batch of 8 x 1024 tokens, LoRA r=16 (alpha 32, dropout 0) on all seven
linear projections, AdamW lr 2e-4.

  peft    peft.get_peft_model + a plain loop (forward with labels, backward, AdamW step);
          --ref eager (default) | ckpt (gradient checkpointing) | compile (torch.compile of the model)
  nbpeft  nbpeft.attach + nbpeft.train(precision="bf16"): block-wise cross-entropy from the
          hidden states, fused AdamW over the adapter parameters, regional torch.compile of the
          decoder block (--no-compile to turn off), --checkpoint for gradient checkpointing,
          --liger to add liger-kernel's RMSNorm/SwiGLU/RoPE kernels when it is installed

Both run alternately, each in a fresh process, --rounds times; the table reports tokens/s
(median over the timed steps) and peak GPU memory (torch.cuda.max_memory_allocated). The
step-1 losses must agree within 2e-2 relative (bf16).

    bash benchmarks/setup_ref_venv.sh && .venv-bench/bin/python benchmarks/gpu_llama1b.py
    .venv-bench/bin/python benchmarks/gpu_llama1b.py --tiny     # CPU smoke run of the same code paths
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

BATCH_SIZE, SEQ_LEN = 8, 1024
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4
LOSS_TOLERANCE = 2e-2


def llama_config(tiny: bool) -> Any:
    import transformers

    if tiny:  # same code paths, a size a CPU runs in seconds
        shape = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 1000}
    else:
        shape = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256}
    return transformers.LlamaConfig(**shape, max_position_embeddings=2048, rope_theta=500000.0,
                                    tie_word_embeddings=True, attn_implementation="sdpa")


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(llama_config(tiny)).to(dtype)
    return model


def make_batch(vocab: int, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def run_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, mode: str,
                  device: torch.device) -> tuple[list[float], list[float]]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    if mode == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    forward = torch.compile(model) if mode == "compile" else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses, times = [], []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        loss = forward(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return losses, times


def run_nbpeft(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, args: argparse.Namespace,
               device: torch.device) -> tuple[list[float], list[float]]:
    import nbpeft

    if args.liger and device.type == "cuda":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError:
            print("note: liger-kernel is not installed; --liger ignored", file=sys.stderr)
        else:
            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=model)
    torch.manual_seed(0)
    nbpeft.attach(model, "lora", r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, targets=TARGETS)
    precision = "bf16" if device.type == "cuda" else "fp32"
    result = nbpeft.train(model, [batch] * steps, steps=steps, lr=LR, device=str(device), precision=precision,
                          live=False, compile=args.compile and device.type == "cuda",
                          gradient_checkpointing=args.checkpoint)
    return result.losses, [row["step_time_s"] for row in result.history]


def measure(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.tiny, device, dtype)
    batch_size, seq = (2, 32) if args.tiny else (BATCH_SIZE, SEQ_LEN)
    batch = make_batch(model.config.vocab_size, batch_size, seq, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if impl == "peft":
        losses, times = run_reference(model, batch, args.steps, args.ref, device)
    else:
        losses, times = run_nbpeft(model, batch, args.steps, args, device)
    median = statistics.median(times[args.warmup:] or times)
    return {"impl": impl, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "tokens_per_s": batch_size * seq / median, "median_step_s": median, "peak_gib": peak_gib(device),
            "warmup_s": sum(times[: args.warmup]), "losses": losses}


def run_child(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--impl", impl, "--steps", str(args.steps), "--warmup", str(args.warmup), "--ref", args.ref]
    flags += [flag for flag, on in (("--tiny", args.tiny), ("--no-compile", not args.compile),
                                    ("--checkpoint", args.checkpoint), ("--liger", args.liger)) if on]
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"--impl {impl} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("peft", "nbpeft"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ref", choices=("eager", "ckpt", "compile"), default="eager", help="reference variant")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="nbpeft: no regional compile")
    parser.add_argument("--checkpoint", action="store_true", help="nbpeft: gradient checkpointing")
    parser.add_argument("--liger", action="store_true", help="nbpeft: liger-kernel RMSNorm/SwiGLU/RoPE if installed")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.rounds = min(args.steps, 3), min(args.warmup, 1), 1
    if args.impl:
        print(json.dumps(measure(args.impl, args)))
        return 0
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_llama1b.py: no CUDA GPU visible; nothing measured (use --tiny for a CPU smoke run)")
        return 0
    results: dict[str, list[dict[str, Any]]] = {"peft": [], "nbpeft": []}
    for round_index in range(1, args.rounds + 1):
        for impl in results:
            run = run_child(impl, args)
            results[impl].append(run)
            print(f"round {round_index} {impl:<7} {run['tokens_per_s']:,.0f} tok/s, peak {run['peak_gib']:.1f} GiB, "
                  f"warm-up {run['warmup_s']:.1f} s, loss {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}", flush=True)
    device = results["nbpeft"][0]["device"]
    nb_flags = ", ".join(f for f, on in (("compile", args.compile and not args.tiny), ("ckpt", args.checkpoint), ("liger", args.liger)) if on)
    print(f"\n| workload | reference ({args.ref}) | nbpeft ({nb_flags or 'eager'}) | ratio | device |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, key, fmt in (("Llama-1B shape LoRA r=16 all-linear, 8x1024: tokens/s", "tokens_per_s", "{:,.0f}"),
                            ("same: peak GPU memory (GiB)", "peak_gib", "{:.1f}")):
        ref = statistics.median(r[key] for r in results["peft"])
        ours = statistics.median(r[key] for r in results["nbpeft"])
        print(f"| {label} | {fmt.format(ref)} | {fmt.format(ours)} | {ours / ref:.2f} | {device} |")
    ref_loss = results["peft"][0]["losses"][0]
    worst = max(abs(r["losses"][0] - ref_loss) / abs(ref_loss) for runs in results.values() for r in runs)
    ok = worst <= LOSS_TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'}: step-1 losses agree within {LOSS_TOLERANCE:g} relative (worst {worst:.1e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
