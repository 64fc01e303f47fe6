"""train(report_to=...): each tracker's logs, read back with the tool's own reader, match the TrainResult."""

from __future__ import annotations

import importlib.util
import json

import pytest

import nbpeft
from nbpeft.training import trackers
from nbpeft.training.events import Listener

from conftest import char_tokenizer, tiny_llama

DATA = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"]


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (pip install nbpeft[{module}])")


def trained(**options):
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    notes = []
    result = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=4, batch_size=2, eval_data=DATA[:2],
                          eval_every=2, lr=3e-3, metrics=lambda m: {"answer_rate": 0.5},
                          live=lambda kind, payload: notes.append(payload.message) if kind == "note" else None,
                          **options)
    return result, notes


@needs("tensorboard")
def test_tensorboard_logs_every_step_hyperparameters_and_summary(tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    result, notes = trained(report_to="tensorboard")
    assert not notes
    folder = tmp_path / "runs" / result.run_id  # beside the notebook: the current folder
    events = EventAccumulator(str(folder))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(result.losses, rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in result.history], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [step for step, _ in result.eval_losses]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([v for _, v in result.eval_losses], rel=1e-6)
    assert [e.value for e in events.Scalars("eval/answer_rate")] == pytest.approx([0.5, 0.5])
    assert events.Scalars("final/train_loss")[0].value == pytest.approx(result.final_loss, rel=1e-6)
    plugin = events.PluginTagToContent("hparams")
    assert plugin, "the hyperparameters are written"
    elsewhere = tmp_path / "logs"
    result, _ = trained(report_to=["tensorboard"], logging_dir=str(elsewhere))
    assert (elsewhere / result.run_id).is_dir()


@needs("mlflow")
def test_mlflow_logs_params_metrics_and_the_end(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result, notes = trained(report_to="mlflow")
    assert not notes
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("nbpeft")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == result.run_id and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003" and run.data.params["settings.default.r"] == "4"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(result.losses)
    assert run.data.metrics["final/eval_loss"] == pytest.approx(result.eval_losses[-1][1])


@needs("trackio")
def test_trackio_logs_every_step(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRACKIO_PROJECT", "nbpeft-test")
    result, notes = trained(report_to="trackio")
    assert not notes
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("nbpeft-test", result.run_id)
    losses = [row["train/loss"] for row in logs if "train/loss" in row]
    assert losses == pytest.approx(result.losses)
    assert [row["final/train_loss"] for row in logs if "final/train_loss" in row] == pytest.approx([result.final_loss])


def test_a_missing_library_is_one_line_before_training(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    model = tiny_llama()
    nbpeft.attach(model, "lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nbpeft.ConfigError, match=r"^train\(\): report_to='mlflow' needs mlflow; pip install nbpeft\[mlflow\]$"):
        nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=1, report_to="mlflow", live=False)
    assert all((before[k] == v).all() for k, v in model.state_dict().items())
    with pytest.raises(nbpeft.ConfigError, match=r"report_to='wandb' must be one of tensorboard, mlflow, trackio"):
        nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=1, report_to="wandb", live=False)


def test_a_tracker_failing_mid_run_is_said_once_and_training_goes_on(monkeypatch) -> None:
    class DiskFull(Listener):
        def __init__(self, *args):
            self.steps = 0

        def on_step(self, step):
            self.steps += 1
            if step.step >= 2:
                raise OSError("[Errno 28] No space left on device")

        def failed(self, status):
            pass

    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", DiskFull)
    monkeypatch.setattr(trackers, "check", lambda report_to, caller="train()": None)
    result, notes = trained(report_to="tensorboard")
    assert result.steps == 4 and result.stopped is None
    assert notes == ["tensorboard stopped: [Errno 28] No space left on device; training goes on"]


def test_hyperparameters_flatten_to_plain_keys() -> None:
    flat = trackers.flat({"lr": 1e-3, "settings": {"default": {"r": 8, "targets": ["q_proj"]}}, "x": None})
    assert flat == {"lr": 1e-3, "settings.default.r": 8, "settings.default.targets": "['q_proj']"}
    json.dumps(flat)
