"""The attach tab: pick a method, set its options and targets, see the cost, attach."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from torch import nn

import nbpeft

from .. import core, targeting
from ..errors import ConfigError
from ..methods.base import Method, get_method
from .fields import LABEL, OptionField, help_label, option_fields, read_options
from .messages import note, say, shows_errors
from .preview import Preview, preview

# the API's keyword spellings as this tab labels them
SPELLINGS = {"name=": "adapter name ", "(replace=True puts a fresh one in its place)": ""}  # no replace box here


def target_choices(model: nn.Module, method: Method) -> list[tuple[str, str]]:
    """``("q_proj ×30", "q_proj")`` for every leaf name ``method`` can adapt, in model order.

    The method itself decides (its ``select`` refuses a leaf of a kind it cannot adapt, such
    as a layer norm or an embedding for LoRA); output heads are left to ``modules_to_save``.
    """
    counts = targeting.leaf_counts(model)
    heads = {path.rsplit(".", 1)[-1] for path in targeting.head_names(model)}
    leaves: list[str] = []
    for path, module in targeting.base_modules(model).items():
        leaf = path.rsplit(".", 1)[-1]
        if path and leaf not in leaves and leaf not in heads and next(module.parameters(recurse=False), None) is not None:
            leaves.append(leaf)
    adaptable = []
    for leaf in leaves:
        try:
            method.select(model, method.config_class.from_options({"targets": [leaf]}), core.state(model).adapters)
        except ConfigError:
            continue
        adaptable.append((f"{leaf} ×{counts[leaf]}", leaf))
    return adaptable


def default_targets(model: nn.Module, method: Method) -> list[str]:
    """The leaf names of the modules ``method`` adapts on ``model`` when no targets are given (none: it has no
    default for this model). The method's own ``select`` decides, as ``attach`` will."""
    try:
        paths = method.select(model, method.config_class.from_options({}), core.state(model).adapters)
    except ConfigError:
        return []
    return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))


class AttachTab(widgets.VBox):
    """Method dropdown, generated option fields, target picker, live preview, Attach and Detach."""

    def __init__(self, model: nn.Module, on_change: Callable[[], None] = lambda: None,
                 busy: Callable[[], str | None] = lambda: None, before: Callable[[], None] = lambda: None) -> None:
        self.model, self.on_change, self.busy, self.before = model, on_change, busy, before
        names = [info.name for info in nbpeft.methods()]
        self.method = widgets.Dropdown(options=names, value="lora" if "lora" in names else names[0],
                                       description="method", **LABEL)
        self.method.add_class("nbpeft-method")
        self.description = help_label("")
        self.name = widgets.Text(value="default", description="adapter name", continuous_update=False,
                                 tooltip="the adapter's name on the model", **LABEL)
        self.name.add_class("nbpeft-name")
        self.targets = widgets.SelectMultiple(options=[], rows=1, description="targets",
                                              tooltip="modules to adapt, by name", **LABEL)
        self.targets.add_class("nbpeft-targets")
        self.targets_help = help_label("")
        self.targets_help.add_class("nbpeft-targets-help")
        self.regex = widgets.Text(placeholder="a regex over module paths, or all-linear", description="or regex",
                                  continuous_update=False, **LABEL)
        self.regex.add_class("nbpeft-regex")
        self.target_box = widgets.VBox([widgets.HBox([self.targets, self.targets_help]), self.regex])
        self.fields_box = widgets.VBox()
        self.preview = widgets.HTML()
        self.preview.add_class("nbpeft-preview")
        self.attach_button = widgets.Button(description="Attach", button_style="primary", icon="plus")
        self.attach_button.add_class("nbpeft-attach")
        self.detach_button = widgets.Button(description="Detach", icon="minus")
        self.message = widgets.HTML()
        self.message.add_class("nbpeft-message")
        self.fields: dict[str, OptionField] = {}
        self.defaults: list[str] = []
        self.last_preview: Preview | None = None
        self._quiet = False
        super().__init__([
            widgets.HBox([self.method, self.description]), self.name, self.fields_box, self.target_box,
            self.preview, widgets.HBox([self.attach_button, self.detach_button]), self.message,
        ])
        self.method.observe(self._build_fields, "value")
        for widget in (self.name, self.targets, self.regex):
            widget.observe(self._edited, "value")
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
            field.widget.observe(self._edited, "value")
        self.fields_box.children = [f.row for k, f in self.fields.items() if k != "targets"]
        self.target_box.layout.display = None if self.has_targets else "none"
        self._quiet = True
        self.targets.value, self.regex.value = (), ""
        choices = target_choices(self.model, spec) if self.has_targets else []
        self.defaults = default_targets(self.model, spec) if self.has_targets else []
        self.targets.options, self.targets.rows = choices, min(8, max(len(choices), 1))
        self._quiet = False
        self._edited()

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

    def _targets_text(self) -> str:
        chosen = list(self.targets.value)
        if self.regex.value.strip():
            return "the regex below chooses the targets" if not chosen else "clear the selection or the regex"
        if chosen:
            return f"{len(chosen)} selected: {', '.join(chosen)}"
        if not self.defaults:
            return "none selected, and the method has no default targets on this model: select some"
        return f"none selected: the method's default targets ({', '.join(self.defaults)})"

    def _edited(self, *_: Any) -> None:
        """A setting changed: an error from an earlier click no longer applies."""
        if self._quiet:
            return
        if "#b00020" in self.message.value:
            self.message.value = ""
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Recompute the preview of trainable parameters; Attach is enabled only when it would succeed."""
        if self._quiet:
            return
        self.targets_help.value = html.escape(self._targets_text())
        name = self.name.value
        attached = [row.name for row in nbpeft.summary(self.model).adapters]
        self.last_preview = None
        if name in attached:
            note(self.preview, f"an adapter named {name!r} is already attached: type a new adapter name "
                               "to attach another, or Detach it")
        else:
            self._preview(name)
        self.attach_button.disabled = self.last_preview is None

    @shows_errors("preview", SPELLINGS)
    def _preview(self, name: str) -> None:
        self.last_preview = preview(self.model, self.method.value, name=name, **self.options())
        self.preview.value = f"<b>would train {self.last_preview}</b>"

    def _idle(self) -> None:
        reason = self.busy()
        if reason:
            raise ConfigError(reason)
        self.before()

    @shows_errors("message", SPELLINGS)
    def attach(self, *_: Any) -> nbpeft.Adapter | None:
        """``nbpeft.attach(model, method, name=name, **options)``; errors show below the buttons."""
        self._idle()
        adapter = nbpeft.attach(self.model, self.method.value, name=self.name.value, **self.options())
        say(self.message, repr(adapter))
        self.on_change()
        return adapter

    @shows_errors("message")
    def detach(self, *_: Any) -> None:
        """``nbpeft.detach(model, name)`` for the adapter named in the name field."""
        self._idle()
        nbpeft.detach(self.model, self.name.value)
        say(self.message, f"detached {self.name.value!r}")
        self.on_change()
