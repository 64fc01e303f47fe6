"""The attach tab: pick a method, set its options and targets, see the cost, attach."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from torch import nn

import nbpeft

from .. import targeting
from ..methods.base import ConfigError, get_method
from .fields import OptionField, help_label, option_fields, read_options
from .preview import Preview, preview


def one_line(err: BaseException) -> str:
    """An exception as the one line a person reads (the type only when it adds something)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"


def say(target: widgets.HTML, text: str, error: bool = False) -> None:
    color = "#b00020" if error else "#1b5e20"
    target.value = f'<span style="color:{color}">{html.escape(text)}</span>' if text else ""


def target_choices(model: nn.Module) -> list[tuple[str, str]]:
    """``("q_proj ×30", "q_proj")`` for every leaf name of a module that holds weights, in model order."""
    counts = targeting.leaf_counts(model)
    leaves: list[str] = []
    for path, module in targeting.base_modules(model).items():
        leaf = path.rsplit(".", 1)[-1]
        if path and leaf not in leaves and next(module.parameters(recurse=False), None) is not None:
            leaves.append(leaf)
    return [(f"{leaf} ×{counts[leaf]}", leaf) for leaf in leaves]


class AttachTab(widgets.VBox):
    """Method dropdown, generated option fields, target picker, live preview, Attach and Detach."""

    def __init__(self, model: nn.Module, on_change: Callable[[], None] = lambda: None,
                 busy: Callable[[], str | None] = lambda: None, before: Callable[[], None] = lambda: None) -> None:
        self.model, self.on_change, self.busy, self.before = model, on_change, busy, before
        names = [info.name for info in nbpeft.methods()]
        label = {"style": {"description_width": "initial"}}
        self.method = widgets.Dropdown(options=names, value="lora" if "lora" in names else names[0],
                                       description="method", **label)
        self.method.add_class("nbpeft-method")
        self.description = help_label("")
        self.name = widgets.Text(value="default", description="adapter name", continuous_update=False,
                                 tooltip="the adapter's name on the model", **label)
        self.name.add_class("nbpeft-name")
        choices = target_choices(model)
        self.targets = widgets.SelectMultiple(options=choices, rows=min(8, max(len(choices), 1)),
                                              description="targets", tooltip="modules to adapt, by name", **label)
        self.targets.add_class("nbpeft-targets")
        self.regex = widgets.Text(placeholder="a regex over module paths, or all-linear", description="or regex",
                                  continuous_update=False, **label)
        self.regex.add_class("nbpeft-regex")
        self.target_box = widgets.VBox([
            widgets.HBox([self.targets, help_label("none selected: the method's default targets")]), self.regex,
        ])
        self.fields_box = widgets.VBox()
        self.preview = widgets.HTML()
        self.preview.add_class("nbpeft-preview")
        self.attach_button = widgets.Button(description="Attach", button_style="primary", icon="plus")
        self.detach_button = widgets.Button(description="Detach", icon="minus")
        self.message = widgets.HTML()
        self.message.add_class("nbpeft-message")
        self.fields: dict[str, OptionField] = {}
        self.last_preview: Preview | None = None
        super().__init__([
            widgets.HBox([self.method, self.description]), self.name, self.fields_box, self.target_box,
            self.preview, widgets.HBox([self.attach_button, self.detach_button]), self.message,
        ])
        self.method.observe(self._build_fields, "value")
        for widget in (self.name, self.targets, self.regex):
            widget.observe(self.refresh, "value")
        self.attach_button.on_click(self.attach)
        self.detach_button.on_click(self.detach)
        self._build_fields()

    @property
    def has_targets(self) -> bool:
        return "targets" in self.fields

    def _build_fields(self, *_: Any) -> None:
        spec = get_method(self.method.value)
        self.description.value = html.escape(spec.description)
        self.fields = option_fields(spec.config_class)
        for field in self.fields.values():
            field.widget.observe(self.refresh, "value")
        self.fields_box.children = [f.row for k, f in self.fields.items() if k != "targets"]
        self.target_box.layout.display = None if self.has_targets else "none"
        self._quiet = True
        self.targets.value, self.regex.value = (), ""
        self._quiet = False
        self.refresh()

    def options(self) -> dict[str, Any]:
        """attach() keyword arguments for the current settings (only options changed from their defaults)."""
        options = read_options({k: f for k, f in self.fields.items() if k != "targets"})
        if self.has_targets:
            regex = self.regex.value.strip()
            if regex and self.targets.value:
                raise ConfigError(f"{self.method.value}: choose target modules or type a regex, not both")
            if regex:
                options["targets"] = regex
            elif self.targets.value:
                options["targets"] = list(self.targets.value)
        return options

    def refresh(self, *_: Any) -> None:
        """Recompute the preview of trainable parameters for the current settings."""
        if getattr(self, "_quiet", False):
            return
        try:
            self.last_preview = preview(self.model, self.method.value, name=self.name.value, **self.options())
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            self.last_preview = None
            say(self.preview, one_line(err), error=True)
        else:
            self.preview.value = f"<b>would train {self.last_preview}</b>"

    def _idle(self) -> None:
        reason = self.busy()
        if reason:
            raise ConfigError(reason)
        self.before()

    def attach(self, *_: Any) -> nbpeft.Adapter | None:
        """``nbpeft.attach(model, method, name=name, **options)``; errors show below the buttons."""
        try:
            self._idle()
            adapter = nbpeft.attach(self.model, self.method.value, name=self.name.value, **self.options())
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
            return None
        say(self.message, repr(adapter))
        self.on_change()
        return adapter

    def detach(self, *_: Any) -> None:
        """``nbpeft.detach(model, name)`` for the adapter named in the name field."""
        try:
            self._idle()
            nbpeft.detach(self.model, self.name.value)
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
            return
        say(self.message, f"detached {self.name.value!r}")
        self.on_change()
