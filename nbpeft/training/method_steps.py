"""What attached methods add to a training step: a term in the loss, and work after the optimizer step.

The loop calls these two for whatever is attached; a method opts in by overriding
``Method.extra_loss`` or ``Method.after_step`` (AdaLoRA's orthogonality penalty and rank budget).
The figures they return go into the step's history row (``Step.figures``); an adapter other
than ``default`` has its name before each figure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import core
from ..methods.base import get_method


def _active(model: nn.Module) -> list[tuple[str, Any]]:
    st = core.state(model)
    return [(name, st.adapters[name]) for name in st.active if name in st.adapters]


def _label(name: str, figure: str) -> str:
    return figure if name == "default" else f"{name}: {figure}"


def backward_extra_loss(model: nn.Module, scaler: Any = None) -> dict[str, float]:
    """Backward of the active methods' extra loss terms, once for the step; their value as a figure."""
    terms = {name: get_method(adapter.method).extra_loss(model, name, adapter.config) for name, adapter in _active(model)}
    terms = {name: term for name, term in terms.items() if term is not None}
    if not terms:
        return {}
    total = torch.stack([term.float() for term in terms.values()]).sum()
    (scaler.scale(total) if scaler is not None else total).backward()
    return {_label(name, "extra loss"): float(term.detach()) for name, term in terms.items()}


def after_step(model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
    """Each active method's work after the optimizer step; the figures it reports."""
    figures: dict[str, float] = {}
    for name, adapter in _active(model):
        found = get_method(adapter.method).after_step(model, name, adapter.config, step, total_steps)
        figures.update({_label(name, key): float(value) for key, value in found.items()})
    return figures
