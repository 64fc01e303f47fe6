"""The panels' message lines: results in green, remarks in grey, errors in red, one line each.

A button's action is decorated with :func:`shows_errors`: whatever it raises becomes the
error's one line in the tab's message widget, never a traceback in the page (the kernel runs
widget callbacks outside any cell, so a traceback would land in the log, not in front of
the person who clicked).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..frontend import one_line

ERROR_COLOR = "#b00020"


def say(target: widgets.HTML, text: str, error: bool = False) -> None:
    color = ERROR_COLOR if error else "#1b5e20"
    target.value = f'<span style="color:{color}">{html.escape(text)}</span>' if text else ""


def note(target: widgets.HTML, text: str) -> None:
    """A neutral remark (grey): neither an error nor a result."""
    target.value = f'<span style="color:#666">{html.escape(text)}</span>'


def shows_errors(target: str, spellings: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a tab's method: an exception it raises is shown as one red line in ``self.<target>``
    (with the API's keywords spelled as the tab labels them), and the method returns None."""

    def decorate(action: Callable) -> Callable:
        @functools.wraps(action)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return action(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
                say(getattr(self, target), one_line(err, spellings), error=True)
                return None

        return run

    return decorate
