"""NF4 dequantise throughput (GB/s) of nbpeft.nf4: its kernel path against its plain-torch reference.

For each weight shape, quantise once (block 64, double quantisation), then time
``nbpeft.nf4.dequantize`` (the Triton kernel on CUDA when available, else plain torch) and
``nbpeft.nf4.dequantize_reference`` to bf16. GB/s counts bytes moved: the packed 4-bit
weight and its block scales read, the bf16 weight written. Both must give the same tensor.

    .venv-bench/bin/python benchmarks/nf4_dequant.py          # GPU shapes on CUDA; small shapes on CPU
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GPU_SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096), (128256, 2048)]
CPU_SHAPES = [(576, 576), (576, 1536), (1536, 576)]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    try:
        from nbpeft import nf4
    except ImportError:
        print("nf4_dequant.py: nbpeft.nf4 is not available; nothing to measure")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, repeats = (GPU_SHAPES, 50) if device.type == "cuda" else (CPU_SHAPES, 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    states = {shape: nf4.quantize(torch.randn(shape, device=device) * 0.02) for shape in shapes}
    ok = all(torch.equal(nf4.dequantize(state, shape, dtype=torch.bfloat16),
                         nf4.dequantize_reference(state, shape, dtype=torch.bfloat16)) for shape, state in states.items())
    print(f"{'PASS' if ok else 'FAIL'}: the kernel path and the plain-torch reference give identical weights")
    if not ok:  # a speed of a kernel that computes something else is no result
        return 1
    print("| weight | reference (plain torch) GB/s | nbpeft.nf4.dequantize GB/s | ratio | device |")
    print("| --- | ---: | ---: | ---: | --- |")
    for shape, state in states.items():
        moved = sum(t.numel() * t.element_size() for t in state.values()) + shape[0] * shape[1] * 2
        t_kernel = timed(lambda s=state, sh=shape: nf4.dequantize(s, sh, dtype=torch.bfloat16), device, repeats)
        t_plain = timed(lambda s=state, sh=shape: nf4.dequantize_reference(s, sh, dtype=torch.bfloat16), device, repeats)
        ref_gbs, our_gbs = moved / t_plain / 1e9, moved / t_kernel / 1e9
        print(f"| {shape[0]} x {shape[1]} | {ref_gbs:.1f} | {our_gbs:.1f} | {our_gbs / ref_gbs:.2f} | {name} |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
