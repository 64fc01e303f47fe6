"""attach / detach / merge / unmerge / set_adapter / disable_adapters with LoRA."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

import nbpeft
from nbpeft.core import state
from nbpeft.methods.lora import LoRALinear

from conftest import assert_same, logits, snapshot, tiny_bert, tiny_llama, tokens


def test_attach_freezes_the_base_and_trains_only_the_adapter(llama):
    adapter = nbpeft.attach(llama, "lora", r=4)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x (q_proj 32->32 + v_proj 32->16): r * (in + out) each
    assert adapter.num_params == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert adapter.targets == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert "q_proj ×2, v_proj ×2" in repr(adapter)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_outputs_are_identical_right_after_attach(make):
    model = make()
    ids = tokens()
    before = logits(model, ids)
    nbpeft.attach(model, "lora", r=8, targets="all-linear")
    assert torch.equal(logits(model, ids), before)


def test_gpt2_conv1d_is_adapted_and_merges(gpt2):
    ids = tokens()
    before = logits(gpt2, ids)
    adapter = nbpeft.attach(gpt2, "lora", r=4, init="random")
    assert adapter.targets == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    with_adapter = logits(gpt2, ids)
    assert not torch.allclose(with_adapter, before)
    nbpeft.merge(gpt2)
    assert torch.allclose(logits(gpt2, ids), with_adapter, atol=1e-5)
    nbpeft.unmerge(gpt2)
    assert torch.allclose(logits(gpt2, ids), with_adapter, atol=1e-5)


def test_merge_and_unmerge_agree_with_the_unmerged_forward(llama):
    ids = tokens()
    base_weights = {k: v.clone() for k, v in llama.state_dict().items()}
    nbpeft.attach(llama, "lora", r=4, init="random", targets="all-linear")
    unmerged = logits(llama, ids)
    nbpeft.merge(llama)
    assert state(llama).adapters["default"].merged
    assert torch.allclose(logits(llama, ids), unmerged, atol=1e-5)
    nbpeft.unmerge(llama)
    assert torch.allclose(logits(llama, ids), unmerged, atol=1e-6)
    nbpeft.detach(llama)
    for key, value in llama.state_dict().items():
        assert torch.allclose(value, base_weights[key], atol=1e-6), key


def test_merged_model_skips_the_adapter_math(llama):
    nbpeft.attach(llama, "lora", r=4, init="random")
    nbpeft.merge(llama)
    layer = llama.model.layers[0].self_attn.q_proj
    calls = []
    layer.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
    logits(llama)
    assert calls == []


def test_detach_restores_the_exact_original(llama):
    before = snapshot(llama)
    nbpeft.attach(llama, "lora", r=4, init="random", targets="all-linear")
    nbpeft.attach(llama, "lora", r=2, name="second")
    nbpeft.merge(llama, "default")
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))
    assert not hasattr(llama, "_nbpeft")


def test_detach_keeps_frozen_flags_the_user_had(llama):
    llama.model.embed_tokens.weight.requires_grad = False
    before = snapshot(llama)
    nbpeft.attach(llama, "lora")
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_detach_one_of_two_keeps_the_other(llama):
    ids = tokens()
    nbpeft.attach(llama, "lora", r=4, init="random", name="a")
    a_out = logits(llama, ids)
    nbpeft.attach(llama, "lora", r=2, init="random", name="b", targets=["k_proj"])
    nbpeft.detach(llama, "b")
    assert list(state(llama).adapters) == ["a"]
    assert torch.allclose(logits(llama, ids), a_out)
    assert not isinstance(llama.model.layers[0].self_attn.k_proj, LoRALinear)


def test_set_adapter_switches_and_disable_gives_the_base(llama):
    ids = tokens()
    base = logits(llama, ids)
    nbpeft.attach(llama, "lora", r=4, init="random", name="a")
    a_out = logits(llama, ids)
    nbpeft.attach(llama, "lora", r=4, init="random", name="b")
    assert state(llama).active == ["b"]  # a new adapter becomes the active one
    b_out = logits(llama, ids)
    assert not torch.allclose(a_out, b_out)
    nbpeft.set_adapter(llama, "a")
    assert torch.allclose(logits(llama, ids), a_out)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".a.weight") for n in trainable)
    with nbpeft.disable_adapters(llama):
        assert torch.equal(logits(llama, ids), base)
    assert torch.allclose(logits(llama, ids), a_out)


def test_disable_adapters_works_when_merged(llama):
    ids = tokens()
    base = logits(llama, ids)
    nbpeft.attach(llama, "lora", r=4, init="random")
    out = logits(llama, ids)
    nbpeft.merge(llama)
    with nbpeft.disable_adapters(llama):
        assert torch.allclose(logits(llama, ids), base, atol=1e-6)
    assert torch.allclose(logits(llama, ids), out, atol=1e-5)
    assert state(llama).adapters["default"].merged


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 8}, "lora: unknown option 'rank' (did you mean 'r'?)"),
        ({"r": "8"}, "lora: r='8' has the wrong type; expected int"),
        ({"r": 0}, "lora: r=0 must be a positive integer"),
        ({"alpha": -1.0}, "lora: alpha=-1.0 must be positive"),
        ({"dropout": 1.5}, "lora: dropout=1.5 must be in [0, 1)"),
        ({"init": "normal"}, "lora: init='normal' is not allowed"),
        ({"targets": ["qproj"]}, "no module matched targets=['qproj']; did you mean 'q_proj'"),
        ({"targets": "layers\\.9\\..*"}, "matched no module"),
        ({"targets": ["input_layernorm"]}, "input_layernorm"),
        ({"modules_to_save": ["headz"]}, "modules_to_save=['headz'] not found"),
    ],
)
def test_bad_options_are_rejected_and_the_model_is_untouched(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError) as err:
        nbpeft.attach(llama, "lora", **options)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert not hasattr(llama, "_nbpeft")


def test_a_failure_midway_rolls_back_every_wrapped_module(llama, monkeypatch):
    before = snapshot(llama)
    calls = []
    original = LoRALinear.add

    def flaky_add(self, name, config):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        original(self, name, config)

    monkeypatch.setattr(LoRALinear, "add", flaky_add)
    with pytest.raises(RuntimeError):
        nbpeft.attach(llama, "lora", targets="all-linear")
    assert_same(before, snapshot(llama))


def test_second_attach_failure_keeps_the_first_adapter(llama):
    nbpeft.attach(llama, "lora", r=4, init="random")
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="already attached"):
        nbpeft.attach(llama, "lora")
    with pytest.raises(nbpeft.ConfigError, match="no module matched"):
        nbpeft.attach(llama, "lora", name="b", targets=["nope"])
    assert_same(before, snapshot(llama))
    assert list(state(llama).adapters) == ["default"]


def test_unknown_method_suggests_the_close_one(llama):
    with pytest.raises(nbpeft.ConfigError, match="did you mean 'lora'"):
        nbpeft.attach(llama, "lorra")


def test_all_linear_excludes_the_output_head(llama):
    adapter = nbpeft.attach(llama, "lora", targets="all-linear")
    assert not any(t.endswith("lm_head") for t in adapter.targets)
    assert len(adapter.targets) == 2 * 7


def test_regex_targets(llama):
    adapter = nbpeft.attach(llama, "lora", targets=r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert adapter.targets == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_rslora_scales_by_sqrt_r(llama):
    nbpeft.attach(llama, "lora", r=16, alpha=8.0, rslora=True)
    assert llama.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8.0 / math.sqrt(16))


def test_classifier_head_trains_with_the_adapter(bert):
    adapter = nbpeft.attach(bert, "lora")
    assert adapter.saved_modules == ["classifier"]
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert not bert.classifier.base_layer.weight.requires_grad


def test_plain_torch_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before = model(x).detach()
    adapter = nbpeft.attach(model, "lora", r=2, targets=["0", "2"])
    assert adapter.num_params == 2 * (8 + 16) + 2 * (16 + 4)
    assert torch.equal(model(x), before)


def test_lora_in_bf16_keeps_fp32_adapters():
    model = tiny_llama().to(torch.bfloat16)
    nbpeft.attach(model, "lora", r=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(tokens()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B["default"].weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_on_cuda_fp16():
    model = tiny_llama().cuda().half()
    before = logits(model, tokens().cuda())
    nbpeft.attach(model, "lora", r=4)
    assert torch.equal(logits(model, tokens().cuda()), before)


def test_qwen_3b_count_matches_the_published_figure():
    """3,686,400 trainable parameters for Qwen2.5-3B, r=16 on q_proj and v_proj."""
    config = transformers.Qwen2Config(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    adapter = nbpeft.attach(model, "lora", r=16, targets=["q_proj", "v_proj"])
    assert adapter.num_params == 3_686_400


def test_methods_registry_lists_lora_with_its_options():
    info = {m.name: m for m in nbpeft.methods()}["lora"]
    assert info.options["r"]["default"] == 8
    assert info.options["init"]["choices"] == ("default", "gaussian", "random", "pissa", "olora", "loftq")
    assert info.description


def test_summary_counts(llama):
    total = sum(p.numel() for p in llama.parameters())
    text = repr(nbpeft.summary(llama))
    assert "no adapters attached" in text
    nbpeft.attach(llama, "lora", r=4, name="a")
    nbpeft.attach(llama, "lora", r=2, name="b", targets=["k_proj"])
    s = nbpeft.summary(llama)
    assert s.base == total
    a = 2 * (4 * 64 + 4 * 48)
    b = 2 * (2 * 32 + 2 * 16)
    assert {r.name: r.params for r in s.adapters} == {"a": a, "b": b}
    assert s.trainable == b and s.total == total + a + b
    assert s.per_method == {"lora": a + b}
    html = s._repr_html_()
    assert "<table>" in html and f"{a:,}" in html
    assert f"{b:,} trainable" in repr(s)


def test_attach_summary_and_compare_count_one_total_with_three_adapters(llama):
    base = sum(p.numel() for p in llama.parameters())
    shown = [nbpeft.attach(llama, "lora", r=r, name=n) for n, r in (("a", 2), ("b", 4), ("c", 8))]
    counts = nbpeft.core.parameter_counts(llama)
    sizes = [a.num_params for a in shown]
    assert counts.base == base and counts.total == base + sum(sizes) and counts.trainable == sizes[-1]  # c is active
    s = nbpeft.summary(llama)
    assert (s.total, s.trainable, s.trainable_pct) == (counts.total, counts.trainable, counts.trainable_pct)
    # the last attach line and the summary say the same total and share
    assert f"({counts.trainable_pct:.3f}% of {counts.total:,})" in repr(shown[-1])
    assert f"{counts.total:,} parameters, {counts.trainable:,} trainable ({counts.trainable_pct:.3f}%)" in repr(s)
    # each attach line counted the adapters attached so far
    assert [a.total_params for a in shown] == [base + sum(sizes[:i + 1]) for i in range(3)]
    nbpeft.set_adapter(llama, "a")
    assert nbpeft.summary(llama).trainable == sizes[0] and nbpeft.summary(llama).total == counts.total
    table = nbpeft.compare(llama, methods=["lora"], lora={"r": 8})
    assert table.total == base and table.rows[0]["percent"] == pytest.approx(100 * sizes[-1] / (base + sizes[-1]))


@pytest.mark.parametrize("first", ["ia3", "bitfit"])
def test_lora_over_another_methods_layer(llama, first):
    before = snapshot(llama)
    nbpeft.attach(llama, first, name="x")
    nbpeft.attach(llama, "lora", name="y", init="random", targets=["v_proj", "k_proj"])
    nbpeft.set_adapter(llama, ["x", "y"])
    out = logits(llama)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged: LoRA over another adapter's layer"):
        nbpeft.merge(llama, "y")
    assert not state(llama).adapters["y"].merged
    assert torch.equal(logits(llama), out)  # nothing stayed half-merged
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_several_active_loras_run_as_one_with_the_same_outputs_and_gradients(llama, monkeypatch):
    """Active adapters are stacked into one rank-sum(r) update; it must equal one-by-one."""
    nbpeft.attach(llama, "lora", name="a", r=2, alpha=4, init="random", targets=["q_proj", "v_proj"])
    nbpeft.attach(llama, "lora", name="b", r=4, alpha=4, init="random", targets=["v_proj"])
    nbpeft.set_adapter(llama, ["a", "b"])
    llama.train()  # dropout 0: stacking stays on in training

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in llama.parameters():
            p.grad = None
        out = llama(input_ids=tokens()).logits
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in llama.parameters() if p.requires_grad]

    calls = []
    real = LoRALinear._stackable
    monkeypatch.setattr(LoRALinear, "_stackable", lambda self, names: calls.append(len(names)) or real(self, names))
    stacked, stacked_grads = run()
    assert calls and set(calls) == {2}  # v_proj holds both adapters
    monkeypatch.setattr(LoRALinear, "_stackable", lambda self, names: False)
    plain, plain_grads = run()
    torch.testing.assert_close(stacked, plain, rtol=1e-5, atol=1e-6)
    assert len(stacked_grads) == len(plain_grads) == 2 * 2 * 2 + 2 * 2  # a: (q, v) x 2 layers x (A, B); b: v x 2 x (A, B)
    for got, want in zip(stacked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_replace_puts_a_fresh_adapter_in_place_and_a_bad_one_changes_nothing(llama):
    """Re-running an attach cell: refused in one line that says how, or replaced when asked."""
    bare = snapshot(llama)
    nbpeft.attach(llama, "lora", r=4, init="random")
    with pytest.raises(nbpeft.ConfigError, match=r"already attached; pick another name= or detach it first \(replace=True puts a fresh one"):
        nbpeft.attach(llama, "lora", r=4)
    attached = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError):
        nbpeft.attach(llama, "lora", replace=True, targets=["nope"])  # the new one's options fail: the old stays
    assert_same(attached, snapshot(llama))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules())
    adapter = nbpeft.attach(llama, "lora", r=8, replace=True)
    assert list(state(llama).adapters) == ["default"] and adapter.config.r == 8
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules()) == hooks
    nbpeft.detach(llama)
    assert_same(bare, snapshot(llama))
