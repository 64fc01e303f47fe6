"""AdapterFusion: validation, what holds at attach, counts, frozen adapters, io, two-stage training."""

from __future__ import annotations

import json

import pytest
import torch

import nbpeft
from nbpeft.methods.adapter import BottleneckAdapter

from conftest import assert_same, logits, snapshot, tiny_bert, tiny_gpt2, tiny_llama

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def perturb(model: torch.nn.Module, name: str, seed: int, heads: bool = True) -> None:
    """Give an adapter (and, with ``heads``, its classifier copy) non-zero weights, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in nbpeft.core.adapter_parameters(model, name).items():
            if heads or ".adapter_" in key:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def two_adapters(model: torch.nn.Module, config: str = "pfeiffer") -> None:
    """Adapters 'a' and 'b' with different, non-zero weights (as if trained on two tasks)."""
    nbpeft.attach(model, "adapter", name="a", config=config, bottleneck=4)
    nbpeft.attach(model, "adapter", name="b", config=config, bottleneck=6, activation="gelu")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)


def params_of(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in nbpeft.core.adapter_parameters(model, name).items()}


def check_mean_at_attach(layer: BottleneckAdapter, x: torch.Tensor, names: list[str]) -> None:
    """At attach every token weighs the adapters equally: y' = y + mean_n z_n."""
    y = layer.base_layer(x)
    updates = [layer.bottleneck_output(n, y) for n in names]
    torch.testing.assert_close(layer(x), y + sum(updates) / len(updates), rtol=0, atol=1e-6)
    weights = layer.adapter_fusion["fused"].weights(y, torch.stack(updates, dim=-2))
    assert torch.equal(weights, torch.full_like(weights, 1 / len(names)))


@pytest.mark.parametrize("arch", list(MAKERS))
def test_fusion_at_attach_is_the_mean_of_the_adapters(arch):
    model = MAKERS[arch]()
    two_adapters(model, "houlsby")
    fusion = nbpeft.attach(model, "fusion", name="fused", adapters=["a", "b"])
    assert fusion.targets == nbpeft.core.state(model).adapters["a"].targets and len(fusion.targets) == 4
    for path in fusion.targets:
        layer = model.get_submodule(path)
        check_mean_at_attach(layer, torch.randn(2, 3, layer.in_features), ["a", "b"])


@pytest.mark.parametrize("arch", list(MAKERS))
def test_fusing_two_copies_of_an_adapter_equals_that_adapter(arch, tmp_path):
    model = MAKERS[arch]()
    nbpeft.attach(model, "adapter", name="a", config="houlsby", bottleneck=4)
    perturb(model, "a", seed=3, heads=False)  # a fusion trains its own head, from the original one
    only_a = logits(model)
    nbpeft.save_adapter(model, tmp_path, "a")
    nbpeft.load_adapter(model, tmp_path / "a", "a2")
    nbpeft.attach(model, "fusion", name="fused", adapters=["a", "a2"])
    assert torch.equal(logits(model), only_a)


def test_fusion_of_untrained_adapters_is_exactly_the_base_model(gpt2):
    reference = logits(gpt2)
    nbpeft.attach(gpt2, "adapter", name="a")
    nbpeft.attach(gpt2, "adapter", name="b")
    nbpeft.attach(gpt2, "fusion", adapters=["a", "b"])
    assert torch.equal(logits(gpt2), reference)


def test_fusion_initialisation(llama):
    two_adapters(llama)
    nbpeft.attach(llama, "fusion", name="fused", adapters=["a", "b"])
    fusion = llama.model.layers[0].mlp.down_proj.adapter_fusion["fused"]
    assert not fusion.query.weight.any() and not fusion.query.bias.any()
    assert torch.equal(fusion.value.weight, torch.eye(32)) and not fusion.value.bias.any()
    assert fusion.key.weight.abs().sum() > 0


@pytest.mark.parametrize("value, per_point", [(True, 3 * (32 * 32 + 32)), (False, 2 * (32 * 32 + 32))])
def test_fusion_count_matches_the_formula(llama, value, per_point):
    two_adapters(llama, "houlsby")
    fusion = nbpeft.attach(llama, "fusion", adapters=["a", "b"], value=value)
    assert fusion.num_params == 4 * per_point
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in llama.parameters() if p.requires_grad) == 4 * per_point
    assert all(".adapter_fusion.default." in n for n in trainable)
    assert "attends over 'a', 'b' (kept frozen)" in repr(fusion)


def test_training_the_fusion_leaves_the_adapters_and_base_alone(llama):
    two_adapters(llama)
    base = {k: v.clone() for k, v in llama.state_dict().items() if "adapter_" not in k}
    a, b = params_of(llama, "a"), params_of(llama, "b")
    nbpeft.attach(llama, "fusion", name="fused", adapters=["a", "b"])
    start = params_of(llama, "fused")
    opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 8))
        llama(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(v, start[k]) for k, v in params_of(llama, "fused").items())
    for name, saved in (("a", a), ("b", b)):
        assert all(torch.equal(v, saved[k]) for k, v in params_of(llama, name).items())
    after = {k: v for k, v in llama.state_dict().items() if "adapter_" not in k}
    assert all(torch.equal(v, after[k]) for k, v in base.items())


def test_detach_fusion_keeps_the_adapters_and_detach_all_restores(bert):
    before = snapshot(bert)
    two_adapters(bert, "houlsby")
    nbpeft.set_adapter(bert, "a")
    only_a = logits(bert)
    nbpeft.attach(bert, "fusion", name="fused", adapters=["a", "b"])
    perturb(bert, "fused", seed=4)
    with pytest.raises(nbpeft.ConfigError, match="adapter 'a' is used by 'fused'; detach 'fused' first"):
        nbpeft.detach(bert, "a")
    assert list(nbpeft.core.state(bert).adapters) == ["a", "b", "fused"]
    nbpeft.detach(bert, "fused")
    assert list(nbpeft.core.state(bert).adapters) == ["a", "b"]
    nbpeft.set_adapter(bert, "a")
    assert torch.equal(logits(bert), only_a)
    nbpeft.attach(bert, "fusion", name="fused", adapters=["a", "b"])
    nbpeft.detach(bert, ["a", "b", "fused"])  # the fusion goes first, whatever the order given
    assert_same(before, snapshot(bert))


def test_detach_everything_with_a_fusion_restores_the_original(gpt2):
    before = snapshot(gpt2)
    two_adapters(gpt2, "houlsby")
    nbpeft.attach(gpt2, "fusion", name="fused", adapters=["a", "b"])
    nbpeft.detach(gpt2)
    assert_same(before, snapshot(gpt2))


def test_merge_is_refused(llama):
    two_adapters(llama)
    nbpeft.attach(llama, "fusion", adapters=["a", "b"])
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged"):
        nbpeft.merge(llama)
    assert_same(before, snapshot(llama))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"adapters": ["a"]}, "must name two or more attached adapters"),
        ({"adapters": []}, "must name two or more"),
        ({"adapters": ["a", "a"]}, "lists 'a' twice"),
        ({"adapters": ["a", "c"]}, "no adapter named 'c' on this model (attached: a, b, low, h, n); attach and train it"),
        ({"adapters": ["a", "low"]}, "'low' is a lora adapter; fusion combines method 'adapter' only"),
        ({"adapters": ["a", "h"]}, "'a' and 'h' sit at different modules"),
        ({"adapters": ["a", "n"]}, "'n' trains its own layer norms"),
        ({"adapters": "a,b"}, "adapters='a,b' has the wrong type"),
        ({"adapter_names": ["a", "b"]}, "did you mean 'adapters'"),
        ({"adapters": ["a", "b"], "value": "yes"}, "value='yes' has the wrong type"),
    ],
)
def test_bad_fusions_are_one_line_and_leave_the_model_untouched(llama, options, message):
    two_adapters(llama)
    nbpeft.attach(llama, "lora", name="low")
    nbpeft.attach(llama, "adapter", name="h", config="houlsby")
    nbpeft.attach(llama, "adapter", name="n", train_layernorms=True)
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError) as err:
        nbpeft.attach(llama, "fusion", **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert list(nbpeft.core.state(llama).adapters) == ["a", "b", "low", "h", "n"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adapter_and_fusion_on_cuda_fp16():
    model = tiny_llama().cuda().half()
    ids = torch.arange(12).reshape(2, 6).cuda()
    before = logits(model, ids)
    nbpeft.attach(model, "adapter", name="a", config="houlsby")
    nbpeft.attach(model, "adapter", name="b", config="houlsby")
    nbpeft.attach(model, "fusion", adapters=["a", "b"])
    layer = model.model.layers[0].mlp.down_proj
    assert layer.adapter_fusion["default"].query.weight.device.type == "cuda"
    assert layer.adapter_fusion["default"].query.weight.dtype == torch.float32
    assert torch.equal(logits(model, ids), before)


def test_fusion_needs_adapters_on_the_model(llama):
    with pytest.raises(nbpeft.ConfigError, match=r"no adapter named 'a' on this model \(attached: none\)"):
        nbpeft.attach(llama, "fusion", adapters=["a", "b"])


@pytest.mark.parametrize("arch", list(MAKERS))
def test_save_then_load_into_a_fresh_model_gives_equal_outputs(arch, tmp_path):
    model = MAKERS[arch]()
    two_adapters(model, "houlsby")
    nbpeft.attach(model, "fusion", name="fused", adapters=["a", "b"])
    perturb(model, "fused", seed=5)
    expected = logits(model)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTER_FUSION" and config["adapters"] == ["a", "b"]

    fresh = MAKERS[arch]()
    with pytest.raises(nbpeft.ConfigError, match="no adapter named 'a'"):
        nbpeft.load_adapter(fresh, tmp_path, "fused")
    assert getattr(fresh, "_nbpeft", None) is None
    loaded = nbpeft.load_adapter(fresh, tmp_path)  # a, b, then fused
    assert [a.name for a in loaded] == ["a", "b", "fused"]
    assert torch.equal(logits(fresh), expected)


def test_fusion_beside_a_lora_on_other_modules(llama):
    before = snapshot(llama)
    two_adapters(llama)
    nbpeft.attach(llama, "lora", name="low", init="random")
    nbpeft.attach(llama, "fusion", name="fused", adapters=["a", "b"])
    perturb(llama, "fused", seed=6)
    nbpeft.set_adapter(llama, "fused")
    fused = logits(llama)
    nbpeft.set_adapter(llama, ["low", "fused"])
    assert not torch.allclose(logits(llama), fused)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_two_stage_workflow_on_smollm2(smol):
    model, tokenizer = smol
    before = snapshot(model)
    kwargs = {"tokenizer": tokenizer, "batch_size": 2, "max_length": 32, "lr": 1e-3, "live": False}
    data_a = ["Translate to French: the cat is black. Le chat est noir."] * 8
    data_b = ["Q: What is two plus three? A: Two plus three is five."] * 8

    # Stage one: one adapter per task.
    nbpeft.attach(model, "adapter", name="a", bottleneck=32)
    first = nbpeft.train(model, data_a, steps=3, **kwargs)
    nbpeft.attach(model, "adapter", name="b", bottleneck=32)
    second = nbpeft.train(model, data_b, steps=3, **kwargs)
    assert first.losses[-1] < first.losses[0] and second.losses[-1] < second.losses[0]
    a, b = params_of(model, "a"), params_of(model, "b")
    ids = tokenizer(["Two plus three is five; le chat est noir."], return_tensors="pt").input_ids
    nbpeft.set_adapter(model, "a")
    only_a = logits(model, ids)

    # Stage two: the fusion learns to mix them; they stay frozen.
    fusion = nbpeft.attach(model, "fusion", name="fused", adapters=["a", "b"])
    assert fusion.num_params == 30 * 3 * (576 * 576 + 576)
    layer = model.model.layers[0].mlp.down_proj
    check_mean_at_attach(layer, torch.randn(1, 4, 1536), ["a", "b"])
    third = nbpeft.train(model, data_a[:4] + data_b[:4], steps=4, **kwargs)
    assert third.losses[-1] < third.losses[0]
    for name, saved in (("a", a), ("b", b)):
        assert all(torch.equal(v, saved[k]) for k, v in params_of(model, name).items())

    nbpeft.detach(model, "fused")
    nbpeft.set_adapter(model, "a")
    assert torch.equal(logits(model, ids), only_a)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))
