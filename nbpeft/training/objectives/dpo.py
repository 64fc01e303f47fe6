"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023): the policy's log-ratio against the reference's.

With ``π`` the trained model, ``ref`` the reference, ``y_w``/``y_l`` the chosen and rejected answers
to ``x`` and ``h = (log π(y_w|x) − log ref(y_w|x)) − (log π(y_l|x) − log ref(y_l|x))``:

    DPO:  loss = −(1 − ε) log σ(β h) − ε log σ(−β h)      (ε = label_smoothing: conservative DPO)
    IPO:  loss = (h − 1/(2β))²                          with each log-probability averaged over its tokens

as TRL computes them. Each answer's reward is ``β (log π(y|x) − log ref(y|x))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Logps, Objective, pair_figures


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row DPO loss from the four log-probabilities (label_smoothing > 0: conservative DPO)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row IPO loss from the four (length-averaged) log-probabilities."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


class DPO(Objective):
    name = "dpo"
    description = "Direct Preference Optimization: chosen over rejected, relative to the starting model"
    defaults = {"beta": 0.1, "label_smoothing": 0.0}

    def logps(self, logps: Logps) -> torch.Tensor:
        return logps.sums

    def loss(self, policy: Logps, reference: Logps | None, batch: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pol, ref = self.logps(policy), self.logps(reference).to(policy.sums.dtype)
        losses = self.row_losses(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])
        return losses.mean(), pair_figures(self.beta * (pol[:, 0] - ref[:, 0]), self.beta * (pol[:, 1] - ref[:, 1]))

    def row_losses(self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return dpo_loss(pc, pr, rc, rr, self.beta, self.option("label_smoothing"))


class IPO(DPO):
    name = "ipo"
    description = "Identity Preference Optimization: DPO's log-ratio regressed to 1/(2β), length-averaged"
    defaults = {"beta": 0.1}

    def logps(self, logps: Logps) -> torch.Tensor:
        return logps.means

    def row_losses(self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return ipo_loss(pc, pr, rc, rr, self.beta)
