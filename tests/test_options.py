"""train()'s options come from one declaration: signature, docstring and checks agree with it."""

import inspect

import pytest

import nbpeft
from nbpeft.training import options
from nbpeft.training.options import OPTIONS, Settings, TrainOption


def test_the_signature_and_docstring_list_every_declared_option() -> None:
    params = inspect.signature(nbpeft.train).parameters
    assert list(params) == ["model"] + [o.name for o in OPTIONS]
    for option in OPTIONS:
        assert f"    {option.name}=" in nbpeft.train.__doc__
        if not option.required:
            assert params[option.name].default == option.default or params[option.name].default is option.default


def test_settings_fill_defaults_and_refuse_bad_values_in_one_line() -> None:
    settings = Settings.of("train()", {"data": [], "lr": 1e-3})
    assert settings.lr == 1e-3 and settings.batch_size == 8 and settings.max_grad_norm == 1.0
    assert settings.changed() == {"lr": 1e-3}
    with pytest.raises(nbpeft.ConfigError, match=r"^train\(\): unknown option lrr=0.1; did you mean lr=\?$"):
        Settings.of("train()", {"data": [], "lrr": 0.1})
    with pytest.raises(nbpeft.ConfigError, match=r"^train\(\): schedule='steep' is not known; use one of constant, "):
        Settings.of("train()", {"data": [], "schedule": "steep"})
    with pytest.raises(nbpeft.ConfigError, match=r"max_grad_norm=0 must be a positive number, or None"):
        Settings.of("train()", {"data": [], "max_grad_norm": 0})
    assert Settings.of("train()", {"data": [], "max_grad_norm": None}).max_grad_norm is None
    with pytest.raises(nbpeft.ConfigError, match=r"data= is required"):
        Settings.of("train()", {})


def test_train_refuses_an_unknown_keyword_before_touching_the_model() -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    nbpeft.attach(model, "lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nbpeft.ConfigError, match="did you mean steps="):
        nbpeft.train(model, ["a b c"], setps=3)
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_a_declared_option_is_checked_and_goes_away_after() -> None:
    extra = TrainOption("my_knob", 3, "a throwaway knob", "run", "int", lambda v: isinstance(v, int), "an integer")
    with options.declared(extra):
        assert Settings.of("train()", {"data": [], "my_knob": 5}).my_knob == 5
        with pytest.raises(nbpeft.ConfigError, match="my_knob='x' must be an integer"):
            Settings.of("train()", {"data": [], "my_knob": "x"})
        assert "`my_knob`" in options.markdown_table()
    assert extra not in OPTIONS
    with pytest.raises(ValueError, match="group .nowhere."):
        TrainOption("bad", 1, "bad group", "nowhere", "int")
