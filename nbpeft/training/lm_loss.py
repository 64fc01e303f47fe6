"""The training loss: the model's own, computed without holding the full fp32 logits where the model allows.

The causal-LM loss is the mean over labelled positions ``i`` of::

    CE_i = logsumexp(W h_i + b) - (W h_i + b)[y_i]

where ``h_i`` is the final hidden state, ``W`` the output head (vocab x hidden) and
``y_i`` the next token. The model's own loss materialises the full ``[batch, seq, vocab]``
logits in fp32, their log-softmax and its gradient (three tensors of that size at once).
:func:`causal_lm_loss` instead runs the backbone, keeps only the labelled positions, and
computes the loss and its gradient a block of rows at a time (:func:`linear_cross_entropy`):
the same matmuls, never more than one block of logits alive.

Only models whose head is a plain ``nn.Linear`` applied to the backbone's last hidden
state with nothing in between (no logit scaling or soft-capping) take this path; every
other model returns ``None`` and the caller falls back to ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import architectures, core
from ..layers import IGNORE
from .attention import fast_attention

# Config fields that change the logits after the head; a model setting any is left alone.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def block_rows(n_rows: int, vocab_size: int, device: torch.device) -> int:
    """Rows per block of logits: as few blocks as fit the budget, split evenly.

    The budget is 512 MiB of fp32 logits on GPU and just under 32 MiB on CPU: glibc serves
    requests below 32 MiB from its heap (reused step after step, see :func:`steady_allocator`)
    and larger ones with fresh pages that fault in on every step. Fewer, larger blocks read
    the head's weight fewer times; even blocks avoid a thin, slow last one.
    """
    budget = (1 << 27) if device.type == "cuda" else (30 << 20) // 4
    most = max(1, budget // vocab_size)
    blocks = -(-max(n_rows, 1) // most)
    return -(-max(n_rows, 1) // blocks)


# While a run holds them (frozen_head_casts), compute-dtype copies of frozen head weights, made once
# instead of every step: SmolLM2's tied 49152 x 576 head is 28M weights to convert each step.
_head_casts: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] | None = None


def frozen_head_casts() -> Callable[[], None]:
    """Keep each frozen head weight's compute-dtype copy from one step to the next; returns the undo."""
    global _head_casts
    _head_casts = {}

    def undo() -> None:
        global _head_casts
        _head_casts = None

    return undo


def _head_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype or weight.requires_grad or _head_casts is None:
        return weight.to(dtype)
    key = (id(weight), dtype)
    held = _head_casts.get(key)
    if held is None or held[0] is not weight or held[1] != weight._version:  # a changed weight is cast again
        held = _head_casts[key] = (weight, weight._version, weight.to(dtype))
    return held[2]


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of CE over rows of ``hidden @ weight.T + bias``, gradients computed in the forward pass.

    d CE_i / d logits_i = softmax(logits_i) - onehot(y_i), so each block's gradient is ready
    as soon as its logits are; only ``grad_hidden`` (rows x hidden) outlives the block.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int, compute_dtype: torch.dtype) -> torch.Tensor:
        w = _head_weight(weight, compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        wide = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums in fp32 at least
        grad_weight = torch.zeros_like(weight, dtype=wide) if want_w else None
        grad_bias = torch.zeros_like(bias, dtype=wide) if want_b else None
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(compute_dtype)
            t = targets[start:start + rows]
            logits = (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()).to(wide)
            picked = torch.arange(t.shape[0], device=t.device)
            target_logits = logits[picked, t]
            # In place: logits -> exp(logits - max) -> softmax. Four passes over the block and
            # one exp per entry; log_softmax followed by exp_ costs ~4x more on CPU.
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            total -= (target_logits - top.squeeze(-1) - sums.log().squeeze(-1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            probs.div_(sums)
            probs[picked, t] -= 1.0  # now d(sum CE)/d logits
            grad_logits = probs.to(compute_dtype)
            del logits, probs
            if grad_hidden is not None:
                grad_hidden[start:start + rows] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).to(wide)
            if grad_bias is not None:
                grad_bias += grad_logits.to(wide).sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        grads = [None if g is None else (g * grad_total).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, block by block.

    ``hidden`` is (n, hidden_size) and ``targets`` (n,) holds no ignored entries. Equal to
    ``F.cross_entropy((hidden @ weight.T + bias).float(), targets)``, with the same gradients
    for ``hidden``, ``weight`` and ``bias``, without ever holding the (n, vocab) logits.
    Under autocast the matmuls run in the autocast dtype, as ``nn.Linear`` would.
    """
    rows = rows or block_rows(hidden.shape[0], weight.shape[0], hidden.device)
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        total = _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, compute_dtype)
    return total / targets.shape[0]


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The backbone and plain linear head of a supported causal LM, else None."""
    config = getattr(model, "config", None)
    # architectures.py marks the families whose causal-LM forward is exactly backbone -> lm_head -> shifted mean CE
    if config is None or not architectures.has_plain_lm_head(model):
        return None
    if not type(model).__name__.endswith("ForCausalLM") and type(model).__name__ != "GPT2LMHeadModel":
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
        return None
    # A hook or an instance-level forward on the whole model (e.g. prompt tuning) would be skipped;
    # the hooks that route adapter_names= act at inference only.
    hooks = [*model._forward_hooks.values(), *model._forward_pre_hooks.values()]
    if any(hook not in core.ROW_HOOKS for hook in hooks) or "forward" in vars(model):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or not isinstance(backbone, nn.Module) or backbone is model:
        return None
    return backbone, head


def supports_fast_loss(model: nn.Module, batch: dict[str, Any]) -> bool:
    """Whether :func:`causal_lm_loss` can compute this batch's loss."""
    labels, input_ids = batch.get("labels"), batch.get("input_ids")
    if not isinstance(labels, torch.Tensor) or not isinstance(input_ids, torch.Tensor):
        return False
    if labels.dim() != 2 or labels.shape != input_ids.shape or labels.dtype == torch.bool or labels.is_floating_point():
        return False
    return _backbone_and_head(model) is not None


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], rows: int | None = None) -> torch.Tensor | None:
    """``model(**batch).loss`` for a causal LM, computed from the hidden states in blocks.

    Returns None when the model or batch is not one this path supports.
    """
    parts = _backbone_and_head(model)
    if parts is None or not supports_fast_loss(model, batch):
        return None
    backbone, head = parts
    hidden = _hidden_states(model, backbone, batch)
    # Position t predicts token t+1; positions whose next token is ignored need no logits.
    next_tokens = batch["labels"][:, 1:].to(hidden.device)
    keep = next_tokens != IGNORE
    hidden = hidden[:, :-1]
    if bool(keep.all()):
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), next_tokens.reshape(-1)
    else:
        hidden, targets = hidden[keep], next_tokens[keep]
    return linear_cross_entropy(hidden, head.weight, head.bias, targets, rows)


def _hidden_states(model: nn.Module, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden states for the batch's inputs (its labels left out, no cache)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "use_cache" in _forward_params(backbone):
        inputs["use_cache"] = False
    with fast_attention(model, batch):
        output = backbone(**inputs)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _forward_params(module: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor], use_cache: dict[str, bool]) -> torch.Tensor:
    """The model's own loss: through :func:`causal_lm_loss` where supported, else ``model(**batch).loss``.

    Either way under :func:`fast_attention`, so that every method's loss sees the same attention.
    """
    loss = causal_lm_loss(model, batch)
    if loss is not None:
        return loss
    with fast_attention(model, batch):
        return model(**batch, **use_cache).loss


def labelled_logps(model: nn.Module, batch: dict[str, torch.Tensor], use_cache: dict[str, bool]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of ``log p(y_i | tokens before i)`` over its labelled tokens, and their count.

    The preference objectives' sequence log-probability. On the plain-head path each row's sum
    is :class:`_LinearCrossEntropy` over its own labelled positions (never a row's full logits);
    any other model gives its logits (the last ``width`` positions: prompt tuning puts its
    virtual tokens in front) and their log-softmax.
    """
    labels = batch["labels"]
    next_tokens = labels[:, 1:]
    keep = next_tokens != IGNORE
    counts = keep.sum(dim=1)
    parts = _backbone_and_head(model)
    if parts is None:
        return (token_logps(model, batch, use_cache) * keep).sum(dim=1), counts
    backbone, head = parts
    hidden = _hidden_states(model, backbone, batch)
    hidden, targets = hidden[:, :-1][keep], next_tokens[keep]
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    rows = block_rows(int(counts.max()) if counts.numel() else 1, head.weight.shape[0], hidden.device)
    sums, at = [], 0
    with torch.autocast(hidden.device.type, enabled=False):
        for count in counts.tolist():
            segment = slice(at, at + count)
            sums.append(-_LinearCrossEntropy.apply(hidden[segment], head.weight, head.bias, targets[segment], rows,
                                                   compute_dtype))
            at += count
    return torch.stack(sums).float(), counts


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], use_cache: dict[str, bool]) -> torch.Tensor:
    """``log p(token t+1 | tokens up to t)`` at every position, (rows, width - 1) in fp32; zero where unlabelled.

    On the plain-head path only the labelled positions go through the head, a block of rows at a
    time, each block's logits recomputed in the backward instead of kept (GRPO's per-token
    log-probabilities never hold the batch's full logits). Any other model gives its logits (the
    last ``width`` positions: prompt tuning puts its virtual tokens in front) and their log-softmax.
    """
    parts = _backbone_and_head(model)
    if parts is not None:
        return _labelled_token_logps(model, parts, batch)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with fast_attention(model, batch):
        logits = model(**inputs, **use_cache).logits[:, -labels.shape[1]:-1]
    next_tokens = labels[:, 1:]
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, next_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (next_tokens != IGNORE)


def _labelled_token_logps(model: nn.Module, parts: tuple[nn.Module, nn.Linear], batch: dict[str, torch.Tensor]
                          ) -> torch.Tensor:
    backbone, head = parts
    next_tokens = batch["labels"][:, 1:]
    keep = next_tokens != IGNORE
    hidden = _hidden_states(model, backbone, batch)
    hidden, targets = hidden[:, :-1][keep], next_tokens[keep]
    rows = block_rows(hidden.shape[0], head.weight.shape[0], hidden.device)
    picked = [checkpoint(_block_logps, hidden[at:at + rows], head.weight, head.bias, targets[at:at + rows],
                         use_reentrant=False) for at in range(0, hidden.shape[0], rows)]
    logps = torch.zeros(next_tokens.shape, dtype=torch.float32, device=hidden.device)
    return logps.masked_scatter(keep, torch.cat(picked)) if picked else logps


def _block_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
