"""New tokens: the vocabulary grows, only the new rows train (as part of the adapter), save and load round-trip."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import nbpeft
from nbpeft.data.new_tokens import TokenEmbedding, TokenHead
from nbpeft.models import resolve_name

from conftest import assert_same, snapshot

NEW = ["<tool>", "</tool>"]


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    return str(resolve_name("smollm2-135m"))


def fresh_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(path)


def tiny(vocab: int, tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random Llama with the real tokenizer's vocabulary size."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def setup(request, tokenizer_path):
    tokenizer = fresh_tokenizer(tokenizer_path)
    return tiny(len(tokenizer), request.param), tokenizer, request.param


def text_ids(tokenizer, text: str = "call <tool>search</tool> now") -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def moved_token_rows(model, tokenizer) -> None:
    """A random LoRA plus NEW token rows moved away from their start, as if trained."""
    nbpeft.attach(model, "lora", init="random")
    nbpeft.add_tokens(model, tokenizer, NEW)
    with torch.no_grad():
        for layer in (model.model.embed_tokens, model.lm_head):
            for p in layer.trainable_tokens_delta.values():
                p.add_(torch.randn_like(p))


def test_identity_at_attach_and_rows_grow_with_the_mean(setup) -> None:
    model, tokenizer, tied = setup
    old_rows = len(tokenizer)
    nbpeft.attach(model, "lora")
    plain = text_ids(tokenizer, "call search now")
    before = logits(model, plain)
    embed_before = model.model.embed_tokens.weight.detach().clone()

    result = nbpeft.add_tokens(model, tokenizer, NEW)

    assert result.ids == [old_rows, old_rows + 1] and result.adapter == "default"
    assert len(tokenizer) == old_rows + 2 and model.config.vocab_size == old_rows + 2
    assert tokenizer.encode("<tool>", add_special_tokens=False) == [old_rows]
    assert isinstance(model.model.embed_tokens, TokenEmbedding) and isinstance(model.lm_head, TokenHead)
    embed = model.model.embed_tokens.base_layer.weight
    assert torch.equal(embed[:old_rows], embed_before)
    assert torch.allclose(embed[old_rows], embed_before.mean(0), atol=1e-6)
    assert (model.lm_head.base_layer.weight is embed) == tied
    after = logits(model, plain)
    assert torch.equal(after[..., :old_rows], before)
    assert "trains the rows of 2 tokens" in repr(nbpeft.core.state(model).adapters["default"])


def test_only_the_new_rows_change_when_trained(setup) -> None:
    model, tokenizer, tied = setup
    nbpeft.attach(model, "lora")
    nbpeft.add_tokens(model, tokenizer, NEW)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    start = rows.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("base_layer.weight") for n in trainable)

    data = ["call <tool>search</tool> now", "use <tool>calc</tool> please"] * 4
    nbpeft.train(model, data, tokenizer=tokenizer, steps=3, lr=1e-2, batch_size=4, live=False)

    assert not torch.equal(rows.detach(), start)
    if not tied:  # the untied head trains its own copy of the new rows
        assert not torch.equal(model.lm_head.trainable_tokens_delta["default"].detach(), start)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_save_fresh_base_load_equal_logits(setup, tokenizer_path, tmp_path) -> None:
    model, tokenizer, tied = setup
    moved_token_rows(model, tokenizer)
    ids = text_ids(tokenizer)
    want = logits(model, ids)
    nbpeft.save_adapter(model, tmp_path / "a")

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    expected = {"model.embed_tokens": [len(tokenizer) - 2, len(tokenizer) - 1]}
    if not tied:
        expected["lm_head"] = expected["model.embed_tokens"]
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == expected
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert tensors[key].shape == (2, 32)
    assert ("base_model.model.lm_head.token_adapter.trainable_tokens_delta" in tensors) == (not tied)

    base_tokenizer = fresh_tokenizer(tokenizer_path)
    base_vocab = len(base_tokenizer)
    fresh = tiny(base_vocab, tied)
    grown = nbpeft.add_tokens(fresh, base_tokenizer, NEW)  # no adapter: only the vocabulary grows
    assert grown.adapter is None and "no adapter attached" in repr(grown)
    nbpeft.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(text_ids(base_tokenizer), ids)
    torch.testing.assert_close(logits(fresh, ids), want, rtol=0, atol=1e-6)

    resized = tiny(base_vocab, tied)
    resized.resize_token_embeddings(len(tokenizer))  # the rows the file replaces start random here
    nbpeft.load_adapter(resized, tmp_path / "a")
    torch.testing.assert_close(logits(resized, ids), want, rtol=0, atol=1e-6)


def test_detach_restores_every_original_row_exactly(setup) -> None:
    model, tokenizer, tied = setup
    old_rows = len(tokenizer)
    before = snapshot(model)
    nbpeft.attach(model, "lora")
    nbpeft.add_tokens(model, tokenizer, NEW)
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["default"].add_(1.0)
    nbpeft.merge(model)
    nbpeft.unmerge(model)
    nbpeft.detach(model)

    after = snapshot(model)
    assert after["types"] == before["types"] and after["grads"] == before["grads"]
    # the vocabulary keeps its new size and the tokenizer its tokens: the two still agree
    assert model.model.embed_tokens.num_embeddings == len(tokenizer) == old_rows + 2
    for key, value in before["weights"].items():
        grown = after["weights"][key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(grown[:old_rows], value), key
            assert torch.allclose(grown[old_rows:], value.mean(0).expand(2, -1), atol=1e-6), key
        else:
            assert torch.equal(grown, value), key


def test_merge_folds_the_rows_and_keeps_the_logits(setup) -> None:
    model, tokenizer, tied = setup
    moved_token_rows(model, tokenizer)
    ids = text_ids(tokenizer)
    want = logits(model, ids)
    nbpeft.merge(model)
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=1e-5)


def test_load_refuses_a_smaller_vocabulary(tokenizer_path, tmp_path) -> None:
    tokenizer = fresh_tokenizer(tokenizer_path)
    model = tiny(len(tokenizer), tied=True)
    nbpeft.attach(model, "lora")
    nbpeft.add_tokens(model, tokenizer, NEW)
    nbpeft.save_adapter(model, tmp_path / "a")

    small = tiny(len(tokenizer) - len(NEW), tied=True)
    before = snapshot(small)
    with pytest.raises(nbpeft.ConfigError) as err:
        nbpeft.load_adapter(small, tmp_path / "a")
    message = str(err.value)
    assert "\n" not in message and "49,152 rows" in message and "nbpeft.add_tokens(" in message
    assert "resize_token_embeddings(49154)" in message
    assert_same(before, snapshot(small))


@pytest.mark.parametrize(
    ("tokens", "says"),
    [
        ([], "non-empty list"),
        ("<tool>", "one string"),
        (["<tool>", 3], "not a token"),
        (["<tool>", ""], "not a token"),
        (["<tool>", "<tool>"], "listed twice"),
        (["<tool>", "hello"], "already in the vocabulary"),
    ],
)
def test_bad_tokens_say_so_and_change_nothing(tokenizer_path, tokens, says) -> None:
    tokenizer = fresh_tokenizer(tokenizer_path)
    model = tiny(len(tokenizer), tied=False)
    nbpeft.attach(model, "lora")
    before, size = snapshot(model), len(tokenizer)
    with pytest.raises(nbpeft.ConfigError, match=says) as err:
        nbpeft.add_tokens(model, tokenizer, tokens)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(model))
    assert len(tokenizer) == size


def test_methods_without_a_place_for_token_rows_are_refused(tokenizer_path) -> None:
    tokenizer = fresh_tokenizer(tokenizer_path)
    model = tiny(len(tokenizer), tied=False)
    nbpeft.attach(model, "ia3")
    with pytest.raises(nbpeft.ConfigError, match="attach a lora adapter"):
        nbpeft.add_tokens(model, tokenizer, NEW)
    assert len(tokenizer) == 49152


def test_a_second_call_extends_the_adapter_rows(tokenizer_path, tmp_path) -> None:
    tokenizer = fresh_tokenizer(tokenizer_path)
    model = tiny(len(tokenizer), tied=True)
    nbpeft.attach(model, "lora")
    nbpeft.add_tokens(model, tokenizer, NEW)
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["default"].fill_(0.5)
    nbpeft.add_tokens(model, tokenizer, ["<call>"])
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    assert rows.shape == (3, 32) and rows.requires_grad
    assert torch.equal(rows[:2], torch.full((2, 32), 0.5))
    assert model.model.embed_tokens.token_ids["default"] == [49152, 49153, 49154]


def test_reads_the_whole_matrices_the_reference_adds_after_a_resize(tokenizer_path, tmp_path) -> None:
    from safetensors.torch import save_file

    tokenizer = fresh_tokenizer(tokenizer_path)
    model = tiny(len(tokenizer), tied=True)
    nbpeft.attach(model, "lora", init="random")
    nbpeft.add_tokens(model, tokenizer, NEW)
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["default"].add_(1.0)
    ids = text_ids(tokenizer)
    want = logits(model, ids)
    folder = tmp_path / "a"
    nbpeft.save_adapter(model, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model."
    rows = tensors[prefix + "model.embed_tokens.token_adapter.trainable_tokens_delta"]
    matrix = torch.randn(49154, 32)  # the resized matrix: random new rows, the original rows as the base's
    matrix[:49152] = model.model.embed_tokens.base_layer.weight[:49152].detach()
    tensors[prefix + "model.embed_tokens.token_adapter.base_layer.weight"] = matrix
    tensors[prefix + "lm_head.token_adapter.base_layer.weight"] = matrix.clone()
    tensors[prefix + "lm_head.token_adapter.trainable_tokens_delta"] = rows.clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    fresh = tiny(49152, tied=True)
    nbpeft.add_tokens(fresh, fresh_tokenizer(tokenizer_path), NEW)
    nbpeft.load_adapter(fresh, folder)
    torch.testing.assert_close(logits(fresh, ids), want, rtol=0, atol=1e-5)

    other = tiny(49152, tied=True, seed=1)  # another base: its original rows differ from the saved matrix
    nbpeft.add_tokens(other, fresh_tokenizer(tokenizer_path), NEW)
    before = snapshot(other)
    with pytest.raises(nbpeft.ConfigError, match="saved from another base model"):
        nbpeft.load_adapter(other, folder)
    assert_same(before, snapshot(other))
