"""BitFit: train only the bias terms (optionally the norm layers too); everything else stays frozen.

Each adapter trains its own copy ``b'`` of a target's bias, so the original stays untouched
and detach restores it exactly. With the original ``b`` (zero where the layer had no bias)::

    y = base(x) + (b' - b)                    for a bias
    y = base(x; weight = w + (w' - w))        for a norm layer's weight

``b' = b`` at attach, so outputs are unchanged. Layers without a bias (Llama's linear layers)
get a zero-initialised trainable one, which the adapter notes say. The format has no
reference: files use ``peft_type: "BITFIT"`` and keys ``base_model.model.<path>.bias``
(and ``.weight`` for norm layers). Merging copies the trained values into the base's own
parameters (layers that had no bias cannot be merged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from .. import targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_dtype, wrappers
from .base import Attached, Method, MethodConfig, option, register


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer with a weight (LayerNorm, RMSNorm and the models' own kinds of them)."""
    name = type(module).__name__
    return (isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))) and getattr(
        module, "weight", None
    ) is not None


def norm_types(model: nn.Module) -> tuple[type, ...]:
    """The classes of ``model``'s norm layers."""
    return tuple({type(m) for m in targeting.base_modules(model).values() if is_norm(m)})


@dataclass
class BitFitConfig(MethodConfig):
    method = "bitfit"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "norms": "layer_norms"}

    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: every linear layer but the output head)"
    )
    layer_norms: bool = option(False, "also train every norm layer's weight (and bias, where it has one)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("bitfit: targets=[] is empty; name at least one module, or leave targets unset")


class BitFitCopy(nn.Module):
    """One adapter's trained values, with the values they started from (not saved)."""

    def __init__(self, start: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for pname, value in start.items():
            self.register_parameter(pname, nn.Parameter(value.clone()))
            self.register_buffer(f"{pname}_start", value.clone(), persistent=False)

    def deltas(self) -> dict[str, torch.Tensor]:
        return {pname: param - getattr(self, f"{pname}_start") for pname, param in self.named_parameters()}


class BitFitLayer(AdapterLayer):
    """A module whose bias (and, for norm layers, weight) is trained per adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit = nn.ModuleDict()

    @property
    def inner(self) -> nn.Module:
        return self.innermost()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bitfit)

    @property
    def added_bias(self) -> bool:
        """True when the adapter adds a bias: a linear layer without one."""
        return getattr(self.inner, "bias", None) is None and not is_norm(self.inner)

    def add(self, name: str, config: BitFitConfig) -> None:
        inner = self.inner
        weight = inner.weight
        dtype = adapter_dtype(weight.dtype)
        start = {}
        if is_norm(inner):  # a norm layer trains its weight and any bias it has (none is added)
            start["weight"] = weight.detach().to(dtype)
        if getattr(inner, "bias", None) is not None:
            start["bias"] = inner.bias.detach().to(dtype)
        elif not is_norm(inner):
            start["bias"] = torch.zeros(_out_features(inner), device=weight.device, dtype=dtype)
        self.bitfit[name] = BitFitCopy(start)

    def delete(self, name: str) -> None:
        del self.bitfit[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.bitfit[name].named_parameters())

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        if self.added_bias or isinstance(self.base_layer, AdapterLayer):
            why = "the layer had no bias" if self.added_bias else "it wraps another adapter"
            raise NotImplementedError(f"bitfit cannot merge here: {why}")
        inner = self.inner
        for pname, delta in self.bitfit[name].deltas().items():
            param = getattr(inner, pname)
            self.keep_original(pname, param)
            param += delta.to(param.dtype)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self.merged.remove(name)
        inner = self.inner
        for pname, delta in self.bitfit[name].deltas().items():
            param = getattr(inner, pname)
            param -= delta.to(param.dtype)
            if not self.merged:  # bit-exact: the original values come back
                self.restore_original(pname, param)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [] if self.disabled else [n for n in self.active if n in self.bitfit and n not in self.merged]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        deltas: dict[str, torch.Tensor] = {}
        for name in names:
            for pname, delta in self.bitfit[name].deltas().items():
                deltas[pname] = deltas[pname] + delta if pname in deltas else delta
        if "weight" in deltas:  # a norm layer: run it with the adapted weight
            prefix = self._inner_prefix()
            weight = self.inner.weight
            result = functional_call(self.base_layer, {prefix + "weight": weight + deltas["weight"].to(weight.dtype)},
                                     (x, *args), kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
        return result + deltas["bias"].to(result.dtype) if "bias" in deltas else result

    def _inner_prefix(self) -> str:
        """``base_layer.`` once per layer between this one and the wrapped module."""
        return "base_layer." * len(list(wrappers(self.base_layer)))

    def extra_repr(self) -> str:
        return f"adapters={list(self.bitfit)}, active={list(self.active)}" + (", added bias" if self.added_bias else "")


def _out_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    return module.weight.shape[0]


class BitFit(Method):
    name = "bitfit"
    description = "Train only bias terms (zero biases added where a layer has none); optionally norm layers"
    config_class = BitFitConfig
    layer_class = BitFitLayer
    peft_type = "BITFIT"
    listing_order = 30
    usual_lr = 1e-3  # BitFit (Ben Zaken et al. 2022) searched 1e-4 to 1e-3
    identity_at_attach = True
    mergeable = True  # where every adapted layer had a bias: the layer says which

    def select(self, model: nn.Module, config: BitFitConfig, attached: Mapping[str, Attached]) -> list[str]:
        kinds = targeting.linear_types() + norm_types(model)
        chosen = targeting.resolve(model, config.targets or targeting.ALL_LINEAR, kinds, self.name)
        if config.layer_norms:
            modules = targeting.base_modules(model)
            chosen += [p for p, m in modules.items() if is_norm(m) and p not in chosen]
            order = {p: i for i, p in enumerate(modules)}
            chosen.sort(key=order.__getitem__)
        return chosen

    def notes(self, model: nn.Module, config: BitFitConfig, targets: list[str]) -> list[str]:
        modules = targeting.base_modules(model)
        added = [p for p in targets if getattr(modules[p], "bias", None) is None and not is_norm(modules[p])]
        if not added:
            return []
        leaves = sorted({p.rsplit(".", 1)[-1] for p in added})
        return [f"added zero-initialised biases to {len(added)} modules without one ({', '.join(leaves)})"]

    def to_peft_config(self, config: BitFitConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        return {"target_modules": targeting.compact_targets(model, chosen), "layer_norms": config.layer_norms}

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        targets = cfg.get("target_modules")
        return {
            "targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            "layer_norms": False,  # norm layers are already among target_modules
        }


register(BitFit())
