"""Multi-node jobs: the notebook's attach + train configuration, written as a script a cluster launcher runs.

``export_job(model, "job", data=rows, steps=100, batch_size=4)`` writes to ``job/``:

- ``train_job.py``: rebuilds the model from its name or path, loads the adapter as it is now
  (same method, options and weights), reads the data, calls ``nbpeft.train`` inside the
  process group the launcher set up, and rank 0 saves the trained adapter to ``job/adapter``;
- ``job.json`` (what to load, the train keywords), ``data.jsonl``, ``adapter_init/`` and
  ``tokenizer/``;
- ``accelerate_config.yaml`` and ``launch.sh``: the ``accelerate launch`` and ``torchrun``
  command lines, one per node (``--machine_rank`` / ``--node_rank``), with the rendezvous
  address and port. The accelerate config says MULTI_GPU, which accelerate starts through
  torchrun (its multi-CPU mode needs MPI); the script uses gloo where there is no GPU.

Each process trains on ``batch_size`` rows of every global batch (``batch_size`` × processes),
as ``train(..., processes=N)`` does in the notebook, so both give the same adapter.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import core
from ..data.batches import tokenizer_for
from ..errors import ConfigError
from ..formats import peft_folder as io
from ..formats.files import atomic_folder, check_free
from . import options as declared

__all__ = ["export_job"]

TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification", "SEQ_2_SEQ_LM": "seq2seq-lm",
         "TOKEN_CLS": "token-classification"}
# the job's launcher starts nodes × processes_per_node processes: processes= would say it twice
LAUNCHER_OPTIONS = ("processes",)
# export_job's own keywords, which a misspelt one may have meant
JOB_KEYWORDS = ("data", "tokenizer", "nodes", "processes_per_node", "address", "port", "overwrite")


def not_exported() -> list[str]:
    """The train options a job cannot carry: those whose values belong to this kernel (by their kind), and
    the launcher's own."""
    return [o.name for o in declared.OPTIONS if o.kernel_bound] + list(LAUNCHER_OPTIONS)


def _check_train_options(data: Any, train_options: dict[str, Any]) -> None:
    """train()'s keywords, checked as train() checks them (one line, did-you-mean); refused where they cannot travel."""
    known = declared.by_name()
    for name in train_options:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, *JOB_KEYWORDS], n=1)
            hint = f"; did you mean {close[0]}=?" if close else f"; train options are {', '.join(known)}"
            raise ConfigError(f"export_job(): unknown option {name}={train_options[name]!r}{hint}")
    declared.Settings.of("export_job()", {"data": data, **train_options})
    bound = sorted(k for k in train_options if k in not_exported() and declared.differs(train_options[k], known[k].default))
    if "processes" in bound:
        raise ConfigError("export_job(): processes= is the launcher's; give nodes= and processes_per_node= instead")
    if bound:
        raise ConfigError(f"export_job(): {', '.join(bound)}= cannot travel to a cluster job; drop it "
                          "(the job trains on data= and reports on rank 0)")

SCRIPT = '''"""Train the adapter exported from a notebook; run under torchrun or accelerate launch (see launch.sh)."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import nbpeft
import nbpeft.training.distributed

HERE = Path(__file__).resolve().parent


def main() -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")  # rank, world size, address: from the launcher
    rank = dist.get_rank()
    # set when a notebook started this job itself: rank 0 reports to it, every rank sends its error
    address = os.environ.get("NBPEFT_EVENTS")
    channel = nbpeft.training.distributed.Channel(address) if address else None
    try:
        job = json.loads((HERE / "job.json").read_text())
        model, tokenizer = nbpeft.load_model(job["base"], task=job["task"], dtype=job["dtype"], **job["load"])
        if (HERE / "tokenizer").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(HERE / "tokenizer")
        nbpeft.load_adapter(model, HERE / "adapter_init")
        nbpeft.set_adapter(model, job["active"])
        with open(HERE / "data.jsonl") as f:
            data = [json.loads(line) for line in f]
        live = nbpeft.training.distributed.Forward(channel, stop=channel) if channel and rank == 0 else rank == 0
        result = nbpeft.train(model, data, tokenizer=tokenizer, live=live, **job["train"])
        state = nbpeft.training.distributed.trainable_state(model) if channel and (rank == 0 or job["train"].get("shard")) else b""
        if rank == 0:
            nbpeft.save_adapter(model, HERE / "adapter", overwrite=True)
            print(result)
            print(f"adapter saved to {HERE / 'adapter'}")
            if channel:
                channel.put(("end", result, state))
    except BaseException as exc:
        if channel:
            kind = "ConfigError" if isinstance(exc, nbpeft.ConfigError) else type(exc).__name__
            channel.put(("error", rank, kind, nbpeft.errors.one_line(exc)))
        raise
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''


def export_job(model: nn.Module, directory: str | Path, *, data: Any, tokenizer: Any = None, nodes: int = 1,
               processes_per_node: int | None = None, address: str = "127.0.0.1", port: int = 29500,
               overwrite: bool = False, **train_options: Any) -> Path:
    """Write the model's adapter and a ``train(...)`` call as a job for ``torchrun`` / ``accelerate launch``.

    ``nodes`` machines × ``processes_per_node`` processes (default: one per GPU, else 1);
    ``address``:``port`` is the rendezvous (node 0's address). ``train_options`` are
    ``train()``'s keywords (``batch_size`` is per process), those listed below; objects of this
    kernel (functions, listeners, other data, a checkpoint to resume) cannot travel. Returns the folder.
    """
    directory = Path(directory)
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not base:
        raise ConfigError("export_job(): the model has no name or path to rebuild it from (config._name_or_path is "
                          "empty); save the base with model.save_pretrained(path) before attaching, reload it with "
                          "nbpeft.load_model(path), attach and export again")
    st = core.state(model)
    if not st.adapters:
        raise ConfigError('export_job(): this model has no adapter; attach one first, e.g. nbpeft.attach(model, "lora")')
    _check_train_options(data, train_options)
    for name, value in (("nodes", nodes), ("port", port)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"export_job(): {name}={value!r} must be a positive integer")
    if processes_per_node is None:
        processes_per_node = max(1, torch.cuda.device_count()) if torch.backends.cuda.is_built() else 1
    try:
        options = json.loads(json.dumps(train_options))
    except TypeError as err:
        raise ConfigError(f"export_job(): the train keywords must be plain values (numbers, text, lists): {err}") from None
    rows = _rows(data)
    check_free(directory, overwrite, "export_job")
    tok = tokenizer_for(model, tokenizer, caller="export_job()")
    task = TASKS.get(io.task_type(model) or "", "causal-lm")
    load = {"num_labels": model.config.num_labels} if task in ("classification", "token-classification") else {}
    dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    job = {"base": base, "task": task, "dtype": dtype, "load": load, "active": list(st.active), "train": options}
    with atomic_folder(directory, overwrite=overwrite) as folder:
        _write_job(folder, model, tok, rows, job, (nodes, processes_per_node, address, port))
    return directory


def _write_job(folder: Path, model: nn.Module, tok: Any, rows: list[Any], job: dict[str, Any],
               launch: tuple[int, int, str, int]) -> None:
    with open(folder / "data.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    io.save_adapter(model, folder / "adapter_init")
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(folder / "tokenizer")
    (folder / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    (folder / "train_job.py").write_text(SCRIPT)
    (folder / "accelerate_config.yaml").write_text(_accelerate_config(*launch))
    (folder / "launch.sh").write_text(_launch_script(*launch))
    (folder / "launch.sh").chmod(0o755)


def _rows(data: Any) -> list[Any]:
    if isinstance(data, (str, bytes, Path)) or not hasattr(data, "__iter__") or not hasattr(data, "__len__"):
        raise ConfigError("export_job(): data= must be the examples themselves (a list of texts or dicts, or a "
                          "datasets.Dataset), so they can be written to the job folder")
    rows = [dict(row) if hasattr(row, "keys") else row for row in data]
    try:
        json.dumps(rows[:1])
    except TypeError:
        raise ConfigError("export_job(): data= rows must be texts or dicts of texts and numbers (not tensors or "
                          "batches), so they can be written as JSON lines") from None
    return rows


def _accelerate_config(nodes: int, per_node: int, address: str, port: int) -> str:
    # MULTI_GPU: accelerate starts it through torchrun (its CPU mode wants MPI); on CPU nodes the job runs gloo
    return (
        "# accelerate launch --config_file accelerate_config.yaml --machine_rank <this node's rank> train_job.py\n"
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        f"num_machines: {nodes}\n"
        "machine_rank: 0\n"
        f"num_processes: {nodes * per_node}\n"
        f"main_process_ip: {address}\n"
        f"main_process_port: {port}\n"
        "mixed_precision: 'no'\n"
        "same_network: true\n"
        "rdzv_backend: static\n"
    )


def _launch_script(nodes: int, per_node: int, address: str, port: int) -> str:
    return (
        "#!/bin/sh\n"
        f"# Run on each of the {nodes} node(s) with NODE_RANK=0 .. {nodes - 1}; node 0 is {address}.\n"
        "# With accelerate instead:\n"
        "#   accelerate launch --config_file $HERE/accelerate_config.yaml --machine_rank $NODE_RANK $HERE/train_job.py\n"
        "set -e\n"
        'HERE=$(cd "$(dirname "$0")" && pwd)\n'
        f"exec torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank ${{NODE_RANK:-0}} \\\n"
        f"  --master-addr ${{MASTER_ADDR:-{address}}} --master-port ${{MASTER_PORT:-{port}}} \"$HERE/train_job.py\"\n"
    )


export_job.__doc__ += "\n" + "\n".join(
    "    " + line for line in declared.docstring(not_exported(), "Train options the job carries:").splitlines())
