"""IPython magics: a thin text front-end over the Python API.

    %load_ext nbpeft
    %peft_methods
    %peft_attach lora r=8 targets=q_proj,v_proj
    %peft_summary
    %peft_compare_answers chat sql --prompt "Tell me a joke"
    %peft_export merged out/merged
    %peft_show_example 3 --data chats
    %peft_panel

Each magic parses its line (and cell body) into the keyword arguments a Python user
would pass, makes one API call and shows the result. Every mistake is one line on
stderr that starts with ``nbpeft:`` (an IPython ``UsageError``, so no traceback, and
"Run all" stops there), in the magic's own syntax; the API itself guarantees the
model is left untouched.

Modules: ``line`` (usage lines, flags, errors), ``commands`` (the magics), ``help``
(``%magic?`` text from the option declarations), ``tables`` (``%peft_methods``),
``completion`` (Tab). The option grammar itself is shared with the panels in
:mod:`nbpeft.frontend`.
"""

from __future__ import annotations

import inspect
from typing import Any

from . import errors
from .commands import PeftMagics, train_doc
from .completion import completions, is_ours, matcher
from .help import attach_help, compare_help
from .tables import MethodTable

__all__ = ["MethodTable", "PeftMagics", "completions", "load_ipython_extension", "unload_ipython_extension"]

ATTACH_DOC = inspect.cleandoc(PeftMagics.peft_attach.__doc__)
COMPARE_DOC = inspect.cleandoc(PeftMagics.peft_compare.__doc__)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbpeft``: register the magics (help built from the registry), Tab completion and
    the one-line display of nbpeft's errors."""
    PeftMagics.peft_attach.__doc__ = ATTACH_DOC + attach_help()
    PeftMagics.peft_train.__doc__ = train_doc()
    PeftMagics.peft_compare.__doc__ = COMPARE_DOC + compare_help()
    ipython.register_magics(PeftMagics)
    completer = getattr(ipython, "Completer", None)
    if completer is not None:
        completer.custom_matchers[:] = [m for m in completer.custom_matchers if not is_ours(m)]
        completer.custom_matchers.append(matcher(ipython))
    if hasattr(ipython, "set_custom_exc"):
        errors.install(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbpeft``: IPython has no public unregister, so remove ours from its tables."""
    manager = ipython.magics_manager
    ours = manager.registry.pop(PeftMagics.__name__, None)
    for table in manager.magics.values():
        for name in list(table):
            if getattr(table[name], "__self__", None) is ours and ours is not None:
                del table[name]
    completer = getattr(ipython, "Completer", None)
    if completer is not None:
        completer.custom_matchers[:] = [m for m in completer.custom_matchers if not is_ours(m)]
    if hasattr(ipython, "set_custom_exc"):
        errors.uninstall(ipython)
