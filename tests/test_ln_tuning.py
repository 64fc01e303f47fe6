"""LN tuning: each adapter trains its own copy of the norm layers' parameters; the originals stay exact.

Parity with the reference itself (files both ways, equal logits) is checked by ``make compat``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.errors import ConfigError
from nbpeft.formats.export import check_export, merged_state_dict, to_lora

from conftest import assert_same, snapshot
from families import outputs, tiny_batch, tiny_model


def trained(model, name: str = "default") -> None:
    """Move every copy away from the norm's values, as training would."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in nbpeft.core.adapter_parameters(model, name).values():
            param.add_(torch.randn_like(param) * 0.3)


def test_every_norm_layer_is_tuned_by_default_and_nothing_else_trains():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    base = outputs(model, batch)
    adapter = nbpeft.attach(model, "ln_tuning")
    norms = [p for p, m in model.named_modules() if type(m).__name__ == "LayerNorm" and "ln_tuning" not in p]
    assert sorted(adapter.targets) == sorted(p.removesuffix(".base_layer") for p in norms)
    assert len(adapter.targets) == 3  # embeddings, attention output, feed-forward output
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ln_tuning_layers.default." in n or n.startswith("classifier.") for n in trainable)


def test_training_changes_the_copies_only(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    before = snapshot(model)
    nbpeft.attach(model, "ln_tuning")
    result = nbpeft.train(model, [batch] * 10, steps=10, lr=5e-2, warmup=0, live=False, compile=False)
    assert result.losses[-1] < result.losses[0]
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("family", ["bert", "gemma2"])  # LayerNorm with a bias; Gemma's RMSNorm scales by 1 + w
def test_merge_unmerge_and_detach_are_exact(family):
    model, batch = tiny_model(family), tiny_batch(family)
    before = snapshot(model)
    nbpeft.attach(model, "ln_tuning")
    trained(model)
    adapted = outputs(model, batch)
    assert (adapted - outputs(tiny_model(family), batch)).abs().max() > 1e-3
    merged, _ = merged_state_dict(model)
    norm = model.get_submodule(nbpeft.core.state(model).adapters["default"].targets[0])
    copy = norm.ln_tuning_layers["default"]
    path = nbpeft.core.state(model).adapters["default"].targets[0]
    torch.testing.assert_close(merged[f"{path}.weight"], copy.weight.detach())
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-6, atol=1e-6)
    nbpeft.unmerge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-6, atol=1e-6)
    nbpeft.merge(model)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_one_adapter_at_a_time_on_a_norm_layer():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    nbpeft.attach(model, "ln_tuning", name="a")
    nbpeft.attach(model, "ln_tuning", name="b")
    nbpeft.set_adapter(model, ["a", "b"])
    with pytest.raises(ConfigError, match="takes one at a time") as info:
        outputs(model, batch)
    assert "\n" not in str(info.value)
    nbpeft.set_adapter(model, "a")
    nbpeft.merge(model, "a")
    with pytest.raises(Exception, match="unmerge it first"):
        nbpeft.merge(model, "b")


def test_the_folder_is_in_the_reference_layout_and_loads_back(tmp_path):
    model, batch = tiny_model("bert"), tiny_batch("bert")
    nbpeft.attach(model, "ln_tuning", exclude=["embeddings.LayerNorm"])
    trained(model)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING"
    assert config["target_modules"] == r"^(bert\.encoder\.layer\.0\.attention\.output\.LayerNorm|bert\.encoder\.layer\.0\.output\.LayerNorm)$"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.bert.encoder.layer.0.output.LayerNorm.ln_tuning_layers."
    assert {prefix + "weight", prefix + "bias"} <= keys and not any("embeddings" in k for k in keys)
    fresh = tiny_model("bert")
    (loaded,) = nbpeft.load_adapter(fresh, tmp_path)
    assert loaded.method == "ln_tuning" and len(loaded.targets) == 2
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=0, atol=0)


def test_serving_targets_take_it_merged_and_to_lora_says_why_not():
    model = tiny_model("llama")
    nbpeft.attach(model, "ln_tuning")
    assert [line.split(": ", 2)[2] for line in check_export(model, "vllm")] == ["vLLM serves LoRA only; export format='merged'"]
    assert [line.split(": ", 2)[2] for line in check_export(model, "llama.cpp")] == [
        "GGUF adapters are LoRA only; export format='gguf' (merged)"]
    assert not check_export(model, "peft")
    with pytest.raises(ConfigError, match="is not a weight delta") as info:
        to_lora(model, rank=4)
    assert "\n" not in str(info.value)


def test_a_bf16_model_keeps_fp32_copies_and_bf16_outputs():
    model, batch = tiny_model("llama").to(torch.bfloat16), tiny_batch("llama")
    base = outputs(model, batch)
    nbpeft.attach(model, "ln_tuning")
    copies = nbpeft.core.adapter_parameters(model, "default")
    assert all(p.dtype == torch.float32 for p in copies.values())
    out = outputs(model, batch)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)


@pytest.mark.parametrize(("options", "message"), [
    ({"targets": ["q_proj"]}, "q_proj"),
    ({"targets": []}, "targets=[] is empty"),
    ({"target_modules": ["norm"]}, "did you mean 'targets'"),
])
def test_bad_options_are_one_line_and_change_nothing(options, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        nbpeft.attach(model, "ln_tuning", **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert_same(before, snapshot(model))
