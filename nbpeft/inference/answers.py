"""Several adapters, and the base model, answering the same prompts side by side (or several
samples of one of them); with ``pick=True``, a preference lab to choose the best of them."""

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
from .preferences import PreferenceLab

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
    *,
    pick: bool = False,
    samples: int = 1,
    **options: Any,
) -> Answers | PreferenceLab:
    """Each adapter in ``adapters`` (default: every attached one), made active in turn, and the
    base model (adapters disabled) answer the same prompts.

    ``samples=k`` draws k answers from ONE source instead (needs ``temperature=`` above 0): the
    adapter named by ``adapters`` (or the only one attached), or the base model when the model
    has no adapter; the prompt runs once for all k (:func:`nbpeft.generate`'s ``num_samples``).
    ``pick=True`` returns a :class:`~nbpeft.inference.preferences.PreferenceLab` instead of the
    table: in a notebook it shows the answers side by side with a button for each, and
    ``lab.pairs`` collects the choices as ``{"prompt", "chosen", "rejected"}`` rows.

    ``options`` are those of :func:`nbpeft.generate` (``max_new_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``, ``messages``, ...). The model's active adapters, merged
    adapters, trainable flags and train/eval mode are as before afterwards, also on an error.
    """
    _check_options(options, samples)
    texts, _ = prompt_texts(model, prompts, options.get("messages"), "compare_answers")
    names = _adapter_names(model, adapters, include_base or samples > 1)
    if samples > 1 and len(names) > 1:
        raise ConfigError(f"compare_answers(): samples={samples} draws several answers of one adapter; "
                          f"pass adapters= one of {', '.join(map(repr, names))}")
    if pick and (samples if samples > 1 else len(names) + include_base) < 2:
        raise ConfigError("compare_answers(): pick=True needs two answers or more per prompt to choose between; "
                          "keep include_base=True, name two adapters, or draw samples=2 or more")
    tokenizer = find_tokenizer(model, tokenizer, "compare_answers")
    answers: dict[str, list[str]] = {}
    base_column = BASE if BASE not in names else f"{BASE} (no adapter)"
    with _restored(model):
        if samples > 1:
            answers = _samples(model, tokenizer, prompts, names[0] if names else None, samples, base_column, options)
        if include_base and samples == 1:
            with core.disable_adapters(model):
                answers[base_column] = _as_list(generate(model, tokenizer, prompts, **options))
        for name in names if samples == 1 else []:
            core.set_adapter(model, name)
            answers[name] = _as_list(generate(model, tokenizer, prompts, **options))
    table = Answers([prompt_label(t) for t in texts], answers)
    if not pick:
        return table
    columns = table.columns
    return PreferenceLab(texts, [[table.answers[c][i] for c in columns] for i in range(len(texts))],
                         [columns] * len(texts))


def _samples(model: nn.Module, tokenizer: Any, prompts: Any, name: str | None, k: int, base_column: str,
             options: dict[str, Any]) -> dict[str, list[str]]:
    """``k`` sampled answers of adapter ``name`` (None: the base model), as columns ``"name #1"`` ... ``"name #k"``."""
    source = name if name is not None else base_column
    with contextlib.ExitStack() as stack:
        if name is None:
            stack.enter_context(core.disable_adapters(model))
        else:
            core.set_adapter(model, name)
        drawn = generate(model, tokenizer, prompts, num_samples=k, **options)
    per_prompt = [drawn] if drawn and isinstance(drawn[0], str) else drawn
    return {f"{source} #{j + 1}": [answers[j] for answers in per_prompt] for j in range(k)}


def _check_options(options: dict[str, Any], samples: Any = 1) -> None:
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
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"compare_answers(): samples={samples!r} must be a positive integer, e.g. samples=4")
    if samples > 1 and given["temperature"] == 0:
        raise ConfigError(f"compare_answers(): samples={samples} draws different answers only when sampling; "
                          "pass temperature= above 0 too, e.g. temperature=0.8")


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

