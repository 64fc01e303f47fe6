"""load_adapter(hotswap=True): a second LoRA replaces the first in place, with no recompile of a compiled model."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import nbpeft

from conftest import assert_same, snapshot, tiny_llama, tokens


def saved(folder, **options) -> str:
    """A LoRA with random A and B saved in ``folder``."""
    model = tiny_llama()
    torch.manual_seed(sum(map(ord, str(folder))) % 1000)
    nbpeft.attach(model, "lora", init="random", **options)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.mul_(20)
    nbpeft.save_adapter(model, folder)
    return str(folder)


def fresh_logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    model = tiny_llama()
    nbpeft.load_adapter(model, folder)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("second", [
    {"r": 8, "alpha": 8.0},                  # same rank, another scale
    {"r": 4, "alpha": 32.0, "rslora": True},  # lower rank: padded with zeros; the scale ratio goes into B
])
def test_swap_into_a_compiled_model_without_recompiling(tmp_path, second):
    first = saved(tmp_path / "one", r=8, alpha=16.0, targets=["q_proj", "v_proj"])
    other = saved(tmp_path / "two", targets=["q_proj", "v_proj"], **second)
    model = tiny_llama()
    nbpeft.load_adapter(model, first)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = tokens(2, 6)
    with torch.no_grad():
        before = compiled(ids).logits
        nbpeft.load_adapter(compiled, other, hotswap=True)
        after = compiled(ids).logits
    assert counter.frame_count == 1  # compiled once, before the swap
    expected = fresh_logits(other, ids)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, expected, atol=1e-3)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 8


def test_the_swapped_adapter_saves_and_loads_as_the_new_one(tmp_path):
    first = saved(tmp_path / "one", r=8)
    other = saved(tmp_path / "two", r=2, alpha=4.0)
    model = tiny_llama()
    nbpeft.load_adapter(model, first)
    nbpeft.load_adapter(model, other, hotswap=True)
    nbpeft.save_adapter(model, tmp_path / "again")
    ids = tokens(2, 6)
    torch.testing.assert_close(fresh_logits(str(tmp_path / "again"), ids), fresh_logits(other, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("second, message", [
    ({"r": 16}, "has rank 16 at model.layers.0.self_attn.q_proj, above the loaded adapter's 8"),
    ({"r": 8, "targets": ["q_proj", "k_proj"]}, "adapts other modules than 'default'"),
    ({"r": 8, "method": "dora"}, "is not a plain LoRA file"),
])
def test_refusals_are_one_line_and_change_nothing(tmp_path, second, message):
    first = saved(tmp_path / "one", r=8)
    method = second.pop("method", "lora")
    if method == "dora":
        model = tiny_llama()
        nbpeft.attach(model, "dora", r=8)
        nbpeft.save_adapter(model, tmp_path / "two")
        other = str(tmp_path / "two")
    else:
        other = saved(tmp_path / "two", **second)
    model = tiny_llama()
    nbpeft.load_adapter(model, first)
    before = snapshot(model)
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        nbpeft.load_adapter(model, other, hotswap=True)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(model))


def test_swap_needs_a_loaded_unmerged_lora(tmp_path):
    other = saved(tmp_path / "two", r=8)
    model = tiny_llama()
    with pytest.raises(nbpeft.ConfigError, match="no adapter named 'default' to replace"):
        nbpeft.load_adapter(model, other, hotswap=True)
    nbpeft.load_adapter(model, other)
    nbpeft.merge(model)
    with pytest.raises(nbpeft.ConfigError, match="is merged; nbpeft.unmerge"):
        nbpeft.load_adapter(model, other, hotswap=True)
    nbpeft.unmerge(model)
    nbpeft.attach(model, "ia3", name="i")
    with pytest.raises(nbpeft.ConfigError, match="adapter 'i' is ia3"):
        nbpeft.load_adapter(model, other, name="i", hotswap=True)
