"""Training data in the forms people have it: lists, datasets, DataFrames, files; bad rows; the tokenizer lookup."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nbpeft
from nbpeft.data.batches import IGNORE, Batches, MissingTokenizer, remember_tokenizer, tokenizer_for

from conftest import assert_same, snapshot, tiny_llama


class CharTokenizer:
    """One id per character; enough of the tokenizer interface for data tests."""

    eos_token = "\x03"
    pad_token = "\x00"
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, **_):
        return {"input_ids": [1 + ord(c) % 120 for c in text]}


PAIRS = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(5)]
RENAMED = [{"question": p["prompt"], "answer": p["response"], "id": i} for i, p in enumerate(PAIRS)]
COLUMNS = {"prompt": "question", "response": "answer"}


def encoded(data, **kwargs):
    return [(e["input_ids"], e["labels"]) for e in Batches(data, CharTokenizer(), 2, 64, 0, **kwargs).examples]


def test_columns_map_other_names_onto_prompt_and_response():
    assert encoded(RENAMED, columns=COLUMNS) == encoded(PAIRS)


def test_a_column_named_in_columns_but_missing_names_the_row():
    rows = RENAMED[:2] + [{"question": "q"}]
    with pytest.raises(nbpeft.ConfigError, match=r"row 2 has no column 'answer' \(named in columns=\); its columns are question"):
        Batches(rows, CharTokenizer(), 2, 64, 0, columns=COLUMNS)


def test_columns_read_in_the_datasets_direction_too():
    datasets_direction = {"question": "prompt", "answer": "response"}  # data column -> nbpeft's name
    assert encoded(RENAMED, columns=datasets_direction) == encoded(RENAMED, columns=COLUMNS) == encoded(PAIRS)
    pytest.importorskip("datasets")
    import datasets

    assert encoded(datasets.Dataset.from_list(RENAMED), columns=datasets_direction) == encoded(PAIRS)


@pytest.mark.parametrize("rows, columns, message", [
    (RENAMED, {"query": "prompt"},
     "columns={'query': 'prompt'}: 'query' is neither a column of the data nor a name nbpeft reads; map each data "
     "column to one of prompt, response, text, label, messages, e.g. columns={'question': 'prompt'} "
     "(the data's columns are question, answer, id)"),
    (RENAMED, {"question": "prompt", "response": "answer"}, ": it mixes both directions; map each data column"),
    ([{"prompt": "p", "text": "t", "response": "r"}], {"prompt": "text"},
     "columns={'prompt': 'text'} reads both ways: the data has columns named as nbpeft's fields "
     "(prompt, text, response); rename the data's columns first"),
])
def test_columns_that_do_not_read_one_way_are_one_line(rows, columns, message):
    with pytest.raises(nbpeft.ConfigError) as err:
        Batches(rows, CharTokenizer(), 2, 64, 0, columns=columns)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_rows_name_columns_and_the_columns_seen():
    with pytest.raises(nbpeft.ConfigError, match=re.escape("its columns are question, answer, id: name them with "
                                                           "columns=, e.g. columns={'question': 'prompt'}")):
        Batches(RENAMED, CharTokenizer(), 2, 64, 0)


def test_hugging_face_datasets_dataset_dict_and_stream():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RENAMED)
    assert encoded(ds, columns=COLUMNS) == encoded(PAIRS)
    assert encoded(datasets.DatasetDict({"train": ds}), columns=COLUMNS) == encoded(PAIRS)
    with pytest.raises(nbpeft.ConfigError, match="has no 'train' split \\(it has test\\); pass one split, e.g. data\\['test'\\]"):
        Batches(datasets.DatasetDict({"test": ds}), CharTokenizer(), 2, 64, 0)
    stream = Batches(datasets.IterableDataset.from_generator(lambda: iter(PAIRS)), CharTokenizer(), 2, 64, 0)
    assert stream.per_epoch is None
    first_pass = list(stream.once())
    padded = list(Batches(PAIRS, CharTokenizer(), 2, 64, 0).once())
    assert len(first_pass) == 3
    for got, want in zip(first_pass, padded):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_stream_needs_steps(llama):
    datasets = pytest.importorskip("datasets")
    nbpeft.attach(llama, "lora", r=2)
    stream = datasets.IterableDataset.from_generator(lambda: iter(PAIRS))
    with pytest.raises(nbpeft.ConfigError, match="this data has no length; pass steps="):
        nbpeft.train(llama, stream, tokenizer=CharTokenizer(), live=False)
    result = nbpeft.train(llama, stream, tokenizer=CharTokenizer(), steps=4, batch_size=2, live=False)
    assert result.steps == 4  # 3 batches a pass: the stream is read again


def test_pandas_dataframe():
    pd = pytest.importorskip("pandas")
    assert encoded(pd.DataFrame(RENAMED), columns=COLUMNS) == encoded(PAIRS)
    labelled = pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]})
    assert [e["labels"] for e in Batches(labelled, CharTokenizer(), 2, 64, 0).examples] == [1, 0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_csv_files_and_globs(tmp_path):
    want = encoded(PAIRS)
    assert encoded(str(write_jsonl(tmp_path / "a.jsonl", RENAMED)), columns=COLUMNS) == want
    (tmp_path / "b.json").write_text(json.dumps(PAIRS))
    assert encoded(tmp_path / "b.json") == want
    (tmp_path / "c.csv").write_text("prompt,response\n" + "".join(f'"{p["prompt"]}",{p["response"]}\n' for p in PAIRS))
    assert encoded(str(tmp_path / "c.csv")) == want
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "1.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "parts" / "2.jsonl", PAIRS[2:])
    assert encoded(str(tmp_path / "parts" / "*.jsonl")) == want


def test_parquet_file(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(RENAMED), tmp_path / "d.parquet")
    assert encoded(str(tmp_path / "d.parquet"), columns=COLUMNS) == encoded(PAIRS)


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, r"train\(\): .*missing.jsonl does not exist; check the path"),
    ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": }\n',
     r"bad.jsonl line 2 is not valid JSON \(Expecting value at column 29\); fix that line"),
    ("bad.json", '[{"prompt": "a",\n "response": "b"},\n]', r"bad.json line 3 is not valid JSON"),
    ("bad.csv", 'prompt,response\na,b\nc\n', r"bad.csv line 3 has 1 fields, the header 2; fix that line"),
    ("obj.json", '{"prompt": "a", "response": "b"}', r"obj.json holds a dict; a .json file must hold a list"),
    ("notes.txt", "hello", r"cannot read notes.txt: nbpeft reads .jsonl, .json, .csv, .parquet files"),
    ("none-*.jsonl", None, r"no file matches .*none-\*.jsonl'; check the pattern"),
    ("empty.jsonl", "\n", r"holds no rows; add examples to the file"),
])
def test_a_file_that_is_missing_or_does_not_parse_is_one_line_and_trains_nothing(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=2)
    before = snapshot(model)
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        nbpeft.train(model, str(path), tokenizer=CharTokenizer(), steps=2, live=False)
    assert "\n" not in str(err.value) and str(err.value).startswith("train(): ")
    assert_same(before, snapshot(model))


def test_a_folder_asks_for_a_glob(tmp_path):
    with pytest.raises(nbpeft.ConfigError, match=r"is a folder; pass a file or a glob such as"):
        Batches(str(tmp_path), CharTokenizer(), 2, 64, 0)


@pytest.mark.parametrize("rows, message", [
    (PAIRS[:2] + [{"prompt": "q"}], r"row 2 has no 'response' \(it has prompt\); give every row 'prompt' and 'response', "
                                    r"or map yours with columns=\{'response': 'your_name'\}"),
    (PAIRS[:1] + [{"prompt": "q", "response": 3}], r"row 1 has 'response' of type int, not text; make it a string"),
    (["text", {"text": "x"}], r"row 1 is a dict, but row 0 is a string; make every row a string"),
    ([{"text": "good", "label": "yes"}], r"row 0 has label 'yes'; labels must be integers"),
    ([{"question": "q"}], r"cannot read examples like \"\{'question': 'q'\}\" \(row 0\); use strings, "),
    ([], r"data is empty; pass at least one example"),
])
def test_a_bad_row_is_named_with_its_fix_and_nothing_trains(llama, rows, message):
    nbpeft.attach(llama, "lora", r=2)
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=message):
        nbpeft.train(llama, rows, tokenizer=CharTokenizer(), steps=2, live=False)
    assert_same(before, snapshot(llama))


def test_a_bad_row_in_a_file_is_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", PAIRS[:3] + [{"prompt": "q"}])
    with pytest.raises(nbpeft.ConfigError, match=r"qa.jsonl line 4 has no 'response'"):
        Batches(str(path), CharTokenizer(), 2, 64, 0)


def test_truncation_is_counted_reported_once_at_the_start_and_in_the_result(llama):
    rows = [{"prompt": "p" * 10, "response": "r" * 30}, {"prompt": "p" * 40, "response": "r"}, {"prompt": "a", "response": "b"}]
    batches = Batches(rows, CharTokenizer(), 2, 20, 0)
    assert (batches.truncated, batches.dropped) == (2, 1)
    assert batches.notes == ["max_length=20 cut 2 of 3 examples and dropped 1 of them whose labelled tokens were all "
                             "past it (e.g. row 1); raise max_length= to keep more"]
    nbpeft.attach(llama, "lora", r=2)
    events = []
    result = nbpeft.train(llama, rows, tokenizer=CharTokenizer(), steps=2, batch_size=2, max_length=20,
                          live=lambda event, payload: events.append((event, payload)))
    assert [e for e, _ in events] == ["begin", "note", "step", "step", "end"]
    assert events[1][1].message == batches.notes[0]
    assert (result.truncated, result.dropped) == (2, 1)
    assert nbpeft.train(llama, rows, tokenizer=CharTokenizer(), steps=1, max_length=64, live=False).truncated == 0


def test_the_tokenizer_goes_with_the_model(tmp_path, smol_tokenizer):
    model = tiny_llama()
    given = CharTokenizer()
    assert tokenizer_for(model, given) is given
    with pytest.raises(MissingTokenizer, match=r"^train\(\): text data needs a tokenizer and none belongs to this model; "
                                               r"pass tokenizer=tokenizer$") as err:
        tokenizer_for(model)
    assert err.value.with_fix("pass --tokenizer NAME").endswith("none belongs to this model; pass --tokenizer NAME")
    remember_tokenizer(model, given)
    assert tokenizer_for(model) is given
    # a model loaded from a local folder: the tokenizer saved beside it, read offline
    smol_tokenizer.save_pretrained(tmp_path)
    other = tiny_llama()
    other.config._name_or_path = str(tmp_path)
    found = tokenizer_for(other)
    assert found("hello")["input_ids"] == smol_tokenizer("hello")["input_ids"]
    assert tokenizer_for(other) is found  # remembered


def test_train_without_a_tokenizer_uses_the_models_own(tmp_path, smol_tokenizer):
    smol_tokenizer.save_pretrained(tmp_path)
    model = tiny_llama()
    model.resize_token_embeddings(len(smol_tokenizer))
    model.config._name_or_path = str(tmp_path)
    nbpeft.attach(model, "lora", r=2)
    result = nbpeft.train(model, ["hello there", "good morning"], steps=2, batch_size=2, live=False)
    assert result.steps == 2
    bare = tiny_llama()
    nbpeft.attach(bare, "lora", r=2)
    with pytest.raises(nbpeft.ConfigError, match="none belongs to this model; pass tokenizer=tokenizer"):
        nbpeft.train(bare, ["hello"], steps=1, live=False)


def test_labels_are_masked_where_the_padding_is():
    batch = next(iter(Batches(PAIRS, CharTokenizer(), 5, 64, 0)))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


# rows tokenised already, as datasets.map(tokenizer) leaves them

TOKEN_ROWS = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8, 9], "attention_mask": [1, 1]}]


def one_batch(data, tokenizer=None, width=None, **kwargs):
    """The first batch, cut to ``width`` columns after checking that the rest is padding
    (batches are padded to a multiple of PAD_MULTIPLE tokens)."""
    batch = next(iter(Batches(data, tokenizer, 2, 64, 0, **kwargs).once()))
    if width is None:
        return batch
    assert (batch["attention_mask"][:, width:] == 0).all() and (batch["labels"][:, width:] == IGNORE).all()
    assert (batch["input_ids"][:, width:] == batch["input_ids"][-1, -1]).all()
    return {k: v[:, :width] for k, v in batch.items()}


@pytest.mark.parametrize("form", ["lists", "tensors", "dataset", "dataset torch", "dataset torch rows"])
def test_tokenised_rows_are_padded_per_batch_with_labels_from_the_inputs(form):
    rows = TOKEN_ROWS
    if form == "tensors":
        rows = [{k: torch.tensor(v) for k, v in row.items()} for row in TOKEN_ROWS]
    elif form.startswith("dataset"):
        datasets = pytest.importorskip("datasets")
        rows = datasets.Dataset.from_list(TOKEN_ROWS)
        if "torch" in form:
            rows.set_format("torch")
        if form.endswith("rows"):
            rows = list(rows)  # 1-D tensors per row
    batch = one_batch(rows, width=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]  # no tokenizer: padded with 0
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE]]


def test_tokenised_rows_keep_their_labels_and_their_padding():
    rows = [{"input_ids": [5, 6, 7, 2, 2], "attention_mask": [1, 1, 1, 0, 0]},  # padded when it was tokenised
            {"input_ids": [8, 9], "labels": [IGNORE, 9]}]
    batch = one_batch(rows, CharTokenizer(), width=5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, IGNORE, IGNORE], [IGNORE, 9, IGNORE, IGNORE, IGNORE]]
    assert batch["input_ids"][1].tolist() == [8, 9, 0, 0, 0]  # the tokenizer's pad id
    tokenizer = CharTokenizer()
    tokenizer.pad_token_id = 3
    assert one_batch(rows, tokenizer, width=5)["input_ids"][1].tolist() == [8, 9, 3, 3, 3]


def test_whole_batches_still_go_through_as_they_are():
    batch = {"input_ids": torch.tensor([[5, 6], [7, 8]]), "labels": torch.tensor([[5, 6], [7, 8]])}
    assert one_batch([batch]) is batch


@pytest.mark.parametrize("rows, message", [
    ([{"input_ids": [1, 2]}, {"input_ids": "abc"}], "row 1 has input_ids that are not a non-empty list of token ids"),
    ([{"input_ids": [1, 2], "labels": [1]}], "row 0 has labels that do not match its 2 input_ids"),
    ([{"input_ids": [1, 2], "attention_mask": [1]}], "row 0 has an attention_mask that does not match its 2 input_ids"),
])
def test_bad_tokenised_rows_are_one_line(rows, message):
    with pytest.raises(nbpeft.ConfigError, match=message):
        Batches(rows, None, 2, 64, 0)


def test_a_model_trains_on_tokenised_rows_of_1d_tensors():
    llama = tiny_llama()
    nbpeft.attach(llama, "lora", r=2)
    rows = [{"input_ids": torch.tensor([5, 6, 7, 8]), "attention_mask": torch.ones(4, dtype=torch.long)},
            {"input_ids": torch.tensor([9, 10])}]
    result = nbpeft.train(llama, rows, steps=2, batch_size=2, live=False)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_the_readmes_tokenised_rows_example_runs():
    datasets = pytest.importorskip("datasets")
    import re
    from pathlib import Path

    import transformers

    from nbpeft.models import cache_dir

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"Rows tokenised already.*?```python\n(.*?)```", readme, re.S)[1]
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    nbpeft.attach(model, "lora", r=2)
    namespace = {"datasets": datasets, "nbpeft": nbpeft, "model": model, "tokenizer": tokenizer}
    exec(code, namespace)
    assert len(namespace["result"].history) == 2
