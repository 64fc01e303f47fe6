"""BitFit: biases only, zero biases added where missing, exact detach after training, save/load, merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.core import adapter_parameters

from conftest import TINY, assert_same, hidden, logits, snapshot, tokens


def perturb(model: torch.nn.Module, name: str = "default") -> None:
    with torch.no_grad():
        for p in adapter_parameters(model, name).values():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("arch", TINY)
def test_identity_at_attach_and_notes(arch):
    model = TINY[arch]()
    base = logits(model)
    adapter = nbpeft.attach(model, "bitfit", layer_norms=True)
    assert torch.equal(logits(model), base)
    added = [n for n in adapter.notes if "added zero-initialised biases" in n]
    assert bool(added) is (arch == "llama")  # Llama's linear layers have no bias; GPT-2's and BERT's do
    if added:
        assert "added zero-initialised biases to 14 modules" in repr(adapter)
        assert "added zero-initialised biases" in repr(nbpeft.summary(model))


def test_count_follows_the_formula(llama, gpt2):
    # Llama: one bias per output feature of q, k, v, o, gate, up, down; norms add their weights
    per_layer = 32 + 16 + 16 + 32 + 64 + 64 + 32
    assert nbpeft.attach(llama, "bitfit").num_params == 2 * per_layer
    assert nbpeft.attach(llama, "bitfit", name="norms", layer_norms=True).num_params == 2 * per_layer + 2 * 2 * 32 + 32
    # GPT-2: c_attn (3·32), attn.c_proj (32), c_fc (128), mlp.c_proj (32) biases
    assert nbpeft.attach(gpt2, "bitfit").num_params == 2 * (96 + 32 + 128 + 32)


def test_training_changes_only_the_copies_and_detach_restores_the_originals(bert):
    before = snapshot(bert)
    nbpeft.attach(bert, "bitfit", layer_norms=True)
    trainable = [p for p in bert.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    labels = torch.tensor([0, 1])
    for _ in range(3):
        loss = bert(tokens(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    query = bert.bert.encoder.layer[0].attention.self.query
    assert not torch.equal(query.bitfit["default"].bias, query.base_layer.bias)  # trained copy moved
    assert torch.equal(query.base_layer.bias, before["weights"]["bert.encoder.layer.0.attention.self.query.bias"])
    nbpeft.detach(bert)
    assert_same(before, snapshot(bert))


@pytest.mark.parametrize("arch", TINY)
def test_save_then_load_into_a_fresh_model(arch, tmp_path):
    model = TINY[arch]()
    nbpeft.attach(model, "bitfit", layer_norms=True)
    perturb(model)
    expected = hidden(model)
    nbpeft.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BITFIT"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.endswith((".bias", ".weight")) for k in tensors)
    key = {"llama": "model.layers.0.self_attn.q_proj.bias", "gpt2": "transformer.h.0.attn.c_attn.bias",
           "bert": "bert.encoder.layer.0.attention.self.query.bias"}[arch]
    assert torch.equal(tensors["base_model.model." + key], adapter_parameters(model, "default")[key])
    fresh = TINY[arch]()
    (adapter,) = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.method == "bitfit"
    assert torch.equal(hidden(fresh), expected)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_merge_where_the_layers_have_biases(arch):
    model = TINY[arch]()
    before = snapshot(model)
    nbpeft.attach(model, "bitfit", layer_norms=True)
    perturb(model)
    adapted = hidden(model)
    nbpeft.merge(model)
    assert torch.allclose(hidden(model), adapted, atol=1e-5)
    nbpeft.unmerge(model)
    assert torch.allclose(hidden(model), adapted, atol=1e-6)
    nbpeft.merge(model)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_added_biases_cannot_be_merged(llama):
    nbpeft.attach(llama, "bitfit")
    perturb(llama)
    adapted = logits(llama)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged"):
        nbpeft.merge(llama)
    assert torch.equal(logits(llama), adapted)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targets": ["qproj"]}, "did you mean 'q_proj'"),
        ({"layer_norms": "yes"}, "layer_norms='yes' has the wrong type"),
        ({"bias": "all"}, "unknown option 'bias'"),
        ({"targets": ["embed_tokens"]}, "cannot adapt"),
    ],
)
def test_bad_options_leave_the_model_untouched(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        nbpeft.attach(llama, "bitfit", **options)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))


def test_lora_and_bitfit_side_by_side_with_set_adapter(llama):
    before = snapshot(llama)
    base = logits(llama)
    nbpeft.attach(llama, "lora", name="low", init="random")
    lora_only = logits(llama)
    nbpeft.attach(llama, "bitfit", name="bias")  # the new adapter is the active one
    assert torch.equal(logits(llama), base)
    nbpeft.set_adapter(llama, ["low", "bias"])
    assert torch.equal(logits(llama), lora_only)  # bitfit starts as the identity on top of LoRA's layers
    perturb(llama, "bias")
    both = logits(llama)
    assert not torch.allclose(both, lora_only, atol=1e-4)
    nbpeft.set_adapter(llama, "low")
    assert torch.equal(logits(llama), lora_only)
    nbpeft.set_adapter(llama, "bias")
    bias_only = logits(llama)
    assert not torch.allclose(bias_only, base, atol=1e-4) and not torch.allclose(bias_only, both, atol=1e-4)
    assert nbpeft.summary(llama).per_method.keys() == {"lora", "bitfit"}
    nbpeft.detach(llama, "low")
    assert torch.equal(logits(llama), bias_only)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_bitfit_on_real_models(smol, minilm):
    model, tokenizer = smol
    before = snapshot(model)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    base = logits(model, ids)
    adapter = nbpeft.attach(model, "bitfit")
    assert adapter.num_params == 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) == 155_520
    assert torch.equal(logits(model, ids), base)
    text = ["The pirate captain sailed the seven seas looking for buried gold and adventure."] * 8
    result = nbpeft.train(model, text, tokenizer=tokenizer, steps=4, batch_size=2, max_length=32, lr=1e-3, live=False)
    assert result.losses[-1] < result.losses[0] - 0.5
    nbpeft.detach(model)
    assert_same(before, snapshot(model))
    # MiniLM: every linear bias (q, k, v, attention output, intermediate, output; pooler) and the head
    bert, _ = minilm
    per_layer = 4 * 384 + 1536 + 384
    assert nbpeft.attach(bert, "bitfit").num_params == 6 * per_layer + 384 + (2 * 384 + 2) == 21_890
