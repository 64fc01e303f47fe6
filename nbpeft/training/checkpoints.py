"""Training checkpoints: everything ``train(resume=...)`` needs to continue a run exactly.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` holding ``state.pt``: the trained
parameters (by name), the optimizer's and the grad scaler's state, the step reached, the
history so far and the random number generators. Resuming restores them, replays the data
stream up to that step and continues: the losses are those of an uninterrupted run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..formats.files import atomic_folder

STATE_FILE = "state.pt"
_PATTERN = re.compile(r"checkpoint-(\d+)$")


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
         history: list[dict[str, Any]]) -> Path:
    state = {
        "step": step,
        "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    with atomic_folder(path, overwrite=True) as folder:  # a run killed while writing never leaves half a checkpoint
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
