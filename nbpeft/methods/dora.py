"""DoRA: weight-decomposed LoRA, a learned magnitude times a LoRA-updated direction.

For a frozen weight ``W`` (out x in) and a LoRA update ``s·B·A``, DoRA learns a magnitude
vector ``m`` (one entry per output feature) and uses::

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖        (norm of each output row, over the input dim)

``m`` starts at ``‖W‖`` and ``B`` at zero, so the model is unchanged at attach. The forward
never builds ``W'``: with ``k = m / ‖W + s·B·A‖`` it computes
``y = base(x) + (k - 1) ⊙ W x + k ⊙ s·B·A x``. As in the paper (and the reference) the
norm is treated as a constant in the backward pass, which saves memory. Merging writes
``W'`` into the base weight. Dropout, when set, applies to the LoRA branch's input only.

Files are LORA files with ``use_dora: true`` plus ``base_model.model.<path>.lora_magnitude_vector``
(shape ``[out_features]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import AdapterLayer
from .base import register
from .lora import LoRA, LoraConfig, LoRALinear

_EPS = 1e-12


@dataclass
class DoraConfig(LoraConfig):
    method = "dora"

    def validate(self) -> None:
        super().validate()
        if self.lora_bias:
            raise ConfigError("dora: lora_bias=True is not supported with DoRA (the magnitude rescales the bias); use lora")


class DoRALinear(LoRALinear):
    """A LoRA layer whose DoRA adapters also hold ``lora_magnitude_vector``; plain LoRA adapters may share it."""

    reads_base_weight = True  # the weight norm ||W + s·B·A|| needs the exact base weight

    def __init__(self, base_layer: nn.Module) -> None:
        if isinstance(base_layer, AdapterLayer):
            raise ConfigError(
                f"dora: this module already holds a {type(base_layer).__name__} adapter; attach dora first, or detach that one"
            )
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        self._merge_factor: dict[str, torch.Tensor] = {}

    def add(self, name: str, config: LoraConfig) -> None:
        super().add(name, config)
        if isinstance(config, DoraConfig):
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).detach())

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = super().adapter_parameters(name)
        if name in self.lora_magnitude_vector:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return params

    def _weight(self) -> torch.Tensor:
        """The base weight as (out, in) in float32 (Conv1D stores it transposed)."""
        weight = self.base_layer.weight
        return (weight.T if self.fan_in_fan_out else weight).float()

    def _update(self, name: str) -> torch.Tensor:
        """``s·B·A`` as (out, in) in float32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output feature."""
        return torch.linalg.vector_norm(self._weight() + self._update(name), dim=1)

    def _write(self, weight_oi: torch.Tensor) -> None:
        base = self.base_layer.weight
        base.copy_((weight_oi.T if self.fan_in_fan_out else weight_oi).to(base.dtype))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super().merge(name)
        if name in self.merged:
            return
        self.keep_original_weight()
        combined = self._weight() + self._update(name)
        factor = self.lora_magnitude_vector[name].float() / torch.linalg.vector_norm(combined, dim=1).clamp_min(_EPS)
        self._write(factor[:, None] * combined)
        self._merge_factor[name] = factor
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super().unmerge(name)
        if name not in self.merged:
            return
        factor = self._merge_factor.pop(name)
        self._write(self._weight() / factor[:, None] - self._update(name))
        self.merged.remove(name)
        self.restore_original_weight()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.rows is not None:
            return self.forward_rows(x, result)
        names = [] if self.disabled else [n for n in self.active if n in self.lora_A and n not in self.merged]
        if not names:
            return result
        bias = getattr(self.base_layer, "bias", None)
        base_out = result if bias is None else result - bias  # W x
        for name in names:
            A = self.lora_A[name]
            lora = self.lora_B[name](A(self.lora_dropout[name](x.to(A.weight.dtype))) * self.scaling[name])
            if name in self.lora_magnitude_vector:
                k = self.lora_magnitude_vector[name] / self.weight_norm(name).detach().clamp_min(_EPS)
                result = result + ((k - 1) * base_out + k * lora).to(result.dtype)
            else:
                result = result + lora.to(result.dtype)
        return result

    def row_update(self, name: str, x: torch.Tensor, result: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lora = super().row_update(name, x, result, rows)
        if name not in self.lora_magnitude_vector:
            return lora
        bias = getattr(self.base_layer, "bias", None)
        base_out = result.index_select(0, rows)  # W x (+ bias) of these rows: no other adapter has touched them
        k = self.lora_magnitude_vector[name] / self.weight_norm(name).detach().clamp_min(_EPS)
        return (k - 1) * (base_out if bias is None else base_out - bias) + k * lora

    def extra_repr(self) -> str:
        ranks = ", ".join(
            f"{n}: r={self.lora_A[n].out_features}{' dora' if n in self.lora_magnitude_vector else ''}" for n in self.lora_A
        )
        return f"adapters=[{ranks}], active={list(self.active)}"


class DoRA(LoRA):
    name = "dora"
    description = "Weight-decomposed LoRA: a learned magnitude per output times a LoRA-updated direction; mergeable"
    config_class = DoraConfig
    layer_class = DoRALinear
    peft_type = "LORA"
    listing_order = 11
    adapts_embeddings = False
    plain_lora = False
    serving_notes = {"vllm": "DoRA is rejected; convert it with nbpeft.to_lora(model, rank=...) or export format='merged'"}

    def accepts(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("use_dora"))

    def to_peft_config(self, config: DoraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        return {**super().to_peft_config(config, model, chosen), "use_dora": True}

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return super().from_peft_config({**cfg, "use_dora": False})


register(DoRA())
