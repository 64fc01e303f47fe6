"""Small instruction data sets that ship with nbpeft.

Each data set is a JSON Lines file in this directory, one object per line:
``{"prompt": ..., "response": ...}`` for instruction data, ``{"messages": [{"role": ...,
"content": ...}, ...]}`` for conversations, ``{"text": ..., "label": ...}`` for classification.  The bundled sets are:

* ``pirate_chat`` -- 160 everyday questions answered in a pirate's voice
  (every response starts with "Arr!"), for the quickstart LoRA tutorial.
* ``pirate_eval`` -- 24 held-out questions in the same style, for evaluation
  loss and before/after comparisons.
* ``reviews`` -- 240 one-sentence reviews (films, books, restaurants, hotels,
  gadgets, ...) labelled 1 (positive) or 0 (negative), 120 of each, for the
  sentence-classification tutorial.
* ``reviews_test`` -- 80 held-out reviews in the same style, 40 of each label,
  about things the training sentences do not describe.
* ``radio_chat`` -- 44 conversations (``{"messages": [...]}``, 10 of them with two
  exchanges) with Sparks, a steamship's radio operator: every conversation opens with
  the same system turn, and every reply opens with "Copy that." and closes with "Over.",
  for the chat tutorial.
* ``radio_eval`` -- 12 held-out conversations in the same style, on other questions.
"""

from __future__ import annotations

import json
from pathlib import Path

_DATA_DIR = Path(__file__).parent

__all__ = ["available", "load_dataset", "path"]


def available() -> list[str]:
    """Return the names of the bundled data sets (sorted file stems)."""
    return sorted(p.stem for p in _DATA_DIR.glob("*.jsonl"))


def path(name: str) -> Path:
    """The JSON Lines file of the bundled data set ``name`` (e.g. for ``datasets.load_dataset("json", ...)``)."""
    file = _DATA_DIR / f"{name}.jsonl"
    if not file.is_file():
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return file


def load_dataset(name: str) -> list[dict]:
    """Load the bundled data set ``name`` as a list of dicts.

    Raises ``ValueError`` if no ``<name>.jsonl`` ships with the package.
    """
    with path(name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
