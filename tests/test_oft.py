"""OFT: block-diagonal rotations of each layer's input, in the reference's current parametrisation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.errors import ConfigError
from nbpeft.formats.export import to_lora
from nbpeft.methods.oft import OFTLinear, cayley, constrained, skew

from conftest import assert_same, snapshot
from families import outputs, tiny_batch, tiny_model


def oft_layers(model: torch.nn.Module) -> list[OFTLinear]:
    return [m for m in model.modules() if isinstance(m, OFTLinear)]


def trained(model: torch.nn.Module, std: float = 0.3) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for param in nbpeft.core.trainable_parameters(model):
            param.normal_(0, std)


def test_the_exact_cayley_transform_is_a_rotation_and_the_series_comes_close():
    torch.manual_seed(0)
    Q = skew(torch.randn(3, 6) * 0.05, 4)
    assert torch.allclose(Q, -Q.transpose(-2, -1))
    exact = cayley(Q, neumann=False, terms=5)
    eye = torch.eye(4).expand(3, 4, 4)
    torch.testing.assert_close(exact @ exact.transpose(-2, -1), eye, rtol=0, atol=1e-6)
    series = cayley(Q, neumann=True, terms=5)  # the series expands (I + Q)(I - Q)⁻¹: the exact form of -Q
    assert (series - cayley(-Q, neumann=False, terms=5)).abs().max() < 1e-3  # the series cut after Q⁴
    assert torch.equal(cayley(torch.zeros(2, 4, 4), neumann=True, terms=5), torch.eye(4).expand(2, 4, 4))


def test_attach_sizes_the_blocks_and_is_the_identity():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    base = outputs(model, batch)
    adapter = nbpeft.attach(model, "oft", oft_block_size=4)
    assert adapter.num_params == 2 * (16 // 4) * (4 * 3 // 2)  # q_proj and v_proj: 4 blocks of 6 numbers each
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    nbpeft.detach(model)
    shared = nbpeft.attach(model, "oft", r=2, oft_block_size=0, block_share=True)
    assert shared.num_params == 2 * (8 * 7 // 2)  # r=2 blocks of 8 features, one block's numbers shared


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D keeps its weight as (in, out)
def test_merge_unmerge_detach_are_exact_and_to_lora_at_full_rank_is_lossless(family):
    model, batch = tiny_model(family), tiny_batch(family)
    before = snapshot(model)
    nbpeft.attach(model, "oft", oft_block_size=4)
    trained(model)
    adapted = outputs(model, batch)
    assert (adapted - outputs(tiny_model(family), batch)).abs().max() > 1e-3
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.unmerge(model)
    conversion = to_lora(model, rank=16)  # W Rᵀ - W is 16 wide at most
    assert conversion.relative_error < 1e-5
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-4, atol=1e-4)
    nbpeft.merge(model, "default")
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_training_lowers_the_loss_and_coft_keeps_each_block_near_the_identity():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, "oft", oft_block_size=4)
    result = nbpeft.train(model, [batch] * 8, steps=8, lr=5e-2, warmup=0, live=False, compile=False)
    assert result.losses[-1] < result.losses[0]
    nbpeft.detach(model)
    nbpeft.attach(model, "oft", oft_block_size=4, coft=True, eps=1e-3)
    nbpeft.train(model, [batch] * 4, steps=4, lr=5e-2, warmup=0, live=False, compile=False)
    outputs(model, batch)  # each forward first pulls the stored numbers back within eps, as the reference does
    weight = oft_layers(model)[0].oft_R["default"].detach()
    torch.testing.assert_close(constrained(weight, 4, 1e-3), weight)
    assert torch.linalg.matrix_norm(skew(weight, 4)).max() <= 1e-3 / 2 * (1 + 1e-5)


def test_files_are_in_the_reference_layout_and_load_back(tmp_path):
    model, batch = tiny_model("t5"), tiny_batch("t5")
    nbpeft.attach(model, "oft", oft_block_size=8, use_cayley_neumann=False)
    trained(model, 0.1)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 8 and config["r"] == 0
    assert config["use_cayley_neumann"] is False and config["peft_version"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.endswith(".oft_R.weight") for k in tensors) and {tuple(t.shape) for t in tensors.values()} == {(2, 28)}
    fresh = tiny_model("t5")
    nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=0, atol=0)


def test_files_of_older_oft_are_refused(tmp_path):
    model = tiny_model("llama")
    nbpeft.attach(model, "oft", oft_block_size=4)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["oft_block_size"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="before 0.14"):
        nbpeft.load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "oft_block_size=32 does not divide in_features=16 of model.layers.0.self_attn.(q|v)_proj; use one that divides "
         "every target's in_features: 1, 2, 4, 8, 16"),
    ({"r": 3, "oft_block_size": 0}, "r=3 does not divide in_features=16"),
    ({"r": 4}, "give one of r=4 and oft_block_size=32"),
    ({"oft_block_size": 0}, "give one of r=0 and oft_block_size=0"),
    ({"oft_block_size": 4, "module_dropout": 1.0}, r"module_dropout=1.0 must be in \[0, 1\)"),
    ({"oft_block_size": 4, "block_size": 4}, "did you mean 'oft_block_size'"),
])
def test_what_cannot_apply_is_refused_in_one_line(options, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message) as info:
        nbpeft.attach(model, "oft", **options)
    assert "\n" not in str(info.value)
    assert_same(before, snapshot(model))
