"""The one error type of the API: a bad option or a call that cannot go ahead.

Its message is one line that says what to do, in the caller's terms; :func:`one_line` is how
any exception is shown to a person (front-ends, and the worker processes of a training run).
"""

from __future__ import annotations

import re

__all__ = ["ConfigError", "one_line"]


class ConfigError(ValueError):
    """A bad option: the message is one line that says what to do."""


def one_line(err: BaseException, spellings: dict[str, str] | None = None) -> str:
    """An exception as the one line a person reads (the type only when it adds something).

    ``spellings`` rewrites the API's keyword spellings into the front-end's own, e.g.
    ``{"name=": "--name "}`` turns "pick another name=" into "pick another --name".
    """
    text = str(err)
    for keyword, spelling in (spellings or {}).items():
        text = re.sub(rf"(?<![\w.-]){re.escape(keyword)}", lambda _, spelling=spelling: spelling, text)
    text = " ".join(text.split()) or type(err).__name__
    return text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"
