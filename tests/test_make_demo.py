"""The main command must not fail because the machine is slow: no cell timeout in `make demo`."""

import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def test_demo_has_no_cell_timeout():
    recipe = re.search(r"^demo:.*?(?=^\S)", MAKEFILE.read_text(), re.S | re.M)[0]
    assert "nbconvert" in recipe and "--execute" in recipe
    timeouts = re.findall(r"timeout=(-?\w+)", recipe)
    assert timeouts and all(value in ("-1", "None") for value in timeouts), timeouts
