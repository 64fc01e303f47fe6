"""Memory that fits itself: the micro-batch that fits, a step retried smaller after running out, memory given back.

A step's effective batch is split into micro-batches whose gradients add up (the loss of
each micro-batch weighted by its share of the rows), so the micro-batch size changes how
much memory a step needs, never what it computes.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.batches import PAD_MULTIPLE, collate, collate_packed, pack

__all__ = ["Released", "fit_micro_batch", "is_out_of_memory", "release", "split_batch"]

# CPU: no out-of-memory error to back off from (the kernel kills the process), so the
# micro-batch is chosen from an estimate: this share of the free RAM, each example costing
# its measured saved activations times ACTIVATION_OVERHEAD (backward's own buffers on top).
# Measured on SmolLM2-135M, LoRA r=8, 80-token rows: a step's peak resident set grows by
# 1.4-1.5x the saved activations an example (benchmarks/memfit_auto.py); 1.75 leaves a margin.
FREE_SHARE = 0.6
ACTIVATION_OVERHEAD = 1.75


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's (``torch.OutOfMemoryError``, also ``torch.cuda.OutOfMemoryError``), MPS's and the CPU allocator's."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "MPS backend out of memory" in text)


def rows_of(batch: dict[str, Any]) -> int:
    """The examples in a batch: the first dimension of its token ids, else of its first tensor."""
    first = batch.get("input_ids")
    if not isinstance(first, torch.Tensor):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 1


def split_batch(batch: dict[str, Any], micro: int | None) -> list[tuple[dict[str, Any], float]]:
    """``batch`` as micro-batches of at most ``micro`` rows, each with its share of the rows.

    Each micro-batch drops the padding columns it does not need (kept to a multiple of the
    padding unit, as ``data.collate`` would have made it), so it is the batch those rows
    would have formed on their own.
    """
    rows = rows_of(batch)
    if micro is None or rows <= micro:
        return [(batch, 1.0)]
    parts = []
    for start in range(0, rows, micro):
        part = {k: v[start:start + micro] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
                for k, v in batch.items()}
        parts.append((_trim_padding(part), min(micro, rows - start) / rows))
    return parts


def _trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return batch
    width = mask.shape[1]
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else width
    keep = min(width, -(-used // PAD_MULTIPLE) * PAD_MULTIPLE)
    if keep == width:
        return batch
    return {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == width else v
            for k, v in batch.items()}


def divisors(n: int) -> list[int]:
    """Micro-batch sizes that split ``n`` evenly, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def probe_batch(batches: Any, rows: int) -> dict[str, torch.Tensor]:
    """``rows`` copies of the widest row the data will form: the longest example, or the fullest packed row."""
    if batches.packing:
        widest = max(pack(batches.examples, batches.max_length), key=lambda row: sum(len(e["input_ids"]) for e in row))
        return collate_packed([widest] * rows, batches.pad_id)
    longest = max(batches.examples, key=lambda e: len(e["input_ids"]))
    return collate([longest] * rows, batches.pad_id, PAD_MULTIPLE, batches.max_length)


def free_ram() -> int:
    """Bytes this process can still take: the system's available memory, or its container's limit if lower."""
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        free = _meminfo_available()
    try:  # a cgroup v2 limit (containers, notebook servers) is often far below the machine's memory
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - current)
    except (OSError, ValueError):
        pass
    return max(free, 0)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], loss_of: Callable[[dict], torch.Tensor],
                           autocast: Any) -> int:
    """Bytes the forward pass of ``batch`` keeps for backward (tensors saved by autograd, weights not counted)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return tensor
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
        loss = loss_of(batch)
    del loss
    return sum(saved.values())


def fit_micro_batch(model: nn.Module, batches: Any, effective: int, dev: torch.device, params: list[nn.Parameter],
                    loss_of: Callable[[dict], torch.Tensor], autocast: Any) -> tuple[int, str]:
    """The largest micro-batch that divides ``effective`` and fits, and one line on how it was found.

    CUDA: a forward and backward of the data's widest row at each size, largest first, backing
    off on out-of-memory, with the optimizer's state (allocated at the first step) held aside.
    Elsewhere: free RAM over the activations one example is measured to keep for backward.
    """
    start, was_training = time.perf_counter(), model.training
    optimizer_bytes = 2 * sum(p.numel() * p.element_size() for p in params)  # AdamW: two moments a parameter
    model.train()  # dropout and gradient checkpointing as in training
    # the probe's dropout draws random numbers: the run's stream stays the one a given batch size gets
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if dev.type == "cuda":
            micro = _try_on_cuda(model, batches, effective, dev, optimizer_bytes, loss_of, autocast)
            how = "the largest that ran a forward and backward of the widest row"
        else:
            per_example = saved_activation_bytes(model, {k: v.to(dev) for k, v in probe_batch(batches, 1).items()},
                                                 loss_of, autocast)
            gradient_bytes = sum(p.numel() * p.element_size() for p in params)
            budget = FREE_SHARE * free_ram() - optimizer_bytes - gradient_bytes
            fits = int(budget // max(per_example * ACTIVATION_OVERHEAD, 1))
            micro = next((d for d in divisors(effective) if d <= fits), 1)
            how = (f"{_gb(free_ram())} free RAM, {_gb(per_example * ACTIVATION_OVERHEAD)} an example"
                   + ("" if fits >= 1 else "; even one may not fit"))
    model.train(was_training)
    return micro, f"batch_size='auto': {how}, probed in {time.perf_counter() - start:.1f} s"


def _try_on_cuda(model: nn.Module, batches: Any, effective: int, dev: torch.device, optimizer_bytes: int,
                 loss_of: Callable[[dict], torch.Tensor], autocast: Any) -> int:
    for micro in divisors(effective):
        ran_out = False
        try:
            held = torch.empty(optimizer_bytes, dtype=torch.uint8, device=dev)
            with autocast:
                loss = loss_of({k: v.to(dev) for k, v in probe_batch(batches, micro).items()})
            loss.backward()
        except Exception as err:  # noqa: BLE001 (only running out of memory is an answer; the rest is raised)
            if not is_out_of_memory(err):
                raise
            ran_out = True
        held = loss = None  # noqa: F841 (let the allocator have them back)
        model.zero_grad(set_to_none=True)
        if not ran_out:
            return micro
        torch.cuda.empty_cache()  # outside the except: the failed try's tensors are unreachable now
    return 1


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.0f} MB"


# ---------------------------------------------------------------- giving memory back


@dataclass
class Released:
    """What ``release`` freed: bytes before and after (CUDA: allocated and reserved; else the resident set)."""

    device: str
    before: int
    after: int
    reserved_before: int = 0
    reserved_after: int = 0

    @property
    def freed(self) -> int:
        return self.before - self.after

    def __repr__(self) -> str:
        if self.device == "cuda":
            return (f"released: CUDA allocated {_gb(self.before)} -> {_gb(self.after)}, "
                    f"reserved {_gb(self.reserved_before)} -> {_gb(self.reserved_after)}")
        return f"released: resident memory {_gb(self.before)} -> {_gb(self.after)} (freed {_gb(max(self.freed, 0))})"


def resident_bytes() -> int:
    """The process's resident set now (not its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def release(model: nn.Module | None = None) -> Released:
    """Give back the memory a finished or failed run still holds, so the next cell can train again.

    Drops the model's gradients, the local variables of the frames in the last error's
    traceback (a failed run's optimizer, batches and activations live there; the traceback
    itself stays, without its variables), then collects garbage and returns cached memory:
    CUDA's cache, or glibc's free heap. Weights, adapters and the device the model is on
    are left as they are.
    """
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    before = torch.cuda.memory_allocated() if on_cuda else resident_bytes()
    reserved_before = torch.cuda.memory_reserved() if on_cuda else 0
    if model is not None:
        for param in model.parameters():
            param.grad = None
    _clear_frames(getattr(sys, "last_traceback", None))
    for name in ("last_exc", "last_value"):
        _clear_traceback(getattr(sys, name, None))
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        return Released("cuda", before, torch.cuda.memory_allocated(), reserved_before, torch.cuda.memory_reserved())
    trim_heap()
    return Released("cpu", before, resident_bytes())


def _clear_traceback(err: BaseException | None) -> None:
    """Drop the local variables of an exception's frames (and of the exceptions it chains), except module-level ones."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        _clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def _clear_frames(tb: types.TracebackType | None) -> None:
    while tb is not None:
        if tb.tb_frame.f_code.co_name != "<module>":  # a cell's frame: its variables are the notebook's
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # still running (the kernel's own frames)
                pass
        tb = tb.tb_next


# ---------------------------------------------------------------- the CPU allocator between steps

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit; its own dynamic threshold tops out here
_AFTER_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD_MAX  # where glibc's dynamic trim threshold would settle


def _glibc() -> Any | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Hand glibc's free heap back to the kernel, so the resident set shrinks to what is in use (no-op without glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def steady_allocator(device: torch.device) -> Callable[[], None]:
    """Keep freed CPU memory in the process between training steps; returns the undo.

    By default glibc hands large freed blocks back to the kernel, so every step's
    activations arrive as fresh pages that fault in one at a time: 15,000-35,000 page faults
    per step for smollm2-135m at 4 x 128 tokens, 2-3% of the step. During training the heap
    keeps what it frees (requests up to 32 MiB come from it, freed memory is not trimmed) and
    the next step reuses the same, already mapped pages; the peak is the same working set.
    The undo returns the free memory to the kernel and leaves glibc's thresholds where its
    own dynamic adjustment would have settled. Does nothing off CPU or without glibc.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        return lambda: None
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)

    def undo() -> None:
        libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)

    return undo
