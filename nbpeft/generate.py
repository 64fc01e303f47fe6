"""Answer prompts with a causal LM, through its chat template when it has one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import chat_prompt


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: str | list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to ``prompts`` (one string or a list), without the prompt text."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        inputs = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
