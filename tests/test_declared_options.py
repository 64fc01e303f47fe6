"""One declaration of every train() option feeds every front-end: a new option shows up in
%%peft_train (help, Tab completion, key=value), in the panel's Train tab, and in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from IPython import get_ipython
from IPython.core.completer import provisionalcompleter
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import nbpeft
from nbpeft.training import options
from nbpeft.training.options import TrainOption

from conftest import tiny_llama, tokens

README = Path(__file__).resolve().parent.parent / "README.md"
THROWAWAY = TrainOption("token_smoothing", 0.0, "spread this share of the target over the other tokens",
                        "optimizer", "float", lambda v: isinstance(v, float) and 0 <= v < 1, "between 0 and 1")


def test_the_readme_lists_the_declared_options():
    text = README.read_text()
    found = re.search(r"<!-- train options:[^>]*-->\n(.*?)\n<!-- end of train options -->", text, re.DOTALL)
    assert found, "the README lost its generated block of train options"
    assert found[1] == options.markdown_table(), "README.md: paste options.markdown_table() into the train options block"


@pytest.fixture
def shell(monkeypatch):
    ip = start_ipython() or get_ipython()
    if "nbpeft" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "nbpeft")
    calls = []

    def train(model, data, **keywords):  # a recording double: whatever train() would be given
        calls.append({"model": model, "data": data, **keywords})
        return "result"

    monkeypatch.setattr(nbpeft, "train", train)
    ip.user_ns.update(model=tiny_llama(), data=[{"input_ids": tokens(), "labels": tokens()}])
    yield ip, calls
    for name in ("model", "data", "_peft_result"):
        ip.user_ns.pop(name, None)


def complete(ip, text: str) -> list[str]:
    with provisionalcompleter():
        return [c.text for c in ip.Completer.completions(text, len(text))]


def test_a_new_option_reaches_the_magic(shell):
    ip, calls = shell
    with options.declared(THROWAWAY):
        with capture_output() as out:
            ip.run_cell("%%peft_train?")
        assert "token_smoothing=0.0: spread this share of the target over the other tokens" in out.stdout
        assert out.stdout.index("Optimizer:") < out.stdout.index("token_smoothing=") < out.stdout.index("Batch:")
        assert complete(ip, "%peft_train token_") == ["token_smoothing="]
        assert complete(ip, "%%peft_train\ntoken_") == ["token_smoothing="]
        with capture_output() as out:
            result = ip.run_cell("%%peft_train steps=2\ntoken_smoothing: 0.1\nlive: false\n")
        assert result.success, out.stderr
        (call,) = calls
        assert call["token_smoothing"] == 0.1 and call["steps"] == 2 and call["live"] is False
        with capture_output() as out:
            ip.run_cell("%peft_train token_smothing=0.1")
        assert "unknown option 'token_smothing' (did you mean 'token_smoothing'?)" in out.stderr
    with capture_output() as out:  # gone with its declaration
        ip.run_cell("%%peft_train?")
    assert "token_smoothing" not in out.stdout and complete(ip, "%peft_train token_") == []
    with capture_output() as out:
        ip.run_cell("%peft_train token_smoothing=0.1")
    assert "unknown option 'token_smoothing'" in out.stderr and len(calls) == 1


def test_a_new_option_is_a_field_of_a_new_train_tab():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=2)
    namespace = {"data": [{"input_ids": tokens(), "labels": tokens()}]}
    with options.declared(THROWAWAY):
        tab = nbpeft.panel(model, namespace=namespace).train_tab
        field = tab.fields["token_smoothing"]
        assert type(field.widget).__name__ == "FloatText" and field.widget.tooltip == THROWAWAY.help
        titles = [getattr(w, "value", "") for w in tab.children]
        where = list(tab.children).index(field.row)  # under its group's title, after the group's other fields
        assert titles.index("<b>Optimizer</b>") < where < titles.index("<b>Batch</b>")
        assert tab.children[where - 1] is tab.fields["max_grad_norm"].row
        assert "token_smoothing" not in tab.options()  # at its default: not passed
        tab.token_smoothing.value = 0.1
        assert tab.options()["token_smoothing"] == 0.1
    assert "token_smoothing" not in nbpeft.panel(model, namespace=namespace).train_tab.fields


def test_export_job_help_lists_what_travels(shell):
    ip, _ = shell
    with capture_output() as out:
        ip.run_cell("%peft_export_job?")
    assert "steps=None: optimizer steps" in out.stdout and "batch_size=8" in out.stdout
    assert "loss_fn=" not in out.stdout and "metrics=" not in out.stdout
