"""Encoder-decoders (T5, BART, Whisper), image and audio examples, and LoRA on mixture-of-experts weights.

The family matrix (test_families.py) checks every method on every family; these tests check
what is particular to encoder-decoders: where prompts and prefixes go, generation through
the cache, seq2seq training data, the T-Few recipe on its home architecture, and expert
weights stored as 3-D parameters.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers

import nbpeft
from nbpeft.data.batches import Batches
from nbpeft.methods.lora_experts import ExpertLoRA
from nbpeft.methods.prefix import PrefixKV

from conftest import assert_same, char_tokenizer, snapshot
from families import inputs, outputs, tiny_batch, tiny_model


def small_t5(seed: int = 0) -> transformers.T5ForConditionalGeneration:
    """A T5 v1.1-style model (gated wi_0 / wi_1, as T0) over the character tokenizer's 98 ids."""
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                                   feed_forward_proj="gated-gelu")
    return transformers.T5ForConditionalGeneration(config).eval()


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache), to check generate() against."""
    decoded = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id)
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), decoder_input_ids=decoded).logits
        decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded


# ---------------------------------------------------------------- prompt and prefix tuning


def test_prompt_goes_before_the_encoder_input_and_generate_uses_it() -> None:
    model = small_t5()
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 12, 2]])
    base, base_logits = greedy(model, ids, 4), model(input_ids=ids, decoder_input_ids=ids).logits.detach()
    nbpeft.attach(model, "prompt", num_virtual_tokens=3, init="random")
    with torch.no_grad():
        for p in nbpeft.core.trainable_parameters(model):
            p.normal_(0, 5.0)  # a prompt strong enough to change the answer
    # the encoder sees the prompt: its output is 3 positions longer
    encoded = model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert encoded.last_hidden_state.shape[1] == ids.shape[1] + 3
    expected = greedy(model, ids, 4)
    assert (model(input_ids=ids, decoder_input_ids=ids).logits - base_logits).abs().max() > 1e-3
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)
    nbpeft.detach(model)
    assert torch.equal(greedy(model, ids, 4), base)
    assert not model.get_encoder()._forward_pre_hooks


def test_prefix_goes_into_the_decoder_self_attention_and_generate_uses_it() -> None:
    model = small_t5()
    ids = torch.tensor([[5, 6, 7, 8, 2]])
    base_logits = model(input_ids=ids, decoder_input_ids=ids).logits.detach()
    nbpeft.attach(model, "prefix", num_virtual_tokens=3, init="random")
    expected = greedy(model, ids, 4)
    assert (model(input_ids=ids, decoder_input_ids=ids).logits - base_logits).abs().max() > 1e-3
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), expected)
    # the encoder runs unchanged: the prefix lives in the decoder only, as in the reference
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids).last_hidden_state
        nbpeft.detach(model)
        assert torch.equal(encoded, model.get_encoder()(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("family, layers, reads", [("t5", 2, [0, 0]), ("bart", 3, [0, 2, 1]), ("bart", 4, [0, 2, 0, 2])])
def test_prefix_decoder_layer_i_reads_stored_layer_2i_mod_layers(family: str, layers: int, reads: list[int]) -> None:
    # The reference (peft 0.21.2 and 0.22.0) stacks an encoder-decoder's prefix twice and hands it out
    # four entries per layer, so decoder layer i gets stored layer 2i mod L; files mean this in both.
    model = tiny_model(family, layers=layers)
    nbpeft.attach(model, "prefix", num_virtual_tokens=3, init="random")
    stored = layer_of_prefix(model).flat("default").detach().view(3, layers * 2, -1)  # n x (key, value per layer) x width
    batch = inputs(model, tiny_batch(family))
    with torch.no_grad():
        cache = model(**batch, use_cache=True).cache.self_attention_cache
    assert len(cache.layers) == layers
    for i, layer in enumerate(cache.layers):
        keys = layer.keys[0, :, :3].permute(1, 0, 2).reshape(3, -1)  # the prefix positions of the first row
        values = layer.values[0, :, :3].permute(1, 0, 2).reshape(3, -1)
        assert torch.equal(keys, stored[:, 2 * reads[i]]) and torch.equal(values, stored[:, 2 * reads[i] + 1])


def test_prefix_vocab_init_gives_each_decoder_layer_its_own_keys_under_the_reference_order() -> None:
    # init='vocab' starts decoder layer i at the keys and values it computes itself for sampled tokens,
    # placed in the stored layer it reads (2i mod L), as in a file the reference would read the same way
    model = tiny_model("bart", layers=3)
    torch.manual_seed(5)
    nbpeft.attach(model, "prefix", num_virtual_tokens=3, init="vocab")
    torch.manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    own = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():  # the decoder alone: the prefix enters only through the whole model's forward
        model.get_decoder()(input_ids=ids, encoder_hidden_states=torch.zeros(1, 1, 16), cache=own, use_cache=True)
        used = model(**inputs(model, tiny_batch("bart")), use_cache=True).cache.self_attention_cache
    for mine, computed in zip(used.layers, own.self_attention_cache.layers):
        assert torch.allclose(mine.keys[0, :, :3], computed.keys[0], atol=1e-6)
        assert torch.allclose(mine.values[0, :, :3], computed.values[0], atol=1e-6)


def layer_of_prefix(model) -> PrefixKV:
    layer = model.get_input_embeddings()
    while not isinstance(layer, PrefixKV):
        layer = layer.base_layer
    return layer


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_encoder_decoder_files_use_the_two_submodule_layout(method: str, tmp_path) -> None:
    import json

    from safetensors.torch import load_file

    model = tiny_model("t5")
    nbpeft.attach(model, method, num_virtual_tokens=4)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensor = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    assert config["num_transformer_submodules"] == 2 and config["task_type"] == "SEQ_2_SEQ_LM"
    # prompt: rows for the encoder, then for a decoder prompt the reference keeps but does not read
    assert tensor.shape[0] == (8 if method == "prompt" else 4)


# ---------------------------------------------------------------- data: seq2seq, images, audio


def test_prompt_response_examples_become_encoder_input_and_decoder_labels() -> None:
    tokenizer = char_tokenizer(chat=False)
    batches = Batches([{"prompt": "add one to 4", "response": "5"}, {"prompt": "hi", "response": "hello"}],
                      tokenizer, batch_size=2, max_length=64, seed=0, model=tiny_model("t5"))
    batch = next(iter(batches.once()))
    rows = {tokenizer.decode(r, skip_special_tokens=True) for r in batch["input_ids"]}
    assert rows == {"add one to 4", "hi"}
    labels = [[t for t in r.tolist() if t != -100] for r in batch["labels"]]
    assert sorted(tokenizer.decode(r, skip_special_tokens=True) for r in labels) == ["5", "hello"]
    assert all(r[-1] == tokenizer.eos_token_id for r in labels)  # the model learns to stop
    assert batch["labels"].shape[1] < batch["input_ids"].shape[1]  # each side padded to its own length


def test_train_and_generate_on_seq2seq_examples() -> None:
    tokenizer = char_tokenizer(chat=False)
    model = small_t5()
    nbpeft.attach(model, "lora", targets="all-linear", r=8)
    data = [{"prompt": f"echo {c}", "response": c} for c in "abcdefgh"]
    result = nbpeft.train(model, data, tokenizer=tokenizer, steps=12, batch_size=8, lr=3e-2, warmup=0,
                          live=False, compile=False)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    # generate(): the prompt in the encoder, the answer from the decoder's tokens alone
    answers = nbpeft.generate(model, tokenizer, ["echo a", "echo bc"], max_new_tokens=3)
    for prompt, answer in zip(["echo a", "echo bc"], answers):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        decoded = greedy(model, ids, 3)[0].tolist()
        decoded = decoded[: decoded.index(2)] if 2 in decoded else decoded  # generation ends at </s>
        assert answer == tokenizer.decode(decoded, skip_special_tokens=True).strip()


def test_encoder_decoder_refuses_plain_text_in_one_line() -> None:
    with pytest.raises(nbpeft.ConfigError, match=r"encoder-decoder model trains on \{'prompt'"):
        Batches(["just text"], char_tokenizer(), batch_size=1, max_length=16, seed=0, model=tiny_model("t5"))


def test_lists_of_image_and_audio_examples_train() -> None:
    images = [{"pixel_values": np.random.default_rng(i).normal(size=(3, 8, 8)).astype("float32"), "label": i % 3}
              for i in range(6)]
    audio = [{"input_features": torch.randn(8, 16), "labels": torch.randint(3, 90, (4,))} for _ in range(4)]
    for family, data in (("vit", images), ("whisper", audio)):
        model = tiny_model(family)
        nbpeft.attach(model, "lora")
        result = nbpeft.train(model, data, steps=2, batch_size=2, lr=1e-2, warmup=0, live=False, compile=False)
        assert result.steps == 2 and all(np.isfinite(result.losses))
        assert result.history[0]["tokens"] == 2  # counted in examples


def test_image_examples_of_different_shapes_are_refused_in_one_line() -> None:
    data = [{"pixel_values": torch.zeros(3, 8, 8), "label": 0}, {"pixel_values": torch.zeros(3, 4, 4), "label": 1}]
    model = tiny_model("vit")
    nbpeft.attach(model, "lora")
    with pytest.raises(nbpeft.ConfigError, match="'pixel_values' differs in shape between examples"):
        nbpeft.train(model, data, steps=1, batch_size=2, live=False, compile=False)


# ---------------------------------------------------------------- T-Few: (IA)³ on T5


def test_ia3_defaults_on_t5_follow_the_paper() -> None:
    model = small_t5()
    adapter = nbpeft.attach(model, "ia3")
    leaves = {t.split(".", 3)[-1] for t in adapter.targets}
    # keys and values of every attention (encoder self, decoder self and cross) and the FFN's wo
    assert leaves == {"layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.1.EncDecAttention.k",
                      "layer.1.EncDecAttention.v", "layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"}
    wo = model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    # wo's input is scaled: the intermediate activation, after wi_0 / wi_1, one entry per d_ff
    assert wo.ia3_l["default"].numel() == model.config.d_ff


def synthetic_choices(n: int, seed: int) -> list[dict]:
    """A learnable multiple-choice task: the word decides yes or no, a random letter is noise."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "sky", "red", "big", "old", "new"]
    out = []
    for _ in range(n):
        word = rng.choice(words)
        out.append({"prompt": f"{word} {rng.choice('abcdefgh')}", "choices": ["yes", "no"], "label": words.index(word) % 2})
    return out


def test_tfew_recipe_on_t5_learns_a_multiple_choice_task() -> None:
    tokenizer = char_tokenizer(chat=False)
    torch.manual_seed(0)
    model = small_t5()
    train, test = synthetic_choices(64, seed=0), synthetic_choices(64, seed=1)
    nbpeft.attach(model, "ia3")
    curve = [nbpeft.choice_accuracy(model, test, tokenizer)]
    loader = nbpeft.choice_batches(train, tokenizer, batch_size=8)
    for _ in range(6):
        nbpeft.train(model, loader, steps=10, lr=0.1, warmup=0, live=False, compile=False, loss_fn=nbpeft.tfew_loss)
        curve.append(nbpeft.choice_accuracy(model, test, tokenizer))
    print("accuracy every 10 steps:", curve)
    assert curve[0] < 0.65 and max(curve[-2:]) >= 0.85, curve
    # predict_choices reads examples without labels and agrees with choice_accuracy
    predicted = nbpeft.predict_choices(model, [{k: v for k, v in ex.items() if k != "label"} for ex in test], tokenizer)
    assert sum(p == ex["label"] for p, ex in zip(predicted, test)) / len(test) == curve[-1]


def test_tfew_terms_on_t5_score_the_choice_with_the_decoder() -> None:
    tokenizer = char_tokenizer(chat=False)
    model = small_t5()
    examples = [{"prompt": "cat a", "choices": ["yes", "no"], "label": 0}]
    batch = next(iter(nbpeft.choice_batches(examples, tokenizer, shuffle=False)))
    token_logp, mask = nbpeft.training.tfew.choice_token_logprobs(model, batch)
    # by hand: the decoder's log-probabilities of "no</s>" given the prompt in the encoder
    target = torch.tensor([tokenizer("no")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer("cat a")["input_ids"]]), labels=target).logits
    expected = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logp[0, 1][mask[0, 1]], expected[0])
    loss = nbpeft.tfew_loss(model, batch)
    assert torch.isfinite(loss) and loss > 0


# ---------------------------------------------------------------- mixture of experts


def test_lora_on_expert_parameters(tmp_path) -> None:
    model, batch = tiny_model("mixtral"), tiny_batch("mixtral")
    base, before = outputs(model, batch), snapshot(model)
    adapter = nbpeft.attach(model, "lora", target_parameters="experts", r=2, alpha=4)
    assert "expert weights: 2 parameters in 1 modules" in adapter.notes
    torch.testing.assert_close(outputs(model, batch), base, rtol=0, atol=0)
    keys = set(nbpeft.core.adapter_parameters(model, "default"))
    # the reference's nesting: gate_up_proj (defined first) inner, down_proj outer
    experts = "model.layers.0.mlp.experts"
    assert keys == {f"{experts}.lora_A.weight", f"{experts}.lora_B.weight",
                    f"{experts}.base_layer.lora_A.weight", f"{experts}.base_layer.lora_B.weight"}
    assert nbpeft.core.adapter_parameters(model, "default")[f"{experts}.lora_A.weight"].shape == (2 * 2, 32)

    optimizer = torch.optim.AdamW(nbpeft.core.trainable_parameters(model), lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    stepped = outputs(model, batch)
    assert (stepped - base).abs().max() > 1e-6
    # the update by hand: expert e's gate_up_proj gains s * B_e A_e
    layer = model.get_submodule(experts)
    assert isinstance(layer, ExpertLoRA)
    A, B = layer.lora_A["default"]["gate_up_proj"], layer.lora_B["default"]["gate_up_proj"]
    torch.testing.assert_close(layer.delta("default", "gate_up_proj")[1], 2.0 * B[:, 1::2] @ A[2:4])

    nbpeft.save_adapter(model, tmp_path)
    fresh = tiny_model("mixtral")
    nbpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh, batch), stepped)
    nbpeft.merge(model)
    torch.testing.assert_close(outputs(model, batch), stepped)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(("method", "options", "message"), [
    ("dora", {"target_parameters": "experts"}, "for method 'lora' only"),
    ("lora", {"target_parameters": ["q_proj.weight"]}, "a 2-D parameter"),
    ("lora", {"target_parameters": ["experts.up"]}, "no parameter matched"),
])
def test_expert_parameters_refusals_in_one_line(method: str, options: dict, message: str) -> None:
    model = tiny_model("mixtral")
    before = snapshot(model)
    with pytest.raises(nbpeft.ConfigError, match=message):
        nbpeft.attach(model, method, **options)
    assert_same(before, snapshot(model))


def test_experts_shortcut_needs_a_mixture_of_experts_family() -> None:
    with pytest.raises(nbpeft.ConfigError, match="needs a mixture-of-experts family"):
        nbpeft.attach(tiny_model("llama"), "lora", target_parameters="experts")


def test_whisper_prefix_applies_when_the_caller_turns_the_cache_off() -> None:
    # train() passes use_cache=False; Whisper drops a cache it is told not to use, and the prefix with it
    model, batch = tiny_model("whisper"), tiny_batch("whisper")
    with torch.no_grad():
        base = model(**inputs(model, batch), use_cache=False).logits
        nbpeft.attach(model, "prefix", num_virtual_tokens=2, init="random")
        with_prefix = model(**inputs(model, batch), use_cache=False).logits
    assert with_prefix.shape == base.shape and (with_prefix - base).abs().max() > 1e-4
