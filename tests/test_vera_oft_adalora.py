"""VeRA, OFT and AdaLoRA reach every front-end from their declarations alone: methods(), the magics,
the bake-off, to_lora() and check_export()."""

from __future__ import annotations

import pytest
import torch
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import nbpeft
from nbpeft.formats.export import check_export, to_lora

from conftest import char_tokenizer
from families import outputs, tiny_batch, tiny_model

# the reference's option names and defaults
DEFAULTS = {
    "vera": {"r": 256, "projection_prng_key": 0, "save_projection": True, "d_initial": 0.1, "vera_dropout": 0.0},
    "oft": {"r": 0, "oft_block_size": 32, "coft": False, "eps": 6e-5, "block_share": False, "module_dropout": 0.0},
    "adalora": {"target_r": 8, "init_r": 12, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                "orth_reg_weight": 0.5, "total_step": None, "alpha": 8.0},
}
SMALL = {"vera": {"r": 8}, "oft": {"oft_block_size": 4}, "adalora": {"init_r": 4, "target_r": 2}}


def test_methods_lists_them_with_the_references_options_and_defaults():
    listed = {info.name: info.options for info in nbpeft.methods()}
    for method, defaults in DEFAULTS.items():
        assert {name: listed[method][name]["default"] for name in defaults} == defaults
        assert all(listed[method][name]["help"] for name in defaults)


@pytest.fixture(scope="module")
def shell():
    ip = start_ipython() or get_ipython()  # the shell is a process-wide singleton
    if "nbpeft" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "nbpeft")
    return ip


@pytest.mark.parametrize(("line", "options"), [
    ("vera r=8 projection_prng_key=3 save_projection=false", {"r": 8, "projection_prng_key": 3, "save_projection": False}),
    ("oft oft_block_size=4 coft=true eps=0.001", {"oft_block_size": 4, "coft": True, "eps": 0.001}),
    ("adalora init_r=6 target_r=2 tinit=1 deltaT=2", {"init_r": 6, "target_r": 2, "tinit": 1, "deltaT": 2}),
])
def test_the_attach_magic_maps_onto_the_api(shell, line, options):
    model = tiny_model("llama")
    shell.user_ns["model"] = model
    with capture_output():
        result = shell.run_cell(f"%peft_attach {line}")
    assert result.success
    adapter = nbpeft.core.state(model).adapters["default"]
    assert adapter.method == line.split()[0] and {k: getattr(adapter.config, k) for k in options} == options
    with capture_output() as out:
        bad = shell.run_cell("%peft_attach oft --name wide")  # block 32 on 16 features: one line, nothing attached
    assert not bad.success and "oft_block_size=32 does not divide" in out.stdout + out.stderr
    assert list(nbpeft.core.state(model).adapters) == ["default"]


def test_the_bakeoff_runs_them_like_any_method(tmp_path, monkeypatch):
    monkeypatch.setenv("NBPEFT_RUNS", str(tmp_path / "runs.sqlite"))
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"]
    table = nbpeft.bakeoff(model, data, methods={m: {**o, "lr": 2e-2} for m, o in SMALL.items()}, tokenizer=char_tokenizer(),
                           steps=3, seed=1, live=False, batch_size=2, max_length=16)
    rows = {row["name"]: row for row in table.rows}
    assert set(rows) == set(SMALL) and all(rows[m]["trainable"] > 0 for m in SMALL)
    assert not hasattr(model, "_nbpeft") and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", list(SMALL))
def test_to_lora_reports_its_error_and_check_export_says_what_each_target_takes(method):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, method, **SMALL[method])
    with torch.no_grad():
        for param in nbpeft.core.trainable_parameters(model):
            param.normal_(0, 0.3)
    adapted = outputs(model, batch)
    assert "vLLM serves LoRA only" in str(check_export(model, "vllm"))
    assert "GGUF adapters are LoRA only" in str(check_export(model, "llama.cpp"))
    assert str(check_export(model, "peft")).endswith("no problems found")
    low = to_lora(model, rank=1)
    assert 0 < low.relative_error < 1 and f"relative Frobenius error {low.relative_error:.2e}" in repr(low)
    nbpeft.detach(model, low.name)
    full = to_lora(model, rank=16)
    assert full.relative_error < 1e-5
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-4, atol=1e-4)
    assert check_export(model, "vllm") == []  # the active adapter is now the plain LoRA
