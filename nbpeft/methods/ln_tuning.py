"""LN tuning: train the norm layers' own parameters and nothing else (Zhao et al. 2023).

Each adapter trains its own copy ``γ', β'`` of a norm layer's weight and bias, started from the
originals, and the layer runs with the copy in their place::

    y = norm(x; γ', β')          γ' = γ, β' = β at attach, so the outputs are unchanged

The originals stay untouched, so detach is exact. Merging writes the copy into the norm layer
(its original values come back on unmerge, bit for bit); one LN-tuning adapter per layer can be
merged or active at a time, as in the reference. Files use ``peft_type: "LN_TUNING"`` and keys
``base_model.model.<path>.ln_tuning_layers.weight`` (and ``.bias``). By default every norm layer
of the model is tuned (the reference lists them per family; this finds them by kind).
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
from .bitfit import is_norm, norm_types


@dataclass
class LNTuningConfig(MethodConfig):
    method = "ln_tuning"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "exclude_modules": "exclude"}

    targets: str | list[str] | None = option(
        None, "norm layers: names or suffixes, or a regex (default: every norm layer of the model)"
    )
    exclude: str | list[str] | None = option(None, "norm layers left as they are: names or suffixes, or a regex over the path")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("ln_tuning: targets=[] is empty; name at least one norm layer, or leave targets unset")


class NormCopy(nn.Module):
    """One adapter's trained copy of a norm layer's parameters (``weight`` and any ``bias``)."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for pname, value in values.items():
            self.register_parameter(pname, nn.Parameter(value))


class LNTuningLayer(AdapterLayer):
    """A norm layer run with the active adapter's copy of its parameters in place of its own."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ln_tuning_layers)

    def own_parameters(self) -> dict[str, nn.Parameter]:
        """The norm layer's own parameters by name (``weight``, ``bias``)."""
        return dict(self.innermost().named_parameters(recurse=False))

    def add(self, name: str, config: LNTuningConfig) -> None:
        # an fp32 copy beside a low-precision norm: its small updates would be rounded away in bf16
        values = {pname: p.detach().to(adapter_dtype(p.dtype), copy=True) for pname, p in self.own_parameters().items()}
        self.ln_tuning_layers[name] = NormCopy(values)

    def delete(self, name: str) -> None:
        del self.ln_tuning_layers[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {f"ln_tuning_layers.{pname}": p for pname, p in self.ln_tuning_layers[name].named_parameters()}

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("ln_tuning wraps another adapter here; merge that one first or detach it")
        if self.merged:
            raise NotImplementedError(f"ln_tuning adapter {self.merged[0]!r} is merged into this norm layer; unmerge it first")
        for pname, param in self.own_parameters().items():
            self.keep_original(pname, param)
            param.copy_(getattr(self.ln_tuning_layers[name], pname))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.merged.remove(name)
            for pname, param in self.own_parameters().items():
                self.restore_original(pname, param)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = [] if self.disabled else [n for n in self.active if n in self.ln_tuning_layers and n not in self.merged]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) > 1:
            raise ConfigError(f"ln_tuning: adapters {names} are active on one norm layer, which takes one at a time; "
                              "nbpeft.set_adapter(model, name) to pick one")
        prefix = "base_layer." * len(list(wrappers(self.base_layer)))  # the norm's own path below this layer
        own = self.own_parameters()
        copy = self.ln_tuning_layers[names[0]]
        values = {prefix + pname: getattr(copy, pname).to(own[pname].dtype) for pname in own}
        return functional_call(self.base_layer, values, (x, *args), kwargs)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={list(self.active)}"


class LNTuning(Method):
    name = "ln_tuning"
    description = "Train only the norm layers' weights and biases (a copy per adapter); mergeable"
    config_class = LNTuningConfig
    layer_class = LNTuningLayer
    peft_type = "LN_TUNING"
    listing_order = 32
    usual_lr = 1e-3  # few values, as BitFit's; LN tuning (Zhao et al. 2023) trains at 1e-3 and below
    identity_at_attach = True
    mergeable = in_reference = True
    holds_token_rows = False  # the reference keeps trainable tokens only beside LoRA

    def select(self, model: nn.Module, config: LNTuningConfig, attached: Mapping[str, Attached]) -> list[str]:
        modules = targeting.base_modules(model)
        if config.targets is None:
            chosen = [p for p, m in modules.items() if p and is_norm(m)]
            if not chosen:
                raise ConfigError("ln_tuning: this model has no norm layer with a weight to tune; pick another method")
        else:
            kinds = norm_types(model)
            if not kinds:
                raise ConfigError("ln_tuning: this model has no norm layer with a weight to tune; pick another method")
            chosen = targeting.resolve(model, config.targets, kinds, self.name)
        targets = config.targets if config.targets is not None else []
        return targeting.narrow(model, chosen, targets, self.name, exclude=config.exclude)

    def to_peft_config(self, config: LNTuningConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        return {"target_modules": targeting.compact_targets(model, chosen), "exclude_modules": None}

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        def names(value: Any) -> Any:
            return sorted(value) if isinstance(value, (list, tuple, set)) else value

        options = {"targets": names(cfg.get("target_modules")), "exclude": names(cfg.get("exclude_modules")) or None}
        return {k: v for k, v in options.items() if v is not None}


register(LNTuning())
