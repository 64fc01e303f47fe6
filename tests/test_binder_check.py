"""binder/check.py's --avx2 variables: a process started with them runs as on a CPU without AVX-512 or native bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "binder"))
import check  # noqa: E402  (binder/check.py: standard library only, a script rather than a package)

PROBE = """
import json, numpy, torch
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
from torch._inductor import config, cpu_vec_isa
import nbpeft.training.precision as precision
print(json.dumps({
    "aten": torch.backends.cpu.get_cpu_capability(),
    "inductor_isa": str(cpu_vec_isa.pick_vec_isa()),
    "inductor_march": config.cpp.march,
    "numpy_wide": [f for f in __cpu_dispatch__ if f.startswith(("X86_V4", "AVX512")) and __cpu_features__.get(f)],
    "precision": precision.choose(torch.device("cpu")).name,
}))
"""


def _cpu_flags() -> set[str]:
    return check._cpu_flags()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or "avx2" not in _cpu_flags(), reason="needs an x86 Linux CPU with AVX2")
def test_avx2_env_holds_torch_inductor_numpy_and_precision_to_avx2():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | check.avx2_only_env()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{ROOT}"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["aten"] == "AVX2"
    assert seen["inductor_isa"] == "avx2"
    assert seen["inductor_march"] == "x86-64-v3"  # g++ gets -march=x86-64-v3, not this machine's -march=native
    assert seen["numpy_wide"] == []
    assert seen["precision"] == "fp32"


def test_cpu_flags_reads_this_machine():
    flags = check._cpu_flags()
    assert isinstance(flags, set)
    if sys.platform.startswith("linux") and Path("/proc/cpuinfo").exists():
        with open("/proc/cpuinfo") as info:
            assert ("avx2" in flags) == (" avx2" in info.read())


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "jupyter").exists(), reason="needs jupyter nbconvert in this environment")
def test_a_crashing_kernel_leaves_its_faulthandler_report_in_the_log(tmp_path):
    import nbformat

    notebook = tmp_path / "crash.ipynb"
    cells = [nbformat.v4.new_code_cell("print('before')"), nbformat.v4.new_code_cell("import ctypes\nctypes.string_at(0)")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), notebook)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JUPYTER_PATH", "JUPYTER_DATA_DIR")}
    env.update(VIRTUAL_ENV=sys.prefix, HOME=str(tmp_path), PYTHONFAULTHANDLER="1",
               IPYTHONDIR=str(check.kernel_profile(tmp_path / "ipython")))
    result = check.run_notebook(notebook, env, tmp_path, limit=0, timeout=120)
    assert not result["ok"]
    report = check.crash_report(result["log"])
    assert report.startswith("Fatal Python error: Segmentation fault")
    assert "ctypes" in report  # the crashing cell's frame, not only the kernel's threads
