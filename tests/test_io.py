"""save_adapter / load_adapter in the published PEFT checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nbpeft
from nbpeft.core import state

from conftest import assert_same, logits, snapshot, tiny_bert, tiny_gpt2, tiny_llama, tokens


def test_files_follow_the_reference_layout(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=4, alpha=8.0, init="random")
    nbpeft.save_adapter(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["fan_in_fan_out"] is False and config["use_dora"] is False and config["bias"] == "none"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = sorted(f.keys())
    # Without this prefix the reference loads nothing and silently runs the base model.
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert not any(".default." in k for k in keys)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_then_load_into_a_fresh_model_gives_equal_outputs(make, tmp_path):
    model = make()
    nbpeft.attach(model, "lora", r=4, init="random", targets="all-linear")
    nbpeft.save_adapter(model, tmp_path)
    fresh = make()
    [adapter] = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.name == "default" and adapter.num_params == state(model).adapters["default"].num_params
    assert torch.allclose(logits(fresh), logits(model))


def test_gpt2_file_says_fan_in_fan_out(gpt2, tmp_path):
    nbpeft.attach(gpt2, "lora")
    nbpeft.save_adapter(gpt2, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_classifier_head_is_saved_with_the_adapter(bert, tmp_path):
    nbpeft.attach(bert, "lora", init="random")
    with torch.no_grad():
        bert.classifier.modules_to_save["default"].weight.add_(1.0)
    nbpeft.save_adapter(bert, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in tensors and "base_model.model.classifier.bias" in tensors
    fresh = tiny_bert()
    nbpeft.load_adapter(fresh, tmp_path)
    assert torch.allclose(logits(fresh), logits(bert))


def test_several_adapters_go_to_subfolders(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=4, init="random")
    nbpeft.attach(llama, "lora", r=2, init="random", name="sql")
    written = nbpeft.save_adapter(llama, tmp_path)
    assert written == [tmp_path, tmp_path / "sql"]
    fresh = tiny_llama()
    loaded = nbpeft.load_adapter(fresh, tmp_path)
    assert [a.name for a in loaded] == ["default", "sql"]
    for name in ("default", "sql"):
        nbpeft.set_adapter(llama, name)
        nbpeft.set_adapter(fresh, name)
        assert torch.allclose(logits(fresh), logits(llama))
    other = tiny_llama()
    nbpeft.load_adapter(other, tmp_path, name="sql")
    assert list(state(other).adapters) == ["sql"]
    assert torch.allclose(logits(other), logits(llama))


def test_loads_a_file_written_the_reference_way(llama, tmp_path):
    """Keys and config as the reference writes them (including an adapter-name-free layout)."""
    torch.manual_seed(1)
    tensors = {}
    for i in range(2):
        for proj, out in (("q_proj", 32), ("v_proj", 16)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 32)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["v_proj", "q_proj"], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "revision": None,
        "auto_mapping": None, "megatron_config": None,
    }))
    ids = tokens()
    base = logits(llama, ids)
    nbpeft.load_adapter(llama, tmp_path)
    layer = llama.model.layers[1].self_attn.v_proj
    assert torch.equal(layer.lora_B["default"].weight, tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"])
    with torch.no_grad():
        x = torch.randn(1, 32)
        expected = layer.base_layer(x) + 2.0 * x @ tensors[
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].T @ tensors[
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].T
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert not torch.allclose(logits(llama, ids), base)


def test_mismatched_file_is_rejected_and_the_model_untouched(tmp_path):
    source = tiny_llama()
    nbpeft.attach(source, "lora", r=4)
    nbpeft.save_adapter(source, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(nbpeft.ConfigError, match=r"shape mismatches, e.g. model.layers.0.self_attn.q_proj.lora_A.weight: file \(4, 31\), model \(4, 32\)"):
        nbpeft.load_adapter(target, tmp_path)
    assert_same(before, snapshot(target))


def test_file_for_another_model_names_what_differs(tmp_path):
    source = tiny_llama()
    nbpeft.attach(source, "lora", targets=["k_proj"])
    nbpeft.save_adapter(source, tmp_path)
    target = tiny_gpt2()
    before = snapshot(target)
    with pytest.raises(nbpeft.ConfigError, match="no module matched"):
        nbpeft.load_adapter(target, tmp_path)
    assert_same(before, snapshot(target))


def test_missing_files_and_pickles_get_clear_errors(llama, tmp_path):
    with pytest.raises(nbpeft.ConfigError, match="no adapter_config.json"):
        nbpeft.load_adapter(llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(nbpeft.ConfigError, match="pickle file, which nbpeft does not load"):
        nbpeft.load_adapter(llama, tmp_path)
    assert not hasattr(llama, "_nbpeft")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA"}))
    with pytest.raises(nbpeft.ConfigError, match="holds a HRA adapter"):
        nbpeft.load_adapter(llama, tmp_path)


def test_save_without_adapter_says_what_to_do(llama, tmp_path):
    with pytest.raises(nbpeft.ConfigError, match="attach one first"):
        nbpeft.save_adapter(llama, tmp_path)


def test_loading_from_a_path_that_does_not_exist_says_so_in_one_line(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=2, init="random")  # something to hot-swap into
    before = snapshot(llama)
    for call in (lambda: nbpeft.load_adapter(llama, tmp_path / "no-such-folder"),
                 lambda: nbpeft.load_adapter(llama, tmp_path / "no-such-folder", hotswap=True)):
        with pytest.raises(nbpeft.ConfigError) as err:
            call()
        assert str(err.value) == (f"load_adapter(): {tmp_path / 'no-such-folder'} does not exist; "
                                  "give the path of a folder written by save_adapter()")
    assert_same(snapshot(llama), before)


def test_the_hidden_folder_of_an_unfinished_save_is_not_loaded(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=2, init="random")
    nbpeft.save_adapter(llama, tmp_path / "a")
    nbpeft.save_adapter(llama, tmp_path / "a" / ".b.99999999.partial")  # as a killed save of subfolder b leaves it
    fresh = tiny_llama()
    assert [a.name for a in nbpeft.load_adapter(fresh, tmp_path / "a")] == ["default"]
