"""How a step's examples are laid out in a batch: the layout that wastes least on the data given.

A padded batch costs its rows times its widest row, padding included; only the examples'
own tokens are useful. Three layouts, each keeping ``batch_size`` examples a step:

- ``padded``: examples in random order, each batch padded to its longest (what a plain
  training loop does). Kept where lengths are even: there is little padding to save.
- ``grouped``: examples of similar length batched together (random windows of
  ``GROUP_WINDOW`` batches, sorted by length inside, the batches shuffled), so each batch
  pads little. Any model; the batches differ from random ones in which examples meet.
- ``packed``: the same random batches as ``padded``, each batch's examples placed whole in
  as few rows as leave almost no padding (positions restart per example, attention stays
  inside each example). Needs a model that attends example by example inside a row.

:func:`choose` measures each layout's padding over one epoch of the data and picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

LAYOUTS = ("auto", "padded", "grouped", "packed")
# Below this share of padding between the examples of random batches, lengths count as even: padded batches are kept.
EVEN = 0.05
# Grouped batches: examples sorted by length within windows of this many batches. Wide enough
# to find similar lengths, narrow enough that batches still mix the data's order.
GROUP_WINDOW = 50
# A packed row widens only while that saves more than this share of the batch's area.
WIDER_GAIN = 0.02
# Packed rows may be this wide under a shorter max_length (positions restart per example, so no
# example sees a position past its own length); the per-row mask costs width² bits each step.
ROW_LIMIT = 2048

Example = dict[str, Any]


def length(example: Example) -> int:
    return len(example["input_ids"])


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_width(group: Sequence[Example], multiple: int, limit: int | None) -> int:
    """The width ``collate`` pads a batch to: its longest, rounded up to ``multiple``, at most ``limit`` when longer."""
    longest = max(length(e) for e in group)
    width = round_up(longest, multiple)
    return min(width, max(longest, limit)) if limit is not None else width


def chunks(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    return [list(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def grouped(examples: Sequence[Example], batch_size: int, generator: torch.Generator) -> list[list[Example]]:
    """Batches of similar lengths from ``examples`` (already shuffled), in an order drawn from ``generator``."""
    window = batch_size * GROUP_WINDOW
    batches: list[list[Example]] = []
    for start in range(0, len(examples), window):
        ordered = sorted(examples[start:start + window], key=length, reverse=True)
        batches += chunks(ordered, batch_size)
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def pack_batch(examples: Sequence[Example], multiple: int, limit: int) -> list[list[Example]]:
    """One batch's examples in rows of whole examples: as little padding as rows at most
    ``max(limit, ROW_LIMIT)`` wide allow.

    Tries row widths from the longest example up (each rounded to ``multiple``), placing examples
    longest first in the first row with room; a wider row is taken only when it saves more than
    ``WIDER_GAIN`` of the area (rows × width), so rows stay narrow where that costs nothing.
    """
    limit = max(limit, ROW_LIMIT)
    ordered = sorted(examples, key=length, reverse=True)
    longest, total = length(ordered[0]), sum(length(e) for e in ordered)
    best: list[list[Example]] | None = None
    best_area = 0
    for count in range(len(ordered), 0, -1):
        width = round_up(max(longest, -(-total // count)), multiple)
        if width > max(limit, round_up(longest, multiple)):
            break
        rows: list[list[Example]] = []
        room: list[int] = []
        for e in ordered:
            at = next((i for i, left in enumerate(room) if left >= length(e)), None)
            if at is None:
                rows.append([e])
                room.append(width - length(e))
            else:
                rows[at].append(e)
                room[at] -= length(e)
        area = len(rows) * width
        if best is None or area < best_area * (1 - WIDER_GAIN):
            best, best_area = rows, area
    return best if best is not None else [[e] for e in ordered]


def packed_width(rows: Sequence[Sequence[Example]], multiple: int) -> int:
    """The width ``collate_packed`` gives these rows: the fullest row, rounded up to ``multiple``."""
    return round_up(max(sum(length(e) for e in row) for row in rows), multiple)


def padding_share(examples: Sequence[Example], layout: str, batch_size: int, multiple: int, max_length: int,
                  seed: int) -> float:
    """The share of padding in one epoch of ``layout`` batches (the first epoch the same seed trains on)."""
    generator = torch.Generator().manual_seed(seed)
    order = [examples[i] for i in torch.randperm(len(examples), generator=generator).tolist()]
    groups = grouped(order, batch_size, generator) if layout == "grouped" else chunks(order, batch_size)
    useful = area = 0
    for group in groups:
        useful += sum(length(e) for e in group)
        if layout == "packed":
            rows = pack_batch(group, multiple, max_length)
            area += len(rows) * packed_width(rows, multiple)
        else:
            area += len(group) * padded_width(group, multiple, max_length)
    return 1 - useful / area if area else 0.0


def choose(examples: Sequence[Example], batch_size: int, multiple: int, max_length: int, seed: int,
           can_pack: bool) -> tuple[str, dict[str, float]]:
    """The layout that wastes least on ``examples``, and each considered layout's padding share.

    Random padded batches where lengths are even (less than ``EVEN`` of padding between them); else
    packed where the model attends example by example (``can_pack``): the same random batches, so
    the same training as padded ones, without their padding; else grouped by length.
    """
    shares = {"padded": padding_share(examples, "padded", batch_size, multiple, max_length, seed)}
    # even lengths: the padding between examples (not the rounding of the width) is below EVEN
    if batch_size == 1 or padding_share(examples, "padded", batch_size, 1, max_length, seed) < EVEN:
        return "padded", shares
    best = "packed" if can_pack else "grouped"
    shares[best] = padding_share(examples, best, batch_size, multiple, max_length, seed)
    return (best if shares[best] < shares["padded"] else "padded"), shares


def describe(layout: str, shares: dict[str, float], chosen_by: str) -> str:
    """One line for the start banner, e.g. ``batching auto: packed (padding 0.4%; padded batches 27.6%)``."""
    line = f"batching {layout} (padding {shares[layout]:.1%}" if chosen_by == layout else \
        f"batching {chosen_by}: {layout} (padding {shares[layout]:.1%}"
    if layout != "padded" and "padded" in shares:
        line += f"; random padded batches {shares['padded']:.1%}"
    return line + ")"
