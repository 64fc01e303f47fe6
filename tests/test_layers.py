"""The layer contract, the wrapper chain helpers and the family table."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from torch import nn

import nbpeft
from nbpeft import architectures, targeting
from nbpeft.layers import (
    AdapterLayer,
    TrainedCopy,
    adapter_dtype,
    adapter_factory,
    adapter_layers,
    add_adapter,
    find_layer,
    innermost,
    wrappers,
)
from nbpeft.methods.base import get_method, registered
from nbpeft.methods.ia3 import IA3Layer
from nbpeft.methods.lora import LoRALinear

from conftest import TINY, assert_same, snapshot, tiny_llama
from families import BUILDERS, tiny_batch, tiny_model


def test_the_chain_helpers_walk_stacked_layers() -> None:
    model = tiny_llama()
    linear = model.model.layers[0].self_attn.v_proj
    nbpeft.attach(model, "ia3", targets=["v_proj"])
    nbpeft.attach(model, "lora", name="second", targets=["v_proj"])
    outer = model.model.layers[0].self_attn.v_proj
    chain = list(wrappers(outer))
    assert [type(layer) for layer in chain] == [LoRALinear, IA3Layer]
    assert innermost(outer) is linear and outer.innermost() is linear and chain[1].innermost() is linear
    assert find_layer(outer, IA3Layer) is chain[1] and outer.find(IA3Layer) is chain[1]
    assert find_layer(linear, IA3Layer) is None and list(wrappers(linear)) == [] and innermost(linear) is linear
    paths = [path for path, _ in adapter_layers(model)]
    assert paths.count("model.layers.0.self_attn.v_proj") == 2


def test_remove_drops_the_name_from_active_once_for_every_layer() -> None:
    model = tiny_llama()
    nbpeft.attach(model, "lora", targets=["q_proj"])
    nbpeft.attach(model, "lora", name="b", targets=["q_proj"])
    nbpeft.set_adapter(model, ["default", "b"])
    layer = model.model.layers[0].self_attn.q_proj
    layer.remove("b")
    assert layer.active == ("default",) and layer.adapter_names == ["default"]


def test_the_contract_is_declared_once() -> None:
    class Incomplete(AdapterLayer):
        @property
        def adapter_names(self) -> list[str]:
            return []

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(nn.Linear(2, 2))
    for method in registered():
        assert issubclass(method.layer_class, AdapterLayer), method.name


def test_adapters_on_low_precision_bases_are_fp32() -> None:
    assert adapter_dtype(torch.bfloat16) == torch.float32 and adapter_dtype(torch.float16) == torch.float32
    assert adapter_dtype(torch.float64) == torch.float64 and adapter_dtype(torch.float32) == torch.float32
    assert adapter_factory(torch.zeros(2, dtype=torch.bfloat16)) == {"device": torch.device("cpu"), "dtype": torch.float32}


def test_add_adapter_wraps_once_and_its_undo_restores_the_module() -> None:
    model = tiny_llama()
    before = snapshot(model)
    undo_a = add_adapter(model, "lm_head", TrainedCopy, "a", None)
    undo_b = add_adapter(model, "lm_head", TrainedCopy, "b", None)
    assert isinstance(model.lm_head, TrainedCopy) and model.lm_head.adapter_names == ["a", "b"]
    undo_b()
    undo_a()
    assert type(model.lm_head) is nn.Linear
    assert_same(before, snapshot(model))


def test_a_failing_add_leaves_the_module_unwrapped() -> None:
    class Failing(TrainedCopy):
        def add(self, name: str, config: object) -> None:
            raise RuntimeError("no room")

    model = tiny_llama()
    with pytest.raises(RuntimeError):
        add_adapter(model, "lm_head", Failing, "a", None)
    assert type(model.lm_head) is nn.Linear


def test_linear_helpers_read_linear_and_conv1d() -> None:
    gpt2 = TINY["gpt2"]()
    conv = gpt2.transformer.h[0].attn.c_attn
    assert targeting.is_conv1d(conv) and targeting.linear_features(conv) == (32, 96)
    assert not targeting.is_conv1d(nn.Linear(3, 5)) and targeting.linear_features(nn.Linear(3, 5)) == (3, 5)


def test_methods_say_how_compare_lists_them() -> None:
    names = [row["method"] for row in nbpeft.compare(tiny_llama()).rows]
    assert names == [m.name for m in sorted(registered(), key=lambda m: (m.listing_order, m.name))]
    assert names[:3] == ["lora", "dora", "qlora"] and names[-1] == "fusion"
    assert get_method("fusion").needs_other_adapters and get_method("lora").needs_other_adapters is None
    assert get_method("qlora").compare_options == {"r": 8}


# ---------------------------------------------------------------- the family table

def _tiny(model_type: str) -> nn.Module:
    if model_type in TINY:
        return TINY[model_type]()
    if model_type in BUILDERS:
        return tiny_model(model_type)
    if model_type == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        return transformers.T5ForConditionalGeneration(config)
    if model_type == "opt":
        config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                        num_attention_heads=4, word_embed_proj_dim=32)
        return transformers.OPTForCausalLM(config)
    if model_type == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=4)
        return transformers.DistilBertForSequenceClassification(config)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, pad_token_id=0)
    if model_type in ("bert", "roberta"):
        return transformers.AutoModelForSequenceClassification.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(architectures.FAMILIES))
def test_every_role_names_linear_layers_of_its_family(model_type: str) -> None:
    model = _tiny(model_type)
    assert architectures.model_type(model) == model_type
    family = architectures.family(model)
    modules = targeting.base_modules(model)
    found = {}
    for role in ("query", "key", "value", "qkv", "attention_output", "ffn_in", "ffn_out"):
        targets = architectures.role_targets(model, role)
        if not family.patterns(role):
            assert targets is None
            continue
        chosen = targeting.resolve(model, targets, targeting.linear_types(), "test")
        assert all(isinstance(modules[p], targeting.linear_types()) for p in chosen)
        found[role] = set(chosen)
    # no module plays two roles, except the fused projection that is query, key and value at once
    roles = list(found)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not found[a] & found[b], (a, b)
    assert family.plain_lm_head == (model_type in {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2",
                                                    "gpt_neox", "smollm3", "olmo", "olmo2", "stablelm", "starcoder2"})


def test_role_targets_are_names_or_one_regex() -> None:
    llama, bert = tiny_llama(), TINY["bert"]()
    assert architectures.role_targets(llama, "query", "value") == ["q_proj", "v_proj"]
    assert architectures.role_targets(llama, "qkv") is None  # llama has separate projections
    assert architectures.role_targets(nn.Linear(2, 2), "query") is None  # no transformers config
    ffn = architectures.role_targets(bert, "ffn_out")
    both = architectures.role_targets(bert, "attention_output", "ffn_out")
    assert isinstance(ffn, str) and isinstance(both, str)
    paths = [p for p in targeting.base_modules(bert) if p]
    assert [p for p in paths if re.fullmatch(ffn, p)] == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert len([p for p in paths if re.fullmatch(both, p)]) == 4  # and attention.output.dense in each layer


# ---------------------------------------------------------------- wrappers read like the wrapped layer

def test_a_wrapper_reads_like_its_module_at_any_depth() -> None:
    model = tiny_llama()
    linear = model.model.layers[0].self_attn.v_proj
    nbpeft.attach(model, "ia3", targets=["v_proj"])
    nbpeft.attach(model, "lora", name="b", targets=["v_proj"])
    nbpeft.attach(model, "bitfit", name="c", targets=["v_proj"])
    outer = model.model.layers[0].self_attn.v_proj
    assert len(list(wrappers(outer))) == 3
    assert outer.weight is linear.weight and outer.bias is None
    assert (outer.in_features, outer.out_features) == (linear.in_features, linear.out_features)
    assert outer.weight.dtype == torch.float32
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        outer.nothing_here  # noqa: B018
    with pytest.raises(AttributeError):
        outer._private_of_the_base  # noqa: B018  (private names never reach through)
    assert not hasattr(outer, "lora_A")  # an inner adapter layer's own parts stay its own
    nbpeft.detach(model)
    assert model.model.layers[0].self_attn.v_proj is linear


@pytest.mark.parametrize(("method", "options"), [("ia3", {}), ("bitfit", {}), ("lora", {"targets": "all-linear"})])
def test_t5_runs_forward_with_its_feed_forward_wrapped(method: str, options: dict) -> None:
    """T5's feed-forward reads ``self.wo.weight.dtype``: the wrapper must answer it."""
    model, batch = tiny_model("t5"), tiny_batch("t5")
    nbpeft.attach(model, method, **options)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert torch.isfinite(model(**batch).loss)


def test_key_value_heads_come_from_each_familys_config_key() -> None:
    falcon = transformers.FalconConfig(hidden_size=16, num_attention_heads=4)  # multi_query by default
    assert architectures.key_value_heads(falcon) == 1
    assert architectures.key_value_heads(transformers.FalconConfig(
        num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2)) == 2
    assert architectures.key_value_heads(transformers.FalconConfig(num_attention_heads=4, multi_query=False)) == 4
    assert architectures.key_value_heads(transformers.GPTBigCodeConfig(n_head=4, multi_query=True)) == 1
    assert architectures.key_value_heads(transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2)) == 2
    model, batch = tiny_model("falcon"), tiny_batch("falcon")
    nbpeft.attach(model, "prefix", num_virtual_tokens=3)  # sized for one key/value head: forward runs
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
