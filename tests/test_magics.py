"""The IPython magics map onto the Python API: same models, one-line errors, help, unload."""

from __future__ import annotations

import inspect
import json
import sys
from unittest.mock import create_autospec

import pytest
import torch
import transformers
from IPython import get_ipython
from IPython.core.completer import provisionalcompleter
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import nbpeft
from nbpeft.core import state
from nbpeft.frontend import parse_options
from nbpeft.magics import PeftMagics
from nbpeft.magics.line import USAGE, usage
from nbpeft.methods.base import ConfigError, get_method, method_options
from nbpeft.models import cache_dir

from conftest import char_tokenizer

MAGICS = ("peft_methods", "peft_attach", "peft_summary", "peft_use", "peft_detach", "peft_merge", "peft_unmerge",
          "peft_save", "peft_load", "peft_train", "peft_compare", "peft_panel", "peft_generate", "peft_compare_answers",
          "peft_export", "peft_to_lora", "peft_show_example", "peft_release", "peft_export_job", "peft_combine")


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return transformers.LlamaForCausalLM(config).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


def snapshot(model: torch.nn.Module) -> tuple:
    """Everything a failed magic must leave alone: weights, module types, requires_grad, adapters."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return weights, types, grads, list(state(model).adapters)


def same_snapshot(a: tuple, b: tuple) -> bool:
    (wa, *rest_a), (wb, *rest_b) = a, b
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and rest_a == rest_b


def run(shell, code: str):
    """Run a cell as a notebook would; return its result and what it printed and displayed."""
    with capture_output() as captured:
        result = shell.run_cell(code)
    return result, captured


def assert_usage_error(result, out, message: str) -> None:
    """The cell failed with IPython's UsageError: this one line, no traceback."""
    assert isinstance(result.error_in_exec, UsageError)
    assert out.stderr.strip().startswith(f"UsageError: {message}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr + out.stdout


@pytest.fixture(scope="module")
def ip():
    return start_ipython() or get_ipython()  # the shell is a process-wide singleton


@pytest.fixture
def shell(ip):
    if "nbpeft" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "nbpeft")
    ip.user_ns["model"] = tiny_model()
    yield ip
    for name in ("model", "other", "fresh", "data", "val", "tokenizer", "_peft_result", "res", "_peft_compare",
                 "_peft_panel", "table", "_peft_answers", "chars", "qa"):
        ip.user_ns.pop(name, None)


def recording(fn, result):
    """``fn`` replaced by a double built from its real signature; each call's arguments (defaults
    filled in) go to the returned list, and ``result(n)`` is what the n-th call returns."""
    calls, signature = [], inspect.signature(fn)

    def record(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return result(calls[-1], len(calls))

    return create_autospec(fn, side_effect=record), calls


@pytest.fixture
def fake_train(monkeypatch):
    """nbpeft.train as a recording double with train()'s own signature."""
    double, calls = recording(nbpeft.train, lambda call, n: f"result {n}")
    monkeypatch.setattr(nbpeft, "train", double)
    return calls


# parse_options -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("r=8 alpha=16.5 dropout=0.1 lr=2e-4 shift=-1", {"r": 8, "alpha": 16.5, "dropout": 0.1, "lr": 2e-4, "shift": -1}),
    ("targets=q_proj,v_proj", {"targets": ["q_proj", "v_proj"]}),
    ("targets=q_proj, v_proj", {"targets": ["q_proj", "v_proj"]}),
    ("targets=[q_proj, v_proj]", {"targets": ["q_proj", "v_proj"]}),
    ("targets=['q_proj', 'v_proj']", {"targets": ["q_proj", "v_proj"]}),
    ("sizes=1,2", {"sizes": [1, 2]}),
    ("pair=(1, 2) table={'a': 1}", {"pair": (1, 2), "table": {"a": 1}}),
    ("a=true b=FALSE c=None d=True", {"a": True, "b": False, "c": None, "d": True}),
    ("init=gaussian targets=all-linear", {"init": "gaussian", "targets": "all-linear"}),
    ("name='my adapter' pattern='.*\\.q_proj' path=\"a b/c\"", {"name": "my adapter", "pattern": ".*\\.q_proj", "path": "a b/c"}),
    ("pattern=.*(q|v)_proj", {"pattern": ".*(q|v)_proj"}),
    ("r = 8", {"r": 8}),
    ("eval-every=10", {"eval_every": 10}),
    ("r: 8\n# a comment\n\nalpha: 32  # why 32\ntargets: q_proj, v_proj\nrslora=true", {
        "r": 8, "alpha": 32, "targets": ["q_proj", "v_proj"], "rslora": True}),
    ("   \n# only comments\n", {}),
])
def test_parse_options(text, expected):
    assert parse_options(text) == expected


@pytest.mark.parametrize("text, message", [
    ("r", "expected key=value, got 'r'"),
    ("r=8 r=4", "option 'r' is given twice"),
    ("r=", "option 'r' has no value"),
    ("targets=[q_proj", "unbalanced"),
    ("name='open", "unbalanced"),
])
def test_parse_options_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_options(text)


# attach ----------------------------------------------------------------------------------

def assert_same_adapter(magic_model, api_model, name="default"):
    assert magic_model.state_dict().keys() == api_model.state_dict().keys()
    assert [type(m) for m in magic_model.modules()] == [type(m) for m in api_model.modules()]
    assert state(magic_model).adapters[name].config == state(api_model).adapters[name].config
    for (key, a), b in zip(magic_model.state_dict().items(), api_model.state_dict().values()):
        assert torch.equal(a, b), key


def test_line_attach_matches_api(shell):
    torch.manual_seed(1)
    result, out = run(shell, "%peft_attach lora r=4 alpha=8 targets=q_proj,v_proj rslora=true")
    assert result.success
    expected = tiny_model()
    torch.manual_seed(1)
    nbpeft.attach(expected, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"], rslora=True)
    assert_same_adapter(shell.user_ns["model"], expected)
    assert "Adapter 'default': lora on 4 modules" in out.outputs[0].data["text/plain"]


def test_cell_attach_matches_line_attach(shell):
    torch.manual_seed(2)
    result, _ = run(shell, "%%peft_attach lora r=4\nalpha: 8\n# the attention projections\n\ntargets = q_proj, v_proj\nrslora: true\n")
    assert result.success
    shell.user_ns["other"] = tiny_model()
    torch.manual_seed(2)
    run(shell, "%peft_attach lora --model other r=4 alpha=8 targets=q_proj,v_proj rslora=true")
    assert_same_adapter(shell.user_ns["model"], shell.user_ns["other"])


def test_a_single_bare_target_is_a_module_name_not_a_regex(shell):
    run(shell, "%peft_attach lora targets=q_proj modules_to_save=lm_head")
    config = state(shell.user_ns["model"]).adapters["default"].config
    assert config.targets == ["q_proj"] and config.modules_to_save == ["lm_head"]
    run(shell, "%peft_attach lora targets=all-linear --name wide")
    assert state(shell.user_ns["model"]).adapters["wide"].config.targets == "all-linear"


def test_model_and_name_flags(shell):
    shell.user_ns["other"] = tiny_model()
    result, _ = run(shell, "%peft_attach lora --model other --name sql r=2")
    assert result.success
    assert list(state(shell.user_ns["other"]).adapters) == ["sql"]
    assert not state(shell.user_ns["model"]).adapters
    run(shell, "%peft_attach lora --name=chat --model=other")
    assert list(state(shell.user_ns["other"]).adapters) == ["sql", "chat"]


def test_magics_raise_usage_error_when_called_directly(shell):
    with pytest.raises(UsageError, match="^nbpeft: lora: r=0 must be a positive integer"):
        shell.run_line_magic("peft_attach", "lora r=0")


# summary, detach, merge, unmerge ----------------------------------------------------------

def test_summary(shell, monkeypatch):
    monkeypatch.setattr(shell.display_formatter, "active_types", ["text/plain", "text/html"])  # as in Jupyter
    run(shell, "%peft_attach lora r=4")
    _, out = run(shell, "%peft_summary")
    data = out.outputs[0].data
    assert "<table>" in data["text/html"] and "default" in data["text/html"]
    assert data["text/plain"] == repr(nbpeft.summary(shell.user_ns["model"]))
    shell.user_ns["other"] = tiny_model()
    _, out = run(shell, "%peft_summary other")
    assert "no adapters attached" in out.outputs[0].data["text/plain"]
    _, out = run(shell, "%peft_summary --model other")
    assert "no adapters attached" in out.outputs[0].data["text/plain"]


def test_merge_unmerge_detach(shell):
    model = shell.user_ns["model"]
    before = snapshot(model)
    run(shell, "%peft_attach lora r=4 init=random")
    run(shell, "%peft_attach lora r=2 init=random --name other")
    adapted = logits(model)
    q_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()

    _, out = run(shell, "%peft_merge")
    assert out.stdout.strip() == "merged 'other'"  # the active adapter
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, q_weight)
    _, out = run(shell, "%peft_unmerge")
    assert out.stdout.strip() == "unmerged 'other'"
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.base_layer.weight, q_weight, atol=1e-6)
    assert torch.allclose(logits(model), adapted, atol=1e-5)

    _, out = run(shell, "%peft_merge default")
    assert out.stdout.strip() == "merged 'default'"
    assert state(model).adapters["default"].merged
    run(shell, "%peft_unmerge default")
    _, out = run(shell, "%peft_detach other")
    assert out.stdout.strip() == "detached 'other'"
    assert list(state(model).adapters) == ["default"]
    _, out = run(shell, "%peft_detach")
    assert out.stdout.strip() == "detached 'default'"
    after = snapshot(model)
    assert after[0].keys() == before[0].keys() and after[1:] == before[1:]


# save and load ----------------------------------------------------------------------------

def test_save_then_load_into_a_fresh_model(shell, tmp_path):
    run(shell, "%peft_attach lora r=4 init=random")
    run(shell, "%peft_attach lora r=2 init=random targets=all-linear --name sql")
    _, out = run(shell, f"%peft_save '{tmp_path / 'my adapter'}' --name default")
    assert out.stdout.startswith(f"saved {tmp_path / 'my adapter'}/") and " KB)" in out.stdout
    _, out = run(shell, f"%peft_save {tmp_path / 'all'}")
    assert len(out.stdout.strip().splitlines()) == 2 and str(tmp_path / "all" / "sql") in out.stdout

    shell.user_ns["fresh"] = tiny_model()
    result, out = run(shell, f"%peft_load '{tmp_path / 'my adapter'}' --model fresh")
    assert result.success
    assert "Adapter 'default': lora" in out.outputs[0].data["text/plain"]
    nbpeft.set_adapter(shell.user_ns["model"], "default")
    assert torch.allclose(logits(shell.user_ns["fresh"]), logits(shell.user_ns["model"]), atol=1e-6)

    shell.user_ns["other"] = tiny_model()
    run(shell, f"%peft_load {tmp_path / 'all'} --name sql --model other")
    assert list(state(shell.user_ns["other"]).adapters) == ["sql"]
    nbpeft.set_adapter(shell.user_ns["model"], "sql")
    assert torch.allclose(logits(shell.user_ns["other"]), logits(shell.user_ns["model"]), atol=1e-6)


# train ---------------------------------------------------------------------------------

def test_train_maps_options_and_stores_the_result(shell, fake_train):
    shell.user_ns.update(data=["a", "b"], tokenizer="tok")
    result, out = run(shell, "%%peft_train steps=5 lr=1e-3\nbatch_size: 4\n# quiet in tests\nlive: false\n")
    assert result.success, out.stderr
    (call,) = fake_train
    assert call["model"] is shell.user_ns["model"] and call["data"] is shell.user_ns["data"]
    assert call["tokenizer"] == "tok"
    assert (call["steps"], call["lr"], call["batch_size"], call["live"]) == (5, 1e-3, 4, False)
    assert call["eval_data"] is None and call["epochs"] is None
    assert shell.user_ns["_peft_result"] == "result 1"
    assert out.stdout.strip() == "result in _peft_result"


def test_train_flags(shell, fake_train):
    shell.user_ns.update(other=tiny_model(), data=["unused"], res=None, val=["v"])
    shell.user_ns["mine"] = ["x"]
    try:
        run(shell, "%peft_train --model other --data mine --eval-data val --out res epochs=2 eval_every=3")
    finally:
        shell.user_ns.pop("mine")
    (call,) = fake_train
    assert call["model"] is shell.user_ns["other"] and call["data"] == ["x"] and call["eval_data"] == ["v"]
    assert call["tokenizer"] is None  # no 'tokenizer' in the notebook
    assert (call["epochs"], call["eval_every"]) == (2, 3)
    assert shell.user_ns["res"] == "result 1" and "_peft_result" not in shell.user_ns


def test_train_without_a_tokenizer_names_the_flag(shell):
    """No tokenizer given and none belongs to the model: the fix is said as the magic's flag."""
    shell.user_ns["data"] = ["some text", "more text"]
    run(shell, "%peft_attach lora r=2 targets=q_proj")
    result, out = run(shell, "%%peft_train --data data\nsteps: 1\nlive: false\n")
    assert_usage_error(result, out, "nbpeft: train(): text data needs a tokenizer and none belongs to this model; "
                                    "pass --tokenizer tokenizer")
    assert "tokenizer=" not in out.stderr


@pytest.mark.parametrize("code, message", [
    ("%peft_train lrr=1e-3", "nbpeft: train: unknown option 'lrr' (did you mean 'lr'?)"),
    ("%%peft_train\nsteps=5\nepoch: 2\n", "nbpeft: train: unknown option 'epoch' (did you mean 'epochs'?)"),
    ("%peft_train --data nope", "nbpeft: no variable 'nope' in the notebook"),
    ("%peft_train --tokenizer nope", "nbpeft: no variable 'nope' in the notebook"),
    ("%peft_train --out 1x", "nbpeft: --out '1x' must be a variable name"),
])
def test_train_errors(shell, fake_train, code, message):
    shell.user_ns["data"] = ["a"]
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert not fake_train


def test_train_help_lists_its_options(shell, fake_train):
    run(shell, "%unload_ext nbpeft")
    run(shell, "%load_ext nbpeft")
    doc = shell.find_cell_magic("peft_train").__doc__
    assert "--eval-data VAR" in doc and "steps=None" in doc and "gradient_checkpointing=False" in doc


def test_train_data_is_a_variable_or_a_file_path_or_glob(shell, fake_train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa.csv").write_text("prompt,response\nhi,yo\n")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "a.jsonl").write_text('{"text": "x"}\n')
    shell.user_ns["val"] = ["v"]
    result, out = run(shell, "%%peft_train --data qa.csv\neval_data: val\nlive: false\n")
    assert result.success, out.stderr
    result, out = run(shell, "%%peft_train\ndata: part/*.jsonl\neval_data: qa.csv\nlive: false\n")
    assert result.success, out.stderr
    (first, second) = fake_train
    assert first["data"] == "qa.csv" and first["eval_data"] is shell.user_ns["val"]  # train() reads the file
    assert second["data"] == "part/*.jsonl" and second["eval_data"] == "qa.csv"
    result, out = run(shell, "%peft_train --data qa.jsonl")
    assert_usage_error(result, out, "nbpeft: no variable 'qa.jsonl' in the notebook, nor a file or glob of that "
                                    "name; make a list of examples, or pass --data NAME or --data PATH")
    result, out = run(shell, "%peft_train --data 'part/*.csv'")
    assert_usage_error(result, out, "nbpeft: no variable 'part/*.csv' in the notebook, nor a file or glob")
    assert len(fake_train) == 2


def test_train_functions_columns_and_every_kind_reach_train(shell, fake_train):
    def my_metrics(model):
        return {"accuracy": 1.0}

    def my_loss(model, batch):
        return 0

    shell.user_ns.update(data=["a"], my_metrics=my_metrics, my_loss=my_loss)
    try:
        result, out = run(shell, "%%peft_train metrics=my_metrics loss_fn=my_loss\n"
                                 "columns: prompt: question, response: answer\nwarmup: 0.1\nschedule: cosine\n"
                                 "output_dir: 'out/run 1'\nresume: true\ndevice: cuda:1\ncompile: none\nlive: my_metrics\n")
        assert result.success, out.stderr
        (call,) = fake_train
        assert call["metrics"] is my_metrics and call["loss_fn"] is my_loss and call["live"] is my_metrics
        assert call["columns"] == {"prompt": "question", "response": "answer"}
        assert (call["warmup"], call["schedule"], call["output_dir"], call["resume"], call["device"], call["compile"]) == (
            0.1, "cosine", "out/run 1", True, "cuda:1", None)
        result, out = run(shell, "%peft_train columns={prompt: question} resume=ckpt/step-3 output_dir=123")
        assert result.success, out.stderr
        assert (fake_train[1]["columns"], fake_train[1]["resume"], fake_train[1]["output_dir"]) == (
            {"prompt": "question"}, "ckpt/step-3", "123")  # a path stays text, even one of digits
    finally:
        shell.user_ns.pop("my_metrics"), shell.user_ns.pop("my_loss")


@pytest.mark.parametrize("code, message", [
    ("%peft_train metrics=nothing", "nbpeft: no variable 'nothing' in the notebook; metrics= takes a notebook "
                                    "variable holding a function"),
    ("%peft_train columns=prompt", "nbpeft: columns='prompt' must be name: name pairs, e.g. columns=prompt: question"),
    ("%peft_train --data data data=data", "nbpeft: --data and data= say the same; give one of them"),
])
def test_train_value_errors_are_one_line(shell, fake_train, code, message):
    shell.user_ns["data"] = ["a"]
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert not fake_train


def test_train_completes_values_by_kind(shell):
    def my_metrics(model):
        return {}

    shell.user_ns.update(data=["a"], my_metrics=my_metrics)
    try:
        assert complete(shell, "%peft_train schedule=") == ["schedule=constant", "schedule=linear", "schedule=cosine"]
        assert complete(shell, "%peft_train packing=") == ["packing=true", "packing=false"]
        assert complete(shell, "%peft_train metrics=") == ["metrics=my_metrics"]
        assert complete(shell, "%peft_train eval_data=") == ["eval_data=data"]
        assert complete(shell, "%%peft_train\nbatch_size=a") == ["batch_size=auto"]
        assert complete(shell, "%peft_train --eval-data ") == ["data"]
        assert "gradient_checkpointing=" in complete(shell, "%peft_train gr")
    finally:
        shell.user_ns.pop("my_metrics")


@pytest.fixture
def any_train(monkeypatch):
    """nbpeft.train as a recording double with train()'s signature plus processes= and shard= where it lacks them."""
    calls, signature = [], inspect.signature(nbpeft.train)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in (("processes", 1), ("shard", False)) if name not in signature.parameters]

    def train(model, data, **options):
        calls.append({"model": model, "data": data, **options})
        return f"result {len(calls)}"

    train.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    monkeypatch.setattr(nbpeft, "train", train)
    return calls


@pytest.mark.parametrize("line, expected", [
    ("--processes 2 --shard --batch-size auto", {"processes": 2, "shard": True, "batch_size": "auto"}),
    ("--batch-size 4 --processes=4", {"processes": 4, "batch_size": 4}),
    ("--batch-size auto effective_batch=32", {"batch_size": "auto", "effective_batch": 32}),
    ("", {}),
])
def test_train_scale_out_flags_are_train_keywords(shell, any_train, line, expected):
    shell.user_ns["data"] = ["a"]
    result, out = run(shell, f"%%peft_train {line}\nlive: false\n")
    assert result.success, out.stderr
    (call,) = any_train
    assert {k: call[k] for k in ("processes", "shard", "batch_size", "effective_batch") if k in call} == expected


def test_train_flag_and_option_saying_the_same_is_refused(shell, any_train):
    shell.user_ns["data"] = ["a"]
    result, out = run(shell, "%%peft_train --batch-size auto\nbatch_size: 4\n")
    assert_usage_error(result, out, "nbpeft: --batch-size and batch_size= say the same; give one of them")
    assert not any_train


def test_train_scale_out_flags_complete(shell):
    assert complete(shell, "%peft_train --pro") == ["--processes"]
    assert complete(shell, "%peft_train --sh") == ["--shard"]
    assert complete(shell, "%peft_train --batch-size ") == ["auto"]
    assert complete(shell, "%peft_train --shard --ba") == ["--batch-size"]  # --shard takes no value


def test_release_reports_and_drops_gradients(shell):
    model = shell.user_ns["model"]
    nbpeft.attach(model, "lora", r=2, targets=["q_proj"])
    trained = next(p for p in model.parameters() if p.requires_grad)
    trained.grad = torch.ones_like(trained)
    result, out = run(shell, "%peft_release")
    assert result.success, out.stderr
    assert out.stdout.startswith("released: ") and len(out.stdout.strip().splitlines()) == 1
    assert trained.grad is None and list(state(model).adapters) == ["default"]
    result, out = run(shell, "%peft_release --model nope")
    assert_usage_error(result, out, "nbpeft: no variable 'nope' in the notebook")


# errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("code, message", [
    ("%peft_attach lorra r=8", "nbpeft: unknown method 'lorra'; did you mean 'lora'?"),
    ("%peft_attach", "nbpeft: which method? one of " + ", ".join(m.name for m in nbpeft.methods())),
    ("%peft_attach lora rank=8", "nbpeft: lora: unknown option 'rank' (did you mean 'r'?)"),
    ("%%peft_attach lora\nr: 8\nalpah: 32\n", "nbpeft: lora: unknown option 'alpah' (did you mean 'alpha'?)"),
    ("%peft_attach lora r=0", "nbpeft: lora: r=0 must be a positive integer"),
    ("%peft_attach lora r=eight", "nbpeft: lora: r='eight' has the wrong type; expected int"),
    ("%peft_attach lora init=normal", "nbpeft: lora: init='normal' is not allowed"),
    ("%peft_attach lora targets=qproj", "nbpeft: lora: no module matched targets=['qproj']; did you mean 'q_proj'"),
    ("%peft_attach lora --name existing",
     "nbpeft: attach(): an adapter named 'existing' is already attached; pick another --name or detach it first (--replace puts a fresh one in its place)"),
    ("%peft_attach lora --name 'a b'", "nbpeft: attach(): --name 'a b' must be a simple identifier"),
    ("%peft_attach lora r", "nbpeft: expected key=value, got 'r'"),
    ("%peft_attach lora r=8 r=4", "nbpeft: option 'r' is given twice"),
    ("%%peft_attach lora r=8\nr: 4\n", "nbpeft: option 'r' is given twice"),
    ("%peft_attach lora --modle other", "nbpeft: unknown flag --modle (flags: --model, --name, --replace)"),
    ("%peft_attach lora --model", "nbpeft: --model needs a value"),
    ("%peft_attach lora --model nope", "nbpeft: no variable 'nope' in the notebook; load one with"),
    ("%peft_attach lora --model data", "nbpeft: 'data' holds a list, not a torch model"),
    ("%peft_attach lora extra", "nbpeft: expected key=value, got 'extra'"),
    ("%peft_summary --model nope", "nbpeft: no variable 'nope' in the notebook"),
    ("%peft_merge nope", "nbpeft: merge(): no adapter named 'nope'; attached: existing"),
    ("%peft_unmerge nope", "nbpeft: unmerge(): no adapter named 'nope'"),
    ("%peft_detach nope", "nbpeft: detach(): no adapter named 'nope'"),
    ("%peft_detach existing nope", "nbpeft: unexpected 'nope'; usage: %peft_detach [NAME] [--model VAR]"),
    ("%peft_detach --name existing", "nbpeft: unknown flag --name (flags: --model); usage: %peft_detach [NAME]"),
    ("%peft_detach r=1", "nbpeft: unknown option 'r=1'"),
    ("%peft_save", "nbpeft: where to?"),
    ("%peft_save out --name nope", "nbpeft: save_adapter(): no adapter named 'nope'"),
    ("%peft_load /nonexistent/adapter", "nbpeft: /nonexistent/adapter does not exist; give the folder %peft_save wrote"),
    ("%peft_load /", "nbpeft: load_adapter(): no adapter_config.json in / (or its subfolders)"),
    ("%peft_save out --overwrite=yes", "nbpeft: --overwrite takes no value"),
])
def test_errors_are_one_line_and_leave_the_model_untouched(shell, code, message):
    shell.user_ns["data"] = ["not a model"]
    nbpeft.attach(shell.user_ns["model"], "lora", name="existing")
    before = snapshot(shell.user_ns["model"])
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert not out.outputs
    assert same_snapshot(snapshot(shell.user_ns["model"]), before)


def test_detach_on_a_model_without_adapters(shell):
    before = snapshot(shell.user_ns["model"])
    _, out = run(shell, "%peft_detach")
    assert out.stderr.strip() == (
        "UsageError: nbpeft: detach(): this model has no adapter; attach one first with nbpeft.attach(model, 'lora')"
    )
    assert same_snapshot(snapshot(shell.user_ns["model"]), before)


def test_missing_model_variable(shell):
    del shell.user_ns["model"]
    for code in ("%peft_attach lora", "%peft_summary", "%peft_merge", "%peft_save out", "%peft_train"):
        _, out = run(shell, code)
        assert out.stderr.strip() == (
            "UsageError: nbpeft: no variable 'model' in the notebook; load one with  "
            'model, tokenizer = nbpeft.load_model("smollm2-135m")  or pass --model NAME'
        ), code


# help and extension lifecycle --------------------------------------------------------------

def test_attach_help_lists_every_option_of_every_method(shell):
    doc = shell.find_line_magic("peft_attach").__doc__
    assert doc.startswith("Attach an adapter:  %peft_attach METHOD key=value ... [--model VAR] [--name NAME]")
    for info in nbpeft.methods():
        assert f"{info.name}: {info.description}" in doc
        for key, option in info.options.items():
            assert f"    {key}={option['default']!r} ({option['type']}): {option['help']}" in doc
    _, out = run(shell, "%peft_attach?")
    for key in ("r", "alpha", "dropout", "targets", "rslora", "init", "modules_to_save"):
        assert f"    {key}=" in out.stdout


@pytest.mark.parametrize("name", MAGICS)
def test_every_magic_documents_its_usage(shell, name):
    magic = shell.find_line_magic(name) or shell.find_cell_magic(name)
    assert magic.__doc__.splitlines()[0].endswith(usage(name))  # the line the parser and errors use


def test_unload_removes_the_magics_and_load_brings_them_back(shell):
    run(shell, "%unload_ext nbpeft")
    manager = shell.magics_manager
    for name in MAGICS:
        assert name not in manager.magics["line"] and name not in manager.magics["cell"]
    assert PeftMagics.__name__ not in manager.registry
    assert not [m for m in shell.Completer.custom_matchers if getattr(m, "matcher_identifier", "") == "nbpeft"]
    assert "lora" not in complete(shell, "%peft_attach lo")
    result, out = run(shell, "%peft_summary")
    assert result.error_in_exec is not None and "not found" in out.stderr

    result, out = run(shell, "%load_ext nbpeft")
    assert result.success
    assert set(MAGICS) <= set(manager.magics["line"])
    assert {"peft_attach", "peft_train"} <= set(manager.magics["cell"])
    result, out = run(shell, "%peft_summary")
    assert result.success and "no adapters attached" in out.outputs[0].data["text/plain"]
    assert complete(shell, "%peft_attach lor") == ["lora"]
    run(shell, "%reload_ext nbpeft")
    assert len([m for m in shell.Completer.custom_matchers if getattr(m, "matcher_identifier", "") == "nbpeft"]) == 1


def test_lsmagic_lists_every_magic(shell):
    text = repr(shell.run_line_magic("lsmagic", ""))
    for name in MAGICS:
        assert f"%{name}" in text
    assert "%%peft_attach" in text and "%%peft_train" in text


@pytest.mark.parametrize("name", MAGICS)
def test_question_mark_shows_usage(shell, name):
    _, out = run(shell, f"%{name}?")
    first = (shell.find_line_magic(name) or shell.find_cell_magic(name)).__doc__.splitlines()[0]
    assert first in out.stdout and f"%{name}" in out.stdout


# %peft_methods -----------------------------------------------------------------------------

def test_methods_table_lists_every_method(shell, monkeypatch):
    monkeypatch.setattr(shell.display_formatter, "active_types", ["text/plain", "text/html"])
    result, out = run(shell, "%peft_methods")
    assert result.success
    data = out.outputs[0].data
    for info in nbpeft.methods():
        assert info.name in data["text/plain"] and info.description in data["text/plain"]
        assert f'<td style="text-align:left">{info.name}</td>' in data["text/html"]
    assert "r=8" in data["text/plain"]


def test_methods_table_for_one_method_lists_its_options(shell):
    _, out = run(shell, "%peft_methods lora")
    text = out.outputs[0].data["text/plain"]
    options = method_options(get_method("lora").config_class)
    assert len(text.splitlines()) == len(options)
    assert "lora r=8 (int): rank of the update B·A" in text
    assert "(one of 'default', 'gaussian', 'random', 'pissa', 'olora', 'loftq')" in text


@pytest.mark.parametrize("code, message", [
    ("%peft_methods lorra", "nbpeft: unknown method 'lorra'; did you mean 'lora'?"),
    ("%peft_methods lora ia3", "nbpeft: unexpected 'ia3'; usage: %peft_methods [METHOD]"),
    ("%peft_methods r=8", "nbpeft: unknown option 'r=8'; usage: %peft_methods [METHOD]"),
])
def test_methods_errors(shell, code, message):
    result, out = run(shell, code)
    assert_usage_error(result, out, message)


# %peft_use ---------------------------------------------------------------------------------

def test_use_switches_the_active_adapter(shell):
    model = shell.user_ns["model"]
    run(shell, "%peft_attach lora r=2 --name chat")
    run(shell, "%peft_attach lora r=4 --name sql")
    assert state(model).active == ["sql"]
    _, out = run(shell, "%peft_use chat")
    assert out.stdout.strip() == "active: 'chat'"
    assert state(model).active == ["chat"]
    assert all(p.requires_grad == ("lora_" in n and ".chat." in n) for n, p in model.named_parameters())
    _, out = run(shell, "%peft_use chat,sql")
    assert out.stdout.strip() == "active: 'chat', 'sql'" and state(model).active == ["chat", "sql"]
    shell.user_ns["other"] = tiny_model()
    nbpeft.attach(shell.user_ns["other"], "lora", name="a")
    nbpeft.attach(shell.user_ns["other"], "lora", name="b")
    run(shell, "%peft_use a --model other")
    assert state(shell.user_ns["other"]).active == ["a"] and state(model).active == ["chat", "sql"]


@pytest.mark.parametrize("code, message", [
    ("%peft_use", "nbpeft: which adapter? attached: existing; usage: %peft_use NAME[,NAME...] [--model VAR]"),
    ("%peft_use nope", "nbpeft: set_adapter(): no adapter named 'nope'; attached: existing"),
    ("%peft_use existing,nope", "nbpeft: set_adapter(): no adapter named 'nope'; attached: existing"),
    ("%peft_use existing --name x", "nbpeft: unknown flag --name (flags: --model)"),
    ("%peft_use existing --model data", "nbpeft: 'data' holds a list, not a torch model"),
])
def test_use_errors(shell, code, message):
    shell.user_ns["data"] = ["not a model"]
    nbpeft.attach(shell.user_ns["model"], "lora", name="existing")
    before = snapshot(shell.user_ns["model"])
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert same_snapshot(snapshot(shell.user_ns["model"]), before)


def test_use_on_a_model_without_adapters(shell):
    _, out = run(shell, "%peft_use x")
    assert out.stderr.strip() == (
        "UsageError: nbpeft: set_adapter(): this model has no adapter; attach one first with nbpeft.attach(model, 'lora')"
    )


# %peft_compare -----------------------------------------------------------------------------

class FakeTable:
    def __init__(self, rows):
        self.rows = rows

    def __repr__(self):
        return f"compared {len(self.rows)} methods"

    def _repr_html_(self):
        return "<table><tr><td>compared</td></tr></table>"


@pytest.fixture
def fake_compare(monkeypatch):
    """nbpeft.compare as a recording double with compare()'s own signature."""
    double, calls = recording(nbpeft.compare, lambda call, n: FakeTable(call["methods"] or ["lora"]))
    monkeypatch.setattr(nbpeft, "compare", double)
    return calls


def test_compare_maps_options_and_stores_the_table(shell, fake_compare):
    result, out = run(shell, "%peft_compare methods=lora,ia3 lora={'r': 4, 'alpha': 8}")
    assert result.success, out.stderr
    (call,) = fake_compare
    assert call == {"model": shell.user_ns["model"], "methods": ["lora", "ia3"], "options": {"lora": {"r": 4, "alpha": 8}}}
    assert out.outputs[0].data["text/plain"] == "compared 2 methods"
    assert shell.user_ns["_peft_compare"].rows == ["lora", "ia3"]
    shell.user_ns["other"] = tiny_model()
    run(shell, "%peft_compare methods=lora --model other --out table")
    assert fake_compare[1] == {"model": shell.user_ns["other"], "methods": ["lora"], "options": {}}
    assert shell.user_ns["table"].rows == ["lora"]


def test_compare_with_the_real_compare(shell, monkeypatch):
    monkeypatch.setattr(shell.display_formatter, "active_types", ["text/plain", "text/html"])
    before = snapshot(shell.user_ns["model"])
    result, out = run(shell, "%peft_compare methods=lora,ia3 lora={'r': 4}")
    assert result.success, out.stderr
    expected = nbpeft.compare(tiny_model(), methods=["lora", "ia3"], lora={"r": 4})
    assert out.outputs[0].data["text/plain"] == repr(expected)
    assert "<table>" in out.outputs[0].data["text/html"]
    assert [row["trainable"] for row in shell.user_ns["_peft_compare"].rows] == [row["trainable"] for row in expected.rows]
    assert same_snapshot(snapshot(shell.user_ns["model"]), before)
    _, out = run(shell, "%peft_compare methods=lorra")
    assert out.stderr.strip().startswith("UsageError: nbpeft: unknown method 'lorra'; did you mean 'lora'?")


def test_compare_prose_columns_read_from_the_left(shell, monkeypatch):
    monkeypatch.setattr(shell.display_formatter, "active_types", ["text/plain", "text/html"])
    _, out = run(shell, "%peft_compare methods=lora")
    page = out.outputs[0].data["text/html"]
    left = ' style="text-align:left"'
    assert f"<th{left}>method</th><th{left}>settings</th><th>trainable</th>" in page
    assert f"<td{left}>lora</td>" in page and f"<td{left}>r=8" in page


@pytest.mark.parametrize("code, message", [
    ("%peft_compare --model nope", "nbpeft: no variable 'nope' in the notebook"),
    ("%peft_compare --out 1x", "nbpeft: --out '1x' must be a variable name"),
    ("%peft_compare --data x", "nbpeft: unknown flag --data (flags: --model, --out)"),
    ("%peft_compare lora", "nbpeft: expected key=value, got 'lora'"),
])
def test_compare_errors(shell, fake_compare, code, message):
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert not fake_compare


def test_compare_errors_from_the_api_are_one_line(shell):
    result, out = run(shell, "%peft_compare steps=3")
    assert_usage_error(result, out, "nbpeft: unknown method 'steps'")


def test_compare_help_lists_its_options(shell):
    doc = shell.find_line_magic("peft_compare").__doc__
    assert doc.startswith("Compare methods on one model:  %peft_compare [methods=a,b]")
    assert "methods=None" in doc and "METHOD={'key': value} sets that method's options" in doc
    assert all(m.name in doc for m in nbpeft.methods())


# %peft_panel -------------------------------------------------------------------------------

def test_panel_shows_a_panel_on_the_model(shell):
    from nbpeft.widgets import Panel

    shell.user_ns["tokenizer"] = "tok"
    result, out = run(shell, "%peft_panel")
    assert result.success, out.stderr
    panel = shell.user_ns["_peft_panel"]
    assert isinstance(panel, Panel) and panel.model is shell.user_ns["model"]
    assert panel.train_tab.tokenizer == "tok" and panel.train_tab.namespace is shell.user_ns
    assert out.outputs[0].data["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.model_id
    shell.user_ns["other"] = tiny_model()
    run(shell, "%peft_panel other --tokenizer tokenizer")
    assert shell.user_ns["_peft_panel"].model is shell.user_ns["other"]


@pytest.mark.parametrize("code, message", [
    ("%peft_panel nope", "nbpeft: no variable 'nope' in the notebook; load one with"),
    ("%peft_panel data", "nbpeft: 'data' holds a list, not a torch model"),
    ("%peft_panel --tokenizer nope", "nbpeft: no variable 'nope' in the notebook; pass --tokenizer NAME"),
    ("%peft_panel model r=8", "nbpeft: unknown option 'r=8'"),
])
def test_panel_errors(shell, code, message):
    shell.user_ns["data"] = ["not a model"]
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert "_peft_panel" not in shell.user_ns


# Tab completion ----------------------------------------------------------------------------

def complete(shell, text: str) -> list[str]:
    with provisionalcompleter():
        return [c.text for c in shell.Completer.completions(text, len(text))]


def test_complete_method_names(shell):
    names = [m.name for m in nbpeft.methods()]
    assert complete(shell, "%peft_attach ") == names
    assert complete(shell, "%peft_attach lo") == [n for n in names if n.startswith("lo")]
    assert complete(shell, "%%peft_attach lor") == ["lora"]
    assert complete(shell, "%peft_methods ") == names


def test_complete_option_keys_values_and_flags(shell):
    options = list(method_options(get_method("lora").config_class))
    assert complete(shell, "%peft_attach lora ") == [f"{k}=" for k in options]
    assert complete(shell, "%peft_attach lora r") == ["r=", "rslora=", "rank_pattern="]
    assert complete(shell, "%peft_attach lora r=4 r") == ["rslora=", "rank_pattern="]  # r is given already
    assert complete(shell, "%peft_attach lora init=") == ["init=default", "init=gaussian", "init=random", "init=pissa",
                                                           "init=olora", "init=loftq"]
    assert complete(shell, "%peft_attach lora init=g") == ["init=gaussian"]
    assert complete(shell, "%peft_attach lora rslora=") == ["rslora=true", "rslora=false"]
    assert complete(shell, "%peft_attach lora --") == ["--model", "--name", "--replace"]
    assert complete(shell, "%%peft_attach lora r=4\nal") == ["alpha=", "alpha_pattern="]  # a cell magic's body
    assert complete(shell, "%peft_train st") == ["steps="]
    assert complete(shell, "%peft_train --e") == ["--eval-data"]


def test_complete_variables_and_adapter_names(shell):
    shell.user_ns.update(data=["a", "b"], other=tiny_model())
    nbpeft.attach(shell.user_ns["model"], "lora", name="chat")
    nbpeft.attach(shell.user_ns["model"], "lora", name="sql")
    assert complete(shell, "%peft_attach lora --model ") == ["model", "other"]
    assert complete(shell, "%peft_train --data ") == ["data"]  # not IPython's own In
    assert complete(shell, "%peft_use ") == ["chat", "sql"]
    assert complete(shell, "%peft_use chat,") == ["chat,sql"]
    assert complete(shell, "%peft_merge s") == ["sql"]  # the name comes first, as in %peft_use
    assert complete(shell, "%peft_detach ") == ["chat", "sql"]
    assert complete(shell, "%peft_save out --name ") == ["chat", "sql"]
    assert complete(shell, "%peft_save out --o") == ["--overwrite"]
    assert complete(shell, "%peft_save out --overwrite --m") == ["--model"]
    assert complete(shell, "%peft_panel o") == ["other"]


def test_complete_compare_methods(shell, fake_compare):
    assert complete(shell, "%peft_compare methods=lora,i") == ["methods=lora,ia3"]
    assert complete(shell, "%peft_compare lor") == ["lora="]
    assert complete(shell, "%peft_compare --") == ["--model", "--out"]


# one grammar: names positionally, flags as in %magic?, errors in the magic's syntax --------------

@pytest.mark.parametrize("magic", ["peft_use", "peft_detach", "peft_merge", "peft_unmerge"])
def test_every_magic_that_acts_on_one_adapter_takes_its_name_positionally(shell, magic):
    model = shell.user_ns["model"]
    nbpeft.attach(model, "lora", init="random", name="chat")
    nbpeft.attach(model, "lora", init="random", name="sql")
    if magic == "peft_unmerge":
        nbpeft.merge(model, ["chat", "sql"])
    result, out = run(shell, f"%{magic} chat")
    assert result.success, out.stderr
    assert USAGE[magic].split()[1].startswith(("NAME", "[NAME]"))
    if magic == "peft_detach":
        assert list(state(model).adapters) == ["sql"]
    elif magic == "peft_merge":
        assert state(model).adapters["chat"].merged and not state(model).adapters["sql"].merged
    elif magic == "peft_unmerge":
        assert not state(model).adapters["chat"].merged and state(model).adapters["sql"].merged
    else:
        assert state(model).active == ["chat"]


def test_api_keywords_of_a_magics_flags_are_spelled_as_flags():
    from nbpeft.frontend import one_line
    from nbpeft.magics.line import flags, spellings

    err = ConfigError("attach(): an adapter named 'x' is already attached; pick another name= or detach it first")
    assert one_line(err, spellings("peft_attach")) == (
        "attach(): an adapter named 'x' is already attached; pick another --name or detach it first")
    assert one_line(ConfigError("give eval_data=[...] too"), spellings("peft_train")) == "give --eval-data [...] too"
    assert one_line(ConfigError("or pass overwrite=True"), spellings("peft_save")) == "or pass --overwrite"
    # only a magic's own flags: %peft_use has no --name, and options stay key=value
    assert one_line(err, spellings("peft_use")) == one_line(err)
    assert one_line(ConfigError("lora: no module matched targets=['x']"), spellings("peft_attach")).endswith("targets=['x']")
    assert flags("peft_save") == ("name", "model", "overwrite")


def test_save_refuses_to_overwrite_unless_told(shell, tmp_path):
    run(shell, "%peft_attach lora r=4 init=random")
    run(shell, f"%peft_save {tmp_path / 'a'}")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = weights.read_bytes()
    nbpeft.detach(shell.user_ns["model"])
    run(shell, "%peft_attach lora r=2 init=random")
    result, out = run(shell, f"%peft_save {tmp_path / 'a'}")
    assert_usage_error(result, out, f"nbpeft: save_adapter(): {tmp_path / 'a'} already holds an adapter; "
                                    "choose another path or pass --overwrite")
    assert weights.read_bytes() == saved
    result, out = run(shell, f"%peft_save {tmp_path / 'a'} --overwrite")
    assert result.success and out.stdout.startswith(f"saved {tmp_path / 'a'}/")
    assert weights.read_bytes() != saved

    (tmp_path / "file").write_text("notes")
    result, out = run(shell, f"%peft_save {tmp_path / 'file'}")
    assert_usage_error(result, out, f"nbpeft: save_adapter(): {tmp_path / 'file'} is a file; choose another path")
    assert (tmp_path / "file").read_text() == "notes" and "Errno" not in out.stderr
    result, _ = run(shell, f"%peft_save {tmp_path / 'file'} --overwrite")
    assert result.success and (tmp_path / "file" / "adapter_config.json").exists()


def test_save_names_the_bundled_model_by_its_hub_id(shell, tmp_path):
    model = shell.user_ns["model"]
    model.config._name_or_path = str(cache_dir() / "smollm2-135m")  # what load_model("smollm2-135m") records
    run(shell, "%peft_attach lora r=2")
    run(shell, f"%peft_save {tmp_path / 'a'}")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config._name_or_path = "some/hub-model"
    run(shell, f"%peft_save {tmp_path / 'b'}")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "some/hub-model"


def test_load_says_when_it_switches_the_active_adapter(shell, tmp_path):
    model = shell.user_ns["model"]
    nbpeft.attach(model, "lora", name="sql")
    nbpeft.save_adapter(model, tmp_path, name="sql")  # a named adapter goes in a subfolder of its name
    nbpeft.attach(model, "lora", name="chat")
    _, out = run(shell, f"%peft_load {tmp_path / 'sql'} --name again")
    assert state(model).active == ["again"]
    assert out.stdout.strip() == "active: 'again' (was 'chat'; %peft_use chat switches back)"
    shell.user_ns["fresh"] = tiny_model()
    _, out = run(shell, f"%peft_load {tmp_path / 'sql'} --model fresh")
    assert out.stdout.strip() == "active: 'default'"  # nothing was active before: no way back to name


def test_data_variables_offer_only_what_train_accepts():
    from nbpeft.frontend import data_variables

    namespace = {"texts": ["a", "b"], "pairs": [{"prompt": "p", "response": "r"}], "numbers": [[1, 2]], "empty": [],
                 "word": "abc", "count": 3, "model": tiny_model(), "mixed": ["a", {"prompt": "p"}], "_hidden": ["a"],
                 "loader": torch.utils.data.DataLoader([{"input_ids": torch.zeros(2, dtype=torch.long)}])}
    assert data_variables(namespace) == ["texts", "pairs", "loader"]


def test_magics_and_widgets_never_import_each_other():
    import ast
    from pathlib import Path

    package = Path(nbpeft.__file__).parent

    def imported(folder: str) -> set[str]:
        found = set()
        for path in (package / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    found.add("." * node.level + (node.module or ""))
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
        return found

    assert not [m for m in imported("magics") if "widgets" in m]
    assert not [m for m in imported("widgets") if "magics" in m]
    assert "..frontend" in imported("magics") and "..frontend" in imported("widgets")


# %peft_generate and %peft_compare_answers ----------------------------------------------------

GENERATION = {"max_new_tokens": 48, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": None, "batch_size": 8}


@pytest.fixture
def fake_answers(monkeypatch):
    """nbpeft.compare_answers as a recording double with compare_answers()'s own signature."""
    def answers(call, n):
        prompts = call["prompts"]
        return nbpeft.Answers(prompts, {name: [f"{name} says {p}" for p in prompts] for name in call["adapters"] or ["x"]})

    double, calls = recording(nbpeft.compare_answers, answers)
    monkeypatch.setattr(nbpeft, "compare_answers", double)
    return calls


def test_compare_answers_line_maps_names_flags_and_options(shell, fake_answers):
    shell.user_ns["tokenizer"] = "tok"
    result, out = run(shell, "%peft_compare_answers chat sql --prompt 'Tell me a joke' --max-new-tokens 20 "
                             "--temperature 0.7 --top-p 0.9 --seed 3 --stop '\\n\\n'")
    assert result.success, out.stderr
    (call,) = fake_answers
    assert call == {"model": shell.user_ns["model"], "prompts": ["Tell me a joke"], "adapters": ["chat", "sql"],
                    "tokenizer": "tok", "include_base": True, "pick": False, "samples": 1,
                    "options": {"max_new_tokens": 20, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": "\n\n"}}
    assert out.outputs[0].data["text/plain"] == repr(shell.user_ns["_peft_answers"])
    assert shell.user_ns["_peft_answers"].answers["sql"] == ["sql says Tell me a joke"]


def test_compare_answers_cell_takes_one_prompt_per_line(shell, fake_answers):
    shell.user_ns.update(other=tiny_model(), chars="a tokenizer")
    result, out = run(shell, "%%peft_compare_answers --no-base --model other --tokenizer chars --out res\n"
                             "Tell me a joke\n\n  What is 2+2?  \n")
    assert result.success, out.stderr
    (call,) = fake_answers
    assert call == {"model": shell.user_ns["other"], "prompts": ["Tell me a joke", "What is 2+2?"], "adapters": None,
                    "tokenizer": "a tokenizer", "include_base": False, "pick": False, "samples": 1, "options": {}}
    assert shell.user_ns["res"].prompts == ["Tell me a joke", "What is 2+2?"]


@pytest.mark.parametrize("code, message", [
    ("%peft_compare_answers chat", "nbpeft: which prompt? give --prompt TEXT, or one prompt per line in a "
                                   "%%peft_compare_answers cell; usage: %peft_compare_answers [NAME ...] --prompt TEXT"),
    ("%%peft_compare_answers --prompt hi\nhello", "nbpeft: give the prompts either with --prompt or the cell body, not both"),
    ("%peft_compare_answers --prompts hi", "nbpeft: unknown flag --prompts (flags: --prompt, --max-new-tokens,"),
    ("%peft_compare_answers --prompt hi --no-base=yes", "nbpeft: --no-base takes no value"),
    ("%peft_compare_answers --prompt hi max_new_tokens=3", "nbpeft: unknown option 'max_new_tokens=3'"),
    ("%peft_compare_answers --prompt hi --out 1x", "nbpeft: --out '1x' must be a variable name"),
    ("%peft_compare_answers --prompt hi --tokenizer nope", "nbpeft: no variable 'nope' in the notebook; pass --tokenizer NAME"),
])
def test_compare_answers_errors_in_the_magics_syntax(shell, fake_answers, code, message):
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert not fake_answers and "_peft_answers" not in shell.user_ns


@pytest.mark.parametrize("code, message", [
    ("%peft_compare_answers --prompt hi --temperature warm",
     "nbpeft: compare_answers(): --temperature 'warm' must be 0 (greedy) or a positive number such as 0.7"),
    ("%peft_compare_answers --prompt hi --top-p 0.5",
     "nbpeft: compare_answers(): --top-p 0.5 applies only when sampling; set --temperature above 0 too"),
    ("%peft_compare_answers --prompt hi --max-new-tokens 0", "nbpeft: compare_answers(): --max-new-tokens 0 must be a positive integer"),
    ("%peft_compare_answers nope --prompt hi", "nbpeft: compare_answers(): no adapter named 'nope'; attached: chat"),
])
def test_compare_answers_errors_from_the_api_name_the_flags(shell, code, message):
    nbpeft.attach(shell.user_ns["model"], "lora", name="chat")
    before = snapshot(shell.user_ns["model"])
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert same_snapshot(snapshot(shell.user_ns["model"]), before)


def test_compare_answers_without_adapters_and_without_base(shell):

    shell.user_ns["tokenizer"] = char_tokenizer()
    result, out = run(shell, "%peft_compare_answers --prompt hi --no-base")
    assert_usage_error(result, out, "nbpeft: compare_answers(): nothing to compare; the model has no adapter, "
                                    "so leave out --no-base")


def test_compare_answers_with_the_real_api(shell):

    model, tokenizer = shell.user_ns["model"], char_tokenizer()
    shell.user_ns["tokenizer"] = tokenizer
    nbpeft.attach(model, "lora", r=2, init="random", name="chat")
    nbpeft.attach(model, "ia3", name="sql")
    nbpeft.set_adapter(model, "sql")
    before = snapshot(model)
    result, out = run(shell, "%%peft_compare_answers chat sql --max-new-tokens 6\nhello\nhow are you")
    assert result.success, out.stderr
    expected = nbpeft.compare_answers(model, ["hello", "how are you"], adapters=["chat", "sql"], tokenizer=tokenizer,
                                      max_new_tokens=6)
    answers = shell.user_ns["_peft_answers"]
    assert answers.columns == ["base", "chat", "sql"] and answers.answers == expected.answers
    assert any(a for column in answers.answers.values() for a in column)  # the tiny model does answer
    assert out.outputs[0].data["text/plain"] == repr(expected)
    assert same_snapshot(snapshot(model), before) and state(model).active == ["sql"]


def test_generate_maps_the_same_flags_and_streams(shell, monkeypatch):
    double, calls = recording(nbpeft.generate, lambda call, n: "an answer")
    monkeypatch.setattr(nbpeft, "generate", double)
    shell.user_ns["tokenizer"] = "tok"
    result, out = run(shell, "%peft_generate --prompt 'Tell me a joke' --temperature 0.5 --seed 1")
    assert result.success, out.stderr
    assert calls[0] == {"model": shell.user_ns["model"], "tokenizer": "tok", "prompts": "Tell me a joke",
                        **GENERATION, "temperature": 0.5, "seed": 1, "messages": None, "stream": True,
                        "adapter_names": None, "num_samples": 1}
    run(shell, "%%peft_generate --max-new-tokens 5 --stop END\nfirst\nsecond")
    assert calls[1] == {"model": shell.user_ns["model"], "tokenizer": "tok", "prompts": ["first", "second"],
                        **GENERATION, "max_new_tokens": 5, "stop": "END", "messages": None, "stream": True,
                        "adapter_names": None, "num_samples": 1}
    assert len(calls) == 2


@pytest.mark.parametrize("code, prompt, options", [
    ("%peft_generate What is 2+2?", "What is 2+2?", {}),
    ("%peft_generate What's 2+2? --seed 1", "What's 2+2?", {"seed": 1}),
    ("%peft_generate 'What is 2+2?' --max-new-tokens 5", "What is 2+2?", {"max_new_tokens": 5}),
    ('%peft_generate --seed 2 "Explain --prompt, x=1 and #3"', "Explain --prompt, x=1 and #3", {"seed": 2}),
    ("%peft_generate --stop 'the end' Tell me (a story", "Tell me (a story", {"stop": "the end"}),
])
def test_generate_takes_the_prompt_as_the_lines_text(shell, monkeypatch, code, prompt, options):
    double, calls = recording(nbpeft.generate, lambda call, n: "an answer")
    monkeypatch.setattr(nbpeft, "generate", double)
    shell.user_ns["tokenizer"] = "tok"
    result, out = run(shell, code)
    assert result.success, out.stderr
    assert calls == [{"model": shell.user_ns["model"], "tokenizer": "tok", "prompts": prompt, **GENERATION,
                      **options, "messages": None, "stream": True, "adapter_names": None,
                      "num_samples": 1}]


@pytest.mark.parametrize("code, message", [
    ("%peft_generate hello --prompt hi", "nbpeft: give the prompts either with TEXT or --prompt, not both"),
    ("%%peft_generate hello\nhi", "nbpeft: give the prompts either with TEXT or the cell body, not both"),
    ("%peft_generate", "nbpeft: which prompt? give TEXT, --prompt TEXT, or one prompt per line in a %%peft_generate cell"),
    ("%peft_generate hello --max-tokens 3", "nbpeft: unknown flag --max-tokens (flags: --prompt, --max-new-tokens,"),
    ("%peft_generate hello --seed", "nbpeft: --seed needs a value"),
])
def test_generate_prompt_errors_are_one_line(shell, monkeypatch, code, message):
    double, calls = recording(nbpeft.generate, lambda call, n: "an answer")
    monkeypatch.setattr(nbpeft, "generate", double)
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert not calls


def test_generate_streams_what_generate_returns(shell):

    tokenizer = shell.user_ns["tokenizer"] = char_tokenizer()
    result, out = run(shell, "%peft_generate --prompt hello --max-new-tokens 8")
    assert result.success, out.stderr
    expected = nbpeft.generate(shell.user_ns["model"], tokenizer, "hello", max_new_tokens=8)
    assert expected and out.stdout.strip() == expected


# %peft_export and %peft_to_lora ----------------------------------------------------------------

def test_export_maps_format_path_and_flags(shell, monkeypatch, tmp_path):
    from nbpeft.formats.export import ExportResult

    double, calls = recording(nbpeft.export, lambda call, n: ExportResult(call["path"], call["format"], ["model.gguf"]))
    monkeypatch.setattr(nbpeft, "export", double)
    shell.user_ns.update(tokenizer="tok", chars="other tok", other=tiny_model())
    result, out = run(shell, f"%peft_export merged {tmp_path / 'm'} --dtype bfloat16")
    assert result.success, out.stderr
    assert calls[0] == {"model": shell.user_ns["model"], "path": str(tmp_path / "m"), "format": "merged",
                        "tokenizer": "tok", "dtype": "bfloat16", "quant": "f16", "overwrite": False}
    assert out.stdout.strip() == f"exported merged to {tmp_path / 'm'} (model.gguf)"
    run(shell, f"%peft_export gguf {tmp_path / 'g'} --quant q8_0 --model other --tokenizer chars")
    assert calls[1] == {"model": shell.user_ns["other"], "path": str(tmp_path / "g"), "format": "gguf",
                        "tokenizer": "other tok", "dtype": None, "quant": "q8_0", "overwrite": False}
    run(shell, f"%peft_export merged {tmp_path / 'm'} --overwrite")
    assert calls[2]["overwrite"] is True


def test_export_a_gguf_adapter_for_real(shell, tmp_path):
    import gguf

    model = shell.user_ns["model"]
    nbpeft.attach(model, "lora", r=2, init="random")
    before = snapshot(model)
    result, out = run(shell, f"%peft_export gguf-adapter {tmp_path / 'a'}")
    assert result.success, out.stderr
    assert out.stdout.strip() == f"exported gguf-adapter to {tmp_path / 'a'} (adapter.gguf, Modelfile, README.md)"
    reader = gguf.GGUFReader(tmp_path / "a" / "adapter.gguf")
    assert reader.fields["adapter.type"].contents() == "lora" and len(reader.tensors) == 2 * 2 * 2  # A, B; q, v; 2 layers
    assert same_snapshot(snapshot(model), before)
    result, out = run(shell, f"%peft_export gguf-adapter {tmp_path / 'a'}")  # not onto an existing export
    assert_usage_error(result, out, f"nbpeft: export(): {tmp_path / 'a'} already exists and is not empty; "
                                   "choose another path or pass --overwrite")
    result, out = run(shell, f"%peft_export gguf-adapter {tmp_path / 'a'} --overwrite")
    assert result.success, out.stderr


def test_export_k_quant_without_llama_cpp_in_the_magics_syntax(shell, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    nbpeft.attach(shell.user_ns["model"], "lora", r=2)
    result, out = run(shell, f"%peft_export gguf {tmp_path / 'g'} --quant q5_k_m")
    assert_usage_error(result, out, "nbpeft: export(): --quant 'q5_k_m' is written by llama.cpp's quantiser, which needs "
                                   "llama-cpp-python: pip install llama-cpp-python (it compiles llama.cpp from source, which takes minutes)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, message", [
    ("%peft_export", "nbpeft: which format? one of merged, gguf, gguf-adapter, or check TARGET; usage: %peft_export FORMAT PATH"),
    ("%peft_export merged", "nbpeft: where to? usage: %peft_export FORMAT PATH"),
    ("%peft_export merged a b", "nbpeft: unexpected 'b'; usage: %peft_export FORMAT PATH"),
    ("%peft_export ggfu out", "nbpeft: export(): FORMAT 'ggfu' is not known (did you mean 'gguf'?); "
                              "use one of 'merged', 'gguf', 'gguf-adapter'"),
    ("%peft_export merged out --dtype int4", "nbpeft: export(): --dtype 'int4' is not supported; use one of 'float32'"),
    ("%peft_export gguf out --dtype float16", "nbpeft: --dtype applies to merged only, not gguf"),
    ("%peft_export merged out --quant q8_0", "nbpeft: --quant applies to gguf only, not merged"),
    ("%peft_export merged out", "nbpeft: export(): no tokenizer to export with the model; pass --tokenizer (the one"),
    ("%peft_export check", "nbpeft: check for which program? one of vllm, llama.cpp, ollama, peft"),
    ("%peft_export check sglang", "nbpeft: check_export(): TARGET 'sglang' is not known; use one of 'vllm'"),
    ("%peft_export check vllm --quant f16", "nbpeft: --quant is for writing files, not for check"),
])
def test_export_errors_in_the_magics_syntax(shell, tmp_path, monkeypatch, code, message):
    monkeypatch.chdir(tmp_path)
    nbpeft.attach(shell.user_ns["model"], "lora", r=2)
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial folder


def test_export_check_lists_each_problem(shell, tmp_path):
    model = shell.user_ns["model"]
    nbpeft.attach(model, "lora", r=2)
    _, out = run(shell, "%peft_export check vllm")
    assert out.stdout.strip() == "vllm: no problems found"
    nbpeft.detach(model)
    nbpeft.attach(model, "dora", r=32, name="wide")
    _, out = run(shell, "%peft_export check vllm")
    assert out.stdout.strip() == str(nbpeft.check_export(model, "vllm"))
    assert "DoRA is rejected" in out.stdout and "max_lora_rank" in out.stdout and len(out.stdout.strip().splitlines()) == 2
    nbpeft.save_adapter(model, tmp_path, name="wide")
    _, out = run(shell, f"%peft_export check vllm {tmp_path / 'wide'}")  # a saved folder, not the model
    assert out.stdout.strip() == str(nbpeft.check_export(tmp_path / "wide", "vllm")) and "DoRA" in out.stdout


def test_to_lora_converts_the_named_adapter(shell, monkeypatch):
    model = shell.user_ns["model"]
    nbpeft.attach(model, "dora", r=4, init="random", name="chat")
    nbpeft.attach(model, "lora", r=2, name="sql")
    result, out = run(shell, "%peft_to_lora chat --rank 2 --name small")
    assert result.success, out.stderr
    assert out.stdout.startswith("LoRA 'small' (r=2) from 'chat': relative Frobenius error ")
    assert state(model).active == ["small"] and state(model).adapters["small"].config.r == 2

    double, calls = recording(nbpeft.to_lora, lambda call, n: "converted")
    monkeypatch.setattr(nbpeft, "to_lora", double)
    run(shell, "%peft_to_lora")
    assert calls == [{"model": model, "rank": 8, "name": None, "source": None}]


@pytest.mark.parametrize("code, message", [
    ("%peft_to_lora --rank 0", "nbpeft: to_lora(): --rank 0 must be a positive integer, e.g. --rank 8"),
    ("%peft_to_lora nope", "nbpeft: to_lora(): no adapter named 'nope'; attached: chat"),
    ("%peft_to_lora chat sql", "nbpeft: unexpected 'sql'; usage: %peft_to_lora [NAME] [--rank R]"),
])
def test_to_lora_errors_in_the_magics_syntax(shell, code, message):
    nbpeft.attach(shell.user_ns["model"], "dora", r=2, name="chat")
    before = snapshot(shell.user_ns["model"])
    result, out = run(shell, code)
    assert_usage_error(result, out, message)
    assert same_snapshot(snapshot(shell.user_ns["model"]), before)


def test_to_lora_of_a_merged_adapter_says_which_magic_unmerges(shell):
    nbpeft.attach(shell.user_ns["model"], "dora", r=2, init="random", name="chat")
    nbpeft.merge(shell.user_ns["model"], "chat")
    result, out = run(shell, "%peft_to_lora")
    assert_usage_error(result, out, "nbpeft: to_lora(): adapter 'chat' is merged; %peft_unmerge first")


def test_complete_answers_and_export_words(shell):

    shell.user_ns.update(chars=char_tokenizer(), data=["a"])
    nbpeft.attach(shell.user_ns["model"], "lora", name="chat")
    nbpeft.attach(shell.user_ns["model"], "lora", name="sql")
    assert complete(shell, "%peft_compare_answers ") == ["chat", "sql"]
    assert complete(shell, "%peft_compare_answers chat ") == ["sql"]  # several names, each once
    assert complete(shell, "%%peft_compare_answers chat --n") == ["--no-base"]
    assert complete(shell, "%peft_compare_answers --no-base --t") == ["--temperature", "--top-p", "--tokenizer"]
    assert complete(shell, "%peft_compare_answers --tokenizer ") == ["chars"]  # tokenizers, not data or models
    assert complete(shell, "%peft_generate --m") == ["--max-new-tokens", "--model"]
    assert complete(shell, "%peft_generate What is 2+2? --m") == ["--max-new-tokens", "--model"]
    assert complete(shell, "%peft_generate What is 2+2? --model ") == complete(shell, "%peft_generate --model ") != []
    assert complete(shell, "%peft_generate What is 2") == []  # prompt words: nothing to offer
    assert complete(shell, "%peft_export ") == ["merged", "gguf", "gguf-adapter", "check"]
    assert complete(shell, "%peft_export gguf") == ["gguf", "gguf-adapter"]
    assert complete(shell, "%peft_export check ") == ["vllm", "llama.cpp", "ollama", "peft"]
    assert complete(shell, "%peft_export merged out --dtype ") == ["float32", "bfloat16", "float16"]
    assert complete(shell, "%peft_export gguf out --quant q") == ["q8_0", "q4_k_m", "q5_k_m"]
    assert complete(shell, "%peft_export gguf out --quant q5") == ["q5_k_m"]
    assert complete(shell, "%peft_to_lora s") == ["sql"]
    from nbpeft.magics import completions

    assert completions(shell, "%peft_to_lora chat --rank ") == ("", [])  # a number: nothing of ours to offer
    assert completions(shell, "%peft_compare_answers --prompt ") == ("", [])  # free text, not variable names


# %peft_show_example --------------------------------------------------------------------------

def shown(out) -> str:
    """The plain text of the one thing a cell displayed."""
    assert len(out.outputs) == 1
    return out.outputs[0].data["text/plain"]


def test_show_example_is_the_api_call(shell, monkeypatch):

    from nbpeft.data.batches import remember_tokenizer

    chars = char_tokenizer()
    data = [{"prompt": "hi", "response": "yo"}, {"prompt": "how are you", "response": "well, thanks"}]
    shell.user_ns.update(data=data, chars=chars, qa=[{"q": "2+2?", "a": "4"}])
    result, out = run(shell, "%peft_show_example 1 --tokenizer chars max_length=34")
    assert result.success, out.stderr
    expected = nbpeft.show_example(data, chars, 1, max_length=34)
    assert shown(out) == repr(expected) and expected.cut > 0 and expected.num_trained > 0
    assert "⟦" in shown(out)
    # default row 0 of `data` with the notebook's `tokenizer`; the HTML view is the Example's own
    shell.user_ns["tokenizer"] = chars
    monkeypatch.setattr(shell.display_formatter, "active_types", ["text/plain", "text/html"])
    result, out = run(shell, "%peft_show_example")
    assert result.success and shown(out) == repr(nbpeft.show_example(data, chars, 0))
    assert out.outputs[0].data["text/html"] == nbpeft.show_example(data, chars, 0)._repr_html_()
    # columns= maps other column names, as in train
    result, out = run(shell, "%peft_show_example --data qa columns={'prompt': 'q', 'response': 'a'}")
    assert result.success, out.stderr
    assert shown(out) == repr(nbpeft.show_example([{"prompt": "2+2?", "response": "4"}], chars))
    # no tokenizer variable: the model's own
    del shell.user_ns["tokenizer"]
    other = shell.user_ns["other"] = tiny_model(1)
    remember_tokenizer(other, chars)
    result, out = run(shell, "%peft_show_example 1 --model other")
    assert result.success, out.stderr
    assert shown(out) == repr(nbpeft.show_example(data, chars, 1))


@pytest.mark.parametrize("line, message", [
    ("%peft_show_example", "nbpeft: show_example(): text data needs a tokenizer and none belongs to this model; "
                           "pass --tokenizer NAME"),
    ("%peft_show_example 5 --tokenizer chars", "nbpeft: show_example(): I=5 is past the end; the data has 2 rows (0 to 1)"),
    ("%peft_show_example -1 --tokenizer chars", "nbpeft: I='-1' must be a row number, 0 or more; usage: %peft_show_example"),
    ("%peft_show_example first --tokenizer chars", "nbpeft: I='first' must be a row number, 0 or more"),
    ("%peft_show_example 0 1", "nbpeft: expected key=value, got '1'; usage: %peft_show_example [I]"),
    ("%peft_show_example max_len=8 --tokenizer chars",
     "nbpeft: show_example: unknown option 'max_len' (did you mean 'max_length'?); options are max_length, columns"),
    ("%peft_show_example max_length=0 --tokenizer chars",
     "nbpeft: show_example(): max_length=0 must be a positive integer"),
    ("%peft_show_example --data nope", "nbpeft: no variable 'nope' in the notebook; make a list of examples or pass --data NAME"),
    ("%peft_show_example --tokenizer nope", "nbpeft: no variable 'nope' in the notebook; pass --tokenizer NAME"),
    ("%peft_show_example --steps 3", "nbpeft: unknown flag --steps (flags: --data, --model, --tokenizer)"),
])
def test_show_example_errors_are_one_line_in_flag_syntax(shell, line, message):

    data = [{"prompt": "hi", "response": "yo"}, {"prompt": "how are you", "response": "well"}]
    shell.user_ns.update(data=data, chars=char_tokenizer())
    before, rows = snapshot(shell.user_ns["model"]), json.dumps(data)
    result, out = run(shell, line)
    assert_usage_error(result, out, message)
    assert "tokenizer=" not in out.stderr and "i=" not in out.stderr
    assert same_snapshot(before, snapshot(shell.user_ns["model"])) and json.dumps(data) == rows


def test_show_example_without_tokenizer_or_model_names_both_flags(shell):
    shell.user_ns["data"] = ["some text"]
    del shell.user_ns["model"]
    result, out = run(shell, "%peft_show_example")
    assert_usage_error(result, out, "nbpeft: which tokenizer? pass --tokenizer NAME, or --model NAME for that model's own")


def test_complete_show_example(shell):

    shell.user_ns.update(chars=char_tokenizer(), data=["a"], other=tiny_model())
    assert complete(shell, "%peft_show_example ") == ["max_length=", "columns="]
    assert complete(shell, "%peft_show_example 2 --") == ["--data", "--model", "--tokenizer"]
    assert complete(shell, "%peft_show_example --tokenizer ") == ["chars"]
    assert complete(shell, "%peft_show_example --data ") == ["data"]
    assert complete(shell, "%peft_show_example --model ") == ["model", "other"]
    assert complete(shell, "%peft_show_example max_length=8 ") == ["columns="]  # max_length is given already


# nbpeft's errors from Python cells -----------------------------------------------------------

def test_an_api_error_in_a_python_cell_is_one_line_and_tb_shows_the_traceback(shell):
    shell.user_ns.update(data=["some text"], nbpeft=nbpeft)
    result, out = run(shell, "nbpeft.train(model, data, lr=-1)")
    assert isinstance(result.error_in_exec, ConfigError)  # the cell failed: "Run all" stops here
    assert out.stderr.strip() == f"ConfigError: {result.error_in_exec}" and "\n" not in out.stderr.strip()
    assert "Traceback" not in out.stdout + out.stderr
    _, shown = run(shell, "%tb")
    assert "Traceback" in shown.stdout and "nbpeft/training" in shown.stdout and str(result.error_in_exec) in shown.stdout


def test_other_errors_keep_ipythons_traceback(shell):
    result, out = run(shell, "def broken():\n    raise KeyError('not ours')\nbroken()")
    assert isinstance(result.error_in_exec, KeyError)
    assert "Traceback" in out.stdout and "broken()" in out.stdout


def test_unload_gives_api_errors_their_traceback_back(shell):
    shell.user_ns["nbpeft"] = nbpeft
    run(shell, "%unload_ext nbpeft")
    try:
        assert shell.custom_exceptions == ()
        result, out = run(shell, "nbpeft.load_adapter(model, 'no-such-folder')")
        assert isinstance(result.error_in_exec, ConfigError) and "Traceback" in out.stdout
    finally:
        run(shell, "%load_ext nbpeft")
    result, out = run(shell, "nbpeft.load_adapter(model, 'no-such-folder')")
    assert out.stderr.strip() == ("ConfigError: load_adapter(): no-such-folder does not exist; "
                                  "give the path of a folder written by save_adapter()")


def test_rerunning_an_attach_cell_says_how_and_replace_replaces(shell):
    assert run(shell, "%peft_attach lora r=4")[0].success
    result, out = run(shell, "%peft_attach lora r=4")
    assert not result.success
    assert "(--replace puts a fresh one in its place)" in str(result.error_in_exec)
    assert run(shell, "%peft_attach lora r=8 --replace")[0].success
    assert state(shell.user_ns["model"]).adapters["default"].config.r == 8
