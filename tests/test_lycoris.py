"""LoHa and LoKr: the update each builds, identity at attach, training, exact merge and detach, the
reference's file layout, conversion to LoRA and what the serving targets say.

Parity with the reference itself (files both ways, equal logits) is checked by ``make compat``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.errors import ConfigError
from nbpeft.formats.export import check_export, to_lora
from nbpeft.methods.lokr import factor_pair

from conftest import assert_same, char_tokenizer, snapshot
from families import outputs, tiny_batch, tiny_model

METHODS = ["loha", "lokr"]
# the tensors of one adapted linear layer in the reference's files, with default options on a 16 x 16 layer
FACTORS = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "lokr": {"lokr_w1", "lokr_w2"}}


def randomised(model, name: str = "default") -> None:
    """Give every factor values, as training would (the zero one included)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in nbpeft.core.adapter_parameters(model, name).values():
            param.normal_(0, 0.3)


def expected_update(layer, method: str, name: str = "default") -> torch.Tensor:
    """ΔW (out x in) written out from the method's formula."""
    p = layer.adapter_parameters(name)
    if method == "loha":
        update = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        update = torch.kron(w1, w2)
    return update * layer.scaling[name]


@pytest.mark.parametrize("method", METHODS)
def test_the_layer_adds_the_update_of_its_formula(method):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, method, r=4, alpha=6)
    randomised(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 16)
    weight = layer.base_layer.weight
    torch.testing.assert_close(layer(x), x @ (weight + expected_update(layer, method)).T)
    assert (outputs(model, batch) - outputs(tiny_model("llama"), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_attach_and_training_lowers_the_loss(method):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    base = outputs(model, batch)
    nbpeft.attach(model, method)
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    result = nbpeft.train(model, [batch] * 10, steps=10, lr=2e-2, warmup=0, live=False, compile=False)
    assert result.steps == 10 and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # qwen2: q/v with a bias; gpt2: Conv1D stores (in, out)
def test_merge_unmerge_and_detach_are_exact(method, family):
    model, batch = tiny_model(family), tiny_batch(family)
    before = snapshot(model)
    nbpeft.attach(model, method, r=2)
    randomised(model)
    adapted = outputs(model, batch)
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.unmerge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.merge(model)
    nbpeft.detach(model)  # merged: detach unmerges first, bit for bit
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_dropouts_act_in_training_only(method):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, method, rank_dropout=0.5, module_dropout=0.5)
    randomised(model)
    evaluated = outputs(model, batch)
    torch.testing.assert_close(outputs(model, batch), evaluated, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        trained = [model(**batch).logits for _ in range(4)]
    assert any((t - evaluated).abs().max() > 1e-6 for t in trained)


@pytest.mark.parametrize("method", METHODS)
def test_the_folder_is_in_the_reference_layout_and_loads_back(method, tmp_path):
    model, batch = tiny_model("llama", layers=2), tiny_batch("llama")
    nbpeft.attach(model, method, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3.0})
    randomised(model)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 8 and config["alpha"] == 8.0
    assert config["rank_pattern"] == {"v_proj": 2} and config["alpha_pattern"] == {"layers.1.self_attn.q_proj": 3.0}
    assert {"rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"} <= set(config)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj."
    assert {k[len(q_proj):] for k in tensors if k.startswith(q_proj)} == FACTORS[method]

    fresh = tiny_model("llama", layers=2)
    (loaded,) = nbpeft.load_adapter(fresh, tmp_path)
    assert loaded.method == method
    assert fresh.model.layers[1].self_attn.q_proj.scaling["default"] == 3.0 / 8
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: the delta of Conv1D's (in, out) weight
def test_to_lora_converts_and_serving_targets_say_what_they_take(method, family):
    model, batch = tiny_model(family), tiny_batch(family)
    nbpeft.attach(model, method)
    randomised(model)
    adapted = outputs(model, batch)
    vllm = check_export(model, "vllm")
    assert [line.split(": ", 2)[2] for line in vllm] == [
        "vLLM serves LoRA only; export format='merged' if the method merges, or use nbpeft.to_lora()"]
    assert "GGUF adapters are LoRA only" in str(check_export(model, "llama.cpp"))
    assert not check_export(model, "peft")

    full = to_lora(model, rank=16)  # the layers are 16 wide: full rank is the same update
    assert full.relative_error < 1e-5
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-4, atol=1e-4)
    assert not check_export(model, "vllm")
    low = to_lora(model, rank=1, name="low", source="default")
    assert 0 < low.relative_error < 1 and set(low.per_layer) == set(full.per_layer)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("options", "message"), [
    ({"r": 0}, "r=0 must be a positive integer"),
    ({"rank_dropout": 1.0}, "rank_dropout=1.0 must be in [0, 1)"),
    ({"target_modules": ["q_proj"]}, "did you mean 'targets'"),
    ({"targets": ["nope"]}, "nope"),
])
def test_bad_options_are_one_line_and_change_nothing(method, options, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        nbpeft.attach(model, method, **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(("size", "factor", "pair"), [
    (16, -1, (4, 4)), (12, -1, (3, 4)), (127, -1, (1, 127)), (128, -1, (8, 16)), (128, 4, (4, 32)), (16, 8, (8, 2)),
    (16, 3, (2, 8)), (1, -1, (1, 1)),
])
def test_factor_pairs_split_sizes_as_the_reference_does(size, factor, pair):
    assert factor_pair(size, factor) == pair


@pytest.mark.parametrize(("options", "factors"), [
    ({}, {"lokr_w1": (4, 4), "lokr_w2": (4, 4)}),  # r=8 is not below half of 4: both whole
    ({"r": 1}, {"lokr_w1": (4, 4), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}),
    ({"r": 1, "decompose_both": True}, {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}),
    ({"r": 1, "decompose_factor": 2}, {"lokr_w1": (2, 2), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}),
])
def test_lokr_factors_are_whole_or_low_rank_as_the_reference_chooses(options, factors):
    model = tiny_model("llama")
    nbpeft.attach(model, "lokr", targets=["q_proj"], **options)  # q_proj: 16 x 16
    params = model.model.layers[0].self_attn.q_proj.adapter_parameters("default")
    assert {k: tuple(v.shape) for k, v in params.items()} == factors
    zero = [k for k, v in params.items() if not v.any()]
    assert zero == [next(k for k in ("lokr_w1", "lokr_w1_a") if k in params)]


def test_lokr_lycoris_init_zeroes_w2_and_keeps_the_outputs():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    base = outputs(model, batch)
    nbpeft.attach(model, "lokr", r=1, init_weights="lycoris")
    params = model.model.layers[0].self_attn.q_proj.adapter_parameters("default")
    assert [k for k, v in params.items() if not v.any()] == ["lokr_w2_b"]
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="use True, False or 'lycoris'"):
        nbpeft.attach(model, "lokr", name="other", init_weights="nope")


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_detach_after_bf16_training_are_exact(method):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    before = snapshot(model)
    nbpeft.attach(model, method, targets="all-linear", init_weights=False)
    nbpeft.train(model, [batch] * 2, steps=2, lr=1e-2, precision="bf16", warmup=0, live=False, compile=False)
    adapted = outputs(model, batch)
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_model_keeps_fp32_factors_and_bf16_outputs(method):
    model, batch = tiny_model("llama").to(torch.bfloat16), tiny_batch("llama")
    base = outputs(model, batch)
    nbpeft.attach(model, method)
    assert all(p.dtype == torch.float32 for p in nbpeft.core.adapter_parameters(model, "default").values())
    out = outputs(model, batch)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    randomised(model)
    assert not torch.equal(outputs(model, batch), base)


@pytest.mark.parametrize("method", [*METHODS, "ln_tuning"])
def test_a_merged_export_loads_in_transformers_with_the_same_logits(method, tmp_path):
    import transformers

    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, method)
    randomised(model)
    adapted = outputs(model, batch)
    nbpeft.export(model, tmp_path, format="merged", tokenizer=char_tokenizer())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(plain, batch), adapted, rtol=1e-5, atol=1e-5)
