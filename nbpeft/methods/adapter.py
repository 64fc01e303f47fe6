"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

At each insertion point the output ``y`` of a frozen module goes through a small
bottleneck with a skip connection::

    y' = y + W_up · act(W_down · y + b_down) + b_up       W_down: b x h,  W_up: h x b

``W_up`` and ``b_up`` start at zero, so the model is unchanged right after attach.
Parameters per insertion point: ``2·h·b + b + h``.

``config="houlsby"`` adds two adapters per layer (after the attention block's output
projection and after the feed-forward block); ``config="pfeiffer"`` adds one (after the
feed-forward block). The adapter wraps the module whose output it transforms, so in BERT
it acts before the residual sum and LayerNorm, where the papers put it.

The non-linearity sits between the projections, so an adapter cannot be merged into the
base weights. On a module that also carries LoRA (or another method that changes the
weight), the adapter reads the frozen module's own output and the other update is added
beside it, ``y = W x + s·B A x + f(W x)`` whatever the attach order; such an update cannot
be merged while the adapter is there. With ``train_layernorms`` each LayerNorm/RMSNorm
gets a trainable copy for this adapter (Houlsby et al. train the norms too).

There is no reference checkpoint format: ``save_adapter`` writes the usual folder with
``peft_type`` ``"BOTTLENECK_ADAPTER"``, our options in adapter_config.json, and keys
``base_model.model.<path>.adapter_down.weight`` (``.bias``, ``adapter_up.weight``, ``.bias``)
plus ``base_model.model.<norm path>.weight`` (``.bias``) for trained norm copies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import architectures, targeting
from ..errors import ConfigError
from ..layers import (
    AdapterLayer,
    TrainedCopy,
    adapter_factory,
    add_adapter,
    innermost,
    set_module,
    undo_on_error,
    wrappers,
)
from .base import Attached, Method, MethodConfig, option, register

DEFAULT_REDUCTION = 16

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

@dataclass
class AdapterConfig(MethodConfig):
    method = "adapter"
    aliases: ClassVar[dict[str, str]] = {"adapter_size": "bottleneck", "bottleneck_size": "bottleneck", "down_sample": "bottleneck",
               "non_linearity": "activation", "target_modules": "targets", "r": "bottleneck"}

    config: str = option(
        "pfeiffer",
        "'houlsby': after the attention output and the feed-forward block (two per layer); "
        "'pfeiffer': after the feed-forward block only",
        choices=("houlsby", "pfeiffer"),
    )
    bottleneck: int | None = option(None, "bottleneck size b (default: hidden // reduction_factor)")
    reduction_factor: float | None = option(
        None, f"b = hidden // reduction_factor (default {DEFAULT_REDUCTION}); give this or bottleneck, not both"
    )
    activation: str = option("relu", "non-linearity between the projections", choices=tuple(ACTIVATIONS))
    train_layernorms: bool = option(
        False, "also train the layer norms (each adapter trains its own copies; the originals stay untouched)"
    )
    targets: str | list[str] | None = option(
        None, "insertion points instead of config's: module names or suffixes, or a regex (linear layers only)"
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ConfigError(
                f"adapter: give bottleneck={self.bottleneck} or reduction_factor={self.reduction_factor}, not both"
            )
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"adapter: bottleneck={self.bottleneck} must be a positive integer, e.g. bottleneck=64")
        if self.reduction_factor is not None and self.reduction_factor <= 0:
            raise ConfigError(f"adapter: reduction_factor={self.reduction_factor} must be positive, e.g. 16")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("adapter: targets=[] is empty; leave it out to use config='houlsby' or 'pfeiffer'")


def bottleneck_size(config: AdapterConfig, hidden: int) -> int:
    """``config.bottleneck``, or ``hidden // reduction_factor``."""
    if config.bottleneck is not None:
        return config.bottleneck
    factor = config.reduction_factor if config.reduction_factor is not None else DEFAULT_REDUCTION
    size = int(hidden // factor)
    if size < 1:
        raise ConfigError(
            f"adapter: reduction_factor={factor} leaves no bottleneck for hidden size {hidden}; use a smaller one"
        )
    return size


def out_features(module: nn.Module) -> int:
    """Width of a linear layer's output (``nn.Linear`` or transformers' ``Conv1D``)."""
    inner = innermost(module)
    width = getattr(inner, "out_features", None) or getattr(inner, "nf", None) or getattr(inner, "hidden_dim", None)
    if not isinstance(width, int):
        raise ConfigError(f"adapter: cannot tell the output width of {type(inner).__name__}; target linear layers")
    return width


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and RMSNorm modules (torch's and the models' own classes) that have weights."""
    named = re.search(r"(LayerNorm|RMSNorm)$", type(module).__name__) is not None
    return (named or isinstance(module, nn.LayerNorm)) and any(True for _ in module.parameters(recurse=False))


class BottleneckAdapter(AdapterLayer):
    """A linear layer followed by named bottleneck adapters: ``y = base(x); y = y + up(act(down(y)))``.

    Several active adapters are applied one after another. The layer also holds the
    AdapterFusion modules that combine its adapters (see ``fusion.py``): a fusion named
    ``f`` computes ``y + fusion_f(y, [up_i(act(down_i(y)))])`` with its adapters frozen.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hidden_size = out_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()
        self.activation: dict[str, str] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_down) + list(self.adapter_fusion)

    def add(self, name: str, config: MethodConfig) -> None:
        inner = self.innermost()
        # a block without one weight (a mixture of experts) gives its first parameter's device and dtype
        factory = adapter_factory(inner.weight if isinstance(getattr(inner, "weight", None), torch.Tensor) else next(inner.parameters()))
        if not isinstance(config, AdapterConfig):  # a fusion config builds its own combining module
            self.adapter_fusion[name] = config.build_layer(self.hidden_size, factory)
            return
        size = bottleneck_size(config, self.hidden_size)
        self.adapter_down[name] = nn.Linear(self.hidden_size, size, **factory)  # torch's default init
        self.adapter_up[name] = nn.Linear(size, self.hidden_size, **factory)
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)
        self.activation[name] = config.activation

    def delete(self, name: str) -> None:
        if name in self.adapter_fusion:
            del self.adapter_fusion[name]
        else:
            del self.adapter_down[name], self.adapter_up[name], self.activation[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.adapter_fusion:
            return {f"adapter_fusion.{k}": p for k, p in self.adapter_fusion[name].named_parameters()}
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def bottleneck_output(self, name: str, y: torch.Tensor) -> torch.Tensor:
        """The adapter's update ``up(act(down(y)))`` (without the skip connection), in fp32 or the adapter's dtype."""
        down = self.adapter_down[name]
        return self.adapter_up[name](ACTIVATIONS[self.activation[name]](down(y.to(down.weight.dtype))))

    @property
    def in_features(self) -> int:
        inner = self.innermost()
        return getattr(inner, "in_features", None) or inner.weight.shape[0]  # Conv1D keeps (in, out)

    @property
    def out_features(self) -> int:
        return self.hidden_size

    # Methods stacked on this layer (LoRA) read the weight's dtype and shape; folding an
    # update into it would change what the adapter sees, so they get a copy they cannot set.
    @property
    def weight(self) -> torch.Tensor:
        return self.innermost().weight.detach().clone()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        raise NotImplementedError("cannot merge into a module that carries a bottleneck adapter")

    def merge(self, name: str) -> None:
        raise NotImplementedError("a bottleneck adapter cannot be merged: its non-linearity sits between the projections")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        for name in self.active:
            if name in self.adapter_down:
                y = y + self.bottleneck_output(name, y).to(y.dtype)
            elif name in self.adapter_fusion:
                fusion = self.adapter_fusion[name]
                updates = [self.bottleneck_output(n, y) for n in fusion.adapters]
                y = y + fusion(y, updates).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        parts = [f"{n}: b={self.adapter_down[n].out_features} {self.activation[n]}" for n in self.adapter_down]
        parts += [f"{n}: fusion of {', '.join(f.adapters)}" for n, f in self.adapter_fusion.items()]
        return f"hidden={self.hidden_size}, adapters=[{', '.join(parts)}], active={list(self.active)}"


def default_places(model: nn.Module, config: str) -> str | list[str]:
    """The insertion points for ``config`` on this architecture: the attention and feed-forward outputs.

    Where no single linear layer ends the feed-forward block (a mixture of experts), the
    module whose output is the block's result takes its place.
    """
    row = architectures.family(model)
    ffn = "ffn_out" if row is not None and row.ffn_out else "ffn_block_output"
    if architectures.role_targets(model, "attention_output", ffn) is None:
        raise ConfigError(
            f"adapter: no default insertion points for model_type={architectures.model_type(model)!r}; pass targets=[...] "
            "(the linear layers whose outputs feed the residual stream)"
        )
    roles = (ffn,) if config == "pfeiffer" else ("attention_output", ffn)
    return architectures.role_targets(model, *roles)


def _place_text(paths: list[str]) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj``; distinct places in order."""
    tails = [re.sub(r"^.*?\.\d+\.", "", p) for p in paths]
    return ", ".join(dict.fromkeys(tails))


def _merged_wrapper(module: nn.Module) -> list[str]:
    return [name for layer in wrappers(module) for name in layer.merged]


def _move_innermost(model: nn.Module, path: str) -> None:
    """``X1(...Xk(L(W)))`` instead of ``L(X1(...Xk(W)))`` for our layer ``L``: attach order stops mattering."""
    outer = model.get_submodule(path)
    if not isinstance(outer, BottleneckAdapter) or not isinstance(outer.base_layer, AdapterLayer):
        return
    last = list(wrappers(outer.base_layer))[-1]
    set_module(model, path, outer.base_layer)
    outer.base_layer, last.base_layer = last.base_layer, outer


def _norm_paths(model: nn.Module) -> list[str]:
    return [p for p, m in targeting.base_modules(model).items() if p and is_norm(m)]


class BottleneckAdapterMethod(Method):
    name = "adapter"
    description = "Bottleneck adapters (Houlsby / Pfeiffer): down, non-linearity, up, skip; not mergeable"
    config_class = AdapterConfig
    layer_class = BottleneckAdapter
    peft_type = "BOTTLENECK_ADAPTER"
    listing_order = 40
    usual_lr = 5e-4  # bottleneck adapters (Houlsby et al. 2019) train at 1e-4 to 1e-3
    compare_options = {"bottleneck": 64}
    identity_at_attach = True

    def select(self, model: nn.Module, config: AdapterConfig, attached: Mapping[str, Attached]) -> list[str]:
        return self.places(model, config)

    def places(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        """The insertion points, checked: each gets a bottleneck and carries no merged adapter."""
        places = config.targets if config.targets is not None else default_places(model, config.config)
        # the family table may name a block that is not one linear layer (a mixture of experts)
        kinds = targeting.linear_types() if config.targets is not None else (nn.Module,)
        chosen = targeting.resolve(model, places, kinds, self.name)
        modules = targeting.base_modules(model)
        for path in chosen:
            bottleneck_size(config, out_features(modules[path]))
            merged = _merged_wrapper(model.get_submodule(path))
            if merged:
                raise ConfigError(f"adapter: {path} carries merged adapter(s) {merged}; unmerge them first")
        if config.train_layernorms and not _norm_paths(model):
            raise ConfigError("adapter: train_layernorms=True but this model has no LayerNorm or RMSNorm")
        return chosen

    def on_attach(self, model: nn.Module, name: str, config: AdapterConfig) -> None:
        """Put each new adapter layer right on its frozen module; with ``train_layernorms``
        every norm gets a trainable copy for this adapter."""
        paths = self.places(model, config)
        if config.train_layernorms:
            self._copy_norms(model, name, config)
        for path in paths:  # plain attribute moves, last: nothing after them can fail
            _move_innermost(model, path)

    def _copy_norms(self, model: nn.Module, name: str, config: AdapterConfig) -> None:
        with undo_on_error() as undo:
            for path in _norm_paths(model):
                undo.append(add_adapter(model, path, TrainedCopy, name, config))

    def notes(self, model: nn.Module, config: AdapterConfig, targets: list[str]) -> list[str]:
        modules = targeting.base_modules(model)
        sizes = sorted({bottleneck_size(config, out_features(modules[p])) for p in targets})
        where = "custom places" if config.targets is not None else config.config
        notes = [f"{where}: bottleneck {'/'.join(map(str, sizes))} ({config.activation}) after {_place_text(targets)}"]
        if config.train_layernorms:
            notes.append(f"own copies of {len(_norm_paths(model))} layer norms")
        return notes

    def to_peft_config(self, config: AdapterConfig, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        """Our options as given (no reference format exists) plus the resolved module list."""
        fields = {k: v for k, v in config.to_dict().items() if k != "modules_to_save"}
        return {**fields, "target_modules": targeting.compact_targets(model, targets)}


register(BottleneckAdapterMethod())
