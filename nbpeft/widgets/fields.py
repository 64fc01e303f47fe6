"""Form fields generated from a method's config dataclass.

Each option becomes one widget chosen by its type (int, float, bool, a fixed set of
choices, or text for strings and lists), shown with its help text. A field reads
back the Python value ``attach`` expects; text follows the same grammar as the
``%peft_attach`` magic, so a panel and a magic with the same settings agree.
"""

from __future__ import annotations

import dataclasses
import html
import typing
from typing import Any

import ipywidgets as widgets

from ..frontend import option_value, parse_value
from ..methods.base import MethodConfig, method_options

_INT_LIMIT = 2**31 - 1
# one label width for every field of every tab, so the inputs line up
LABEL = {"style": {"description_width": "130px"}}


def help_label(text: str) -> widgets.HTML:
    return widgets.HTML(f'<span style="color:#666;font-size:0.9em">{html.escape(text)}</span>')


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value if isinstance(value, str) else repr(value)


class OptionField:
    """One option of a method: its widget, help line and parsed value."""

    def __init__(self, method: str, key: str, info: dict[str, Any], hint: Any) -> None:
        self.method, self.key, self.info, self.hint = method, key, info, hint
        default, text = info["default"], info["help"]
        common = {"description": key, "tooltip": text, **LABEL}
        if "choices" in info:
            self.widget = widgets.Dropdown(options=list(info["choices"]), value=default, **common)
        elif hint is bool:
            self.widget = widgets.Checkbox(value=bool(default), indent=True, **common)
        elif hint is int:
            low = 0 if default >= 0 else -_INT_LIMIT
            self.widget = widgets.BoundedIntText(value=default, min=low, max=_INT_LIMIT, **common)
        elif hint is float:
            self.widget = widgets.FloatText(value=float(default), **common)
        else:
            self.widget = widgets.Text(value=_as_text(default), placeholder="(default)" if default is None else "",
                                       continuous_update=False, **common)
        self.widget.add_class(f"nbpeft-opt-{key}")
        self.row = widgets.HBox([self.widget, help_label(text)])

    @property
    def value(self) -> Any:
        """The option as attach() takes it; text is parsed like ``%peft_attach`` parses it."""
        raw = self.widget.value
        if not isinstance(self.widget, widgets.Text):
            return raw
        text = raw.strip()
        if not text:  # an empty box means "no value": None where allowed, else an empty list or string
            if self.info["default"] is None or "None" in self.info["type"]:
                return None
            return [] if "list" in self.info["type"] else ""
        if self.hint is str:
            return raw
        return option_value(parse_value(text), self.info)

    @property
    def changed(self) -> bool:
        return self.value != self.info["default"]


def option_fields(config_class: type[MethodConfig], skip: tuple[str, ...] = ()) -> dict[str, OptionField]:
    """A field for every option of ``config_class`` (except ``skip``), in declaration order."""
    hints = typing.get_type_hints(config_class)
    infos = method_options(config_class)
    return {
        f.name: OptionField(config_class.method, f.name, infos[f.name], hints[f.name])
        for f in dataclasses.fields(config_class)
        if f.name not in skip
    }


def read_options(fields: dict[str, OptionField]) -> dict[str, Any]:
    """The options that differ from their defaults, as attach() keyword arguments."""
    return {key: field.value for key, field in fields.items() if field.changed}
