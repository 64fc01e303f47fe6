"""VeRA: two frozen random matrices shared by every adapted layer, and two trained vectors per layer.

One adapter draws ``A`` (r x largest in_features) and ``B`` (largest out_features x r) once,
from ``projection_prng_key``, and every adapted layer uses their top-left corner. A layer of
weight ``W`` (out x in) learns only ``λ_d`` (r) and ``λ_b`` (out)::

    y = W x + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))        ΔW = diag(λ_b) B diag(λ_d) A

``λ_b`` starts at zero (the model is unchanged at attach) and ``λ_d`` at ``d_initial``. ``A``
and ``B`` are Kaiming-uniform draws from a CPU ``torch.Generator`` seeded with the key, ``A``
first, as the reference draws them, so a file saved without them (``save_projection=False``)
still loads to the same model. Files hold ``base_model.model.<path>.vera_lambda_b`` and
``.vera_lambda_d``, and with ``save_projection`` the shared ``base_model.vera_A`` and ``base_model.vera_B``.
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
from ..layers import AdapterLayer, adapter_factory, adapter_layers
from .base import Attached, Method, MethodConfig, option, register
from .lora import default_targets

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass
class VeraConfig(MethodConfig):
    method = "vera"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "rank": "r", "dropout": "vera_dropout"}

    r: int = option(256, "rank of the shared random projections (VeRA trains far fewer numbers than LoRA at the same r)")
    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    projection_prng_key: int = option(0, "seed of the random projections A and B (the same key draws the same A and B)")
    save_projection: bool = option(True, "write A and B into the file (False: loading draws them again from the key)")
    d_initial: float = option(0.1, "starting value of every λ_d entry (small values, 0.1 or less, train best)")
    vera_dropout: float = option(0.0, "dropout on the adapter's input during training (0 to 1)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"vera: r={self.r} must be a positive integer, e.g. r=256")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"vera: vera_dropout={self.vera_dropout} must be in [0, 1)")
        if self.projection_prng_key < 0:
            raise ConfigError(f"vera: projection_prng_key={self.projection_prng_key} must be 0 or more")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("vera: targets=[] is empty; name at least one module, e.g. targets=['q_proj']")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform on ±√(6 / fan_in) (Kaiming, gain √2), drawn from ``generator`` on the CPU in float32."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (r x in_features) then ``B`` (out_features x r) from one generator seeded with ``key``."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    A = kaiming_uniform((r, in_features), generator)
    return A, kaiming_uniform((out_features, r), generator)


class Projections(nn.Module):
    """The frozen ``A`` and ``B`` of one adapter: one module held by all its layers, so a move to a device moves it once."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", A, persistent=False)
        self.register_buffer("vera_B", B, persistent=False)


class VeRALinear(AdapterLayer):
    """``nn.Linear`` or ``Conv1D`` plus ``λ_b ⊙ B (λ_d ⊙ A x)`` per adapter, ``A`` and ``B`` shared across layers."""

    reads_base_weight = False  # forward only calls the base layer

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()
        self.in_features, self.out_features = targeting.linear_features(inner)
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.projections = nn.ModuleDict()  # set by the method once every layer is wrapped (it needs their sizes)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.vera_lambda_b)

    def add(self, name: str, config: VeraConfig) -> None:
        factory = adapter_factory(self.innermost().weight)
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), config.d_initial, **factory))
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def delete(self, name: str) -> None:
        for table in (self.vera_lambda_b, self.vera_lambda_d, self.vera_dropout):
            del table[name]
        if name in self.projections:
            del self.projections[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"vera_lambda_b": self.vera_lambda_b[name], "vera_lambda_d": self.vera_lambda_d[name]}

    def sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's corner of the shared projections: ``A[:, :in]`` and ``B[:out]``."""
        shared = self.projections[name]
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``diag(λ_b) B diag(λ_d) A`` in the base weight's layout and dtype."""
        A, B = self.sliced(name)
        delta = (self.vera_lambda_b[name].float()[:, None] * B.float()) @ (self.vera_lambda_d[name].float()[:, None] * A.float())
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    def merge(self, name: str) -> None:
        self.merge_delta(name, "VeRA")

    def unmerge(self, name: str) -> None:
        self.unmerge_delta(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = [] if self.disabled else [n for n in self.active if n in self.vera_lambda_b and n not in self.merged]
        for name in names:
            lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
            A, B = self.sliced(name)
            x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(lambda_d.dtype)
            hidden = lambda_d * nn.functional.linear(self.vera_dropout[name](x_in), A.to(lambda_d.dtype))
            result = result + (lambda_b * nn.functional.linear(hidden, B.to(lambda_d.dtype))).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.vera_lambda_d[n].shape[0]}" for n in self.vera_lambda_d)
        return f"adapters=[{ranks}], active={list(self.active)}"


def _layers(model: nn.Module, name: str) -> list[VeRALinear]:
    return [layer for _, layer in adapter_layers(model) if isinstance(layer, VeRALinear) and name in layer.adapter_names]


# Keys of a VERA file that would change the outputs in ways nbpeft's vera does not reproduce, with their "off" value.
_UNSUPPORTED_KEYS = {"bias": "none", "layers_to_transform": None}


class VeRA(Method):
    name = "vera"
    description = "Shared frozen random projections A, B and two trained vectors per layer, λ_b ⊙ B(λ_d ⊙ A x); mergeable"
    config_class = VeraConfig
    layer_class = VeRALinear
    peft_type = "VERA"
    listing_order = 14
    compare_options = {"r": 256}
    identity_at_attach = True
    weight_delta = mergeable = in_reference = True

    def select(self, model: nn.Module, config: VeraConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        return targeting.resolve(model, targets, targeting.linear_types(), self.name)

    def on_attach(self, model: nn.Module, name: str, config: VeraConfig) -> None:
        """Draw ``A`` and ``B`` at the largest sizes among the adapted layers and hand them to every one."""
        layers = _layers(model, name)
        A, B = draw_projections(config.r, max(la.in_features for la in layers), max(la.out_features for la in layers),
                                config.projection_prng_key)
        self._share(layers, name, A, B)

    @staticmethod
    def _share(layers: list[VeRALinear], name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        weight = layers[0].vera_lambda_d[name]
        shared = Projections(A.to(weight.device, weight.dtype), B.to(weight.device, weight.dtype))
        for layer in layers:
            layer.projections[name] = shared

    def to_peft_config(self, config: VeraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        modules = targeting.base_modules(model)
        return {
            "r": config.r,
            "target_modules": targeting.compact_targets(model, chosen),
            "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection,
            "vera_dropout": config.vera_dropout,
            "d_initial": config.d_initial,
            "fan_in_fan_out": any(targeting.is_conv1d(modules[p]) for p in chosen),
            "bias": "none",
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        used = [f"{key}={cfg[key]!r}" for key, off in _UNSUPPORTED_KEYS.items() if cfg.get(key, off) not in (off, None, [])]
        if used:
            raise ConfigError(f"load_adapter: this VeRA file sets {', '.join(used)}, which nbpeft's vera does not "
                              "support; loading it would change the model's outputs")
        targets = cfg.get("target_modules")
        return {
            "r": int(cfg.get("r", 256)),
            "targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            "projection_prng_key": int(cfg.get("projection_prng_key", 0)),
            "save_projection": bool(cfg.get("save_projection", True)),
            "d_initial": float(cfg.get("d_initial", 0.1)),
            "vera_dropout": float(cfg.get("vera_dropout", 0.0)),
        }

    def checkpoint_tensors(self, model: nn.Module, adapter: Attached, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        tensors = super().checkpoint_tensors(model, adapter, params)
        if adapter.config.save_projection:
            shared = _layers(model, adapter.name)[0].projections[adapter.name]
            tensors.update(zip(PROJECTION_KEYS, (shared.vera_A.detach(), shared.vera_B.detach())))
        return tensors

    def from_checkpoint(self, model: nn.Module, adapter: Attached, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's own ``A`` and ``B`` replace the ones drawn at attach; without them the key's draw stays."""
        tensors = dict(tensors)
        saved = [tensors.pop(key, None) for key in PROJECTION_KEYS]
        if any(t is None for t in saved):
            if adapter.config.save_projection:
                raise ConfigError("load_adapter(): this VeRA file says save_projection=true but holds no base_model.vera_A "
                                  "and base_model.vera_B; it is incomplete")
            return super().from_checkpoint(model, adapter, tensors)
        A, B = saved
        layers = _layers(model, adapter.name)
        need_in, need_out = max(la.in_features for la in layers), max(la.out_features for la in layers)
        r = adapter.config.r
        if A.shape[0] != r or B.shape[1] != r or A.shape[1] < need_in or B.shape[0] < need_out:
            raise ConfigError(f"load_adapter(): the file's vera_A {tuple(A.shape)} and vera_B {tuple(B.shape)} do not fit "
                              f"r={r} on layers of up to {need_in} inputs and {need_out} outputs")
        self._share(layers, adapter.name, A, B)
        return super().from_checkpoint(model, adapter, tensors)


register(VeRA())
