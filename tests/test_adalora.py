"""AdaLoRA: SVD-form updates whose rank budget the training loop reallocates, through the loop's generic method hooks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import matplotlib
import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.errors import ConfigError
from nbpeft.formats.export import to_lora
from nbpeft.methods.adalora import AdaLoraConfig, AdaLoRALinear, budget, plot_ranks, rank_history
from nbpeft.methods.base import get_method, register, unregister
from nbpeft.methods.vera import VeRA, VeraConfig

from conftest import assert_same, snapshot
from families import outputs, tiny_batch, tiny_model

matplotlib.use("Agg")


def data(family: str = "llama") -> list[dict[str, torch.Tensor]]:
    return [tiny_batch(family, seed=s) for s in (1, 2, 3)] * 4


def trained_run(model: torch.nn.Module, steps: int = 10, **options) -> nbpeft.training.events.TrainResult:
    nbpeft.attach(model, "adalora", **{"init_r": 4, "target_r": 2, **options})
    return nbpeft.train(model, data(), steps=steps, lr=5e-2, warmup=0, live=False, compile=False)


def test_the_budget_falls_as_a_cubic_between_tinit_and_total_minus_tfinal():
    config = AdaLoraConfig(init_r=12, target_r=4, tinit=2, tfinal=3, deltaT=2, total_step=15)
    start, target = 12 * 10, 4 * 10
    assert budget(1, config, 15, start, target) == (start, False)
    assert budget(2, config, 15, start, target) == (start, False)
    assert budget(3, config, 15, start, target) == (int(80 * 0.9**3 + 40), False)  # step 3 is odd: no mask
    assert budget(4, config, 15, start, target) == (int(80 * 0.8**3 + 40), True)
    assert budget(12, config, 15, start, target) == (target, True)


def test_attach_is_the_identity_and_r_points_to_init_r():
    model, batch = tiny_model("llama"), tiny_batch("llama")
    base = outputs(model, batch)
    adapter = nbpeft.attach(model, "adalora")
    assert adapter.num_params == 12 * (16 + 16 + 1) + 12 * (16 + 8 + 1)  # q_proj and v_proj at init_r=12
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="unknown option 'r' \\(did you mean 'init_r'\\?\\)") as info:
        nbpeft.attach(tiny_model("llama"), "adalora", r=8)
    assert "\n" not in str(info.value)


def test_training_reallocates_ranks_down_to_the_target_and_records_them():
    model = tiny_model("llama", layers=2)
    result = trained_run(model, steps=10, tinit=2, tfinal=2)
    first = result.history[0]
    ranks = rank_history(result.history)
    assert len(ranks) == 4 and all(len(points) == 10 for points in ranks.values())
    assert all(first[f"rank {path}"] == 4 for path in ranks)  # tinit: the full budget
    assert sum(points[-1][1] for points in ranks.values()) == 2 * 4  # target_r × modules
    assert first["rank budget"] == 16 and result.history[7]["rank budget"] == 8
    assert all(row["extra loss"] > 0 for row in result.history)  # the orthogonality penalty, reported apart
    pattern = nbpeft.core.state(model).adapters["default"].config.rank_pattern
    for path, kept in pattern.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, AdaLoRALinear)
        dropped = ~torch.tensor(kept)
        assert torch.equal(layer.lora_E["default"].detach()[dropped], torch.zeros(int(dropped.sum()), 1))
    figure = plot_ranks(result)
    assert len(figure.axes[0].get_lines()) == 4


def test_files_hold_the_kept_triplets_and_load_back_at_those_ranks(tmp_path):
    model, batch = tiny_model("llama", layers=2), tiny_batch("llama")
    trained_run(model, steps=6)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    pattern = nbpeft.core.state(model).adapters["default"].config.rank_pattern
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["target_r"] == 2
    assert config["rank_pattern"] == {f"{path}.lora_E": kept for path, kept in pattern.items()}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for path, kept in pattern.items():
        rank = sum(kept)
        assert tensors[f"base_model.model.{path}.lora_A"].shape[0] == rank
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (rank, 1)
        assert tensors[f"base_model.model.{path}.lora_B"].shape[1] == rank
    assert not any("ranknum" in key for key in tensors)
    fresh = tiny_model("llama", layers=2)
    (loaded,) = nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=1e-6, atol=1e-6)
    assert "ranks as allocated: 8 triplets" in repr(loaded)
    result = nbpeft.train(fresh, data(), steps=2, lr=1e-2, warmup=0, live=False, compile=False)
    assert all(not row.get("rank budget") for row in result.history)  # allocated already: ranks stay


def test_files_of_older_versions_with_ranknum_load(tmp_path):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    trained_run(model, steps=3)
    nbpeft.save_adapter(model, tmp_path)
    from safetensors.torch import save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors.update({k.replace(".lora_E", ".ranknum"): torch.tensor([4.0]) for k in list(tensors) if k.endswith(".lora_E")})
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = tiny_model("llama")
    nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D keeps its weight as (in, out)
def test_merge_unmerge_detach_exact_and_to_lora_at_the_initial_rank(family):
    model, batch = tiny_model(family), tiny_batch(family)
    before = snapshot(model)
    nbpeft.attach(model, "adalora", init_r=4, target_r=2)
    with torch.no_grad():
        for param in nbpeft.core.trainable_parameters(model):
            param.normal_(0, 0.5)
    adapted = outputs(model, batch)
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.unmerge(model)
    assert to_lora(model, rank=4).relative_error < 1e-5
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(("options", "message"), [
    ({"target_r": 16}, "target_r=16 must be from 1 to init_r=12"),
    ({"beta1": 1.0}, "beta1=1.0 must be between 0 and 1"),
    ({"orth_reg_weight": -1.0}, "orth_reg_weight=-1.0 must be 0 or more"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, "total_step=10 leaves no steps for the budget to fall"),
    ({"rank_pattern": {"model.layers.0.self_attn.q_proj": [True]}}, "has 1 flags; give init_r=12"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message) as info:
        nbpeft.attach(model, "adalora", **options)
    assert "\n" not in str(info.value)
    assert_same(before, snapshot(model))


def test_a_run_too_short_for_tinit_and_tfinal_stops_with_one_line():
    model = tiny_model("llama")
    nbpeft.attach(model, "adalora", tinit=3, tfinal=3)
    with pytest.raises(ConfigError, match="the run's steps=4 leaves no steps for the budget to fall") as info:
        nbpeft.train(model, data(), steps=4, lr=1e-2, warmup=0, live=False, compile=False)
    assert "\n" not in str(info.value)


# ---- the loop's method hooks are generic: any method may add a loss term and act after each step


@dataclass
class CountedConfig(VeraConfig):
    method = "counted"


class Counted(VeRA):
    """VeRA plus a penalty pulling λ_d to zero and a count of the steps it saw: the two hooks and nothing else."""

    name = "counted"
    config_class = CountedConfig
    peft_type = "COUNTED"
    in_reference = False
    steps: list[tuple[int, int]] = []

    def extra_loss(self, model, name, config):
        return sum(p.square().sum() for k, p in nbpeft.core.adapter_parameters(model, name).items() if k.endswith("lambda_d"))

    def after_step(self, model, name, config, step, total_steps):
        grads = [p.grad for p in nbpeft.core.adapter_parameters(model, name).values()]
        assert all(g is not None for g in grads)  # before zero_grad: the step's gradients are still there
        self.steps.append((step, total_steps))
        return {"seen": step}


def test_the_loop_calls_any_methods_hooks_and_keeps_their_figures():
    register(Counted())
    try:
        model = tiny_model("llama")
        nbpeft.attach(model, "counted", r=4, name="other")
        lambda_d = [p for k, p in nbpeft.core.adapter_parameters(model, "other").items() if k.endswith("lambda_d")]
        start = sum(float(p.detach().square().sum()) for p in lambda_d)
        result = nbpeft.train(model, data(), steps=3, lr=1e-2, warmup=0, live=False, compile=False)
        assert get_method("counted").steps == [(1, 3), (2, 3), (3, 3)]
        assert [row["other: seen"] for row in result.history] == [1, 2, 3]
        assert result.history[0]["other: extra loss"] == pytest.approx(start, rel=1e-5)
        assert sum(float(p.detach().square().sum()) for p in lambda_d) < start  # the penalty's gradient reached the update
    finally:
        unregister("counted")
