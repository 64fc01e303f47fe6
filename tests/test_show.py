"""nbpeft.show_example: one example as the model sees it, the tokens under the loss marked."""

from __future__ import annotations

import pytest

import nbpeft
from nbpeft.data.batches import remember_tokenizer

from conftest import tiny_llama

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}


def test_a_conversation_shows_the_assistant_turn_under_the_loss(smol_tokenizer):
    ex = nbpeft.show_example([CONVERSATION], smol_tokenizer, 0)
    assert ex.kind == "chat" and ex.where == "row 0"
    assert "".join(ex.tokens) == smol_tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert "".join(t for t, trained in zip(ex.tokens, ex.trained) if trained) == "Paris.<|im_end|>"
    assert ex.num_trained == len(smol_tokenizer("Paris.<|im_end|>")["input_ids"])
    assert ex.num_masked == ex.num_tokens - ex.num_trained > 0
    text = repr(ex)
    assert text.splitlines()[0] == f"row 0 (chat), {ex.num_tokens} tokens: {ex.num_trained} under the loss, {ex.num_masked} masked"
    assert "<|im_start|>assistant\n⟦Paris.<|im_end|>⟧\n" in text


def test_in_a_notebook_it_is_html_with_trained_tokens_highlighted_and_masked_ones_dimmed(smol_tokenizer):
    page = nbpeft.show_example([CONVERSATION], smol_tokenizer, 0)._repr_html_()
    from nbpeft.data.preview import MASKED_STYLE, TRAINED_STYLE

    assert page.count(f'<span style="{TRAINED_STYLE}">') == 1 + nbpeft.show_example([CONVERSATION], smol_tokenizer).num_trained
    assert f'<span style="{TRAINED_STYLE}">Paris</span>' in page
    assert f'<span style="{MASKED_STYLE}">&lt;|im_start|&gt;</span>' in page
    assert "under the loss" in page and "masked" in page


def test_prompt_response_text_and_classification_rows(smol_tokenizer):
    pair = nbpeft.show_example([{"q": "Hi?", "a": "Hello."}], smol_tokenizer, columns={"prompt": "q", "response": "a"})
    assert "".join(t for t, on in zip(pair.tokens, pair.trained) if on) == "Hello.<|im_end|>\n"
    text = nbpeft.show_example(["one two"], smol_tokenizer)
    assert text.trained == [False] + [True] * (text.num_tokens - 1)  # nothing predicts the first token
    labelled = nbpeft.show_example([{"text": "great film", "label": 1}], smol_tokenizer)
    assert labelled.label == 1 and "label 1" in repr(labelled) and not any(labelled.trained)


def test_max_length_shows_the_cut_and_a_dropped_example(smol_tokenizer):
    long = {"prompt": "word " * 50, "response": "ok"}
    ex = nbpeft.show_example([long], smol_tokenizer, 0, max_length=16)
    assert ex.num_tokens == 16 and ex.cut > 0 and ex.num_trained == 0
    assert f"max_length=16 cut {ex.cut} more; no labelled token is left, so training drops it" in repr(ex)


def test_the_tokenizer_can_come_from_the_model(smol_tokenizer):
    model = tiny_llama()
    remember_tokenizer(model, smol_tokenizer)
    assert nbpeft.show_example([CONVERSATION], model, 0).tokens == nbpeft.show_example([CONVERSATION], smol_tokenizer, 0).tokens
    with pytest.raises(nbpeft.ConfigError, match=r"show_example\(\): text data needs a tokenizer and none belongs to this "
                                                 r"model; pass the tokenizer: show_example\(data, tokenizer, i\)"):
        nbpeft.show_example([CONVERSATION], tiny_llama(), 0)


@pytest.mark.parametrize("i, message", [
    (3, r"i=3 is past the end; the data has 2 rows \(0 to 1\)"),
    (-1, r"i=-1 must be a row number, 0 or more"),
])
def test_a_bad_index_says_what_exists(smol_tokenizer, i, message):
    with pytest.raises(nbpeft.ConfigError, match=message):
        nbpeft.show_example([CONVERSATION, CONVERSATION], smol_tokenizer, i)


def test_a_bad_row_is_named(smol_tokenizer):
    with pytest.raises(nbpeft.ConfigError, match=r"show_example\(\): row 1 is an empty conversation"):
        nbpeft.show_example([CONVERSATION, {"messages": []}], smol_tokenizer, 1)
