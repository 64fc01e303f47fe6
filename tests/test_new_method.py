"""A method written in one file works wherever a built-in one does, with no other file changed.

``rowscale``, defined here, learns one scale per output feature of a linear layer::

    y = (1 + s) ⊙ (W x) + b          so   ΔW = diag(s) W

``s`` starts at zero (the model is unchanged at attach); the update is a dense weight delta,
so it merges into ``W``, converts to a LoRA and exports as a merged model. Each test registers
it and removes it again; attach, train, save/load, detach, merge, export, one adapter per row
and the family matrix read what it can do from its classes alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import nbpeft
from nbpeft import architectures, targeting
from nbpeft.errors import ConfigError
from nbpeft.formats.export import check_export, merged_state_dict, to_lora
from nbpeft.layers import AdapterLayer, adapter_factory
from nbpeft.methods.base import Attached, Method, MethodConfig, get_method, option, register, unregister

from conftest import assert_same, snapshot
from families import FAMILIES, check_method, outputs, tiny_batch, tiny_model


@dataclass
class RowScaleConfig(MethodConfig):
    method = "rowscale"

    targets: str | list[str] | None = option(
        None, "module names or suffixes, a regex, or 'all-linear' (default: the attention q/v projections)"
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )


class RowScaleLayer(AdapterLayer):
    """``nn.Linear`` or ``Conv1D`` whose output features are scaled by ``1 + s`` before the bias."""

    reads_base_weight = False  # forward calls the base layer and reads only its bias

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = self.innermost()
        self.fan_in_fan_out = targeting.is_conv1d(inner)
        self.out_features = targeting.linear_features(inner)[1]
        self.row_scale = nn.ParameterDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.row_scale)

    def add(self, name: str, config: RowScaleConfig) -> None:
        self.row_scale[name] = nn.Parameter(torch.zeros(self.out_features, **adapter_factory(self.innermost().weight)))

    def delete(self, name: str) -> None:
        del self.row_scale[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"row_scale": self.row_scale[name]}

    def _factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``1 + s`` shaped to scale the output features of ``weight`` in its own layout."""
        factor = (1 + self.row_scale[name]).to(weight.dtype)
        return factor[None, :] if self.fan_in_fan_out else factor[:, None]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("rowscale over another adapter's layer cannot be folded into the base weight")
        if name not in self.merged:
            self.keep_original_weight()
            self.base_layer.weight.mul_(self._factor(name, self.base_layer.weight))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.base_layer.weight.div_(self._factor(name, self.base_layer.weight))
            self.merged.remove(name)
            self.restore_original_weight()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = [] if self.disabled else [n for n in self.active if n in self.row_scale and n not in self.merged]
        if not names:
            return result
        bias = self.base_layer.bias
        weighted = result if bias is None else result - bias
        factor = torch.stack([1 + self.row_scale[n] for n in names]).prod(0)
        return result + (weighted * (factor - 1)).to(result.dtype)


class RowScale(Method):
    name = "rowscale"
    description = "A learned scale per output feature of linear layers, (1 + s) ⊙ W x + b; mergeable"
    config_class = RowScaleConfig
    layer_class = RowScaleLayer
    peft_type = "ROW_SCALE"
    identity_at_attach = True
    weight_delta = mergeable = True

    def select(self, model: nn.Module, config: RowScaleConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets
        if targets is None:
            targets = architectures.role_targets(model, "query", "value") or architectures.role_targets(model, "qkv")
        if targets is None:
            raise ConfigError("rowscale: no default targets for this model; pass targets=[...] (module names)")
        return targeting.resolve(model, targets, targeting.linear_types(), self.name)


@pytest.fixture
def rowscale() -> Iterator[Method]:
    register(RowScale())
    try:
        yield get_method("rowscale")
    finally:
        unregister("rowscale")


def trained(model: nn.Module, name: str = "default") -> None:
    """Give the adapter's scales values, as training would."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in nbpeft.core.adapter_parameters(model, name).values():
            param.normal_(0, 0.2)


def test_registering_and_unregistering_is_all_it_takes(rowscale):
    assert "rowscale" in [info.name for info in nbpeft.methods()]
    unregister("rowscale")
    try:
        assert "rowscale" not in [info.name for info in nbpeft.methods()]
        with pytest.raises(ConfigError, match="unknown method 'rowscale'") as info:
            nbpeft.attach(tiny_model("llama"), "rowscale")
        assert "\n" not in str(info.value)
    finally:
        register(rowscale)


def test_train_lowers_the_loss(rowscale):
    model, batch = tiny_model("llama"), tiny_batch("llama")
    adapter = nbpeft.attach(model, "rowscale")
    assert adapter.num_params == 16 + 8  # one scale per output of q_proj (16) and v_proj (2 key/value heads of 4)
    loader = torch.utils.data.DataLoader([batch] * 12, batch_size=None)
    result = nbpeft.train(model, loader, steps=12, lr=5e-2, warmup=0, live=False, compile=False)
    assert result.steps == 12 and result.losses[-1] < result.losses[0]


def test_merge_unmerge_and_detach_are_exact(rowscale):
    model, batch = tiny_model("qwen2"), tiny_batch("qwen2")  # Qwen2's q/v projections have a bias
    before = snapshot(model)
    nbpeft.attach(model, "rowscale")
    trained(model)
    adapted = outputs(model, batch)
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    nbpeft.unmerge(model)
    nbpeft.merge(model)
    nbpeft.detach(model)  # merged: detach unmerges first
    assert_same(before, snapshot(model))


def test_one_adapter_per_row_is_refused_in_one_line(rowscale):
    model = tiny_model("llama")
    nbpeft.attach(model, "rowscale")
    with pytest.raises(ConfigError, match="cannot run on some rows only") as info:
        with nbpeft.core.adapter_rows(model, ["default", None]):
            pass
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D keeps its weight as (in, out)
def test_export_and_to_lora_read_the_abilities(rowscale, family, tmp_path):
    model, batch = tiny_model(family), tiny_batch(family)
    adapter = nbpeft.attach(model, "rowscale")
    trained(model)
    adapted = outputs(model, batch)

    merged, _ = merged_state_dict(model)
    path = adapter.targets[0]
    layer = model.get_submodule(path)
    factor = 1 + layer.row_scale["default"].detach()
    weight = layer.base_layer.weight.detach()
    expected = weight * factor[None, :] if layer.fan_in_fan_out else weight * factor[:, None]
    torch.testing.assert_close(merged[f"{path}.weight"], expected)

    assert [line.split(": ", 2)[2] for line in check_export(model, "vllm")] == [
        "vLLM serves LoRA only; export format='merged' if the method merges, or use nbpeft.to_lora()"]
    assert "GGUF adapters are LoRA only" in str(check_export(model, "llama.cpp"))
    assert "the reference has no rowscale format" in str(check_export(model, "peft"))
    with pytest.raises(ConfigError, match=r"to_lora\(model, rank=\.\.\.\) first"):
        nbpeft.export(model, tmp_path / "gguf", format="gguf-adapter")

    conversion = to_lora(model, rank=16)  # full rank: the LoRA is the same update
    assert conversion.relative_error < 1e-5
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-4, atol=1e-4)


def test_the_folder_names_its_method_and_loads_back(rowscale, tmp_path):
    model, batch = tiny_model("bert"), tiny_batch("bert")  # a classifier: its head is saved with the adapter
    nbpeft.attach(model, "rowscale")
    trained(model)
    nbpeft.save_adapter(model, tmp_path)
    fresh = tiny_model("bert")
    (loaded,) = nbpeft.load_adapter(fresh, tmp_path)
    assert loaded.method == "rowscale" and loaded.saved_modules == ["classifier"]
    torch.testing.assert_close(outputs(fresh, batch), outputs(model, batch))
    assert "(rowscale): the reference has no rowscale format" in str(check_export(tmp_path, "peft"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(rowscale, family, tmp_path):
    check_method(family, "rowscale", tmp_path / "adapter")
