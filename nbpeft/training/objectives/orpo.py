"""ORPO (Hong et al. 2024): SFT on the chosen answer plus an odds-ratio penalty, no reference.

With ``p_w``, ``p_l`` the length-averaged log-probabilities of the chosen and rejected answers and
``log odds(p) = p − log(1 − e^p)``:

    loss = NLL(y_w) − λ log σ(log odds(p_w) − log odds(p_l))

where NLL is the mean cross-entropy over the chosen answers' tokens and λ is ``beta``, as TRL
names it. Each answer's reward is ``β p``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Logps, Objective, pair_figures


def log_odds_ratio(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor) -> torch.Tensor:
    """``log odds(p_w) − log odds(p_l)`` of length-averaged log-probabilities."""
    return (mean_chosen - mean_rejected) - (torch.log1p(-torch.exp(mean_chosen)) - torch.log1p(-torch.exp(mean_rejected)))


class ORPO(Objective):
    name = "orpo"
    description = "Odds Ratio Preference Optimization: SFT on chosen plus an odds-ratio term, no reference"
    uses_reference = False
    figures = (*Objective.figures, "nll_loss", "log_odds_ratio")

    def loss(self, policy: Logps, reference: Logps | None, batch: dict[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        means = policy.means
        nll = -policy.sums[:, 0].sum() / policy.counts[:, 0].sum().clamp(min=1)
        ratio = F.logsigmoid(log_odds_ratio(means[:, 0], means[:, 1]))
        figures = pair_figures(self.beta * means[:, 0], self.beta * means[:, 1])
        figures.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean()})
        return nll - self.beta * ratio.mean(), figures
