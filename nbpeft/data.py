"""Turn training data into padded batches.

Accepted forms: a list of strings (causal LM), a list of ``{"prompt", "response"}``
(loss on the response only), a list of ``{"text", "label"}`` (classification), or any
iterable of already tokenised batches (dicts of tensors with ``input_ids``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .methods.base import ConfigError

IGNORE = -100


def kind_of(data: Any) -> str:
    """'text', 'prompt-response', 'classification' or 'batches'."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError("train(): data must be a list of strings, of {'prompt','response'} or {'text','label'} dicts, or a DataLoader")
    if isinstance(data, torch.utils.data.DataLoader) or not isinstance(data, (list, tuple)):
        return "batches"
    if not data:
        raise ConfigError("train(): data is empty; pass at least one example")
    first = data[0]
    if isinstance(first, str):
        kind = "text"
    elif isinstance(first, dict) and {"prompt", "response"} <= first.keys():
        kind = "prompt-response"
    elif isinstance(first, dict) and {"text", "label"} <= first.keys():
        kind = "classification"
    elif isinstance(first, dict) and "input_ids" in first:
        return "batches"
    else:
        raise ConfigError(
            f"train(): cannot read examples like {str(first)[:60]!r}; use strings, "
            "{'prompt': ..., 'response': ...} or {'text': ..., 'label': ...}"
        )
    for i, ex in enumerate(data):
        if kind_of_example(ex) != kind:
            raise ConfigError(f"train(): example {i} is not like example 0 ({kind}); every example must have the same form")
    return kind


def kind_of_example(ex: Any) -> str | None:
    if isinstance(ex, str):
        return "text"
    if isinstance(ex, dict) and {"prompt", "response"} <= ex.keys():
        return "prompt-response"
    if isinstance(ex, dict) and {"text", "label"} <= ex.keys():
        return "classification"
    return None


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it at generation time (chat template if it has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def encode(example: Any, kind: str, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """One example as input_ids and labels (prompt tokens masked with -100)."""
    eos = tokenizer.eos_token or ""
    if kind == "text":
        ids = (tokenizer(example)["input_ids"] + _ids(tokenizer, eos))[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    if kind == "classification":
        ids = tokenizer(example["text"], truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "labels": int(example["label"])}
    prompt = chat_prompt(tokenizer, example["prompt"])
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}],
            tokenize=False,
        )
        answer = full[len(prompt):] if full.startswith(prompt) else example["response"] + eos
    else:
        answer = example["response"] + eos
    prompt_ids, answer_ids = _ids(tokenizer, prompt), _ids(tokenizer, answer)
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked in attention and labels."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


class Batches:
    """An endless, reshuffled-every-epoch stream of batches, plus its epoch length."""

    def __init__(self, data: Any, tokenizer: Any, batch_size: int, max_length: int, seed: int) -> None:
        self.kind = kind_of(data)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        if self.kind == "batches":
            self.source = data
            self.examples: list[dict[str, Any]] = []
            self.per_epoch = len(data) if hasattr(data, "__len__") else None
            return
        if tokenizer is None:
            raise ConfigError("train(): text data needs a tokenizer; pass tokenizer=tokenizer")
        encoded = [encode(ex, self.kind, tokenizer, max_length) for ex in data]
        self.examples = [e for e in encoded if isinstance(e["labels"], int) or any(t != IGNORE for t in e["labels"])]
        if not self.examples:
            raise ConfigError(f"train(): every example lost its response to max_length={max_length}; raise max_length")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.per_epoch = -(-len(self.examples) // batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.kind == "batches":
                yielded = False
                for batch in self.source:
                    yielded = True
                    yield batch
                if not yielded:
                    raise ConfigError("train(): the DataLoader yielded no batch")
                continue
            order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            for i in range(0, len(order), self.batch_size):
                yield collate([self.examples[j] for j in order[i : i + self.batch_size]], self.pad_id)

    def once(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in order, for evaluation."""
        if self.kind == "batches":
            yield from self.source
            return
        for i in range(0, len(self.examples), self.batch_size):
            yield collate(self.examples[i : i + self.batch_size], self.pad_id)
