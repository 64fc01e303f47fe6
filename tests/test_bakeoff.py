"""nbpeft.bakeoff: each method as if trained alone, the model given back bit for bit, one table."""

from __future__ import annotations

import pytest
import torch

import nbpeft
from nbpeft.training.bakeoff import usual_lr

from conftest import assert_same, char_tokenizer, snapshot, tiny_llama

DATA = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"]
EVAL = ["the dog sat on the roof", "cats sing in the park"]
METHODS = {"lora": {"r": 4, "lr": 1e-2}, "ia3": {}, "prompt": {"num_virtual_tokens": 4}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("NBPEFT_RUNS", str(tmp_path / "runs.sqlite"))


def test_each_row_equals_the_run_made_alone_and_the_model_comes_back_exact(store) -> None:
    model = tiny_llama()
    before = snapshot(model)
    options = {"tokenizer": char_tokenizer(), "eval_data": EVAL, "steps": 4, "batch_size": 2, "live": False}
    table = nbpeft.bakeoff(model, DATA, methods=METHODS, seed=3, **options)
    assert_same(before, snapshot(model))
    assert not nbpeft.summary(model).adapters

    frame = table.to_pandas()
    assert list(frame["name"]) == ["lora", "ia3", "prompt"]
    assert list(frame["lr"]) == [1e-2, usual_lr("ia3"), usual_lr("prompt")] == [1e-2, 3e-3, 3e-2]
    assert frame["run_id"].tolist() == nbpeft.runs().ids  # each method's run is recorded
    for name, settings in METHODS.items():
        settings = dict(settings)
        lr = settings.pop("lr", usual_lr(name))
        alone = tiny_llama()
        torch.manual_seed(3)
        adapter = nbpeft.attach(alone, name, **settings)
        result = nbpeft.train(alone, DATA, seed=3, lr=lr, **options)
        row = frame[frame["name"] == name].iloc[0]
        assert row["final_loss"] == pytest.approx(result.final_loss, abs=1e-6)
        assert row["final_eval_loss"] == pytest.approx(result.eval_losses[-1][1], abs=1e-6)
        assert row["trainable"] == adapter.num_params
        points = table.points(table.rows[list(frame["name"]).index(name)])
        assert [p["loss"] for p in points] == pytest.approx(result.losses, abs=1e-6)
    assert frame["adapter_bytes"].gt(0).all() and frame["time_per_step_s"].gt(0).all()
    lora, ia3 = table.rows[0], table.rows[1]
    assert lora["trainable_share"] == pytest.approx(100 * lora["trainable"] / sum(p.numel() for p in model.parameters()))
    assert ia3["adapter_bytes"] < lora["adapter_bytes"]  # IA3 keeps one vector where LoRA keeps two matrices
    assert "<th>adapter file</th>" in table._repr_html_() and "ia3" in repr(table)
    assert table.plot()._repr_png_().startswith(b"\x89PNG")


def test_one_method_twice_under_other_names(store) -> None:
    model = tiny_llama()
    table = nbpeft.bakeoff(model, DATA, methods={"r2": {"method": "lora", "r": 2}, "r8": {"method": "lora", "r": 8}},
                           tokenizer=char_tokenizer(), steps=1, live=False)
    small, large = table.rows
    assert small["method"] == large["method"] == "lora" and large["trainable"] == 4 * small["trainable"]


def test_bad_input_is_one_line_and_trains_nothing(store) -> None:
    model = tiny_llama()
    before = snapshot(model)
    tok = char_tokenizer()
    with pytest.raises(nbpeft.ConfigError, match=r"^bakeoff\(\): methods\['lora'\]: .*'rr'"):
        nbpeft.bakeoff(model, DATA, methods={"ia3": {}, "lora": {"rr": 4}}, tokenizer=tok, steps=1, live=False)
    with pytest.raises(nbpeft.ConfigError, match=r"unknown method 'lorra'; did you mean 'lora'"):
        nbpeft.bakeoff(model, DATA, methods={"lorra": {}}, tokenizer=tok, steps=1, live=False)
    with pytest.raises(nbpeft.ConfigError, match=r"^bakeoff\(\): unknown option setps=1; did you mean steps=\?"):
        nbpeft.bakeoff(model, DATA, methods={"ia3": {}}, tokenizer=tok, setps=1)
    with pytest.raises(nbpeft.ConfigError, match=r"^bakeoff\(\): lr=5 must be between 0 and 1"):
        nbpeft.bakeoff(model, DATA, methods={"ia3": {}, "lora": {"lr": 5}}, tokenizer=tok, steps=1)
    with pytest.raises(nbpeft.ConfigError, match=r"^bakeoff\(\): methods= must be a dict"):
        nbpeft.bakeoff(model, DATA, methods=["lora"], tokenizer=tok, steps=1)
    with pytest.raises(nbpeft.ConfigError, match=r"^bakeoff\(\): full= is not for a bake-off"):
        nbpeft.bakeoff(model, DATA, methods={"lora": {}}, tokenizer=tok, steps=1, full=True)
    assert_same(before, snapshot(model))
    assert len(nbpeft.runs()) == 0
    nbpeft.attach(model, "lora")
    with pytest.raises(nbpeft.ConfigError, match=r"adapters attached \(default\).*nbpeft.detach\(model\) first"):
        nbpeft.bakeoff(model, DATA, methods={"ia3": {}}, tokenizer=tok, steps=1)


def test_a_method_that_fails_leaves_the_model_bare(store) -> None:
    model = tiny_llama()
    before = snapshot(model)

    def broken(model, batch):
        raise RuntimeError("broken loss")

    with pytest.raises(RuntimeError, match="broken loss"):
        nbpeft.bakeoff(model, DATA, methods={"lora": {}}, tokenizer=char_tokenizer(), steps=1, live=False, loss_fn=broken)
    assert_same(before, snapshot(model))
    assert nbpeft.runs().rows[-1]["status"] == "failed"


def test_the_magic_makes_the_same_call() -> None:
    from unittest import mock

    from IPython import get_ipython
    from IPython.core.error import UsageError
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython() or get_ipython()
    if "nbpeft" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "nbpeft")
    model, tok = tiny_llama(), char_tokenizer()
    shell.user_ns.update(model=model, data=DATA, val=EVAL, tokenizer=tok)
    with mock.patch.object(nbpeft, "bakeoff", return_value=nbpeft.RunTable([])) as called:
        shell.run_cell_magic("peft_bakeoff", "lora={r: 8, lr: 0.01} methods=bitfit --eval-data val --out bo",
                             "ia3={}\nsteps=5\nseed=2")
    called.assert_called_once_with(model, DATA, methods={"bitfit": {}, "lora": {"r": 8, "lr": 0.01}, "ia3": {}},
                                   tokenizer=tok, steps=5, seed=2, eval_data=EVAL)
    assert shell.user_ns["bo"] is called.return_value
    with pytest.raises(UsageError, match="which methods"):
        shell.run_line_magic("peft_bakeoff", "steps=5")
    with pytest.raises(UsageError, match=r"lora= holds the method's options as a dict, e.g. lora=\{r: 8\}"):
        shell.run_line_magic("peft_bakeoff", "lora=8")
    with pytest.raises(UsageError, match="unknown option 'setps'"):
        shell.run_line_magic("peft_bakeoff", "ia3={} setps=5")
    for name in ("model", "data", "val", "tokenizer", "bo"):
        shell.user_ns.pop(name)


def test_methods_take_part_by_name_at_their_usual_rate(store) -> None:
    model = tiny_llama()
    options = {"tokenizer": char_tokenizer(), "steps": 2, "batch_size": 2, "live": False}
    frame = nbpeft.bakeoff(model, DATA, methods={"loha": {}, "lokr": {"r": 2}, "ln_tuning": {}}, **options).to_pandas()
    assert list(frame["name"]) == ["loha", "lokr", "ln_tuning"] and frame["final_loss"].notna().all()
    assert list(frame["lr"]) == [2e-4, 2e-4, 1e-3]  # train()'s default, and LN tuning's own
