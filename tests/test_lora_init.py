"""LoRA initialisations from the base weight (PiSSA, OLoRA, LoftQ), their saving, and LoRA+."""

from __future__ import annotations

import json

import pytest
import torch

import nbpeft
from nbpeft import core
from nbpeft.errors import ConfigError
from nbpeft.layers import adapter_layers

from conftest import assert_same, logits, snapshot, tiny_gpt2, tiny_llama

REWEIGHTING = [{"init": "pissa"}, {"init": "pissa", "pissa_niter": 4}, {"init": "olora"}]
IDS = ["pissa", "pissa-fast", "olora"]


def train_a_little(model: torch.nn.Module) -> None:
    """Move every adapter tensor as a few training steps would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in core.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("options", REWEIGHTING, ids=IDS)
def test_output_unchanged_at_attach_and_detach_restores_the_base_exactly(make, options):
    model = make()
    before, expected = snapshot(model), logits(model)
    nbpeft.attach(model, "lora", r=4, targets="all-linear", **options)
    changed = [k for k, v in model.state_dict().items() if "base_layer.weight" in k
               and not torch.equal(v, before["weights"][k.replace(".base_layer", "")])]
    assert changed  # the base holds the residual now
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    nbpeft.merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_dora_over_a_pissa_residual_keeps_the_output_and_detaches_exactly(llama):
    before, expected = snapshot(llama), logits(llama)
    nbpeft.attach(llama, "dora", r=4, targets="all-linear", init="pissa")
    torch.testing.assert_close(logits(llama), expected, atol=1e-5, rtol=0)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_pissa_moves_the_top_singular_triplets_into_the_adapter(llama):
    weight = llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    nbpeft.attach(llama, "lora", r=4, alpha=8, targets=["q_proj"], init="pissa")
    layer = llama.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    U, S, Vh = torch.linalg.svd(weight)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(2.0 * B @ A, top, atol=1e-5, rtol=0)  # scale alpha / r = 2
    torch.testing.assert_close(layer.base_layer.weight, weight - top, atol=1e-5, rtol=0)
    # on a weight with a clear top-4 subspace the fast SVD finds it
    fast = tiny_llama()
    torch.manual_seed(2)
    low_rank = torch.randn(32, 4) @ torch.randn(4, 32) + 1e-4 * torch.randn(32, 32)
    fast.model.layers[0].self_attn.q_proj.weight.data.copy_(low_rank)
    U, S, Vh = torch.linalg.svd(low_rank)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    nbpeft.attach(fast, "lora", r=4, alpha=8, targets=["q_proj"], init="pissa_niter_8")  # the reference's spelling
    assert core.state(fast).adapters["default"].config.pissa_niter == 8
    fast_layer = fast.model.layers[0].self_attn.q_proj
    assert (2.0 * fast_layer.lora_B["default"].weight @ fast_layer.lora_A["default"].weight - top).abs().max() < 1e-4


def test_olora_b_has_orthonormal_columns(llama):
    nbpeft.attach(llama, "lora", r=4, targets=["v_proj"], init="olora")
    B = llama.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", REWEIGHTING, ids=IDS)
def test_saved_adapter_loads_on_a_fresh_model_with_equal_outputs(tmp_path, options):
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, targets="all-linear", **options)
    train_a_little(model)
    expected = logits(model)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == {"olora": "olora"}.get(options["init"], "pissa_niter_4" if "pissa_niter" in options
                                                                   else "pissa")
    fresh = tiny_llama()
    before = snapshot(fresh)
    nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=0)
    nbpeft.detach(fresh)
    assert_same(before, snapshot(fresh))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_plain_lora_conversion_gives_the_same_outputs_on_the_original_base(tmp_path, make, rslora):
    model = make()
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="pissa", rslora=rslora)
    train_a_little(model)
    expected = logits(model)
    nbpeft.save_adapter(model, tmp_path, as_plain_lora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    fresh = make()
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    nbpeft.load_adapter(fresh, tmp_path)
    weights = {k.replace(".base_layer", ""): v for k, v in fresh.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(weights[k], v) for k, v in original.items())  # a plain LoRA: the base is untouched
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=0)


def test_plain_lora_conversion_refuses_an_adapter_that_is_plain_already(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=4)
    with pytest.raises(ConfigError, match="as_plain_lora=True converts a lora adapter with init='pissa'"):
        nbpeft.save_adapter(llama, tmp_path, as_plain_lora=True)
    assert not list(tmp_path.iterdir())


def test_a_second_reweighting_init_on_the_same_layer_is_refused_and_changes_nothing(llama):
    nbpeft.attach(llama, "lora", r=4, init="pissa", name="first")
    before = snapshot(llama)
    with pytest.raises(ConfigError, match="adapter 'first' already changed it"):
        nbpeft.attach(llama, "lora", r=4, init="olora", name="second")
    assert_same(before, snapshot(llama))
    nbpeft.attach(llama, "lora", r=4, name="plain")  # a default init beside it is fine


def test_removing_the_pissa_adapter_keeps_other_adapters_on_the_original_base():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, init="random", name="plain")
    with_plain = logits(model)
    nbpeft.attach(model, "lora", r=4, init="pissa", name="pissa")
    nbpeft.set_adapter(model, "plain")  # the residual base plus the plain adapter alone differs ...
    nbpeft.detach(model, "pissa")
    torch.testing.assert_close(logits(model), with_plain, atol=0, rtol=0)  # ... until the base comes back


def test_loftq_only_with_qlora(llama):
    with pytest.raises(ConfigError, match="init='loftq' needs a 4-bit base; attach 'qlora'"):
        nbpeft.attach(llama, "lora", init="loftq")
    with pytest.raises(ConfigError, match="keep_original='cpu' or 'disk'"):
        nbpeft.attach(llama, "qlora", init="loftq", keep_original="none")


def quantisation_error(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> float:
    """||W - (deq(Q) + s·B A)|| summed over the qlora layers."""
    total = 0.0
    for path, layer in adapter_layers(model):
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        total += (originals[path] - (layer.base_layer.dequantize(torch.float32) + update)).norm().item()
    return total


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_cancels_part_of_the_quantisation_error(iterations):
    model = tiny_llama()
    before, full = snapshot(model), logits(model)
    originals = {name[:-len(".weight")]: p.detach().clone() for name, p in model.named_parameters() if "proj" in name}
    nbpeft.attach(model, "qlora", r=8, targets="all-linear")
    plain_error, plain_gap = quantisation_error(model, originals), (logits(model) - full).abs().mean()
    nbpeft.detach(model)
    nbpeft.attach(model, "qlora", r=8, targets="all-linear", init="loftq", loftq_iter=iterations)
    loftq_error, loftq_gap = quantisation_error(model, originals), (logits(model) - full).abs().mean()
    assert loftq_error < 0.8 * plain_error
    assert loftq_gap < plain_gap  # closer to the full-precision model's output
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_loftq_adapter_saves_and_loads_with_equal_outputs(tmp_path):
    model = tiny_llama()
    nbpeft.attach(model, "qlora", r=4, targets="all-linear", init="loftq", loftq_iter=2)
    train_a_little(model)
    expected = logits(model)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"]["loftq_iter"] == 2
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)  # the same alternation rebuilds the same 4-bit base
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=0)


def test_reference_init_names_read_back():
    from nbpeft.methods.lora_init import from_reference_init

    assert from_reference_init(True) == {"init": "default"}
    assert from_reference_init("pissa_niter_16") == {"init": "pissa", "pissa_niter": 16}
    assert from_reference_init("olora") == {"init": "olora"}
    with pytest.raises(ConfigError, match="init_lora_weights='corda'"):
        from_reference_init("corda")


def batches() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 8))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def step_sizes(lr_ratio: float) -> tuple[float, float]:
    """Median |change| of the A and of the B entries after one constant-rate AdamW step."""
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, init="random")  # B nonzero, so A gets a gradient at step 1
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    nbpeft.train(model, batches(), steps=1, lr=1e-3, schedule="constant", warmup=0, live=False, lr_ratio=lr_ratio)
    moved = {n: (p.detach() - start[n]).abs().flatten() for n, p in model.named_parameters() if n in start}
    a = torch.cat([v for n, v in moved.items() if "lora_A" in n]).median().item()
    b = torch.cat([v for n, v in moved.items() if "lora_B" in n]).median().item()
    return a, b


def test_lora_plus_gives_b_lr_ratio_times_the_learning_rate_of_a():
    a, b = step_sizes(16.0)
    # AdamW's first step moves each entry by about lr (times the sign of its gradient)
    assert a == pytest.approx(1e-3, rel=0.05) and b == pytest.approx(16e-3, rel=0.05)
    a, b = step_sizes(1.0)
    assert b == pytest.approx(a, rel=0.05)


def test_lora_plus_refusals(llama):
    nbpeft.attach(llama, "ia3")
    with pytest.raises(ConfigError, match="lr_ratio=0 must be a positive number"):
        nbpeft.train(llama, batches(), steps=1, lr_ratio=0, live=False)
    with pytest.raises(ConfigError, match="no trainable lora_B was found"):
        nbpeft.train(llama, batches(), steps=1, lr_ratio=16, live=False)
