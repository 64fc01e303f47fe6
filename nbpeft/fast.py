"""Faster, leaner training paths that give the same loss as the model's own.

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

import contextlib
import ctypes
import functools
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import architectures, core

IGNORE = -100
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
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "use_cache" in _forward_params(backbone):
        inputs["use_cache"] = False
    with fast_attention(model, batch):
        output = backbone(**inputs)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    # Position t predicts token t+1; positions whose next token is ignored need no logits.
    next_tokens = batch["labels"][:, 1:].to(hidden.device)
    keep = next_tokens != IGNORE
    hidden = hidden[:, :-1]
    if bool(keep.all()):
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), next_tokens.reshape(-1)
    else:
        hidden, targets = hidden[keep], next_tokens[keep]
    return linear_cross_entropy(hidden, head.weight, head.bias, targets, rows)


# ---------------------------------------------------------------- attention while the loss is computed

ATTENTION = "nbpeft_sdpa"
_segments_cache: list[Any] = [None, None]  # the last mask seen and its segments (one mask serves every layer)
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
        _segments_cache[:] = [None, None]


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
    _segments_cache[:] = [mask, found]
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
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # -> (1, n, heads, d)
            if dtype is not None:
                return causal_attention(q, k, v, scale, dtype).transpose(1, 2)
            return sdpa_attention_forward(module, q, k, v, None, **dict(kwargs, is_causal=True))[0]

        rows = [torch.cat([attend(query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b]) for a, b in runs],
                          dim=1) for r, runs in enumerate(segments)]
        return torch.cat(rows), None
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


class _Attention(torch.autograd.Function):
    """Attention by two matmuls and an fp32 softmax that keeps only its inputs for backward.

    The probabilities, (b, heads, n, n), are computed again in backward rather than held
    from forward to backward across every layer, as a flash kernel does.
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
        ctx.save_for_backward(grouped, key, value, hidden)
        return torch.matmul(probs.to(dtype), value.unsqueeze(2)).reshape(b, heads, n, value.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grouped, key, value, hidden = ctx.saved_tensors
        probs = _Attention._probs(grouped, key, hidden, ctx.scale)
        grad_out = grad_out.to(value.dtype).reshape(*grouped.shape[:-1], value.shape[-1])
        grad_value = torch.matmul(probs.to(value.dtype).transpose(-1, -2), grad_out).float().sum(2)
        grad_probs = torch.matmul(grad_out, value.unsqueeze(2).transpose(-1, -2)).float()
        grad_scores = probs.mul_(grad_probs - (grad_probs * probs).sum(-1, keepdim=True)).mul_(ctx.scale)
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


# ---------------------------------------------------------------- regional compilation

# "auto" compiles once two eager steps show the run is long enough to pay the compile back:
# estimated saving (this fraction of a step, every remaining step) > estimated compile time.
# Measured on smollm2-135m, 2 CPU cores: compiled steps 10-13% faster; a cold compile 17 s,
# one from torch's on-disk cache 2 s. GPU figures are conservative guesses until measured.
COMPILE_SAVING = {"cpu": 0.10, "cuda": 0.20}
COMPILE_SECONDS = {"cpu": 20.0, "cuda": 60.0}


def compile_pays_off(device: torch.device, step_seconds: float, steps_left: int) -> bool:
    """Whether compiling now likely saves more time over the remaining steps than it costs."""
    saving = COMPILE_SAVING.get(device.type, 0.0) * step_seconds * steps_left
    return saving > COMPILE_SECONDS.get(device.type, float("inf"))


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the longest ``nn.ModuleList`` whose entries all share one class (the decoder layers)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len(module) > 1:
            if len({type(block) for block in module}) == 1:
                best = list(module)
    return best


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile's default backend can build kernels here (a C++ compiler on CPU, Triton on CUDA)."""
    import importlib.util
    import shutil

    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return False


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile each repeated block in place (one compiled graph serves every block); returns them.

    Compiling the block rather than the whole model keeps the compile time to one block's,
    and leaves the model's own forward, the loss and the adapters' Python untouched.
    """
    blocks = [block for block in repeated_blocks(model) if block._compiled_call_impl is None]
    for block in blocks:
        block.compile()
    return blocks


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    """Undo :func:`compile_blocks`: the blocks run eagerly again (e.g. for generation)."""
    for block in blocks:
        block._compiled_call_impl = None


# ---------------------------------------------------------------- CPU allocator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit; its own dynamic threshold tops out here
_AFTER_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD_MAX  # where glibc's dynamic trim threshold would settle


def _glibc() -> Any | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Hand glibc's free heap back to the kernel, so the resident set shrinks to what is in use (no-op without glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def steady_allocator(device: torch.device) -> Callable[[], None]:
    """Keep freed CPU memory in the process between training steps; returns the undo.

    By default glibc hands large freed blocks back to the kernel, so every step's
    activations arrive as fresh pages that fault in one at a time: 15,000-35,000 page faults
    per step for smollm2-135m at 4 x 128 tokens, 2-3% of the step. During training the heap
    keeps what it frees (requests up to 32 MiB come from it, freed memory is not trimmed) and
    the next step reuses the same, already mapped pages; the peak is the same working set.
    The undo returns the free memory to the kernel and leaves glibc's thresholds where its
    own dynamic adjustment would have settled. Does nothing off CPU or without glibc.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        return lambda: None
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)

    def undo() -> None:
        libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)

    return undo
