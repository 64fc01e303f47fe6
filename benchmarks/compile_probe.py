"""What compiling costs next to the speed probe that scales its estimate (``compiling.PROBE_SECONDS``).

Workload: the bundled SmolLM2-135M with LoRA r=8, the bundled pirate chat data, 2 x 80 tokens,
4 eager steps, then 4 steps with ``compile=True`` from an empty inductor cache (a cold compile:
the first compiled step's time over an eager step's is the compile). The probe runs three times
before and three times after, so the load's drift shows. ``PROBE_SECONDS`` is the probe's time
scaled to a 20 s compile (``COMPILE_SECONDS["cpu"]``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/compile_probe.py
"""

from __future__ import annotations

import os
import statistics
import tempfile

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # before torch: a cold compile

import nbpeft  # noqa: E402
import nbpeft.datasets  # noqa: E402
from nbpeft.training import compiling  # noqa: E402


def main() -> None:
    probes = [compiling.speed_probe() for _ in range(3)]
    model, _ = nbpeft.load_model("smollm2-135m")
    data = nbpeft.datasets.load_dataset("pirate_chat")
    nbpeft.attach(model, "lora", r=8)
    steps = {}
    for compile in (False, True):
        result = nbpeft.train(model, data, steps=4, batch_size=2, max_length=80, lr=1e-3, live=False, compile=compile)
        steps[compile] = [row["step_time_s"] for row in result.history]
    probes += [compiling.speed_probe() for _ in range(3)]
    compile_s = steps[True][0] - statistics.median(steps[False])
    probe = statistics.median(probes)
    print(f"eager steps {[round(s, 1) for s in steps[False]]} s; compiled {[round(s, 1) for s in steps[True]]} s")
    print(f"probe {[round(p, 3) for p in probes]} s (median {probe:.3f}); compile about {compile_s:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"PROBE_SECONDS for a {compiling.COMPILE_SECONDS['cpu']:.0f} s compile: "
          f"{probe * compiling.COMPILE_SECONDS['cpu'] / compile_s:.4f}")


if __name__ == "__main__":
    main()
