"""OFT: an orthogonal rotation of each adapted layer's input, one small rotation per block of features.

For a frozen weight ``W`` (out x in) OFT learns a block-diagonal ``R`` (in x in) whose blocks of
``oft_block_size`` are rotations, and uses::

    y = W Rᵀ x + b          (merged: W' = W Rᵀ)

Each block is a Cayley transform of a skew-symmetric ``Q`` (the ``b(b-1)/2`` numbers above its
diagonal are the trained parameters): exactly ``R = (I - Q)(I + Q)⁻¹``, or by default the Neumann
series ``I + 2Q + 2Q² + … + Qⁿ`` (``num_cayley_neumann_terms``) of ``(I + Q)(I - Q)⁻¹``, cheaper and
nearly orthogonal (the two differ in the sign of ``Q``, as in the reference).
``Q`` starts at zero, so ``R = I`` and the model is unchanged at attach. ``block_share`` uses one
block for all; ``coft`` keeps each block within ``eps`` of the identity (the constrained variant);
``module_dropout`` replaces that share of the blocks by the identity during training.
Files hold ``base_model.model.<path>.oft_R.weight``, shape [blocks (1 with block_share), b(b-1)/2],
with the parametrisation of the reference since 0.18.
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
from ..layers import AdapterLayer, adapter_factory
from .base import Attached, Method, MethodConfig, option, register
from .lora import default_targets

# The reference release whose OFT parametrisation this file reproduces: written into files because the
# reference warns that a Cayley-Neumann file without a version predates it.
REFERENCE_VERSION = "0.22.0"


@dataclass
class OftConfig(MethodConfig):
    method = "oft"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "block_size": "oft_block_size", "dropout": "module_dropout"}

    oft_block_size: int = option(32, "features per rotation block; it must divide each target's in_features (0: set r instead)")
    r: int = option(0, "number of blocks per layer instead of their size (give r or oft_block_size, the other 0)")
    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    module_dropout: float = option(0.0, "share of the blocks set to the identity at each training forward (0 to 1)")
    coft: bool = option(False, "constrained OFT: keep each block within eps of the identity")
    eps: float = option(6e-5, "coft=True: how far each block may rotate")
    block_share: bool = option(False, "one rotation block shared by all blocks of a layer")
    use_cayley_neumann: bool = option(True, "the Neumann series of the Cayley transform (fast, nearly orthogonal); False: exact inverse")
    num_cayley_neumann_terms: int = option(5, "terms of the Neumann series (more: closer to orthogonal)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.r < 0 or self.oft_block_size < 0 or (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(f"oft: give one of r={self.r} and oft_block_size={self.oft_block_size} as a positive number "
                              "and the other 0, e.g. oft_block_size=32 (r = in_features / oft_block_size)")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"oft: module_dropout={self.module_dropout} must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"oft: eps={self.eps} must be positive, e.g. eps=6e-5")
        if self.num_cayley_neumann_terms < 1:
            raise ConfigError(f"oft: num_cayley_neumann_terms={self.num_cayley_neumann_terms} must be 1 or more, e.g. 5")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("oft: targets=[] is empty; name at least one module, e.g. targets=['q_proj']")

    def block_size(self, in_features: int) -> int:
        return self.oft_block_size or in_features // self.r


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def skew(vector: torch.Tensor, size: int) -> torch.Tensor:
    """The skew-symmetric matrices (blocks x size x size) whose upper triangles are the rows of ``vector``."""
    rows, cols = torch.triu_indices(size, size, 1, device=vector.device)
    upper = vector.new_zeros(vector.shape[0], size, size)
    upper[:, rows, cols] = vector
    return upper - upper.transpose(-2, -1)


def cayley(Q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """``(I - Q)(I + Q)⁻¹`` for each block, or the Neumann series ``I + 2Q + 2Q² + … + Qᵏ`` of ``(I + Q)(I - Q)⁻¹``.

    The series doubles every power but its last, as the reference sums it (with its rounding).
    """
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype).expand_as(Q)
    if not neumann:
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    R = eye.clone()
    if terms == 1:
        return R
    R = R + 2.0 * Q
    if terms == 2:
        return R
    power = Q @ Q
    R = R + 2.0 * power
    for _ in range(3, terms - 1):
        power = power @ Q
        R = R + 2.0 * power
    return R + power @ Q


def constrained(vector: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: each block's skew matrix scaled back onto the ball of radius ``eps / √blocks`` when it leaves it."""
    radius = eps / math.sqrt(vector.shape[0])
    norm = torch.linalg.matrix_norm(skew(vector, size), keepdim=False)[:, None]
    return torch.where(norm <= radius, vector, radius * (vector / norm))


class OFTLinear(AdapterLayer):
    """``nn.Linear`` or ``Conv1D`` whose input is rotated block by block, ``y = base(x R)`` (x as a row)."""

    reads_base_weight = False  # forward only calls the base layer

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()
        self.in_features, self.out_features = targeting.linear_features(inner)
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        self.oft_R = nn.ParameterDict()
        self.settings: dict[str, OftConfig] = {}
        self._merged_rotation: dict[str, torch.Tensor] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.oft_R)

    def add(self, name: str, config: OftConfig) -> None:
        size = config.block_size(self.in_features)
        blocks = 1 if config.block_share else self.in_features // size
        factory = adapter_factory(self.innermost().weight)
        self.oft_R[name] = nn.Parameter(torch.zeros(blocks, size * (size - 1) // 2, **factory))
        self.settings[name] = config

    def delete(self, name: str) -> None:
        del self.oft_R[name], self.settings[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"oft_R.weight": self.oft_R[name]}

    def blocks(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s rotation blocks (blocks x b x b), one per block of the input features."""
        config, weight = self.settings[name], self.oft_R[name]
        size = config.block_size(self.in_features)
        if config.coft:  # as the reference does: the stored numbers themselves are kept within eps
            with torch.no_grad():
                weight.copy_(constrained(weight, size, config.eps))
        R = cayley(skew(weight, size), config.use_cayley_neumann, config.num_cayley_neumann_terms)
        return R.expand(self.in_features // size, size, size) if config.block_share else R

    def rotation(self, name: str) -> torch.Tensor:
        """The block-diagonal ``R`` (in x in) in float32."""
        return torch.block_diag(*self.blocks(name).float())

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("OFT over another adapter's layer cannot be folded into the base weight")
        if name in self.merged:
            return
        self.keep_original_weight()
        weight, R = self.base_layer.weight, self.rotation(name)
        merged = R @ weight.float() if self.fan_in_fan_out else weight.float() @ R.T  # Conv1D stores W as (in, out)
        weight.copy_(merged.to(weight.dtype))
        self._merged_rotation[name] = R
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        weight, R = self.base_layer.weight, self._merged_rotation.pop(name)
        if self.fan_in_fan_out:
            weight.copy_(torch.linalg.solve(R, weight.float()).to(weight.dtype))
        else:
            weight.copy_(torch.linalg.solve(R, weight.float().T).T.to(weight.dtype))
        self.merged.remove(name)
        self.restore_original_weight()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [] if self.disabled else [n for n in self.active if n in self.oft_R and n not in self.merged]
        for name in names:
            R = self.blocks(name)
            if self.training and self.settings[name].module_dropout > 0:
                R = _drop_blocks(R, self.settings[name].module_dropout)
            x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(R.dtype)
            rotated = torch.einsum("...rk,rkc->...rc", x_in.reshape(*x.shape[:-1], *R.shape[:2]), R)
            x = rotated.reshape(x.shape).to(x.dtype)
        return self.base_layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{n}: block={self.settings[n].block_size(self.in_features)}" for n in self.oft_R)
        return f"adapters=[{sizes}], active={list(self.active)}"


def _drop_blocks(R: torch.Tensor, share: float) -> torch.Tensor:
    """``share`` of the blocks (rounded down) replaced by the identity, chosen at random."""
    count = R.shape[0]
    dropped = torch.zeros(count, device=R.device, dtype=R.dtype)
    dropped[torch.randperm(count, device=R.device)[: int(share * count)]] = 1
    eye = torch.eye(R.shape[-1], device=R.device, dtype=R.dtype)
    return (1 - dropped[:, None, None]) * R + dropped[:, None, None] * eye


_UNSUPPORTED_KEYS = {"bias": "none", "layers_to_transform": None, "exclude_modules": None}


class OFT(Method):
    name = "oft"
    description = "Orthogonal fine-tuning: a learned block-diagonal rotation of each layer's input, W Rᵀ x; mergeable"
    config_class = OftConfig
    layer_class = OFTLinear
    peft_type = "OFT"
    listing_order = 15
    identity_at_attach = True
    weight_delta = mergeable = in_reference = True

    def select(self, model: nn.Module, config: OftConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        chosen = targeting.resolve(model, targets, targeting.linear_types(), self.name)
        modules = targeting.base_modules(model)
        widths = {targeting.linear_features(modules[p])[0]: p for p in chosen}
        given, what = (config.oft_block_size, "oft_block_size") if config.oft_block_size else (config.r, "r")
        for width, path in widths.items():
            if width % given or (config.r and given > width):
                common = sorted(set.intersection(*(set(divisors(w)) for w in widths)))
                raise ConfigError(f"oft: {what}={given} does not divide in_features={width} of {path}; "
                                  f"use one that divides every target's in_features: {', '.join(map(str, common))}")
        return chosen

    def to_peft_config(self, config: OftConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        modules = targeting.base_modules(model)
        return {
            "r": config.r,
            "oft_block_size": config.oft_block_size,
            "module_dropout": config.module_dropout,
            "target_modules": targeting.compact_targets(model, chosen),
            "fan_in_fan_out": any(targeting.is_conv1d(modules[p]) for p in chosen),
            "bias": "none",
            "exclude_modules": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "coft": config.coft,
            "eps": config.eps,
            "block_share": config.block_share,
            "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
            "peft_version": REFERENCE_VERSION,
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if "oft_block_size" not in cfg:
            raise ConfigError("load_adapter: this OFT file was written by peft before 0.14, whose OFT computes another "
                              "rotation; retrain it with a newer peft or with nbpeft")
        used = [f"{key}={cfg[key]!r}" for key, off in _UNSUPPORTED_KEYS.items() if cfg.get(key, off) not in (off, None, [])]
        if used:
            raise ConfigError(f"load_adapter: this OFT file sets {', '.join(used)}, which nbpeft's oft does not "
                              "support; loading it would change the model's outputs")
        targets = cfg.get("target_modules")
        options = {"targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets}
        defaults = {f: getattr(OftConfig, f) for f in ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
                                                        "use_cayley_neumann", "num_cayley_neumann_terms")}
        options.update({key: type(default)(cfg[key]) if key in cfg and cfg[key] is not None else default
                        for key, default in defaults.items()})
        return options


register(OFT())
