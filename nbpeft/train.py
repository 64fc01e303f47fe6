"""A small training loop for adapters, with the device and precision picked for you.

The loop emits events to listeners, each ``listener(event, payload)``: ``begin``, ``step``
(one per optimizer step; its row holds the eval loss on eval steps), ``note`` (a message
such as a one-off compile pause) and ``end``. The live display in notebooks is one such
listener, and the loop knows nothing of it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import core, fast
from .data import Batches
from .methods.base import ConfigError
from .precision import PRECISIONS, choose  # noqa: F401  (PRECISIONS: the panel imports it from here)

Listener = Callable[[str, dict[str, Any]], None]


class StopTraining(Exception):
    """Raised by a listener to stop cleanly after the current step."""


@dataclass
class TrainResult:
    """What a run did: one history row per step (and the eval losses)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    total_steps: int = 0
    stopped: str | None = None
    message: str = ""
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        return [(row["step"], row["eval_loss"]) for row in self.history if row.get("eval_loss") is not None]

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    def __repr__(self) -> str:
        if not self.history:
            return f"TrainResult(no steps; {self.message or 'nothing ran'})"
        first, last = self.history[0]["loss"], self.history[-1]["loss"]
        state = f", stopped: {self.stopped}" if self.stopped else ""
        return (
            f"TrainResult({self.steps}/{self.total_steps} steps on {self.device} {self.precision}, "
            f"loss {first:.4f} -> {last:.4f}, {self.seconds:.1f} s{state})"
        )


def pick_device(device: str = "auto") -> torch.device:
    """CUDA, then Apple's MPS, then CPU."""
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"train(): device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'mps'") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train(): device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision name for ``device`` (see ``nbpeft.precision.choose``, which also says why)."""
    return choose(device, precision).name


def peak_memory(device: torch.device) -> int:
    """Peak bytes: GPU memory allocated on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _accepts(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10% of the peak."""
    if step <= warmup:
        return step / max(warmup, 1)
    return 1.0 - 0.9 * (step - warmup) / max(total - warmup, 1)


def _check_options(steps: int | None, epochs: float | None, lr: float, batch_size: int, grad_accum: int, max_length: int) -> None:
    for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"train(): {name}={value!r} must be a positive integer")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"train(): steps={steps!r} must be a positive integer")
    if epochs is not None and (not isinstance(epochs, (int, float)) or epochs <= 0):
        raise ConfigError(f"train(): epochs={epochs!r} must be positive")
    if steps is not None and epochs is not None:
        raise ConfigError("train(): give steps= or epochs=, not both")
    if not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ConfigError(f"train(): lr={lr!r} must be between 0 and 1, e.g. lr=2e-4")


def train(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 2e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 512,
    eval_data: Any = None,
    eval_every: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    gradient_checkpointing: bool = False,
    live: bool | Listener = True,
    seed: int = 0,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    compile: bool | None = None,
) -> TrainResult:
    """Train the model's trainable parameters (its active adapter) on ``data``.

    ``loss_fn(model, batch)`` replaces the model's own loss (``model(**batch).loss``),
    e.g. for the T-Few multiple-choice losses. Without it, causal LMs get the same loss
    computed block by block from the hidden states (``nbpeft.fast``), never holding the
    full fp32 logits.

    ``compile=True`` compiles the repeated decoder block with ``torch.compile`` (faster
    steps after a one-off compile); ``None`` (default) times two eager steps and compiles
    when the remaining steps would pay the compile back (``fast.compile_pays_off``), where
    a compiler is available.

    Stops cleanly on KeyboardInterrupt or a non-finite loss, returning the history so
    far; the adapter stays attached either way.
    """
    _check_options(steps, epochs, lr, batch_size, grad_accum, max_length)
    params = core.trainable_parameters(model)
    if not params:
        raise ConfigError("train(): the model has no trainable parameters; attach an adapter first, e.g. nbpeft.attach(model, 'lora')")
    batches = Batches(data, tokenizer, batch_size, max_length, seed)
    evals = Batches(eval_data, tokenizer, batch_size, max_length, seed) if eval_data is not None else None
    if steps is None:
        if batches.per_epoch is None:
            raise ConfigError("train(): this data has no length; pass steps=")
        steps = max(1, math.ceil((epochs or 1) * batches.per_epoch / grad_accum))
    if evals is not None and eval_every is None:
        eval_every = max(1, steps // 5)

    dev = pick_device(device)
    prec = pick_precision(dev, precision)
    listeners = _listeners(live)
    torch.manual_seed(seed)
    model.to(dev)
    use_cache = {"use_cache": False} if _accepts(model, "use_cache") else {}
    autocast = (
        torch.autocast(dev.type, dtype=torch.bfloat16 if prec == "bf16" else torch.float16)
        if prec in ("bf16", "fp16")
        else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **({"fused": True} if dev.type == "cuda" else {}))
    warmup = min(10, max(1, steps // 10))
    if gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError("train(): gradient_checkpointing=True needs a transformers model")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile and not fast.can_compile(dev):
        raise ConfigError(f"train(): compile=True needs a C++ compiler (CPU) or Triton (CUDA) on {dev.type}; use compile=False")
    decide_compile = compile is None and not gradient_checkpointing and fast.can_compile(dev)
    compiled = fast.compile_blocks(model) if compile else []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    result = TrainResult(device=str(dev), precision=prec, total_steps=steps)
    _emit(listeners, "begin", {"total_steps": steps, "device": str(dev), "precision": prec,
                               "trainable": sum(p.numel() for p in params), "kind": batches.kind})
    stream = iter(batches)
    start = time.perf_counter()
    model.train()
    restore_allocator = fast.steady_allocator(dev)
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, steps, warmup)
            loss_sum, tokens = 0.0, 0
            for _ in range(grad_accum):
                batch = {k: v.to(dev) for k, v in next(stream).items()}
                with autocast:
                    loss = (loss_fn(model, batch) if loss_fn else fast.model_loss(model, batch, use_cache)) / grad_accum
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    result.stopped = "non-finite loss"
                    result.message = (
                        f"loss became {loss.item()} at step {step}; the adapter keeps the weights of step {step - 1}. "
                        f"Likely causes: a learning rate too high (lr={lr}), fp16 overflow (try precision='bf16' or "
                        "'fp32'), or a batch whose labels are all masked."
                    )
                    raise StopTraining
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            row = {"step": step, "loss": loss_sum, "eval_loss": None, "lr": optimizer.param_groups[0]["lr"],
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "peak_mem_bytes": peak_memory(dev),
                   "elapsed_s": time.perf_counter() - start}
            result.history.append(row)
            if evals is not None and (step % eval_every == 0 or step == steps):
                row["eval_loss"] = evaluate(model, evals, dev, autocast, use_cache, loss_fn)
                model.train()
            _emit(listeners, "step", {"row": row, "total_steps": steps})
            if decide_compile and step == 2:
                if fast.compile_pays_off(dev, min(r["step_time_s"] for r in result.history), steps - step):
                    _emit(listeners, "note", {"message": "compiling the decoder block for faster steps "
                                              "(a one-off pause; compile=False turns this off)"})
                    compiled = fast.compile_blocks(model)
    except StopTraining:
        result.stopped = result.stopped or "stopped"
        result.message = result.message or f"stopped after step {len(result.history)} of {steps}; the adapter stays attached"
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        result.stopped = "interrupted"
        result.message = (
            f"interrupted after step {len(result.history)} of {steps}; the model keeps the adapter weights "
            "of the last completed step and is ready to use"
        )
    finally:
        restore_allocator()
        model.eval()
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
        fast.uncompile_blocks(compiled)
    result.seconds = time.perf_counter() - start
    _emit(listeners, "end", {"result": result})
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, dev: torch.device, autocast: Any, use_cache: dict,
             loss_fn: Callable | None = None) -> float:
    """Mean loss over one pass of ``batches``."""
    model.eval()
    losses = []
    # Compiled blocks were traced with gradients on; evaluation runs them eagerly rather than recompile.
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    with eager:
        for batch in batches.once():
            batch = {k: v.to(dev) for k, v in batch.items()}
            with autocast:
                loss = loss_fn(model, batch) if loss_fn else fast.model_loss(model, batch, use_cache)
                losses.append(loss.float().item())
    return sum(losses) / max(len(losses), 1)


def _listeners(live: bool | Listener) -> list[Listener]:
    if callable(live):
        return [live]
    if live:
        from .live import make_display

        return [make_display()]
    return []


def _emit(listeners: list[Listener], event: str, payload: dict[str, Any]) -> None:
    for listener in listeners:
        listener(event, payload)
