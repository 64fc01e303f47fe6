"""The batched sampler behind ``nbpeft.generate``, shared with training objectives that sample answers (GRPO).

Prompts are padded on the left, so every row's new tokens start at the same column; each row
stops at the end-of-sequence token (or a stop string), and rows that stopped are padded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def sample(model: nn.Module, tokenizer: Any, texts: list[str], max_new_tokens: int, sampling: dict[str, Any],
           stops: list[str] = (), streamer: Any = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch of answers: ``(ids, prompt_mask, skip)``, the rows ``model.generate`` returns, the left-padded
    prompts' attention mask, and the column the new tokens start at (0 for an encoder-decoder, whose output
    is the decoder's tokens alone; its encoder reads the prompt with the tokenizer's special tokens)."""
    device = next(model.parameters()).device
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    rows = [tokenizer(t, add_special_tokens=seq2seq)["input_ids"] for t in texts]
    width, pad = max(len(r) for r in rows), pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    extra: dict[str, Any] = {}
    skip = 0 if seq2seq else width
    if stops:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([StopStrings(tokenizer, list(stops), skip)])
    if streamer is not None:
        extra["streamer"] = streamer
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, **sampling, **extra)
    return out, attention_mask, skip


class StopStrings:
    """Ends a row once its new text holds a stop string (rows of a batch end one by one)."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)
