"""Which precision training runs in, and why: one decision for CPUs and GPUs.

``precision="auto"`` picks mixed precision where the hardware computes it natively:

- **CUDA**: bf16 autocast on GPUs with native bf16 (compute capability 8.0+, Ampere and
  later), else fp16 autocast with a gradient scaler (fp16's narrow range needs one).
- **CPU**: bf16 autocast where the CPU has bf16 instructions (AMX-BF16 on Intel Sapphire
  Rapids and later, AVX512-BF16 on Cooper Lake and AMD Zen 4+, BF16 on Arm v8.6+) *and* a
  quick timed matmul confirms bf16 is faster here; fp32 elsewhere. Without native support
  bf16 is emulated and slower than fp32. Measured on a 2-core Sapphire Rapids: a
  512x576 @ 576x1536 matmul takes 0.45 ms in bf16, 2.9 ms in fp32.
- **Anything else** (Apple's MPS, unknown devices): fp32.

Autocast runs the matmuls in the low precision; parameters (so the adapter's weights),
their gradients and the optimiser's state stay fp32, and so do the reductions autocast
keeps in fp32 (softmax, norms, the loss). The CPU probe runs once per process.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import AdapterLayer, innermost

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# x86 flags (as /proc/cpuinfo spells them) and Arm features that mean bf16 matmuls in hardware, best first.
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 must take at most this fraction of fp32's matmul time to be worth its rounding.
CPU_BF16_MAX_TIME_RATIO = 0.7


@dataclass(frozen=True)
class Choice:
    """A precision (``"fp32"``, ``"bf16"`` or ``"fp16"``) and the one-line reason for it."""

    name: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast runs matmuls in, or None for plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        """The autocast context for this choice on ``device`` (a no-op for fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def choose(device: torch.device, requested: str = "auto") -> Choice:
    """The precision to train in on ``device``: ``requested`` as given, or the hardware's best for "auto"."""
    if requested not in PRECISIONS:
        raise ConfigError(f"train(): precision={requested!r} is not known; use one of {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("train(): precision='fp16' needs a GPU; use 'fp32' or 'bf16' on CPU")
    if device.type == "cuda":
        return _choose_cuda(device, requested)
    if device.type == "cpu":
        return _choose_cpu(requested)
    if requested == "auto":
        return Choice("fp32", f"fp32: the default on {device.type} (precision='bf16' or 'fp16' turns on autocast)")
    return Choice(requested, f"{_label(requested)}: asked for (precision={requested!r})")


def _label(name: str) -> str:
    return {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a grad scaler"}[name]


def _choose_cpu(requested: str) -> Choice:
    feature = cpu_bf16_feature()
    if requested == "fp32":
        return Choice("fp32", "fp32: asked for (precision='fp32')")
    if requested == "bf16":
        note = f" (this CPU computes bf16 natively, {feature})" if feature else "; this CPU has no native bf16, so it is emulated and likely slower than fp32"
        return Choice("bf16", f"bf16 autocast: asked for (precision='bf16'){note}")
    if feature is None:
        return Choice("fp32", "fp32: this CPU has no native bf16 (no AMX-BF16, AVX512-BF16 or Arm BF16)")
    ratio = cpu_bf16_time_ratio()
    if ratio > CPU_BF16_MAX_TIME_RATIO:
        return Choice("fp32", f"fp32: this CPU has {feature}, but a bf16 matmul measured {ratio:.2f}x fp32's time here")
    return Choice("bf16", f"bf16 autocast: this CPU computes bf16 natively ({feature})")


def _choose_cuda(device: torch.device, requested: str) -> Choice:
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    native = major >= 8  # Ampere and later have bf16 tensor cores; earlier GPUs emulate it
    if requested != "auto":
        note = "" if native or requested != "bf16" else f"; {name} (sm {major}.{minor}) emulates bf16, fp16 is faster"
        return Choice(requested, f"{_label(requested)}: asked for (precision={requested!r}){note}")
    if native:
        return Choice("bf16", f"bf16 autocast: this GPU computes bf16 natively ({name}, sm {major}.{minor})")
    return Choice("fp16", f"fp16 autocast with a grad scaler: this GPU has no native bf16 ({name}, sm {major}.{minor})")


@functools.cache
def cpu_bf16_feature() -> str | None:
    """The CPU feature that gives native bf16 matmuls (e.g. ``"amx_bf16"``), or None. Cached."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX"):
        return None  # torch was built or runs without vector kernels: its bf16 paths are scalar
    flags = cpu_flags()
    return next((feature for feature in CPU_BF16_FEATURES if feature in flags), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo on Linux, sysctl on macOS (lower case); empty if unknown."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 and Arm spellings
                    return set(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return set()
        return {"bf16"} if out.stdout.strip() == "1" else set()
    return set()


@functools.cache
def cpu_bf16_time_ratio(rounds: int = 8) -> float:
    """bf16 matmul time over fp32's on this CPU (lower is faster), from the best of ``rounds``. Cached.

    A decoder-sized product (512 x 576 @ 576 x 1536, about 1 GFLOP, ~3 ms in fp32 on two
    cores); the two dtypes alternate so a busy machine slows both alike, and the minimum
    ignores rounds that lost the CPU to other work. Takes well under a second.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(512, 576, generator=generator)
    b = torch.randn(576, 1536, generator=generator)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for round_index in range(rounds + 2):  # the first two rounds warm up the kernels
        for dtype, (x, y) in pairs.items():
            start = time.perf_counter()
            torch.mm(x, y)
            elapsed = time.perf_counter() - start
            if round_index >= 2:
                best[dtype] = min(best[dtype], elapsed)
    return best[torch.bfloat16] / best[torch.float32]


# ---------------------------------------------------------------- frozen weights held in bf16


def hold_frozen_weights_in_bf16(model: nn.Module, choice: Choice) -> Callable[[], None]:
    """Under bf16 autocast, keep frozen linear weights in bf16 for the run; returns the exact undo.

    Autocast caches its bf16 casts only for weights that require grad, so every frozen base
    weight is cast again in every forward, and the cast copy is kept for the backward: a
    pass over all the weights and 2 more bytes per weight alive at the peak, every step.
    Instead each frozen weight's own 4 bytes are rewritten, in place, as its bf16 value
    (rounded to nearest, ties away from zero) followed by a 16-bit remainder, so that::

        fp32 bits = (bf16 bits << 16) + remainder      (remainder in [-2^15, 2^15))

    The module computes with the bf16 half (what autocast would have cast it to) and the
    undo puts the exact fp32 bits back: no byte more than the fp32 weights, and no copy of
    them. Outside bf16 autocast (e.g. a ``metrics=`` function) a held layer rebuilds its
    exact fp32 weight for the call. Only weights of plain ``nn.Linear`` layers that nothing
    else shares (a tied embedding keeps fp32) are held, and only under adapter layers whose
    forward calls the base layer without reading its weight (``reads_base_weight = False``).
    """
    if choice.autocast_dtype is not torch.bfloat16:
        return lambda: None
    held: list[tuple[nn.Linear, nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def undo() -> None:
        with torch.no_grad():
            while held:
                module, weight, fp32, remainder = held.pop()
                del module.forward
                _join_into(weight.data, remainder, fp32)
                weight.data = fp32

    try:
        with torch.no_grad():
            for module in _holdable_linears(model):
                weight = module.weight
                fp32 = weight.data
                high, remainder = _split_in_place(fp32)
                weight.data = high
                module.forward = _held_forward(module, remainder)
                held.append((module, weight, fp32, remainder))
    except BaseException:  # e.g. interrupted half-way: put back what was held
        undo()
        raise
    return undo


def _holdable_linears(model: nn.Module) -> list[nn.Linear]:
    readers = {id(innermost(layer)) for layer in model.modules()
               if isinstance(layer, AdapterLayer) and layer.reads_base_weight}
    owners: dict[int, list[nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(module)
    chosen, seen = [], set()
    for module in model.modules():
        weight = getattr(module, "weight", None) if type(module) is nn.Linear else None
        if weight is None or id(module) in seen or id(module) in readers or "forward" in vars(module):
            continue
        seen.add(id(module))
        if (weight.requires_grad or weight.dtype != torch.float32 or weight.is_meta or not weight.is_contiguous()
                or type(weight.data) is not torch.Tensor or any(m is not module for m in owners.get(id(weight), []))
                or not bool(torch.isfinite(weight.sum()))):  # a NaN's bits would not round (one read, no copy)
            continue
        chosen.append(module)
    return chosen


def _split_in_place(fp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite ``fp32``'s bytes as its bf16 value then the remainder; returns views of both halves.

    Adding 2^15 to the bits leaves the rounded bf16 value in the high 16 bits of each weight
    and the remainder plus 2^15 in the low ones; the halves are then gathered apart: a few
    passes over the weight's bytes, instead of a dozen of int32 arithmetic.
    """
    n = fp32.numel()
    fp32.view(torch.int32).add_(0x8000)  # round to nearest, ties away from zero: |remainder| <= 2^15
    high, low = _interleaved(fp32)
    remainder = low.clone().bitwise_xor_(-0x8000)  # low - 2^15, as 16 bits
    halves = fp32.view(torch.int16).view(-1)
    halves[:n] = high.clone()
    halves[n:] = remainder
    return halves[:n].view(torch.bfloat16).view(fp32.shape), halves[n:]


def _interleaved(fp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the high and the low 16 bits of each 32-bit word of ``fp32`` (little-endian order)."""
    pairs = fp32.view(torch.int16).view(-1, 2)
    return (pairs[:, 1], pairs[:, 0]) if sys.byteorder == "little" else (pairs[:, 0], pairs[:, 1])


def _joined(high: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The exact fp32 weight from its bf16 value and remainder."""
    bits = (high.reshape(-1).view(torch.int16).to(torch.int32) << 16) + remainder.to(torch.int32)
    return bits.view(torch.float32).view(high.shape)


def _join_into(high: torch.Tensor, remainder: torch.Tensor, fp32: torch.Tensor) -> None:
    """The exact fp32 weight back into ``fp32``, whose bytes hold ``high`` then ``remainder``: the split undone."""
    low = remainder.clone().bitwise_xor_(-0x8000)
    high = high.reshape(-1).view(torch.int16).clone()
    word_high, word_low = _interleaved(fp32)
    word_high.copy_(high)
    word_low.copy_(low)
    fp32.view(torch.int32).sub_(0x8000)


def _held_forward(module: nn.Linear, remainder: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        kind = weight.device.type
        if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16):
            weight = _joined(weight, remainder)
        return F.linear(x, weight, module.bias)

    return forward
