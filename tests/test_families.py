"""Every method on every family: tiny random models of 20 transformers families × every method.

Each supported pair attaches with default targets, keeps the outputs at attach where the
method promises it, changes them after one optimiser step, saves and loads into a fresh
copy with equal outputs, detaches back to the exact base, and trains two steps with
``nbpeft.train`` on the batch the family takes (token ids, pixels, audio features,
seq2seq labels). The pairs a method cannot do are listed in ``families.REFUSED`` and
must be refused with one line. The README table is written from the same checks
(``python tests/families_table.py``).
"""

from __future__ import annotations

import pytest

from families import FAMILIES, METHODS, REFUSED, check_method, check_refusal

CASES = [(f, m) for f in FAMILIES for m in METHODS]


def test_the_matrix_covers_the_families_of_the_issue() -> None:
    assert len(FAMILIES) >= 20 and set(REFUSED) <= set(CASES)
    assert {"llama", "mixtral", "falcon", "t5", "bart", "whisper", "vit", "deberta-v2", "gemma3_text"} <= set(FAMILIES)


@pytest.mark.parametrize(("family", "method"), [c for c in CASES if c not in REFUSED])
def test_method_works_on_family(family: str, method: str, tmp_path) -> None:
    check_method(family, method, tmp_path / "adapter")


@pytest.mark.parametrize(("family", "method"), sorted(REFUSED))
def test_method_refuses_family_in_one_line(family: str, method: str) -> None:
    check_refusal(family, method)
