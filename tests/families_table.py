"""Write the README's table of families × methods from the compatibility matrix's own checks.

    PYTHONPATH=$PWD python tests/families_table.py

runs every check of ``tests/test_families.py`` and replaces the text between the two marker
comments in README.md: ✓ where the check passed, — where attach refuses (the reason below
the table), ✗ where a check failed (and the script exits with status 1).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from families import FAMILIES, METHODS, REFUSED, check_method, check_refusal

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- families table: begin -->", "<!-- families table: end -->"


def run_matrix() -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """Each pair's mark, and each refusal's reason (the message attach gave) by method."""
    marks, reasons = {}, {}
    for family in FAMILIES:
        for method in METHODS:
            try:
                if (family, method) in REFUSED:
                    reasons.setdefault(f"{method} on {family}", check_refusal(family, method))
                    marks[family, method] = "—"
                else:
                    with tempfile.TemporaryDirectory() as folder:
                        check_method(family, method, Path(folder) / "adapter")
                    marks[family, method] = "✓"
            except Exception as err:  # a failed check is shown, never hidden
                print(f"{family} × {method}: {type(err).__name__}: {err}", file=sys.stderr)
                marks[family, method] = "✗"
    return marks, reasons


def table(marks: dict[tuple[str, str], str], reasons: dict[str, str]) -> str:
    lines = ["| family | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    lines += [f"| {family} | " + " | ".join(marks[family, m] for m in METHODS) + " |" for family in FAMILIES]
    lines.append("")
    lines += [f"- {pair}: {message}" for pair, message in reasons.items()]
    return "\n".join(lines)


def main() -> int:
    start = time.perf_counter()
    marks, reasons = run_matrix()
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + table(marks, reasons) + "\n" + END + rest.split(END, 1)[1])
    counts = {mark: list(marks.values()).count(mark) for mark in "✓—✗"}
    print(f"{counts['✓']} pass, {counts['—']} refused, {counts['✗']} failed in {time.perf_counter() - start:.0f} s")
    return 1 if counts["✗"] else 0


if __name__ == "__main__":
    sys.exit(main())
