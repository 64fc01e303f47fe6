"""The adapters tab: every adapter on the model, and one button per core API call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from torch import nn

import nbpeft

from ..methods.base import ConfigError
from .attach import one_line, say


class AdaptersTab(widgets.VBox):
    """Adapter table; activate, disable, merge, unmerge, save, load and delete."""

    def __init__(self, model: nn.Module, on_change: Callable[[], None] = lambda: None,
                 busy: Callable[[], str | None] = lambda: None) -> None:
        self.model, self.on_change, self.busy = model, on_change, busy
        label = {"style": {"description_width": "initial"}}
        self.table = widgets.HTML()
        self.table.add_class("nbpeft-adapters")
        self.adapter = widgets.Dropdown(options=[], description="adapter", **label)
        self.activate_button = widgets.Button(description="Activate", icon="check")
        self.disable_button = widgets.Button(description="Disable all", icon="pause",
                                             tooltip="run the base model until Enable all is pressed")
        self.merge_button = widgets.Button(description="Merge", icon="compress")
        self.unmerge_button = widgets.Button(description="Unmerge", icon="expand")
        self.delete_button = widgets.Button(description="Delete", button_style="danger", icon="trash")
        self.path = widgets.Text(placeholder="folder, e.g. my-adapter", description="path", **label)
        self.load_name = widgets.Text(placeholder="(as saved)", description="load as", **label)
        self.save_button = widgets.Button(description="Save", icon="save")
        self.load_button = widgets.Button(description="Load", icon="folder-open")
        self.message = widgets.HTML()
        self.message.add_class("nbpeft-adapters-message")
        self._disabled: contextlib.AbstractContextManager | None = None
        super().__init__([
            self.table,
            widgets.HBox([self.adapter, self.activate_button, self.merge_button, self.unmerge_button, self.delete_button]),
            self.disable_button,
            widgets.HBox([self.path, self.save_button]),
            widgets.HBox([self.load_name, self.load_button]),
            self.message,
        ])
        self.activate_button.on_click(lambda _: self._do("activate", lambda n: nbpeft.set_adapter(self.model, n)))
        self.merge_button.on_click(lambda _: self._do("merge", lambda n: nbpeft.merge(self.model, n)))
        self.unmerge_button.on_click(lambda _: self._do("unmerge", lambda n: nbpeft.unmerge(self.model, n)))
        self.delete_button.on_click(lambda _: self._do("delete", lambda n: nbpeft.detach(self.model, n)))
        self.save_button.on_click(self.save)
        self.load_button.on_click(self.load)
        self.disable_button.on_click(self.toggle_disabled)
        self.refresh()

    @property
    def disabled(self) -> bool:
        return self._disabled is not None

    def refresh(self) -> None:
        """Redraw the table and the adapter list from the model."""
        summary = nbpeft.summary(self.model)
        note = "<p><b>all adapters disabled: the model runs as the base model</b></p>" if self.disabled else ""
        self.table.value = summary._repr_html_() + note
        names = [row.name for row in summary.adapters]
        current = self.adapter.value
        self.adapter.options = names
        if current in names:
            self.adapter.value = current
        elif names:
            self.adapter.value = next((row.name for row in summary.adapters if row.active), names[0])

    def enable(self) -> None:
        """End a Disable all: adapters take part in forward again (any other action does this first)."""
        if self._disabled is not None:
            manager, self._disabled = self._disabled, None
            manager.__exit__(None, None, None)
            self.disable_button.description, self.disable_button.icon = "Disable all", "pause"

    def toggle_disabled(self, *_: Any) -> None:
        """``nbpeft.disable_adapters(model)`` held open until pressed again."""
        try:
            self._idle()
            if self._disabled is not None:
                self.enable()
                say(self.message, "adapters enabled again")
            else:
                manager = nbpeft.disable_adapters(self.model)
                manager.__enter__()
                self._disabled = manager
                self.disable_button.description, self.disable_button.icon = "Enable all", "play"
                say(self.message, "all adapters disabled: forward runs the base model")
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
        self.refresh()

    def _idle(self) -> None:
        reason = self.busy()
        if reason:
            raise ConfigError(reason)

    def _selected(self) -> str:
        if not self.adapter.value:
            raise ConfigError("this model has no adapter; attach one in the first tab")
        return self.adapter.value

    def _folder(self, missing: str) -> str:
        """The path box's folder, once the model is free; ``missing`` is the error when it is empty."""
        self._idle()
        self.enable()
        folder = self.path.value.strip()
        if not folder:
            raise ConfigError(missing)
        return folder

    def _do(self, verb: str, call: Callable[[str], Any]) -> bool:
        try:
            self._idle()
            self.enable()
            name = self._selected()
            call(name)
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
            self.refresh()
            return False
        say(self.message, f"{verb}: {name!r}")
        self.on_change()
        return True

    def save(self, *_: Any) -> None:
        """``nbpeft.save_adapter(model, path, name=adapter)``."""
        try:
            folder = self._folder("save: type a folder in path first")
            folders = nbpeft.save_adapter(self.model, folder, name=self._selected())
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
            return
        say(self.message, "saved " + ", ".join(str(f) for f in folders))

    def load(self, *_: Any) -> None:
        """``nbpeft.load_adapter(model, path, name=load as)``."""
        try:
            folder = self._folder("load: type the adapter's folder in path first")
            loaded = nbpeft.load_adapter(self.model, folder, name=self.load_name.value.strip() or None)
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
            return
        say(self.message, "loaded " + ", ".join(repr(a.name) for a in loaded))
        self.on_change()
