"""Training checkpoints: everything ``train(resume=...)`` needs to continue a run exactly.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` holding ``state.pt``: the trained
parameters (by name), the optimizer's and the grad scaler's state, the step reached, the
history so far and the random number generators. Resuming restores them, replays the data
stream up to that step and continues: the losses are those of an uninterrupted run.

Beside it, ``run.json`` records the run's identity (:func:`identity`): the options that shape
what it computes, a fingerprint of its data and the layout of what it trains. ``resume=True``
continues only the run that wrote the latest checkpoint, and a run does not write into a folder
that holds another run's checkpoints unless told to replace them (``overwrite=True``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from array import array
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..formats.files import atomic_folder

STATE_FILE = "state.pt"
RUN_FILE = "run.json"
_PATTERN = re.compile(r"checkpoint-(\d+)$")
# Options that leave what a run computes as it is (where it shows, where it saves, how fast it runs), that
# the data fingerprint covers, or that are functions (loss_fn: nothing to compare them by); steps and epochs
# are compared apart, since a resumed run may raise them.
NOT_IDENTITY = ("data", "eval_data", "tokenizer", "metrics", "loss_fn", "live", "device", "compile",
                "gradient_checkpointing", "processes", "shard", "save_every", "output_dir", "resume", "overwrite",
                "steps", "epochs", "eval_every")


def folder(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:06d}"


def latest(output_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step under ``output_dir``, or None."""
    found = [(int(m[1]), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _PATTERN.search(p.name)) and (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def find(resume: bool | str | Path, output_dir: str | Path | None) -> Path:
    """The checkpoint folder ``resume=`` names: True means the latest one in ``output_dir``."""
    if resume is True:
        if output_dir is None:
            raise ConfigError("train(): resume=True needs output_dir= (the folder given to save_every= runs)")
        path = latest(output_dir)
        if path is None:
            raise ConfigError(f"train(): resume=True but {str(output_dir)!r} holds no checkpoint; "
                              "train with save_every=N first, or drop resume=")
        return path
    path = Path(resume)
    if (path / STATE_FILE).exists():
        return path
    inner = latest(path) if path.is_dir() else None
    if inner is None:
        raise ConfigError(f"train(): resume={str(resume)!r} is not a checkpoint; pass a checkpoint-N folder "
                          "or the output_dir that holds them")
    return inner


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, step: int,
         history: list[dict[str, Any]], run: dict[str, Any] | None = None,
         reference: dict[str, Any] | None = None) -> Path:
    state = {
        "reference": reference,  # a preference objective's reference (disabled, or its starting weights)
        "step": step,
        "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    with atomic_folder(path, overwrite=True) as folder:  # a run killed while writing never leaves half a checkpoint
        (folder / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
        torch.save(state, folder / STATE_FILE)
    return path


def load(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    """Put the trained parameters and the optimizer back; refuses a checkpoint of other parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state["params"].keys():
        missing = sorted(state["params"].keys() - params.keys()) or sorted(params.keys() - state["params"].keys())
        raise ConfigError(f"train(): the checkpoint trained other parameters than this model's (e.g. {missing[0]!r}); "
                          "attach the same adapter as when it was saved")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# ---------------------------------------------------------------- whose checkpoint it is


def identity(options: dict[str, Any], examples: list[dict[str, Any]] | None, model: nn.Module, full: bool,
             steps: int) -> dict[str, Any]:
    """What makes a run this run: its options (JSON values, less ``NOT_IDENTITY``), data, trained layout, steps.

    ``examples`` are the encoded training examples (None for a DataLoader or a stream: not
    fingerprinted). The layout is the active adapters' methods and the names and shapes of
    the parameters that train (every parameter under ``full=True``).
    """
    shaping = {}
    for name, value in options.items():
        if name in NOT_IDENTITY:
            continue
        try:
            shaping[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):  # a function or an object: not comparable across processes
            continue
    st = core.state(model)
    trained = [[name, list(p.shape)] for name, p in model.named_parameters() if full or p.requires_grad]
    layout = {"adapters": {name: st.adapters[name].method for name in st.active if name in st.adapters},
              "parameters": len(trained), "shapes": _digest([json.dumps(trained).encode()])}
    return {"options": shaping, "data": fingerprint(examples), "layout": layout, "steps": steps}


def fingerprint(examples: list[dict[str, Any]] | None) -> str | None:
    """A short hash of the encoded examples (their token ids, labels, features), or None without them."""
    if examples is None:
        return None
    return _digest(part for example in examples for key in sorted(example) for part in (key.encode(),
                                                                                       _bytes(example[key])))


def _bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(value, list):
        try:
            return array("q", value).tobytes()  # token ids: far faster than their text
        except (TypeError, OverflowError):
            pass
    return repr(value).encode()


def _digest(parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))  # lengths too: [1, 23] and [12, 3] must differ
        digest.update(part)
    return digest.hexdigest()[:12]


def run_of(path: Path) -> dict[str, Any] | None:
    """The identity a checkpoint recorded, or None (written before identities were recorded)."""
    try:
        return json.loads((path / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _differences(ours: dict[str, Any], theirs: dict[str, Any] | None, steps: bool) -> tuple[str, str]:
    """What tells the two runs apart, as ("theirs", "ours") text."""
    if theirs is None:
        return "one that recorded no identity", f"data {ours['data']}"
    mine, other = [], []
    for name in sorted(ours["options"].keys() | theirs.get("options", {}).keys()):
        a, b = ours["options"].get(name, "not set"), theirs.get("options", {}).get(name, "not set")
        if a != b:
            mine.append(f"{name}={a}")
            other.append(f"{name}={b}")
    if steps and ours["steps"] != theirs.get("steps"):
        mine.append(f"{ours['steps']} steps")
        other.append(f"{theirs.get('steps')} steps")
    if ours["data"] != theirs.get("data"):
        mine.append(f"data {ours['data']}")
        other.append(f"data {theirs.get('data')}")
    if ours["layout"] != theirs.get("layout"):
        mine.append(_layout_text(ours["layout"]))
        other.append(_layout_text(theirs.get("layout") or {}))
    return ", ".join(other), ", ".join(mine)


def _layout_text(layout: dict[str, Any]) -> str:
    methods = ", ".join(f"{method} {name!r}" for name, method in layout.get("adapters", {}).items()) or "full"
    return f"trains {methods}: {layout.get('parameters')} tensors {layout.get('shapes')}"


def _same(ours: dict[str, Any], theirs: dict[str, Any] | None, steps: bool) -> bool:
    if theirs is None:
        return False
    keys = ("options", "data", "layout") + (("steps",) if steps else ())
    return all(ours[k] == theirs.get(k) for k in keys)


def check_resume(path: Path, ours: dict[str, Any]) -> None:
    """``resume=True`` continues its own run only: refuse a latest checkpoint another run wrote."""
    theirs = run_of(path)
    if not _same(ours, theirs, steps=False):
        other, mine = _differences(ours, theirs, steps=False)
        raise ConfigError(f"train(): {path} belongs to another run ({other}) than this one ({mine}); to continue it "
                          f"with these options pass resume={str(path)!r} (saving to another output_dir=), or use "
                          "another output_dir= for this run")


def check_folder(output_dir: str | Path, ours: dict[str, Any], resuming: bool) -> None:
    """A run writes no checkpoint into a folder that holds another run's; ``overwrite=True`` replaces them."""
    for path in sorted(_checkpoints(output_dir), reverse=True):
        theirs = run_of(path)
        if not _same(ours, theirs, steps=not resuming):  # a resumed run may have raised steps=
            other, mine = _differences(ours, theirs, steps=not resuming)
            raise ConfigError(f"train(): {str(output_dir)!r} holds checkpoints of another run ({other}; latest "
                              f"{path.name}) than this one ({mine}); pass overwrite=True to replace them, or "
                              "another output_dir=")


def clear(output_dir: str | Path) -> None:
    """Remove every checkpoint folder under ``output_dir`` (``overwrite=True``); other files stay."""
    for path in _checkpoints(output_dir):
        shutil.rmtree(path)


def _checkpoints(output_dir: str | Path) -> list[Path]:
    return [p for p in Path(output_dir).glob("checkpoint-*") if _PATTERN.search(p.name) and p.is_dir()]
