"""``%magic?`` text built from the same declarations the API validates with: each method's
options for ``%peft_attach``, the declared train options for ``%%peft_train`` and
``%peft_export_job``, the signature of ``compare``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import nbpeft

from ..training import options


def attach_help() -> str:
    lines = ["", "Methods and their options (key=default (type): help):"]
    for info in nbpeft.methods():
        lines += ["", f"{info.name}: {info.description}"]
        for key, opt in info.options.items():
            choices = f"; one of {', '.join(map(repr, opt['choices']))}" if "choices" in opt else ""
            lines.append(f"    {key}={opt['default']!r} ({opt['type']}): {opt['help']}{choices}")
    return "\n".join(lines)


def signature_help(fn: Callable, skip: tuple[str, ...]) -> str:
    params = inspect.signature(fn).parameters.values()
    shown = [p for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return "\n\nOptions (key=default): " + ", ".join(
        f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in shown
    )


def train_help(skip: tuple[str, ...] = ()) -> str:
    """The declared train options (but ``skip``), group by group: ``key=default: help``."""
    return "\n\n" + options.docstring(skip, heading="Options (key=default: help), by group:")


def compare_help() -> str:
    names = [m.name for m in nbpeft.methods()]
    return signature_help(nbpeft.compare, ("model",)) + (
        "\nMETHOD={'key': value} sets that method's options, with METHOD one of " + ", ".join(names)
    )
