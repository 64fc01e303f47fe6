"""AdapterFusion (Pfeiffer et al. 2021): attention over several trained bottleneck adapters.

Stage one trains bottleneck adapters separately (``attach(model, "adapter", name="a")``, ...).
Stage two attaches a fusion that keeps them frozen and learns, at every insertion point,
how much of each adapter to use for each token. With ``y`` the output at that point
(the adapters' input) and ``z_n = up_n(act(down_n(y)))`` the update of adapter ``n``::

    s = softmax_n( (Q y) · (K z_n) / sqrt(h) )        y' = y + sum_n s_n · V z_n

Q, K and V are ``h x h`` linear maps with biases: ``3·(h² + h)`` parameters per point
(``2·(h² + h)`` with ``value=False``, where ``V`` is the identity and not learned).
As in the paper V starts as the identity; Q starts at zero, so every token weighs the
adapters equally at attach: ``y' = y + mean_n z_n``. K keeps torch's default init (Q's
gradient would vanish if both started at zero). The 1/sqrt(h) factor is the usual
dot-product scaling; it only rescales what Q learns.

A fusion lives in the same layers as its adapters and cannot be merged; its adapters
cannot be detached before it (``detach(model)`` removes it first). On a classifier it
trains its own copy of the head, starting from the original head. The paper's penalty
pulling V towards the identity is not added; pass ``loss_fn=`` to ``train()`` for it.

``save_adapter`` writes our own ``peft_type`` ``"ADAPTER_FUSION"`` (no reference format
exists) with keys ``base_model.model.<path>.adapter_fusion.{query,key,value}.{weight,bias}``.
Loading one needs its adapters attached first, under the same names (``load_adapter`` on a
folder takes subfolders in name order: load a fusion named before its adapters by name).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import targeting
from ..errors import ConfigError
from .adapter import BottleneckAdapter
from .base import Attached, Method, MethodConfig, option, register


@dataclass
class FusionConfig(MethodConfig):
    method = "fusion"
    aliases: ClassVar[dict[str, str]] = {"adapter_names": "adapters", "fuse": "adapters"}

    adapters: list[str] = option([], "names of the trained bottleneck adapters to combine (two or more)")
    value: bool = option(True, "learn a value projection V (initialised to the identity)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the fusion (default: a classifier's head)"
    )

    def validate(self) -> None:
        if len(self.adapters) < 2:
            raise ConfigError(f"fusion: adapters={self.adapters!r} must name two or more attached adapters, e.g. ['a', 'b']")
        repeated = sorted({n for n in self.adapters if self.adapters.count(n) > 1})
        if repeated:
            raise ConfigError(f"fusion: adapters lists {repeated[0]!r} twice; name each adapter once")

    def build_layer(self, hidden_size: int, factory: dict[str, Any]) -> FusionLayer:
        return FusionLayer(hidden_size, self.adapters, self.value, factory)


class FusionLayer(nn.Module):
    """The attention of one insertion point: returns ``sum_n s_n · V z_n`` (the layer adds ``y``)."""

    def __init__(self, hidden_size: int, adapters: list[str], value: bool, factory: dict[str, Any]) -> None:
        super().__init__()
        self.adapters = list(adapters)
        self.query = nn.Linear(hidden_size, hidden_size, **factory)
        self.key = nn.Linear(hidden_size, hidden_size, **factory)
        self.value = nn.Linear(hidden_size, hidden_size, **factory) if value else None
        with torch.no_grad():
            self.query.weight.zero_()
            self.query.bias.zero_()
            if self.value is not None:
                self.value.weight.copy_(torch.eye(hidden_size, **factory))
                self.value.bias.zero_()

    def weights(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Attention weights ``s`` of shape ``(..., n)`` for updates ``z`` stacked as ``(..., n, h)``."""
        q = self.query(y.to(self.query.weight.dtype))
        scores = (self.key(z) @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1)

    def forward(self, y: torch.Tensor, updates: list[torch.Tensor]) -> torch.Tensor:
        z = torch.stack(updates, dim=-2)
        values = self.value(z) if self.value is not None else z
        return (self.weights(y, z).unsqueeze(-2) @ values).squeeze(-2)


class AdapterFusion(Method):
    name = "fusion"
    description = "AdapterFusion: learned per-token attention over several frozen bottleneck adapters"
    config_class = FusionConfig
    layer_class = BottleneckAdapter
    peft_type = "ADAPTER_FUSION"
    listing_order = 60
    needs_other_adapters = "combines trained bottleneck adapters; attach those first"

    def select(self, model: nn.Module, config: FusionConfig, attached: Mapping[str, Attached]) -> list[str]:
        """The insertion points the listed adapters share (they must all be bottleneck adapters)."""
        for n in config.adapters:
            if n not in attached:
                have = ", ".join(attached) or "none"
                raise ConfigError(f"fusion: no adapter named {n!r} on this model (attached: {have}); attach and train it first")
            if attached[n].method != "adapter":
                raise ConfigError(f"fusion: {n!r} is a {attached[n].method} adapter; fusion combines method 'adapter' only")
            if attached[n].config.train_layernorms:
                raise ConfigError(f"fusion: {n!r} trains its own layer norms, which a fusion cannot share; "
                                  "fuse adapters trained with train_layernorms=False")
        first = config.adapters[0]
        for n in config.adapters[1:]:
            if attached[n].targets != attached[first].targets:
                raise ConfigError(f"fusion: {first!r} and {n!r} sit at different modules; "
                                  "fuse adapters attached with the same config= and targets=")
        return list(attached[first].targets)

    def uses(self, config: FusionConfig) -> list[str]:
        return list(config.adapters)

    def notes(self, model: nn.Module, config: FusionConfig, targets: list[str]) -> list[str]:
        return [f"attends over {', '.join(map(repr, config.adapters))} (kept frozen)"]

    def to_peft_config(self, config: FusionConfig, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {"adapters": list(config.adapters), "value": config.value,
                "target_modules": targeting.compact_targets(model, targets)}


register(AdapterFusion())
