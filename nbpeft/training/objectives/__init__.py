"""The training objectives besides SFT, by name: one module per objective (or family), one registry line each.

``train(model, data, objective="dpo")`` looks the name up here; ``"sft"`` (the model's own
next-token loss) is the loop's default and needs nothing from this package.
"""

from __future__ import annotations

from typing import Any

from .base import Logps, Objective, ObjectiveLoss, Reference, check_model
from .dpo import DPO, IPO
from .kto import KTO
from .orpo import ORPO
from .simpo import SimPO

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (DPO, IPO, ORPO, SimPO, KTO)}
NAMES = ("sft", *OBJECTIVES)


def build(name: str, settings: Any) -> Objective:
    """The objective ``name`` with the call's options."""
    return OBJECTIVES[name](settings)


__all__ = ["NAMES", "OBJECTIVES", "Logps", "Objective", "ObjectiveLoss", "Reference", "build", "check_model"]
