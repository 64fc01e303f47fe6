"""Several methods trained from the same start on the same batches, side by side.

    table = nbpeft.bakeoff(model, data, methods={"lora": {"r": 8}, "ia3": {}, "prompt": {"num_virtual_tokens": 20}},
                           eval_data=held_out, steps=60, seed=0)
    table                 # one row per method: parameters, losses, speed, memory, adapter size
    table.plot()          # their loss curves overlaid
    table.to_pandas()

Each method's run is exactly ``torch.manual_seed(seed); attach(model, method, **options);
train(model, data, seed=seed, ...)`` made alone, and is recorded like any other run. The
model is given back as it came: each adapter is detached (exactly) before the next.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..formats.peft_folder import WEIGHTS_FILE, save_adapter
from ..methods.base import get_method
from . import loop
from .display import format_bytes
from .options import Settings, by_name
from .record import model_name
from .run_table import RunTable


def usual_lr(method: str) -> float:
    """The learning rate ``method`` trains at in a bake-off: its own (``Method.usual_lr``), else train()'s default."""
    own = get_method(method).usual_lr
    return own if own is not None else by_name()["lr"].default

# options bakeoff() sets itself, or that make no sense when several methods train in turn
NOT_OPTIONS = ("full", "resume")

# The bake-off table's columns (metrics follow the eval loss).
HEAD = [
    ("name", "method", str), ("lr", "lr", lambda v: f"{v:g}"),
    ("trainable", "trainable", lambda v: f"{v:,}"), ("trainable_share", "% of model", lambda v: f"{v:.3f}%"),
    ("final_loss", "train loss", lambda v: f"{v:.4f}"), ("final_eval_loss", "eval loss", lambda v: f"{v:.4f}"),
]
TAIL = [
    ("time_per_step_s", "time/step", lambda v: f"{v * 1000:.0f} ms"), ("peak_mem_bytes", "peak mem", format_bytes),
    ("adapter_bytes", "adapter file", format_bytes), ("status", "ended", str), ("run_id", "run", str),
]


def _plan(model: nn.Module, methods: Any, options: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], float]]:
    """(row name, method, attach options, lr) per entry, every one checked before anything trains."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"bakeoff(): expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError('bakeoff(): methods= must be a dict of method name to its options, e.g. '
                          'methods={"lora": {"r": 8}, "ia3": {}}')
    if core.state(model).adapters:
        raise ConfigError(f"bakeoff(): the model has adapters attached ({', '.join(core.state(model).adapters)}); "
                          "every method starts from the bare model: nbpeft.detach(model) first")
    given = [k for k in NOT_OPTIONS if k in options]
    if given:
        raise ConfigError(f"bakeoff(): {given[0]}= is not for a bake-off; drop it")
    plan = []
    for row, settings in methods.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"bakeoff(): methods[{row!r}] must be a dict of options, e.g. {{'r': 8}} or {{}}")
        settings = dict(settings)
        method = settings.pop("method", row)  # {"lora-r16": {"method": "lora", "r": 16}}: one method twice
        try:
            get_method(method).config_class.from_options({k: v for k, v in settings.items() if k != "lr"})
        except ConfigError as err:
            raise ConfigError(f"bakeoff(): methods[{row!r}]: {err}") from None
        lr = settings.pop("lr", options.get("lr", usual_lr(method)))
        plan.append((str(row), method, settings, lr))
    Settings.of("bakeoff()", {"data": [], **options, "lr": plan[0][3]})
    for _, _, _, lr in plan:
        Settings.of("bakeoff()", {"data": [], "lr": lr})
    return plan


def _adapter_bytes(model: nn.Module) -> int:
    """The size of the adapter's weights file as save_adapter writes it."""
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder, name="default")
        return sum(p.stat().st_size for p in Path(folder).rglob(WEIGHTS_FILE))


def _one(model: nn.Module, data: Any, name: str, method: str, settings: dict[str, Any], lr: float, seed: int,
         options: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``method`` alone from the bare model: (its row, its points); detached again afterwards."""
    torch.manual_seed(seed)
    adapter = core.attach(model, method, **settings)
    try:
        result = loop.train(model, data, seed=seed, **{**options, "lr": lr})
        row = {
            "name": name, "method": method, "lr": lr, "run_id": result.run_id, "model": model_name(model),
            "trainable": adapter.num_params,
            "trainable_share": 100.0 * adapter.num_params / max(adapter.model_params, 1),
            "final_loss": result.final_loss,
            "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
            "final_metrics": next((r["metrics"] for r in reversed(result.history) if r.get("metrics")), {}),
            "time_per_step_s": sum(r["step_time_s"] for r in result.history) / max(result.steps, 1),
            "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "peak_mem_bytes": result.peak_mem_bytes,
            "adapter_bytes": _adapter_bytes(model), "status": result.stopped or "finished", "message": result.message,
            "steps": result.steps, "settings": settings,
        }
        return row, result.history
    finally:
        core.detach(model)


def bakeoff(model: nn.Module, data: Any, methods: dict[str, dict[str, Any]], *, seed: int = 0,
            **train_options: Any) -> RunTable:
    """Train each of ``methods`` from the same start on the same batches; one row per method.

    ``methods`` maps a method name to its attach options, e.g. ``{"lora": {"r": 8}, "ia3": {}}``;
    an ``"lr"`` among them is that method's learning rate (else ``lr=`` if given, else the
    method's usual rate, :func:`usual_lr`); ``"method"`` lets one
    method appear twice under other names (``{"lora-r16": {"method": "lora", "r": 16}}``).
    ``seed`` and every other keyword (``eval_data``, ``steps``, ``metrics``, ...) go to
    ``train()``. The model must come bare and is given back bare, its weights bit for bit.

    Returns a :class:`RunTable`: trainable parameters and their share, final train and eval
    loss (and metrics), time per step, peak memory, adapter file size and the run's id;
    ``.plot()`` overlays the curves, ``.to_pandas()`` is one row per method.
    """
    plan = _plan(model, methods, train_options)
    rows, curves = [], {}
    for name, method, settings, lr in plan:
        row, points = _one(model, data, name, method, settings, lr, seed, train_options)
        rows.append(row)
        curves[name] = points
    return RunTable(rows, head=HEAD, tail=TAIL, curves=curves, label="name")
