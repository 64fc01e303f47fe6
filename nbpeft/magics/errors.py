"""nbpeft's own errors raised from Python cells, shown as their one line.

``nbpeft.train(model, data, lr=-1)`` in a cell raises a ConfigError whose message already
says what to do; IPython would print it under a traceback through nbpeft's internals. With
the extension loaded the cell shows ``ConfigError: train(): ...`` alone on stderr (the cell
still fails, so "Run all" stops there) and ``%tb`` prints the full traceback. Every other
exception keeps IPython's usual display.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import ConfigError
from ..training.distributed import ProcessFailed

OURS = (ConfigError, ProcessFailed)


def show_one_line(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> list[str]:
    """IPython's custom exception handler: one line on stderr, the traceback kept for ``%tb``."""
    shell._get_exc_info((etype, value, tb))  # records sys.last_* as a normal error would, for %tb and %debug
    text = " ".join(str(value).split())
    print(f"{etype.__name__}: {text}", file=sys.stderr)
    return []


def install(shell: Any) -> None:
    shell.set_custom_exc(OURS, show_one_line)


def uninstall(shell: Any) -> None:
    """Remove the handler if it is still ours (another extension may have set its own since)."""
    if getattr(shell, "custom_exceptions", ()) == OURS:
        shell.set_custom_exc((), None)
