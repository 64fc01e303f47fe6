"""Regional compilation: the repeated decoder block compiled once, and when compiling pays off.

A run that compiled leaves nothing compiled behind: its blocks run eagerly again and dynamo's
cache entries for the code it compiled are dropped (:func:`drop_new_caches`). Those entries hold
the run's graphs and guards, which refer to the adapters of that run; a kernel that trains one
adapter after another would otherwise keep them all and pile up recompiles of the same block
until dynamo's recompile limit (8 per code object) turns compiling off with a warning.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# "auto" compiles once two eager steps show the run is long enough to pay the compile back:
# estimated saving (this fraction of a step, every remaining step) > estimated compile time.
# Measured on smollm2-135m, 2 CPU cores: compiled steps 10-13% faster; a cold compile 17 s,
# one from torch's on-disk cache 2 s. GPU figures are conservative guesses until measured.
COMPILE_SAVING = {"cpu": 0.10, "cuda": 0.20}
COMPILE_SECONDS = {"cpu": 20.0, "cuda": 60.0}
# Compiling is single-threaded Python (dynamo) and a C++ compiler: on a slower or busier machine it
# takes longer in the same proportion as the eager steps do. COMPILE_SECONDS holds where
# speed_probe() takes PROBE_SECONDS; the estimate scales by the probe's time measured beside the steps.
# Measured side by side on 2 EPYC cores at load average 20-23: a cold compile of smollm2-135m's
# block took about 80 s (a 112 s first step, eager steps 14-58 s) while the probe took 0.029-0.064 s
# (median 0.041), so 20 s goes with about 0.010 s (benchmarks/compile_probe.py;
# one run under load, so a rough figure).
PROBE_SECONDS = 0.010


def speed_probe() -> float:
    """Seconds this machine takes, now, for a fixed piece of interpreter work (as a compile's tracing is)."""
    started = time.perf_counter()
    total = 0
    for i in range(300_000):
        total += (i * 7) % 13
    return time.perf_counter() - started


def compile_pays_off(device: torch.device, step_seconds: float, steps_left: int, slowness: float = 1.0) -> bool:
    """Whether compiling now likely saves more time over the remaining steps than it costs.

    ``slowness``: how much slower than the reference machine this one is now
    (``speed_probe() / PROBE_SECONDS``); it scales the compile's cost as it scales the steps, so
    a busy machine's slow steps do not make a short run look worth compiling.
    """
    saving = COMPILE_SAVING.get(device.type, 0.0) * step_seconds * steps_left
    return saving > COMPILE_SECONDS.get(device.type, float("inf")) * max(slowness, 1.0)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the longest ``nn.ModuleList`` whose entries all share one class (the decoder layers)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len(module) > 1:
            if len({type(block) for block in module}) == 1:
                best = list(module)
    return best


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile's default backend can build kernels here (a C++ compiler on CPU, Triton on CUDA)."""
    import importlib.util
    import shutil

    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return False


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile each repeated block in place (one compiled graph serves every block); returns them.

    Compiling the block rather than the whole model keeps the compile time to one block's,
    and leaves the model's own forward, the loss and the adapters' Python untouched.
    """
    blocks = [block for block in repeated_blocks(model) if block._compiled_call_impl is None]
    for block in blocks:
        block.compile()
    return blocks


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    """Undo :func:`compile_blocks`: the blocks run eagerly again (e.g. for generation)."""
    for block in blocks:
        block._compiled_call_impl = None


def _seen_codes() -> list:
    """The code objects dynamo has been asked to compile in this process (alive ones)."""
    try:
        from torch._dynamo import convert_frame
    except ImportError:
        return []
    tracker = getattr(convert_frame, "input_codes", None)
    return [code for code in (ref() for ref in getattr(tracker, "seen", ())) if code is not None]


def _entries(code) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


def cache_snapshot() -> set[int]:
    """The code objects that hold compiled entries now (their ids), for :func:`drop_new_caches` to leave alone."""
    return {id(code) for code in _seen_codes() if _entries(code)}


def new_cache_entries(before: set[int]) -> dict:
    """Code objects compiled since ``before`` (:func:`cache_snapshot`), each with its number of compiled entries."""
    return {code: count for code in _seen_codes() if id(code) not in before and (count := _entries(code))}


def drop_new_caches(before: set[int]) -> int:
    """Drop dynamo's compiled entries of the code compiled since ``before``: its graphs, guards and what they hold.

    The next compile of the same code starts afresh, under dynamo's recompile limit again.
    Code that held entries before (compiled by the user) is left alone. Returns how many code objects.
    """
    from torch._dynamo.eval_frame import reset_code

    codes = list(new_cache_entries(before))
    for code in codes:
        reset_code(code)
    return len(codes)


def recompile_limit() -> int:
    """How many compiled entries dynamo keeps per code object before it runs that code eagerly."""
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def near_recompile_limit(before: set[int]) -> bool:
    """Whether code compiled since ``before`` has one entry left before dynamo's recompile limit."""
    return any(count >= recompile_limit() - 1 for count in new_cache_entries(before).values())


