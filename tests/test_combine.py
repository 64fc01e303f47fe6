"""nbpeft.combine: each way of mixing gives the update its math says, refusals change nothing, %peft_combine maps onto it."""

from __future__ import annotations

import html

import pytest
import torch
from torch import nn

import nbpeft
from nbpeft.core import adapter_layers, state

from conftest import assert_same, snapshot, tiny_llama, tokens


class OneLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_layer(A: dict[str, list], B: dict[str, list], alpha: dict[str, float] | None = None) -> nn.Module:
    """A single linear layer with LoRA adapters whose A and B are given (scale alpha / r, 1 by default)."""
    model = OneLayer(len(next(iter(A.values()))[0]), len(next(iter(B.values()))))
    for name in A:
        r = len(A[name])
        nbpeft.attach(model, "lora", name=name, r=r, alpha=(alpha or {}).get(name, float(r)), targets=["proj"])
        with torch.no_grad():
            model.proj.lora_A[name].weight.copy_(torch.tensor(A[name], dtype=torch.float32))
            model.proj.lora_B[name].weight.copy_(torch.tensor(B[name], dtype=torch.float32))
    return model


def factors(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return model.proj.lora_A[name].weight.detach(), model.proj.lora_B[name].weight.detach()


def deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight(name) for path, layer in adapter_layers(model) if name in layer.adapter_names}


@pytest.fixture
def two() -> nn.Module:
    model = tiny_llama()
    nbpeft.attach(model, "lora", name="a", r=4, alpha=8, init="random")
    nbpeft.attach(model, "lora", name="b", r=2, alpha=8, init="random", targets=["q_proj", "k_proj"])
    return model


def test_cat_is_the_exact_weighted_sum_of_updates(two):
    adapter = nbpeft.combine(two, {"a": 0.7, "b": -0.3}, name="mix", how="cat")
    assert adapter.config.r == 6 and two.model.layers[0].self_attn.q_proj.scaling["mix"] == 1.0
    da, db, mix = deltas(two, "a"), deltas(two, "b"), deltas(two, "mix")
    assert set(mix) == set(da) | set(db)  # the union of the targets (k_proj only in b)
    for path in mix:
        expected = 0.7 * da.get(path, 0) - 0.3 * db.get(path, 0)
        torch.testing.assert_close(mix[path], expected, rtol=1e-5, atol=1e-6)
    assert state(two).active == ["mix"]


def test_svd_of_full_rank_is_exact_and_lower_rank_is_the_best_truncation(two):
    nbpeft.combine(two, {"a": 0.7, "b": -0.3}, name="full", how="svd", rank=6)
    nbpeft.combine(two, {"a": 0.7, "b": -0.3}, name="low", how="svd", rank=2)
    da, db = deltas(two, "a"), deltas(two, "b")
    full, low = deltas(two, "full"), deltas(two, "low")
    for path in full:
        expected = 0.7 * da.get(path, 0) - 0.3 * db.get(path, 0)
        torch.testing.assert_close(full[path], expected, rtol=1e-4, atol=1e-5)
        singular = torch.linalg.svdvals(expected)
        torch.testing.assert_close(torch.linalg.norm(expected - low[path]), singular[2:].norm(), rtol=1e-3, atol=1e-5)
    assert state(two).adapters["low"].config.r == 2


def test_svd_rank_defaults_to_the_largest(two):
    assert nbpeft.combine(two, {"a": 1.0, "b": 1.0}, name="mix", how="svd").config.r == 4


def test_linear_mixes_A_and_B_separately_with_root_weights():
    # scale 1; weights 0.25 and -1: A gets +0.5 and -1, B gets 0.5 and 1
    model = one_layer({"a": [[1.0, 2.0]], "b": [[3.0, -1.0]]}, {"a": [[1.0], [0.0]], "b": [[0.0], [2.0]]})
    nbpeft.combine(model, {"a": 0.25, "b": -1.0}, name="mix", how="linear")
    A, B = factors(model, "mix")
    torch.testing.assert_close(A, torch.tensor([[0.5 - 3.0, 1.0 + 1.0]]))
    torch.testing.assert_close(B, torch.tensor([[0.5], [2.0]]))


def test_the_adapters_scale_joins_the_weight():
    # a's scale is alpha / r = 4: weight 1 and scale 4 give A and B each a factor 2
    model = one_layer({"a": [[1.0, 1.0]]}, {"a": [[1.0]]}, alpha={"a": 4.0})
    nbpeft.combine(model, {"a": -1.0}, name="neg")  # one adapter: a weighted copy, B·A = -4 B_a A_a
    A, B = factors(model, "neg")
    torch.testing.assert_close(A, torch.tensor([[-2.0, -2.0]]))
    torch.testing.assert_close(B, torch.tensor([[2.0]]))


@pytest.mark.parametrize("sign, expected", [("total", [4.0, 5.0, 0.0, -3.0]), ("frequency", [4.0, 5.0, 0.0, 2.0])])
def test_ties_keeps_the_largest_entries_and_the_majority_sign(sign, expected):
    # density 0.5 keeps a: [4, 0, 0, -3] and b: [0, 5, 0, 2]; 'total' votes by sum (-1 at the end: minus),
    # 'frequency' by count (one each: plus); an entry averages the adapters that agree
    model = one_layer({"a": [[4.0, -1.0, 2.0, -3.0]], "b": [[-1.0, 5.0, 1.0, 2.0]]},
                      {"a": [[2.0], [1.0]], "b": [[1.0], [3.0]]})
    nbpeft.combine(model, {"a": 1.0, "b": 1.0}, name="mix", how="ties", density=0.5, majority_sign_method=sign)
    A, B = factors(model, "mix")
    torch.testing.assert_close(A, torch.tensor([expected]))
    torch.testing.assert_close(B, torch.tensor([[2.0], [3.0]]))


def test_ties_at_full_density_averages_where_signs_agree():
    model = one_layer({"a": [[2.0, -2.0]], "b": [[4.0, 6.0]]}, {"a": [[1.0]], "b": [[1.0]]})
    nbpeft.combine(model, {"a": 1.0, "b": 1.0}, name="mix", how="ties", density=1.0)
    A, _ = factors(model, "mix")
    torch.testing.assert_close(A, torch.tensor([[3.0, 6.0]]))  # (2 + 4) / 2; only b's +6 agrees with the sum's sign


def test_dare_keeps_entries_at_random_rescaled_and_a_seed_repeats_the_draw():
    two = tiny_llama()
    nbpeft.attach(two, "lora", name="a", r=4, alpha=8, init="random")
    nbpeft.attach(two, "lora", name="b", r=4, alpha=8, init="random", targets=["q_proj", "k_proj"])
    nbpeft.combine(two, {"a": 1.0, "b": 1.0}, name="d1", how="dare_linear", density=0.5, seed=3)
    nbpeft.combine(two, {"a": 1.0, "b": 1.0}, name="d2", how="dare_linear", density=0.5, seed=3)
    nbpeft.combine(two, {"a": 1.0, "b": 1.0}, name="d3", how="dare_linear", density=0.5, seed=4)
    layer = two.model.layers[0].self_attn.v_proj  # only a here: each entry is 0 or 2 · c · A_a
    A1, A2, A3 = (layer.lora_A[n].weight for n in ("d1", "d2", "d3"))
    assert torch.equal(A1, A2) and not torch.equal(A1, A3)
    root = layer.scaling["a"] ** 0.5
    full = 2 * root * layer.lora_A["a"].weight
    assert torch.all(torch.isclose(A1, full) | (A1 == 0))
    assert 0.25 < (A1 == 0).float().mean() < 0.75


def test_dare_at_full_density_is_linear():
    model = tiny_llama()
    nbpeft.attach(model, "lora", name="a", r=4, init="random")
    nbpeft.attach(model, "lora", name="b", r=4, init="random")
    nbpeft.combine(model, {"a": 0.6, "b": 0.4}, name="lin", how="linear")
    nbpeft.combine(model, {"a": 0.6, "b": 0.4}, name="dare", how="dare_ties", density=1.0)
    nbpeft.combine(model, {"a": 0.6, "b": 0.4}, name="dl", how="dare_linear", density=1.0)
    for _, layer in adapter_layers(model):
        assert torch.equal(layer.lora_A["lin"].weight, layer.lora_A["dl"].weight)
        assert torch.equal(layer.lora_B["lin"].weight, layer.lora_B["dl"].weight)
    assert not torch.equal(nbpeft_logits(model, "lin"), nbpeft_logits(model, "a"))


def nbpeft_logits(model: nn.Module, name: str) -> torch.Tensor:
    nbpeft.set_adapter(model, name)
    with torch.no_grad():
        return model(tokens()).logits


def test_the_mix_saves_and_loads_as_a_plain_lora(two, tmp_path):
    nbpeft.combine(two, {"a": 0.5, "b": 0.5}, name="mix", how="cat")
    expected = nbpeft_logits(two, "mix")
    nbpeft.save_adapter(two, tmp_path, name="mix")
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path / "mix", name="mix")
    torch.testing.assert_close(nbpeft_logits(fresh, "mix"), expected)


@pytest.mark.parametrize("weights, options, message", [
    ({}, {}, "weights= must map adapter names to numbers"),
    ({"a": "x"}, {}, "the weight 'x' is not a number"),
    ({"a": 1.0, "zz": 1.0}, {}, "no adapter named 'zz'"),
    ({"a": 1.0}, {"name": "a"}, "an adapter named 'a' is already attached"),
    ({"a": 1.0, "b": 1.0}, {"how": "mean"}, "how='mean' is not one of linear, cat, svd"),
    ({"a": 1.0, "b": 1.0}, {"how": "ties"}, "how='ties' needs density="),
    ({"a": 1.0, "b": 1.0}, {"how": "ties", "density": 0}, "density=0 must be above 0 and at most 1"),
    ({"a": 1.0, "b": 1.0}, {"how": "cat", "density": 0.5}, "density= applies to how='ties'"),
    ({"a": 1.0, "b": 1.0}, {"how": "linear"}, "how='linear' needs adapters of one rank, here a: r=4, b: r=2"),
    ({"a": 1.0, "b": 1.0}, {"how": "cat", "rank": 2}, "rank= applies to how='svd'"),
    ({"a": 1.0, "b": 1.0}, {"how": "svd", "rank": 64}, "rank=64 is above the smallest layer's 16 dimensions"),
    ({"a": 1.0, "b": 1.0}, {"how": "ties", "density": 0.5, "majority_sign_method": "vote"},
     "majority_sign_method='vote' is not one of total, frequency"),
])
def test_refusals_are_one_line_and_change_nothing(two, weights, options, message):
    before = snapshot(two)
    with pytest.raises(nbpeft.ConfigError, match=message.replace("(", r"\(")) as err:
        nbpeft.combine(two, weights, **{"name": "mix", **options})
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(two))
    assert list(state(two).adapters) == ["a", "b"]


def test_other_methods_are_refused():
    model = tiny_llama()
    nbpeft.attach(model, "lora", name="a")
    nbpeft.attach(model, "ia3", name="b")
    with pytest.raises(nbpeft.ConfigError, match="adapter 'b' is ia3; combine mixes lora adapters"):
        nbpeft.combine(model, {"a": 1.0, "b": 1.0}, name="mix")


def test_magic_maps_onto_the_api(two):
    from IPython import get_ipython
    from IPython.core.error import UsageError
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output

    shell = start_ipython() or get_ipython()
    if "nbpeft" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "nbpeft")
    shell.user_ns["model"] = two
    try:
        with capture_output():
            result = shell.run_cell("%peft_combine a=0.7 b=0.3 --name mix --how svd --rank 3 --model model")
        assert result.success
        reference = tiny_llama()
        for name, source in (("a", "a"), ("b", "b")):
            nbpeft.attach(reference, "lora", name=name, **{k: v for k, v in state(two).adapters[source].options.items()
                                                            if k in ("r", "alpha", "targets")})
        reference.load_state_dict(two.state_dict(), strict=False)
        nbpeft.combine(reference, {"a": 0.7, "b": 0.3}, name="mix", how="svd", rank=3)
        torch.testing.assert_close(nbpeft_logits(two, "mix"), nbpeft_logits(reference, "mix"))

        for line, message in (
            ("%peft_combine --name x", "nbpeft: which adapters? give NAME=WEIGHT pairs"),
            ("%peft_combine a=1 b=1", "nbpeft: name the new adapter with --name NAME"),
            ("%peft_combine a=1 b=1 --name x --how ties", "nbpeft: combine(): --how 'ties' needs --density (the share"),
            ("%peft_combine a=1 b=1 --name mix --how cat", "nbpeft: combine(): an adapter named 'mix' is already attached; "
                                                          "pick another --name"),
        ):
            with capture_output() as out:
                result = shell.run_cell(line)
            assert isinstance(result.error_in_exec, UsageError), line
            assert out.stderr.strip().startswith(f"UsageError: {message}"), out.stderr
            assert len(out.stderr.strip().splitlines()) == 1
        from nbpeft.magics import completions

        assert completions(shell, "%peft_combine a=1 --how da")[1] == ["dare_linear", "dare_ties"]
    finally:
        shell.user_ns.pop("model", None)


def test_the_adapters_tab_combines(two):
    from nbpeft.widgets.adapters import AdaptersTab

    tab = AdaptersTab(two)
    assert tab.combine_density.disabled  # linear takes no density
    tab.combine_weights.value = "a=0.7 b=0.3"
    tab.combine_how.value = "ties"
    assert not tab.combine_density.disabled
    tab.combine_button.click()
    assert "new adapter '' must be a simple identifier" in html.unescape(tab.message.value)
    tab.combine_name.value = "mix"
    tab.combine_how.value = "svd"
    tab.combine_button.click()
    assert "Adapter 'mix': lora on 6 modules" in html.unescape(tab.message.value), tab.message.value
    reference = tiny_llama()
    nbpeft.attach(reference, "lora", name="a", r=4, alpha=8)
    nbpeft.attach(reference, "lora", name="b", r=2, alpha=8, targets=["q_proj", "k_proj"])
    reference.load_state_dict(two.state_dict(), strict=False)
    nbpeft.combine(reference, {"a": 0.7, "b": 0.3}, name="mix", how="svd")
    torch.testing.assert_close(nbpeft_logits(two, "mix"), nbpeft_logits(reference, "mix"))
    assert state(two).active == ["mix"]
