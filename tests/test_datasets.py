"""The data sets that ship with nbpeft: they load, have the documented fields, and splits stay apart."""

from __future__ import annotations

from collections import Counter

import pytest

from nbpeft.datasets import available, load_dataset

INSTRUCTION = {"pirate_chat": 160, "pirate_eval": 24}
CLASSIFICATION = {"reviews": 240, "reviews_test": 80}
PREFERENCES = {"direct_answers": 183, "direct_answers_test": 40}
SPLITS = [("pirate_chat", "pirate_eval", "prompt"), ("reviews", "reviews_test", "text"),
          ("direct_answers", "direct_answers_test", "prompt")]


def test_every_shipped_file_is_listed():
    assert set(INSTRUCTION) | set(CLASSIFICATION) | set(PREFERENCES) <= set(available())
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


# preference pairs -------------------------------------------------------------------------------

def direct(answer: str) -> bool:
    """One or two short sentences that end with a period and open with no remark about the question."""
    filler = ("oh", "hmm", "well", "so", "okay", "right", "ah", "hi", "great", "sure")
    return (answer.endswith(".") and len(answer.split()) <= 16
            and answer.split()[0].strip(",!.").lower() not in filler)


@pytest.mark.parametrize("name", sorted(PREFERENCES))
def test_preference_pairs_differ_in_one_consistent_style(name):
    data = load_dataset(name)
    assert len(data) == PREFERENCES[name]
    for pair in data:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v.strip() == v != "" for v in pair.values())
        assert direct(pair["chosen"]), pair
        assert not direct(pair["rejected"]) and pair["rejected"][-1] in "!?", pair
        assert len(pair["rejected"].split()) > 2 * len(pair["chosen"].split())
    assert len({pair["prompt"].split()[0] for pair in data}) >= 6  # varied questions, not one template
    assert len({pair["rejected"].split(".")[0] for pair in data}) >= 8  # varied filler


def test_the_unpaired_view_labels_each_answer():
    pairs = load_dataset("direct_answers")
    rows = load_dataset("direct_answers", unpaired=True)
    assert len(rows) == 2 * len(pairs)
    assert rows[0] == {"prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"], "label": True}
    assert rows[1] == {"prompt": pairs[0]["prompt"], "completion": pairs[0]["rejected"], "label": False}
    assert Counter(row["label"] for row in rows) == {True: len(pairs), False: len(pairs)}
    with pytest.raises(ValueError, match=r"^load_dataset\(\): 'reviews' has no preference pairs to unpair; leave out "
                                         r"unpaired=True, or load one of direct_answers, direct_answers_test$"):
        load_dataset("reviews", unpaired=True)


def test_preference_sets_load_as_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    from nbpeft.datasets import path

    table = datasets.load_dataset("json", data_files=str(path("direct_answers_test")), split="train")
    assert table.column_names == ["prompt", "chosen", "rejected"]
    assert table.to_list() == load_dataset("direct_answers_test")
