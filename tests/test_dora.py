"""DoRA: identity at attach, the decomposed weight, merge, the LORA file with use_dora, mixing with LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.core import adapter_parameters
from nbpeft.methods.dora import DoRALinear

from conftest import TINY, assert_same, hidden, logits, snapshot, tiny_llama


def randomise(model: torch.nn.Module, name: str = "default") -> None:
    """Move B off zero and the magnitudes off ‖W‖, as training would."""
    with torch.no_grad():
        for key, p in adapter_parameters(model, name).items():
            if key.endswith("lora_B.weight"):
                p.normal_(std=0.2)
            elif key.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.2 * torch.randn_like(p))


@pytest.mark.parametrize("arch", TINY)
def test_identity_at_attach_and_magnitude_starts_at_the_row_norms(arch):
    model = TINY[arch]()
    base = logits(model)
    adapter = nbpeft.attach(model, "dora", r=4)
    assert torch.equal(logits(model), base)
    layer = next(m for m in model.modules() if isinstance(m, DoRALinear))
    weight = layer.base_layer.weight
    rows = weight.T if arch == "gpt2" else weight  # Conv1D stores (in, out)
    assert torch.allclose(layer.lora_magnitude_vector["default"], rows.norm(dim=1))
    assert adapter.method == "dora" and "dora on" in repr(adapter)


def test_layer_output_is_the_decomposed_weight(llama):
    nbpeft.attach(llama, "dora", r=4, alpha=8)
    randomise(llama)
    layer = llama.model.layers[0].self_attn.q_proj
    W, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    updated = W + (8 / 4) * B @ A
    expected_weight = m[:, None] * updated / updated.norm(dim=1, keepdim=True)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ expected_weight.T, atol=1e-5)


def test_count_is_lora_plus_out_features(llama, gpt2):
    lora = 2 * 4 * ((32 + 32) + (32 + 16))  # q_proj 32->32, v_proj 32->16 (2 KV heads)
    assert nbpeft.attach(llama, "dora", r=4).num_params == lora + 2 * (32 + 16)
    assert nbpeft.attach(gpt2, "dora", r=4).num_params == 2 * (4 * (32 + 96) + 96)


@pytest.mark.parametrize("arch", TINY)
def test_merge_unmerge_and_detach_restore_exactly(arch):
    model = TINY[arch]()
    before = snapshot(model)
    nbpeft.attach(model, "dora", r=4)
    randomise(model)
    adapted = hidden(model)
    assert not torch.allclose(adapted, hidden(TINY[arch]()), atol=1e-4)
    nbpeft.merge(model)
    assert torch.allclose(hidden(model), adapted, atol=1e-5)
    nbpeft.unmerge(model)
    assert torch.allclose(hidden(model), adapted, atol=1e-6)
    nbpeft.merge(model)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("arch", TINY)
def test_save_as_a_lora_file_with_use_dora_then_load(arch, tmp_path):
    model = TINY[arch]()
    nbpeft.attach(model, "dora", r=4)
    randomise(model)
    expected = hidden(model)
    nbpeft.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == 4
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    out_features = {"llama": 32, "gpt2": 96, "bert": 32}[arch]
    assert len(magnitudes) == (2 if arch == "gpt2" else 4)
    first = min(magnitudes)
    assert first.startswith("base_model.model.") and tuple(magnitudes[first].shape) == (out_features,)
    fresh = TINY[arch]()
    (adapter,) = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.method == "dora"
    assert torch.equal(hidden(fresh), expected)


def test_a_lora_file_without_use_dora_still_loads_as_lora(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=4, init="random")
    expected = logits(llama)
    nbpeft.save_adapter(llama, tmp_path)
    fresh = tiny_llama()
    (adapter,) = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.method == "lora"
    assert torch.equal(logits(fresh), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "dora: r=0 must be a positive integer"),
        ({"targets": ["qproj"]}, "dora: no module matched targets=.*did you mean 'q_proj'"),
        ({"dropout": 1.5}, "dora: dropout=1.5 must be in"),
        ({"use_dora": True}, "dora: unknown option 'use_dora'"),
    ],
)
def test_bad_options_leave_the_model_untouched(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        nbpeft.attach(llama, "dora", **options)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))


def test_dora_then_lora_share_layers_and_set_adapter_switches(llama):
    before = snapshot(llama)
    nbpeft.attach(llama, "dora", name="dora", r=4)
    randomise(llama, "dora")
    dora_only = logits(llama)
    nbpeft.attach(llama, "lora", name="lora", r=4, init="random")
    lora_only = logits(llama)
    q_proj = llama.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, DoRALinear) and set(q_proj.adapter_names) == {"dora", "lora"}
    nbpeft.set_adapter(llama, "dora")
    assert torch.equal(logits(llama), dora_only)
    nbpeft.set_adapter(llama, ["dora", "lora"])
    both = logits(llama)
    assert not torch.allclose(both, dora_only, atol=1e-4) and not torch.allclose(both, lora_only, atol=1e-4)
    nbpeft.merge(llama)
    assert torch.allclose(logits(llama), both, atol=1e-5)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_dora_on_a_module_that_already_holds_lora_is_refused(llama):
    nbpeft.attach(llama, "lora", r=4)
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="attach dora first") as err:
        nbpeft.attach(llama, "dora", name="d")
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))


def test_dora_on_smollm2_count_identity_training_detach(smol):
    model, tokenizer = smol
    before = snapshot(model)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    base = logits(model, ids)
    adapter = nbpeft.attach(model, "dora", r=8)
    assert adapter.num_params == 460_800 + 30 * (576 + 192) == 483_840  # LoRA r=8 on q, v + one m per output
    assert torch.equal(logits(model, ids), base)
    text = ["The pirate captain sailed the seven seas looking for buried gold and adventure."] * 8
    result = nbpeft.train(model, text, tokenizer=tokenizer, steps=4, batch_size=2, max_length=32, lr=1e-3, live=False)
    assert result.losses[-1] < result.losses[0] - 0.3
    trained = logits(model, ids)
    nbpeft.merge(model)
    assert torch.allclose(logits(model, ids), trained, atol=1e-3)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))
