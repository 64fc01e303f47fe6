"""LoKr: a Kronecker product as the update of a frozen linear layer (LyCORIS).

The layer's sizes are split into factor pairs, ``out = a·b`` and ``in = c·d`` (as close to square
roots as ``decompose_factor`` allows), and LoKr learns ``w1`` (a x c) and ``w2`` (b x d)::

    ΔW = (alpha / r) · w1 ⊗ w2

``w2`` is a rank-``r`` product ``w2_a w2_b`` when ``r`` is below half its larger side, else a full
matrix; ``w1`` likewise with ``decompose_both``, else always full. ``w1`` (or ``w1_a``) starts at
zero, so the model is unchanged at attach (``init_weights='lycoris'`` zeroes ``w2`` instead).
Files use ``peft_type: "LOKR"`` and the tensors ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and
``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import option, register
from .lycoris import LycorisConfig, LycorisLayer, LycorisMethod


def factor_pair(size: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = size``: ``(factor, size / factor)`` when ``factor`` divides ``size``, else the
    pair closest to square with ``m ≤ n`` and ``m ≤ factor`` (any ``m`` for ``factor = -1``)."""
    if factor > 0 and size % factor == 0:
        return factor, size // factor
    limit = size if factor == -1 else factor
    m = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0 and d <= limit)
    return m, size // m


@dataclass
class LoKrConfig(LycorisConfig):
    method = "lokr"

    decompose_both: bool = option(False, "also make w1 a rank-r product (where r is below half its larger side)")
    decompose_factor: int = option(-1, "split each size near this factor (-1: near its square root)")
    rank_dropout_scale: bool = option(False, "rescale the rows rank_dropout keeps by 1 / (share kept)")
    init_weights: bool | str = option(
        True, "True: w1 starts at zero (identity at attach); 'lycoris': w2 starts at zero instead; False: all random, for tests"
    )

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"lokr: decompose_factor={self.decompose_factor} must be -1 (near the square root) or positive, e.g. 4")
        if isinstance(self.init_weights, str) and self.init_weights != "lycoris":
            raise ConfigError(f"lokr: init_weights={self.init_weights!r} is not allowed; use True, False or 'lycoris'")


class LoKrLayer(LycorisLayer):
    """``nn.Linear`` or ``Conv1D`` plus ``ΔW = s·w1 ⊗ w2``, each factor whole or a rank-r product."""

    factor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    rescale_rank_dropout = False

    def create(self, config: LoKrConfig, factory: dict[str, Any]) -> dict[str, torch.Tensor]:
        (a, b), (c, d), r = factor_pair(self.out_features, config.decompose_factor), factor_pair(self.in_features, config.decompose_factor), config.r
        shapes = {}
        if config.decompose_both and r < max(a, c) / 2:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            shapes.update(lokr_w1=(a, c))
        if r < max(b, d) / 2:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
        else:
            shapes.update(lokr_w2=(b, d))
        # the factor that starts at zero: w1 (or w1_a) by default, w2 (or w2_b) the LyCORIS way
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        tensors = {factor: torch.empty(shape, **factory) for factor, shape in shapes.items()}
        for factor, tensor in tensors.items():
            if factor in zero:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        return tensors

    def _factor(self, name: str, which: str) -> torch.Tensor:
        whole = getattr(self, f"lokr_{which}")
        if name in whole:
            return whole[name]
        return getattr(self, f"lokr_{which}_a")[name] @ getattr(self, f"lokr_{which}_b")[name]

    def update(self, name: str) -> torch.Tensor:
        return torch.kron(self._factor(name, "w1"), self._factor(name, "w2"))


class LoKr(LycorisMethod):
    name = "lokr"
    description = "Kronecker product w1 ⊗ w2 of small factors beside frozen linear layers; mergeable"
    config_class = LoKrConfig
    layer_class = LoKrLayer
    peft_type = "LOKR"
    listing_order = 15
    compare_options = {"r": 8}
    same_name_keys = (*LycorisMethod.same_name_keys, "decompose_both", "decompose_factor", "rank_dropout_scale")


register(LoKr())
