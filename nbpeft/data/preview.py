"""One training example as the model sees it: its tokens, and which of them the loss sees.

``show_example(data, tokenizer, i)`` returns an :class:`Example`: in a notebook it renders
as HTML (tokens under the loss highlighted, masked ones dimmed, with counts), elsewhere
as plain text with the trained tokens between ``⟦`` and ``⟧``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..layers import IGNORE
from . import chat, preferences, sources
from .batches import check_example, kind_of_example, tokenize, tokenizer_for

TRAINED_STYLE = "background:#c8f0c8;color:#0b3d0b;border-radius:2px"
MASKED_STYLE = "color:#9a9a9a"


@dataclass
class Example:
    """One encoded example: its tokens (as text) and whether each is a label the loss sees."""

    where: str
    kind: str
    tokens: list[str]
    trained: list[bool]
    label: int | None = None  # classification: the label of the whole sequence
    full_length: int = 0  # tokens before max_length cut
    max_length: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_trained(self) -> int:
        return sum(self.trained)

    @property
    def num_masked(self) -> int:
        return self.num_tokens - self.num_trained

    @property
    def cut(self) -> int:
        """Tokens cut by max_length."""
        return self.full_length - self.num_tokens

    def summary(self) -> str:
        if self.label is not None:
            counts = f"{self.num_tokens} tokens, label {self.label}"
        else:
            counts = f"{self.num_tokens} tokens: {self.num_trained} under the loss, {self.num_masked} masked"
        cut = f"; max_length={self.max_length} cut {self.cut} more" if self.cut else ""
        dropped = "; no labelled token is left, so training drops it" if self.label is None and not self.num_trained else ""
        return f"{self.where} ({self.kind}), {counts}{cut}{dropped}"

    def __repr__(self) -> str:
        text, inside = [], False
        for token, trained in zip(self.tokens, self.trained):
            if trained != inside:
                text.append("⟦" if trained else "⟧")
                inside = trained
            text.append(token)
        if inside:
            text.append("⟧")
        legend = "" if self.label is not None else "\n(⟦…⟧: tokens under the loss)"
        notes = "".join(f"\n{note}" for note in self.notes)
        return f"{self.summary()}{notes}{legend}\n{''.join(text)}"

    def _repr_html_(self) -> str:
        spans = []
        for token, trained in zip(self.tokens, self.trained):
            shown = html.escape(token).replace("\n", "↵\n")
            style = TRAINED_STYLE if trained or self.label is not None else MASKED_STYLE
            spans.append(f'<span style="{style}">{shown}</span>')
        legend = ("" if self.label is not None else
                  f' · <span style="{TRAINED_STYLE}">under the loss</span> <span style="{MASKED_STYLE}">masked</span>')
        notes = "".join(f"<br>{html.escape(note)}" for note in self.notes)
        return (f'<div class="nbpeft-example"><div><b>{html.escape(self.summary())}</b>{legend}{notes}</div>'
                f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">{"".join(spans)}</div></div>')


@dataclass
class Answers:
    """A preference row as the model sees it: each answer after its prompt (an :class:`Example` each)."""

    where: str
    answers: dict[str, Example]

    def __repr__(self) -> str:
        return "\n\n".join(f"{name}: {example!r}" for name, example in self.answers.items())

    def _repr_html_(self) -> str:
        return "".join(f"<div><b>{html.escape(name)}</b></div>{example._repr_html_()}" for name, example in self.answers.items())


def _answers(row: Any, form: str, tokenizer: Any, where: str, max_length: int, caller: str) -> Answers | Example:
    """The row's answers (pairs: chosen and rejected; KTO: its completion) or, for GRPO, its prompt."""
    preferences.check_row(row, form, where, caller, {"pairs": "dpo", "unpaired": "kto", "prompts": "grpo"}[form])
    if form == "prompts":
        ids = tokenizer(preferences.prompt_text(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        return Example(where=where, kind="prompt", tokens=[tokenizer.decode([t]) for t in ids[:max_length]],
                       trained=[False] * min(len(ids), max_length), full_length=len(ids), max_length=max_length,
                       notes=["the answers are sampled while training; none is under the loss here"])
    names = ("chosen", "rejected") if form == "pairs" else (
        "completion (desirable)" if row["label"] else "completion (undesirable)",)
    keys = ("chosen", "rejected") if form == "pairs" else ("completion",)
    shown = {}
    for name, key in zip(names, keys):
        ids, labels = preferences.encode_answer(tokenizer, row["prompt"], row[key], where, caller)
        cut = preferences.fit(ids, labels, max_length) or (ids[:max_length], [IGNORE] * min(len(ids), max_length))
        shown[name] = Example(where=where, kind=form, tokens=[tokenizer.decode([t]) for t in cut[0]],
                              trained=[False] + [t != IGNORE for t in cut[1][1:]], full_length=len(ids),
                              max_length=max_length)
    return Answers(where, shown)


def show_example(data: Any, tokenizer: Any = None, i: int = 0, *, model: nn.Module | None = None,
                 max_length: int = 512, columns: dict[str, str] | None = None) -> Example | Answers:
    """Example ``i`` of ``data`` as ``train`` would feed it (same forms, ``columns`` and ``max_length``).

    A preference row gives :class:`Answers`: each answer after its prompt (a pair's chosen and
    rejected, KTO's completion), the tokens under the loss highlighted; a GRPO prompt row its prompt.

    ``tokenizer`` may be a model instead, whose own tokenizer is then used (see
    ``data.tokenizer_for``).
    """
    caller = "show_example()"
    if isinstance(tokenizer, nn.Module):
        model, tokenizer = tokenizer, None
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ConfigError(f"{caller}: i={i!r} must be a row number, 0 or more")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(f"{caller}: max_length={max_length!r} must be a positive integer")
    source = sources.read(data, columns, caller)
    if source.batches:
        raise ConfigError(f"{caller}: this data is already tokenised batches; show_example reads examples "
                          "(strings, prompt/response, messages)")
    if source.length is not None and i >= source.length:
        raise ConfigError(f"{caller}: i={i} is past the end; the data has {source.length} rows (0 to {source.length - 1})")
    row = next(islice(iter(source.rows), i, None), None)
    if row is None:
        raise ConfigError(f"{caller}: i={i} is past the end of the data stream")
    first = row if i == 0 else next(iter(source.rows))
    kind = kind_of_example(first)
    form = preferences.form_of([first]) if kind is None else None
    if form is not None:
        tokenizer = tokenizer_for(model, tokenizer, caller=caller, fix="pass the tokenizer: show_example(data, tokenizer, i)")
        return _answers(row, form, tokenizer, source.where(i), max_length, caller)
    if kind is None:
        raise ConfigError(f"{caller}: cannot read examples like {str(first)[:60]!r}; use strings, "
                          "{'prompt', 'response'}, {'messages'} or {'text', 'label'}")
    where = source.where(i)
    check_example(row, kind, where, caller)
    tokenizer = tokenizer_for(model, tokenizer, caller=caller, fix="pass the tokenizer: show_example(data, tokenizer, i)")
    note = chat.use_default_template(tokenizer) if kind == "chat" else None
    enc = tokenize(row, kind, tokenizer, where, caller)
    ids = enc["input_ids"][:max_length]
    label = enc["labels"] if kind == "classification" else None
    # the first token is never a target: nothing before it predicts it
    trained = [False] * len(ids) if label is not None else [False] + [t != IGNORE for t in enc["labels"][1:max_length]]
    tokens = [tokenizer.decode([t]) for t in ids]
    return Example(where=where, kind=kind, tokens=tokens, trained=trained, label=label,
                   full_length=len(enc["input_ids"]), max_length=max_length, notes=[note] if note else [])
