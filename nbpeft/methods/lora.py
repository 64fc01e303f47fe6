"""LoRA: a low-rank update beside a frozen linear layer.

For a frozen weight ``W`` (out x in) LoRA learns ``A`` (r x in) and ``B`` (out x r)::

    y = W x + (alpha / r) * B A x          (alpha / sqrt(r) with rslora)

``B`` starts at zero, so the model is unchanged right after attach. Merging adds
``(alpha / r) * B A`` to ``W``: no extra latency at inference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import architectures, targeting
from ..layers import AdapterLayer, adapter_factory
from .base import Attached, ConfigError, Method, MethodConfig, option, register


def default_targets(model: nn.Module, method: str) -> list[str] | str:
    """The attention query and value projections (or the fused one) of the model's family."""
    targets = architectures.role_targets(model, "query", "value") or architectures.role_targets(model, "qkv")
    if targets is None:
        raise ConfigError(
            f"{method}: no default targets for this model; pass targets=[...] (module names), a regex, or 'all-linear'"
        )
    return targets


@dataclass
class LoraConfig(MethodConfig):
    method = "lora"
    aliases = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
               "use_rslora": "rslora", "init_lora_weights": "init"}

    r: int = option(8, "rank of the update B·A")
    alpha: float = option(16.0, "scale numerator: the update is multiplied by alpha / r")
    dropout: float = option(0.0, "dropout on the adapter's input during training (0 to 1)")
    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    rslora: bool = option(False, "rank-stabilised scale alpha / sqrt(r)")
    init: str = option(
        "default",
        "'default': A random, B zero (identity at attach); 'gaussian': A ~ N(0, 1/r); 'random': B random too",
        choices=("default", "gaussian", "random"),
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"{self.method}: r={self.r} must be a positive integer, e.g. r=8")
        if self.alpha <= 0:
            raise ConfigError(f"{self.method}: alpha={self.alpha} must be positive, e.g. alpha=16")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.method}: dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError(f"{self.method}: targets=[] is empty; name at least one module, e.g. targets=['q_proj']")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(AdapterLayer):
    """``nn.Linear`` or ``Conv1D`` plus named low-rank updates: ``y = base(x) + s·B(A(drop(x)))``."""

    reads_base_weight = False  # forward only calls the base layer (see precision.hold_frozen_weights_in_bf16)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()  # another method's layer may sit in between
        self.in_features, self.out_features = targeting.linear_features(inner)
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add(self, name: str, config: LoraConfig) -> None:
        self.add_update(name, config, adapter_factory(self.innermost().weight))

    def add_update(self, name: str, config: LoraConfig, factory: dict[str, Any]) -> None:
        """Create adapter ``name``'s ``A``, ``B`` and dropout with tensors made as ``factory`` says."""
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self._init(name, config.init, config.r)

    @torch.no_grad()
    def _init(self, name: str, init: str, r: int) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(B, std=0.02)
        else:
            nn.init.zeros_(B)

    def delete(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·B·A`` in the base weight's layout and dtype."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        delta = (B.float() @ A.float()) * self.scaling[name]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("LoRA over another adapter's layer cannot be folded into the base weight")
        if name not in self.merged:
            self.keep_original_weight()
            self.base_layer.weight += self.delta_weight(name)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.base_layer.weight -= self.delta_weight(name)
            self.merged.remove(name)
            self.restore_original_weight()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        names = [name for name in self.active if name not in self.merged and name in self.lora_A]
        if not names:
            return result
        # Under autocast the matmul runs in the autocast dtype anyway: an upcast copy of x
        # would only cost bandwidth and a second saved activation.
        x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A[names[0]].weight.dtype)
        if len(names) > 1 and self._stackable(names):
            # Several active adapters as one of rank sum(r): two matmuls instead of two each.
            A = torch.cat([self.lora_A[name].weight for name in names])
            B = torch.cat([self.lora_B[name].weight * self.scaling[name] for name in names], dim=1)
            return result + F.linear(F.linear(x_in, A), B).to(result.dtype)
        for name in names:
            # Scale the rank-r activation, not the (much wider) output.
            h = self.lora_A[name](self.lora_dropout[name](x_in)) * self.scaling[name]
            result = result + self.lora_B[name](h).to(result.dtype)
        return result

    def _stackable(self, names: list[str]) -> bool:
        """Whether the adapters can run as one: no dropout in the way, one dtype."""
        no_dropout = not self.training or all(isinstance(self.lora_dropout[n], nn.Identity) for n in names)
        return no_dropout and len({self.lora_A[n].weight.dtype for n in names}) == 1

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.lora_A[n].out_features}" for n in self.lora_A)
        return f"adapters=[{ranks}], active={list(self.active)}"


class LoRA(Method):
    name = "lora"
    description = "Low-rank update B·A beside frozen linear layers; mergeable"
    config_class = LoraConfig
    layer_class = LoRALinear
    peft_type = "LORA"
    listing_order = 10
    compare_options = {"r": 8}

    def select(self, model: nn.Module, config: LoraConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        return targeting.resolve(model, targets, targeting.linear_types(), self.name)

    def to_peft_config(self, config: LoraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        fan_in_fan_out = any(targeting.is_conv1d(targeting.base_modules(model)[p]) for p in chosen)
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": targeting.compact_targets(model, chosen),
            "bias": "none",
            "use_rslora": config.rslora,
            "use_dora": False,
            "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}[config.init],
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def accepts(self, cfg: dict[str, Any]) -> bool:
        return not cfg.get("use_dora")  # a LORA file with use_dora loads as dora

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        unsupported = {
            "use_dora": cfg.get("use_dora"),
            "rank_pattern": cfg.get("rank_pattern"),
            "alpha_pattern": cfg.get("alpha_pattern"),
            "layers_to_transform": cfg.get("layers_to_transform"),
        }
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise ConfigError(f"load_adapter: this LoRA file uses {', '.join(used)}, which nbpeft's lora does not support yet")
        targets = cfg.get("target_modules")
        return {
            "r": int(cfg.get("r", 8)),
            "alpha": float(cfg.get("lora_alpha", 8)),
            "dropout": float(cfg.get("lora_dropout", 0.0)),
            "targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            "rslora": bool(cfg.get("use_rslora", False)),
        }


register(LoRA())
