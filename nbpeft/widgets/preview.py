"""What an attach would give, computed on a parameter-free copy of the model.

The copy shares the model's structure but its parameters live on the ``meta``
device, so attaching to it costs no memory and leaves the real model untouched.
The numbers are exact because they come from the same ``attach`` and ``summary``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

import nbpeft

from ..adapters.compare import meta_copy
from ..errors import ConfigError


@dataclass
class Preview:
    """Trainable and total parameters the model would have after the attach."""

    trainable: int
    total: int
    adapter_params: int
    modules: int
    targets: str

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        where = f" on {self.modules} modules ({self.targets})" if self.modules else ""
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({self.pct:.3f}%){where}"


def preview(model: nn.Module, method: str, name: str = "default", **options: Any) -> Preview:
    """The parameter counts ``attach(model, method, name=name, **options)`` would give.

    Raises the ConfigError attach would raise. A method that needs real weights to
    attach (so fails on meta tensors) is previewed on a full copy instead.
    """
    try:
        shadow = meta_copy(model)
        adapter = nbpeft.attach(shadow, method, name=name, **options)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 (meta tensors unsupported: retry on real weights)
        shadow = copy.deepcopy(model)
        adapter = nbpeft.attach(shadow, method, name=name, **options)
    counts = nbpeft.summary(shadow)
    return Preview(counts.trainable, counts.total, adapter.num_params, len(adapter.targets) + len(adapter.saved_modules),
                   adapter.target_text() + ("; " + ", ".join(adapter.saved_modules) if adapter.saved_modules else ""))
