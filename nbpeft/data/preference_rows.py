"""Preference rows: a prompt with a chosen and a rejected answer, and the unpaired (KTO) view of them.

A pair is ``{"prompt": ..., "chosen": ..., "rejected": ...}``: plain strings, or conversations
(``[{"role": ..., "content": ...}, ...]``) as TRL writes them. The unpaired view has one row per
answer, ``{"prompt": ..., "completion": ..., "label": bool}``: True for a chosen answer, False for
a rejected one, which is what KTO trains on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def unpaired(pairs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair as two rows: its chosen answer labelled True, its rejected answer labelled False."""
    rows = []
    for i, pair in enumerate(pairs):
        missing = [f for f in PAIR_FIELDS if f not in pair]
        if missing:
            raise ConfigError(f"unpaired(): row {i} has no {missing[0]!r}; preference rows have "
                              "'prompt', 'chosen' and 'rejected'")
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows
