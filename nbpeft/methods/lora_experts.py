"""LoRA on weights stored as parameters: the experts of a mixture-of-experts layer.

Mixtral-style models keep all experts of a block in one module, as 3-D parameters
(``experts.gate_up_proj``: experts x out x in), not as linear layers. For a targeted
parameter ``W`` (E x out x in) each expert ``e`` gets its own rank-``r`` update::

    W'_e = W_e + s · B_e A_e          A_e: r x in,  B_e: out x r,  s = alpha / r

and the experts module runs with ``W'`` in place of ``W`` (a functional call; the stored
parameter is untouched). ``B`` starts at zero, so the model is unchanged at attach.

The checkpoint layout is the reference's for ``target_parameters``: per parameter one
``lora_A.weight`` (E·r x in, expert ``e`` in rows ``e·r ... e·r + r - 1``) and one
``lora_B.weight`` (out x r·E, expert ``e`` in columns ``e, E + e, 2E + e, ...``). With several
parameters of one module the reference nests one wrapper per parameter, the one the module
defines first innermost, so its keys gain one ``base_layer.`` per level of nesting beyond it:
Mixtral's ``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s, ``experts.lora_A.weight``
``down_proj``'s, whatever order ``target_parameters`` lists them in.
A module that stores ``in x out`` says so with ``is_transposed = True``; the update then
follows that layout, as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import architectures, targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_factory, add_adapter, undo_on_error

# target_parameters="experts": the family's expert weights (architectures.FAMILIES, role expert_parameters)
EXPERTS = "experts"


def parameter_names(model: nn.Module, wanted: str | list[str]) -> list[str]:
    """``target_parameters`` as a list of names ('experts' spelled out as the family's)."""
    if wanted != EXPERTS:
        return [wanted] if isinstance(wanted, str) else list(wanted)
    row = architectures.family(model)
    if row is None or not row.expert_parameters:
        raise ConfigError("lora: target_parameters='experts' needs a mixture-of-experts family nbpeft knows; "
                          "name the parameters, e.g. target_parameters=['mlp.experts.gate_up_proj']")
    return list(row.expert_parameters)


def resolve_parameters(model: nn.Module, wanted: str | list[str], method: str) -> dict[str, list[str]]:
    """Module path -> its targeted 3-D parameter names, in the module's own order."""
    if method != "lora":
        raise ConfigError(f"{method}: target_parameters is for method 'lora' only; use lora on the experts")
    wanted = parameter_names(model, wanted)
    chosen: dict[str, list[str]] = {}
    for target in wanted:
        found = []
        for path, module in targeting.base_modules(model).items():
            for pname, param in module.named_parameters(recurse=False):
                full = f"{path}.{pname}" if path else pname
                if full != target and not full.endswith("." + target):
                    continue
                if param.dim() != 3:
                    raise ConfigError(f"lora: target_parameters matched {full}, a {param.dim()}-D parameter; "
                                      "only 3-D expert weights (experts x out x in) are supported, use targets= for linear layers")
                found.append(full)
                if pname not in chosen.setdefault(path, []):
                    chosen[path].append(pname)
        if not found:
            raise ConfigError(f"lora: no parameter matched target_parameters=[{target!r}]; "
                              "give a parameter path or its end, e.g. 'mlp.experts.gate_up_proj'")
    # in the order the module defines them, which is the reference's nesting order
    modules = targeting.base_modules(model)
    return {path: [p for p, _ in modules[path].named_parameters(recurse=False) if p in names]
            for path, names in chosen.items()}


@dataclass(frozen=True)
class ExpertTargets:
    """What :meth:`ExpertLoRA.add` receives: the lora config and the module's parameters to adapt."""

    config: Any
    parameters: list[str]


def attach_experts(model: nn.Module, name: str, config: Any) -> None:
    """Wrap every module holding a targeted parameter and add adapter ``name``; all or nothing."""
    with undo_on_error() as undo:
        for path, names in resolve_parameters(model, config.target_parameters, "lora").items():
            undo.append(add_adapter(model, path, ExpertLoRA, name, ExpertTargets(config, names)))


class ExpertLoRA(AdapterLayer):
    """A module with 3-D expert weights plus named per-expert low-rank updates of some of them."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()  # adapter -> {parameter: E·r x in}
        self.lora_B = nn.ModuleDict()  # adapter -> {parameter: out x r·E}
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def _param(self, pname: str) -> nn.Parameter:
        return getattr(self.innermost(), pname)

    def _in_out(self, pname: str) -> tuple[int, int, int]:
        experts, first, second = self._param(pname).shape
        transposed = getattr(self.innermost(), "is_transposed", False)
        return (experts, first, second) if transposed else (experts, second, first)

    @torch.no_grad()
    def add(self, name: str, targets: ExpertTargets) -> None:
        config = targets.config
        A, B = nn.ParameterDict(), nn.ParameterDict()
        for pname in targets.parameters:
            experts, fan_in, fan_out = self._in_out(pname)
            factory = adapter_factory(self._param(pname))
            A[pname] = nn.Parameter(torch.empty(experts * config.r, fan_in, **factory))
            nn.init.kaiming_uniform_(A[pname], a=math.sqrt(5))
            B[pname] = nn.Parameter(torch.zeros(fan_out, config.r * experts, **factory))
        self.lora_A[name], self.lora_B[name] = A, B
        self.scaling[name] = config.scaling

    def delete(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scaling[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        names = list(self.lora_A[name])
        out = {}
        for depth, pname in enumerate(reversed(names)):  # the module's last-defined is outermost in the reference
            prefix = "base_layer." * depth
            out[f"{prefix}lora_A.weight"] = self.lora_A[name][pname]
            out[f"{prefix}lora_B.weight"] = self.lora_B[name][pname]
        return out

    def delta(self, name: str, pname: str) -> torch.Tensor:
        """``s · B_e A_e`` for every expert, in the parameter's own layout and dtype."""
        param = self._param(pname)
        experts = param.shape[0]
        A = self.lora_A[name][pname].float().reshape(experts, -1, self.lora_A[name][pname].shape[-1])  # E x r x in
        B = self.lora_B[name][pname].float().reshape(self.lora_B[name][pname].shape[0], -1, experts)  # out x r x E
        delta = torch.einsum("ore,eri->eoi", B, A) * self.scaling[name]
        if getattr(self.innermost(), "is_transposed", False):
            delta = delta.transpose(1, 2)
        return delta.to(param.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("LoRA on experts over another adapter's layer cannot be merged")
        if name in self.merged:
            return
        for pname in self.lora_A[name]:
            self.keep_original(pname, self._param(pname))
            self._param(pname).add_(self.delta(name, pname))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self.merged.remove(name)
        for pname in self.lora_A[name]:
            if not any(pname in self.lora_A[m] for m in self.merged):  # the last merged: put the exact copy back
                self.restore_original(pname, self._param(pname))
            else:
                self._param(pname).sub_(self.delta(name, pname))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [n for n in self.active if n in self.lora_A and n not in self.merged] if not self.disabled else []
        if not names:
            return self.base_layer(*args, **kwargs)
        updated: dict[str, torch.Tensor] = {}
        for name in names:
            for pname in self.lora_A[name]:
                updated[pname] = updated.get(pname, self._param(pname)) + self.delta(name, pname)
        return torch.func.functional_call(self.base_layer, updated, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}: {list(self.lora_A[n])}" for n in self.lora_A)
        return f"adapters=[{parts}], active={list(self.active)}"
