"""The panel's Train tab: its fields map onto nbpeft.train, it draws what the other displays draw."""

from __future__ import annotations

import html
import inspect
import re
import time

import ipywidgets as widgets
import torch
from test_train import CharTokenizer

import nbpeft

from conftest import char_tokenizer, tiny_llama, tokens


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": tokens(), "labels": tokens()} for _ in range(n)]


def text(widget: widgets.HTML) -> str:
    """What a person reads in an HTML widget."""
    return html.unescape(re.sub(r"<[^>]+>", " ", widget.value))


def tab_for(namespace: dict, tokenizer=None):
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=2)
    tab = nbpeft.panel(model, tokenizer, namespace=namespace).train_tab
    tab.lr.value, tab.device.value = 1e-2, "cpu"
    return tab


def test_no_broken_image_before_the_first_run():
    tab = tab_for({"data": batches()})
    assert tab.plot.layout.display == "none" and tab.plot.value == b""
    tab.steps.value = 1
    tab.start_button.click()
    assert tab.wait(timeout=60).steps == 1
    assert tab.plot.layout.display is None and tab.plot.value[:4] == b"\x89PNG"
    assert tab.display.curve.labels() == ["train"]  # no eval data: no "eval" in the legend


def test_eval_data_draws_the_eval_line_and_fills_the_table():
    tab = tab_for({"data": batches(), "held_out": batches(1)})
    assert list(tab.eval_data.options) == ["data", "held_out"] and tab.eval_data.value == ""
    tab.eval_data.value, tab.steps.value = "held_out", 5
    tab.start_button.click()
    result = tab.wait(timeout=60)
    assert [step for step, _ in result.eval_losses] == [1, 2, 3, 4, 5]
    curve = tab.display.curve
    assert curve.labels() == ["train", "eval"] and curve.eval_points == result.eval_losses
    table = text(tab.table)
    assert "eval loss" in table and f"{result.eval_losses[-1][1]:.4f}" in table
    assert "eval " in text(tab.status)  # the progress line shows the last eval loss


def test_epochs_and_gradient_accumulation():
    tab = tab_for({"data": batches(4)})
    assert tab.epochs.disabled and not tab.steps.disabled
    tab.length_unit.value = "epochs"
    assert tab.steps.disabled and not tab.epochs.disabled
    tab.epochs.value, tab.grad_accum.value = 2, 2
    options = tab.options()
    assert options["epochs"] == 2 and "steps" not in options and options["grad_accum"] == 2
    tab.start_button.click()
    result = tab.wait(timeout=60)
    assert result.steps == 4  # 4 batches an epoch, 2 a step, 2 epochs
    assert result.history[-1]["tokens"] == 2 * tokens().numel()  # two batches in each step


def test_options_are_train_keywords():
    tab = tab_for({"data": batches(), "held_out": batches(1)})
    tab.eval_data.value = "held_out"
    accepted = inspect.signature(nbpeft.train).parameters
    assert set(tab.options()) <= set(accepted)
    assert tab.options()["eval_data"] is tab.namespace["held_out"]


def test_without_a_tokenizer_start_says_what_to_do():
    tab = tab_for({"data": ["some text", "more text"]})
    assert tab.tokenizer_name.value == "" and list(tab.tokenizer_name.options) == []
    tab.start_button.click()
    assert tab.wait(timeout=5) is None and not tab.running
    assert ("train: text data needs a tokenizer; type its variable under tokenizer "
            "(model, tokenizer = nbpeft.load_model(...) makes one)") in text(tab.message)
    tab.tokenizer_name.value = "tok"
    tab.start_button.click()
    assert "train: no variable 'tok' in the notebook; load one with model, tokenizer = nbpeft.load_model(...)" in text(tab.message)


def test_a_tokenizer_variable_is_offered_and_used():
    tab = tab_for({"data": ["some text", "more text"], "tokenizer": CharTokenizer(), "n": 3})
    assert list(tab.tokenizer_name.options) == ["tokenizer"] and tab.tokenizer_name.value == "tokenizer"
    tab.steps.value = 2
    tab.start_button.click()
    assert tab.wait(timeout=60).steps == 2
    given = CharTokenizer()
    panel_tab = tab_for({"data": ["text"]}, tokenizer=given)
    assert panel_tab.tokenizer_name.value == "" and panel_tab.options()["tokenizer"] is given


def test_a_stopped_run_says_so_once():
    tab = tab_for({"data": batches()})
    tab.steps.value = 100_000
    tab.start_button.click()
    deadline = time.monotonic() + 60
    while tab.progress.value < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    tab.stop_button.click()
    result = tab.wait(timeout=60)
    shown = text(tab.status) + " " + text(tab.message)
    assert shown.count("stopped after step") == 1
    assert f"stopped after step {result.steps} of 100000" in text(tab.status)
    assert "the result is in _peft_result" in text(tab.message)


QA = [{"prompt": "hi", "response": "yo"}, {"prompt": "how are you", "response": "well, thanks"}]


def test_show_example_renders_the_chosen_row_with_the_chosen_tokenizer():

    chars = char_tokenizer()
    tab = tab_for({"data": QA, "chars": chars})
    assert tab.tokenizer_name.value == "chars" and tab.example.value == ""
    tab.example_index.value, tab.max_length.value = 1, 34
    tab.example_button.click()
    expected = nbpeft.show_example(QA, chars, 1, max_length=34)
    assert tab.example.value == expected._repr_html_()
    assert expected.cut > 0 and expected.num_trained > 0  # the form's max_length is the one shown
    assert "row 1 (prompt-response), 34 tokens" in text(tab.example) and "under the loss" in text(tab.example)
    assert tab.result is None and not tab.running  # looking trains nothing


def test_show_example_and_start_use_the_models_own_tokenizer():

    from nbpeft.data.batches import remember_tokenizer

    chars = char_tokenizer()
    tab = tab_for({"data": QA})
    assert tab.tokenizer_name.value == ""
    remember_tokenizer(tab.model, chars)
    tab.example_button.click()
    assert tab.example.value == nbpeft.show_example(QA, chars, 0, max_length=tab.max_length.value)._repr_html_()
    assert tab.options()["tokenizer"] is chars


def test_show_example_errors_are_one_line_in_the_panels_words():

    tab = tab_for({"data": QA})
    before = {k: v.clone() for k, v in tab.model.state_dict().items()}
    tab.example_button.click()  # no tokenizer variable, and none belongs to the tiny model
    assert text(tab.example).strip() == ("show_example(): text data needs a tokenizer and none belongs to this model; "
                                         "type its variable under tokenizer")
    tab.namespace["chars"] = char_tokenizer()
    tab.tokenizer_name.value, tab.example_index.value = "chars", 5
    tab.example_button.click()
    assert text(tab.example).strip() == "show_example(): example 5 is past the end; the data has 2 rows (0 to 1)"
    tab.data.value = "missing"
    tab.example_button.click()
    assert text(tab.example).strip() == ("show_example: no variable 'missing' in the notebook, nor a file or glob of "
                                         "that name; make a list of examples first, or type a file path")
    tab.data.value = ""
    tab.example_button.click()
    assert text(tab.example).strip().startswith("show_example: which data?")
    assert "#b00020" in tab.example.value and "\n" not in text(tab.example).strip()
    assert all(torch.equal(v, before[k]) for k, v in tab.model.state_dict().items()) and tab.result is None


def test_batch_size_auto_processes_and_shard_are_train_keywords(monkeypatch):
    tab = tab_for({"data": batches()})
    assert tab.batch_size.value == "8" and tab.effective_batch.disabled and not tab.grad_accum.disabled
    assert "processes" not in tab.options() and "shard" not in tab.options()  # train()'s defaults: not passed
    tab.batch_size.value, tab.effective_batch.value = "auto", 16
    assert tab.grad_accum.disabled and not tab.effective_batch.disabled
    tab.processes.value, tab.shard.value = 2, True
    calls = []
    monkeypatch.setattr(nbpeft, "train", lambda **options: calls.append(options) or nbpeft.TrainResult())
    tab.start_button.click()
    tab.wait(timeout=60)
    (call,) = calls
    assert {k: call[k] for k in ("batch_size", "effective_batch", "processes", "shard")} == {
        "batch_size": "auto", "effective_batch": 16, "processes": 2, "shard": True}
    assert "grad_accum" not in call
    tab.batch_size.value = " 4 "
    assert tab.options()["batch_size"] == 4 and tab.options()["grad_accum"] == 1 and not tab.grad_accum.disabled


def test_a_batch_size_that_is_no_number_says_what_to_do():
    tab = tab_for({"data": batches()})
    tab.batch_size.value = "big"
    tab.start_button.click()
    assert tab.wait(timeout=5) is None
    assert "train: batch size 'big' must be a whole number above 0, or auto" in text(tab.message)


def test_auto_reaches_train_which_explains_ready_made_batches():
    tab = tab_for({"data": batches()})
    tab.batch_size.value, tab.steps.value = "auto", 1
    tab.start_button.click()
    tab.wait(timeout=60)
    assert "batch_size='auto' needs examples with a length" in text(tab.message)


def test_the_lora_plus_ratio_is_a_train_keyword_when_set():
    tab = tab_for({"data": batches()})
    assert "lr_ratio" not in tab.options()  # 1: plain LoRA, train()'s default
    tab.lr_ratio.value = 16
    assert tab.options()["lr_ratio"] == 16


# fields from the declaration -------------------------------------------------------------------

def test_every_declared_option_but_live_is_a_field_with_its_help_in_group_order():
    from nbpeft.training import options
    from nbpeft.widgets.train_fields import FIELD_WIDTH, TRAIN_LABEL

    tab = tab_for({"data": batches()})
    assert list(tab.fields) == [o.name for o in options.OPTIONS if o.name != "live"]
    for name, field in tab.fields.items():
        assert field.widget.description == name and field.widget.tooltip == field.option.help
        assert text(field.hint).strip() == field.option.help  # a visible hint, e.g. LoRA+'s lr_ratio
        assert field.widget.style.description_width == TRAIN_LABEL["style"]["description_width"]
        assert field.widget.layout.width == FIELD_WIDTH  # the hints line up too
        assert f"nbpeft-train-{name.replace('_', '-')}" in field.widget._dom_classes
    titles = [text(w).strip() for w in tab.children if isinstance(w, widgets.HTML) and w.value.startswith("<b>")]
    assert titles == [title for title, _ in options.grouped()]
    assert "LoRA+" in text(tab.fields["lr_ratio"].hint)
    kinds = {name: type(field.widget).__name__ for name, field in tab.fields.items()}
    assert (kinds["max_length"], kinds["lr"], kinds["packing"], kinds["schedule"], kinds["batch_size"],
            kinds["warmup"], kinds["data"], kinds["metrics"], kinds["columns"], kinds["compile"]) == (
        "BoundedIntText", "FloatText", "Dropdown", "Dropdown", "Combobox", "Text", "Combobox", "Combobox", "Text",
        "Dropdown")


def test_options_are_the_required_and_the_changed_ones():
    def my_metrics(model):
        return {"one": 1.0}

    tab = tab_for({"data": batches(), "my_metrics": my_metrics})
    tab.lr.value, tab.device.value = 2e-4, "auto"  # back to train()'s defaults
    assert set(tab.options()) == {"model", "data", "tokenizer", "steps", "batch_size", "grad_accum"}
    assert tab.compile.value == "auto" and tab.fields["compile"].read() is None
    tab.metrics.value, tab.columns.value, tab.warmup.value = "my_metrics", "prompt: question, response: answer", "0.1"
    tab.packing.value, tab.schedule.value, tab.output_dir.value, tab.resume.value = "true", "cosine", "out", "true"
    tab.compile.value, tab.eval_every.value = "false", "5"
    options = tab.options()
    assert options["metrics"] is my_metrics and options["columns"] == {"prompt": "question", "response": "answer"}
    assert (options["warmup"], options["packing"], options["schedule"], options["output_dir"], options["resume"],
            options["compile"], options["eval_every"]) == (0.1, True, "cosine", "out", True, False, 5)
    assert list(tab.metrics.options) == ["my_metrics"]  # the notebook's functions are offered
    tab.metrics.value = "nothing"
    tab.start_button.click()
    assert tab.wait(timeout=5) is None
    assert text(tab.message).strip() == ("train: no variable 'nothing' in the notebook; define the function in the "
                                         "notebook first")


def test_data_may_be_a_file_path_or_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa.jsonl").write_text("\n".join(['{"prompt": "hi", "response": "yo"}'] * 2) + "\n")
    tab = tab_for({"chars": char_tokenizer()})
    tab.data.value, tab.eval_data.value = "qa.jsonl", "*.jsonl"
    options = tab.options()
    assert options["data"] == "qa.jsonl" and options["eval_data"] == "*.jsonl"  # train() reads the files
    tab.example_button.click()
    assert "qa.jsonl line 1 (prompt-response)" in text(tab.example)  # read from the file
    tab.eval_data.value = "held_out"
    tab.start_button.click()
    assert text(tab.message).strip() == ("train: no variable 'held_out' in the notebook, nor a file or glob of that "
                                         "name; leave eval_data empty, or make a list of examples first, or type a "
                                         "file path")


def test_the_effective_batch_follows_batch_size_times_accumulation():
    tab = tab_for({"data": batches()})
    assert tab.effective_batch.value == 8 and tab.effective_batch.disabled
    tab.batch_size.value = "2"
    assert tab.effective_batch.value == 2
    tab.grad_accum.value = 3
    assert tab.effective_batch.value == 6
    tab.batch_size.value = "auto"
    assert not tab.effective_batch.disabled and tab.grad_accum.disabled
    tab.effective_batch.value = 32
    assert tab.options()["effective_batch"] == 32 and "grad_accum" not in tab.options()
