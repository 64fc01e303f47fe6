"""generate() and compare_answers(): real generation on a tiny random Llama with a character tokenizer."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import nbpeft
from nbpeft import core
from nbpeft.methods.base import ConfigError

from conftest import char_tokenizer, tiny_bert, tiny_llama, two_adapters

gen_module = importlib.import_module("nbpeft.inference.generate")
answers_module = importlib.import_module("nbpeft.inference.answers")

@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def reference(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """What model.generate answers greedily to ``text`` exactly as given."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def user(text: str) -> str:
    return f"<user>{text}\n<assistant>"


def forward_calls(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# one prompt, a list, greedy -------------------------------------------------------------------

def test_one_prompt_gives_a_string_and_a_list_gives_a_list(llama, tok):
    one = nbpeft.generate(llama, tok, "Hello", max_new_tokens=8)
    assert isinstance(one, str) and one
    assert nbpeft.generate(llama, tok, ["Hello"], max_new_tokens=8) == [one]
    assert nbpeft.generate(llama, tok, ("Hello", "Hi"), max_new_tokens=8)[0] == one


def test_greedy_equals_model_generate_through_the_chat_template(llama, tok):
    assert nbpeft.generate(llama, tok, "Hello there", max_new_tokens=12) == reference(llama, tok, user("Hello there"), 12)
    plain = char_tokenizer(chat=False)
    assert nbpeft.generate(llama, plain, "Hello there", 12) == reference(llama, plain, "Hello there", 12)


def test_a_batch_is_padded_on_the_left_and_answers_as_each_prompt_alone(llama, tok):
    prompts = ["Hi", "A longer question?", "Mid length"]
    alone = [nbpeft.generate(llama, tok, p, max_new_tokens=10) for p in prompts]
    assert nbpeft.generate(llama, tok, prompts, max_new_tokens=10) == alone
    assert nbpeft.generate(llama, tok, prompts, max_new_tokens=10, batch_size=2) == alone
    assert len(set(alone)) > 1


def test_generate_restores_train_mode(llama, tok):
    llama.train()
    nbpeft.generate(llama, tok, "Hello", max_new_tokens=2)
    assert llama.training


# stop strings ----------------------------------------------------------------------------------

def test_a_stop_string_cuts_the_answer_and_ends_generation(llama, tok):
    full = nbpeft.generate(llama, tok, "Hello", max_new_tokens=30)
    stop = next(full[i:i + 2] for i in range(3, len(full)) if " " not in full[i:i + 2])
    expected = full[:full.index(stop)].strip()
    calls = forward_calls(llama)
    answer = nbpeft.generate(llama, tok, "Hello", max_new_tokens=30, stop=[stop])
    assert answer == expected and stop not in answer
    assert len(calls) <= full.index(stop) + 3 < 30  # generation ended at the stop, not at max_new_tokens
    assert nbpeft.generate(llama, tok, "Hello", max_new_tokens=30, stop=["~never~", stop]) == expected
    assert nbpeft.generate(llama, tok, "Hello", max_new_tokens=30, stop="~never~") == full


def test_stop_strings_end_each_row_of_a_batch_separately(llama, tok):
    prompts = ["Hello", "Something else"]
    full = nbpeft.generate(llama, tok, prompts, max_new_tokens=30)
    stop = full[0][4:6]
    cut = nbpeft.generate(llama, tok, prompts, max_new_tokens=30, stop=stop)
    assert cut == [f[:f.index(stop)].strip() if stop in f else f for f in full]


# sampling --------------------------------------------------------------------------------------

def test_sampling_with_a_seed_is_repeatable_and_leaves_the_global_random_state(llama, tok):
    greedy = nbpeft.generate(llama, tok, "Hello", max_new_tokens=20)
    state = torch.get_rng_state()
    first = nbpeft.generate(llama, tok, "Hello", max_new_tokens=20, temperature=5.0, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert nbpeft.generate(llama, tok, "Hello", max_new_tokens=20, temperature=5.0, seed=0) == first
    assert first != greedy
    assert nbpeft.generate(llama, tok, "Hello", max_new_tokens=20, temperature=5.0, seed=1) != first


def test_a_tiny_top_p_keeps_only_the_most_likely_token(llama, tok):
    greedy = nbpeft.generate(llama, tok, "Hello", max_new_tokens=20)
    assert nbpeft.generate(llama, tok, "Hello", max_new_tokens=20, temperature=5.0, top_p=1e-6, seed=0) == greedy


# streaming -------------------------------------------------------------------------------------

def test_streaming_prints_the_same_text_as_the_answer(llama, tok, capsys):
    stop = nbpeft.generate(llama, tok, "Hello", max_new_tokens=30)[6:8]
    for options in ({}, {"stop": [stop]}, {"temperature": 2.0, "seed": 3}):
        plain = nbpeft.generate(llama, tok, "Hello", max_new_tokens=30, **options)
        capsys.readouterr()
        streamed = nbpeft.generate(llama, tok, "Hello", max_new_tokens=30, stream=True, **options)
        assert streamed == plain
        assert capsys.readouterr().out == plain + "\n"


def test_streaming_several_prompts_labels_each_answer(llama, tok, capsys):
    answers = nbpeft.generate(llama, tok, ["Hello", "Hi"], max_new_tokens=10, stream=True)
    assert answers == nbpeft.generate(llama, tok, ["Hello", "Hi"], max_new_tokens=10)
    assert capsys.readouterr().out == f"> Hello\n{answers[0]}\n\n> Hi\n{answers[1]}\n"


def test_streaming_in_a_notebook_updates_one_output_area_with_growing_text(llama, tok, monkeypatch):
    import IPython.display

    class Handle:
        updates: list[str] = []

        def update(self, data, raw):
            self.updates.append(data["text/plain"])

    shown = []
    monkeypatch.setattr(gen_module, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append(a) or Handle())
    monkeypatch.setattr(gen_module._StreamDisplay, "min_interval_s", 0.0)
    answer = nbpeft.generate(llama, tok, "Hello", max_new_tokens=20, stream=True)
    assert len(shown) == 1
    assert Handle.updates[-1] == answer and len(Handle.updates) > 5
    assert all(answer.startswith(u) for u in Handle.updates)


def test_held_back_text_is_the_start_of_a_stop_string():
    assert gen_module._held_back("the end\n", ["\n\n"]) == 1
    assert gen_module._held_back("the en", ["end.", "\n"]) == 2
    assert gen_module._held_back("the end", ["\n"]) == 0


# chat ------------------------------------------------------------------------------------------

def test_messages_are_rendered_with_the_chat_template_and_a_generation_prompt(llama, tok):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<assistant>")
    answer = nbpeft.generate(llama, tok, messages=chat, max_new_tokens=10)
    assert answer == reference(llama, tok, rendered, 10)
    assert nbpeft.generate(llama, tok, messages=[chat, chat[:2]], max_new_tokens=10) == [
        answer, nbpeft.generate(llama, tok, "Hi", max_new_tokens=10)]


# finding the tokenizer -------------------------------------------------------------------------

def test_the_tokenizer_is_found_from_the_model(llama, tok, tmp_path):
    expected = nbpeft.generate(llama, tok, "Hello", max_new_tokens=6)
    with pytest.raises(ConfigError, match=r"pass tokenizer=tokenizer"):
        nbpeft.generate(llama, prompts="Hello")
    tok.save_pretrained(tmp_path)
    llama.config._name_or_path = str(tmp_path)
    assert nbpeft.generate(llama, "Hello", max_new_tokens=6) == expected
    assert nbpeft.generate(llama, prompts=["Hello"], max_new_tokens=6) == [expected]


# errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, r"nothing to answer; pass a prompt"),
    ({"prompts": []}, r"nothing to answer"),
    ({"prompts": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, r"pass either prompts or messages=, not both"),
    ({"prompts": [1, 2]}, r"prompts must be a string or a list of strings"),
    ({"messages": [{"text": "Hi"}]}, r"messages= must be a list of"),
    ({"prompts": "Hi", "temperature": -1}, r"temperature=-1 must be 0 \(greedy\)"),
    ({"prompts": "Hi", "temperature": 1, "top_p": 0}, r"top_p=0 must be above 0 and at most 1"),
    ({"prompts": "Hi", "temperature": 1, "top_p": 1.5}, r"top_p=1.5 must be"),
    ({"prompts": "Hi", "top_p": 0.9}, r"top_p=0.9 applies only when sampling; set temperature="),
    ({"prompts": "Hi", "stop": [""]}, r"stop= takes non-empty strings"),
    ({"prompts": "Hi", "max_new_tokens": 0}, r"max_new_tokens=0 must be a positive integer"),
    ({"prompts": "Hi", "seed": 1.5}, r"seed=1.5 must be an integer"),
])
def test_bad_arguments_get_one_line(llama, tok, kwargs, message):
    with pytest.raises(ConfigError, match=r"^generate\(\): " + message) as err:
        nbpeft.generate(llama, tok, **kwargs)
    assert "\n" not in str(err.value)


def test_messages_need_a_chat_template_and_a_classifier_cannot_generate(llama):
    with pytest.raises(ConfigError, match=r"messages= needs a tokenizer with a chat template"):
        nbpeft.generate(llama, char_tokenizer(chat=False), messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(ConfigError, match=r"BertForSequenceClassification does not generate text"):
        nbpeft.generate(tiny_bert(), char_tokenizer(), "Hi")


# several samples of one prompt ------------------------------------------------------------------

SAMPLED = {"max_new_tokens": 12, "temperature": 3.0, "seed": 0}


def repeated_answers(model, tok, prompts, k, **options):
    """The answers of the same prompts each written out k times, in one batch: what num_samples must equal."""
    rows = [p for p in prompts for _ in range(k)]
    flat = nbpeft.generate(model, tok, rows, batch_size=len(rows), **SAMPLED, **options)
    return [flat[i:i + k] for i in range(0, len(flat), k)]


def forward_inputs(model) -> list[tuple[int, ...]]:
    """The shape of input_ids at every forward call of ``model``."""
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    return shapes


def test_samples_are_the_answers_of_the_prompt_repeated(llama, tok):
    prompts = ["Hi", "A longer question?", "Mid"]
    samples = nbpeft.generate(llama, tok, prompts, num_samples=4, **SAMPLED)
    assert [len(s) for s in samples] == [4, 4, 4]
    assert samples == repeated_answers(llama, tok, prompts, 4)  # the same draws: the same distribution
    assert all(len(set(s)) > 1 for s in samples)
    one = nbpeft.generate(llama, tok, "Hi", num_samples=4, **SAMPLED)
    assert isinstance(one, list) and len(one) == 4 and all(isinstance(a, str) for a in one)


def test_the_prompt_runs_through_the_model_once(llama, tok):
    prompts, k = ["Hi", "A longer question?"], 4
    width = max(len(tok(user(p), add_special_tokens=False)["input_ids"]) for p in prompts)
    shapes = forward_inputs(llama)
    nbpeft.generate(llama, tok, prompts, num_samples=k, **SAMPLED)
    assert shapes[0] == (2, width - 1)  # every prompt token but the last, once per prompt
    assert all(shape == (2 * k, 1) for shape in shapes[1:]) and len(shapes) <= 1 + SAMPLED["max_new_tokens"]
    prompt_tokens_shared = sum(rows * length for rows, length in shapes[:2])
    shapes.clear()
    repeated_answers(llama, tok, prompts, k)
    assert shapes[0] == (2 * k, width)  # written out k times, the prompt runs k times
    assert prompt_tokens_shared < sum(rows * length for rows, length in shapes[:2]) / 3


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("prefix", {"num_virtual_tokens": 3}),
                                             ("prompt", {"num_virtual_tokens": 3})])
def test_samples_of_an_adapter_equal_the_prompt_repeated(llama, tok, method, options):
    torch.manual_seed(3)
    nbpeft.attach(llama, method, **options)
    for param in core.adapter_parameters(llama, "default").values():
        param.data.normal_(0, 0.5)
    samples = nbpeft.generate(llama, tok, ["Hi", "Longer one?"], num_samples=3, **SAMPLED)
    assert samples == repeated_answers(llama, tok, ["Hi", "Longer one?"], 3)


def test_samples_with_adapter_names_route_every_copy(llama, tok):
    model = two_adapters(llama)
    names = ["pirate", "__base__"]
    samples = nbpeft.generate(model, tok, ["Hi", "Hello"], num_samples=2, adapter_names=names, **SAMPLED)
    rows = ["Hi", "Hi", "Hello", "Hello"]
    flat = nbpeft.generate(model, tok, rows, adapter_names=["pirate", "pirate", "__base__", "__base__"],
                           batch_size=4, **SAMPLED)
    assert samples == [flat[:2], flat[2:]]


def test_samples_of_a_seq2seq_model_equal_the_prompt_repeated():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=0,
                      eos_token_id=2, decoder_start_token_id=0)
    model, plain = T5ForConditionalGeneration(config).eval(), char_tokenizer(chat=False)
    samples = nbpeft.generate(model, plain, ["Hello", "Hi"], num_samples=3, **SAMPLED)
    assert samples == repeated_answers(model, plain, ["Hello", "Hi"], 3)
    assert all(len(set(s)) > 1 for s in samples)


def test_each_sample_ends_at_its_own_stop_string(llama, tok):
    free = nbpeft.generate(llama, tok, "Hi", num_samples=6, **SAMPLED)
    stop = next(ch for ch in "aeiou " if sum(ch in a for a in free) in range(1, 6))
    cut = nbpeft.generate(llama, tok, "Hi", num_samples=6, stop=stop, **SAMPLED)
    assert cut == [a[:a.index(stop)].strip() if stop in a else a for a in free]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 0, "temperature": 1.0}, r"num_samples=0 must be a positive integer"),
    ({"num_samples": 3}, r"num_samples=3 gives different answers only when sampling; set temperature= above 0"),
    ({"num_samples": 2, "temperature": 1.0, "stream": True}, r"stream=True shows one answer at a time"),
])
def test_bad_num_samples_get_one_line(llama, tok, kwargs, message):
    with pytest.raises(ConfigError, match=r"^generate\(\): " + message):
        nbpeft.generate(llama, tok, "Hi", **kwargs)


# compare_answers -------------------------------------------------------------------------------

def adapter_state(model):
    st = core.state(model)
    return (list(st.active), [(layer.active, layer.disabled) for _, layer in core.adapter_layers(model)],
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training,
            {n: a.merged for n, a in st.adapters.items()})


def test_each_adapter_and_the_base_answer_the_same_prompts(llama, tok):
    model = two_adapters(llama)
    prompts = ["Hello", "Where is the ship?"]
    with nbpeft.disable_adapters(model):
        base = nbpeft.generate(model, tok, prompts, max_new_tokens=8)
    expected = {"base": base}
    for name in ("pirate", "poet"):
        nbpeft.set_adapter(model, name)
        expected[name] = nbpeft.generate(model, tok, prompts, max_new_tokens=8)
    nbpeft.set_adapter(model, "poet")
    table = nbpeft.compare_answers(model, prompts, tokenizer=tok, max_new_tokens=8)
    assert table.prompts == prompts and table.columns == ["base", "pirate", "poet"]
    assert table.answers == expected
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters really answer differently
    only = nbpeft.compare_answers(model, prompts, adapters="pirate", tokenizer=tok, include_base=False, max_new_tokens=8)
    assert only.answers == {"pirate": expected["pirate"]}


def test_compare_answers_shows_a_table(llama, tok):
    model = two_adapters(llama)
    table = nbpeft.compare_answers(model, ["Hello", "Is 1 < 2?"], tokenizer=tok, max_new_tokens=6, stop="~")
    page = table._repr_html_()
    assert page.count("<tr>") == 3 and page.count("<th ") == 4
    assert "Is 1 &lt; 2?" in page
    text = repr(table).splitlines()
    assert text[0].split() == ["prompt", "base", "pirate", "poet"]
    assert text[2].startswith("Hello")
    for column, answers in table.answers.items():
        for answer in answers:
            assert answer.split()[0] in repr(table), column


def test_compare_answers_restores_the_model_also_after_an_error(llama, tok, monkeypatch):
    model = two_adapters(llama)
    nbpeft.set_adapter(model, "pirate")
    nbpeft.merge(model, "pirate")
    model.train()
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    before = adapter_state(model)
    nbpeft.compare_answers(model, "Hello", tokenizer=tok, max_new_tokens=4)
    assert adapter_state(model) == before

    real = answers_module.generate

    def fails_on_the_second_column(*args, **kwargs):
        if calls.append(1) or len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    calls: list[int] = []
    monkeypatch.setattr(answers_module, "generate", fails_on_the_second_column)
    with pytest.raises(KeyboardInterrupt):
        nbpeft.compare_answers(model, "Hello", tokenizer=tok, max_new_tokens=4)
    assert adapter_state(model) == before
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([[5, 6, 7]])).logits, logits, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"adapters": ["pirat"]}, r"no adapter named 'pirat'; attached: pirate, poet"),
    ({"stream": True}, r"stream= is not available here"),
    ({"temperature": -1}, r"^compare_answers\(\): temperature=-1"),
    ({"stop": ""}, r"^compare_answers\(\): stop= takes non-empty strings"),
    ({"max_tokens": 5}, r"unknown option max_tokens=; generation options are max_new_tokens, messages"),
])
def test_compare_answers_errors_are_one_line_and_change_nothing(llama, tok, kwargs, message):
    model = two_adapters(llama)
    nbpeft.merge(model, "poet")
    before = adapter_state(model)
    with pytest.raises(ConfigError, match=message) as err:
        nbpeft.compare_answers(model, "Hello", tokenizer=tok, **kwargs)
    assert "\n" not in str(err.value)
    assert adapter_state(model) == before


def test_compare_answers_on_a_model_without_adapters(tok):
    model = tiny_llama()
    table = nbpeft.compare_answers(model, "Hello", tokenizer=tok, max_new_tokens=5)
    assert table.answers == {"base": [nbpeft.generate(model, tok, "Hello", max_new_tokens=5)]}
    with pytest.raises(ConfigError, match=r"no adapter named 'x'; this model has no adapter"):
        nbpeft.compare_answers(model, "Hello", adapters="x", tokenizer=tok)
    with pytest.raises(ConfigError, match=r"nothing to compare"):
        nbpeft.compare_answers(model, "Hello", tokenizer=tok, include_base=False)


# the bundled SmolLM2 ---------------------------------------------------------------------------

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_smollm2_greedy_equals_model_generate_and_finds_its_tokenizer(smol):
    model, tokenizer = smol
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert "Paris" in expected
    assert nbpeft.generate(model, tokenizer, QUESTION, max_new_tokens=16) == expected
    assert nbpeft.generate(model, QUESTION, max_new_tokens=16) == expected
    assert nbpeft.generate(model, messages=[{"role": "user", "content": QUESTION}], max_new_tokens=16) == expected


@pytest.mark.slow
def test_smollm2_streams_what_it_returns_and_stops_at_a_stop_string(smol, capsys):
    model, tokenizer = smol
    prompt = "Name three colours, one per line."
    full = nbpeft.generate(model, tokenizer, prompt, max_new_tokens=32)
    capsys.readouterr()
    assert nbpeft.generate(model, tokenizer, prompt, max_new_tokens=32, stream=True) == full
    assert capsys.readouterr().out == full + "\n"
    first_line = nbpeft.generate(model, tokenizer, prompt, max_new_tokens=32, stop="\n", stream=True)
    assert first_line == full.split("\n")[0].strip() and first_line != full
    assert capsys.readouterr().out == first_line + "\n"
    sampled = nbpeft.generate(model, tokenizer, [prompt, QUESTION], max_new_tokens=12, temperature=0.8, top_p=0.9, seed=0)
    assert sampled == nbpeft.generate(model, tokenizer, [prompt, QUESTION], max_new_tokens=12, temperature=0.8,
                                      top_p=0.9, seed=0)
