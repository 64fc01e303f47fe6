"""LoRA initialisations computed from the base weight: PiSSA, OLoRA and LoftQ.

All three start ``A`` and ``B`` from a decomposition of the frozen weight ``W`` (out x in,
float32 here) and give back the base weight to use with them. With scale ``s``
(``alpha / r``) the layer computes ``W_base x + s·B A x``:

- **PiSSA** (Meng et al. 2024): ``W = U S Vᵀ``; the top ``r`` singular triplets move into
  the adapter, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_rᵀ``, and the base keeps the
  residual ``W - s·B A``, so the output is unchanged at attach. ``niter > 0`` uses a
  randomised SVD with that many subspace iterations (``torch.svd_lowrank``): much faster on
  large layers, near the exact top-``r`` subspace.
- **OLoRA** (Büyükakyüz 2024): ``W = Q R``; ``B = Q[:, :r]`` (orthonormal columns),
  ``A = R[:r]``, and the base keeps ``W - s·B A``.
- **LoftQ** (Li et al. 2023): for a 4-bit base, alternate ``Q = deq(quant(W - s·B A))`` and
  ``B, A = rank-r SVD of (W - Q) / s``, so that ``Q + s·B A`` is closer to ``W`` than ``Q(W)``
  alone. Unlike PiSSA and OLoRA the output changes at attach: towards the full-precision one.

Each function returns an :class:`Init`; ``base`` is the dense weight the layer should hold
(for LoftQ: the weight to quantise).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..errors import ConfigError

# Inits that replace the base weight (the layer must keep the original to restore it on detach).
REWEIGHTING = ("pissa", "olora", "loftq")
_SVD_SEED = 0  # the randomised SVD draws from its own seeded stream: the same weight always gives the same init


class Init(NamedTuple):
    A: torch.Tensor  # r x in
    B: torch.Tensor  # out x r
    base: torch.Tensor  # out x in


def pissa(weight: torch.Tensor, rank: int, scaling: float, niter: int = 0) -> Init:
    """Principal singular vectors and values into ``B A``, the residual into the base."""
    if niter:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(_SVD_SEED)
            U, S, V = torch.svd_lowrank(weight, rank, niter=niter)
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)
    A = root[:, None] * Vh[:rank]
    B = U[:, :rank] * root[None, :]
    return Init(A.contiguous(), B.contiguous(), weight - scaling * (B @ A))


def olora(weight: torch.Tensor, rank: int, scaling: float) -> Init:
    """The first ``r`` columns of ``Q`` and rows of ``R`` (``W = Q R``) into ``B A``."""
    Q, R = torch.linalg.qr(weight)
    B, A = Q[:, :rank].contiguous(), R[:rank].contiguous()
    return Init(A, B, weight - scaling * (B @ A))


def loftq(
    weight: torch.Tensor, rank: int, scaling: float, roundtrip: Callable[[torch.Tensor], torch.Tensor], iterations: int = 1
) -> Init:
    """``B A`` that cancels the quantisation error; ``roundtrip(w)`` is ``deq(quant(w))``.

    One iteration quantises ``W`` itself (the base is the plain 4-bit one); each further one
    quantises ``W - s·B A`` of the previous one.
    """
    to_quantise = weight
    for step in range(iterations):
        U, S, Vh = torch.linalg.svd(weight - roundtrip(to_quantise), full_matrices=False)
        root = torch.sqrt(S[:rank] / scaling)
        A, B = root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]
        if step + 1 < iterations:
            to_quantise = weight - scaling * (B @ A)
    return Init(A.contiguous(), B.contiguous(), to_quantise)


def reference_init(init: str, pissa_niter: int) -> Any:
    """``init_lora_weights`` as the reference writes it (``True`` for the default)."""
    if init == "pissa" and pissa_niter:
        return f"pissa_niter_{pissa_niter}"
    return {"default": True, "random": False}.get(init, init)


def fast_pissa(value: Any) -> int | None:
    """The iterations in the reference's ``'pissa_niter_<n>'``, else None."""
    fast = re.fullmatch(r"pissa_niter_(\d+)", value) if isinstance(value, str) else None
    return int(fast[1]) if fast else None


def from_reference_init(value: Any) -> dict[str, Any]:
    """attach() options for the reference's ``init_lora_weights`` value."""
    if value is True or value is None:
        return {"init": "default"}
    if value is False:
        return {"init": "random"}
    if fast_pissa(value) is not None:
        return {"init": "pissa", "pissa_niter": fast_pissa(value)}
    if value in ("gaussian", "pissa", "olora", "loftq"):
        return {"init": value}
    if value in ("corda", "lora_ga"):
        raise ConfigError(f"load_adapter: this LoRA file uses init_lora_weights={value!r}, which rewrites the base "
                          "weights in a way nbpeft cannot redo; convert it to a plain LoRA with the reference first")
    return {"init": "default"}  # inits that leave the base alone: the file's tensors are all there is


def plain_lora(
    tensors: dict[str, torch.Tensor], initial: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Trained PiSSA/OLoRA tensors as a LoRA of rank ``2r`` on the original base.

    ``W_res + s·B A = W + s·(B A - B₀ A₀) = W + s·[B | -B₀] [A ; A₀]``. ``tensors`` are keyed
    ``<prefix><path>.lora_A.weight`` / ``.lora_B.weight``; ``initial`` maps ``<prefix><path>``
    to the ``(A₀, B₀)`` the adapter started from. With rank and alpha both doubled the scale
    is unchanged (alpha times sqrt(2) with rslora).
    """
    out = dict(tensors)
    for prefix, (A0, B0) in initial.items():
        A, B = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        out[A] = torch.cat([tensors[A], A0.to(tensors[A].dtype)], dim=0)
        out[B] = torch.cat([tensors[B], -B0.to(tensors[B].dtype)], dim=1)
    return out
