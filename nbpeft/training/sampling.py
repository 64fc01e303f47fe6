"""The batched sampler behind ``nbpeft.generate``, shared with training objectives that sample answers (GRPO).

Prompts are padded on the left, so every row's new tokens start at the same column; each row
stops at the end-of-sequence token (or a stop string), and rows that stopped are padded.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def sample(model: nn.Module, tokenizer: Any, texts: list[str], max_new_tokens: int, sampling: dict[str, Any],
           stops: list[str] = (), streamer: Any = None, *, num_samples: int = 1,
           route: Callable[[int], AbstractContextManager[Any]] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch of answers: ``(ids, prompt_mask, skip)``, one row per answer (prompt then answer), the
    left-padded prompts' attention mask, and the column the new tokens start at (0 for an encoder-decoder,
    whose output is the decoder's tokens alone; its encoder reads the prompt with the tokenizer's special tokens).

    ``num_samples=k`` answers each prompt k times (rows ``p0, p0, ..., p1, ...``) from one forward pass
    of the prompt: every prompt token but the last fills the key/value cache once, the cache is repeated
    k times along the batch, and decoding continues from each copy's last prompt token. ``route(k)``, if
    given, is entered around each model call whose batch holds every prompt k times (per-row adapters).
    """
    device = next(model.parameters()).device
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    rows = [tokenizer(t, add_special_tokens=seq2seq)["input_ids"] for t in texts]
    width, pad = max(len(r) for r in rows), pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    routed = route or (lambda k: contextlib.nullcontext())
    k = num_samples
    skip = 0 if seq2seq else width
    extra: dict[str, Any] = {}
    if stops:
        from transformers import StoppingCriteriaList

        # with a shared prompt the decoder's rows start at the prompt's last token
        prompt_width = skip if k == 1 or seq2seq else 1
        extra["stopping_criteria"] = StoppingCriteriaList([StopStrings(tokenizer, list(stops), prompt_width)])
    if streamer is not None:
        extra["streamer"] = streamer
    if k == 1 or seq2seq:
        if k > 1:
            extra["num_return_sequences"] = k  # an encoder-decoder runs its encoder once already
        with routed(k):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, **sampling, **extra)
        return out, attention_mask.repeat_interleave(k, dim=0), skip
    cache = None
    if width > 1:
        with routed(1):
            cache = _prompt_cache(model, input_ids[:, :-1], attention_mask[:, :-1])
        cache.batch_repeat_interleave(k)
    mask = attention_mask.repeat_interleave(k, dim=0)
    with routed(k):
        out = model.generate(input_ids=input_ids[:, -1:].repeat_interleave(k, dim=0), attention_mask=mask,
                             cache=cache, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling, **extra)
    return torch.cat([input_ids[:, :-1].repeat_interleave(k, dim=0), out], dim=1), mask, skip


def _prompt_cache(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The key/value cache after ``input_ids`` (padded on the left; positions count real tokens only)."""
    accepted = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    if "position_ids" in accepted:
        extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **extra)
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class StopStrings:
    """Ends a row once its new text holds a stop string (rows of a batch end one by one)."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)
