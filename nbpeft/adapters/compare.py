"""How many parameters each registered method would train on a model, side by side.

Every method is attached to its own *shapes-only* copy of the model: the module tree is
copied, but each parameter and buffer is replaced by a tensor on the meta device (no
memory, no compute). The adapter's parameters are counted there and the copy is thrown
away, so the model itself is never touched, whatever its size or device.
"""

from __future__ import annotations

import copy
import html
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..methods.base import get_method, registered


@dataclass
class Comparison:
    """One row per method: ``method``, ``settings``, ``trainable``, ``percent``, ``modules``, ``note``."""

    model_name: str
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def _cells(self) -> list[tuple[str, ...]]:
        out = []
        for row in self.rows:
            settings = ", ".join(f"{k}={v!r}" for k, v in row["settings"].items()) or "defaults"
            counted = row["trainable"] is not None
            out.append((
                row["method"], settings,
                f"{row['trainable']:,}" if counted else "-",
                f"{row['percent']:.4f}%" if counted else "-",
                row["note"],
            ))
        return out

    def __repr__(self) -> str:
        cells = self._cells()
        head = ("method", "settings", "trainable", "% of model", "note")
        widths = [max(len(head[i]), *(len(c[i]) for c in cells)) if cells else len(head[i]) for i in range(4)]
        lines = [f"{self.model_name}: {self.total:,} parameters without adapters"]
        for row in [head, *cells]:
            left, settings, count, pct, note = row
            lines.append(f"  {left:<{widths[0]}}  {settings:<{widths[1]}}  {count:>{widths[2]}}  {pct:>{widths[3]}}"
                         + (f"  {note}" if note else "").rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        # JupyterLab right-aligns table cells: right for the numbers, but prose reads from the left
        left = (' style="text-align:left"', ' style="text-align:left"', "", "", ' style="text-align:left"')
        heads = ("method", "settings", "trainable", "% of model", "note")
        head = "".join(f"<th{a}>{h}</th>" for a, h in zip(left, heads))
        body = "".join("<tr>" + "".join(f"<td{a}>{html.escape(c)}</td>" for a, c in zip(left, row)) + "</tr>"
                       for row in self._cells())
        caption = f"{html.escape(self.model_name)}: {self.total:,} parameters without adapters"
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>"


def compare(model: nn.Module, methods: list[str] | None = None, **options: dict[str, Any]) -> Comparison:
    """Trainable parameters (count and % of the model) of each method with its usual settings.

    The share is the one ``attach`` would print on the model without adapters: of its total
    with the method's adapter (:func:`nbpeft.core.parameter_counts`).

    ``methods`` defaults to every registered method; ``options`` override settings per
    method, e.g. ``compare(model, lora={"r": 16})``. A method that cannot go on this model
    gets a note instead of a count. The model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compare(): expected a torch.nn.Module, got {type(model).__name__}")
    names = methods if methods is not None else [
        m.name for m in sorted(registered(), key=lambda m: (m.listing_order, m.name))
    ]
    for name in [*names, *options]:
        get_method(name)  # an unknown name raises with a "did you mean"
    settings = {}
    for name in names:
        given = options.get(name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"compare(): {name}={given!r} must be a dict of options, e.g. {name}={{'r': 16}}")
        spec = get_method(name)
        fields = set(spec.config_class.__dataclass_fields__)
        settings[name] = {**{k: v for k, v in spec.compare_options.items() if k in fields}, **given}
        if spec.needs_other_adapters is None:
            spec.config_class.from_options(settings[name])  # bad options raise here, before any counting

    total = core.parameter_counts(shapes_only_copy(model)).total
    table = Comparison(type(model).__name__, total)
    for name in names:
        row = {"method": name, "settings": settings[name], "trainable": None, "percent": None, "modules": 0, "note": ""}
        needs = get_method(name).needs_other_adapters
        if needs is not None:
            row["note"] = "skipped: " + needs
        else:
            try:
                adapter = core.attach(shapes_only_copy(model), name, name="compared", **settings[name])
            except Exception as err:  # noqa: BLE001  (a method that does not fit must not hide the others)
                row["note"] = f"not counted: {err}"
            else:
                row.update(trainable=adapter.num_params, percent=100.0 * adapter.num_params / max(adapter.total_params, 1),
                           modules=len(adapter.targets), note="; ".join(adapter.notes))
        table.rows.append(row)
    return table


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (adapters included) whose every tensor is on the meta device."""
    memo: dict[int, Any] = {}
    for module in _reachable_modules(model):
        tensors = [*module._parameters.values(), *module._buffers.values(),
                   *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        for tensor in tensors:
            if tensor is not None and id(tensor) not in memo:
                memo[id(tensor)] = _on_meta(tensor)
    return copy.deepcopy(model, memo)


def shapes_only_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s base (adapters removed) whose every tensor is on the meta device."""
    duplicate = meta_copy(model)
    if core.state(duplicate).adapters:
        core.detach(duplicate)
    return duplicate


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


def _reachable_modules(model: nn.Module) -> list[nn.Module]:
    """Submodules, plus modules kept as plain attributes (e.g. the weights qlora set aside)."""
    seen: dict[int, nn.Module] = {}
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen[id(module)] = module
        stack += [m for m in module._modules.values() if m is not None]
        stack += [v for k, v in vars(module).items() if k != "_modules" and isinstance(v, nn.Module)]
    return list(seen.values())
