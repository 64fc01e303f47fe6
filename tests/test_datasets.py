"""The data sets that ship with nbpeft: they load, have the documented fields, and splits stay apart."""

from __future__ import annotations

from collections import Counter

import pytest

from nbpeft.datasets import available, load_dataset

INSTRUCTION = {"pirate_chat": 160, "pirate_eval": 24}
CLASSIFICATION = {"reviews": 240, "reviews_test": 80}
SPLITS = [("pirate_chat", "pirate_eval", "prompt"), ("reviews", "reviews_test", "text")]


def test_every_shipped_file_is_listed():
    assert set(INSTRUCTION) | set(CLASSIFICATION) <= set(available())
    assert available() == sorted(available())


@pytest.mark.parametrize("name", sorted(INSTRUCTION))
def test_instruction_sets_have_prompts_and_responses(name):
    data = load_dataset(name)
    assert len(data) == INSTRUCTION[name]
    for example in data:
        assert set(example) == {"prompt", "response"}
        assert example["prompt"].strip() and example["response"].strip()


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_classification_sets_are_labelled_and_balanced(name):
    data = load_dataset(name)
    assert len(data) == CLASSIFICATION[name]
    for example in data:
        assert set(example) == {"text", "label"}
        assert isinstance(example["text"], str) and example["text"].strip() == example["text"] != ""
        assert type(example["label"]) is int
    counts = Counter(example["label"] for example in data)
    assert set(counts) == {0, 1}
    assert counts[0] == counts[1] == len(data) // 2


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_labels_are_shuffled_not_sorted(name):
    """Batches of the first examples must not be all one label."""
    labels = [example["label"] for example in load_dataset(name)]
    assert len(set(labels[:16])) == 2


@pytest.mark.parametrize("train, test, field", SPLITS)
def test_no_example_is_repeated_or_shared_between_splits(train, test, field):
    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    train_texts = [normal(example[field]) for example in load_dataset(train)]
    test_texts = [normal(example[field]) for example in load_dataset(test)]
    assert len(set(train_texts)) == len(train_texts)
    assert len(set(test_texts)) == len(test_texts)
    assert not set(train_texts) & set(test_texts)


def test_unknown_name_says_what_exists():
    with pytest.raises(ValueError, match="unknown dataset 'pirates'; available: .*pirate_chat.*reviews"):
        load_dataset("pirates")
