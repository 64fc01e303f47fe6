"""Preference data: pairs of answers, rated answers, or prompts alone, as the preference objectives read them.

Three forms of row, each with its prompt and answers as plain strings or conversational as
TRL writes them (``prompt`` a list of messages, each answer a list of assistant messages):

- paired (DPO, IPO, ORPO, SimPO): ``{"prompt": ..., "chosen": ..., "rejected": ...}``;
- unpaired (KTO): ``{"prompt": ..., "completion": ..., "label": True | False}``;
- prompts (GRPO): ``{"prompt": ...}``, the answers sampled while training.

Answers are rendered with the chat template after their prompt (a plain-text prompt becomes one
user turn, a plain-text answer one assistant turn) and labelled up to and including their
end-of-turn token; the prompt is never labelled. A tokenizer without a chat template reads
plain strings as ``prompt + answer + eos``, and conversational rows with
:data:`nbpeft.data.chat.DEFAULT_TEMPLATE`.

A batch holds ``B`` rows as tensors of shape ``(B, 2, width)`` (``input_ids``,
``attention_mask``, ``labels``): slot 0 the chosen answer and slot 1 the rejected one, or for KTO
slot 0 the row's completion and slot 1 the completion of the row before it after this row's
prompt (the mismatched pair KTO's KL estimate reads). ``index`` (``B``) names each row, and
KTO's ``desirable`` (``B``) holds its label. Prompt batches hold ``index`` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..layers import IGNORE
from . import chat, sources
from .batches import PAD_MULTIPLE, tokenizer_for

FORMS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompts": ("prompt",),
}
_EXAMPLES = {
    "pairs": "{'prompt': ..., 'chosen': ..., 'rejected': ...}",
    "unpaired": "{'prompt': ..., 'completion': ..., 'label': True or False}",
    "prompts": "{'prompt': ...}",
}


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def check_row(row: Any, form: str, where: str, caller: str = "train()", objective: str = "dpo") -> None:
    """A one-line ConfigError naming the row and the fix when ``row`` is not a ``form`` row."""
    needed = FORMS[form]
    if not isinstance(row, dict):
        raise ConfigError(f"{caller}: {where} is a {type(row).__name__}; objective={objective!r} reads rows like "
                          f"{_EXAMPLES[form]}")
    missing = [k for k in needed if k not in row]
    if missing:
        has = ", ".join(map(str, row)) or "nothing"
        raise ConfigError(f"{caller}: {where} has no {missing[0]!r} (it has {has}); objective={objective!r} reads rows "
                          f"like {_EXAMPLES[form]}, or map yours with columns={{'your_name': {missing[0]!r}}}")
    prompt = row["prompt"]
    conversational = _is_messages(prompt)
    if not isinstance(prompt, str) and not conversational:
        raise ConfigError(f"{caller}: {where} has a prompt of type {type(prompt).__name__}; give a string or a list "
                          "of {'role': ..., 'content': ...} messages")
    for key in needed[1:]:
        if key == "label":
            if not isinstance(row[key], bool) and row[key] not in (0, 1):
                raise ConfigError(f"{caller}: {where} has label {row[key]!r}; KTO's label is True (a desirable "
                                  "completion) or False (an undesirable one)")
            continue
        answer = row[key]
        if isinstance(answer, str):
            continue
        if not _is_messages(answer) or not answer or any(m.get("role") != "assistant" for m in answer):
            raise ConfigError(f"{caller}: {where} has {key!r} of type {type(answer).__name__}; give a string or a "
                              "list of {'role': 'assistant', 'content': ...} messages")
    if conversational:
        chat.check_conversation({"messages": prompt + [{"role": "assistant", "content": ""}]}, where, caller)


def form_of(data: Any) -> str | None:
    """The preference form of ``data``'s first row ('pairs', 'unpaired', 'prompts'), or None when it is none."""
    try:
        source = sources.read(data)
    except ConfigError:
        return None
    if source.batches:
        return None
    first = next(iter(source.rows), None) if source.length is None else (source.rows[0] if source.length else None)
    if not isinstance(first, dict) or "prompt" not in first:
        return None
    for form in ("pairs", "unpaired"):
        if set(FORMS[form]) <= first.keys():
            return form
    return "prompts" if not {"response", "messages"} & first.keys() else None


def _messages(value: str | list[dict[str, str]], role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else [
        {"role": m["role"], "content": m["content"]} for m in value]


def encode_answer(tokenizer: Any, prompt: Any, answer: Any, where: str = "row 0",
                  caller: str = "train()") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``answer`` after ``prompt``: labels -100 on the prompt, the answer's own
    tokens (up to and including its end-of-turn token) labelled."""
    if isinstance(prompt, str) and isinstance(answer, str) and not chat.has_template(tokenizer):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids
    chat.use_default_template(tokenizer)
    turns = _messages(prompt, "user")
    start = len(chat.render(tokenizer, turns, True, where, caller))
    return chat.encode(tokenizer, turns + _messages(answer, "assistant"), where, caller, answer_from=start)


def prompt_text(tokenizer: Any, prompt: Any) -> str:
    """The prompt as the model sees it before its answer (the chat template's generation prompt)."""
    if isinstance(prompt, str) and not chat.has_template(tokenizer):
        return prompt
    chat.use_default_template(tokenizer)
    return tokenizer.apply_chat_template(_messages(prompt, "user"), tokenize=False, add_generation_prompt=True)


class PreferenceBatches:
    """An endless, reshuffled-every-epoch stream of preference batches, with the attributes the loop reads
    from :class:`nbpeft.data.Batches` (``examples``, ``per_epoch``, ``notes``, ``truncated``, ``dropped``).

    Each answer is cut to ``max_length`` tokens with its prompt; a row whose answer loses every
    labelled token is dropped; both are said once in ``notes``.
    """

    kind = "preferences"
    packing = False
    stream = None

    def __init__(self, data: Any, tokenizer: Any, batch_size: int, max_length: int, seed: int, *, form: str,
                 objective: str, model: Any = None, columns: dict[str, str] | None = None,
                 caller: str = "train()") -> None:
        self.form, self.objective, self.caller = form, objective, caller
        self.batch_size, self.max_length = batch_size, max_length
        self.generator = torch.Generator().manual_seed(seed)
        self.truncated = self.dropped = 0
        self.notes: list[str] = []
        source = sources.read(data, columns, caller)
        if source.batches or source.length is None:
            raise ConfigError(f"{caller}: objective={objective!r} reads rows with a length (a list, a Dataset, a "
                              f"DataFrame or files) like {_EXAMPLES[form]}, not ready batches or a stream")
        rows = list(source.rows)
        if not rows:
            raise ConfigError(f"{caller}: data is empty; pass at least one row like {_EXAMPLES[form]}")
        for i, row in enumerate(rows):
            check_row(row, form, source.where(i), caller, objective)
        self.rows, self.where = rows, source.where
        self.tokenizer = tokenizer_for(model, tokenizer, caller=caller)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if not chat.has_template(self.tokenizer) and any(not isinstance(r["prompt"], str) for r in rows):
            self.notes.append(chat.use_default_template(self.tokenizer) or "")
        self.examples = self._encode_all(rows)
        if not self.examples:
            raise ConfigError(f"{caller}: every row lost its answer to max_length={max_length}; raise max_length")
        if self.truncated:
            total = len(rows)
            line = f"max_length={max_length} cut {self.truncated} of {total} rows' prompt and answers"
            if self.dropped:
                line += f" and dropped {self.dropped} whose answer was entirely past it"
            self.notes.append(line + "; raise max_length= to keep more")
        self.notes = [n for n in self.notes if n]
        self.per_epoch = -(-len(self.examples) // batch_size)

    # encoding ---------------------------------------------------------------------------------------------

    def _cut(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
        """``max_length`` from the left of the answer's end: the prompt's start goes first, then the answer's end."""
        if len(ids) <= self.max_length:
            return ids, labels
        self.truncated += 1
        answer_at = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
        keep_prompt = max(1, min(answer_at, self.max_length // 2))  # the prompt's end leads into the answer
        start = answer_at - keep_prompt
        ids, labels = ids[start:start + self.max_length], labels[start:start + self.max_length]
        return (ids, labels) if any(t != IGNORE for t in labels[1:]) else None

    def _encode_all(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, row in enumerate(rows):
            where = self.where(i)
            if self.form == "prompts":
                out.append({"index": i, "prompt": prompt_text(self.tokenizer, row["prompt"])})
                continue
            if self.form == "pairs":
                answers = (row["chosen"], row["rejected"])
                extra = {}
            else:  # KTO: this completion, and the previous row's completion after this prompt (the KL pair)
                before = rows[i - 1]["completion"] if len(rows) > 1 else row["completion"]
                answers = (row["completion"], _like(before, row["completion"]))
                extra = {"desirable": bool(row["label"])}
            truncated = self.truncated
            encoded = [encode_answer(self.tokenizer, row["prompt"], a, where, self.caller) for a in answers]
            cut = [self._cut(*e) for e in encoded]
            self.truncated = truncated + (self.truncated > truncated)  # a row counts once
            if any(c is None for c in cut):
                self.dropped += 1
                continue
            out.append({"index": i, "slots": cut, **extra})
        return out

    # batching ---------------------------------------------------------------------------------------------

    def collate(self, group: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"index": torch.tensor([e["index"] for e in group])}
        if self.form == "prompts":
            return batch
        longest = max(len(ids) for e in group for ids, _ in e["slots"])
        width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(longest, self.max_length))
        input_ids = torch.full((len(group), 2, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(group), 2, width), dtype=torch.long)
        labels = torch.full((len(group), 2, width), IGNORE, dtype=torch.long)
        for r, e in enumerate(group):
            for s, (ids, labs) in enumerate(e["slots"]):
                input_ids[r, s, :len(ids)] = torch.tensor(ids)
                attention[r, s, :len(ids)] = 1
                labels[r, s, :len(labs)] = torch.tensor(labs)
        batch.update(input_ids=input_ids, attention_mask=attention, labels=labels)
        if self.form == "unpaired":
            batch["desirable"] = torch.tensor([e["desirable"] for e in group])
        return batch

    def _batches(self, examples: list[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(examples), self.batch_size):
            yield self.collate(examples[start:start + self.batch_size])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            yield from self._batches([self.examples[j] for j in order])

    def once(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in order, for evaluation and precomputed reference log-probs."""
        yield from self._batches(self.examples)

    def prompts(self, index: torch.Tensor) -> list[str]:
        """The rendered prompts of a prompt batch's rows."""
        by_index = {e["index"]: e["prompt"] for e in self.examples}
        return [by_index[int(i)] for i in index]


def _like(answer: Any, form: Any) -> Any:
    """``answer`` in the form of ``form`` (a string, or assistant messages), for a KL pair across forms."""
    if isinstance(form, str):
        return answer if isinstance(answer, str) else "".join(m["content"] for m in answer)
    return answer if not isinstance(answer, str) else [{"role": "assistant", "content": answer}]
