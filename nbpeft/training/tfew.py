"""T-Few's losses for multiple-choice tasks (Liu et al. 2022), to train an (IA)³ adapter.

Each example is ``{"prompt": str, "choices": [str, ...], "label": int}``. The model scores a
choice ``y`` (``T`` tokens, appended to the prompt) by its length-normalised log-probability
``β(y) = (1/T) Σ_t log p(y_t | x, y_<t)``. With the correct choice ``y`` and the wrong ones
``ŷ⁽ⁿ⁾`` (``Tⁿ`` tokens each) the loss is ``L = L_LM + L_UL + L_LN``::

    L_LM = -(1/T) Σ_t log p(y_t | x, y_<t)
    L_UL = -Σ_n Σ_t log(1 - p(ŷⁿ_t | x, ŷⁿ_<t)) / Σ_n Tⁿ          (unlikelihood of the wrong choices)
    L_LN = -log softmax(β(y), β(ŷ¹), ..., β(ŷᴺ))[y]                  (length-normalised choice loss)

each averaged over the examples of a batch. Prediction picks the choice with the highest β,
the lowest length-normalised loss. On an encoder-decoder (T0, T5, BART, the paper's own
setting) the prompt is the encoder's input and each choice, with its end token, the decoder's
target; a decoder-only model reads ``prompt + separator + choice`` as one sequence.

    loader = nbpeft.choice_batches(examples, tokenizer, batch_size=4)
    nbpeft.attach(model, "ia3")
    nbpeft.train(model, loader, steps=100, lr=3e-3, loss_fn=nbpeft.tfew_loss)
    nbpeft.choice_accuracy(model, examples, tokenizer)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..layers import IGNORE


def _check(examples: Any) -> list[dict[str, Any]]:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ConfigError("tfew: examples must be a non-empty list of {'prompt': ..., 'choices': [...], 'label': i} dicts")
    for i, ex in enumerate(examples):
        ok = isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and isinstance(ex.get("choices"), (list, tuple))
        if not ok or len(ex["choices"]) < 2 or not all(isinstance(c, str) and c for c in ex["choices"]):
            raise ConfigError(f"tfew: example {i} needs a 'prompt' string and 'choices', a list of 2 or more non-empty strings")
        label = ex.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(ex["choices"]):
            raise ConfigError(f"tfew: example {i} has label={label!r}; it must index its choices (0 to {len(ex['choices']) - 1})")
    return list(examples)


def encode_example(example: dict[str, Any], tokenizer: Any, max_length: int = 256, separator: str = " ") -> dict[str, Any]:
    """One example as one token sequence per choice: ``prompt + separator + choice``, loss on the choice only.

    A long prompt is cut from the left so that every choice keeps its tokens.
    """
    prompt = tokenizer(example["prompt"])["input_ids"]
    sequences = []
    for choice in example["choices"]:
        answer = tokenizer(separator + choice, add_special_tokens=False)["input_ids"][: max_length - 1]
        context = prompt[-(max_length - len(answer)):]
        sequences.append((context + answer, [IGNORE] * len(context) + answer))
    # for an encoder-decoder: the prompt is the encoder's input, each choice (with its end token) the decoder's target
    targets = [tokenizer(choice)["input_ids"][:max_length] for choice in example["choices"]]
    return {"sequences": sequences, "label": example["label"], "encoder": prompt[-max_length:], "targets": targets}


def collate_choices(encoded: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples to one batch: ``input_ids``/``attention_mask``/``labels`` of shape (B·N, L), where N is
    the most choices of any example, plus ``choice_label`` (B) and ``choice_mask`` (B, N)."""
    n_choices = max(len(e["sequences"]) for e in encoded)
    width = max(len(ids) for e in encoded for ids, _ in e["sequences"])
    rows = len(encoded) * n_choices
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    choice_mask = torch.zeros((len(encoded), n_choices), dtype=torch.bool)
    for b, example in enumerate(encoded):
        for n in range(n_choices):
            row = b * n_choices + n
            if n >= len(example["sequences"]):  # a missing choice: one pad token, no label
                attention[row, 0] = 1
                continue
            ids, lab = example["sequences"][n]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(lab)] = torch.tensor(lab)
            choice_mask[b, n] = True
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
             "choice_label": torch.tensor([e["label"] for e in encoded]), "choice_mask": choice_mask}
    if all("encoder" in e for e in encoded):
        batch.update(_seq2seq_rows(encoded, n_choices, pad_id))
    return batch


def _seq2seq_rows(encoded: list[dict[str, Any]], n_choices: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The same rows laid out for an encoder-decoder: ``encoder_ids``/``encoder_mask`` (the prompt, once per
    choice) and ``choice_ids`` (the choice as decoder target, -100 past its end)."""
    width = max(len(e["encoder"]) for e in encoded)
    target_width = max(len(t) for e in encoded for t in e["targets"])
    rows = len(encoded) * n_choices
    encoder_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    encoder_mask = torch.zeros((rows, width), dtype=torch.long)
    choice_ids = torch.full((rows, target_width), IGNORE, dtype=torch.long)
    for b, example in enumerate(encoded):
        prompt = torch.tensor(example["encoder"])
        for n in range(n_choices):
            row = b * n_choices + n
            encoder_ids[row, : len(prompt)] = prompt
            encoder_mask[row, : len(prompt)] = 1
            if n < len(example["targets"]):
                choice_ids[row, : len(example["targets"][n])] = torch.tensor(example["targets"][n])
    return {"encoder_ids": encoder_ids, "encoder_mask": encoder_mask, "choice_ids": choice_ids}


def choice_batches(examples: list[dict[str, Any]], tokenizer: Any, *, batch_size: int = 4, max_length: int = 256,
                   separator: str = " ", shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader of tokenised multiple-choice batches, for ``train(..., loss_fn=tfew_loss)``."""
    encoded = [encode_example(ex, tokenizer, max_length, separator) for ex in _check(examples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return DataLoader(encoded, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      collate_fn=functools.partial(collate_choices, pad_id=pad_id))


def choice_token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(token)`` of every choice token, shape (B, N, T), and the mask of real choice tokens.

    A decoder-only model reads prompt and choice as one sequence (T = L-1 next-token predictions);
    an encoder-decoder reads the prompt in its encoder and scores the choice with its decoder.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        if "choice_ids" not in batch:
            raise ConfigError("tfew: this batch has no encoder-decoder rows; make it with nbpeft.choice_batches()")
        targets = batch["choice_ids"]
        decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=targets)
        logits = model(input_ids=batch["encoder_ids"], attention_mask=batch["encoder_mask"],
                       decoder_input_ids=decoder_ids).logits.float()
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
    token_logp = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    shape = (*batch["choice_mask"].shape, -1)
    return token_logp.view(shape), (targets != IGNORE).view(shape)


def length_normalised(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """β: the mean log-probability of each choice's tokens, shape (B, N)."""
    return (token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def tfew_terms(token_logp: torch.Tensor, mask: torch.Tensor, label: torch.Tensor,
               choice_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three T-Few losses from per-token log-probabilities (B, N, T), each averaged over the batch."""
    mask = mask.to(token_logp.dtype)
    if choice_mask is None:
        choice_mask = mask.sum(-1) > 0
    beta = length_normalised(token_logp, mask)
    correct = F.one_hot(label, beta.shape[1]).bool()
    lm = -beta[correct]
    wrong = (~correct & choice_mask).unsqueeze(-1) * mask
    not_p = torch.log1p(-token_logp.exp().clamp(max=1 - 1e-6))
    unlikelihood = -(not_p * wrong).sum((1, 2)) / wrong.sum((1, 2)).clamp(min=1)
    length_norm = F.cross_entropy(beta.masked_fill(~choice_mask, float("-inf")), label, reduction="none")
    return {"lm": lm.mean(), "unlikelihood": unlikelihood.mean(), "length_norm": length_norm.mean()}


def tfew_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, lm_weight: float = 1.0,
              unlikelihood_weight: float = 1.0, length_norm_weight: float = 1.0) -> torch.Tensor:
    """``L_LM + L_UL + L_LN`` on a batch from :func:`choice_batches`; pass as ``train(..., loss_fn=tfew_loss)``.

    Weights other than 1: ``functools.partial(tfew_loss, unlikelihood_weight=0.5)``.
    """
    token_logp, mask = choice_token_logprobs(model, batch)
    terms = tfew_terms(token_logp, mask, batch["choice_label"], batch["choice_mask"])
    return lm_weight * terms["lm"] + unlikelihood_weight * terms["unlikelihood"] + length_norm_weight * terms["length_norm"]


@torch.no_grad()
def choice_scores(model: nn.Module, examples: list[dict[str, Any]], tokenizer: Any, *, batch_size: int = 8,
                  max_length: int = 256, separator: str = " ") -> list[list[float]]:
    """β of every choice of every example (higher is better)."""
    loader = choice_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length, separator=separator,
                            shuffle=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            beta = length_normalised(*choice_token_logprobs(model, batch))
            for row, valid in zip(beta.tolist(), batch["choice_mask"].tolist()):
                scores.append([s for s, ok in zip(row, valid) if ok])
    finally:
        model.train(was_training)
    return scores


def predict_choices(model: nn.Module, examples: list[dict[str, Any]], tokenizer: Any, **kwargs: Any) -> list[int]:
    """The index of the choice with the lowest length-normalised loss, per example (``label`` may be absent)."""
    examples = [{"label": 0, **ex} for ex in examples] if isinstance(examples, (list, tuple)) else examples
    return [max(range(len(s)), key=s.__getitem__) for s in choice_scores(model, examples, tokenizer, **kwargs)]


def choice_accuracy(model: nn.Module, examples: list[dict[str, Any]], tokenizer: Any, **kwargs: Any) -> float:
    """The fraction of examples whose label is the predicted choice."""
    predictions = predict_choices(model, _check(examples), tokenizer, **kwargs)
    return sum(p == ex["label"] for p, ex in zip(predictions, examples)) / len(examples)
