"""AdaLoRA: a LoRA in SVD form whose rank budget moves, while training, to the modules that need it.

For a frozen weight ``W`` (out x in) each adapted module learns ``P`` (out x r, ``lora_B``),
``Λ`` (r, ``lora_E``, the singular values) and ``Q`` (r x in, ``lora_A``), with ``r = init_r``::

    y = W x + α / (init_r + 1e-5) · P diag(Λ) Q x

``Λ`` starts at zero, so the model is unchanged at attach. Training adds
``orth_reg_weight · mean(‖QQᵀ - I‖_F, ‖PᵀP - I‖_F)`` to the loss (P and Q stay near orthogonal)
and after each optimizer step runs the rank allocator: every entry's importance ``|p · ∂L/∂p|`` is
smoothed (EMA ``beta1``) and its uncertainty tracked (EMA ``beta2``); triplet ``i`` of a module
scores ``s(Λᵢ) + mean s(Qᵢ.) + mean s(P.ᵢ)`` with ``s`` their product. The budget (kept triplets
over all modules) stays at ``init_r`` per module for ``tinit`` steps, falls as a cubic to
``target_r`` per module by step ``total_step - tfinal``, and every ``deltaT`` steps the
lowest-scoring triplets get ``Λᵢ = 0``. From then on the allocation stays (``rank_pattern``).

Files are the reference's ADALORA files: ``lora_A``, ``lora_B``, ``lora_E`` per module (no
``.weight``), cut to the kept triplets, and ``rank_pattern`` (``<path>.lora_E`` -> kept flags) in
the config; the scale keeps ``init_r``, which older files also store as ``ranknum``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_factory, adapter_layers, get_module
from .base import Attached, Method, MethodConfig, option, register
from .lora import default_targets

_EPS = 1e-5  # added to the rank in the scale, as the reference does


@dataclass
class AdaLoraConfig(MethodConfig):
    method = "adalora"
    # r is not AdaLoRA's: the reference ignores it; the starting rank is init_r
    aliases: ClassVar[dict[str, str]] = {"r": "init_r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                                         "target_modules": "targets"}

    init_r: int = option(12, "starting rank of every module")
    target_r: int = option(8, "average rank per module once the budget has fallen")
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha / init_r")
    dropout: float = option(0.0, "dropout on the adapter's input during training (0 to 1)")
    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    tinit: int = option(0, "steps at the full budget before it starts to fall")
    tfinal: int = option(0, "last steps at the final allocation, which no longer changes")
    deltaT: int = option(1, "steps between two reallocations while the budget falls")
    beta1: float = option(0.85, "EMA factor of the importance scores (0 to 1)")
    beta2: float = option(0.85, "EMA factor of their uncertainty (0 to 1)")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality penalty on P and Q in the training loss")
    total_step: int | None = option(None, "the step the schedule ends at (default: the steps of the train() run)")
    rank_pattern: dict[str, list[bool]] | None = option(
        None, "kept triplets per module path, written by training (and read from files); None: all init_r kept"
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.init_r < 1:
            raise ConfigError(f"adalora: init_r={self.init_r} must be a positive integer, e.g. init_r=12")
        if not 1 <= self.target_r <= self.init_r:
            raise ConfigError(f"adalora: target_r={self.target_r} must be from 1 to init_r={self.init_r}")
        if self.alpha <= 0:
            raise ConfigError(f"adalora: alpha={self.alpha} must be positive, e.g. alpha=8")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adalora: dropout={self.dropout} must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"adalora: {name}={getattr(self, name)} must be between 0 and 1, e.g. 0.85")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"adalora: orth_reg_weight={self.orth_reg_weight} must be 0 or more, e.g. 0.5")
        if self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ConfigError(f"adalora: deltaT={self.deltaT} must be 1 or more, tinit={self.tinit} and tfinal={self.tfinal} 0 or more")
        if self.total_step is not None:
            self.check_schedule(self.total_step, "total_step")
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("adalora: targets=[] is empty; name at least one module, e.g. targets=['q_proj']")
        for path, kept in (self.rank_pattern or {}).items():
            if len(kept) != self.init_r:
                raise ConfigError(f"adalora: rank_pattern[{path!r}] has {len(kept)} flags; give init_r={self.init_r}")

    def check_schedule(self, total: int, what: str) -> None:
        if self.tinit >= total - self.tfinal:
            raise ConfigError(f"adalora: {what}={total} leaves no steps for the budget to fall between tinit={self.tinit} "
                              f"and {what} - tfinal={total - self.tfinal}; lower tinit/tfinal or train longer")

    def rank_of(self, path: str) -> int:
        """The triplets the module at ``path`` holds: the kept ones of ``rank_pattern``, else ``init_r``."""
        kept = (self.rank_pattern or {}).get(path)
        return self.init_r if kept is None else sum(kept)


@dataclass(frozen=True)
class ModuleRank:
    """What one module's layer receives: the adapter's config and the triplets it holds."""

    config: AdaLoraConfig
    rank: int


class AdaLoRALinear(AdapterLayer):
    """``nn.Linear`` or ``Conv1D`` plus ``α / init_r · P diag(Λ) Q x`` per adapter, with its importance scores."""

    reads_base_weight = False  # forward only calls the base layer

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()
        self.in_features, self.out_features = targeting.linear_features(inner)
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        # adapter -> parameter suffix -> (importance EMA, uncertainty EMA): the rank allocator's memory
        self.scores: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    @torch.no_grad()
    def add(self, name: str, module: ModuleRank) -> None:
        factory = adapter_factory(self.innermost().weight)
        self.lora_A[name] = nn.Parameter(torch.randn(module.rank, self.in_features, **factory) * 0.02)
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, module.rank, **factory) * 0.02)
        self.lora_E[name] = nn.Parameter(torch.zeros(module.rank, 1, **factory))
        self.lora_dropout[name] = nn.Dropout(module.config.dropout) if module.config.dropout > 0 else nn.Identity()
        self.scaling[name] = module.config.alpha
        self.ranknum[name] = float(module.config.init_r)
        self.scores[name] = {}

    def delete(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_E, self.lora_dropout, self.scaling, self.ranknum, self.scores):
            del table[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name], "lora_E": self.lora_E[name]}

    def rank_divisor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """``init_r + 1e-5`` in float32, as the reference divides by it (after multiplying by α)."""
        return torch.tensor([self.ranknum[name]], dtype=torch.float32, device=like.device) + _EPS

    def delta_weight(self, name: str) -> torch.Tensor:
        """``α / init_r · P diag(Λ) Q`` in the base weight's layout and dtype."""
        A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        delta = B.float() @ (A.float() * E.float()) * self.scaling[name] / self.rank_divisor(name, A)
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    def merge(self, name: str) -> None:
        self.merge_delta(name, "AdaLoRA")

    def unmerge(self, name: str) -> None:
        self.unmerge_delta(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = [] if self.disabled else [n for n in self.active if n in self.lora_A and n not in self.merged]
        for name in names:
            A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype)
            update = (self.lora_dropout[name](x_in) @ (A * E).T @ B.T) * self.scaling[name] / self.rank_divisor(name, A)
            result = result + update.to(result.dtype)
        return result

    def orthogonality(self, name: str) -> list[torch.Tensor]:
        """``‖QQᵀ - I‖_F`` and ``‖PᵀP - I‖_F``."""
        A, B = self.lora_A[name], self.lora_B[name]
        eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
        return [torch.linalg.matrix_norm(A @ A.T - eye), torch.linalg.matrix_norm(B.T @ B - eye)]

    @torch.no_grad()
    def update_scores(self, name: str, beta1: float, beta2: float) -> None:
        """Fold this step's importance ``|p · ∂L/∂p|`` of every entry into the two EMAs."""
        for key, param in self.adapter_parameters(name).items():
            if param.grad is None:
                continue
            importance = (param * param.grad).abs()
            smoothed, uncertain = self.scores[name].get(key) or (torch.zeros_like(param), torch.zeros_like(param))
            smoothed = beta1 * smoothed + (1 - beta1) * importance
            uncertain = beta2 * uncertain + (1 - beta2) * (importance - smoothed).abs()
            self.scores[name][key] = (smoothed, uncertain)

    def triplet_scores(self, name: str) -> torch.Tensor:
        """Each triplet's score: its singular value's, plus the mean of its row of Q and its column of P."""
        score = {key: smoothed * uncertain for key, (smoothed, uncertain) in self.scores[name].items()}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    @torch.no_grad()
    def keep(self, name: str, kept: torch.Tensor) -> None:
        """Zero the singular values of the triplets not ``kept``."""
        self.lora_E[name].masked_fill_(~kept.view(-1, 1).to(self.lora_E[name].device), 0.0)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.lora_A[n].shape[0]}" for n in self.lora_A)
        return f"adapters=[{ranks}], active={list(self.active)}"


def _layers(model: nn.Module, name: str) -> dict[str, AdaLoRALinear]:
    return {path: layer for path, layer in adapter_layers(model) if isinstance(layer, AdaLoRALinear) and name in layer.adapter_names}


def budget(step: int, config: AdaLoraConfig, total: int, start: int, target: int) -> tuple[int, bool]:
    """The kept triplets at ``step`` (all modules together) and whether to reallocate now.

    ``start`` until ``tinit``, then down a cubic to ``target`` at ``total - tfinal``, reallocating every ``deltaT`` steps.
    """
    if step <= config.tinit:
        return start, False
    remaining = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((start - target) * remaining**3 + target), step % config.deltaT == 0


def allocate(layers: dict[str, AdaLoRALinear], name: str, kept_total: int) -> dict[str, list[bool]]:
    """Keep the ``kept_total`` best-scoring triplets over all modules (ties at the threshold all go); the kept flags."""
    scores = {path: layer.triplet_scores(name) for path, layer in layers.items()}
    everything = torch.cat([s.to(next(iter(scores.values())).device) for s in scores.values()])
    dropped = everything.numel() - kept_total
    threshold = torch.kthvalue(everything, dropped).values.item() if dropped > 0 else -float("inf")
    pattern = {}
    for path, layer in layers.items():
        kept = scores[path] > threshold
        layer.keep(name, kept)
        pattern[path] = kept.tolist()
    return pattern


class AdaLoRA(Method):
    name = "adalora"
    description = "LoRA in SVD form P·diag(Λ)·Q whose rank budget moves during training to the modules that need it; mergeable"
    config_class = AdaLoraConfig
    layer_class = AdaLoRALinear
    peft_type = "ADALORA"
    listing_order = 13
    compare_options = {"init_r": 12}
    identity_at_attach = True
    weight_delta = mergeable = in_reference = True

    def select(self, model: nn.Module, config: AdaLoraConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        return targeting.resolve(model, targets, targeting.linear_types(), self.name)

    def layer_for(self, model: nn.Module, path: str, config: AdaLoraConfig) -> tuple[type[AdapterLayer], ModuleRank]:
        return self.layer_class, ModuleRank(config, config.rank_of(path))

    def notes(self, model: nn.Module, config: AdaLoraConfig, targets: list[str]) -> list[str]:
        if config.rank_pattern:
            return [f"ranks as allocated: {sum(config.rank_of(p) for p in targets)} triplets over {len(targets)} modules"]
        return [f"rank {config.init_r} per module, falling to {config.target_r} on average while it trains"]

    # ---- training: the penalty in the loss and the rank allocator after each step

    def extra_loss(self, model: nn.Module, name: str, config: AdaLoraConfig) -> torch.Tensor | None:
        if not config.orth_reg_weight:
            return None
        norms = [norm for layer in _layers(model, name).values() for norm in layer.orthogonality(name)]
        return config.orth_reg_weight * torch.stack(norms).mean() if norms else None

    def after_step(self, model: nn.Module, name: str, config: AdaLoraConfig, step: int, total_steps: int) -> dict[str, float]:
        layers = _layers(model, name)
        if any(layer.lora_A[name].shape[0] != config.init_r for layer in layers.values()):
            return {}  # loaded with its allocation already made: it trains at those ranks
        total = config.total_step or total_steps
        config.check_schedule(total, "total_step" if config.total_step else "the run's steps")
        start, target = config.init_r * len(layers), config.target_r * len(layers)
        final = total - config.tfinal
        kept_total = None
        if step < final:
            for layer in layers.values():
                layer.update_scores(name, config.beta1, config.beta2)
            kept_total, now = budget(step, config, total, start, target)
            if now:
                config.rank_pattern = allocate(layers, name, kept_total)
        elif step == final and any(layer.scores[name] for layer in layers.values()):
            kept_total = target
            config.rank_pattern = allocate(layers, name, target)
            for layer in layers.values():
                layer.scores[name] = {}
        elif config.rank_pattern:
            for path, layer in layers.items():
                layer.keep(name, torch.tensor(config.rank_pattern[path]))
        figures = {f"rank {path}": float(config.rank_of(path)) for path in layers}
        if kept_total is not None:
            figures["rank budget"] = float(kept_total)
        return figures

    # ---- files

    def to_peft_config(self, config: AdaLoraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        modules = targeting.base_modules(model)
        # the reference refuses a file without a positive total_step; it only matters for training, and loading leaves it out
        total = config.total_step or config.tinit + config.tfinal + 1
        pattern = None if config.rank_pattern is None else {f"{p}.lora_E": kept for p, kept in config.rank_pattern.items()}
        return {
            "init_r": config.init_r, "target_r": config.target_r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": targeting.compact_targets(model, chosen), "tinit": config.tinit, "tfinal": config.tfinal,
            "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2, "orth_reg_weight": config.orth_reg_weight,
            "total_step": total, "rank_pattern": pattern, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": any(targeting.is_conv1d(modules[p]) for p in chosen), "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        used = [f"{key}={cfg[key]!r}" for key, off in (("bias", "none"), ("use_rslora", False), ("layers_to_transform", None),
                                                       ("exclude_modules", None))
                if cfg.get(key, off) not in (off, None, [], False)]
        if used:
            raise ConfigError(f"load_adapter: this AdaLoRA file sets {', '.join(used)}, which nbpeft's adalora does not "
                              "support; loading it would change the model's outputs")
        targets = cfg.get("target_modules")
        pattern = cfg.get("rank_pattern")
        options = {
            "targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            "rank_pattern": None if not pattern else {k.removesuffix(".lora_E"): list(v) for k, v in pattern.items()},
            "alpha": float(cfg.get("lora_alpha", 8)) or float(cfg.get("init_r", 12)),  # the reference reads 0 as the rank
            "dropout": float(cfg.get("lora_dropout", 0.0)),
        }
        for key, default in (("init_r", 12), ("target_r", 8), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            options[key] = int(cfg[key]) if cfg.get(key) is not None else default
        for key, default in (("beta1", 0.85), ("beta2", 0.85), ("orth_reg_weight", 0.5)):
            options[key] = float(cfg[key]) if cfg.get(key) is not None else default
        options["target_r"] = min(options["target_r"], options["init_r"])
        # total_step is left out: it was the schedule of the run that wrote the file; a further train() schedules its own
        return options

    def checkpoint_tensors(self, model: nn.Module, adapter: Attached, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """The kept triplets only (a module still holding all ``init_r`` is cut to its ``rank_pattern``)."""
        tensors = super().checkpoint_tensors(model, adapter, params)
        pattern = adapter.config.rank_pattern or {}
        for path, kept in pattern.items():
            layer = get_module(model, path)
            if not isinstance(layer, AdaLoRALinear) or layer.lora_A[adapter.name].shape[0] == sum(kept):
                continue
            rows = torch.tensor(kept)
            for suffix in ("lora_A", "lora_E"):
                key = f"base_model.model.{path}.{suffix}"
                tensors[key] = tensors[key][rows]
            key = f"base_model.model.{path}.lora_B"
            tensors[key] = tensors[key][:, rows]
        return tensors

    def from_checkpoint(self, model: nn.Module, adapter: Attached, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # files of older reference versions also hold ranknum, which is init_r: the scale already has it
        found = super().from_checkpoint(model, adapter, tensors)
        return {k: v for k, v in found.items() if not k.endswith(".ranknum")}


def rank_history(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each module's rank along a run, ``{path: [(step, rank), ...]}``, from ``TrainResult.history``."""
    ranks: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():  # each figure is a column of the history row
            if key.startswith("rank ") and key != "rank budget":
                ranks.setdefault(key.removeprefix("rank "), []).append((row["step"], value))
    return ranks


def plot_ranks(result: Any, ax: Any = None) -> Any:
    """Draw each module's rank over the steps of a run (a ``TrainResult`` or its history); returns the figure."""
    import matplotlib.pyplot as plt

    ranks = rank_history(getattr(result, "history", result))
    if not ranks:
        raise ConfigError("plot_ranks(): this run recorded no ranks; train an adalora adapter with nbpeft.train() first")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for path, points in ranks.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=path, drawstyle="steps-post")
    ax.set_xlabel("step")
    ax.set_ylabel("rank")
    ax.set_title("AdaLoRA: rank per module")
    if len(ranks) <= 12:
        ax.legend(fontsize="x-small", loc="upper right")
    return ax.figure


register(AdaLoRA())
