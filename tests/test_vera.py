"""VeRA: shared random projections drawn from a key, two trained vectors per layer, files in the reference's layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.errors import ConfigError
from nbpeft.formats.export import to_lora
from nbpeft.methods.vera import VeRALinear, draw_projections

from conftest import assert_same, snapshot
from families import outputs, tiny_batch, tiny_model


def vera_layers(model: torch.nn.Module) -> list[VeRALinear]:
    return [m for m in model.modules() if isinstance(m, VeRALinear)]


def trained(model: torch.nn.Module) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for param in nbpeft.core.trainable_parameters(model):
            param.normal_(0, 0.5)


def test_attach_counts_two_vectors_per_layer_and_shares_one_projection_pair():
    model = tiny_model("llama", layers=2)
    adapter = nbpeft.attach(model, "vera", r=8)
    # per block: q_proj (out 16) and v_proj (out 8), each λ_b[out] + λ_d[r]
    assert adapter.num_params == 2 * ((16 + 8) + (8 + 8))
    layers = vera_layers(model)
    shared = {id(layer.projections["default"]) for layer in layers}
    assert len(shared) == 1
    A, B = draw_projections(8, 16, 16, key=0)  # the largest in and out among q_proj (16 -> 16) and v_proj (16 -> 8)
    torch.testing.assert_close(layers[0].projections["default"].vera_A, A, rtol=0, atol=0)
    torch.testing.assert_close(layers[0].projections["default"].vera_B, B, rtol=0, atol=0)
    other = draw_projections(8, 16, 16, key=1)[0]
    assert not torch.equal(A, other)


def test_identity_at_attach_and_training_moves_only_the_vectors():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    base = outputs(model, batch)
    nbpeft.attach(model, "vera", r=8)
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    projection = vera_layers(model)[0].projections["default"].vera_A.clone()
    result = nbpeft.train(model, [batch] * 8, steps=8, lr=5e-2, warmup=0, live=False, compile=False)
    assert result.losses[-1] < result.losses[0]
    assert torch.equal(vera_layers(model)[0].projections["default"].vera_A, projection)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D keeps its weight as (in, out)
def test_merge_unmerge_detach_are_exact_and_to_lora_is_lossless_at_full_rank(family):
    model, batch = tiny_model(family), tiny_batch(family)
    before = snapshot(model)
    nbpeft.attach(model, "vera", r=8)
    trained(model)
    adapted = outputs(model, batch)
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.unmerge(model)
    conversion = to_lora(model, rank=8)  # ΔW has rank at most r
    assert conversion.relative_error < 1e-5
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-4, atol=1e-4)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_hold_the_projections_as_the_reference_does_and_load_back(save_projection, tmp_path):
    model, batch = tiny_model("bart"), tiny_batch("bart")
    nbpeft.attach(model, "vera", r=8, projection_prng_key=3, save_projection=save_projection)
    trained(model)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 3
    assert config["save_projection"] is save_projection and config["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in tensors) is save_projection and ("base_model.vera_B" in tensors) is save_projection
    assert all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in tensors if k.startswith("base_model.model."))
    fresh = tiny_model("bart")
    nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=0, atol=0)


def test_a_files_own_projections_win_over_the_key(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, "vera", r=8)
    trained(model)
    with torch.no_grad():  # as if drawn on another system: the file's A and B are what the adapter was trained with
        vera_layers(model)[0].projections["default"].vera_A.mul_(-1)
    nbpeft.save_adapter(model, tmp_path)
    fresh = tiny_model("llama")
    nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=0, atol=0)


def test_projections_stay_shared_after_a_move():
    model = tiny_model("llama", layers=2)
    nbpeft.attach(model, "vera", r=8)
    model.to(torch.float64)
    shared = {layer.projections["default"].vera_A.data_ptr() for layer in vera_layers(model)}
    assert len(shared) == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"r": 0}, "r=0 must be a positive integer"),
    ({"vera_dropout": 1.0}, "vera_dropout=1.0 must be in [0, 1)"),
    ({"projection_prng_key": -1}, "projection_prng_key=-1 must be 0 or more"),
    ({"rank": 4}, "did you mean 'r'"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")) as info:
        nbpeft.attach(model, "vera", **options)
    assert "\n" not in str(info.value)
    assert_same(before, snapshot(model))
