"""Small instruction data sets that ship with nbpeft.

Each data set is a JSON Lines file in this directory; every line is an object
``{"prompt": ..., "response": ...}``.  The bundled sets are:

* ``pirate_chat`` -- 160 everyday questions answered in a pirate's voice
  (every response starts with "Arr!"), for the quickstart LoRA tutorial.
* ``pirate_eval`` -- 24 held-out questions in the same style, for evaluation
  loss and before/after comparisons.
"""

from __future__ import annotations

import json
from pathlib import Path

_DATA_DIR = Path(__file__).parent

__all__ = ["available", "load_dataset"]


def available() -> list[str]:
    """Return the names of the bundled data sets (sorted file stems)."""
    return sorted(p.stem for p in _DATA_DIR.glob("*.jsonl"))


def load_dataset(name: str) -> list[dict]:
    """Load the bundled data set ``name`` as a list of dicts.

    Raises ``ValueError`` if no ``<name>.jsonl`` ships with the package.
    """
    path = _DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(available())}"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
