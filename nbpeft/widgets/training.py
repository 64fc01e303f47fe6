"""The train tab: run ``nbpeft.train`` in a background thread so Stop stays clickable.

The kernel handles widget messages only between cell executions; training on a
thread keeps the cell short, so Stop and the other widgets stay live during the run.
Stop sets a flag that the loop's listener turns into ``StopTraining`` after the
current step.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import torch
from torch import nn

import nbpeft

from ..data.batches import MissingTokenizer, kind_of, tokenizer_for
from ..errors import ConfigError
from ..frontend import tokenizer_variables
from ..training import options as train_options
from ..training.display import LossCurve, banner_text, progress_text, summary_text
from ..training.events import Begin, End, Listener, Note, Step, StopTraining
from ..training.loop import DEFAULT_EFFECTIVE_BATCH, TrainResult
from .messages import say, shows_errors
from .train_fields import TrainField, train_fields

RESULT_VARIABLE = "_peft_result"
# the panel draws the run itself: live= is no field
OWN_DISPLAY = ("live",)
# what a box shows where the option's default is None: a run is given steps or epochs; effective_batch's None is 8
SHOWN = {"steps": 30, "epochs": 1.0, "effective_batch": DEFAULT_EFFECTIVE_BATCH}
# fields the tab reads itself: the length as steps or epochs, the batch as a number and accumulation or auto
# and an effective batch, the tokenizer with the panel's and the model's as fallbacks
TAB_READ = ("steps", "epochs", "batch_size", "grad_accum", "effective_batch", "tokenizer")


def devices() -> list[str]:
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


class PanelDisplay(Listener):
    """The panel's renderer: progress bar, progress line, loss curve (train and eval) and eval table."""

    def __init__(self, progress: widgets.IntProgress, status: widgets.HTML, plot: widgets.Image,
                 table: widgets.HTML | None = None, min_interval_s: float = 0.5) -> None:
        self.progress, self.status, self.plot, self.min_interval_s = progress, status, plot, min_interval_s
        self.table = table if table is not None else widgets.HTML()
        self.curve = LossCurve()
        self.last_draw = 0.0

    def on_begin(self, begin: Begin) -> None:
        self.curve.start(begin)
        self.progress.max, self.progress.value = begin.total_steps, begin.start_step
        self.status.value = html.escape(banner_text(begin))
        self.table.value = ""

    def on_step(self, step: Step) -> None:
        had = len(self.curve.evals)
        self.curve.add(step)
        self.progress.value = step.step
        self.status.value = html.escape(progress_text(step, self.curve.memory))
        if len(self.curve.evals) != had:
            self.table.value = self.curve.table_html()
        if time.monotonic() - self.last_draw >= self.min_interval_s:
            self.draw()

    def on_note(self, note: Note) -> None:
        self.status.value = html.escape(note.message) + "…"

    def on_end(self, end: End) -> None:
        if self.curve.steps:
            self.draw()
        last = html.escape(progress_text(self.curve.last, self.curve.memory)) + "<br>" if self.curve.last else ""
        self.status.value = last + "<b>" + html.escape(summary_text(end.result, self.curve.memory)) + "</b>"

    def draw(self) -> None:
        """The loss curve as a PNG: the same picture in every front-end and matplotlib backend."""
        self.plot.value = self.curve.png(6.0, 2.6, 80)
        self.plot.layout.display = None  # hidden until there is a picture: no broken-image icon
        self.last_draw = time.monotonic()


class TrainTab(widgets.VBox):
    """A field for every option of ``train()`` (but ``live``), grouped as declared, with its help;
    a view of one example as the model will see it; Start and Stop.

    ``tab.lr`` (and so on for every option) is that option's widget; ``tab.fields`` holds the fields.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, namespace: dict[str, Any] | None = None,
                 on_start: Callable[[], None] = lambda: None) -> None:
        self.model, self.tokenizer, self.on_start = model, tokenizer, on_start
        self.namespace = namespace if namespace is not None else {}
        self.fields = self._make_fields()
        self._make_controls()
        self.result: TrainResult | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        super().__init__([*self._field_rows(), widgets.HBox([self.example_index, self.example_button]), self.example,
                          widgets.HBox([self.start_button, self.stop_button]), self.progress, self.status, self.plot,
                          self.table, self.message])
        self._connect()

    def __getattr__(self, name: str) -> Any:
        """``tab.<option>`` is that option's widget (``tab.tokenizer_name`` the tokenizer's: ``tab.tokenizer`` is the panel's)."""
        fields = self.__dict__.get("fields", {})
        key = "tokenizer" if name == "tokenizer_name" else name
        if key in fields and name != "tokenizer":
            return fields[key].widget
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _make_fields(self) -> dict[str, TrainField]:
        declared = [o for o in train_options.OPTIONS if o.name not in OWN_DISPLAY]
        fields = train_fields(self.namespace, declared, SHOWN, {"device": devices()})
        names = [n for n in fields["data"].widget.options]
        fields["data"].widget.value = "data" if "data" in names else (names[0] if names else "")
        fields["tokenizer"].widget.value = self._default_tokenizer()
        if self.tokenizer is not None:
            fields["tokenizer"].widget.placeholder = "the panel's tokenizer"
        fields["epochs"].widget.disabled = True
        fields["effective_batch"].widget.disabled = True
        return fields

    def _make_controls(self) -> None:
        label = {"style": {"description_width": "initial"}}
        self.refresh_button = widgets.Button(description="", icon="refresh", tooltip="look for variables again",
                                             layout={"width": "36px"})
        self.length_unit = widgets.ToggleButtons(options=["steps", "epochs"], value="steps", description="train for",
                                                 style={"description_width": "initial", "button_width": "80px"})
        self.example_index = widgets.BoundedIntText(value=0, min=0, max=10**9, description="example",
                                                    layout={"width": "160px"}, **label)
        self.example_button = widgets.Button(description="Show example", icon="eye",
                                             tooltip="this example of the data as the model will see it")
        self.example = widgets.HTML(layout={"max_height": "240px", "overflow": "auto"})
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress", **label)
        self.status, self.table, self.message = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.plot = widgets.Image(format="png", layout={"width": "480px", "display": "none"})
        for widget, name in ((self.start_button, "start"), (self.stop_button, "stop"),
                             (self.example_button, "show-example"), (self.example, "example"),
                             (self.status, "status"), (self.table, "table"), (self.message, "message")):
            widget.add_class(f"nbpeft-train-{name}")

    def _field_rows(self) -> list[widgets.Widget]:
        """Each group's title, then its fields' rows; the data row has the refresh button, the length group its toggle."""
        data = self.fields["data"]
        data.row.children = (data.widget, self.refresh_button, data.hint)
        rows: list[widgets.Widget] = []
        for title, members in train_options.grouped():
            shown = [self.fields[o.name].row for o in members if o.name in self.fields]
            if shown:
                rows.append(widgets.HTML(f"<b>{html.escape(title)}</b>"))
                rows += ([self.length_unit] if members[0].group == "length" else []) + shown
        return rows

    def _connect(self) -> None:
        self.refresh_button.on_click(self.refresh_data)
        self.length_unit.observe(self._unit_changed, names="value")
        self.fields["batch_size"].widget.observe(self._batch_changed, names="value")
        self.fields["grad_accum"].widget.observe(self._batch_changed, names="value")
        self.fields["objective"].widget.observe(self._objective_changed, names="value")
        self._objective_changed()
        self.example_button.on_click(self.show_example)
        self.start_button.on_click(self.start)
        self.stop_button.on_click(self.stop)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _default_tokenizer(self) -> str:
        found = tokenizer_variables(self.namespace)
        if self.tokenizer is not None:
            return next((n for n in found if self.namespace[n] is self.tokenizer), "")
        return "tokenizer" if "tokenizer" in found else (found[0] if found else "")

    def _unit_changed(self, change: dict[str, Any]) -> None:
        self.steps.disabled, self.epochs.disabled = change["new"] == "epochs", change["new"] == "steps"

    def _objective_changed(self, _: Any = None) -> None:
        """Each objective's own options (``TrainOption.objectives``) show only while it is chosen."""
        objective = self.fields["objective"].widget.value
        for option in train_options.OPTIONS:
            if option.name in self.fields and option.objectives:
                self.fields[option.name].row.layout.display = None if option.belongs_to(objective) else "none"

    def _batch_changed(self, _: Any = None) -> None:
        """With "auto", the accumulation is chosen for the effective batch; with a number, the effective
        batch is that number times the accumulation."""
        text = self.batch_size.value.strip().lower()
        auto = text == "auto"
        self.grad_accum.disabled, self.effective_batch.disabled = auto, not auto
        if text.isdigit() and int(text) >= 1:
            self.effective_batch.value = int(text) * self.grad_accum.value

    def _batch_options(self) -> dict[str, Any]:
        """The batch fields as train()'s keywords: batch_size and grad_accum, or "auto" and effective_batch."""
        text = self.batch_size.value.strip()
        if text.lower() == "auto":
            return {"batch_size": "auto", "effective_batch": self.effective_batch.value}
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"train: batch size {text!r} must be a whole number above 0, or auto")
        return {"batch_size": int(text), "grad_accum": self.grad_accum.value}

    def refresh_data(self, *_: Any) -> None:
        for field in self.fields.values():
            field.refresh()

    def _chosen_tokenizer(self, caller: str) -> Any:
        """The tokenizer field's variable, else the panel's tokenizer (None: the model's own, if it has one)."""
        chosen = self.fields["tokenizer"].read(caller)
        return chosen if chosen is not None else self.tokenizer

    def options(self) -> dict[str, Any]:
        """``nbpeft.train`` keyword arguments: the required ones, the length, the batch, the tokenizer, and
        every other field that differs from its option's default (``live`` is the panel's)."""
        found = {}
        objective = self.fields["objective"].widget.value
        for name, field in self.fields.items():
            if name in TAB_READ or not field.option.belongs_to(objective):  # a hidden objective's options stay out
                continue
            value = field.read("train")
            if field.option.required or train_options.differs(value, field.option.default):
                found[name] = value
        tokenizer = self._chosen_tokenizer("train")
        if tokenizer is None and (objective != "sft" or kind_of(found["data"]) != "batches"):
            try:
                tokenizer = tokenizer_for(self.model)
            except MissingTokenizer:
                raise ConfigError("train: text data needs a tokenizer; type its variable under tokenizer "
                                  "(model, tokenizer = nbpeft.load_model(...) makes one), "
                                  "or train on a DataLoader of batches") from None
        length = {"steps": self.steps.value} if self.length_unit.value == "steps" else {"epochs": self.epochs.value}
        return {"model": self.model, **found, "tokenizer": tokenizer, **length, **self._batch_options()}

    @shows_errors("example", {"i=": "example "})
    def show_example(self, *_: Any) -> None:
        """Render ``nbpeft.show_example`` for the chosen data, tokenizer, example number, max_length and columns."""
        tokenizer = self._chosen_tokenizer("show_example")
        data = self.fields["data"].read("show_example")
        columns = self.fields["columns"].read("show_example")
        try:
            example = nbpeft.show_example(data, tokenizer if tokenizer is not None else self.model,
                                          self.example_index.value, max_length=self.max_length.value, columns=columns)
        except MissingTokenizer as err:
            raise ConfigError(err.with_fix("type its variable under tokenizer")) from None
        self.example.value = example._repr_html_()

    def start(self, *_: Any) -> None:
        """Start ``nbpeft.train`` on a background thread; returns at once."""
        if self.running:
            say(self.message, "training is already running; press Stop first", error=True)
            return
        options = self._prepared()
        if options is None:
            return
        self._stop.clear()
        self.result = None
        say(self.message, "")
        self.progress.value = 0
        self.display = PanelDisplay(self.progress, self.status, self.plot, self.table)
        self.start_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._run, args=(options,), name="nbpeft-train", daemon=True)
        self._thread.start()

    @shows_errors("message")
    def _prepared(self) -> dict[str, Any]:
        self.on_start()
        return self.options()

    def _listen(self, event: str, payload: Any) -> None:
        getattr(self.display, f"on_{event}")(payload)
        if event == "step" and self._stop.is_set():
            raise StopTraining

    def _run(self, options: dict[str, Any]) -> None:
        try:
            self._train(options)
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True

    @shows_errors("message")
    def _train(self, options: dict[str, Any]) -> None:
        self.result = nbpeft.train(**options, live=self._listen)
        self.namespace[RESULT_VARIABLE] = self.result
        # a stopped run's message is on the status line already: say it once
        done = "" if self.result.stopped else f"{self.result!r}; "
        say(self.message, f"{done}the result is in {RESULT_VARIABLE}")

    def stop(self, *_: Any) -> None:
        """Ask the run to stop after the current step."""
        if self.running:
            self._stop.set()
            say(self.message, "stopping after the current step…")

    def wait(self, timeout: float | None = None) -> TrainResult | None:
        """Block until the run ends (for scripts and Run All); returns the result."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result
