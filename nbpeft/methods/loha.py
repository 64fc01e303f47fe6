"""LoHa: a low-rank Hadamard product as the update of a frozen linear layer (FedPara, LyCORIS).

For a frozen weight ``W`` (out x in) LoHa learns two rank-``r`` pairs and multiplies them element-wise::

    ΔW = (alpha / r) · (w1_a w1_b) ⊙ (w2_a w2_b)       w*_a: out x r, w*_b: r x in

so ``ΔW`` can reach rank ``r²`` with the parameters of a rank-``2r`` LoRA. ``w2_b`` starts at zero
(the rest Kaiming-uniform, as in the reference), so the model is unchanged at attach. Files use
``peft_type: "LOHA"`` and the tensors ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import option, register
from .lycoris import LycorisConfig, LycorisLayer, LycorisMethod


@dataclass
class LoHaConfig(LycorisConfig):
    method = "loha"

    init_weights: bool = option(True, "True: w2_b starts at zero (identity at attach); False: every factor random, for tests")


class LoHaLayer(LycorisLayer):
    """``nn.Linear`` or ``Conv1D`` plus ``ΔW = s·(w1_a w1_b) ⊙ (w2_a w2_b)``."""

    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def create(self, config: LoHaConfig, factory: dict[str, Any]) -> dict[str, torch.Tensor]:
        out_features, in_features, r = self.out_features, self.in_features, config.r
        shapes = {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features),
                  "hada_w2_a": (out_features, r), "hada_w2_b": (r, in_features)}
        tensors = {factor: torch.empty(shape, **factory) for factor, shape in shapes.items()}
        for factor, tensor in tensors.items():
            if factor == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        return tensors

    def update(self, name: str) -> torch.Tensor:
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return first * second


class LoHa(LycorisMethod):
    name = "loha"
    description = "Low-rank Hadamard product (w1_a w1_b) ⊙ (w2_a w2_b) beside frozen linear layers; mergeable"
    config_class = LoHaConfig
    layer_class = LoHaLayer
    peft_type = "LOHA"
    listing_order = 14
    compare_options = {"r": 8}


register(LoHa())
