"""Build the environment Binder builds from binder/, then run every notebook in it as Binder would.

repo2docker makes a fresh Python (``runtime.txt``), installs ``binder/requirements.txt``
into it beside its own Jupyter server, runs ``binder/postBuild`` from the repository root and
starts the notebooks with ``HOME`` at the image's home. This does the same with a venv
(``.binder-env/``) and a home of its own (``.binder-home/``), then executes each notebook
with ``jupyter nbconvert --execute`` inside a memory cgroup capped at mybinder.org's 2 GiB
(where the machine lets one be made), and prints per notebook its time, the cgroup's peak
and the largest process's peak resident set. A kernel that dies leaves its faulthandler
traceback (``PYTHONFAULTHANDLER=1``) in the notebook's log, and that part is printed.

``--avx2`` runs the kernels as on an AVX2-only CPU without native bf16 (many of mybinder.org's
machines): torch's kernels, the code inductor compiles, the matmul libraries, numpy and Arrow
limited to AVX2, and nbpeft's precision choice shown the CPU flags without AVX-512
(``binder/cpu_without_bf16/``); :func:`avx2_only_env` lists the variables.

Standard library only: it runs under any Python 3, and builds with the one runtime.txt names.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
# What repo2docker's own environment brings and binder/requirements.txt therefore leaves out:
# the notebook server's side that executes notebooks (nbconvert, and the kernel).
JUPYTER = ["nbconvert", "ipykernel"]
MIB = 1 << 20
# The first line of a faulthandler report, and of the other ways a kernel announces its death.
CRASH = re.compile(r"Fatal Python error|Segmentation fault|Aborted|terminate called|Illegal instruction|DeadKernelError")


def python_for_runtime() -> str:
    """The interpreter runtime.txt asks for (``python-3.11`` -> ``python3.11``), else this one."""
    wanted = (BINDER / "runtime.txt").read_text().strip() if (BINDER / "runtime.txt").exists() else ""
    version = wanted.removeprefix("python-")
    return (shutil.which(f"python{version}") or sys.executable) if version else sys.executable


def recipe_hash() -> str:
    """What the environment is built from: binder/'s build files and the package's declared dependencies."""
    digest = hashlib.sha256()
    for name in ("runtime.txt", "requirements.txt", "postBuild"):
        path = BINDER / name
        digest.update(path.read_bytes() if path.exists() else b"")
    digest.update((ROOT / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def kernel_profile(folder: Path) -> Path:
    """An IPython folder whose kernels leave the process's stderr (the notebook's log) alone; returns it.

    ipykernel by default points file descriptor 2 at a pipe it forwards to the notebook, so the
    report faulthandler writes when the kernel crashes goes into that pipe, whose reader died with
    the kernel, and is lost. With ``capture_fd_output`` off the report lands in the log.
    """
    profile = folder / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_kernel_config.py").write_text(
        "# binder/check.py: crash reports (faulthandler) go to the log, not into the kernel's own pipe\n"
        "c.IPKernelApp.capture_fd_output = False\n")
    return folder


def avx2_only_env() -> dict[str, str]:
    """The variables that hold every library a kernel runs to AVX2, as on a CPU without AVX-512 or native bf16.

    torch's own kernels (``ATEN_CPU_CAPABILITY``); the C++ inductor compiles for torch.compile
    (``TORCHINDUCTOR_CPP_MARCH``: without it g++ gets ``-march=native`` and emits AVX-512 code
    on this machine even where inductor picked AVX2 vectors); oneDNN and MKL (the matmuls);
    numpy's dispatched loops and its OpenBLAS; Arrow (datasets' tables); and nbpeft's view of
    the CPU flags (``binder/cpu_without_bf16/``), so ``precision="auto"`` takes fp32.
    """
    env = {"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell", "ARROW_USER_SIMD_LEVEL": "AVX2",
           "PYTHONPATH": str(BINDER / "cpu_without_bf16")}
    if "avx512f" in _cpu_flags():  # numpy refuses to disable features the CPU lacks
        env["NPY_DISABLE_CPU_FEATURES"] = "X86_V4 AVX512_ICL AVX512_SPR"
    return env


def run(cmd: list[str], env: dict[str, str], log: Path, what: str) -> None:
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"binder-check: {what} failed (exit {done.returncode}); see {log}")
    print(f"  {what}: {time.perf_counter() - start:.0f} s", flush=True)


def build(env_dir: Path, home: Path, base_env: dict[str, str], reuse: bool, log: Path) -> None:
    """A fresh venv with binder/requirements.txt, Jupyter's part, and postBuild run with HOME at ``home``."""
    stamp = env_dir / ".binder-recipe"
    python = env_dir / "bin" / "python"
    if reuse and stamp.exists() and stamp.read_text() == recipe_hash():
        # same recipe: only the package itself is installed anew, so the check runs the current source
        print(f"reusing {env_dir} (binder/ and pyproject.toml unchanged); reinstalling nbpeft", flush=True)
        run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps", "--force-reinstall", "."],
            base_env, log, "pip install . (nbpeft only)")
        return
    print(f"building {env_dir} as Binder does (log: {log})", flush=True)
    for folder in (env_dir, home):
        shutil.rmtree(folder, ignore_errors=True)
    home.mkdir(parents=True)
    run([python_for_runtime(), "-m", "venv", str(env_dir)], base_env, log, "venv")
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], base_env, log, "pip upgrade")
    # one retry: where requirements.txt's extra index cannot be reached, pip's default five retries with
    # back-off for every package add many minutes and change nothing in what gets installed
    run([str(python), "-m", "pip", "install", "--no-cache-dir", "--retries", "1", "-r", "binder/requirements.txt"],
        base_env, log, "pip install -r binder/requirements.txt")
    run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", *JUPYTER], base_env, log, "Jupyter's part")
    run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], base_env, log, "kernel spec")
    run(["bash", str(BINDER / "postBuild")], base_env, log, "postBuild")
    stamp.write_text(recipe_hash())


class MemoryCgroup:
    """A memory cgroup capped at ``limit`` bytes (cgroup v2, else v1's memory controller), or None where none can be made."""

    def __init__(self, path: Path, v2: bool):
        self.path, self.v2 = path, v2

    @classmethod
    def make(cls, name: str, limit: int) -> MemoryCgroup | None:
        for base, v2 in ((Path("/sys/fs/cgroup"), True), (Path("/sys/fs/cgroup/memory"), False)):
            if v2 and not (base / "cgroup.controllers").exists():
                continue
            if not v2 and not (base / "memory.limit_in_bytes").exists():
                continue
            path = base / name
            try:
                if v2:
                    controllers = (base / "cgroup.subtree_control").read_text().split()
                    if "memory" not in controllers:
                        (base / "cgroup.subtree_control").write_text("+memory")
                if path.exists():
                    path.rmdir()
                path.mkdir()
                (path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
                if v2 and (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")  # mybinder.org's pods have no swap either
            except OSError as err:
                print(f"  no memory cgroup under {base}: {err}", flush=True)
                continue
            return cls(path, v2)
        return None

    def enter(self) -> None:
        """Move the calling process (a child about to exec) into the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        """Peak usage (v1's includes the page cache, as v2's memory.peak does)."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def hit_limit(self) -> int:
        """How often the cap was reached (v1's failcnt; v2's ``max`` and ``oom_kill`` events)."""
        try:
            if not self.v2:
                return int((self.path / "memory.failcnt").read_text())
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("max", 0)) + int(events.get("oom_kill", 0))
        except (OSError, ValueError):
            return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def evict_page_cache(folders: list[Path]) -> int:
    """Drop the files under ``folders`` from the page cache; returns the bytes asked to go.

    A cgroup is charged for a page of a file by the first process that reads it. The build
    (postBuild's model conversion, pip's installs) reads and writes the environment's files
    outside the notebook's cgroup, so without this a kernel's torch libraries and model file
    would not count against its cap, while in a Binder container, started on a machine that
    never read them, they do. Clean pages nobody maps go; the kernel reads them back, charged.
    """
    asked = 0
    for folder in folders:
        for path in folder.rglob("*"):
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                with path.open("rb") as handle:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                asked += path.stat().st_size
            except OSError:
                continue
    return asked


def run_notebook(notebook: Path, env: dict[str, str], out_dir: Path, limit: int, timeout: int) -> dict:
    log = out_dir / f"{notebook.stem}.log"
    os.sync()  # written pages (postBuild's model file) must be clean to leave the cache
    evict_page_cache([Path(env["VIRTUAL_ENV"]), Path(env["HOME"])])
    cgroup = MemoryCgroup.make(f"nbpeft-binder-check-{os.getpid()}", limit) if limit else None
    cmd = [str(Path(env["VIRTUAL_ENV"]) / "bin" / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
           f"--ExecutePreprocessor.timeout={timeout}", "--output-dir", str(out_dir), str(notebook)]
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=cgroup.enter if cgroup else None)
        # wait4: the child's resource use includes the kernel process it started and waited for,
        # so ru_maxrss is the largest resident set among them (Linux reports it in KiB)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    result = {"name": notebook.stem, "ok": os.waitstatus_to_exitcode(status) == 0, "seconds": seconds,
              "rss_peak": usage.ru_maxrss * 1024, "cgroup_peak": cgroup.peak() if cgroup else None,
              "hit_limit": cgroup.hit_limit() if cgroup else None, "log": log}
    if cgroup:
        cgroup.remove()
    return result


def crash_report(log: Path, lines: int = 80) -> str:
    """The log from the first sign of a crash (faulthandler's report), else its last lines."""
    text = log.read_text(errors="replace").splitlines()
    first = next((i for i, line in enumerate(text) if CRASH.search(line)), max(len(text) - lines, 0))
    return "\n".join(text[first:first + lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook names or stems (default: all in notebooks/)")
    parser.add_argument("--env", type=Path, default=ROOT / ".binder-env", help="the venv to build (default .binder-env)")
    parser.add_argument("--home", type=Path, default=ROOT / ".binder-home", help="the image's HOME (default .binder-home)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep an environment built from the same binder/ files, reinstalling only nbpeft")
    parser.add_argument("--memory", default="2G", help="the cgroup's cap (default 2G, mybinder.org's); 0: none")
    parser.add_argument("--avx2", action="store_true", help="run the kernels as on an AVX2-only CPU without native bf16")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a cell may take (default 1800)")
    args = parser.parse_args()

    env_dir, home = args.env.resolve(), args.home.resolve()
    out_dir = ROOT / "artifacts" / "binder-check"
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = _bytes(args.memory)
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    base_env.update(HOME=str(home), VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{base_env['PATH']}")
    for name in ("NBPEFT_CACHE", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "JUPYTER_PATH", "JUPYTER_DATA_DIR"):
        base_env.pop(name, None)  # caches and kernels are found from HOME and the venv, as in the image

    build(env_dir, home, base_env, args.reuse, out_dir / "build.log")

    env = dict(base_env, PYTHONFAULTHANDLER="1", IPYTHONDIR=str(kernel_profile(out_dir / "ipython")))
    if args.avx2:
        env.update(avx2_only_env())
    chosen = [nb for nb in NOTEBOOKS if not args.notebooks or nb.name in args.notebooks or nb.stem in args.notebooks]
    print(f"CPU: {_cpu_name()}{'; kernels limited to AVX2, no native bf16 (--avx2)' if args.avx2 else ''}")
    print(f"memory cap: {_mib(limit) + ' (cgroup)' if limit else 'none'}; logs and executed notebooks in {out_dir}")
    print(f"{'notebook':22} {'result':8} {'time':>7} {'cgroup peak':>12} {'process peak':>13}", flush=True)
    results = []
    for notebook in chosen:
        result = run_notebook(notebook, env, out_dir, limit, args.timeout)
        results.append(result)
        peak = _mib(result["cgroup_peak"]) if result["cgroup_peak"] is not None else "no cgroup"
        hit = f"  (cap reached {result['hit_limit']}x)" if result["hit_limit"] else ""
        print(f"{result['name']:22} {'ok' if result['ok'] else 'FAILED':8} {result['seconds']:6.0f}s "
              f"{peak:>12} {_mib(result['rss_peak']):>13}{hit}", flush=True)
        if not result["ok"]:
            print(f"--- {result['log']}:\n{crash_report(result['log'])}\n---", flush=True)
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / MIB:,.0f} MiB"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    except OSError:
        return set()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        name = "unknown"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing kernel leaves its traceback, not a core file
    sys.exit(main())
