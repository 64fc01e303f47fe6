"""The Train tab's fields: one per declared option of ``train()`` (:mod:`nbpeft.training.options`).

The option's kind picks the widget (a number box, a checkbox, a dropdown of its choices, a
box that offers the notebook's variables of the right sort, or text); its help is the
field's tooltip and the grey hint beside it. Text is read as ``%%peft_train`` reads it
(:func:`nbpeft.frontend.train_value`), so the panel and the magic mean the same thing.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ..errors import ConfigError
from ..frontend import data_or_files, data_variables, function_variables, tokenizer_variables, train_value
from ..training.options import KINDS, TrainOption
from .fields import help_label

_INT_LIMIT = 2**31 - 1
# one label width for every Train field (the longest name, gradient_checkpointing, fits) and one field width
# (a checkbox's label sits right of its box, so it needs the room), so the boxes and the hints line up
TRAIN_LABEL = {"style": {"description_width": "170px"}}
FIELD_WIDTH = "390px"
# a bool option whose None means "the run decides" (compile): a dropdown of words, since a Dropdown's None is no choice
TRISTATE = {"auto": None, "true": True, "false": False}
# what a text box shows before anything is typed, by kind
PLACEHOLDERS = {
    "data": "a variable of examples, or a file path or glob",
    "tokenizer": "a variable, e.g. tokenizer",
    "function": "a function defined in the notebook",
    "mapping": "prompt: question, response: answer",
    "steps-or-share": "steps (e.g. 10) or a share (e.g. 0.1)",
    "bool-or-path": "true, or a checkpoint's path",
    "path": "a folder",
}
# the fix said after "no variable ..." for an option of each kind
FIXES = {
    "data": "make a list of examples first, or type a file path",
    "tokenizer": "load one with model, tokenizer = nbpeft.load_model(...)",
    "function": "define the function in the notebook first",
    "listener": "define the function in the notebook first",
}


def variable_names(option: TrainOption, namespace: dict[str, Any]) -> list[str]:
    """The notebook variables a field of ``option`` offers."""
    finders = {"data": data_variables, "tokenizer": tokenizer_variables, "function": function_variables}
    return finders[option.kind](namespace) if option.kind in finders else []


def _number_widget(option: TrainOption, shown: Any) -> widgets.Widget:
    """A number box where the option (or the value the tab shows for its None) is a number; else None."""
    value = option.default if option.default is not None else shown
    if option.kind == "int" and isinstance(value, int):
        low = 1 if value >= 1 else -_INT_LIMIT
        return widgets.BoundedIntText(value=value, min=low, max=_INT_LIMIT)
    if option.kind == "float" and isinstance(value, (int, float)):
        if option.default is None:  # a shown number for a None default: a positive amount (epochs)
            return widgets.BoundedFloatText(value=float(value), min=0.01, max=1e6, step=0.5)
        return widgets.FloatText(value=float(value))
    return None


def make_widget(option: TrainOption, namespace: dict[str, Any], shown: Any = None,
                suggestions: list[str] | None = None) -> widgets.Widget:
    """The widget for ``option``'s kind; ``shown`` is the number a box holds where the default is None."""
    number = _number_widget(option, shown) if option.kind in ("int", "float") else None
    if number is not None:
        return number
    if option.kind == "bool" and isinstance(option.default, bool):
        return widgets.Checkbox(value=option.default, indent=True)
    if option.kind == "bool":
        return widgets.Dropdown(options=list(TRISTATE), value=next(k for k, v in TRISTATE.items() if v is option.default))
    if option.kind == "choice":
        return widgets.Dropdown(options=list(option.choices), value=option.default)
    if option.kind in ("data", "tokenizer", "function"):
        return widgets.Combobox(value="", options=variable_names(option, namespace), ensure_option=False,
                                placeholder=PLACEHOLDERS[option.kind])
    if option.kind in ("int-or-auto", "text"):
        words = ["auto"] if option.kind == "int-or-auto" else suggestions or []
        return widgets.Combobox(value=str(option.default), options=words, ensure_option=False,
                                placeholder=KINDS[option.kind])
    placeholder = PLACEHOLDERS.get(option.kind, "(default)" if option.default is None else KINDS[option.kind])
    return widgets.Text(value="", placeholder=placeholder, continuous_update=False)


class TrainField:
    """One option of ``train()`` in the Train tab: its widget, the row with its hint, its value."""

    def __init__(self, option: TrainOption, namespace: dict[str, Any], shown: Any = None,
                 suggestions: list[str] | None = None) -> None:
        self.option, self.namespace = option, namespace
        self.widget = make_widget(option, namespace, shown, suggestions)
        self.widget.description, self.widget.tooltip = option.name, option.help
        self.widget.style.description_width = TRAIN_LABEL["style"]["description_width"]
        self.widget.layout.width = FIELD_WIDTH
        self.widget.add_class(f"nbpeft-train-{option.name.replace('_', '-')}")
        self.hint = help_label(option.help)
        self.row = widgets.HBox([self.widget, self.hint])

    @property
    def text(self) -> str | None:
        """What is typed in a text box (None for other widgets)."""
        return self.widget.value.strip() if isinstance(self.widget, widgets.Text) else None

    def read(self, caller: str = "train") -> Any:
        """The option's value as ``train()`` takes it; an empty box is the default."""
        text = self.text
        if text is None:
            tristate = self.option.kind == "bool" and not isinstance(self.option.default, bool)
            return TRISTATE[self.widget.value] if tristate else self.widget.value
        if not text:
            if self.option.required:
                raise ConfigError(f"{caller}: which {self.option.name}? type {KINDS[self.option.kind]}")
            return self.option.default
        return train_value(self.option, text, lambda option, name: self._variable(name, caller))

    def _variable(self, name: str, caller: str) -> Any:
        kind = self.option.kind
        if kind == "data":
            fix = FIXES["data"] if self.option.required else f"leave {self.option.name} empty, or {FIXES['data']}"
            return data_or_files(name, self.namespace, fix, caller=f"{caller}: ")
        if name not in self.namespace:
            raise ConfigError(f"{caller}: no variable {name!r} in the notebook; {FIXES.get(kind, KINDS[kind])}")
        return self.namespace[name]

    def refresh(self) -> None:
        """Offer the notebook's variables as they are now."""
        if self.option.kind in ("data", "tokenizer", "function"):
            self.widget.options = variable_names(self.option, self.namespace)


def train_fields(namespace: dict[str, Any], options: list[TrainOption], shown: dict[str, Any],
                 suggestions: dict[str, list[str]]) -> dict[str, TrainField]:
    """A field for each of ``options``, in declaration order."""
    return {o.name: TrainField(o, namespace, shown.get(o.name), suggestions.get(o.name)) for o in options}
