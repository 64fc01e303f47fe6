"""LoRA: a low-rank update beside a frozen linear layer.

For a frozen weight ``W`` (out x in) LoRA learns ``A`` (r x in) and ``B`` (out x r)::

    y = W x + (alpha / r) * B A x          (alpha / sqrt(r) with rslora)

``B`` starts at zero, so the model is unchanged right after attach. Merging adds
``(alpha / r) * B A`` to ``W``: no extra latency at inference.

Per module, as the reference's files spell them: ``rank_pattern`` and ``alpha_pattern`` give
some modules another ``r`` or ``alpha``; ``layers`` and ``exclude`` narrow the targets;
``lora_bias`` adds a bias to ``B``, scaled with the update (``s·(B A x + b)``). Embedding
targets get :class:`LoRAEmbedding`, a low-rank update of the table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import architectures, targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_factory, get_module, innermost
from . import lora_experts, lora_init
from .base import Attached, Method, MethodConfig, option, register


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
               "use_rslora": "rslora", "init_lora_weights": "init", "layers_to_transform": "layers",
               "exclude_modules": "exclude"}

    r: int = option(8, "rank of the update B·A")
    alpha: float = option(16.0, "scale numerator: the update is multiplied by alpha / r")
    dropout: float = option(0.0, "dropout on the adapter's input during training (0 to 1)")
    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    rslora: bool = option(False, "rank-stabilised scale alpha / sqrt(r)")
    init: str = option(
        "default",
        "'default': A random, B zero (identity at attach); 'gaussian': A ~ N(0, 1/r); 'random': B random too; "
        "'pissa': top singular vectors of W, 'olora': QR of W (both move part of W into B·A, output unchanged); "
        "'loftq' (qlora): B·A cancels the 4-bit error",
        choices=("default", "gaussian", "random", "pissa", "olora", "loftq"),
    )
    pissa_niter: int = option(0, "init='pissa': subspace iterations of a fast randomised SVD (0: exact SVD; e.g. 4)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )
    rank_pattern: dict[str, int] = option(
        {}, "other ranks for some modules, {name or regex: r}, e.g. {v_proj: 4}; a key matches the end of a "
        "module's path, the first that matches wins"
    )
    alpha_pattern: dict[str, float] = option({}, "other alphas for some modules, {name or regex: alpha}, matched like rank_pattern")
    layers: int | list[int] | None = option(None, "adapt only these block numbers, e.g. layers=[0, 1] (default: every block)")
    layers_pattern: str | list[str] | None = option(
        None, "for layers=: the name the block numbers follow when it is not found by itself, e.g. 'h' or 'layers'"
    )
    exclude: str | list[str] | None = option(None, "modules never adapted: names or suffixes, or a regex over the path")
    lora_bias: bool = option(False, "a trainable bias on B, starting at zero (merging needs a base layer with a bias)")
    target_parameters: str | list[str] | None = option(
        None, "3-D expert weights to adapt, e.g. ['mlp.experts.gate_up_proj'], or 'experts' for the family's "
        "(alone, without targets=, only these are adapted)"
    )

    def __post_init__(self) -> None:
        fast = lora_init.fast_pissa(self.init)  # the reference spells the fast SVD into the init's name
        if fast is not None:
            self.init, self.pissa_niter = "pissa", fast
        super().__post_init__()

    def validate(self) -> None:
        if self.init == "loftq" and self.method != "qlora":
            raise ConfigError(f"{self.method}: init='loftq' needs a 4-bit base; attach 'qlora' with init='loftq'")
        if self.pissa_niter < 0:
            raise ConfigError(f"{self.method}: pissa_niter={self.pissa_niter} must be 0 (exact SVD) or more, e.g. 4")
        if self.r < 1:
            raise ConfigError(f"{self.method}: r={self.r} must be a positive integer, e.g. r=8")
        if self.alpha <= 0:
            raise ConfigError(f"{self.method}: alpha={self.alpha} must be positive, e.g. alpha=16")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.method}: dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError(f"{self.method}: targets=[] is empty; name at least one module, e.g. targets=['q_proj']")
        for option_name, patterns, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, float)):
            for key, value in patterns.items():
                check_pattern(self.method, option_name, key, value, kind)
        layers = [self.layers] if isinstance(self.layers, int) else self.layers or []
        if any(i < 0 for i in layers):
            raise ConfigError(f"{self.method}: layers={self.layers!r} must be block numbers from 0, e.g. layers=[0, 1]")
        if self.layers_pattern and self.layers is None:
            raise ConfigError(f"{self.method}: layers_pattern={self.layers_pattern!r} only applies with layers=[...]; add layers")
        if isinstance(self.exclude, str):
            check_regex(self.method, "exclude", self.exclude)

    def for_module(self, path: str) -> LoraConfig:
        """This config with the rank and alpha that ``rank_pattern`` and ``alpha_pattern`` give the module at ``path``."""
        r_key = targeting.pattern_key(self.rank_pattern, path)
        alpha_key = targeting.pattern_key(self.alpha_pattern, path)
        if r_key is None and alpha_key is None:
            return self
        return dataclasses.replace(self, r=self.rank_pattern.get(r_key, self.r),
                                   alpha=float(self.alpha_pattern.get(alpha_key, self.alpha)))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def check_regex(method: str, option_name: str, text: str) -> None:
    try:
        re.compile(text)
    except re.error as err:
        raise ConfigError(f"{method}: {option_name} has {text!r}, which is not a valid regex ({err})") from None


def check_pattern(method: str, option_name: str, key: Any, value: Any, kind: type) -> None:
    example = f"{option_name}={{'v_proj': {4 if kind is int else 8.0}}}"
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{method}: {option_name} keys must be module names or regexes, got {key!r}; e.g. {example}")
    check_regex(method, option_name, key)
    number = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not number or isinstance(value, bool) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{method}: {option_name}[{key!r}]={value!r} must be {what}, e.g. {example}")


def saved_pattern(patterns: dict[str, Any], chosen: list[str], default: Any) -> dict[str, Any]:
    """``patterns`` as a file holds them: the JSON is written with sorted keys and the first matching key
    wins, so where sorting would change what a module gets, each such module is written by its exact path."""
    def values(order: dict[str, Any]) -> dict[str, Any]:
        return {path: order.get(targeting.pattern_key(order, path), default) for path in chosen}

    given = values(patterns)
    if values(dict(sorted(patterns.items()))) == given:
        return dict(patterns)
    return {re.escape(path): value for path, value in given.items() if value != default}


class ScaledBiasLinear(nn.Linear):
    """LoRA's ``B`` with ``lora_bias``: the bias is scaled with the update, ``B h + s·b`` for ``h = s·A x``."""

    def __init__(self, in_features: int, out_features: int, scaling: float, **factory: Any) -> None:
        super().__init__(in_features, out_features, bias=True, **factory)
        self.bias_scaling = scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight) + self.bias * self.bias_scaling


class LoRALinear(AdapterLayer):
    """``nn.Linear`` or ``Conv1D`` plus named low-rank updates: ``y = base(x) + s·B(A(drop(x)))``."""

    reads_base_weight = False  # forward only calls the base layer (see precision.hold_frozen_weights_in_bf16)
    routes_rows = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()  # another method's layer may sit in between
        self.in_features, self.out_features = targeting.linear_features(inner)
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.reweighted_by: str | None = None  # the adapter whose init rewrote the base weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add(self, name: str, config: LoraConfig) -> None:
        self.add_update(name, config, adapter_factory(self.innermost().weight))

    def add_update(self, name: str, config: LoraConfig, factory: dict[str, Any]) -> None:
        """Create adapter ``name``'s ``A``, ``B`` and dropout with tensors made as ``factory`` says."""
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        if config.lora_bias:
            self.lora_B[name] = ScaledBiasLinear(config.r, self.out_features, config.scaling, **factory)
        else:
            self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self._init(name, config)
        if config.lora_bias:
            nn.init.zeros_(self.lora_B[name].bias)

    @torch.no_grad()
    def _init(self, name: str, config: LoraConfig) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        init, r = config.init, A.shape[0]
        if init in lora_init.REWEIGHTING:
            try:
                self._init_from_weight(name, config)
            except Exception:
                self.delete(name)
                raise
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(B, std=0.02)
        else:
            nn.init.zeros_(B)

    @torch.no_grad()
    def _init_from_weight(self, name: str, config: LoraConfig) -> None:
        """PiSSA, OLoRA or LoftQ (``lora_init``): ``A``, ``B`` and a new base weight from the base weight."""
        weight = self.dense_weight()
        if weight.is_meta:  # a shapes-only copy (nbpeft.compare): nothing to compute
            return
        reweighted = self.reweighted_by
        if isinstance(self.base_layer, AdapterLayer) or self.merged or reweighted:
            why = f"adapter {reweighted!r} already changed it" if reweighted else "another adapter is merged into it or wraps it"
            raise ConfigError(f"{config.method}: init={config.init!r} rewrites this layer's base weight, but {why}; "
                              "attach it first or use init='default'")
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        weight = weight.to(A.device, torch.float32)
        scaling = self.scaling[name]
        if config.init == "pissa":
            start = lora_init.pissa(weight, A.shape[0], scaling, config.pissa_niter)
        elif config.init == "olora":
            start = lora_init.olora(weight, A.shape[0], scaling)
        else:
            start = self._loftq(weight, A.shape[0], scaling, config)
        A.copy_(start.A)
        B.copy_(start.B)
        self.replace_base_weight(start.base)
        self.reweighted_by = name
        self.initial_factors[name] = (start.A.to("cpu", copy=True), start.B.to("cpu", copy=True))

    def _loftq(self, weight: torch.Tensor, rank: int, scaling: float, config: LoraConfig) -> lora_init.Init:
        raise ConfigError(f"{config.method}: init='loftq' needs a 4-bit base; attach 'qlora' with init='loftq'")

    def dense_weight(self) -> torch.Tensor:
        """The base weight as ``out x in``."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def replace_base_weight(self, dense: torch.Tensor) -> None:
        """Put ``dense`` (out x in) in the base weight; a CPU copy of the original comes back on removal."""
        weight = self.base_layer.weight
        self.keep_original("weight before init", weight)
        weight.copy_((dense.T if self.fan_in_fan_out else dense).to(weight.dtype))

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        """Undo :meth:`replace_base_weight` bit for bit."""
        self.restore_original("weight before init", self.base_layer.weight)

    @property
    def initial_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(A₀, B₀)`` of each adapter whose init rewrote the base weight (CPU copies, for plain-LoRA saving)."""
        return self.__dict__.setdefault("_initial_factors", {})

    def delete(self, name: str) -> None:
        if self.reweighted_by == name:
            self.restore_base_weight()
            self.reweighted_by = None
        self.initial_factors.pop(name, None)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if self.lora_B[name].bias is not None:
            params["lora_B.bias"] = self.lora_B[name].bias
        return params

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
        lora_bias = self.lora_B[name].bias
        if lora_bias is not None and getattr(self.base_layer, "bias", None) is None:
            raise NotImplementedError("its lora_bias has no base bias to go into (the layer has none)")
        if name not in self.merged:
            if getattr(self.base_layer, "bias", None) is not None:
                self.keep_original("bias", self.base_layer.bias)
            self.keep_original_weight()
            self.base_layer.weight += self.delta_weight(name)
            if lora_bias is not None:
                self.base_layer.bias += (lora_bias * self.scaling[name]).to(self.base_layer.bias.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.base_layer.weight -= self.delta_weight(name)
            self.merged.remove(name)
            self.restore_original_weight()
            if not self.merged and getattr(self.base_layer, "bias", None) is not None:  # bit-exact, like the weight
                self.restore_original("bias", self.base_layer.bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.rows is not None:
            return self.forward_rows(x, result)
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

    def forward_rows(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus, on each row, the update of that row's adapter (rows of one adapter run together)."""
        if x.shape[0] != self.row_count:
            raise ConfigError(f"adapter_names= has {self.row_count} names for a batch of {x.shape[0]} rows; give one per row")
        for name, rows in self.rows.items():
            if name in self.lora_A:
                update = self.row_update(name, x.index_select(0, rows), result, rows)
                # in place: one copy of the batch's output per adapter would cost more than the update itself
                result.index_add_(0, rows, update.to(result.dtype))
        return result

    def row_update(self, name: str, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s update for the rows ``x`` (``rows`` of the batch, whose base output is ``result``)."""
        A = self.lora_A[name]
        x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(A.weight.dtype)
        return self.lora_B[name](A(x_in) * self.scaling[name])

    def _stackable(self, names: list[str]) -> bool:
        """Whether the adapters can run as one: no dropout in the way, one dtype."""
        no_dropout = not self.training or all(isinstance(self.lora_dropout[n], nn.Identity) for n in names)
        no_bias = all(self.lora_B[n].bias is None for n in names)
        return no_dropout and no_bias and len({self.lora_A[n].weight.dtype for n in names}) == 1

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.lora_A[n].out_features}" for n in self.lora_A)
        return f"adapters=[{ranks}], active={list(self.active)}"


class LoRAEmbedding(AdapterLayer):
    """``nn.Embedding`` plus named low-rank updates of its table.

    For token ids ``i`` and a table ``E`` (vocab x dim), ``A`` (r x vocab) and ``B`` (dim x r)::

        y = E[i] + s·(A.T[i] @ B.T)          (times the layer's embed_scale, where it has one)

    ``A`` starts at zero and ``B`` random (the other way round from linear layers: a zero row
    lookup keeps the gradient of ``B`` alive), so the model is unchanged right after attach.
    The tensors are kept as the reference names them, ``lora_embedding_A`` and ``lora_embedding_B``.
    Dropout does not apply to a lookup.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()
        self.num_embeddings, self.embedding_dim = inner.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A)

    @torch.no_grad()
    def add(self, name: str, config: LoraConfig) -> None:
        if config.lora_bias:
            raise ConfigError(f"{config.method}: lora_bias=True does not apply to an embedding; leave it out of targets or drop lora_bias")
        if config.init not in ("default", "gaussian", "random"):
            raise ConfigError(f"{config.method}: init={config.init!r} is for linear layers; an embedding takes init='default'")
        factory = adapter_factory(self.innermost().weight)
        A = torch.zeros(config.r, self.num_embeddings, **factory)
        B = torch.empty(self.embedding_dim, config.r, **factory)
        nn.init.normal_(B)
        if config.init == "random":
            nn.init.normal_(A)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)
        self.scaling[name] = config.scaling

    def delete(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def _embed_scale(self) -> torch.Tensor | float:
        """Gemma's embeddings multiply the lookup by a constant: the update is scaled the same way."""
        scale = getattr(self.innermost(), "embed_scale", None)
        return 1.0 if scale is None else scale

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·(B·A).T``, the change of the (vocab x dim) table, in the table's dtype."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        return ((B.float() @ A.float()).T * self.scaling[name]).to(self.base_layer.weight.dtype)

    def merge(self, name: str) -> None:
        self.merge_delta(name, "LoRA")

    def unmerge(self, name: str) -> None:
        self.unmerge_delta(name)

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(input_ids, *args, **kwargs)
        names = [] if self.disabled else [n for n in self.active if n in self.lora_embedding_A and n not in self.merged]
        padding_idx = getattr(self.innermost(), "padding_idx", None)
        for name in names:
            rows = F.embedding(input_ids, self.lora_embedding_A[name].T, padding_idx=padding_idx)
            update = (rows @ self.lora_embedding_B[name].T) * self.scaling[name]
            result = result + (update * self._embed_scale()).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.lora_embedding_A[n].shape[0]}" for n in self.lora_embedding_A)
        return f"adapters=[{ranks}], active={list(self.active)}"


# Keys of a LORA file that change the outputs in ways nbpeft's lora does not reproduce, with the value that
# means "not used". A file that uses any of them is refused rather than loaded into a different model.
_UNSUPPORTED_KEYS = {
    "bias": "none", "layer_replication": None, "alora_invocation_tokens": None,
    "use_qalora": False, "velora_config": None, "kasa_config": None, "monteclora_config": None,
    "use_bdlora": None, "arrow_config": None, "ensure_weight_tying": False,
}


class LoRA(Method):
    name = "lora"
    description = "Low-rank update B·A beside frozen linear layers (and embeddings); mergeable"
    config_class = LoraConfig
    layer_class = LoRALinear
    peft_type = "LORA"
    listing_order = 10
    compare_options = {"r": 8}
    adapts_embeddings: ClassVar[bool] = True
    identity_at_attach = True
    weight_delta = mergeable = plain_lora = in_reference = True

    def disabled_is_start(self, config: LoraConfig) -> bool:
        # B starts at zero; 'random' starts B elsewhere and PiSSA, OLoRA, LoftQ rewrite the base weight
        return config.init in ("default", "gaussian")

    def kinds(self) -> tuple[type, ...]:
        return targeting.linear_types() + ((nn.Embedding,) if self.adapts_embeddings else ())

    def select(self, model: nn.Module, config: LoraConfig, attached: Mapping[str, Attached]) -> list[str]:
        if config.target_parameters is not None:
            lora_experts.resolve_parameters(model, config.target_parameters, self.name)  # checked before any change
            if config.targets is None:
                return []
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        chosen = targeting.resolve(model, targets, self.kinds(), self.name)
        return targeting.narrow(model, chosen, targets, self.name, layers=config.layers,
                                layers_pattern=config.layers_pattern, exclude=config.exclude)

    def layer_for(self, model: nn.Module, path: str, config: LoraConfig) -> tuple[type[AdapterLayer], LoraConfig]:
        cls = LoRAEmbedding if isinstance(innermost(get_module(model, path)), nn.Embedding) else self.layer_class
        return cls, config.for_module(path)

    def notes(self, model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
        unused = [f"{option_name} key {key!r}"
                  for option_name, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern))
                  for key in patterns if not any(targeting.pattern_key({key: 0}, p) for p in targets)]
        notes = [f"{', '.join(unused)} matched no adapted module"] if unused else []
        if config.target_parameters is not None:
            found = lora_experts.resolve_parameters(model, config.target_parameters, self.name)
            notes.append(f"expert weights: {sum(map(len, found.values()))} parameters in {len(found)} modules")
        return notes

    def _saved_targets(self, config: LoraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        """target_modules with the layer and exclusion keys the reference re-derives ``chosen`` from.

        Leaf names plus layers/exclude where those select exactly ``chosen`` again (what the
        reference reads back), else the exact paths as a regex, which needs neither.
        """
        narrowing = {"layers": config.layers, "layers_pattern": config.layers_pattern, "exclude": config.exclude}
        if any(v is not None for v in narrowing.values()):
            given = [sorted(config.targets)] if isinstance(config.targets, list) else []
            for names in [*given, sorted({p.rsplit(".", 1)[-1] for p in chosen})]:  # the names given, else leaf names
                try:
                    again = targeting.narrow(model, targeting.resolve(model, names, self.kinds(), self.name), names,
                                             self.name, **narrowing)
                except ConfigError:
                    continue
                if sorted(again) == sorted(chosen):
                    exclude = sorted(config.exclude) if isinstance(config.exclude, list) else config.exclude
                    return {"target_modules": names, "layers_to_transform": config.layers,
                            "layers_pattern": config.layers_pattern, "exclude_modules": exclude}
        return {"target_modules": targeting.compact_targets(model, chosen) if chosen else [], "layers_to_transform": None,
                "layers_pattern": None, "exclude_modules": None}

    def on_attach(self, model: nn.Module, name: str, config: LoraConfig) -> None:
        if config.target_parameters is not None:
            lora_experts.attach_experts(model, name, config)

    def to_peft_config(self, config: LoraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        fan_in_fan_out = any(targeting.is_conv1d(targeting.base_modules(model)[p]) for p in chosen)
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            **({"target_parameters": lora_experts.parameter_names(model, config.target_parameters)}
               if config.target_parameters is not None else {}),
            "bias": "none",
            "use_rslora": config.rslora,
            "use_dora": False,
            "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": lora_init.reference_init(config.init, config.pissa_niter),
            **self._saved_targets(config, model, chosen),
            "rank_pattern": saved_pattern(config.rank_pattern, chosen, config.r),
            "alpha_pattern": saved_pattern(config.alpha_pattern, chosen, config.alpha),
            "lora_bias": config.lora_bias,
        }

    def accepts(self, cfg: dict[str, Any]) -> bool:
        return not cfg.get("use_dora")  # a LORA file with use_dora loads as dora

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        used = [f"{key}={cfg[key]!r}" for key, off in _UNSUPPORTED_KEYS.items()
                if cfg.get(key, off) not in (off, None, False, [], {})]
        if cfg.get("use_dora"):
            used.insert(0, "use_dora=True")
        if used:
            raise ConfigError(f"load_adapter: this LoRA file sets {', '.join(used)}, which nbpeft's {self.name} does not "
                              "support; loading it would change the model's outputs")
        targets = cfg.get("target_modules")
        parameters = cfg.get("target_parameters") or None
        if parameters and not targets:
            targets = None  # the experts alone
        options = {
            **({"target_parameters": list(parameters)} if parameters else {}),
            "r": int(cfg.get("r", 8)),
            "alpha": float(cfg.get("lora_alpha", 8)),
            "dropout": float(cfg.get("lora_dropout", 0.0)),
            "targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            "rslora": bool(cfg.get("use_rslora", False)),
            **lora_init.from_reference_init(cfg.get("init_lora_weights", True)),
        }
        exclude = cfg.get("exclude_modules")
        found = {
            "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "alpha_pattern": dict(cfg.get("alpha_pattern") or {}),
            "layers": cfg.get("layers_to_transform"),
            "layers_pattern": cfg.get("layers_pattern") or None,
            "exclude": sorted(exclude) if isinstance(exclude, (list, tuple, set)) else exclude or None,
            "lora_bias": bool(cfg.get("lora_bias", False)),
        }
        # an empty list of layers is the reference's "every block"
        if found["layers"] == []:
            found["layers"] = found["layers_pattern"] = None
        options.update({k: v for k, v in found.items() if v is not None and v is not False and v != {}})
        return options


register(LoRA())
