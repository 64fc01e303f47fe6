"""Several adapters, and the base model, answering the same prompts side by side."""

from __future__ import annotations

import contextlib
import html
import inspect
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import core
from ..errors import ConfigError
from .generate import find_tokenizer, generate, prompt_label, prompt_texts, sampling_options, stop_strings

BASE = "base"
# The options of generate() that compare_answers() passes on, with their defaults.
OPTIONS = {name: p.default for name, p in inspect.signature(generate).parameters.items()
           if name not in ("model", "tokenizer", "prompts", "stream", "num_samples")}


@dataclass
class Answers:
    """``answers[column][i]`` is the answer of ``column`` (an adapter name or ``"base"``) to ``prompts[i]``."""

    prompts: list[str]
    answers: dict[str, list[str]]

    @property
    def columns(self) -> list[str]:
        return list(self.answers)

    def __repr__(self) -> str:
        width = max(16, 100 // (len(self.answers) + 1))
        head = ["prompt", *self.answers]
        rows = [[p, *(a[i] for a in self.answers.values())] for i, p in enumerate(self.prompts)]
        lines = [_text_row(head, width), _text_row(["-" * width] * len(head), width)]
        for row in rows:
            lines += [_text_row(row, width), ""]
        return "\n".join(lines).rstrip()

    def _repr_html_(self) -> str:
        cell = 'style="text-align:left; vertical-align:top; white-space:pre-wrap"'
        head = "".join(f"<th {cell}>{html.escape(h)}</th>" for h in ["prompt", *self.answers])
        body = "".join(
            "<tr>" + "".join(f"<td {cell}>{html.escape(c)}</td>" for c in [p, *(a[i] for a in self.answers.values())])
            + "</tr>"
            for i, p in enumerate(self.prompts)
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_row(cells: list[str], width: int) -> str:
    """Cells wrapped to ``width`` and laid side by side, line by line."""
    wrapped = [sum((textwrap.wrap(p, width) or [""] for p in c.split("\n")), []) for c in cells]
    height = max(len(w) for w in wrapped)
    return "\n".join(
        "  ".join(f"{(w[i] if i < len(w) else ''):<{width}}" for w in wrapped).rstrip() for i in range(height)
    )


def compare_answers(
    model: nn.Module,
    prompts: str | Sequence[str] | None = None,
    adapters: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    include_base: bool = True,
    **options: Any,
) -> Answers:
    """Each adapter in ``adapters`` (default: every attached one), made active in turn, and the
    base model (adapters disabled) answer the same prompts.

    ``options`` are those of :func:`nbpeft.generate` (``max_new_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``, ``messages``, ...). The model's active adapters, merged
    adapters, trainable flags and train/eval mode are as before afterwards, also on an error.
    """
    _check_options(options)
    texts, _ = prompt_texts(model, prompts, options.get("messages"), "compare_answers")
    names = _adapter_names(model, adapters, include_base)
    tokenizer = find_tokenizer(model, tokenizer, "compare_answers")
    answers: dict[str, list[str]] = {}
    base_column = BASE if BASE not in names else f"{BASE} (no adapter)"
    with _restored(model):
        if include_base:
            with core.disable_adapters(model):
                answers[base_column] = _as_list(generate(model, tokenizer, prompts, **options))
        for name in names:
            core.set_adapter(model, name)
            answers[name] = _as_list(generate(model, tokenizer, prompts, **options))
    return Answers([prompt_label(t) for t in texts], answers)


def _check_options(options: dict[str, Any]) -> None:
    """The generation options, checked before the model is touched."""
    if "stream" in options:
        raise ConfigError("compare_answers(): stream= is not available here; the table shows once every answer is ready")
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise ConfigError(f"compare_answers(): unknown option {unknown[0]}=; generation options are {', '.join(OPTIONS)}")
    given = {**OPTIONS, **options}
    sampling_options(given["temperature"], given["top_p"], given["seed"], given["max_new_tokens"], given["batch_size"],
              "compare_answers")
    stop_strings(given["stop"], "compare_answers")


def _as_list(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else answer


def _adapter_names(model: nn.Module, adapters: str | Sequence[str] | None, include_base: bool) -> list[str]:
    attached = list(core.state(model).adapters)
    names = attached if adapters is None else [adapters] if isinstance(adapters, str) else list(adapters)
    for name in names:
        if name not in attached:
            have = f"attached: {', '.join(attached)}" if attached else "this model has no adapter; attach or load one first"
            raise ConfigError(f"compare_answers(): no adapter named {name!r}; {have}")
    if not names and not include_base:
        raise ConfigError("compare_answers(): nothing to compare; the model has no adapter, so keep include_base=True")
    return names


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Unmerge merged adapters for the block (an adapter switch needs them apart), then put back
    merges, active adapters, disabled layers, trainable flags and train/eval mode."""
    st = core.state(model)
    active = list(st.active)
    layers = [(layer, layer.active, layer.disabled) for _, layer in core.adapter_layers(model)]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    merged = [n for n, a in st.adapters.items() if a.merged]
    was_training = model.training
    if merged:
        core.unmerge(model, merged)
    for layer, _, _ in layers:
        layer.disabled = False
    try:
        yield
    finally:
        for layer, layer_active, disabled in layers:
            layer.active, layer.disabled = layer_active, disabled
        st.active = active
        for name, p in model.named_parameters():
            p.requires_grad = flags[name]
        if merged:
            core.merge(model, merged)
        model.train(was_training)

