"""Bottleneck adapters (Houlsby / Pfeiffer): placement, identity at attach, counts, training, io."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.methods.adapter import BottleneckAdapter

from conftest import assert_same, logits, snapshot, tiny_bert, tiny_gpt2, tiny_llama

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

# Expected insertion points per architecture and config, for layer i of the tiny models.
PLACES = {
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("llama", "pfeiffer"): ["model.layers.{i}.mlp.down_proj"],
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["transformer.h.{i}.mlp.c_proj"],
    ("bert", "houlsby"): ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
    ("bert", "pfeiffer"): ["bert.encoder.layer.{i}.output.dense"],
}


def per_point(hidden: int, bottleneck: int) -> int:
    """Down (h·b + b) plus up (b·h + h)."""
    return 2 * hidden * bottleneck + bottleneck + hidden


def perturb(model: torch.nn.Module, name: str, seed: int = 1) -> None:
    """Give an adapter non-zero weights, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in nbpeft.core.adapter_parameters(model, name).values():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("config", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("arch", list(MAKERS))
def test_default_places_and_exact_identity_at_attach(arch, config):
    model = MAKERS[arch]()
    before = logits(model)
    adapter = nbpeft.attach(model, "adapter", config=config, bottleneck=8)
    assert adapter.targets == [p.format(i=i) for i in range(2) for p in PLACES[arch, config]]
    assert all(isinstance(model.get_submodule(p), BottleneckAdapter) for p in adapter.targets)
    assert torch.equal(logits(model), before)
    text = repr(adapter)
    assert f"adapter on {len(adapter.targets)} modules" in text and config in text
    assert "after " + ", ".join(p.split("{i}.")[1] for p in PLACES[arch, config]) in text


@pytest.mark.parametrize("arch", list(MAKERS))
def test_trainable_count_matches_the_formula(arch):
    model = MAKERS[arch]()
    head = 32 * 2 + 2 if arch == "bert" else 0  # the classifier head trains with the adapter
    houlsby = nbpeft.attach(model, "adapter", name="h", config="houlsby", reduction_factor=4)
    assert houlsby.num_params == 4 * per_point(32, 8) + head
    pfeiffer = nbpeft.attach(model, "adapter", name="p", bottleneck=5)
    assert pfeiffer.num_params == 2 * per_point(32, 5) + head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == pfeiffer.num_params


def test_default_bottleneck_is_hidden_over_16(llama):
    adapter = nbpeft.attach(llama, "adapter")
    layer = llama.get_submodule(adapter.targets[0])
    assert layer.adapter_down["default"].out_features == 2
    assert "bottleneck 2 (relu)" in repr(adapter)


def test_up_projection_starts_at_zero_and_down_does_not(llama):
    nbpeft.attach(llama, "adapter")
    layer = llama.model.layers[0].mlp.down_proj
    assert not layer.adapter_up["default"].weight.any() and not layer.adapter_up["default"].bias.any()
    assert layer.adapter_down["default"].weight.abs().sum() > 0


def test_forward_applies_down_activation_up_and_skip(llama):
    nbpeft.attach(llama, "adapter", bottleneck=4, activation="tanh")
    perturb(llama, "default")
    layer = llama.model.layers[1].mlp.down_proj
    x = torch.randn(2, 3, 64)
    y = layer.base_layer(x)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    expected = y + torch.tanh(y @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected)


def test_two_active_adapters_apply_one_after_the_other(llama):
    nbpeft.attach(llama, "adapter", name="a", bottleneck=4)
    nbpeft.attach(llama, "adapter", name="b", bottleneck=4, activation="gelu")
    perturb(llama, "a", seed=1)
    perturb(llama, "b", seed=2)
    nbpeft.set_adapter(llama, ["a", "b"])
    layer = llama.model.layers[0].mlp.down_proj
    x = torch.randn(1, 4, 64)
    y = layer.base_layer(x)
    y = y + layer.bottleneck_output("a", y)
    torch.testing.assert_close(layer(x), y + layer.bottleneck_output("b", y))


def test_training_changes_only_the_adapter_and_detach_restores_everything(llama):
    before = snapshot(llama)
    reference = logits(llama)
    nbpeft.attach(llama, "adapter", config="houlsby", bottleneck=8)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down." in n or ".adapter_up." in n for n in trainable)
    opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 8))
        llama(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(logits(llama), reference)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_train_layernorms_trains_private_copies_and_detach_restores(gpt2):
    before = snapshot(gpt2)
    reference = logits(gpt2)
    adapter = nbpeft.attach(gpt2, "adapter", bottleneck=4, train_layernorms=True)
    norms = 2 * 2 + 1  # ln_1, ln_2 per block, ln_f
    assert adapter.num_params == 2 * per_point(32, 4) + norms * 2 * 32
    assert f"own copies of {norms} layer norms" in repr(adapter)
    assert torch.equal(logits(gpt2), reference)
    opt = torch.optim.SGD([p for p in gpt2.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 128, (2, 8))
    gpt2(ids, labels=ids).loss.backward()
    opt.step()
    ln = gpt2.transformer.ln_f
    assert not torch.equal(ln.modules_to_save["default"].weight, ln.base_layer.weight)
    assert torch.equal(ln.base_layer.weight, before["weights"]["transformer.ln_f.weight"])
    nbpeft.detach(gpt2)
    assert_same(before, snapshot(gpt2))


def test_disable_adapters_gives_the_base_output(bert):
    reference = logits(bert)
    nbpeft.attach(bert, "adapter", config="houlsby", bottleneck=4)
    perturb(bert, "default")
    assert not torch.allclose(logits(bert), reference)
    with nbpeft.disable_adapters(bert):
        # The classifier copy equals the original until trained; the adapters are off.
        assert torch.equal(logits(bert), reference)


def test_merge_is_refused_with_one_line_and_changes_nothing(llama):
    nbpeft.attach(llama, "adapter", bottleneck=4)
    perturb(llama, "default")
    before, out = snapshot(llama), logits(llama)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged") as err:
        nbpeft.merge(llama)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert torch.equal(logits(llama), out) and not nbpeft.core.state(llama).adapters["default"].merged


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bottleneck": 8, "reduction_factor": 4}, "not both"),
        ({"bottleneck": 0}, "bottleneck=0 must be a positive integer"),
        ({"reduction_factor": 0}, "reduction_factor=0 must be positive"),
        ({"reduction_factor": 64}, "leaves no bottleneck for hidden size 32"),
        ({"activation": "swish"}, "activation='swish' is not allowed"),
        ({"config": "lora"}, "config='lora' is not allowed; use one of 'houlsby', 'pfeiffer'"),
        ({"bottleneck": 4.5}, "bottleneck=4.5 has the wrong type"),
        ({"adapter_size": 8}, "did you mean 'bottleneck'"),
        ({"targets": ["o_prj"]}, "did you mean 'o_proj'"),
        ({"targets": ["input_layernorm"]}, "cannot adapt"),
        ({"targets": []}, "targets=[] is empty"),
        ({"modules_to_save": ["nothing"]}, "not found"),
    ],
)
def test_bad_options_are_one_line_and_leave_the_model_untouched(llama, options, message):
    nbpeft.attach(llama, "lora", name="keep")
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError) as err:
        nbpeft.attach(llama, "adapter", **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert list(nbpeft.core.state(llama).adapters) == ["keep"]


def test_unknown_architecture_asks_for_targets():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(nbpeft.ConfigError, match="no default insertion points.*pass targets"):
        nbpeft.attach(model, "adapter")
    adapter = nbpeft.attach(model, "adapter", targets=["0", "2"], bottleneck=2)
    assert adapter.num_params == 2 * per_point(8, 2) and "custom places" in repr(adapter)


def test_bf16_base_keeps_fp32_adapters_and_exact_identity():
    model = tiny_llama().to(torch.bfloat16)
    reference = logits(model)
    nbpeft.attach(model, "adapter", config="houlsby", bottleneck=4)
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)


@pytest.mark.parametrize("arch", list(MAKERS))
def test_save_then_load_into_a_fresh_model_gives_equal_outputs(arch, tmp_path):
    model = MAKERS[arch]()
    nbpeft.attach(model, "adapter", name="task", config="houlsby", bottleneck=6, activation="gelu",
                  train_layernorms=(arch == "llama"))
    perturb(model, "task")
    expected = logits(model)
    (folder,) = nbpeft.save_adapter(model, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["config"] == "houlsby"
    assert config["bottleneck"] == 6 and config["activation"] == "gelu"
    keys = load_file(str(folder / "adapter_model.safetensors"))
    first = PLACES[arch, "houlsby"][0].format(i=0)
    assert f"base_model.model.{first}.adapter_down.weight" in keys
    assert keys[f"base_model.model.{first}.adapter_up.weight"].shape == (32, 6)

    fresh = MAKERS[arch]()
    assert not torch.allclose(logits(fresh), expected)
    (loaded,) = nbpeft.load_adapter(fresh, tmp_path)
    assert loaded.name == "task" and loaded.num_params == nbpeft.core.state(model).adapters["task"].num_params
    assert torch.equal(logits(fresh), expected)


def test_lora_and_adapter_coexist_on_the_same_module(llama, tmp_path):
    before = snapshot(llama)
    reference = logits(llama)
    nbpeft.attach(llama, "lora", name="low", targets=["o_proj"], init="random")
    nbpeft.attach(llama, "adapter", name="bn", config="houlsby", bottleneck=4)
    perturb(llama, "bn")
    # The adapter sits right on the frozen layer whatever the attach order: y = Wx + sBAx + f(Wx).
    o_proj = llama.model.layers[0].self_attn.o_proj
    assert type(o_proj).__name__ == "LoRALinear" and isinstance(o_proj.base_layer, BottleneckAdapter)
    assert isinstance(o_proj.base_layer.base_layer, torch.nn.Linear)
    nbpeft.set_adapter(llama, ["low", "bn"])
    x = torch.randn(1, 3, 32)
    wx = o_proj.base_layer.base_layer(x)
    lora = o_proj.lora_B["low"](o_proj.lora_A["low"](x)) * o_proj.scaling["low"]
    torch.testing.assert_close(o_proj(x), wx + lora + o_proj.base_layer.bottleneck_output("bn", wx))
    both = logits(llama)
    nbpeft.set_adapter(llama, "low")
    only_lora = logits(llama)
    nbpeft.set_adapter(llama, "bn")
    only_adapter = logits(llama)
    assert not torch.allclose(both, only_lora) and not torch.allclose(both, only_adapter)
    assert not torch.allclose(only_lora, reference)
    assert nbpeft.summary(llama).per_method == {"lora": 2 * 2 * 8 * 32, "adapter": 4 * per_point(32, 4)}

    # Folding LoRA into W would change what the adapter reads: refused, nothing changes.
    state = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged"):
        nbpeft.merge(llama, "low")
    assert_same(state, snapshot(llama))

    # Saved and loaded (the adapter folder loads first, so the order is reversed): same outputs.
    nbpeft.save_adapter(llama, tmp_path)
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)
    nbpeft.set_adapter(fresh, ["low", "bn"])
    assert isinstance(fresh.model.layers[1].self_attn.o_proj.base_layer, BottleneckAdapter)
    assert torch.equal(logits(fresh), both)

    nbpeft.detach(llama, "low")
    assert torch.equal(logits(llama), only_adapter)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_check_export_of_a_saved_folder_names_the_method(llama, tmp_path):
    nbpeft.attach(llama, "adapter")
    nbpeft.save_adapter(llama, tmp_path)
    for target in ("vllm", "llama.cpp", "peft"):
        lines = nbpeft.check_export(tmp_path, target)
        assert lines == nbpeft.check_export(llama, target) and len(lines) == 1 and "(adapter)" in lines[0]
    assert "the reference has no adapter format" in str(nbpeft.check_export(tmp_path, "peft"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "HRA"}))
    lines = nbpeft.check_export(tmp_path, "vllm")  # a method of another tool: no ability known
    assert len(lines) == 1 and "(hra): vLLM serves LoRA only" in lines[0]
    assert nbpeft.check_export(tmp_path, "peft") == []


def test_adapter_is_refused_on_a_module_with_a_merged_lora(llama):
    nbpeft.attach(llama, "lora", name="low", targets=["down_proj"])
    nbpeft.merge(llama, "low")
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="carries merged adapter.*unmerge them first"):
        nbpeft.attach(llama, "adapter")
    assert_same(before, snapshot(llama))


def test_registry_lists_the_adapter_options():
    info = next(m for m in nbpeft.methods() if m.name == "adapter")
    assert {"config", "bottleneck", "reduction_factor", "activation", "train_layernorms"} <= info.options.keys()
    assert info.options["activation"]["choices"] == ("relu", "gelu", "silu", "tanh")


def _text_batch(tokenizer, text: str) -> torch.Tensor:
    return tokenizer([text], return_tensors="pt").input_ids


def test_smollm2_pfeiffer_identity_count_training_and_detach(smol):
    model, tokenizer = smol
    before = snapshot(model)
    ids = _text_batch(tokenizer, "Adapters learn a small bottleneck beside a frozen model.")
    reference = logits(model, ids)
    adapter = nbpeft.attach(model, "adapter", bottleneck=64)
    assert adapter.num_params == 30 * per_point(576, 64) == 2_231_040
    assert adapter.targets[0] == "model.layers.0.mlp.down_proj" and len(adapter.targets) == 30
    assert torch.equal(logits(model, ids), reference)

    data = ["The adapter learns to finish this sentence about bottleneck layers."] * 8
    result = nbpeft.train(model, data, tokenizer=tokenizer, steps=4, batch_size=2, max_length=32, lr=1e-3, live=False)
    assert result.losses[-1] < result.losses[0]
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_smollm2_houlsby_count_and_save_load_round_trip(smol, tmp_path):
    model, tokenizer = smol
    ids = _text_batch(tokenizer, "Save and load a bottleneck adapter.")
    adapter = nbpeft.attach(model, "adapter", config="houlsby", reduction_factor=9, activation="silu")
    assert adapter.num_params == 60 * per_point(576, 64) == 4_462_080
    assert "o_proj ×30, down_proj ×30" in repr(adapter)
    perturb(model, "default")
    expected = logits(model, ids)
    nbpeft.save_adapter(model, tmp_path)
    nbpeft.detach(model)
    nbpeft.load_adapter(model, tmp_path)
    assert torch.equal(logits(model, ids), expected)
