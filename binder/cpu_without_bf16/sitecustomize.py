"""Makes this machine pass for an AVX2-only CPU (no AVX-512, no native bf16) in the processes that import it.

``binder/check.py --avx2`` puts this folder on the notebook kernels' ``PYTHONPATH``, next to
``ATEN_CPU_CAPABILITY=avx2`` (torch's kernels and inductor's code generation),
``ONEDNN_MAX_CPU_ISA=AVX2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (the matmul libraries).
nbpeft decides on bf16 from the CPU's flags in /proc/cpuinfo, which no variable changes:
here ``nbpeft.training.precision.cpu_flags`` loses every AVX-512, AMX and bf16 flag as the
module is imported, so ``precision="auto"`` takes fp32, as it does on such a CPU.
"""

import importlib.abc
import sys

MODULE = "nbpeft.training.precision"


def _without_wide_flags(cpu_flags):
    def flags():
        return {f for f in cpu_flags() if not f.startswith(("avx512", "amx")) and "bf16" not in f}

    return flags


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.cpu_flags = _without_wide_flags(module.cpu_flags)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
