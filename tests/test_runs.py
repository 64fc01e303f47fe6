"""Every train() run is recorded in the run store; nbpeft.runs() and plot_runs() read it back."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import warnings

import pytest

import nbpeft
from nbpeft.formats import run_store
from nbpeft.training.events import Listener, StopTraining

from conftest import char_tokenizer, tiny_llama

DATA = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("NBPEFT_RUNS", str(path))
    return path


def trained(steps: int = 4, **options):
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    result = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=steps, batch_size=2, live=False, **options)
    return model, result


def test_the_test_suite_records_into_a_temporary_store() -> None:
    assert "nbpeft-test-runs-" in run_store.location(True).parent.name


def test_a_run_is_recorded_with_its_settings_curves_and_end(store) -> None:
    _, result = trained(steps=5, eval_data=DATA[:2], eval_every=2, lr=3e-3)
    assert result.run_id is not None
    table = nbpeft.runs()
    assert table.ids == [result.run_id]
    row = table.rows[0]
    assert row["model"] == "LlamaForCausalLM" and row["method"] == "lora" and row["adapter"] == "default"
    assert row["method_settings"]["default"]["r"] == 4
    assert row["options"]["lr"] == 3e-3 and row["options"]["steps"] == 5 and "tokenizer" not in row["options"]
    assert row["data_size"] == 4 and len(row["data_fingerprint"]) == 16
    assert row["status"] == "finished" and row["steps"] == 5 and row["device"] == "cpu"
    assert row["precision"] == result.precision and row["trainable"] == result.trainable
    assert row["final_loss"] == pytest.approx(result.final_loss)
    assert row["final_eval_loss"] == pytest.approx(result.eval_losses[-1][1])
    assert row["tokens_per_s"] == pytest.approx(result.tokens_per_s) and row["peak_mem_bytes"] == result.peak_mem_bytes
    points = run_store.read_points(store, result.run_id)
    assert [p["loss"] for p in points] == pytest.approx(result.losses)
    assert [p["lr"] for p in points] == pytest.approx([r["lr"] for r in result.history])
    assert [(p["step"], p["eval_loss"]) for p in points if p["eval_loss"] is not None] == result.eval_losses


def test_the_same_data_gives_the_same_fingerprint_and_other_data_another(store) -> None:
    trained(steps=1)
    trained(steps=1)
    model = tiny_llama()
    nbpeft.attach(model, "lora")
    nbpeft.train(model, DATA[:2], tokenizer=char_tokenizer(), steps=1, live=False)
    prints = [row["data_fingerprint"] for row in nbpeft.runs().rows]
    assert prints[0] == prints[1] != prints[2]


def test_runs_off_keeps_no_record(store, monkeypatch, tmp_path) -> None:
    _, result = trained(steps=1, runs=False)
    assert result.run_id is None and not store.exists()
    monkeypatch.setenv("NBPEFT_RUNS", "off")
    _, result = trained(steps=1)
    assert result.run_id is None and not store.exists()
    other = tmp_path / "elsewhere" / "mine.sqlite"
    _, result = trained(steps=1, runs=str(other))
    assert nbpeft.runs(store=other).ids == [result.run_id]


def test_a_stopped_and_a_failed_run_say_how_they_ended(store) -> None:
    class StopAtTwo(Listener):
        def on_step(self, step):
            if step.step == 2:
                raise StopTraining

    model = tiny_llama()
    nbpeft.attach(model, "lora")
    stopped = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=5, batch_size=2, live=StopAtTwo())

    def broken_loss(model, batch):
        raise RuntimeError("the loss broke\nsecond line")

    with pytest.raises(RuntimeError):
        nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=3, live=False, loss_fn=broken_loss)
    rows = nbpeft.runs().rows
    assert rows[0]["run_id"] == stopped.run_id and rows[0]["status"] == "stopped" and rows[0]["steps"] == 2
    assert rows[1]["status"] == "failed" and rows[1]["message"] == "RuntimeError: the loss broke"
    assert nbpeft.runs(status="failed").ids == [rows[1]["run_id"]]


def test_a_bad_option_records_nothing(store) -> None:
    model = tiny_llama()
    nbpeft.attach(model, "lora")
    with pytest.raises(nbpeft.ConfigError):
        nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=2, epochs=1, live=False)
    assert len(nbpeft.runs()) == 0


def test_a_foreign_store_is_said_once_and_training_goes_on(store) -> None:
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    notes = []
    model = tiny_llama()
    nbpeft.attach(model, "lora")
    result = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=3,
                          live=lambda kind, payload: notes.append(payload.message) if kind == "note" else None)
    assert result.steps == 3 and result.run_id is None
    assert len(notes) == 1 and "the run record stopped" in notes[0] and "SQLite file of something else" in notes[0]
    with sqlite3.connect(store) as db:  # left as it was
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["notes"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trained(steps=1)[1].steps == 1  # live=False: a warning instead of a note
    assert any("SQLite file of something else" in str(w.message) for w in caught)
    with pytest.raises(nbpeft.ConfigError, match=r"^runs\(\): .* is an SQLite file of something else"):
        nbpeft.runs()


def test_filters_table_and_dataframe(store) -> None:
    _, first = trained(steps=2)
    model = tiny_llama()
    nbpeft.attach(model, "ia3")
    second = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=2, live=False)
    assert nbpeft.runs(method="ia3").ids == [second.run_id]
    assert nbpeft.runs(model="llama").ids == [first.run_id, second.run_id]
    assert nbpeft.runs(model="gpt2").ids == []
    assert len(nbpeft.runs(since="2000-01-01")) == 2 and len(nbpeft.runs(until="2000-01-01")) == 0
    today = nbpeft.runs().rows[0]["started"][:10]
    assert len(nbpeft.runs(until=today)) == 2  # a bare date includes its whole day
    with pytest.raises(nbpeft.ConfigError, match=r"since='last week' is not a date; give e.g. since='2025-06-01'"):
        nbpeft.runs(since="last week")
    table = nbpeft.runs()
    frame = table.to_pandas()
    assert list(frame["run_id"]) == [first.run_id, second.run_id]
    assert list(frame["method"]) == ["lora", "ia3"] and frame["final_loss"].iloc[0] == pytest.approx(first.final_loss)
    html = table._repr_html_()
    assert first.run_id in html and "<th>eval loss</th>" in html and "ia3" in html
    assert first.run_id in repr(table)


def test_plot_runs_overlays_curves_as_png(store) -> None:
    _, first = trained(steps=2)
    _, second = trained(steps=3)
    plot = nbpeft.plot_runs([first.run_id, second.run_id])
    assert plot._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(nbpeft.ConfigError, match=r"^plot_runs\(\): no run 'nope' in .*; nbpeft.runs\(\) lists"):
        nbpeft.plot_runs(["nope"])


def test_the_adapter_remembers_its_run(store) -> None:
    model, result = trained(steps=1)
    assert nbpeft.summary(model) is not None
    from nbpeft import core

    assert core.state(model).adapters["default"].run_id == result.run_id


def test_the_magic_shows_the_same_table_and_refuses_unknown_words(store) -> None:
    from IPython import get_ipython
    from IPython.core.error import UsageError
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython() or get_ipython()
    if "nbpeft" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "nbpeft")
    _, first = trained(steps=1)
    model = tiny_llama()
    nbpeft.attach(model, "ia3")
    second = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=1, live=False)
    shell.run_line_magic("peft_runs", "method=ia3 since=2000-01-01")
    assert shell.user_ns["_peft_runs"].ids == nbpeft.runs(method="ia3").ids == [second.run_id]
    shell.run_line_magic("peft_runs", f"{first.run_id} --plot --out picked")
    assert shell.user_ns["picked"].ids == [first.run_id]
    with pytest.raises(UsageError, match="nbpeft: no run 'nope' among the runs shown"):
        shell.run_line_magic("peft_runs", "nope")
    with pytest.raises(UsageError, match="unknown option 'metod'.*did you mean 'method'"):
        shell.run_line_magic("peft_runs", "metod=lora")


def test_the_panel_runs_tab_lists_filters_and_plots(store) -> None:
    _, first = trained(steps=2)
    model = tiny_llama()
    nbpeft.attach(model, "ia3")
    second = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=2, live=False)
    panel = nbpeft.panel(model, char_tokenizer(), namespace={})
    tab = panel.runs_tab
    panel.selected_index = 3  # opening the tab reads the store
    assert list(tab.picked.options) == [second.run_id, first.run_id]
    tab.method_filter.value = "lora"
    tab.refresh_button.click()
    assert list(tab.picked.options) == [first.run_id] and first.run_id in tab.table.value
    assert tab.filters() == {"method": "lora"}
    tab.plot_button.click()
    assert bytes(tab.plot.value).startswith(b"\x89PNG")
    tab.since.value = "yesterday"
    tab.refresh_button.click()
    assert "since yesterday" not in tab.message.value and "is not a date" in tab.message.value


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="processes=N forks its workers")
def test_a_run_on_two_processes_is_recorded_once_by_the_notebook_side(store) -> None:
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    result = nbpeft.train(model, DATA * 2, tokenizer=char_tokenizer(), steps=2, batch_size=2, processes=2,
                          precision="fp32", live=False)
    (row,) = nbpeft.runs().rows
    assert row["run_id"] == result.run_id and row["status"] == "finished" and row["device"] == "cpu ×2"
    assert [p["loss"] for p in run_store.read_points(store, result.run_id)] == pytest.approx(result.losses)

    def failing(model, batch):
        raise RuntimeError("boom in the loss")

    with pytest.raises(Exception, match="boom in the loss"):
        nbpeft.train(model, DATA * 2, tokenizer=char_tokenizer(), steps=2, batch_size=2, processes=2,
                     precision="fp32", live=False, loss_fn=failing)
    failed = nbpeft.runs(status="failed").rows
    assert len(failed) == 1 and "boom in the loss" in failed[0]["message"]
