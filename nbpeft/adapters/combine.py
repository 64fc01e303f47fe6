"""Combine trained LoRA adapters into a new one.

Each adapter ``i`` has, per layer, ``A_i`` (r_i x in), ``B_i`` (out x r_i) and scale ``s_i``;
``w_i`` is its weight in the mix. The new adapter has rank ``r`` and scale 1 (``alpha = r``):

- ``cat``:    ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so ``B A = Σ w_i s_i B_i A_i``
  exactly; the rank is the sum of the ranks.
- ``svd``:    the rank-``r`` truncated SVD of ``Σ w_i s_i B_i A_i`` (``r``: ``rank=``, else the largest rank).
- ``linear``: ``A = Σ c_i A_i`` and ``B = Σ |c_i| B_i`` with ``c_i = ±sqrt(|w_i s_i|)`` (the sign of ``w_i s_i``);
  A and B are mixed separately, so ``B A`` is only an approximation of the weighted sum (same ranks only).
- ``ties``:   as ``linear``, but each ``A_i`` (and ``B_i``) first keeps only its ``density`` share of entries
  largest in magnitude; an entry then sums only the adapters whose sign agrees with the majority sign
  (``majority_sign_method``: 'total' takes the sign of the sum, 'frequency' the commonest sign) and is
  divided by how many they are.
- ``dare_linear`` / ``dare_ties``: as ``linear`` / ``ties``, but entries are kept at random with probability
  ``density`` and rescaled by ``1 / density`` (pass ``seed=`` for a repeatable draw).

The weights may be negative (subtracting an adapter). These are the semantics of the reference
implementation's ``add_weighted_adapter``; the benchmark ``benchmarks/combine_parity.py`` compares logits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch

from .. import core
from ..errors import ConfigError
from ..methods.lora import LoRALinear

__all__ = ["HOWS", "SIGN_METHODS", "combine"]

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
_SPARSE = ("ties", "dare_linear", "dare_ties")


def combine(
    model: torch.nn.Module,
    weights: Mapping[str, float],
    *,
    name: str,
    how: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    rank: int | None = None,
    seed: int | None = None,
) -> core.Adapter:
    """Attach adapter ``name``, a mix of the LoRA adapters in ``weights`` (``{"a": 0.7, "b": 0.3}``), and make it active.

    ``how`` is one of 'linear', 'cat', 'svd', 'ties', 'dare_linear', 'dare_ties' (see the module
    docstring for the math); ``density`` (0 to 1, the share of entries kept) is needed by ties and
    dare; ``rank`` sets svd's rank. The adapters combined stay as they were.
    """
    names, scale_by = _check(model, weights, name, how, density, majority_sign_method, rank, seed)
    how = "linear" if len(names) == 1 else how  # one adapter: every mix is the weighted copy
    layers = [layer for _, layer in core.adapter_layers(model)
              if isinstance(layer, LoRALinear) and any(n in layer.lora_A for n in names)]
    ranks = {n: max(layer.lora_A[n].out_features for layer in layers if n in layer.lora_A) for n in names}
    if how in ("linear", *_SPARSE):
        for layer in layers:
            present = {n: layer.lora_A[n].out_features for n in names if n in layer.lora_A}
            if len(set(present.values())) > 1:
                listed = ", ".join(f"{n}: r={r}" for n, r in present.items())
                raise ConfigError(f"combine(): how={how!r} needs adapters of one rank, here {listed}; "
                                  "use how='cat' or how='svd'")
    new_rank = {"cat": sum(ranks.values()), "svd": rank or max(ranks.values())}.get(how, max(ranks.values()))
    if how == "svd":
        smallest = min(min(layer.in_features, layer.out_features) for layer in layers)
        if new_rank > smallest:
            raise ConfigError(f"combine(): rank={new_rank} is above the smallest layer's {smallest} dimensions; "
                              f"pass rank={smallest} or less")

    first = core.state(model).adapters[names[0]]
    targets = list(dict.fromkeys(path for n in names for path in core.state(model).adapters[n].targets))
    with _seeded(seed):
        adapter = core.attach(model, "lora", name=name, r=new_rank, alpha=float(new_rank),
                              dropout=first.config.dropout, targets=targets)
        try:
            with torch.no_grad():
                for layer in layers:
                    A, B = _mix(layer, names, scale_by, how, new_rank, density, majority_sign_method)
                    layer.lora_A[name].weight.copy_(A)
                    layer.lora_B[name].weight.copy_(B)
        except Exception:
            core.detach(model, name)
            raise
    adapter.notes.append(f"{how} mix of " + ", ".join(f"{n}×{w:g}" for n, w in scale_by.items()))
    adapter.trained = True  # it starts as the mix, not at zero
    return adapter


def _check(model: torch.nn.Module, weights: Mapping[str, float], name: str, how: str, density: float | None,
           majority_sign_method: str, rank: int | None, seed: int | None) -> tuple[list[str], dict[str, float]]:
    """The adapters to mix and their weights, or a one-line ConfigError; the model is not touched."""
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("combine(): weights= must map adapter names to numbers, e.g. {'a': 0.7, 'b': 0.3}")
    bad = [w for w in weights.values() if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"combine(): the weight {bad[0]!r} is not a number; e.g. {{'a': 0.7, 'b': 0.3}}")
    names = core.resolve_adapter_names(model, list(weights), "combine")
    st = core.state(model)
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"combine(): name={name!r} must be a simple identifier such as 'mix'")
    if name in st.adapters:
        raise ConfigError(f"combine(): an adapter named {name!r} is already attached; pick another name= or detach it first")
    if how not in HOWS:
        raise ConfigError(f"combine(): how={how!r} is not one of {', '.join(HOWS)}")
    for n in names:
        adapter = st.adapters[n]
        if adapter.method != "lora":
            raise ConfigError(f"combine(): adapter {n!r} is {adapter.method}; combine mixes lora adapters "
                              "(convert others with nbpeft.to_lora first)")
        if adapter.saved_modules:
            raise ConfigError(f"combine(): adapter {n!r} also trains whole modules ({', '.join(adapter.saved_modules)}), "
                              "which cannot be mixed; combine adapters without modules_to_save")
    if how in _SPARSE:
        if density is None:
            raise ConfigError(f"combine(): how={how!r} needs density= (the share of entries kept, 0 to 1), e.g. density=0.5")
        if not isinstance(density, int | float) or isinstance(density, bool) or not 0 < density <= 1:
            raise ConfigError(f"combine(): density={density!r} must be above 0 and at most 1, e.g. density=0.5")
    elif density is not None:
        raise ConfigError(f"combine(): density= applies to how='ties', 'dare_linear' or 'dare_ties', not how={how!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"combine(): majority_sign_method={majority_sign_method!r} is not one of {', '.join(SIGN_METHODS)}")
    if rank is not None:
        if how != "svd":
            raise ConfigError(f"combine(): rank= applies to how='svd', not how={how!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"combine(): rank={rank!r} must be a positive integer, e.g. rank=8")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"combine(): seed={seed!r} must be an integer")
    return names, {n: float(weights[n]) for n in names}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """``seed`` for the block only (dare's random draw); the caller's random state is the same afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _mix(layer: LoRALinear, names: list[str], weights: dict[str, float], how: str, rank: int,
         density: float | None, sign_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's ``A`` (rank x in) and ``B`` (out x rank) on one layer."""
    present = [n for n in names if n in layer.lora_A]
    As = [layer.lora_A[n].weight.float() for n in present]
    Bs = [layer.lora_B[n].weight.float() for n in present]
    scaled = [weights[n] * layer.scaling[n] for n in present]
    A = As[0].new_zeros(rank, layer.in_features)
    B = Bs[0].new_zeros(layer.out_features, rank)
    if how == "cat":
        stacked_A = torch.cat([a * s for a, s in zip(As, scaled)])
        A[:stacked_A.shape[0]] = stacked_A
        stacked_B = torch.cat(Bs, dim=1)
        B[:, :stacked_B.shape[1]] = stacked_B
    elif how == "svd":
        delta = _weighted_sum([b @ a for a, b in zip(As, Bs)], scaled)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        B, A = U[:, :rank] * S[:rank], Vh[:rank]
    else:
        # the sign goes on A only, so that B·A keeps it
        roots = [math.sqrt(abs(s)) for s in scaled]
        A = _sparse_sum(As, [r if s >= 0 else -r for r, s in zip(roots, scaled)], how, density, sign_method)
        B = _sparse_sum(Bs, roots, how, density, sign_method)
    return A, B


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    return (stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)).sum(0)


def _sparse_sum(tensors: list[torch.Tensor], weights: list[float], how: str, density: float | None,
                sign_method: str) -> torch.Tensor:
    """``Σ w_i t_i``, after sparsifying each ``t_i`` (ties, dare) and keeping the majority sign (ties, dare_ties)."""
    if how in _SPARSE:
        tensors = [_keep(t, density, at_random=how.startswith("dare")) for t in tensors]
    if how not in ("ties", "dare_ties"):
        return _weighted_sum(tensors, weights)
    stacked = torch.stack(tensors)
    votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    agrees = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _keep(tensor: torch.Tensor, density: float, at_random: bool) -> torch.Tensor:
    """``tensor`` with only a ``density`` share of its entries: the largest in magnitude, or random ones rescaled."""
    if density >= 1:
        return tensor
    if at_random:
        return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density
    kept = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    kept[tensor.abs().reshape(-1).topk(int(density * tensor.numel())).indices] = 1
    return tensor * kept.view_as(tensor)
