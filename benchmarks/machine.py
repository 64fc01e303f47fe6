"""The machine a benchmark run measures: CPU model, cores, native bf16 or not, torch, load average, date.

Printed first by ``make bench`` so that every figure after it can be labelled with its machine.
``ATEN_CPU_CAPABILITY=avx2`` in the environment makes torch run as on an AVX2-only CPU (said here).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbpeft.training.precision import choose  # noqa: E402


def main() -> None:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                "unknown CPU")
    choice = choose(torch.device("cpu"), "auto")
    bf16 = "native bf16" if choice.autocast_dtype == torch.bfloat16 else "no native bf16"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    print(f"machine: {name}, {os.cpu_count()} cores, {bf16} ({choice.reason}), torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}" + (f" (forced: ATEN_CPU_CAPABILITY={forced})" if forced else ""))
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
