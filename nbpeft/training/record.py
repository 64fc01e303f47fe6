"""Every ``train()`` run kept: a listener that writes the run to the run store as it goes.

What a run records (see ``nbpeft.formats.run_store`` for the file): its id and start time, the
model, the method and its settings, the options that are plain values, a fingerprint and the
size of the data, precision and device, one point per step (train loss, eval loss, metrics,
learning rate), time, speed, peak memory and how it ended. A store that cannot be written is
said once and training goes on; ``TrainResult.run_id`` names the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import nn

from .. import core
from ..formats import run_store
from ..formats.peft_folder import base_model_id
from . import trackers
from .events import Begin, End, Guarded, Listener, Note, Step, Together

FLUSH_S = 5.0  # steps reach the file at least this often: a dead kernel loses seconds of curve, not the run
# options that are not settings of the run (the data is fingerprinted; functions and listeners are not values)
NOT_RECORDED = ("data", "eval_data", "tokenizer", "live", "runs", "report_to", "logging_dir")


def new_run_id() -> str:
    """Sortable by start time and unique: ``20250101-120000-3fa2``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def fingerprint(data: Any) -> tuple[str | None, int | None]:
    """(a short hash of the examples, how many there are); (None, None) for data that cannot be read twice."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        stats = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in
                       ([path] if path.exists() else sorted(path.parent.glob(path.name))))
        return hashlib.sha256(repr(stats).encode()).hexdigest()[:16], None
    if isinstance(data, (list, tuple)):
        digest = hashlib.sha256()
        for example in data:
            digest.update(json.dumps(example, sort_keys=True, default=repr).encode())
        return digest.hexdigest()[:16], len(data)
    recorded = getattr(data, "_fingerprint", None)  # a datasets.Dataset knows its own
    if isinstance(recorded, str):
        return recorded[:16], len(data)
    if hasattr(data, "to_json") and hasattr(data, "columns"):  # a pandas DataFrame
        return hashlib.sha256(data.to_json().encode()).hexdigest()[:16], len(data)
    return None, (len(data) if hasattr(data, "__len__") and not hasattr(data, "batch_size") else None)


def recorded_options(settings: Any) -> dict[str, Any]:
    """The run's options that are plain values (numbers, text, lists): what a record keeps."""
    return {k: v for k, v in vars(settings).items() if k not in NOT_RECORDED and _plain(v)}


def model_name(model: nn.Module) -> str:
    return base_model_id(model) or type(model).__name__


def adapters_trained(model: nn.Module, full: bool) -> tuple[str, str, dict[str, Any]]:
    """(adapter names, methods, settings by adapter) of what this run trains."""
    if full:
        return "", "full", {}
    st = core.state(model)
    active = [st.adapters[n] for n in st.active if n in st.adapters]
    settings = {a.name: {k: v for k, v in a.options.items() if _plain(v)} for a in active}
    return ",".join(a.name for a in active), "+".join(dict.fromkeys(a.method for a in active)), settings


class RunRecorder(Listener):
    """Writes one run to the store: a row at the start, its points as it goes, its end."""

    def __init__(self, path: Path, model: nn.Module, data: Any, settings: Any, run_id: str) -> None:
        self.path, self.model, self.settings, self.given_id = path, model, settings, run_id
        self.data_print = fingerprint(data)
        self.run_id: str | None = None  # set once the run's row is written
        self.pending: list[dict[str, Any]] = []
        self.last_flush = 0.0
        self.last_step: Step | None = None

    def on_begin(self, begin: Begin) -> None:
        adapter, method, method_settings = adapters_trained(self.model, self.settings.full)
        options = recorded_options(self.settings)
        run_id = self.given_id
        run_store.insert_run(self.path, {
            "id": run_id, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "model": model_name(self.model), "adapter": adapter, "method": method, "method_settings": method_settings,
            "options": options, "data_fingerprint": self.data_print[0], "data_size": self.data_print[1],
            "precision": begin.precision, "device": begin.device, "trainable": begin.trainable,
            "total_steps": begin.total_steps, "steps": begin.start_step, "status": "running",
        })
        self.run_id, self.last_flush = run_id, time.monotonic()

    def on_step(self, step: Step) -> None:
        if self.run_id is None:
            return
        self.last_step = step
        self.pending.append({"step": step.step, "loss": step.loss, "eval_loss": step.eval_loss, "lr": step.lr,
                             "tokens": step.tokens, "step_time_s": step.step_time_s, "elapsed_s": step.elapsed_s,
                             "metrics": step.metrics})
        if time.monotonic() - self.last_flush >= FLUSH_S or step.eval_loss is not None or step.metrics:
            self._flush({"steps": step.step})

    def _flush(self, fields: dict[str, Any]) -> None:
        points, self.pending = self.pending, []
        run_store.update_run(self.path, self.run_id, fields, points)
        self.last_flush = time.monotonic()

    def on_end(self, end: End) -> None:
        if self.run_id is None:
            return
        result = end.result
        evals = [row for row in result.history if row.get("eval_loss") is not None]
        metrics = next((row["metrics"] for row in reversed(result.history) if row.get("metrics")), {})
        status = "finished" if not result.stopped else ("interrupted" if result.stopped == "interrupted" else "stopped")
        self._flush({
            "steps": result.steps, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s,
            "peak_mem_bytes": result.peak_mem_bytes, "final_loss": result.final_loss,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None, "final_metrics": metrics,
            "status": status, "message": result.message, "device": result.device,
        })
        result.run_id = self.run_id
        st = core.state(self.model)
        for name in st.active:
            if name in st.adapters:
                st.adapters[name].run_id = self.run_id

    def failed(self, err: BaseException) -> None:
        """The run raised: keep what it did and its one line."""
        if self.run_id is None:
            return
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        interrupted = isinstance(err, KeyboardInterrupt)
        self._flush({"steps": self.last_step.step if self.last_step else 0,
                     "status": "interrupted" if interrupted else "failed",
                     "message": text if interrupted else f"{type(err).__name__}: {text}".rstrip(": ")})


class Extras:
    """What ``train()`` adds to its display: the run record and the trackers, each guarded.

    Built before anything trains, so a tracker whose library is missing stops the call there.
    """

    def __init__(self, model: nn.Module, data: Any, settings: Any) -> None:
        trackers.check(settings.report_to)
        path = run_store.location(settings.runs)
        self.run_id = new_run_id()
        self.recorder = RunRecorder(path, model, data, settings, self.run_id) if path is not None else None
        adapter, method, method_settings = adapters_trained(model, settings.full)
        params = {"model": model_name(model), "method": method, "adapter": adapter, "settings": method_settings,
                  **recorded_options(settings)}
        self.trackers = trackers.build(settings.report_to, self.run_id, params, settings.logging_dir)

    def around(self, display: Listener) -> Listener:
        """``display`` followed by the extras; an extra that fails is said once through the display."""
        extras = ([("the run record", self.recorder)] if self.recorder is not None else []) + self.trackers
        if not extras:
            return display
        say = display.on_note if type(display) is not Listener else _warn  # live=False: a warning instead
        return Together([display, *(Guarded(extra, name, say) for name, extra in extras)])

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Record a run that raises (failed, or interrupted outside a step) before the error goes on."""
        try:
            yield
        except BaseException as err:
            self.failed(err)
            raise

    def failed(self, err: BaseException) -> None:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        ends = [("the run record", lambda: self.recorder.failed(err))] if self.recorder is not None else []
        ends += [(name, lambda tracker=tracker: tracker.failed(status)) for name, tracker in self.trackers]
        for name, end in ends:
            try:
                end()
            except Exception as extra_err:  # noqa: BLE001 (the run's own error is the one to raise)
                _warn(Note(f"{name} stopped: {extra_err}"))


def _warn(note: Note) -> None:
    warnings.warn(f"nbpeft: {note.message}", RuntimeWarning, stacklevel=3)
