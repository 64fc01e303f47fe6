"""The train tab: run ``nbpeft.train`` in a background thread so Stop stays clickable.

The kernel handles widget messages only between cell executions; training on a
thread keeps the cell short, so Stop and the other widgets stay live during the run.
Stop sets a flag that the loop's listener turns into ``StopTraining`` after the
current step.
"""

from __future__ import annotations

import html
import inspect
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
from ..frontend import data_variables, one_line, tokenizer_variables
from ..training.display import LossCurve, banner_text, progress_text, summary_text
from ..training.events import Begin, End, Listener, Note, Step, StopTraining
from ..training.loop import DEFAULT_EFFECTIVE_BATCH, PRECISIONS, TrainResult
from .attach import say

RESULT_VARIABLE = "_peft_result"


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
    """Data, eval data, tokenizer, steps or epochs, learning rate, batch, accumulation, length, precision, device;
    a view of one example as the model will see it; Start and Stop."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, namespace: dict[str, Any] | None = None,
                 on_start: Callable[[], None] = lambda: None) -> None:
        self.model, self.tokenizer, self.on_start = model, tokenizer, on_start
        self.namespace = namespace if namespace is not None else {}
        defaults = {p.name: p.default for p in inspect.signature(nbpeft.train).parameters.values()}
        label = {"style": {"description_width": "initial"}}
        names = data_variables(self.namespace)
        self.data = widgets.Combobox(value="data" if "data" in names else (names[0] if names else ""), options=names,
                                     ensure_option=False, placeholder="a variable: list of examples or DataLoader",
                                     description="data", **label)
        self.eval_data = widgets.Combobox(value="", options=names, ensure_option=False,
                                          placeholder="none, or a variable of held-out examples",
                                          description="eval data", **label)
        self.tokenizer_name = widgets.Combobox(
            value=self._default_tokenizer(), options=tokenizer_variables(self.namespace), ensure_option=False,
            placeholder="the panel's tokenizer" if tokenizer is not None else "a variable, e.g. tokenizer",
            description="tokenizer", **label)
        self.refresh_button = widgets.Button(description="", icon="refresh", tooltip="look for variables again",
                                             layout={"width": "36px"})
        self.length_unit = widgets.ToggleButtons(options=["steps", "epochs"], value="steps", description="train for",
                                                 style={"description_width": "initial", "button_width": "80px"})
        self.steps = widgets.BoundedIntText(value=30, min=1, max=10**7, description="steps", **label)
        self.epochs = widgets.BoundedFloatText(value=1.0, min=0.01, max=10**4, step=0.5, description="epochs",
                                               disabled=True, **label)
        self.lr = widgets.FloatText(value=defaults["lr"], description="learning rate", **label)
        # LoRA+: B's learning rate over A's (1: plain LoRA; the LoRA+ paper uses 16)
        self.lr_ratio = widgets.BoundedFloatText(value=1.0, min=0.01, max=1000.0, description="LoRA+ lr ratio",
                                                 tooltip="LoRA's B matrices learn at this multiple of the rate",
                                                 **label)
        # a number, or "auto": the largest micro-batch that fits, accumulated up to the effective batch
        self.batch_size = widgets.Combobox(value=str(defaults["batch_size"]), options=["auto"], ensure_option=False,
                                           placeholder="a number, or auto", description="batch size", **label)
        self.effective_batch = widgets.BoundedIntText(value=DEFAULT_EFFECTIVE_BATCH, min=1, max=4096, disabled=True,
                                                      description="effective batch", **label)
        self.processes = widgets.BoundedIntText(value=1, min=1, max=1024, description="processes",
                                                tooltip="data-parallel processes: one per GPU, or CPU processes", **label)
        self.shard = widgets.Checkbox(value=False, description="shard the base model over the processes", **label)
        self.grad_accum = widgets.BoundedIntText(value=defaults["grad_accum"], min=1, max=4096,
                                                 description="grad accumulation", **label)
        self.max_length = widgets.BoundedIntText(value=defaults["max_length"], min=1, max=10**6,
                                                 description="max_length", **label)
        self.precision = widgets.Dropdown(options=list(PRECISIONS), value=defaults["precision"],
                                          description="precision", **label)
        self.device = widgets.Dropdown(options=devices(), value="auto", description="device", **label)
        self.example_index = widgets.BoundedIntText(value=0, min=0, max=10**9, description="example",
                                                    layout={"width": "160px"}, **label)
        self.example_button = widgets.Button(description="Show example", icon="eye",
                                             tooltip="this example of the data as the model will see it")
        self.example = widgets.HTML(layout={"max_height": "240px", "overflow": "auto"})
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        for widget, name in ((self.data, "data"), (self.eval_data, "eval-data"), (self.tokenizer_name, "tokenizer"),
                             (self.steps, "steps"), (self.epochs, "epochs"), (self.start_button, "start"),
                             (self.stop_button, "stop"), (self.example_button, "show-example"),
                             (self.example, "example"), (self.batch_size, "batch-size"), (self.processes, "processes")):
            widget.add_class(f"nbpeft-train-{name}")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress", **label)
        self.status = widgets.HTML()
        self.status.add_class("nbpeft-train-status")
        self.plot = widgets.Image(format="png", layout={"width": "480px", "display": "none"})
        self.table = widgets.HTML()
        self.table.add_class("nbpeft-train-table")
        self.message = widgets.HTML()
        self.message.add_class("nbpeft-train-message")
        self.result: TrainResult | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        super().__init__([
            widgets.HBox([self.data, self.refresh_button]), widgets.HBox([self.eval_data, self.tokenizer_name]),
            widgets.HBox([self.length_unit, self.steps, self.epochs]), widgets.HBox([self.lr, self.lr_ratio, self.batch_size]),
            widgets.HBox([self.grad_accum, self.max_length]), widgets.HBox([self.effective_batch, self.processes, self.shard]),
            widgets.HBox([self.precision, self.device]),
            widgets.HBox([self.example_index, self.example_button]), self.example,
            widgets.HBox([self.start_button, self.stop_button]), self.progress, self.status, self.plot, self.table,
            self.message,
        ])
        self.refresh_button.on_click(self.refresh_data)
        self.length_unit.observe(self._unit_changed, names="value")
        self.batch_size.observe(self._batch_changed, names="value")
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

    def _batch_changed(self, change: dict[str, Any]) -> None:
        """With "auto", the accumulation is chosen for the effective batch; otherwise it is the field's."""
        auto = change["new"].strip().lower() == "auto"
        self.grad_accum.disabled, self.effective_batch.disabled = auto, not auto

    def _batch_options(self) -> dict[str, Any]:
        """The batch fields as train()'s keywords: batch_size and grad_accum, or "auto" and effective_batch."""
        text = self.batch_size.value.strip()
        if text.lower() == "auto":
            return {"batch_size": "auto", "effective_batch": self.effective_batch.value}
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"train: batch size {text!r} must be a whole number above 0, or auto")
        return {"batch_size": int(text), "grad_accum": self.grad_accum.value}

    def refresh_data(self, *_: Any) -> None:
        names = data_variables(self.namespace)
        self.data.options = self.eval_data.options = names
        self.tokenizer_name.options = tokenizer_variables(self.namespace)

    def _variable(self, name: str, what: str, caller: str = "train") -> Any:
        if name not in self.namespace:
            raise ConfigError(f"{caller}: no variable {name!r} in the notebook; {what}")
        return self.namespace[name]

    def _chosen_data(self, caller: str) -> Any:
        name = self.data.value.strip()
        if not name:
            raise ConfigError(f"{caller}: which data? type the name of a variable holding a list of examples or a DataLoader")
        return self._variable(name, "make a list of examples first", caller)

    def _chosen_tokenizer(self, caller: str) -> Any:
        """The tokenizer field's variable, else the panel's tokenizer (None: the model's own, if it has one)."""
        name = self.tokenizer_name.value.strip()
        if name:
            return self._variable(name, "load one with model, tokenizer = nbpeft.load_model(...)", caller)
        return self.tokenizer

    def options(self) -> dict[str, Any]:
        """``nbpeft.train`` keyword arguments for the current settings (without ``live``)."""
        data = self._chosen_data("train")
        eval_name = self.eval_data.value.strip()
        eval_data = self._variable(eval_name, "leave eval data empty or name a list of examples") if eval_name else None
        tokenizer = self._chosen_tokenizer("train")
        if tokenizer is None and kind_of(data) != "batches":
            try:
                tokenizer = tokenizer_for(self.model)
            except MissingTokenizer:
                raise ConfigError("train: text data needs a tokenizer; type its variable under tokenizer "
                                  "(model, tokenizer = nbpeft.load_model(...) makes one), "
                                  "or train on a DataLoader of batches") from None
        length = {"steps": self.steps.value} if self.length_unit.value == "steps" else {"epochs": self.epochs.value}
        # processes= and shard= only when asked for: one process, unsharded, is train()'s own default
        scale_out = {"processes": self.processes.value} if self.processes.value > 1 else {}
        scale_out.update({"shard": True} if self.shard.value else {})
        lora_plus = {"lr_ratio": self.lr_ratio.value} if self.lr_ratio.value != 1.0 else {}  # 1 is train()'s default
        return {"model": self.model, "data": data, "eval_data": eval_data, "tokenizer": tokenizer, **length,
                "lr": self.lr.value, **self._batch_options(), "max_length": self.max_length.value,
                "precision": self.precision.value, "device": self.device.value, **lora_plus, **scale_out}

    def show_example(self, *_: Any) -> None:
        """Render ``nbpeft.show_example`` for the chosen data, tokenizer, example number and max_length."""
        try:
            tokenizer = self._chosen_tokenizer("show_example")
            example = nbpeft.show_example(self._chosen_data("show_example"),
                                          tokenizer if tokenizer is not None else self.model,
                                          self.example_index.value, max_length=self.max_length.value)
        except MissingTokenizer as err:
            say(self.example, err.with_fix("type its variable under tokenizer"), error=True)
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.example, one_line(err, {"i=": "example "}), error=True)
        else:
            self.example.value = example._repr_html_()

    def start(self, *_: Any) -> None:
        """Start ``nbpeft.train`` on a background thread; returns at once."""
        if self.running:
            say(self.message, "training is already running; press Stop first", error=True)
            return
        try:
            self.on_start()
            options = self.options()
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
            return
        self._stop.clear()
        self.result = None
        say(self.message, "")
        self.progress.value = 0
        self.display = PanelDisplay(self.progress, self.status, self.plot, self.table)
        self.start_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._run, args=(options,), name="nbpeft-train", daemon=True)
        self._thread.start()

    def _listen(self, event: str, payload: Any) -> None:
        getattr(self.display, f"on_{event}")(payload)
        if event == "step" and self._stop.is_set():
            raise StopTraining

    def _run(self, options: dict[str, Any]) -> None:
        try:
            self.result = nbpeft.train(**options, live=self._listen)
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
        else:
            self.namespace[RESULT_VARIABLE] = self.result
            # a stopped run's message is on the status line already: say it once
            done = "" if self.result.stopped else f"{self.result!r}; "
            say(self.message, f"{done}the result is in {RESULT_VARIABLE}")
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True

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
