"""(IA)³: learned vectors that rescale activations inside the frozen model.

For a frozen linear layer ``y = W x + b`` (IA)³ learns one vector ``l``, initialised to ones::

    attention targets (keys, values):   y = l ⊙ (W x + b)        ia3_l shape [out_features, 1]
    feed-forward targets (down proj):   y = W (l ⊙ x) + b        ia3_l shape [1, in_features]

so ``l_k`` and ``l_v`` rescale keys and values and ``l_ff`` rescales the feed-forward block's
inner activation. Merging folds ``l`` into the weight (rows, and the bias, for attention
targets; columns for feed-forward targets).

GPT-2 fuses queries, keys and values in one ``c_attn`` (out = 3 × hidden). Its ``ia3_l`` keeps
the full ``[3 × hidden, 1]`` shape of the file format, but with ``fused_qkv='kv'`` (the default)
the query third is held at 1: the forward uses 1 there, so it gets no gradient. A file whose
query third is not all ones (the reference scales all of ``c_attn``) loads with ``fused_qkv='qkv'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import architectures, targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_factory, adapter_layers, find_layer
from .base import Attached, Method, MethodConfig, option, register


@dataclass
class IA3Config(MethodConfig):
    method = "ia3"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "feedforward_modules": "feedforward", "init_ia3_weights": "init"}

    targets: str | list[str] | None = option(
        None, "module names or suffixes, or a regex (default: keys, values and the feed-forward down projection)"
    )
    feedforward: str | list[str] | None = option(
        None, "the targets whose input is scaled (l_ff), a subset of targets (default: the feed-forward down projection)"
    )
    init: str = option("ones", "'ones': identity at attach; 'random': 1 + N(0, 0.1²), for tests", choices=("ones", "random"))
    fused_qkv: str = option(
        "kv", "GPT-2's fused c_attn: 'kv' scales keys and values only (query third held at 1); 'qkv' scales all",
        choices=("kv", "qkv"),
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("ia3: targets=[] is empty; name at least one module, e.g. targets=['k_proj', 'v_proj']")


def _fused_query_rows(module: nn.Module, path: str) -> int:
    """Rows of GPT-2's fused c_attn output that are queries (0 for any other module)."""
    if path.rsplit(".", 1)[-1] != "c_attn" or not targeting.is_conv1d(module):
        return 0
    in_features, out_features = targeting.linear_features(module)
    return in_features if out_features == 3 * in_features else 0


class IA3Layer(AdapterLayer):
    """A linear layer (``nn.Linear`` or ``Conv1D``) whose output or input is rescaled by ``ia3_l``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = targeting.linear_features(self.innermost())
        self.fan_in_fan_out = targeting.is_conv1d(self.innermost())
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.fixed_rows: dict[str, int] = {}  # leading output rows held at 1 (GPT-2's fused queries)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def add(self, name: str, config: IA3Config) -> None:
        """Add an output-scaling vector; :meth:`scale_input` turns it into a feed-forward one."""
        self.ia3_l[name] = self._vector((self.out_features, 1), config.init)
        self.feedforward[name] = False
        self.fixed_rows[name] = 0

    def scale_input(self, name: str, init: str) -> None:
        self.ia3_l[name] = self._vector((1, self.in_features), init)
        self.feedforward[name] = True

    def _vector(self, shape: tuple[int, int], init: str) -> nn.Parameter:
        vector = torch.ones(shape, **adapter_factory(self.innermost().weight))
        if init == "random":
            vector += 0.1 * torch.randn_like(vector)
        return nn.Parameter(vector)

    def delete(self, name: str) -> None:
        del self.ia3_l[name]
        del self.feedforward[name]
        del self.fixed_rows[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l[name]}

    def scale(self, name: str) -> torch.Tensor:
        """The vector in use, flat: ``ia3_l`` with any fixed rows set to 1."""
        vector = self.ia3_l[name].reshape(-1)
        fixed = self.fixed_rows[name]
        return torch.cat([torch.ones_like(vector[:fixed]), vector[fixed:]]) if fixed else vector

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("ia3 wraps another adapter here; merge that one first or detach it")
        base = self.base_layer
        self.keep_original_weight()
        if base.bias is not None:
            self.keep_original("bias", base.bias)
        vector = self.scale(name).to(base.weight.dtype)
        self._rescale(vector, self.feedforward[name])
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self._rescale(1.0 / self.scale(name).to(self.base_layer.weight.dtype), self.feedforward[name])
        self.merged.remove(name)
        self.restore_original_weight()
        if not self.merged and self.base_layer.bias is not None:  # put back the exact original bias too
            self.restore_original("bias", self.base_layer.bias)

    def _rescale(self, vector: torch.Tensor, feedforward: bool) -> None:
        base = self.base_layer
        # Linear stores (out, in); Conv1D stores (in, out).
        scales_rows = feedforward == targeting.is_conv1d(base)
        base.weight.mul_(vector[:, None] if scales_rows else vector[None, :])
        if not feedforward and base.bias is not None:
            base.bias.mul_(vector)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [] if self.disabled else [n for n in self.active if n in self.ia3_l and n not in self.merged]
        for name in names:
            if self.feedforward[name]:
                x = x * self.scale(name).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            if not self.feedforward[name]:
                result = result * self.scale(name).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}: {'input' if self.feedforward[n] else 'output'}" for n in self.ia3_l)
        return f"adapters=[{kinds}], active={list(self.active)}"


class IA3(Method):
    name = "ia3"
    description = "(IA)³: learned vectors rescale keys, values and the feed-forward activation; mergeable"
    config_class = IA3Config
    layer_class = IA3Layer
    peft_type = "IA3"
    listing_order = 20
    usual_lr = 3e-3  # the reference's IA3 examples: a few scales need ~10× LoRA's rate
    identity_at_attach = True
    weight_delta = mergeable = in_reference = True
    holds_token_rows = False  # the reference keeps trainable tokens only beside LoRA

    def select(self, model: nn.Module, config: IA3Config, attached: Mapping[str, Attached]) -> list[str]:
        return self._resolve(model, config)[0]

    @staticmethod
    def default_targets(model: nn.Module) -> tuple[str | list[str], str | list[str]] | None:
        """(targets, feed-forward targets) for the model's family: keys, values and the feed-forward output.

        A fused query/key/value projection is scaled whole (GPT-2's query third held at 1 by
        ``fused_qkv='kv'``); a family whose experts are parameters, not linear layers, gets
        keys and values only.
        """
        family = architectures.family(model)
        attention = ("key", "value") if family is not None and family.key else ("qkv",) if family is not None and family.qkv else None
        if attention is None:
            return None
        roles = attention + (("ffn_out",) if family.ffn_out else ())
        return architectures.role_targets(model, *roles), architectures.role_targets(model, "ffn_out") or []

    def _resolve(self, model: nn.Module, config: IA3Config) -> tuple[list[str], list[str]]:
        """(targets, feed-forward targets) as module paths."""
        defaults = self.default_targets(model)
        targets = config.targets
        if targets is None:
            if defaults is None:
                raise ConfigError("ia3: no default targets for this model; pass targets=[...] and feedforward=[...]")
            targets = defaults[0]
        chosen = targeting.resolve(model, targets, targeting.linear_types(), self.name)
        feedforward = config.feedforward if config.feedforward is not None else (defaults[1] if defaults else [])
        ff = [p for p in chosen if targeting.match(p, feedforward)]
        parts = [feedforward] if isinstance(feedforward, str) else [[f] for f in feedforward]
        unmatched = [f for f in parts if not any(targeting.match(p, f) for p in chosen)]
        if config.feedforward is not None and unmatched:
            raise ConfigError(f"ia3: feedforward={unmatched[0]!r} matches none of the chosen targets; "
                              "feedforward must name a subset of targets")
        return chosen, ff

    def on_attach(self, model: nn.Module, name: str, config: IA3Config) -> None:
        chosen, ff = self._resolve(model, config)
        modules = targeting.base_modules(model)
        for path in chosen:
            layer = find_layer(model.get_submodule(path), IA3Layer)
            if path in ff:
                layer.scale_input(name, config.init)
            elif config.fused_qkv == "kv":
                layer.fixed_rows[name] = _fused_query_rows(modules[path], path)

    def notes(self, model: nn.Module, config: IA3Config, targets: list[str]) -> list[str]:
        modules = targeting.base_modules(model)
        fused = [p for p in targets if _fused_query_rows(modules[p], p)]
        if fused and config.fused_qkv == "kv":
            return [f"fused c_attn ×{len(fused)}: keys and values scaled, query third held at 1"]
        row = architectures.family(model)
        whole = [p for p in targets if row is not None and row.qkv and not row.qkv_thirds and targeting.match(p, list(row.qkv))]
        if whole:
            leaf = whole[0].rsplit(".", 1)[-1]
            return [f"fused {leaf} ×{len(whole)}: queries are scaled too, as in the reference"]
        return []

    def to_peft_config(self, config: IA3Config, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        _, ff = self._resolve(model, config)
        modules = targeting.base_modules(model)
        return {
            "target_modules": targeting.compact_targets(model, chosen),
            "feedforward_modules": targeting.compact_targets(model, ff) if ff else [],
            "fan_in_fan_out": any(targeting.is_conv1d(modules[p]) for p in chosen),
            "init_ia3_weights": config.init == "ones",
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        def names(value: Any) -> Any:
            return sorted(value) if isinstance(value, (list, tuple, set)) else value

        # a missing feedforward_modules means the model's default, as in the reference
        return {"targets": names(cfg.get("target_modules")), "feedforward": names(cfg.get("feedforward_modules"))}

    def checkpoint_tensors(self, model: nn.Module, adapter: Attached, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        name = adapter.name
        # The file holds the vectors in use: a query third held at 1 is written as ones.
        used = dict(params)
        for path, layer in adapter_layers(model):
            if isinstance(layer, IA3Layer) and layer.fixed_rows.get(name):
                used[f"{path}.ia3_l"] = layer.scale(name).reshape(layer.ia3_l[name].shape)
        return super().checkpoint_tensors(model, adapter, used)

    def from_checkpoint(self, model: nn.Module, adapter: Attached, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = adapter.name
        params = super().from_checkpoint(model, adapter, tensors)
        # A file that scales GPT-2's query third too (as the reference does) keeps doing so.
        fused = [(p, layer) for p, layer in adapter_layers(model) if isinstance(layer, IA3Layer) and layer.fixed_rows.get(name)]
        for path, layer in fused:
            value = params.get(f"{path}.ia3_l")
            if value is not None and value.numel() == layer.out_features and not torch.all(value[: layer.fixed_rows[name]] == 1):
                for _, other in fused:
                    other.fixed_rows[name] = 0
                adapter.config.fused_qkv = "qkv"
                break
        return params


register(IA3())
