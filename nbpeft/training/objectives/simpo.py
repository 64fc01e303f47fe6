"""SimPO (Meng et al. 2024): length-averaged log-probabilities with a target margin, no reference.

With ``p_w``, ``p_l`` the length-averaged log-probabilities of the chosen and rejected answers,
``γ`` the margin (``gamma``, TRL's ``simpo_gamma``) and ``ε`` the label smoothing:

    loss = −(1 − ε) log σ(β (p_w − p_l) − γ) − ε log σ(−β (p_w − p_l) + γ)

Each answer's reward is ``β p``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Logps, Objective, pair_figures


def simpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row SimPO loss from length-averaged log-probabilities."""
    z = beta * (mean_chosen - mean_rejected) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


class SimPO(Objective):
    name = "simpo"
    description = "Simple Preference Optimization: length-averaged margin γ between answers, no reference"
    uses_reference = False
    defaults = {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}

    def loss(self, policy: Logps, reference: Logps | None, batch: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        means = policy.means
        losses = simpo_loss(means[:, 0], means[:, 1], self.beta, self.option("gamma"), self.option("label_smoothing"))
        return losses.mean(), pair_figures(self.beta * means[:, 0], self.beta * means[:, 1])
