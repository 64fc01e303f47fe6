"""The adapters tab: every adapter on the model, and one button per core API call."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from torch import nn

import nbpeft

from ..adapters.combine import HOWS
from ..errors import ConfigError
from ..formats.export import DTYPES, FORMATS, TARGETS
from ..formats.gguf import QUANTS
from ..frontend import parse_options
from .fields import LABEL
from .messages import say, shows_errors

# the API's keyword spellings as this tab labels them
SPELLINGS = {"pass overwrite=True": "tick overwrite",
             "pass tokenizer= (the one load_model returned)": "open the panel with nbpeft.panel(model, tokenizer)",
             "export format=": "export as ", "quant=": "quant (gguf) ", "nbpeft.unmerge(model) first": "press Unmerge first"}
# the combine row's fields as this tab labels them
COMBINE_SPELLINGS = {"weights=": "weights ", "name=": "new adapter ", "density=": "density ", "how=": "how "}
# every field of the export rows is this wide, so the buttons after them line up
FIELD_WIDTH = "330px"
# (head, alignment) of each column: prose left, numbers right, every head over its column
COLUMNS = (("adapter", "left"), ("method", "left"), ("modules", "right"), ("parameters", "right"),
           ("% of base", "right"), ("state", "left"))


def adapter_table(summary: nbpeft.Summary, disabled: bool) -> str:
    """The summary as an HTML table whose heads sit over their columns; ``disabled`` shows in every row."""
    cell = "padding:2px 12px;white-space:nowrap;text-align:{}"
    head = "".join(f'<th style="{cell.format(align)}">{name}</th>' for name, align in COLUMNS)
    rows = []
    for row in summary.adapters:
        if disabled:
            state = "disabled"
        else:
            state = ("active" if row.active else "inactive") + (", merged" if row.merged else "")
        state += "".join(f"; {n}" for n in row.notes)
        values = (row.name, row.method, f"{row.modules}", f"{row.params:,}",
                  f"{100.0 * row.params / max(summary.base, 1):.3f}%", state)
        rows.append("<tr>" + "".join(f'<td style="{cell.format(align)}">{html.escape(v)}</td>'
                                     for v, (_, align) in zip(values, COLUMNS)) + "</tr>")
    if not rows:
        rows = [f'<tr><td colspan="{len(COLUMNS)}" style="{cell.format("left")}">no adapters attached</td></tr>']
    caption = (f"{html.escape(summary.model_name)}: {summary.total:,} parameters, "
               f"<b>{summary.trainable:,} trainable ({summary.trainable_pct:.3f}%)</b>")
    return (f'<table style="border-collapse:collapse"><caption style="text-align:left">{caption}</caption>'
            f"<tr>{head}</tr>{''.join(rows)}</table>")


def _button(description: str, icon: str, **kwargs: Any) -> widgets.Button:
    """A button as wide as its label, so a row of them fits on one line."""
    return widgets.Button(description=description, icon=icon, layout={"width": "auto"}, **kwargs)


class AdaptersTab(widgets.VBox):
    """Adapter table; activate, disable, merge, unmerge, save, load and delete (after a confirmation);
    export, check for a target program, convert to LoRA."""

    def __init__(self, model: nn.Module, on_change: Callable[[], None] = lambda: None,
                 busy: Callable[[], str | None] = lambda: None, tokenizer: Any = None) -> None:
        self.model, self.on_change, self.busy, self.tokenizer = model, on_change, busy, tokenizer
        self.table = widgets.HTML()
        self.table.add_class("nbpeft-adapters")
        self.adapter = widgets.Dropdown(options=[], description="adapter", layout={"width": "300px"}, **LABEL)
        self.activate_button = _button("Activate", "check")
        self.merge_button = _button("Merge", "compress")
        self.unmerge_button = _button("Unmerge", "expand")
        self.delete_button = _button("Delete", "trash", button_style="danger")
        self.disable_button = _button("Disable all", "pause", tooltip="run the base model until Enable all is pressed")
        self.confirm_button = _button("Yes, delete", "trash", button_style="danger")
        self.cancel_button = _button("Cancel", "times")
        self.confirm_text = widgets.HTML()
        self.confirm_box = widgets.HBox([self.confirm_text, self.confirm_button, self.cancel_button],
                                        layout={"display": "none"})
        self.path = widgets.Text(placeholder="folder, e.g. my-adapter", description="path", **LABEL)
        self.overwrite = widgets.Checkbox(value=False, description="overwrite", indent=False,
                                          tooltip="replace an adapter already saved at path", layout={"width": "auto"})
        self.load_name = widgets.Text(placeholder="(as saved)", description="load as", **LABEL)
        self.save_button = _button("Save", "save")
        self.load_button = _button("Load", "folder-open")
        self.message = widgets.HTML()
        self.message.add_class("nbpeft-adapters-message")
        for widget, name in ((self.delete_button, "delete"), (self.disable_button, "disable"),
                             (self.confirm_button, "confirm"), (self.save_button, "save"),
                             (self.overwrite, "overwrite")):
            widget.add_class(f"nbpeft-adapters-{name}")
        self.buttons = widgets.HBox([self.adapter, self.activate_button, self.merge_button, self.unmerge_button,
                                     self.delete_button, self.disable_button], layout={"flex_flow": "row nowrap"})
        self.buttons.add_class("nbpeft-adapters-buttons")
        self._disabled: contextlib.AbstractContextManager | None = None
        self.export_rows = self._export_section()
        super().__init__([
            self.table, self.buttons, self.confirm_box,
            widgets.HBox([self.path, self.save_button, self.overwrite]),
            widgets.HBox([self.load_name, self.load_button]),
            widgets.HTML("<b>Export</b> (the active adapter, merged into a copy of the model unless a GGUF adapter)"),
            *self.export_rows,
            *self._combine_section(),
            self.message,
        ])
        self.activate_button.on_click(lambda _: self._do("activate", lambda n: nbpeft.set_adapter(self.model, n)))
        self.merge_button.on_click(lambda _: self._do("merge", lambda n: nbpeft.merge(self.model, n)))
        self.unmerge_button.on_click(lambda _: self._do("unmerge", lambda n: nbpeft.unmerge(self.model, n)))
        self.delete_button.on_click(self.ask_delete)
        self.confirm_button.on_click(lambda _: self._do("delete", lambda n: nbpeft.detach(self.model, n)))
        self.cancel_button.on_click(self._hide_confirm)
        self.save_button.on_click(self.save)
        self.load_button.on_click(self.load)
        self.disable_button.on_click(self.toggle_disabled)
        self.refresh()

    def _export_section(self) -> list[widgets.HBox]:
        """Format, dtype, quant and path with Export; a target with Check; a rank with Convert to LoRA."""
        field = {"layout": {"width": FIELD_WIDTH}, **LABEL}
        self.export_format = widgets.Dropdown(options=list(FORMATS), value=FORMATS[0], description="export as", **field)
        # ipywidgets shows a None value as nothing selected: "base" stands for dtype=None here
        self.export_dtype = widgets.Dropdown(options=[("as the base", "base"), *((d, d) for d in DTYPES)], value="base",
                                             description="dtype (merged)", **field)
        self.export_quant = widgets.Dropdown(options=list(QUANTS), value=QUANTS[0], description="quant (gguf)",
                                             disabled=True, **field)
        self.export_path = widgets.Text(placeholder="a new folder, e.g. out/merged", description="export to", **field)
        self.export_button = _button("Export", "download")
        self.check_target = widgets.Dropdown(options=list(TARGETS), value=TARGETS[0], description="check for", **field)
        self.check_button = _button("Check", "search")
        self.lora_rank = widgets.BoundedIntText(value=8, min=1, max=4096, description="LoRA rank", **field)
        self.to_lora_button = _button("Convert to LoRA", "exchange", tooltip="the selected adapter as a plain LoRA")
        for widget, name in ((self.export_format, "export-format"), (self.export_path, "export-path"),
                             (self.export_button, "export"), (self.check_button, "check"),
                             (self.to_lora_button, "to-lora")):
            widget.add_class(f"nbpeft-adapters-{name}")
        self.export_format.observe(lambda _: self._follow_format(), names="value")
        self.export_button.on_click(self.export)
        self.check_button.on_click(self.check)
        self.to_lora_button.on_click(self.to_lora)
        return [widgets.HBox([self.export_format]), widgets.HBox([self.export_dtype]), widgets.HBox([self.export_quant]),
                widgets.HBox([self.export_path, self.export_button]), widgets.HBox([self.check_target, self.check_button]),
                widgets.HBox([self.lora_rank, self.to_lora_button])]

    def _combine_section(self) -> list[widgets.Widget]:
        """Weights, how, density and a new name with Combine (nbpeft.combine)."""
        field = {"layout": {"width": FIELD_WIDTH}, **LABEL}
        self.combine_weights = widgets.Text(placeholder="e.g. chat=0.7 sql=0.3", description="weights", **field)
        self.combine_how = widgets.Dropdown(options=list(HOWS), value=HOWS[0], description="how", **field)
        self.combine_density = widgets.BoundedFloatText(value=0.5, min=0.01, max=1.0, step=0.05,
                                                        description="density (ties, dare)", disabled=True, **field)
        self.combine_name = widgets.Text(placeholder="e.g. mix", description="new adapter", **field)
        self.combine_button = _button("Combine", "object-group", tooltip="attach the mix as a new adapter")
        self.combine_button.add_class("nbpeft-adapters-combine")
        self.combine_how.observe(lambda _: setattr(self.combine_density, "disabled", self.combine_how.value not in
                                                   ("ties", "dare_linear", "dare_ties")), names="value")
        self.combine_button.on_click(self.combine)
        return [widgets.HTML("<b>Combine</b> (LoRA adapters, weighted, into a new one)"),
                widgets.HBox([self.combine_weights]), widgets.HBox([self.combine_how]),
                widgets.HBox([self.combine_density]), widgets.HBox([self.combine_name, self.combine_button])]

    @shows_errors("message", COMBINE_SPELLINGS)
    def combine(self, *_: Any) -> None:
        """``nbpeft.combine(model, {name: weight, ...}, name=..., how=..., density=...)``; the mix becomes active."""
        self._hide_confirm()
        self._idle()
        self.enable()
        weights = parse_options(self.combine_weights.value)
        if not weights:
            raise ConfigError("combine: type the adapters and their weights first, e.g. chat=0.7 sql=0.3")
        how = self.combine_how.value
        density = {} if self.combine_density.disabled else {"density": self.combine_density.value}
        adapter = nbpeft.combine(self.model, weights, name=self.combine_name.value.strip(), how=how, **density)
        say(self.message, repr(adapter))
        self.on_change()

    def _follow_format(self) -> None:
        """dtype applies to a merged folder, quant to a GGUF model."""
        self.export_dtype.disabled = self.export_format.value != "merged"
        self.export_quant.disabled = self.export_format.value != "gguf"

    @property
    def disabled(self) -> bool:
        return self._disabled is not None

    def refresh(self) -> None:
        """Redraw the table and the adapter list from the model."""
        summary = nbpeft.summary(self.model)
        self.table.value = adapter_table(summary, self.disabled)
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
        self._hide_confirm()
        self._toggle()
        self.refresh()

    @shows_errors("message")
    def _toggle(self) -> None:
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

    @shows_errors("message")
    def ask_delete(self, *_: Any) -> None:
        """Delete asks first: the adapter's trained weights go with it."""
        name = self._selected()
        self.confirm_text.value = f"<b>delete {html.escape(repr(name))} and its weights?</b>&nbsp;"
        self.confirm_box.layout.display = None

    def _hide_confirm(self, *_: Any) -> None:
        self.confirm_box.layout.display = "none"

    def _do(self, verb: str, call: Callable[[str], Any]) -> None:
        """``call(adapter)`` for the selected adapter, then the table shows the model as it now is."""
        self._hide_confirm()
        self._act(verb, call)
        self.refresh()

    @shows_errors("message")
    def _act(self, verb: str, call: Callable[[str], Any]) -> None:
        self._idle()
        self.enable()
        name = self._selected()
        call(name)
        say(self.message, f"{verb}: {name!r}")
        self.on_change()

    @shows_errors("message", SPELLINGS)
    def save(self, *_: Any) -> None:
        """``nbpeft.save_adapter(model, path, name=adapter, overwrite=overwrite)``."""
        self._hide_confirm()
        folder = self._folder("save: type a folder in path first")
        folders = nbpeft.save_adapter(self.model, folder, name=self._selected(), overwrite=self.overwrite.value)
        say(self.message, "saved " + ", ".join(str(f) for f in folders))

    @shows_errors("message")
    def load(self, *_: Any) -> None:
        """``nbpeft.load_adapter(model, path, name=load as)``."""
        self._hide_confirm()
        folder = self._folder("load: type the adapter's folder in path first")
        if not Path(folder).exists():
            raise ConfigError(f"load: {folder} does not exist; type the folder an adapter was saved to")
        loaded = nbpeft.load_adapter(self.model, folder, name=self.load_name.value.strip() or None)
        say(self.message, "loaded " + ", ".join(repr(a.name) for a in loaded))
        self.on_change()

    @shows_errors("message", SPELLINGS)
    def export(self, *_: Any) -> None:
        """``nbpeft.export(model, path, format=..., tokenizer=..., dtype=..., quant=..., overwrite=overwrite)``."""
        self._hide_confirm()
        self._idle()
        self.enable()
        path = self.export_path.value.strip()
        if not path:
            raise ConfigError("export: type a new folder in export to first")
        fmt = self.export_format.value
        dtype = None if self.export_dtype.value == "base" else self.export_dtype.value
        options = {"dtype": dtype} if fmt == "merged" else {"quant": self.export_quant.value} if fmt == "gguf" else {}
        result = nbpeft.export(self.model, path, format=fmt, tokenizer=self.tokenizer, overwrite=self.overwrite.value,
                               **options)
        say(self.message, repr(result))

    @shows_errors("message", SPELLINGS)
    def check(self, *_: Any) -> None:
        """``nbpeft.check_export(model, target)``: one line per problem, or that there is none."""
        self._hide_confirm()
        self._idle()
        found = nbpeft.check_export(self.model, self.check_target.value)
        if not found:
            say(self.message, str(found))
            return
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in found)
        self.message.value = f'<span style="color:#8a4b00">{len(found)} to fix before {html.escape(found.target)}:</span><ul>{lines}</ul>'

    @shows_errors("message", SPELLINGS)
    def to_lora(self, *_: Any) -> None:
        """``nbpeft.to_lora(model, rank=..., source=adapter)``; the new LoRA becomes the active adapter."""
        self._hide_confirm()
        self._idle()
        self.enable()
        converted = nbpeft.to_lora(self.model, rank=self.lora_rank.value, source=self._selected())
        say(self.message, repr(converted))
        self.on_change()
