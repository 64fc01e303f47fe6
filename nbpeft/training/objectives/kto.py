"""KTO (Ethayarajh et al. 2024): each answer rated desirable or not on its own, against a KL baseline.

With ``r(y) = log π(y|x) − log ref(y|x)`` and ``z`` the batch's KL estimate: the mean of ``r`` over
mismatched pairs (each prompt with the completion of the row before it), clamped at 0 and held
constant, as TRL computes it:

    desirable:    loss = λ_D (1 − σ(β (r(y) − z)))
    undesirable:  loss = λ_U (1 − σ(β (z − r(y))))

averaged over the batch's rows (λ_D, λ_U: ``desirable_weight``, ``undesirable_weight``). Each
answer's reward is ``β r(y)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .base import Logps, Objective


def kto_losses(logratio: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row KTO loss from each row's log-ratio, its label and the KL estimate."""
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad)


class KTO(Objective):
    name = "kto"
    description = "Kahneman-Tversky Optimization: answers rated one by one (label True/False), KL baseline"
    data = "unpaired"
    trained_slots = (0,)
    figures = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")
    defaults = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}

    def loss(self, policy: Logps, reference: Logps | None, batch: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ratio = policy.sums - reference.sums.to(policy.sums.dtype)
        kl = _mean_over_ranks(ratio[:, 1].detach().mean()).clamp(min=0)
        desirable = batch["desirable"].bool()
        losses = kto_losses(ratio[:, 0], desirable, kl, self.beta, self.option("desirable_weight"),
                            self.option("undesirable_weight"))
        rewards = self.beta * ratio[:, 0].detach()
        figures = {"kl": kl}
        if desirable.any():
            figures["rewards/chosen"] = rewards[desirable].mean()
        if (~desirable).any():
            figures["rewards/rejected"] = rewards[~desirable].mean()
        if desirable.any() and (~desirable).any():
            figures["rewards/margins"] = figures["rewards/chosen"] - figures["rewards/rejected"]
        return losses.mean(), figures


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The KL estimate of the whole batch when ``processes=N`` split it: the ranks' means averaged (equal shares).

    Only while training, where every rank computes its loss in step with the others; evaluation scores the
    whole batch on each rank already.
    """
    if not (torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()):
        return value
    total = value.detach().clone().float()
    dist.all_reduce(total)
    return (total / dist.get_world_size()).to(value.dtype)
