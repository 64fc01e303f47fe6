"""Prefix tuning: a prefix made of real tokens' keys and values equals running those tokens first."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DynamicCache

import nbpeft
from nbpeft.layers import IGNORE
from nbpeft.methods.base import ConfigError
from nbpeft.methods.prefix import PrefixKV

from conftest import assert_same, snapshot, tiny_bert, tiny_llama, tokens

N = 3
LEAD = torch.tensor([[17, 42, 99]])  # the tokens whose keys/values become the prefix


def layer_of(model) -> PrefixKV:
    layer = model.get_input_embeddings()
    while not isinstance(layer, PrefixKV):
        layer = layer.base_layer
    return layer


def file_layout(model, lead):
    """The base model's keys/values for ``lead`` as the saved tensor.

    The reference reads the tensor as view(n, layers * 2, heads, head_dim) with entry 2l the
    keys and 2l + 1 the values of layer l; this is the inverse.
    """
    cache = DynamicCache(config=model.config)
    with nbpeft.disable_adapters(model), torch.no_grad():
        model(lead, cache=cache, use_cache=True)
    per_layer = [t[0] for layer in cache.layers for t in (layer.keys, layer.values)]  # heads x n x head_dim each
    return torch.stack(per_layer).permute(2, 0, 1, 3).reshape(lead.shape[1], -1)


def set_prefix(model, value, name="default"):
    with torch.no_grad():
        layer_of(model).prefix[name].copy_(value)


def base(model, ids, **kwargs):
    with nbpeft.disable_adapters(model), torch.no_grad():
        return model(ids, **kwargs)


def greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_parameter_count_uses_the_key_value_heads(llama):
    adapter = nbpeft.attach(llama, "prefix", num_virtual_tokens=N)
    # 2 layers, 2 KV heads of size 8 (grouped-query attention: 4 query heads)
    assert adapter.num_params == N * 2 * 2 * (2 * 8)
    assert [n for n, p in llama.named_parameters() if p.requires_grad] == ["model.embed_tokens.prefix.default"]


def test_prefix_of_real_tokens_equals_running_them_first(llama):
    ids = tokens()
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N, init="random")
    set_prefix(llama, file_layout(llama, LEAD))
    with torch.no_grad():
        out = llama(ids).logits
    full = base(llama, torch.cat([LEAD.expand(2, -1), ids], dim=1)).logits
    assert out.shape == (2, 6, 128)
    assert torch.allclose(out, full[:, N:], atol=1e-5)


def test_padding_mask_lines_up_with_the_prefix(llama):
    ids = tokens(length=7)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N, init="random")
    set_prefix(llama, file_layout(llama, LEAD))
    with torch.no_grad():
        out = llama(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE))
    lead = LEAD.expand(2, -1)
    full_mask = torch.cat([torch.ones_like(lead), mask], dim=1)
    # the first real token has no prediction in the adapted model (the prefix has no logits)
    full_labels = torch.cat([torch.full_like(lead, IGNORE), ids.masked_fill(mask == 0, IGNORE)], dim=1)
    full_labels[:, N] = IGNORE
    full = base(llama, torch.cat([lead, ids], dim=1), attention_mask=full_mask, labels=full_labels)
    assert torch.allclose(out.logits[mask == 1], full.logits[:, N:][mask == 1], atol=1e-5)
    assert torch.allclose(out.loss, full.loss, atol=1e-5)


def test_generate_equals_the_base_model_after_the_lead_tokens(llama):
    ids = tokens()
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N, init="random")
    set_prefix(llama, file_layout(llama, LEAD))
    with torch.no_grad():
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        with nbpeft.disable_adapters(llama):
            lead_ids = torch.cat([LEAD.expand(2, -1), ids], dim=1)
            ref = llama.generate(lead_ids, attention_mask=torch.ones_like(lead_ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, 6:], ref[:, N + 6:])
    assert torch.equal(out, greedy(llama, ids, 6))


def test_left_padding_gives_the_same_answer(llama):
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N)
    short = torch.tensor([[5, 9, 3, 7]])
    padded = torch.tensor([[0, 0, 5, 9, 3, 7], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = llama.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=5, do_sample=False)
        batch = llama.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(batch[0, 6:], alone[0, 4:])


def test_vocab_init_is_a_real_tokens_prefix(llama):
    """The default start: some tokens' keys/values, so the model equals the base after those tokens."""
    torch.manual_seed(3)
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N)
    torch.manual_seed(3)
    lead = torch.randint(0, 128, (1, N))
    assert torch.allclose(layer_of(llama).prefix["default"], file_layout(llama, lead), atol=1e-6)


def test_disabled_is_the_base_model_and_detach_restores_everything(llama):
    ids = tokens()
    before = snapshot(llama)
    with torch.no_grad():
        expected = llama(ids).logits
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N)
    with torch.no_grad():
        assert not torch.allclose(llama(ids).logits, expected, atol=1e-3)
    with nbpeft.disable_adapters(llama), torch.no_grad():
        assert torch.equal(llama(ids).logits, expected)
    nbpeft.detach(llama)
    assert not llama._forward_pre_hooks
    assert_same(before, snapshot(llama))


def test_two_prefixes_switch_with_set_adapter(llama):
    ids = tokens()
    leads = {"a": LEAD, "b": torch.tensor([[3, 1, 4, 1]])}
    for name, lead in leads.items():
        nbpeft.attach(llama, "prefix", name=name, num_virtual_tokens=lead.shape[1], init="random")
        set_prefix(llama, file_layout(llama, lead), name)
    for name, lead in leads.items():
        nbpeft.set_adapter(llama, name)
        full = base(llama, torch.cat([lead.expand(2, -1), ids], dim=1)).logits
        with torch.no_grad():
            assert torch.allclose(llama(ids).logits, full[:, lead.shape[1]:], atol=1e-5)


def test_prefix_and_prompt_together(llama):
    """Both active: the keys/values come first, then the prompt, then the input."""
    ids = tokens()
    nbpeft.attach(llama, "prefix", name="kv", num_virtual_tokens=N, init="random")
    set_prefix(llama, file_layout(llama, LEAD), "kv")
    nbpeft.attach(llama, "prompt", name="p", num_virtual_tokens=2)  # wraps the prefix wrapper
    nbpeft.set_adapter(llama, ["kv", "p"])
    with torch.no_grad():
        out = llama(ids).logits
        prompt = llama.get_input_embeddings().prompt_embeddings["p"]
        with nbpeft.disable_adapters(llama):
            emb = llama.get_input_embeddings()
            full = torch.cat([emb(LEAD).expand(2, -1, -1), prompt.expand(2, -1, -1), emb(ids)], dim=1)
            ref = llama(inputs_embeds=full).logits
        generated = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.allclose(out, ref[:, N:], atol=1e-5)
    assert torch.equal(generated, greedy(llama, ids, 4))


def test_projection_trains_an_mlp_and_saves_the_folded_prefix(llama, tmp_path):
    ids = tokens()
    adapter = nbpeft.attach(llama, "prefix", num_virtual_tokens=N, projection=True, projection_hidden=8)
    width = 2 * 2 * 16
    assert adapter.num_params == N * 16 + (16 * 8 + 8) + (8 * width + width)
    with torch.no_grad():
        for p in llama.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        expected = llama(ids).logits
    nbpeft.save_adapter(llama, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (N, width)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_projection"] is False
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, expected, atol=1e-5)


def test_projection_starts_at_the_given_prefix(llama):
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N, projection=True, projection_hidden=16, init="random")
    target = file_layout(llama, LEAD)
    layer_of(llama).set_flat("default", target)
    with torch.no_grad():
        assert torch.allclose(layer_of(llama).flat("default"), target, atol=1e-4)


def test_save_and_load_follow_the_reference_layout(llama, tmp_path):
    ids = tokens()
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N, init="random")
    set_prefix(llama, file_layout(llama, LEAD))
    with torch.no_grad():
        expected = llama(ids).logits
    nbpeft.save_adapter(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert {k: config[k] for k in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
                                   "prefix_projection")} == {
        "num_virtual_tokens": N, "num_layers": 2, "token_dim": 16, "num_attention_heads": 2, "prefix_projection": False}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    flat = tensors["prompt_embeddings"]
    assert list(tensors) == ["prompt_embeddings"] and flat.shape == (N, 2 * 2 * 16)
    # read the tensor as the reference does: (batch, n, layers*2, heads, head_dim) -> (layers*2, batch, heads, n, head_dim)
    kv = flat.view(1, N, 4, 2, 8).permute(2, 0, 3, 1, 4).split(2)
    cache = DynamicCache(config=llama.config)
    with nbpeft.disable_adapters(llama), torch.no_grad():
        llama(LEAD, cache=cache, use_cache=True)
    for layer, (keys, values) in zip(cache.layers, kv):
        assert torch.allclose(keys, layer.keys, atol=1e-6) and torch.allclose(values, layer.values, atol=1e-6)
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


class NoCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


@pytest.mark.parametrize("options, message", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0 must be a positive integer"),
    ({"projection_hidden": 0}, "projection_hidden=0 must be a positive integer"),
    ({"init": "zero"}, "init='zero' is not allowed"),
    ({"prefix_projection": True}, "did you mean 'projection'"),
])
def test_bad_options_are_one_line_and_leave_the_model_alone(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(ConfigError, match=message) as err:
        nbpeft.attach(llama, "prefix", **options)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert not llama._forward_pre_hooks


def test_a_model_without_a_cache_is_refused():
    model = NoCache()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="NoCache takes no key/value cache"):
        nbpeft.attach(model, "prefix")
    assert_same(before, snapshot(model))


def test_gradient_checkpointing_is_refused(llama):
    llama.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing is on"):
        nbpeft.attach(llama, "prefix")
    llama.gradient_checkpointing_disable()
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N)
    data = [{"input_ids": tokens(), "labels": tokens(), "attention_mask": torch.ones_like(tokens())}]
    with pytest.raises(ConfigError, match="gradient_checkpointing=False"):
        nbpeft.train(llama, data, steps=1, gradient_checkpointing=True, live=False)
    result = nbpeft.train(llama, data, steps=2, lr=1e-2, live=False)
    assert result.steps == 2


def test_merge_is_refused(llama):
    nbpeft.attach(llama, "prefix", num_virtual_tokens=N)
    with pytest.raises(ConfigError, match="cannot be merged"):
        nbpeft.merge(llama)


def test_bert_prefix_masks_line_up_and_the_head_trains(bert, tmp_path):
    ids = tokens(length=6)
    adapter = nbpeft.attach(bert, "prefix", num_virtual_tokens=N)
    assert adapter.saved_modules == ["classifier"]
    assert adapter.num_params == N * 2 * 2 * 32 + 32 * 2 + 2
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        masked = bert(ids, attention_mask=mask).logits
        cut = bert(ids[1:, :4], attention_mask=mask[1:, :4]).logits
        with nbpeft.disable_adapters(bert):
            plain = bert(ids, attention_mask=mask).logits
    assert torch.allclose(masked[1:], cut, atol=1e-5)
    assert not torch.allclose(masked, plain, atol=1e-4)
    nbpeft.save_adapter(bert, tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    fresh = tiny_bert()
    nbpeft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits, masked)


# The bundled real model.

def test_smollm2_prefix_trains_generates_and_round_trips(smol, tmp_path):
    model, tokenizer = smol
    torch.manual_seed(0)
    adapter = nbpeft.attach(model, "prefix", num_virtual_tokens=20)
    assert adapter.num_params == 20 * 30 * 2 * 192 == 230_400
    data = [{"prompt": "What is the capital of France?", "response": "Paris is the capital of France."}] * 8
    result = nbpeft.train(model, data, tokenizer=tokenizer, steps=4, batch_size=2, max_length=48, lr=3e-2, live=False)
    assert result.losses[-1] < result.losses[0]
    answer = nbpeft.generate(model, tokenizer, "What is the capital of France?", max_new_tokens=4)
    assert isinstance(answer, str) and answer

    question = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**question).logits
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (192, 3, 30)
    nbpeft.detach(model)
    nbpeft.load_adapter(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**question).logits, logits)
