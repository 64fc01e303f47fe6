"""Attention while the training loss is computed: per example for packed rows, by two matmuls under bf16 on CPU.

Both give SDPA's result (same softmax over the same keys) where SDPA on CPU is slow; see :func:`fast_attention`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import core
from .compiling import repeated_blocks

ATTENTION = "nbpeft_sdpa"
_segments_cache: list[Any] = [None, None, None]  # the last mask seen, its segments and groups (one mask serves every layer)
# Keywords transformers passes to attention that the mask or the inputs already account for;
# any other (a softcap, attention sinks, ...) leaves the layer to SDPA.
PLAIN_KWARGS = {"dropout", "scaling", "sliding_window", "position_ids", "use_cache", "is_causal", "cache_position",
                "output_attentions"}


@contextlib.contextmanager
def fast_attention(model: nn.Module, batch: dict[str, Any]) -> Iterator[None]:
    """On CPU, attention that SDPA computes slowly runs another way, to the same result.

    - Packed rows (``position_ids``, no ``attention_mask``): transformers gives them a
      block-diagonal causal mask, and SDPA with a mask computes every query against every key
      of the row, masked or not (three times the work of the examples alone for rows of 256
      holding three examples of ~85), and repeats the grouped key/value heads. Here each
      example runs causal attention on its own tokens: the same softmax over the same keys,
      so the same loss. The mask is checked to be exactly block-diagonal causal.
    - bf16/fp16 (autocast's or the weights'): PyTorch's CPU flash-attention kernel, backward
      included, takes about twice the time of :func:`causal_attention`'s two matmuls and fp32
      softmax at a few hundred tokens, so that runs instead, with the mask transformers built.

    Anything else runs SDPA as before. Only models on transformers' "sdpa" attention, eager,
    without gradient checkpointing.
    """
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    on_cpu = first is not None and first.device.type == "cpu"
    # (a config with sub-configs would pass the setting on to them: left alone; gradient checkpointing
    # recomputes the forward in backward, after the setting is put back, and must see the same attention)
    if (not on_cpu or getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sub_configs", None)
            or _checkpointing(model)
            or any(block._compiled_call_impl is not None for block in repeated_blocks(model))
            or not _register_attention()):
        yield
        return
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _segments_cache[:] = [None, None, None]


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on (the newer name first: the older warns)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(on if on is not None else getattr(model, "is_gradient_checkpointing", False))


@functools.cache
def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return True


# Packed examples attend in groups of similar length: each group's examples are padded at their end
# to the group's width (a multiple of this) and attend in one batched call; causal attention keeps
# the padding unseen by the real tokens, whose results alone are kept.
BUCKET = 16


def _buckets(mask: torch.Tensor, segments: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]:
    """For packed rows: the token index of every group's positions, group after group (each example
    padded by repeating its last token); each group's (examples, width); and where each token's result
    sits among the groups' outputs. Cached with the mask: every layer uses the same."""
    if len(_segments_cache) > 2 and _segments_cache[2] is not None:
        return _segments_cache[2]
    width = mask.shape[-1]
    groups: dict[int, list[list[int]]] = {}
    for r, runs in enumerate(segments):
        for a, b in runs:
            tokens = list(range(r * width + a, r * width + b))
            groups.setdefault(-(-(b - a) // BUCKET) * BUCKET, []).append(tokens)
    index, shapes, place = [], [], [0] * sum(len(m) for members in groups.values() for m in members)
    for size, members in sorted(groups.items()):
        for m in members:
            for i, token in enumerate(m):
                place[token] = len(index) + i
            index += m + [m[-1]] * (size - len(m))
        shapes.append((len(members), size))
    found = (torch.tensor(index, device=mask.device), shapes, torch.tensor(place, device=mask.device))
    _segments_cache[2:] = [found]
    return found


def by_length(buckets: tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor], query: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, attend: Any) -> torch.Tensor:
    """Causal attention of each packed example over its own tokens, one ``attend`` call per group of
    similar lengths; ``query`` (b, heads, n, d), result (b, n, heads, d).

    One gather of each input and one of the result, whatever the number of groups: their backward
    is one scatter each, where a gather per group would zero and scatter into a full-size gradient
    per group.
    """
    index, shapes, place = buckets
    b, n = query.shape[0], query.shape[2]
    gathered = [t.transpose(1, 2).reshape(b * n, t.shape[1], t.shape[3]).index_select(0, index)
                for t in (query, key, value)]
    outputs, at = [], 0
    for count, size in shapes:
        parts = (g[at:at + count * size].view(count, size, *g.shape[1:]).transpose(1, 2) for g in gathered)
        outputs.append(attend(*parts).reshape(count * size, query.shape[1], value.shape[3]))  # from (examples, size, heads, d)
        at += count * size
    found = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return found.index_select(0, place).reshape(b, n, *found.shape[1:])


def _segments(mask: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Each row's runs of tokens ``(start, end)`` if ``mask`` (b, 1, L, L) is exactly causal within them, else None."""
    if _segments_cache[0] is mask:
        return _segments_cache[1]
    found = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]:
        rows = mask[:, 0]
        length = rows.shape[-1]
        first = rows.int().argmax(-1)  # the first key each query sees: the start of its example
        index = torch.arange(length, device=mask.device)
        expected = (first[:, :, None] == first[:, None, :]) & (index[None, :, None] >= index[None, None, :])
        if torch.equal(rows, expected):
            found = []
            for starts in first.tolist():
                bounds = [i for i in range(length) if starts[i] == i] + [length]
                found.append(list(zip(bounds[:-1], bounds[1:])))
    _segments_cache[:] = [mask, found, None]
    return found


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    n = query.shape[2]
    if (n == 1 or key.shape[2] != n or not causal or set(kwargs) - PLAIN_KWARGS or torch.compiler.is_compiling()
            or (attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4
                                                or attention_mask.shape[1] != 1))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = _matmul_dtype(query, kwargs)
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    segments = _segments(attention_mask) if attention_mask is not None else None
    if segments is not None:  # packed rows: each example on its own tokens, causal, no mask
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # -> (examples, n, heads, d)
            if dtype is not None:
                return causal_attention(q, k, v, scale, dtype).transpose(1, 2)
            return sdpa_attention_forward(module, q, k, v, None, **dict(kwargs, is_causal=True))[0]

        return by_length(_buckets(attention_mask, segments), query, key, value, attend), None
    if dtype is not None:
        return causal_attention(query, key, value, scale, dtype, attention_mask).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _matmul_dtype(query: torch.Tensor, kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype :func:`causal_attention` runs in instead of SDPA, or None to run SDPA.

    bf16/fp16 on CPU (the query's dtype, or autocast's) without dropout: there PyTorch's CPU
    flash-attention kernel, backward included, takes about twice the time of the two matmuls
    and a softmax at ~100 tokens an example.
    """
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    usable = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not kwargs.get("dropout")
    return dtype if usable else None


# Probabilities at most this many times the query's size (n <= this x head_dim) are kept for backward:
# then they cost little memory beside the layer's own activations, and backward skips a matmul and a softmax.
KEEP_PROBS = 4


class _Attention(torch.autograd.Function):
    """Attention by two matmuls and an fp32 softmax.

    Short sequences keep the probabilities, (b, heads, n, n), for backward; longer ones keep
    only the inputs and compute the probabilities again in backward, as a flash kernel does,
    rather than hold n² values a head from forward to backward across every layer.
    """

    @staticmethod
    def _probs(grouped: torch.Tensor, key: torch.Tensor, hidden: torch.Tensor, scale: float) -> torch.Tensor:
        scores = torch.matmul(grouped.float(), key.unsqueeze(2).transpose(-1, -2).float()) * scale
        return scores.masked_fill_(hidden, torch.finfo(torch.float32).min).softmax(-1)

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor,
                scale: float, dtype: torch.dtype) -> torch.Tensor:
        b, heads, n, d = query.shape
        ctx.scale, ctx.dtypes = scale, (query.dtype, key.dtype, value.dtype)  # the gradients' dtypes
        grouped = query.to(dtype).reshape(b, key.shape[1], heads // key.shape[1], n, d)
        key, value = key.to(dtype), value.to(dtype)
        probs = _Attention._probs(grouped, key, hidden, scale)
        ctx.save_for_backward(grouped, key, value, hidden, probs if n <= KEEP_PROBS * d else None)
        return torch.matmul(probs.to(dtype), value.unsqueeze(2)).reshape(b, heads, n, value.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grouped, key, value, hidden, kept = ctx.saved_tensors
        probs = _Attention._probs(grouped, key, hidden, ctx.scale) if kept is None else kept
        grad_out = grad_out.to(value.dtype).reshape(*grouped.shape[:-1], value.shape[-1])
        grad_value = torch.matmul(probs.to(value.dtype).transpose(-1, -2), grad_out).float().sum(2)
        grad_probs = torch.matmul(grad_out, value.unsqueeze(2).transpose(-1, -2)).float()
        grad_probs -= (grad_probs * probs).sum(-1, keepdim=True)
        grad_scores = (probs.mul_(grad_probs) if kept is None else grad_probs.mul_(probs)).mul_(ctx.scale)
        grad_query = torch.matmul(grad_scores, key.unsqueeze(2).float()).flatten(1, 2)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), grouped.float()).sum(2)
        return (grad_query.to(ctx.dtypes[0]), grad_key.to(ctx.dtypes[1]), grad_value.to(ctx.dtypes[2]),
                None, None, None)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     dtype: torch.dtype | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``query`` (b, heads, n, d) over ``key``/``value`` (b, kv_heads, n, d).

    ``mask`` (bool, True where a query sees a key, (b, 1, n, n) or (n, n)) replaces the causal
    one when given, as SDPA's ``attn_mask``. Computed as SDPA computes in ``dtype`` (default:
    the query's): inputs rounded to ``dtype``, scores and softmax in fp32, the probabilities
    meeting the values in ``dtype``; the result is in ``dtype``. Grouped heads share their
    key/value head without copies. A query that sees no key gets the mean of the values.
    """
    n = query.shape[2]
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    hidden = ~mask.unsqueeze(-3) if mask.dim() == 4 else ~mask  # against scores (b, kv_heads, group, n, n)
    with torch.autocast(query.device.type, enabled=False):
        return _Attention.apply(query, key, value, hidden, scale, dtype or query.dtype)




def attends_per_example(model: nn.Module, device: torch.device, checkpointing: bool = False) -> bool:
    """Whether packed rows train on ``device`` with attention example by example (:func:`fast_attention`),
    each example seeing only its own tokens: so a packed token costs no more than a padded one.

    Checked on the model itself: two copies of a short sequence in one row (positions restarting)
    must give the second copy the first one's hidden states, as when the model honours packed rows.
    """
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    if (device.type != "cpu" or first is None or first.device.type != "cpu" or checkpointing
            or getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sub_configs", None)
            or getattr(config, "is_encoder_decoder", False) or not _register_attention()):
        return False
    # a hook or an instance-level forward on the whole model (prompt tuning's virtual tokens) would
    # see a packed row as one example; the hooks that route adapter_names= act at inference only
    hooks = [*model._forward_hooks.values(), *model._forward_pre_hooks.values()]
    if any(hook not in core.ROW_HOOKS for hook in hooks) or "forward" in vars(model):
        return False
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return False
    ids = torch.tensor([[1, 2, 3, 4] * 2]) % max(int(getattr(config, "vocab_size", 5) or 5), 5)
    positions = torch.arange(4).repeat(2)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fast_attention(model, {"input_ids": ids}):
            hidden = backbone(input_ids=ids, position_ids=positions, use_cache=False)[0]
    except Exception:  # noqa: BLE001 (a model that cannot take this row does not pack)
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(hidden[0, :4], hidden[0, 4:], atol=1e-4, rtol=1e-3))
