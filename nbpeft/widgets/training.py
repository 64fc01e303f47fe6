"""The train tab: run ``nbpeft.train`` in a background thread so Stop stays clickable.

The kernel handles widget messages only between cell executions; training on a
thread keeps the cell short, so Stop and the other widgets stay live during the run.
Stop sets a flag that the loop's listener turns into ``StopTraining`` after the
current step.
"""

from __future__ import annotations

import html
import inspect
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import torch
from torch import nn

import nbpeft

from ..frontend import data_variables
from ..live import progress_text
from ..methods.base import ConfigError
from ..train import PRECISIONS, StopTraining, TrainResult
from .attach import one_line, say

RESULT_VARIABLE = "_peft_result"


def devices() -> list[str]:
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


class PanelDisplay:
    """A training listener that draws into widgets: progress bar, progress line and loss curve."""

    def __init__(self, progress: widgets.IntProgress, status: widgets.HTML, plot: widgets.Image,
                 min_interval_s: float = 0.5) -> None:
        self.progress, self.status, self.plot, self.min_interval_s = progress, status, plot, min_interval_s
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.last_draw = 0.0
        self.total = 1
        self.memory_label = "peak mem"

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if event == "begin":
            self.total = payload["total_steps"]
            self.memory_label = "peak GPU mem" if payload["device"].startswith("cuda") else "peak RSS"
            self.progress.max, self.progress.value = self.total, 0
            self.status.value = (f"training {payload['trainable']:,} parameters for {self.total} steps on "
                                 f"<b>{payload['device']}</b> ({payload['precision']})")
        elif event == "step":
            row = payload["row"]
            self.steps.append(row["step"])
            self.losses.append(row["loss"])
            self.progress.value = row["step"]
            self.status.value = progress_text(row, self.total, self.memory_label)
            if time.monotonic() - self.last_draw >= self.min_interval_s:
                self.draw()
        elif event == "note":
            self.status.value = html.escape(payload["message"]) + "…"
        elif event == "end":
            result: TrainResult = payload["result"]
            self.draw()
            tail = progress_text(result.history[-1], self.total, self.memory_label) if result.history else "no step done"
            note = f"<br><b>{result.message}</b>" if result.stopped else f" · done in {result.seconds:.1f} s"
            self.status.value = tail + note

    def draw(self) -> None:
        """The loss curve as a PNG: the same picture in every front-end and matplotlib backend."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.0, 2.6), dpi=80)
        axes = figure.add_subplot()
        axes.plot(self.steps, self.losses, label="train")
        axes.set_xlim(0, self.total)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        FigureCanvasAgg(figure).print_png(buffer)
        self.plot.value = buffer.getvalue()
        self.last_draw = time.monotonic()


class TrainTab(widgets.VBox):
    """Data, steps, learning rate, batch size, max_length, precision, device; Start and Stop."""

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
        self.refresh_button = widgets.Button(description="", icon="refresh", tooltip="look for data variables again",
                                             layout={"width": "36px"})
        self.steps = widgets.BoundedIntText(value=30, min=1, max=10**7, description="steps", **label)
        self.lr = widgets.FloatText(value=defaults["lr"], description="learning rate", **label)
        self.batch_size = widgets.BoundedIntText(value=defaults["batch_size"], min=1, max=4096,
                                                 description="batch size", **label)
        self.max_length = widgets.BoundedIntText(value=defaults["max_length"], min=1, max=10**6,
                                                 description="max_length", **label)
        self.precision = widgets.Dropdown(options=list(PRECISIONS), value=defaults["precision"],
                                          description="precision", **label)
        self.device = widgets.Dropdown(options=devices(), value="auto", description="device", **label)
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        for widget, name in ((self.data, "data"), (self.steps, "steps"), (self.start_button, "start"),
                             (self.stop_button, "stop")):
            widget.add_class(f"nbpeft-train-{name}")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress", **label)
        self.status = widgets.HTML()
        self.status.add_class("nbpeft-train-status")
        self.plot = widgets.Image(format="png", layout={"width": "480px"})
        self.message = widgets.HTML()
        self.message.add_class("nbpeft-train-message")
        self.result: TrainResult | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        super().__init__([
            widgets.HBox([self.data, self.refresh_button]), widgets.HBox([self.steps, self.lr]),
            widgets.HBox([self.batch_size, self.max_length]), widgets.HBox([self.precision, self.device]),
            widgets.HBox([self.start_button, self.stop_button]), self.progress, self.status, self.plot, self.message,
        ])
        self.refresh_button.on_click(self.refresh_data)
        self.start_button.on_click(self.start)
        self.stop_button.on_click(self.stop)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def refresh_data(self, *_: Any) -> None:
        self.data.options = data_variables(self.namespace)

    def options(self) -> dict[str, Any]:
        """``nbpeft.train`` keyword arguments for the current settings (without ``live``)."""
        name = self.data.value.strip()
        if not name:
            raise ConfigError("train: which data? type the name of a variable holding a list of examples or a DataLoader")
        if name not in self.namespace:
            raise ConfigError(f"train: no variable {name!r} in the notebook; make a list of examples first")
        tokenizer = self.tokenizer if self.tokenizer is not None else self.namespace.get("tokenizer")
        return {"model": self.model, "data": self.namespace[name], "tokenizer": tokenizer, "steps": self.steps.value,
                "lr": self.lr.value, "batch_size": self.batch_size.value, "max_length": self.max_length.value,
                "precision": self.precision.value, "device": self.device.value}

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
        self.display = PanelDisplay(self.progress, self.status, self.plot)
        self.start_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._run, args=(options,), name="nbpeft-train", daemon=True)
        self._thread.start()

    def _listen(self, event: str, payload: dict[str, Any]) -> None:
        self.display(event, payload)
        if event == "step" and self._stop.is_set():
            raise StopTraining

    def _run(self, options: dict[str, Any]) -> None:
        try:
            self.result = nbpeft.train(**options, live=self._listen)
        except Exception as err:  # noqa: BLE001 (shown in the panel, never as a traceback)
            say(self.message, one_line(err), error=True)
        else:
            self.namespace[RESULT_VARIABLE] = self.result
            say(self.message, f"{self.result.message or repr(self.result)}; the result is in {RESULT_VARIABLE}")
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
