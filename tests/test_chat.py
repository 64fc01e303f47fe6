"""Conversations: rendered with the chat template, the loss on every assistant turn up to its end-of-turn token."""

from __future__ import annotations

import copy

import pytest
import torch

import nbpeft
from nbpeft.data.batches import IGNORE, Batches, chat, tokenize
from nbpeft.datasets import load_dataset, path

from conftest import assert_same, snapshot

SYSTEM = {"role": "system", "content": "Answer in one line."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]


@pytest.fixture
def plain_tokenizer(smol_tokenizer):
    """The same tokenizer without a chat template."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


def labelled_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE])


def test_the_loss_sees_every_assistant_turn_with_its_end_of_turn_token_and_nothing_else(smol_tokenizer):
    tok = smol_tokenizer
    enc = tokenize({"messages": CONVERSATION}, "chat", tok)
    assert labelled_text(tok, enc) == "Paris.<|im_end|>Madrid.<|im_end|>"
    # the input is exactly the template's rendering of the whole conversation
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # the label runs are the two assistant turns, each ending on the end-of-turn token
    runs, current = [], []
    for t, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE:
            assert label == t
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    assert [r[-1] for r in runs] == [tok.convert_tokens_to_ids("<|im_end|>")] * 2
    assert [tok.decode(r[:-1]) for r in runs] == ["Paris.", "Madrid."]


def test_an_assistant_reply_that_repeats_the_prompt_is_still_found_by_position(smol_tokenizer):
    """The span comes from rendering prefixes, not from searching for the reply's text."""
    echo = [{"role": "user", "content": "Say assistant"}, {"role": "assistant", "content": "Say assistant"}]
    enc = tokenize({"messages": echo}, "chat", smol_tokenizer)
    assert labelled_text(smol_tokenizer, enc) == "Say assistant<|im_end|>"
    assert enc["labels"].count(IGNORE) > len(smol_tokenizer("Say assistant")["input_ids"])


def test_a_tokenizer_without_a_template_gets_the_documented_default(plain_tokenizer):
    batches = Batches([{"messages": CONVERSATION}], plain_tokenizer, 1, 256, 0)
    assert plain_tokenizer.chat_template == chat.DEFAULT_TEMPLATE
    assert batches.notes == ["this tokenizer has no chat template; conversations use nbpeft.data.chat.DEFAULT_TEMPLATE, "
                             "now set as tokenizer.chat_template so generation matches training"]
    enc = batches.examples[0]
    eos = plain_tokenizer.eos_token
    assert plain_tokenizer.decode(enc["input_ids"]).startswith(f"<|system|>\nAnswer in one line.{eos}\n<|user|>\n")
    assert labelled_text(plain_tokenizer, enc) == f"Paris.{eos}Madrid.{eos}"
    # generation prompts now follow the same template
    assert nbpeft.data.batches.chat_prompt(plain_tokenizer, "Hi").endswith("<|user|>\nHi" + eos + "\n<|assistant|>\n")


def test_a_conversation_whose_assistant_turns_are_all_cut_is_refused_in_one_line(smol_tokenizer, llama):
    long_first = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": CONVERSATION}, {"messages": long_first}]
    with pytest.raises(nbpeft.ConfigError, match=r"^train\(\): row 1: max_length=64 cuts off every assistant turn of "
                                                  r"this conversation; raise max_length= or shorten its earlier turns$"):
        Batches(rows, smol_tokenizer, 2, 64, 0)
    # nothing trained, the model unchanged
    nbpeft.attach(llama, "lora", r=2)
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="row 1: max_length=64 cuts off every assistant turn"):
        nbpeft.train(llama, rows, tokenizer=smol_tokenizer, steps=1, max_length=64, live=False)
    assert_same(before, snapshot(llama))
    # a turn cut in the middle keeps its first tokens under the loss, without an end-of-turn token
    cut = Batches([{"messages": CONVERSATION}], smol_tokenizer, 1, 40, 0)
    assert cut.truncated == 1 and cut.dropped == 0


@pytest.mark.parametrize("messages, message", [
    ([], r"row 1 is an empty conversation; give it a user and an assistant turn, or remove it"),
    ([{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}],
     r"row 1 turn 0 has content of type list, not text; make it a string"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
     r"row 1 turn 1 has content of type NoneType, not text"),
    ([{"role": "user", "content": "hi"}], r"row 1 has no assistant turn, so nothing to learn; add one or remove the row"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}],
     r"row 1 turn 0 has role 'human'; use one of system, user, assistant, tool"),
    ([{"role": "assistant", "content": "x"}], r"row 1 starts with an assistant turn; put a system or user turn first"),
    ([{"content": "hi"}], r"row 1 turn 0 is not \{'role': ..., 'content': ...\}; fix that turn"),
    ("hello", r"row 1 has no 'messages' list"),
])
def test_a_bad_conversation_is_named_and_nothing_trains(llama, smol_tokenizer, messages, message):
    nbpeft.attach(llama, "lora", r=2)
    before = snapshot(llama)
    rows = [{"messages": CONVERSATION}, {"messages": messages}]
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        nbpeft.train(llama, rows, tokenizer=smol_tokenizer, steps=1, live=False)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(llama))


def test_a_template_that_rejects_a_conversation_is_named(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}" \
                        "{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(nbpeft.ConfigError, match=r"the chat template rejects row 0 \(no system role\)"):
        Batches([{"messages": CONVERSATION}], tok, 1, 64, 0)


def test_the_shipped_conversations_are_multi_turn_with_a_system_turn_in_one_style(smol_tokenizer):
    train, held_out = load_dataset("radio_chat"), load_dataset("radio_eval")
    assert len(train) >= 40 and len(held_out) >= 10
    for row in train + held_out:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and roles[1:] == ["user", "assistant"] * (len(roles) // 2)
        for m in row["messages"][2::2]:
            assert m["content"].startswith("Copy that. ") and m["content"].endswith(" Over.")
    assert sum(len(row["messages"]) > 3 for row in train) >= 10  # multi-turn
    questions = {m["content"] for row in train for m in row["messages"] if m["role"] == "user"}
    assert not questions & {m["content"] for row in held_out for m in row["messages"] if m["role"] == "user"}
    assert Batches(train, smol_tokenizer, 4, 256, 0).truncated == 0
    assert Batches(str(path("radio_chat")), smol_tokenizer, 4, 256, 0).examples == Batches(train, smol_tokenizer, 4, 256, 0).examples
    with pytest.raises(ValueError, match="unknown dataset 'radio'; available: "):
        path("radio")


@pytest.mark.slow
def test_a_short_chat_fine_tune_answers_in_style_and_stops_at_the_end_of_turn(smol):
    """Twelve LoRA steps on the shipped conversations; held-out questions get short, styled replies that end on <|im_end|>."""
    model, tokenizer = smol
    torch.manual_seed(0)
    nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    result = nbpeft.train(model, load_dataset("radio_chat"), steps=12, batch_size=4, lr=3e-3, max_length=160,
                          compile=False, live=False)
    assert result.losses[-1] < result.losses[0]
    system = load_dataset("radio_chat")[0]["messages"][0]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    max_new_tokens = 64
    replies = []
    for question in ("What is the capital of Germany?", "How many legs does a cat have?", "What colour is grass?"):
        ids = tokenizer.apply_chat_template([system, {"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        assert new[-1] == end_of_turn and len(new) < max_new_tokens // 2, tokenizer.decode(new)
        replies.append(tokenizer.decode(new, skip_special_tokens=True))
    assert all(reply.startswith("Copy that.") and reply.endswith("Over.") for reply in replies), replies


SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_the_system_prompt_a_template_adds_is_found_by_rendering(smol_tokenizer, plain_tokenizer):
    assert chat.added_system_prompt(smol_tokenizer) == SMOL_SYSTEM
    assert SMOL_SYSTEM in smol_tokenizer.decode(tokenize({"prompt": "Hi", "response": "Hello"}, "prompt-response",
                                                        smol_tokenizer)["input_ids"])  # what the note is about
    assert chat.added_system_prompt(plain_tokenizer) is None
    plain_tokenizer.chat_template = chat.DEFAULT_TEMPLATE
    assert chat.added_system_prompt(plain_tokenizer) is None  # nbpeft's own default adds none


def test_rows_without_a_system_message_get_a_note_naming_the_added_prompt(smol_tokenizer):
    pairs = Batches([{"prompt": "Hi", "response": "Hello"}], smol_tokenizer, 1, 256, 0)
    assert pairs.notes == [f"the chat template adds the system prompt {SMOL_SYSTEM!r} to every example without one; "
                           "give rows as {'messages': [{'role': 'system', 'content': ...}, {'role': 'user', ...}, "
                           "{'role': 'assistant', ...}]} to train with your own"]
    without = Batches([{"messages": CONVERSATION[1:3]}], smol_tokenizer, 1, 256, 0)
    assert [n for n in without.notes if "system prompt" in n] == [
        f"the chat template adds the system prompt {SMOL_SYSTEM!r} to every example without one; "
        "start a conversation with a {'role': 'system', ...} message to train with your own"]
    assert Batches([{"messages": CONVERSATION}], smol_tokenizer, 1, 256, 0).notes == []  # each gives its own
