"""Answer prompts with a causal LM or an encoder-decoder: greedy or sampled, with stop strings, streaming and chat.

Plain prompts go through the tokenizer's chat template as one user turn when it has one;
``messages=`` takes a whole conversation. Several prompts run as one batch, padded on the
left so every answer starts right after its own prompt. Several sampled answers to one prompt
(``num_samples=``) share the prompt's forward pass: its key/value cache is copied to each sample.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..core import end_rows, merge, row_plan, start_rows, state, unmerge
from ..data.batches import chat_prompt, tokenizer_for
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_layers
from ..methods.lora import LoRAEmbedding, LoRALinear
from ..training import sampling
from ..training.display import in_notebook

Messages = list[dict[str, str]]


def find_tokenizer(model: nn.Module, tokenizer: Any, fn: str) -> Any:
    """``tokenizer``, else the one that belongs to the model (:func:`nbpeft.data.batches.tokenizer_for`)."""
    return tokenizer_for(model, tokenizer, caller=f"{fn}()", fix="pass tokenizer=tokenizer (load_model returns it)")


def generate(
    model: nn.Module,
    tokenizer: Any = None,
    prompts: str | Sequence[str] | None = None,
    max_new_tokens: int = 48,
    *,
    messages: Messages | Sequence[Messages] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    batch_size: int = 8,
    adapter_names: Sequence[str | None] | None = None,
    num_samples: int = 1,
) -> str | list[str] | list[list[str]]:
    """The model's answer to ``prompts``: one string for one prompt, a list for a list.

    ``temperature=0`` answers greedily (the most likely token each step); above 0 each token
    is drawn from ``softmax(logits / temperature)``, restricted to the smallest set of tokens
    whose probabilities sum to ``top_p``. ``seed`` makes sampling repeatable without touching
    the global random state. The answer ends before the first of the ``stop`` strings.
    ``messages=[{"role": "user", "content": ...}, ...]`` answers a conversation (a list of
    conversations gives a list). ``stream=True`` shows the answer as tokens arrive, in one
    output area in a notebook and as plain printing elsewhere. ``adapter_names=[...]`` answers
    each prompt with its own adapter ("__base__" or None: the base model), several in one batch.
    ``num_samples=k`` (with ``temperature`` above 0) draws k answers to each prompt: a list of k
    strings for one prompt, a list of such lists for a list. The prompt runs through the model
    once; its key/value cache is repeated for the k answers, which are then decoded as one batch.
    """
    if tokenizer is not None and prompts is None and _is_text(tokenizer):
        tokenizer, prompts = None, tokenizer  # generate(model, "a prompt")
    texts, single = prompt_texts(model, prompts, messages, "generate")
    sampling = sampling_options(temperature, top_p, seed, max_new_tokens, batch_size, "generate")
    stops = stop_strings(stop, "generate")
    check_samples(num_samples, temperature, stream, "generate")
    tokenizer = find_tokenizer(model, tokenizer, "generate")
    rendered = [chat_prompt(tokenizer, t) if isinstance(t, str) else _render(tokenizer, t, "generate") for t in texts]
    if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != len(texts)):
        raise ConfigError(f"generate(): adapter_names= needs one name per prompt ({len(texts)}), e.g. ['chat', '__base__']")

    was_training = model.training
    model.eval()
    try:
        if adapter_names is not None:
            row_plan(model, adapter_names, "generate()")  # every name checked before the first answer
        with _seeded(model, seed), torch.no_grad(), merged_while_generating(model, adapter_names):
            if stream:
                labels = [prompt_label(t) for t in texts] if not single else None
                display = _StreamDisplay(labels)
                answers = []
                for i, text in enumerate(rendered):
                    display.start(i)
                    with _rows(model, _part(adapter_names, i, i + 1)):
                        answers += _run(model, tokenizer, [text], max_new_tokens, sampling, stops, display)
            else:
                answers = []
                for start in range(0, len(rendered), batch_size):
                    texts_now, names_now = rendered[start:start + batch_size], _part(adapter_names, start, start + batch_size)
                    if num_samples > 1:
                        answers += _run_samples(model, tokenizer, texts_now, names_now, num_samples, max_new_tokens,
                                                sampling, stops)
                        continue
                    with _rows(model, names_now):
                        answers += _run(model, tokenizer, texts_now, max_new_tokens, sampling, stops, None)
    finally:
        model.train(was_training)
    return answers[0] if single else answers


# Checking the arguments -----------------------------------------------------------------------

def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) for v in value))


def prompt_texts(model: nn.Module, prompts: Any, messages: Any, fn: str) -> tuple[list[str | Messages], bool]:
    """The prompts (or conversations) as a list, and whether one was given rather than a list."""
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise ConfigError(f"{fn}(): {type(model).__name__} does not generate text; use a causal LM, "
                          "e.g. nbpeft.load_model('smollm2-135m')")
    if prompts is not None and messages is not None:
        raise ConfigError(f"{fn}(): pass either prompts or messages=, not both")
    if messages is not None:
        if _is_conversation(messages):
            return [list(messages)], True
        if isinstance(messages, list | tuple) and messages and all(_is_conversation(m) for m in messages):
            return [list(m) for m in messages], False
        raise ConfigError(f"{fn}(): messages= must be a list of {{'role': ..., 'content': ...}} dicts "
                          "(or a list of such lists)")
    if prompts is None or (isinstance(prompts, list | tuple) and not prompts):
        raise ConfigError(f"{fn}(): nothing to answer; pass a prompt, a list of prompts, "
                          "or messages=[{'role': 'user', 'content': ...}]")
    if isinstance(prompts, str):
        return [prompts], True
    if not _is_text(prompts):
        raise ConfigError(f"{fn}(): prompts must be a string or a list of strings, not {type(prompts).__name__}")
    return list(prompts), False


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, list | tuple) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def sampling_options(temperature: Any, top_p: Any, seed: Any, max_new_tokens: Any, batch_size: Any, fn: str) -> dict[str, Any]:
    """The keyword arguments for ``model.generate`` that choose each token."""
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or temperature < 0:
        raise ConfigError(f"{fn}(): temperature={temperature!r} must be 0 (greedy) or a positive number such as 0.7")
    if not isinstance(top_p, int | float) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ConfigError(f"{fn}(): top_p={top_p!r} must be above 0 and at most 1, e.g. top_p=0.9")
    if top_p < 1 and temperature == 0:
        raise ConfigError(f"{fn}(): top_p={top_p} applies only when sampling; set temperature= above 0 too")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"{fn}(): seed={seed!r} must be an integer")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{fn}(): {name}={value!r} must be a positive integer")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}


def check_samples(num_samples: Any, temperature: Any, stream: bool, fn: str) -> None:
    """``num_samples`` is a positive integer, and above 1 only when sampling and not streaming."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ConfigError(f"{fn}(): num_samples={num_samples!r} must be a positive integer, e.g. num_samples=4")
    if num_samples > 1 and temperature == 0:
        raise ConfigError(f"{fn}(): num_samples={num_samples} gives different answers only when sampling; "
                          "set temperature= above 0 too, e.g. temperature=0.8")
    if num_samples > 1 and stream:
        raise ConfigError(f"{fn}(): stream=True shows one answer at a time; leave it out with num_samples={num_samples}")


def stop_strings(stop: Any, fn: str) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"{fn}(): stop= takes non-empty strings, e.g. stop=['\\n\\n']")
    return stops


def _render(tokenizer: Any, conversation: Messages, fn: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{fn}(): messages= needs a tokenizer with a chat template; pass the conversation as one prompt")
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def prompt_label(text: str | Messages) -> str:
    """A short name for a prompt or a conversation (its last user turn)."""
    if isinstance(text, str):
        return text
    users = [m["content"] for m in text if m["role"] == "user"]
    return str(users[-1] if users else text[-1]["content"])


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int | None) -> Iterator[None]:
    """``seed`` for the block only: the caller's random state is the same afterwards."""
    if seed is None:
        yield
        return
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# Running the model ----------------------------------------------------------------------------

def _part(names: Sequence[str | None] | None, start: int, end: int) -> list[str | None] | None:
    return None if names is None else list(names)[start:end]


@contextlib.contextmanager
def _rows(model: nn.Module, names: list[str | None] | None) -> Iterator[None]:
    """Each row of the batch answered by its adapter in ``names`` (nothing to route without names)."""
    if names is None:
        yield
        return
    start_rows(model, names, "generate()")
    try:
        yield
    finally:
        end_rows(model)


# Merged copies kept for the exact undo take memory: adapters over more base weight than this answer unmerged.
MERGE_LIMIT_BYTES = 1 << 30


@contextlib.contextmanager
def merged_while_generating(model: nn.Module, names: Sequence[str | None] | None = None) -> Iterator[None]:
    """The active plain-LoRA adapters folded into fp32 base weights while answering, put back bit for bit after.

    An unmerged adapter costs each new token two more matmuls and a Python call per adapted
    layer; merged, a token costs what the base model's does. In fp32 the merged weight
    ``W + s·B·A`` differs from the unmerged sum by rounding only; the base weights come back
    exactly afterwards (the kept copies of :meth:`nbpeft.layers.AdapterLayer.keep_original`),
    however the block ends. Left unmerged: routed rows (``names``), adapters turned off
    (``disable_adapters``), other methods, weights not
    in fp32, adapters over more than ``MERGE_LIMIT_BYTES`` of base weight.
    """
    st = state(model) if names is None else None
    wanted = [n for n in (st.active if st is not None else []) if n in st.adapters and not st.adapters[n].merged]
    layers = [layer for _, layer in adapter_layers(model) if any(n in layer.adapter_names for n in wanted)]
    plain = all(type(layer) in (LoRALinear, LoRAEmbedding) and not layer.disabled and not isinstance(layer.base_layer, AdapterLayer)
                and getattr(layer.base_layer, "weight", None) is not None
                and layer.base_layer.weight.dtype == torch.float32 for layer in layers)
    size = sum(layer.base_layer.weight.numel() * 4 for layer in layers)
    if not wanted or not layers or not plain or size > MERGE_LIMIT_BYTES or any(
            st.adapters[n].method != "lora" for n in wanted):
        yield
        return
    merge(model, wanted)
    try:
        yield
    finally:
        unmerge(model, wanted)


def _run(model: nn.Module, tokenizer: Any, texts: list[str], max_new_tokens: int, sampling_args: dict[str, Any],
         stops: list[str], display: _StreamDisplay | None) -> list[str]:
    """One batch of prompts answered (see :func:`nbpeft.training.sampling.sample`)."""
    streamer = _Streamer(tokenizer, stops, display) if display is not None else None
    out, _, skip = sampling.sample(model, tokenizer, texts, max_new_tokens, sampling_args, stops, streamer)
    return [_answer(tokenizer, row[skip:], stops) for row in out]


def _run_samples(model: nn.Module, tokenizer: Any, texts: list[str], names: list[str | None] | None, k: int,
                 max_new_tokens: int, sampling_args: dict[str, Any], stops: list[str]) -> list[list[str]]:
    """``k`` answers to each prompt of one batch, the prompt run through the model once (see ``sampling.sample``)."""
    def route(times: int) -> Any:
        return _rows(model, None if names is None else [n for n in names for _ in range(times)])

    out, _, skip = sampling.sample(model, tokenizer, texts, max_new_tokens, sampling_args, stops,
                                   num_samples=k, route=route)
    answers = [_answer(tokenizer, row[skip:], stops) for row in out]
    return [answers[i:i + k] for i in range(0, len(answers), k)]


def _answer(tokenizer: Any, ids: Any, stops: list[str]) -> str:
    return _cut(tokenizer.decode(ids, skip_special_tokens=True), stops).strip()


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string (which is left out)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text


class _Streamer:
    """Receives tokens from ``model.generate`` and shows the answer so far.

    Text that could still become a stop string, trailing spaces and half a character are held
    back until the next token settles them, so what is shown is always a prefix of the answer.
    """

    def __init__(self, tokenizer: Any, stops: list[str], display: _StreamDisplay) -> None:
        self.tokenizer, self.stops, self.display = tokenizer, stops, display
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = _cut(text, self.stops)
        if len(cut) == len(text):
            cut = cut[:len(cut) - _held_back(cut, self.stops)]
        self.display.show(cut.rstrip("\ufffd").strip())

    def end(self) -> None:
        self.display.show(_answer(self.tokenizer, self.ids, self.stops), final=True)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that begins a stop string."""
    return max((n for s in stops for n in range(min(len(s), len(text)), 0, -1) if s.startswith(text[-n:])), default=0)


class _StreamDisplay:
    """One output area updated in place in a notebook; plain printing of what is new elsewhere."""

    min_interval_s = 0.05  # at most 20 notebook updates a second, however fast the tokens come

    def __init__(self, labels: list[str] | None) -> None:
        self.labels = labels
        self.answers: list[str] = []  # the finished ones, then the one being written
        self.printed, self.last_update = "", 0.0
        self.handle = None
        if in_notebook():
            from IPython.display import display

            self.handle = display({"text/plain": ""}, raw=True, display_id=True)

    def start(self, index: int) -> None:
        self.answers.append("")
        self.printed = ""
        if self.labels is not None and self.handle is None:
            print(("\n" if index else "") + f"> {self.labels[index]}", flush=True)

    def show(self, text: str, final: bool = False) -> None:
        self.answers[-1] = text
        if self.handle is not None:
            now = time.perf_counter()
            if final or now - self.last_update >= self.min_interval_s:
                self.handle.update({"text/plain": self._page()}, raw=True)
                self.last_update = now
            return
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            self.printed = text
        elif final:  # a decode that rewrote earlier text: the whole answer on a line of its own
            sys.stdout.write("\n" + text)
        if final:
            sys.stdout.write("\n")
        sys.stdout.flush()

    def _page(self) -> str:
        if self.labels is None:
            return self.answers[0]
        return "\n\n".join(f"> {label}\n{answer}" for label, answer in zip(self.labels, self.answers))

