"""(IA)³: identity at attach, the vectors' shapes and formula, GPT-2's fused c_attn, merge, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.core import adapter_parameters, state
from nbpeft.methods.ia3 import IA3Layer

from conftest import TINY, assert_same, hidden, logits, snapshot, tiny_gpt2, tiny_llama, tokens


def randomise(model: torch.nn.Module, name: str = "default") -> None:
    with torch.no_grad():
        for p in adapter_parameters(model, name).values():
            p.copy_(1 + 0.2 * torch.randn_like(p))


@pytest.mark.parametrize("arch", TINY)
def test_identity_at_attach_and_default_targets(arch):
    model = TINY[arch]()
    base = logits(model)
    adapter = nbpeft.attach(model, "ia3")
    assert torch.equal(logits(model), base)
    leaves = {"llama": {"k_proj", "v_proj", "down_proj"}, "gpt2": {"c_attn", "c_proj"}, "bert": {"key", "value", "dense"}}
    assert {p.rsplit(".", 1)[-1] for p in adapter.targets} == leaves[arch]
    assert "ia3 on" in repr(adapter)


def test_vector_shapes_and_count_follow_the_formula(llama, bert):
    adapter = nbpeft.attach(llama, "ia3")
    shapes = {k: tuple(v.shape) for k, v in adapter_parameters(llama, "default").items()}
    assert shapes["model.layers.0.self_attn.k_proj.ia3_l"] == (16, 1)  # out_features of k (2 KV heads x 8)
    assert shapes["model.layers.0.mlp.down_proj.ia3_l"] == (1, 64)  # in_features of down_proj
    assert adapter.num_params == 2 * (16 + 16 + 64)
    # BERT: the feed-forward output.dense is scaled, the attention output.dense is not a target
    targets = nbpeft.attach(bert, "ia3").targets
    assert "bert.encoder.layer.0.output.dense" in targets
    assert not any("attention.output" in t for t in targets)
    assert tuple(bert.bert.encoder.layer[0].output.dense.ia3_l["default"].shape) == (1, 64)


def test_ia3_scales_keys_values_and_the_feedforward_input(llama):
    nbpeft.attach(llama, "ia3")
    layer = llama.model.layers[0]
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer.self_attn.k_proj.ia3_l["default"].copy_(torch.linspace(0.5, 2, 16)[:, None])
        layer.mlp.down_proj.ia3_l["default"].copy_(torch.linspace(2, 0.5, 64)[None, :])
        k, down = layer.self_attn.k_proj, layer.mlp.down_proj
        assert torch.allclose(k(x), k.base_layer(x) * torch.linspace(0.5, 2, 16), atol=1e-6)
        h = torch.randn(3, 64)
        assert torch.allclose(down(h), down.base_layer(h * torch.linspace(2, 0.5, 64)), atol=1e-6)


def test_gpt2_fused_c_attn_scales_only_keys_and_values(gpt2):
    adapter = nbpeft.attach(gpt2, "ia3")
    assert any("query third held at 1" in note for note in adapter.notes)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    vector = c_attn.ia3_l["default"]
    assert tuple(vector.shape) == (96, 1)
    base = logits(gpt2)
    with torch.no_grad():
        vector[:32] = 3.0  # the query third: no effect
    assert torch.equal(logits(gpt2), base)
    logits(gpt2)  # and no gradient reaches it
    out = gpt2(tokens()).logits.sum()
    out.backward()
    assert torch.count_nonzero(vector.grad[:32]) == 0 and torch.count_nonzero(vector.grad[32:]) > 0
    # fused_qkv='qkv' scales the whole fused output, as the reference does
    other = tiny_gpt2()
    nbpeft.attach(other, "ia3", fused_qkv="qkv")
    with torch.no_grad():
        other.transformer.h[0].attn.c_attn.ia3_l["default"][:32] = 3.0
    assert not torch.allclose(logits(other), base)


def test_to_lora_of_gpt2_conv1d_layers_keeps_the_outputs(gpt2):
    # Conv1D stores its weight as (in, out): the layer's fan_in_fan_out turns the delta to (out, in)
    nbpeft.attach(gpt2, "ia3", init="random")
    randomise(gpt2)
    adapted = logits(gpt2)
    conversion = nbpeft.to_lora(gpt2, rank=32)  # the full rank of every 32-wide delta
    assert conversion.relative_error < 1e-5
    assert torch.allclose(logits(gpt2), adapted, atol=1e-4)


@pytest.mark.parametrize("arch", TINY)
def test_merge_unmerge_and_detach_restore_exactly(arch):
    model = TINY[arch]()
    before = snapshot(model)
    nbpeft.attach(model, "ia3", init="random")
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
def test_save_then_load_into_a_fresh_model(arch, tmp_path):
    model = TINY[arch]()
    nbpeft.attach(model, "ia3")
    randomise(model)
    expected = hidden(model)
    nbpeft.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["init_ia3_weights"] is True
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    assert cfg["feedforward_modules"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in tensors)
    vectors = [k for k in tensors if k.endswith(".ia3_l")]
    assert len(vectors) == (4 if arch == "gpt2" else 6)
    assert set(tensors) - set(vectors) == ({"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
                                           if arch == "bert" else set())
    fresh = TINY[arch]()
    (adapter,) = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.method == "ia3"
    assert torch.equal(hidden(fresh), expected)


def test_a_file_that_scales_gpt2_queries_keeps_doing_so(gpt2, tmp_path):
    nbpeft.attach(gpt2, "ia3", fused_qkv="qkv")
    randomise(gpt2)
    expected = logits(gpt2)
    nbpeft.save_adapter(gpt2, tmp_path)
    fresh = tiny_gpt2()
    nbpeft.load_adapter(fresh, tmp_path)
    assert state(fresh).adapters["default"].config.fused_qkv == "qkv"
    assert torch.equal(logits(fresh), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targets": ["kproj"]}, "did you mean 'k_proj'"),
        ({"feedforward": ["q_proj"]}, "feedforward must name a subset of targets"),
        ({"init": "zeros"}, "use one of 'ones', 'random'"),
        ({"target_modules": ["k_proj"]}, "did you mean 'targets'"),
        ({"targets": []}, r"targets=\[\] is empty"),
    ],
)
def test_bad_options_leave_the_model_untouched(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        nbpeft.attach(llama, "ia3", **options)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))


def test_lora_and_ia3_side_by_side_with_set_adapter(llama, tmp_path):
    before = snapshot(llama)
    nbpeft.attach(llama, "lora", name="sql", init="random")
    lora_only = logits(llama)
    nbpeft.attach(llama, "ia3", name="scale")  # wraps the LoRA layer on v_proj
    randomise(llama, "scale")
    ia3_out = logits(llama)
    nbpeft.save_adapter(llama, tmp_path, name="scale")
    alone = tiny_llama()
    nbpeft.load_adapter(alone, tmp_path / "scale")
    assert torch.allclose(ia3_out, logits(alone), atol=1e-6)
    nbpeft.set_adapter(llama, "sql")
    assert torch.equal(logits(llama), lora_only)
    nbpeft.set_adapter(llama, ["sql", "scale"])
    assert not torch.allclose(logits(llama), lora_only, atol=1e-4)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged"):
        nbpeft.merge(llama, "scale")  # it wraps the LoRA layer on v_proj
    nbpeft.detach(llama, "sql")
    assert torch.allclose(logits(llama), ia3_out, atol=1e-6)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_ia3_on_smollm2_count_identity_training_detach(smol):
    model, tokenizer = smol
    before = snapshot(model)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    base = logits(model, ids)
    adapter = nbpeft.attach(model, "ia3")
    assert adapter.num_params == 30 * (192 + 192 + 1536) == 57_600
    assert sum(isinstance(m, IA3Layer) for m in model.modules()) == 90
    assert torch.equal(logits(model, ids), base)
    text = ["The pirate captain sailed the seven seas looking for buried gold and adventure."] * 8
    result = nbpeft.train(model, text, tokenizer=tokenizer, steps=4, batch_size=2, max_length=32, lr=1e-2, live=False)
    assert result.losses[-1] < result.losses[0] - 0.5
    nbpeft.detach(model)
    assert_same(before, snapshot(model))
