"""Prompt tuning: the adapted model is the base model run on [prompt; input embeddings]."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft.layers import IGNORE
from nbpeft.methods.base import ConfigError
from nbpeft.methods.prompt import PromptEmbedding

from conftest import assert_same, snapshot, tiny_bert, tiny_llama, tokens

N = 5


def prompt_of(model, name="default"):
    layer = model.get_input_embeddings()
    while not isinstance(layer, PromptEmbedding):
        layer = layer.base_layer
    return layer.prompt_embeddings[name]


def base_on_prompt(model, ids, prompt, **extra):
    """The base model fed [prompt; embed(ids)] explicitly, as the reference runs it."""
    with nbpeft.disable_adapters(model), torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        full = torch.cat([prompt.detach().expand(ids.shape[0], -1, -1), embeds], dim=1)
        return model(inputs_embeds=full, **extra)


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def greedy(model, ids, steps):
    """Greedy decoding without a cache: one full forward per new token."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_trainable_parameters_are_the_prompt(llama):
    adapter = nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    assert adapter.num_params == N * 32
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.prompt_embeddings.default"]
    assert "5 virtual tokens" in repr(adapter)


def test_outputs_equal_the_base_model_fed_the_prompt(llama):
    ids = tokens()
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    with torch.no_grad():
        out = llama(ids).logits
    assert out.shape == (2, N + 6, 128)
    assert torch.allclose(out, base_on_prompt(llama, ids, prompt_of(llama)).logits, atol=1e-6)


def test_mask_and_labels_are_extended(llama):
    ids = tokens(length=7)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the second row
    labels = ids.masked_fill(mask == 0, IGNORE)
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    with torch.no_grad():
        out = llama(ids, attention_mask=mask, labels=labels)
    full_mask = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1)
    full_labels = torch.cat([torch.full((2, N), IGNORE), labels], dim=1)
    ref = base_on_prompt(llama, ids, prompt_of(llama), attention_mask=full_mask, labels=full_labels)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)


def test_disabled_gives_the_base_model_and_detach_restores_it(llama):
    ids = tokens()
    before = snapshot(llama)
    with torch.no_grad():
        base = llama(ids).logits
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    with nbpeft.disable_adapters(llama), torch.no_grad():
        assert torch.equal(llama(ids).logits, base)
    nbpeft.detach(llama)
    assert not llama._forward_pre_hooks
    assert_same(before, snapshot(llama))
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, base)


def test_generate_with_cache_equals_full_recompute(llama):
    ids = tokens()
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    perturb(llama)
    with torch.no_grad():
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy(llama, ids, 6))
    first = base_on_prompt(llama, ids, prompt_of(llama)).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 6], first)


def test_left_padding_gives_the_same_answer(llama):
    """Positions (RoPE) count from the first real token, after the prompt."""
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    perturb(llama)
    short = torch.tensor([[5, 9, 3, 7]])
    padded = torch.tensor([[0, 0, 5, 9, 3, 7], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = llama.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=5, do_sample=False)
        batch = llama.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(batch[0, 6:], alone[0, 4:])


def test_two_prompts_switch_with_set_adapter(llama):
    ids = tokens()
    nbpeft.attach(llama, "prompt", name="a", num_virtual_tokens=3)
    nbpeft.attach(llama, "prompt", name="b", num_virtual_tokens=4, init="vocab")
    assert len(llama._forward_pre_hooks) == 1
    for name, n in (("a", 3), ("b", 4)):
        nbpeft.set_adapter(llama, name)
        with torch.no_grad():
            out = llama(ids).logits
        assert out.shape[1] == n + 6
        assert torch.allclose(out, base_on_prompt(llama, ids, prompt_of(llama, name)).logits, atol=1e-6)
        assert [n_ for n_, p in llama.named_parameters() if p.requires_grad] == [f"model.embed_tokens.prompt_embeddings.{name}"]
    nbpeft.detach(llama, "b")
    assert len(llama._forward_pre_hooks) == 1
    nbpeft.detach(llama, "a")
    assert not llama._forward_pre_hooks


def test_vocab_and_text_init(llama):
    table = llama.get_input_embeddings().weight
    nbpeft.attach(llama, "prompt", name="v", num_virtual_tokens=N, init="vocab")
    rows = prompt_of(llama, "v")
    assert all(any(torch.equal(r, t) for t in table) for r in rows)

    def tokenizer(text):  # 3 tokens, repeated to 5 and cut to 2
        return {"input_ids": [7, 8, 9]}

    nbpeft.attach(llama, "prompt", name="t", num_virtual_tokens=5, init="text", init_text="any", tokenizer=tokenizer)
    assert torch.equal(prompt_of(llama, "t"), table[[7, 8, 9, 7, 8]])
    nbpeft.attach(llama, "prompt", name="s", num_virtual_tokens=2, init="text", init_text="any", tokenizer=tokenizer)
    assert torch.equal(prompt_of(llama, "s"), table[[7, 8]])


@pytest.mark.parametrize("options, message", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0 must be a positive integer"),
    ({"init": "zeros"}, "init='zeros' is not allowed"),
    ({"init": "text"}, "init='text' needs init_text"),
    ({"init": "text", "init_text": "hi"}, "needs a tokenizer"),
    ({"init_text": "hi"}, "init_text is used only with init='text'"),
    ({"n_tokens": 4}, "did you mean 'num_virtual_tokens'"),
    ({"init": "text", "init_text": "hi", "tokenizer_name_or_path": "/no/such/tokenizer"}, "cannot load tokenizer"),
    ({"init": "text", "init_text": "hi", "tokenizer": lambda text: {"input_ids": [500]}}, "use the model's own tokenizer"),
    ({"init": "text", "init_text": "hi", "tokenizer": lambda text: {"input_ids": []}}, "has no tokens"),
])
def test_bad_options_are_one_line_and_leave_the_model_alone(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(ConfigError, match=message) as err:
        nbpeft.attach(llama, "prompt", **options)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert not llama._forward_pre_hooks and getattr(llama, "_nbpeft", None) is None


def test_merge_is_refused(llama):
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    with pytest.raises(ConfigError, match="cannot be merged"):
        nbpeft.merge(llama)


def test_save_and_load_into_a_fresh_model(llama, tmp_path):
    ids = tokens()
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N, init="vocab")
    perturb(llama)
    with torch.no_grad():
        expected = llama(ids).logits
    nbpeft.save_adapter(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert {k: config[k] for k in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers",
                                   "num_attention_heads", "prompt_tuning_init")} == {
        "num_virtual_tokens": N, "token_dim": 32, "num_transformer_submodules": 1, "num_layers": 2,
        "num_attention_heads": 4, "prompt_tuning_init": "SAMPLE_VOCAB"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (N, 32)

    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_text_init_is_written_with_its_text(llama, tmp_path):
    def tokenizer(text):
        return {"input_ids": [1, 2]}

    tokenizer.name_or_path = "my-tokenizer"
    nbpeft.attach(llama, "prompt", num_virtual_tokens=3, init="text", init_text="Classify:", tokenizer=tokenizer)
    assert nbpeft.core.state(llama).adapters["default"].options["tokenizer_name_or_path"] == "my-tokenizer"
    nbpeft.save_adapter(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"], config["tokenizer_name_or_path"]) == (
        "TEXT", "Classify:", "my-tokenizer")


def test_bert_classifier_prompt_head_trains_and_round_trips(bert, tmp_path):
    ids = tokens()
    types = torch.ones_like(ids)
    adapter = nbpeft.attach(bert, "prompt", num_virtual_tokens=N)
    assert adapter.saved_modules == ["classifier"]
    assert adapter.num_params == N * 32 + 32 * 2 + 2
    perturb(bert)
    with torch.no_grad():
        out = bert(ids, token_type_ids=types).logits
    full_types = torch.cat([torch.zeros(2, N, dtype=types.dtype), types], dim=1)
    with torch.no_grad():
        prompt = prompt_of(bert)
        head = bert.classifier.modules_to_save["default"]
        with nbpeft.disable_adapters(bert):
            embeds = torch.cat([prompt.expand(2, -1, -1), bert.get_input_embeddings()(ids)], dim=1)
            pooled = bert.bert(inputs_embeds=embeds, token_type_ids=full_types).pooler_output
    assert torch.allclose(out, head(pooled), atol=1e-5)

    nbpeft.save_adapter(bert, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # the reference keys a prompt adapter's head under "base_model." alone
    assert sorted(tensors) == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    fresh = tiny_bert()
    nbpeft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids, token_type_ids=types).logits, out)


def test_training_moves_only_the_prompt(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    start = prompt_of(llama).detach().clone()
    data = [{"input_ids": tokens(), "labels": tokens(), "attention_mask": torch.ones_like(tokens())}] * 2
    result = nbpeft.train(llama, data, steps=3, lr=1e-2, live=False)
    assert result.steps == 3
    assert not torch.equal(prompt_of(llama).detach(), start)
    nbpeft.detach(llama)
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())


# The bundled real models.

def test_smollm2_prompt_trains_generates_and_round_trips(smol, tmp_path):
    model, tokenizer = smol
    adapter = nbpeft.attach(model, "prompt", num_virtual_tokens=20, init="text",
                            init_text="Classify the sentiment of this review:", tokenizer=tokenizer)
    assert adapter.num_params == 20 * 576 == 11_520
    ids = tokenizer("Classify the sentiment of this review:")["input_ids"]
    expected_ids = (ids * 20)[:20]
    assert torch.equal(prompt_of(model).detach(), model.get_input_embeddings().weight[expected_ids])
    nbpeft.attach(model, "prompt", name="by_path", num_virtual_tokens=20, init="text",
                  init_text="Classify the sentiment of this review:", tokenizer_name_or_path=tokenizer.name_or_path)
    assert torch.equal(prompt_of(model, "by_path"), prompt_of(model))
    nbpeft.detach(model, "by_path")

    data = [{"prompt": "What is the capital of France?", "response": "Paris is the capital of France."}] * 8
    result = nbpeft.train(model, data, tokenizer=tokenizer, steps=4, batch_size=2, max_length=48, lr=3e-2, live=False)
    assert result.losses[-1] < result.losses[0]

    answer = nbpeft.generate(model, tokenizer, "What is the capital of France?", max_new_tokens=4)
    assert isinstance(answer, str) and answer
    question = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**question).logits
    nbpeft.save_adapter(model, tmp_path)
    nbpeft.detach(model)
    nbpeft.load_adapter(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**question).logits, logits)


def test_minilm_classifier_prompt_trains_the_head(minilm):
    model, tokenizer = minilm
    torch.manual_seed(0)
    adapter = nbpeft.attach(model, "prompt", num_virtual_tokens=8)
    assert adapter.saved_modules == ["classifier"]
    assert adapter.num_params == 8 * 384 + 384 * 2 + 2
    texts = ["I loved this wonderful, brilliant film", "I hated this dreadful, boring film"]
    data = [{"text": texts[0], "label": 1}, {"text": texts[1], "label": 0}] * 4
    batch = tokenizer(texts, return_tensors="pt", padding=True)

    def loss():
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=torch.tensor([1, 0])).loss.item()

    before = loss()
    nbpeft.train(model, data, tokenizer=tokenizer, steps=4, batch_size=4, lr=3e-2, live=False)
    assert loss() < before


def test_a_deep_copy_carries_its_own_prompt(llama):
    import copy

    ids = tokens()
    nbpeft.attach(llama, "prompt", num_virtual_tokens=N)
    with torch.no_grad():
        expected = llama(ids).logits
    twin = copy.deepcopy(llama)
    with torch.no_grad():
        prompt_of(twin).add_(1.0)
        assert not torch.allclose(twin(ids).logits, expected)
    nbpeft.detach(twin)
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, expected)  # the original keeps its hook and prompt
    table = nbpeft.compare(llama, methods=["prompt", "prefix"])
    assert [row["trainable"] for row in table.rows] == [20 * 32, 20 * 2 * 2 * 16]
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, expected)


def test_a_file_for_another_model_is_refused_and_the_model_untouched(llama, tmp_path):
    import transformers

    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    nbpeft.attach(wider, "prompt", num_virtual_tokens=N)
    nbpeft.save_adapter(wider, tmp_path)
    before = snapshot(llama)
    with pytest.raises(ConfigError, match="shape mismatch") as err:
        nbpeft.load_adapter(llama, tmp_path)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))
    assert not llama._forward_pre_hooks
