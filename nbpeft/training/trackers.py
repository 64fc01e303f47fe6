"""Experiment trackers: ``train(report_to="tensorboard" | "mlflow" | "trackio" | [...])``.

Each tracker is a :class:`Listener` that writes through the tool's own library: the run's
hyperparameters at the start, every step's figures (loss, learning rate, eval loss, metrics,
speed, memory), and a summary at the end.

- TensorBoard: event files in ``runs/<run id>/`` under the current folder (the notebook's),
  or under ``logging_dir=``; ``tensorboard --logdir runs`` shows them.
- MLflow: the server or database ``MLFLOW_TRACKING_URI`` names, else MLflow's local default
  (``mlflow.db`` in the current folder); experiment ``MLFLOW_EXPERIMENT_NAME`` or ``nbpeft``.
- trackio: project ``TRACKIO_PROJECT`` or ``nbpeft``, stored where trackio keeps its projects.

A tracker's library missing is one line before anything trains; a tracker failing mid-run
(a full disk, a server gone) is said once and training goes on (``events.Guarded``).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .events import Begin, End, Listener, Step

# tracker name -> (the module it needs, the extra that installs it)
LIBRARIES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
DEFAULT_PROJECT = "nbpeft"
PARAM_CHARS = 6000  # MLflow refuses longer parameter values


def names(report_to: Any) -> list[str]:
    """``report_to`` as a list of tracker names ([] for None)."""
    if report_to is None:
        return []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def valid(report_to: Any) -> bool:
    """What the option's check accepts: None, a tracker's name, or a list of them."""
    if report_to is None:
        return True
    if isinstance(report_to, str):
        return report_to in LIBRARIES
    return isinstance(report_to, (list, tuple)) and all(isinstance(n, str) and n in LIBRARIES for n in report_to)


def check(report_to: Any, caller: str = "train()") -> None:
    """One line naming the extra to install, for the first tracker whose library is missing."""
    for name in names(report_to):
        module, extra = LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{caller}: report_to={name!r} needs {module}; pip install nbpeft[{extra}]")


def step_figures(step: Step) -> dict[str, float]:
    figures = {"train/loss": step.loss, "train/lr": step.lr, "train/tokens_per_s": step.tokens_per_s,
               "train/step_time_s": step.step_time_s, "train/peak_mem_bytes": float(step.peak_mem_bytes)}
    if step.eval_loss is not None:
        figures["eval/loss"] = step.eval_loss
    figures.update({f"eval/{k}": v for k, v in step.metrics.items()})
    return figures


def summary_figures(end: End) -> dict[str, float]:
    result = end.result
    figures = {"final/train_loss": result.final_loss, "final/steps": float(result.steps),
               "final/seconds": result.seconds, "final/tokens_per_s": result.tokens_per_s,
               "final/peak_mem_bytes": float(result.peak_mem_bytes)}
    if result.eval_losses:
        figures["final/eval_loss"] = result.eval_losses[-1][1]
    return {k: v for k, v in figures.items() if v is not None}


def flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``method.default.r``-style keys of numbers, text and booleans."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class TensorBoardTracker(Listener):
    def __init__(self, run_id: str, params: dict[str, Any], logging_dir: Any = None) -> None:
        self.folder = Path(logging_dir if logging_dir is not None else "runs") / run_id
        self.params, self.writer = params, None

    def on_begin(self, begin: Begin) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(self.folder))
        # hyperparameters in the HParams tab, in this run's own folder (add_hparams would start another)
        for summary in hparams(flat(self.params), {"final/train_loss": 0.0, "final/eval_loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def on_step(self, step: Step) -> None:
        for key, value in step_figures(step).items():
            self.writer.add_scalar(key, value, step.step)

    def on_end(self, end: End) -> None:
        for key, value in summary_figures(end).items():
            self.writer.add_scalar(key, value, end.result.steps)
        self.writer.close()

    def failed(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker(Listener):
    def __init__(self, run_id: str, params: dict[str, Any], logging_dir: Any = None) -> None:
        self.name, self.params, self.client, self.run = run_id, params, None, None

    def on_begin(self, begin: Begin) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's local default
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run = self.client.create_run(experiment_id, run_name=self.name).info.run_id
        self.client.log_batch(self.run, params=[Param(k, str(v)[:PARAM_CHARS]) for k, v in flat(self.params).items()])

    def _log(self, figures: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run, metrics=[Metric(k, float(v), now, step) for k, v in figures.items()])

    def on_step(self, step: Step) -> None:
        self._log(step_figures(step), step.step)

    def on_end(self, end: End) -> None:
        self._log(summary_figures(end), end.result.steps)
        self.client.set_terminated(self.run, "FINISHED" if not end.result.stopped else "KILLED")

    def failed(self, status: str) -> None:
        if self.run is not None:
            self.client.set_terminated(self.run, "KILLED" if status == "interrupted" else "FAILED")


class TrackioTracker(Listener):
    def __init__(self, run_id: str, params: dict[str, Any], logging_dir: Any = None) -> None:
        self.name, self.params, self.run = run_id, params, None

    def on_begin(self, begin: Begin) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT), name=self.name,
                                config=flat(self.params), embed=False)

    def on_step(self, step: Step) -> None:
        self.run.log(step_figures(step), step=step.step)

    def on_end(self, end: End) -> None:
        self.run.log(summary_figures(end), step=end.result.steps)
        self.run.finish()

    def failed(self, status: str) -> None:
        if self.run is not None:
            self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "trackio": TrackioTracker}


def build(report_to: Any, run_id: str, params: dict[str, Any], logging_dir: Any = None) -> list[tuple[str, Listener]]:
    """(name, tracker) for each of ``report_to``; the libraries were checked by :func:`check`."""
    return [(name, TRACKERS[name](run_id, params, logging_dir)) for name in dict.fromkeys(names(report_to))]
