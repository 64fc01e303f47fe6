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
* ``direct_answers`` -- 183 preference pairs (``{"prompt", "chosen", "rejected"}``) over everyday
  questions: the chosen answer is short and direct (it starts with the answer itself and ends
  with a period); the rejected one says the same thing hedged and padded with chatty filler
  (it opens with a remark about the question and ends with "!" or "?"), for preference tuning
  (``train(objective="dpo")``). ``load_dataset("direct_answers", unpaired=True)`` gives the KTO
  view: one row per answer, ``{"prompt", "completion", "label"}``.
* ``direct_answers_test`` -- 40 held-out pairs in the same style, on other questions.

Any of them loads as a 🤗 ``datasets.Dataset`` with
``datasets.load_dataset("json", data_files=str(nbpeft.datasets.path(name)), split="train")``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.preference_rows import PAIR_FIELDS
from ..data.preference_rows import unpaired as unpaired_rows
from ..errors import ConfigError

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


def load_dataset(name: str, unpaired: bool = False) -> list[dict]:
    """Load the bundled data set ``name`` as a list of dicts.

    ``unpaired=True`` turns a preference set into its KTO view: each pair's chosen answer as
    ``{"prompt", "completion", "label": True}`` and its rejected one with ``"label": False``.
    Raises ``ValueError`` if no ``<name>.jsonl`` ships with the package.
    """
    with path(name).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not unpaired:
        return rows
    if not all(set(PAIR_FIELDS) <= row.keys() for row in rows):
        pairs = [n for n in available() if set(PAIR_FIELDS) <= _first_row(n).keys()]
        raise ConfigError(f"load_dataset(): {name!r} has no preference pairs to unpair; leave out unpaired=True, "
                         f"or load one of {', '.join(pairs)}")
    return unpaired_rows(rows)


def _first_row(name: str) -> dict:
    with path(name).open(encoding="utf-8") as f:
        return json.loads(f.readline())
