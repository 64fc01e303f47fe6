"""What LoHa and LoKr share: a dense update ``ΔW`` built from small factors, beside a frozen linear layer.

For a frozen weight ``W`` (out x in) each method builds ``ΔW`` (out x in) from its own factors::

    y = W x + b + ΔW x          ΔW = (alpha / r) · update(factors)

One factor starts at zero, so the model is unchanged right after attach; merging adds ``ΔW``
to ``W``. During training ``rank_dropout`` zeroes whole output rows of ``ΔW`` and
``module_dropout`` skips the whole update for a step, as the reference does.

The options, ``adapter_config.json`` keys and tensor names are the reference's; ``rank_pattern``,
``alpha_pattern``, ``layers`` and ``exclude`` act as they do for LoRA. Linear layers only
(``nn.Linear`` and GPT-2's ``Conv1D``); ``use_effective_conv2d`` is kept for the file format and
acts on convolutions, which nbpeft does not adapt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_factory
from .base import Attached, Method, MethodConfig, option
from .lora import check_pattern, check_regex, default_targets, saved_pattern


@dataclass
class LycorisConfig(MethodConfig):
    """The options LoHa and LoKr share, named as in the reference."""

    aliases: ClassVar[dict[str, str]] = {
        "rank": "r", "lora_alpha": "alpha", "target_modules": "targets", "layers_to_transform": "layers",
        "exclude_modules": "exclude", "dropout": "rank_dropout", "init": "init_weights",
    }

    r: int = option(8, "rank of the factors")
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha / r")
    rank_dropout: float = option(0.0, "during training, the chance that each output row of the update is dropped (0 to 1)")
    module_dropout: float = option(0.0, "during training, the chance that the whole update is skipped for a step (0 to 1)")
    use_effective_conv2d: bool = option(
        False, "the reference's CP decomposition of convolution kernels; nbpeft adapts linear layers, where it does nothing"
    )
    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )
    rank_pattern: dict[str, int] = option(
        {}, "other ranks for some modules, {name or regex: r}, e.g. {v_proj: 4}; the first key that matches wins"
    )
    alpha_pattern: dict[str, float] = option({}, "other alphas for some modules, {name or regex: alpha}, matched like rank_pattern")
    layers: int | list[int] | None = option(None, "adapt only these block numbers, e.g. layers=[0, 1] (default: every block)")
    layers_pattern: str | list[str] | None = option(
        None, "for layers=: the name the block numbers follow when it is not found by itself, e.g. 'h' or 'layers'"
    )
    exclude: str | list[str] | None = option(None, "modules never adapted: names or suffixes, or a regex over the path")

    def validate(self) -> None:
        m = self.method
        if self.r < 1:
            raise ConfigError(f"{m}: r={self.r} must be a positive integer, e.g. r=8")
        if self.alpha <= 0:
            raise ConfigError(f"{m}: alpha={self.alpha} must be positive, e.g. alpha=8")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{m}: {name}={getattr(self, name)} must be in [0, 1)")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError(f"{m}: targets=[] is empty; name at least one module, e.g. targets=['q_proj']")
        for option_name, patterns, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, float)):
            for key, value in patterns.items():
                check_pattern(m, option_name, key, value, kind)
        layers = [self.layers] if isinstance(self.layers, int) else self.layers or []
        if any(i < 0 for i in layers):
            raise ConfigError(f"{m}: layers={self.layers!r} must be block numbers from 0, e.g. layers=[0, 1]")
        if self.layers_pattern and self.layers is None:
            raise ConfigError(f"{m}: layers_pattern={self.layers_pattern!r} only applies with layers=[...]; add layers")
        if isinstance(self.exclude, str):
            check_regex(m, "exclude", self.exclude)

    def for_module(self, path: str) -> LycorisConfig:
        """This config with the rank and alpha that ``rank_pattern`` and ``alpha_pattern`` give the module at ``path``."""
        r_key = targeting.pattern_key(self.rank_pattern, path)
        alpha_key = targeting.pattern_key(self.alpha_pattern, path)
        if r_key is None and alpha_key is None:
            return self
        return dataclasses.replace(self, r=self.rank_pattern.get(r_key, self.r),
                                   alpha=float(self.alpha_pattern.get(alpha_key, self.alpha)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LycorisLayer(AdapterLayer):
    """A linear layer plus named dense updates built from factors: ``y = base(x) + ΔW x``.

    A subclass names its factor tensors in ``factor_names`` (one ``nn.ParameterDict`` each, keyed by
    adapter; an adapter uses some of them), creates them in :meth:`create` and builds the unscaled
    update (out x in) in :meth:`update`.
    """

    reads_base_weight = False  # forward only calls the base layer (see precision.hold_frozen_weights_in_bf16)
    factor_names: ClassVar[tuple[str, ...]] = ()
    # Whether rank dropout rescales the kept rows by 1 / (share kept): always for LoHa, an option for LoKr.
    rescale_rank_dropout: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()
        self.in_features, self.out_features = targeting.linear_features(inner)
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        for factor in self.factor_names:
            setattr(self, factor, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def add(self, name: str, config: LycorisConfig) -> None:
        factory = adapter_factory(self.innermost().weight)
        for factor, tensor in self.create(config, factory).items():
            getattr(self, factor)[name] = nn.Parameter(tensor)
        self.scaling[name] = config.scaling
        self.rank_dropout[name] = config.rank_dropout
        self.module_dropout[name] = config.module_dropout
        self.rank_dropout_scale[name] = bool(getattr(config, "rank_dropout_scale", self.rescale_rank_dropout))

    def create(self, config: LycorisConfig, factory: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The adapter's factor tensors by factor name, initialised (one of them zero unless ``init_weights=False``)."""
        raise NotImplementedError

    def update(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s unscaled update, out x in."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        for factor in self.factor_names:
            if name in getattr(self, factor):
                del getattr(self, factor)[name]
        for table in (self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale):
            del table[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {factor: getattr(self, factor)[name] for factor in self.factor_names if name in getattr(self, factor)}

    def delta(self, name: str) -> torch.Tensor:
        """``ΔW`` (out x in) in the adapter's dtype; in training with ``rank_dropout``, some rows are dropped."""
        delta = self.update(name) * self.scaling[name]
        p = self.rank_dropout[name]
        if self.training and p > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
            if self.rank_dropout_scale[name]:
                keep = keep / keep.mean().clamp_min(1e-12)
            delta = delta * keep[:, None]
        return delta

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` in the base weight's layout and dtype."""
        delta = self.update(name).float() * self.scaling[name]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base_layer.weight.dtype)

    def merge(self, name: str) -> None:
        self.merge_delta(name, type(self).__name__)

    def unmerge(self, name: str) -> None:
        self.unmerge_delta(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active:
            if name in self.merged or name not in self.scaling:
                continue
            if self.training and self.module_dropout[name] > 0 and torch.rand(()) < self.module_dropout[name]:
                continue
            delta = self.delta(name)
            x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(delta.dtype)
            result = result + F.linear(x_in, delta).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}: {'+'.join(self.adapter_parameters(n))}" for n in self.adapter_names)
        return f"adapters=[{shapes}], active={list(self.active)}"


class LycorisMethod(Method):
    """Selection, per-module settings and the reference's file layout, shared by LoHa and LoKr."""

    identity_at_attach = True
    weight_delta = mergeable = in_reference = True
    holds_token_rows = False  # the reference keeps trainable tokens only beside LoRA
    # Keys of adapter_config.json that are this method's options under the same name.
    same_name_keys: ClassVar[tuple[str, ...]] = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
                                                 "init_weights")

    def select(self, model: nn.Module, config: LycorisConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        chosen = targeting.resolve(model, targets, targeting.linear_types(), self.name)
        return targeting.narrow(model, chosen, targets, self.name, layers=config.layers,
                                layers_pattern=config.layers_pattern, exclude=config.exclude)

    def layer_for(self, model: nn.Module, path: str, config: LycorisConfig) -> tuple[type[AdapterLayer], LycorisConfig]:
        return self.layer_class, config.for_module(path)

    def to_peft_config(self, config: LycorisConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        # the chosen modules exactly (leaf names, else their paths), so no layer or exclusion keys are needed
        return {
            **{key: getattr(config, key) for key in self.same_name_keys},
            "target_modules": targeting.compact_targets(model, chosen),
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": saved_pattern(config.rank_pattern, chosen, config.r),
            "alpha_pattern": saved_pattern(config.alpha_pattern, chosen, config.alpha),
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        def names(value: Any) -> Any:
            return sorted(value) if isinstance(value, (list, tuple, set)) else value

        options = {key: cfg[key] for key in self.same_name_keys if cfg.get(key) is not None}
        if "alpha" in options:
            options["alpha"] = float(options["alpha"])
        layers = cfg.get("layers_to_transform")
        found = {
            "targets": names(cfg.get("target_modules")),
            "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "alpha_pattern": {k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            "layers": None if layers == [] else layers,  # an empty list is the reference's "every block"
            "layers_pattern": (cfg.get("layers_pattern") or None) if layers else None,
            "exclude": names(cfg.get("exclude_modules")) or None,
        }
        options.update({k: v for k, v in found.items() if v is not None and v != {}})
        return options
