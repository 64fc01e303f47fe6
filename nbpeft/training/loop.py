"""A small training loop for adapters, with the device and precision picked for you.

The loop tells listeners what happens through four typed events (``nbpeft.training.events``):
``on_begin(Begin)``, ``on_step(Step)`` once per optimizer step (with the eval loss and
metrics on evaluation steps), ``on_note(Note)`` (e.g. a one-off compile pause) and
``on_end(End)``. The live displays in ``nbpeft.training.display`` are such listeners; the loop knows
nothing of them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .. import core
from ..data.batches import Batches
from ..errors import ConfigError
from . import checkpoints as checkpoint
from . import compiling, distributed, lm_loss, memory, precision, record
from .events import Begin, End, Listener, Note, Step, StopTraining, TrainResult, as_listener
from .options import SCHEDULES, Settings, docstring, signature  # noqa: F401  (SCHEDULES: imported from here)
from .precision import PRECISIONS, Choice, choose  # noqa: F401  (PRECISIONS: the panel imports it from here)

__all__ = ["Listener", "StopTraining", "TrainResult", "train", "evaluate", "pick_device", "pick_precision"]

LR_FLOOR = 0.1  # linear and cosine decay to 10% of the peak: the last steps still learn
DEFAULT_EFFECTIVE_BATCH = 8  # batch_size="auto" without effective_batch=: as many as the default batch_size


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn transformers' activation (gradient) checkpointing on or off; the newer names first, the older warn."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


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
    """The precision name for ``device`` (see ``nbpeft.training.precision.choose``, which also says why)."""
    return choose(device, precision).name


def peak_memory(device: torch.device) -> int:
    """Peak bytes: GPU memory allocated on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def batch_size_in_tokens(batch: dict[str, Any]) -> int:
    """What a batch counts for speed: its unmasked tokens, else its token ids, else its examples.

    Batches of pixels or audio features (ViT's ``pixel_values``, Whisper's ``input_features``)
    have no tokens to count; each example counts as one.
    """
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        return int(batch["attention_mask"].sum())
    if isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 0


def _accepts(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """The learning rate of ``step`` (1-based) as a fraction of the peak.

    Linear warm-up from 0 over ``warmup`` steps, then ``constant`` (1), ``linear`` (straight
    down to ``LR_FLOOR`` at the last step) or ``cosine`` (half a cosine down to ``LR_FLOOR``).
    """
    if step <= warmup:
        return step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - LR_FLOOR) * progress


def warmup_steps(warmup: int | float | None, steps: int) -> int:
    """``None``: min(10, steps/10); an int: that many steps; a float below 1: that share of the steps."""
    if warmup is None:
        return min(10, max(1, steps // 10))
    if isinstance(warmup, float) and warmup < 1:
        return round(warmup * steps)
    return int(warmup)


def _check_combinations(model: nn.Module, s: Settings) -> None:
    """What no single option's check can see: options that go together or exclude each other."""
    if s.steps is not None and s.epochs is not None:
        raise ConfigError("train(): give steps= or epochs=, not both")
    if s.save_every is not None and s.output_dir is None:
        raise ConfigError("train(): save_every= needs output_dir=, the folder to write checkpoints to")
    if s.batch_size == "auto" and distributed.wanted(s.processes, s.shard):
        raise ConfigError("train(): batch_size='auto' works in one process; with processes= give batch_size=N "
                          "(rows per process)")
    if s.gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError("train(): gradient_checkpointing=True needs a transformers model")
    if s.lr_ratio != 1 and not lora_b_parameters(model):
        raise ConfigError(f"train(): lr_ratio={s.lr_ratio} speeds up LoRA's B matrices, but no trainable lora_B was "
                          "found; attach a LoRA-family adapter or leave lr_ratio=1")
    _check_trainable(model, s.full)


def _batch_plan(batch_size: int | str, grad_accum: int, effective_batch: int | None) -> tuple[Any, bool]:
    """The batch the data stream forms, and whether the micro-batch it is split into is to be found ("auto")."""
    if batch_size != "auto":
        if isinstance(batch_size, str):
            raise ConfigError(f"train(): batch_size={batch_size!r} must be a positive integer or 'auto'")
        if effective_batch is not None:
            raise ConfigError(f"train(): effective_batch= goes with batch_size='auto'; with batch_size={batch_size!r} "
                              "the effective batch is batch_size × grad_accum")
        return batch_size, False
    if grad_accum != 1:
        raise ConfigError("train(): batch_size='auto' chooses the accumulation itself; give the effective batch "
                          f"instead, e.g. effective_batch={DEFAULT_EFFECTIVE_BATCH * grad_accum}")
    effective = DEFAULT_EFFECTIVE_BATCH if effective_batch is None else effective_batch
    if not isinstance(effective, int) or isinstance(effective, bool) or effective < 1:
        raise ConfigError(f"train(): effective_batch={effective_batch!r} must be a positive integer")
    return effective, True


def _check_trainable(model: nn.Module, full: bool) -> None:
    """No silent full fine-tune: without an adapter, training needs full=True."""
    attached = list(core.state(model).adapters)
    if full and attached:
        raise ConfigError(f"train(): full=True fine-tunes the base model, but adapters are attached ({', '.join(attached)}); "
                          "detach them first with nbpeft.detach(model), or drop full=True to train the adapter")
    if not full and not attached:
        raise ConfigError('train(): this model has no adapter; attach one first, e.g. nbpeft.attach(model, "lora"), '
                          "or pass full=True to fine-tune every parameter")
    if not full and not core.trainable_parameters(model):
        raise ConfigError("train(): the model has no trainable parameters; attach an adapter first, e.g. nbpeft.attach(model, 'lora')")


def _param_groups(params: list[nn.Parameter], weight_decay: float, faster: list[nn.Parameter] | tuple = (),
                  lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying biases and norm scales only hurts.

    ``faster`` (LoRA's ``B`` matrices) learn at ``lr_ratio`` times the rate (LoRA+): each group's
    ``lr_scale`` multiplies the scheduled learning rate.
    """
    if lr_ratio != 1.0 and faster:
        fast_ids = {id(p) for p in faster}
        rest = [p for p in params if id(p) not in fast_ids]
        scaled = [p for p in params if id(p) in fast_ids]
        return [{**g, "lr_scale": 1.0} for g in _param_groups(rest, weight_decay)] + [
            {**g, "lr_scale": lr_ratio} for g in _param_groups(scaled, weight_decay)]
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    decayed = [p for p in params if p.ndim >= 2]
    kept = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}) if g["params"]]


def lora_b_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable ``B`` matrices of LoRA-family adapters (``lora_B``, ``lora_embedding_B``)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and re.search(r"\blora_(embedding_)?B\b", n)]


def _device_info(dev: torch.device) -> tuple[str, int]:
    if dev.type != "cuda":
        return "", 0
    props = torch.cuda.get_device_properties(dev)
    return props.name, props.total_memory


def train(model: nn.Module, data: Any, **options: Any) -> TrainResult:
    """Train the model's trainable parameters (its active adapter) on ``data``.

    A model with no adapter is refused unless ``full=True``, which trains every parameter
    for the run and freezes them again afterwards (``load_model`` returns a frozen model).

    The learning rate warms up linearly over ``warmup`` steps (an int) or a share of the
    steps (a float below 1; default min(10, steps/10)), then follows ``schedule``:
    ``"constant"``, ``"linear"`` or ``"cosine"`` (both down to 10% of ``lr`` at the last
    step). ``weight_decay`` is AdamW's decoupled decay, on weight matrices only.

    ``eval_data`` is evaluated every ``eval_every`` steps (default: five times a run) and
    at the last step; ``metrics(model) -> {"name": value}`` is called at the same steps
    (with the model in eval mode, gradients off) and its values join the eval table.

    ``save_every=N`` writes a checkpoint to ``output_dir/checkpoint-<step>`` every N steps
    and at the end; ``resume=True`` continues from the latest one in ``output_dir`` (or
    ``resume=path`` from that checkpoint): trained parameters, optimizer, step, history and
    random state come back, so the losses match an uninterrupted run.

    ``loss_fn(model, batch)`` replaces the model's own loss (``model(**batch).loss``),
    e.g. for the T-Few multiple-choice losses. Without it, causal LMs get the same loss
    computed block by block from the hidden states (``nbpeft.training.lm_loss``), never holding the
    full fp32 logits.

    ``compile=True`` compiles the repeated decoder block with ``torch.compile`` (faster
    steps after a one-off compile); ``None`` (default) times two eager steps and compiles
    when the remaining steps would pay the compile back (``compiling.compile_pays_off``), where
    a compiler is available.

    ``live``: True draws a live loss curve in notebooks (plain lines elsewhere); False is
    silent; a :class:`nbpeft.training.events.Listener` or a function ``fn(event, payload)`` gets
    the events.

    ``data`` takes any form :mod:`nbpeft.data` reads; ``columns={"question": "prompt"}`` (data
    column → nbpeft's name, as ``datasets.rename_columns``; ``{"prompt": "question"}`` reads the
    same) maps other column names, ``packing=True`` fills rows of ``max_length`` with whole examples.
    Without ``tokenizer``, the one that belongs to the model is used (``data.tokenizer_for``).

    ``batch_size="auto"`` trains ``effective_batch`` examples a step (default 8) in the largest
    micro-batch that fits, accumulating the rest (see ``nbpeft.training.memory``); the start banner
    says what it chose. A step that runs out of memory is retried with half the micro-batch
    and twice the accumulation (the same step, nothing lost), said in one line.

    ``lr_ratio`` is LoRA+ (Hayou et al. 2024): LoRA's ``B`` matrices learn at ``lr_ratio``
    times ``lr``, ``A`` and everything else at ``lr``; the paper's choice is 16.

    Stops cleanly on KeyboardInterrupt or a non-finite loss, returning the history so
    far; the adapter stays attached either way.

    ``processes=N`` trains data parallel on N processes (one per GPU, or N CPU processes),
    each on ``batch_size`` rows of every global batch of N × ``batch_size``; ``shard=True``
    also shards the frozen base over them (FSDP2). Inside a process group that is already up
    (torchrun, accelerate launch) every rank trains its share. See :mod:`nbpeft.training.distributed`.
    """
    s = Settings.of("train()", {"data": data, **options})
    _check_combinations(model, s)
    extras = record.Extras(model, data, s)  # the run record and trackers: this process's, not its workers'
    if distributed.wanted(s.processes, s.shard):
        rest = {k: v for k, v in vars(s).items() if k not in ("data", "processes", "shard")} | {"runs": False, "report_to": None}
        with extras.watching():
            return distributed.run(train, model, data, processes=s.processes, shard=s.shard, options=rest,
                                   listener=lambda: extras.around(_listener(s.live)))
    batch_size, auto_batch = _batch_plan(s.batch_size, s.grad_accum, s.effective_batch)
    tokenizer, max_length, seed, columns, packing = s.tokenizer, s.max_length, s.seed, s.columns, s.packing
    resume_from = checkpoint.find(s.resume, s.output_dir) if s.resume else None
    batches = Batches(data, tokenizer, batch_size, max_length, seed, model=model, columns=columns, packing=packing)
    if auto_batch and (batches.kind == "batches" or batches.stream is not None):
        raise ConfigError("train(): batch_size='auto' needs examples with a length (a list or a Dataset); "
                          "a DataLoader or a stream keeps the batch size it has, so give batch_size=")
    evals = (Batches(s.eval_data, tokenizer, batch_size, max_length, seed, model=model, columns=columns, packing=packing)
             if s.eval_data is not None else None)
    steps, eval_every = s.steps, s.eval_every
    if steps is None:
        if batches.per_epoch is None:
            raise ConfigError("train(): this data has no length; pass steps=")
        steps = max(1, math.ceil((s.epochs or 1) * batches.per_epoch / s.grad_accum))
    if (evals is not None or s.metrics is not None) and eval_every is None:
        eval_every = max(1, steps // 5)
    saved = checkpoint.load(resume_from) if resume_from else None
    if saved is not None and saved["step"] >= steps:
        raise ConfigError(f"train(): the checkpoint is at step {saved['step']}, the run has {steps} steps; "
                          "raise steps= to train further")
    dev = pick_device(s.device)
    prec = choose(dev, s.precision)
    if s.compile and not compiling.can_compile(dev):
        raise ConfigError(f"train(): compile=True needs a C++ compiler (CPU) or Triton (CUDA) on {dev.type}; use compile=False")
    listener = extras.around(_listener(s.live))
    full = s.full
    flags = {p: p.requires_grad for p in model.parameters()} if full else {}
    if full:
        model.requires_grad_(True)
    try:
        return _run(model, batches, evals, listener, dev, prec, steps, s.lr, s.grad_accum, eval_every, s.metrics,
                    s.schedule, warmup_steps(s.warmup, steps), s.weight_decay, s.save_every, s.output_dir, saved, full,
                    s.gradient_checkpointing, seed, s.loss_fn, s.compile, auto_batch, lr_ratio=s.lr_ratio,
                    max_grad_norm=s.max_grad_norm)
    except BaseException as err:
        extras.failed(err)  # the run record keeps how the run ended
        raise
    finally:
        for param, flag in flags.items():  # full=True: frozen again, as the rest of the API expects
            param.requires_grad = flag


def _run(model: nn.Module, batches: Batches, evals: Batches | None, listener: Listener, dev: torch.device, choice: Choice,
         steps: int, lr: float, grad_accum: int, eval_every: int | None, metrics: Callable | None, schedule: str,
         warmup: int, weight_decay: float, save_every: int | None, output_dir: Any, saved: dict | None, full: bool,
         gradient_checkpointing: bool, seed: int, loss_fn: Callable | None, compile: bool | None,
         auto_batch: bool = False, lr_ratio: float = 1.0, max_grad_norm: float | None = 1.0) -> TrainResult:
    prec = choice.name
    params = core.trainable_parameters(model)
    torch.manual_seed(seed)
    model.to(dev)
    use_cache = {"use_cache": False} if _accepts(model, "use_cache") else {}
    autocast = choice.autocast(dev) if choice.autocast_dtype is not None else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(dev.type) if choice.needs_scaler else None
    optimizer = torch.optim.AdamW(_param_groups(params, weight_decay, lora_b_parameters(model), lr_ratio), lr=lr,
                                  **({"fused": True} if dev.type == "cuda" else {}))
    stream = iter(batches)
    first = 0
    result = TrainResult(device=str(dev), precision=prec, total_steps=steps,
                         trainable=sum(p.numel() for p in params), full=full)
    if saved is not None:
        checkpoint.restore(saved, model, optimizer, scaler)
        first = saved["step"]
        result.history = list(saved["history"])
        for _ in range(first * grad_accum):  # the data stream where the checkpoint left it
            next(stream)
        checkpoint.restore_rng(saved)
    if gradient_checkpointing:
        _checkpointing(model, True)
    rows = batches.batch_size if batches.kind != "batches" else None  # a DataLoader's batches: their own size
    micro, batch_reason = rows, ""
    if auto_batch:
        micro, batch_reason = memory.fit_micro_batch(
            model, batches, rows, dev, params,
            lambda batch: loss_fn(model, batch) if loss_fn else lm_loss.model_loss(model, batch, use_cache), autocast)
        if evals is not None:  # evaluation batches no larger than the training micro-batch
            evals.batch_size = min(evals.batch_size, micro)
    decide_compile = compile is None and not gradient_checkpointing and compiling.can_compile(dev)
    compiled = compiling.compile_blocks(model) if compile else []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    device_name, device_memory = _device_info(dev)
    listener.on_begin(Begin(
        total_steps=steps, trainable=result.trainable, device=str(dev), precision=prec,
        examples=len(batches.examples) if batches.kind != "batches" else None,
        epochs=steps * grad_accum / batches.per_epoch if batches.per_epoch else None,
        batch_size=micro or 0, grad_accum=grad_accum * _parts(rows, micro), full=full, device_name=device_name,
        device_memory=device_memory, precision_reason=choice.reason, schedule=schedule, warmup_steps=warmup, lr=lr,
        has_eval=evals is not None, start_step=first, batch_reason=batch_reason,
    ))
    for note in batches.notes:
        listener.on_note(Note(note))
    start = time.perf_counter()
    run_tokens, run_step_time = 0, 0.0
    model.train()
    restore_allocator = memory.steady_allocator(dev)
    restore_weights = precision.hold_frozen_weights_in_bf16(model, choice)
    forget_head_casts = lm_loss.frozen_head_casts()
    try:
        for step in range(first + 1, steps + 1):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0) * lr_factor(step, steps, warmup, schedule)
            step_batches = [next(stream) for _ in range(grad_accum)]
            while True:  # a step that runs out of memory is done again in micro-batches half the size
                ran_out = None
                try:
                    loss_sum, tokens = _accumulate(model, step_batches, micro, dev, autocast, scaler, loss_fn, use_cache)
                    break
                except Exception as err:  # noqa: BLE001 (anything but running out of memory is raised)
                    if not memory.is_out_of_memory(err):
                        raise
                    ran_out = micro or max(memory.rows_of(b) for b in step_batches)
                # here, outside the except, the failed try's activations are unreachable and can be freed
                optimizer.zero_grad(set_to_none=True)  # a backward cut short left partial gradients
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if ran_out <= 1:
                    raise ConfigError(_out_of_memory_advice(step, batches, gradient_checkpointing, prec))
                micro = ran_out // 2
                if evals is not None and evals.kind != "batches":
                    evals.batch_size = min(evals.batch_size, micro)
                rows = rows or max(memory.rows_of(b) for b in step_batches)  # a DataLoader's: the first that ran out
                listener.on_note(Note(
                    f"out of memory at micro-batch {ran_out} in step {step}; retrying the step with micro-batch {micro} "
                    f"× {grad_accum * _parts(rows, micro)} accumulated (the same effective batch {rows * grad_accum})"))
            if not math.isfinite(loss_sum):
                optimizer.zero_grad(set_to_none=True)
                result.stopped = "non-finite loss"
                result.message = (
                    f"loss became {loss_sum} at step {step}; the adapter keeps the weights of step {step - 1}. "
                    f"Likely causes: a learning rate too high (lr={lr}), fp16 overflow (try precision='bf16' or "
                    "'fp32'), or a batch whose labels are all masked."
                )
                raise StopTraining
            if scaler:
                scaler.unscale_(optimizer)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_time = time.perf_counter() - t0
            run_tokens, run_step_time = run_tokens + tokens, run_step_time + step_time
            event = Step(step=step, total_steps=steps, loss=loss_sum, lr=optimizer.param_groups[0]["lr"], tokens=tokens,
                         step_time_s=step_time, elapsed_s=0.0, tokens_per_s=run_tokens / run_step_time, eta_s=0.0,
                         peak_mem_bytes=peak_memory(dev))
            if eval_every is not None and (step % eval_every == 0 or step == steps):
                if evals is not None:
                    event.eval_loss = evaluate(model, evals, dev, autocast, use_cache, loss_fn)
                if metrics is not None:
                    event.metrics = _metrics(model, metrics)
                model.train()
            event.elapsed_s = time.perf_counter() - start
            event.eta_s = event.elapsed_s / (step - first) * (steps - step)
            result.history.append(asdict(event))
            if save_every is not None and (step % save_every == 0 or step == steps):
                result.checkpoint = str(checkpoint.save(checkpoint.folder(output_dir, step), model, optimizer, scaler,
                                                        step, result.history))
            listener.on_step(event)
            if decide_compile and step == first + 2:
                if compiling.compile_pays_off(dev, min(r["step_time_s"] for r in result.history[-2:]), steps - step):
                    listener.on_note(Note("compiling the decoder block for faster steps "
                                          "(a one-off pause; compile=False turns this off)"))
                    compiled = compiling.compile_blocks(model)
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
        forget_head_casts()
        restore_weights()
        restore_allocator()
        model.eval()
        if gradient_checkpointing:
            _checkpointing(model, False)
        compiling.uncompile_blocks(compiled)
    result.seconds = time.perf_counter() - start
    result.truncated, result.dropped = batches.truncated, batches.dropped
    result.batch_size, result.grad_accum = micro or 0, grad_accum * _parts(rows, micro)
    listener.on_end(End(result))
    return result


def _parts(rows: int | None, micro: int | None) -> int:
    """How many micro-batches one batch of ``rows`` makes."""
    return -(-rows // micro) if rows and micro else 1


def _accumulate(model: nn.Module, step_batches: list[dict[str, torch.Tensor]], micro: int | None, dev: torch.device,
                autocast: Any, scaler: Any, loss_fn: Callable | None, use_cache: dict) -> tuple[float, int]:
    """Forward and backward of one step's batches, ``micro`` rows at a time: (the step's loss, its tokens).

    Each micro-batch's loss counts by its share of its batch's rows, so the gradients add up
    to those of whole batches. A non-finite loss is returned as the step's loss before any
    backward of it.
    """
    loss_sum, tokens = 0.0, 0
    for whole in step_batches:
        for part, share in memory.split_batch(whole, micro):
            batch = {k: v.to(dev) for k, v in part.items()}
            with autocast:
                loss = loss_fn(model, batch) if loss_fn else lm_loss.model_loss(model, batch, use_cache)
                loss = (loss * share if share != 1.0 else loss) / len(step_batches)
            if not torch.isfinite(loss):
                return loss.item(), tokens
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.item()
            tokens += batch_size_in_tokens(batch)
    return loss_sum, tokens


def _out_of_memory_advice(step: int, batches: Batches, gradient_checkpointing: bool, precision: str) -> str:
    fixes = [] if batches.kind == "batches" else [f"a lower max_length= (now {batches.max_length})"]
    if not gradient_checkpointing:
        fixes.append("gradient_checkpointing=True")
    if precision in ("fp32", "tf32"):
        fixes.append("precision='bf16'")
    fixes.append("memory freed elsewhere (nbpeft.release(model), other notebooks' kernels)")
    return f"train(): out of memory at step {step} even with micro-batch 1; try {', '.join(fixes)}"


def _metrics(model: nn.Module, metrics: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        values = metrics(model)
    if not isinstance(values, dict):
        raise ConfigError(f"train(): metrics= returned {type(values).__name__}; return a dict such as {{'accuracy': 0.9}}")
    return {str(k): float(v) for k, v in values.items()}


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
                loss = loss_fn(model, batch) if loss_fn else lm_loss.model_loss(model, batch, use_cache)
                losses.append(loss.float().item())
    return sum(losses) / max(len(losses), 1)


def _listener(live: bool | Listener | Callable[[str, Any], None]) -> Listener:
    if isinstance(live, Listener) or callable(live):
        return as_listener(live)
    if live:
        from .display import make_display

        return make_display()
    return Listener()  # silent: every handler does nothing


train.__signature__ = signature([inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
train.__doc__ = inspect.cleandoc(train.__doc__) + "\n\n" + docstring()
