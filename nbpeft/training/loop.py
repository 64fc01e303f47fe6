"""A small training loop for adapters, with the device and precision picked for you.

The loop tells listeners what happens through four typed events (``nbpeft.training.events``):
``on_begin(Begin)``, ``on_step(Step)`` once per optimizer step (its loss, learning rate and
gradient norm before clipping; the eval loss and metrics on evaluation steps), ``on_note(Note)`` (e.g. a one-off compile pause) and
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import core
from ..data.batches import Batches
from ..data.preferences import PreferenceBatches
from ..errors import ConfigError
from . import checkpoints as checkpoint
from . import compiling, distributed, lm_loss, memory, method_steps, objectives, precision, record
from .attention import attends_per_example
from .events import Begin, End, Listener, Note, Step, StopTraining, TrainResult, as_listener
from .options import Settings, docstring, signature
from .precision import Choice, choose

__all__ = ["Listener", "StopTraining", "TrainResult", "train", "evaluate", "pick_device", "pick_precision"]

LR_FLOOR = 0.1  # linear and cosine decay to 10% of the peak: the last steps still learn
DEFAULT_EFFECTIVE_BATCH = 8  # batch_size="auto" without effective_batch=: as many as the default batch_size


def _activation_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Turn transformers' activation (gradient) checkpointing on, the newer names first; returns the undo.

    Enabling it also hooks the input embeddings (so checkpointed blocks see inputs that need
    grad), and transformers' own disable leaves that hook: the undo removes it unless it was
    there before, or each run would leave one more.
    """
    had_hook = bool(getattr(model, "_require_grads_hooks", None)) or hasattr(model, "_require_grads_hook")
    newer = hasattr(model, "activation_checkpointing_enable")
    if newer:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def undo() -> None:
        model.activation_checkpointing_disable() if newer else model.gradient_checkpointing_disable()
        if not had_hook and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()

    return undo


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
    if s.resume is True and s.overwrite:
        raise ConfigError("train(): resume=True continues the checkpoints in output_dir and overwrite=True replaces "
                          "them; give one of the two")
    if s.batch_size == "auto" and distributed.wanted(s.processes, s.shard):
        raise ConfigError("train(): batch_size='auto' works in one process; with processes= give batch_size=N "
                          "(rows per process)")
    if s.gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError("train(): gradient_checkpointing=True needs a transformers model")
    if s.lr_ratio != 1 and not lora_b_parameters(model):
        raise ConfigError(f"train(): lr_ratio={s.lr_ratio} speeds up LoRA's B matrices, but no trainable lora_B was "
                          "found; attach a LoRA-family adapter or leave lr_ratio=1")
    _check_trainable(model, s.full)
    if s.objective != "sft":
        _check_objective(model, s)


def _check_objective(model: nn.Module, s: Settings) -> None:
    """What a preference objective cannot go with."""
    why = f"train(): objective={s.objective!r} computes its own loss on whole rows of answers"
    if s.loss_fn is not None and not getattr(s.loss_fn, "around_objective", False):  # processes=N wraps the objective
        raise ConfigError(f"{why}; loss_fn= goes with objective='sft'; drop loss_fn=")
    if s.packing:
        raise ConfigError(f"{why}; packing=True goes with objective='sft'; drop packing=")
    if s.batching not in ("auto", "padded"):
        raise ConfigError(f"{why}; batching={s.batching!r} goes with objective='sft'; drop batching=")
    if s.batch_size == "auto":
        raise ConfigError(f"{why}; batch_size='auto' goes with objective='sft'; give batch_size=N (rows a micro-batch)")
    objectives.check_model(model, objectives.build(s.objective, s), s.full)


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
    ``max_grad_norm`` scales the gradients down to that total norm (``None``: no clipping);
    each step reports the norm before clipping (``Step.grad_norm``, the progress line, the history).

    ``eval_data`` is evaluated every ``eval_every`` steps (default: five times a run) and
    at the last step; ``metrics(model) -> {"name": value}`` is called at the same steps
    (with the model in eval mode, gradients off) and its values join the eval table.

    ``save_every=N`` writes a checkpoint to ``output_dir/checkpoint-<step>`` every N steps
    and at the end; ``resume=True`` continues from the latest one in ``output_dir`` (or
    ``resume=path`` from that checkpoint): trained parameters, optimizer, step, history and
    random state come back, so the losses match an uninterrupted run. Each checkpoint records
    its run (the options that shape it, a fingerprint of the data, what trains): ``resume=True``
    refuses a latest checkpoint of another run, and a run refuses to write into a folder that
    holds another run's checkpoints unless ``overwrite=True``, which removes them first.

    ``loss_fn(model, batch)`` replaces the model's own loss (``model(**batch).loss``),
    e.g. for the T-Few multiple-choice losses. Without it, causal LMs get the same loss
    computed block by block from the hidden states (``nbpeft.training.lm_loss``), never holding the
    full fp32 logits.

    ``compile=True`` compiles the repeated decoder block with ``torch.compile`` (faster
    steps after a one-off compile); ``None`` (default) times two eager steps and compiles
    when the remaining steps would pay the compile back (``compiling.compile_pays_off``; the
    compile's cost scaled by a speed probe, since a busy machine slows it as much as the steps),
    where a compiler is available. A run that compiled leaves nothing compiled behind (the next
    run, with another adapter, compiles afresh), and a block that keeps recompiling goes back
    to eager steps with a note.

    ``live``: True draws a live loss curve in notebooks (plain lines elsewhere); False is
    silent; a :class:`nbpeft.training.events.Listener` or a function ``fn(event, payload)`` gets
    the events.

    ``data`` takes any form :mod:`nbpeft.data` reads; ``columns={"question": "prompt"}`` (data
    column → nbpeft's name, as ``datasets.rename_columns``; ``{"prompt": "question"}`` reads the
    same) maps other column names. ``batching="auto"`` lays out each batch with the least padding this
    data and model allow (packed rows where the model attends example by example, else batches grouped by
    length, or plain padded batches where lengths are even; see ``nbpeft.data.layouts``), said in the
    start banner with its padding share; ``packing=True`` instead fills rows of ``max_length`` with
    whole examples, ``packing=False`` never packs.
    Without ``tokenizer``, the one that belongs to the model is used (``data.tokenizer_for``).

    ``batch_size="auto"`` trains ``effective_batch`` examples a step (default 8) in the largest
    micro-batch that fits, accumulating the rest (see ``nbpeft.training.memory``); the start banner
    says what it chose (e.g. ``batch auto: 4 × 2 accumulated = 8``). A step that runs out of
    memory is retried with half the micro-batch and twice the accumulation (the same step,
    nothing lost), said in one line.

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
    called = time.perf_counter()
    run = _plan(model, s)
    run.called = called
    run.listener = extras.around(run.listener)
    try:
        return _train(run)
    except BaseException as err:
        extras.failed(err)  # the run record keeps how the run ended
        raise


def _train(run: Run) -> TrainResult:
    """The run's loop, its phases in order; every change to the model undone however it ends."""
    with contextlib.ExitStack() as restores:  # each change to the model registers its undo: all run, however it ends
        _setup(run, restores)
        _begin(run, restores)
        try:
            for step in range(run.first + 1, run.steps + 1):
                began = time.perf_counter()
                step_batches = _batch(run)                       # batch: this step's batches
                event = _step(run, step, step_batches, began)    # step: forward, backward, clip, optimizer
                _evaluate(run, event)                            # evaluate: on evaluation steps
                _record(run, event)                              # the history row
                _checkpoint(run, step)                           # checkpoint: every save_every steps and at the end
                run.listener.on_step(event)                      # report
                _compile_if_it_pays(run, step)                   # compile=None: decided after two eager steps
        except StopTraining:  # from a listener, or a non-finite loss (which said why)
            run.result.stopped = run.result.stopped or "stopped"
            run.result.message = run.result.message or (f"stopped after step {run.result.steps} of {run.steps}; "
                                                        "the adapter stays attached")
        except KeyboardInterrupt:
            run.optimizer.zero_grad(set_to_none=True)  # a step cut short left partial gradients
            run.result.stopped = "interrupted"
            run.result.message = (f"interrupted after step {run.result.steps} of {run.steps}; the model keeps the "
                                  "adapter weights of the last completed step and is ready to use")
    return _end(run)


@dataclass
class Run:
    """One run as it trains: what the phases of :func:`train` read and update.

    ``_plan`` fills the first fields (the model is not touched yet), ``_setup`` and
    ``_begin`` the rest; the phases then update the micro-batch, the compiled blocks, the speed
    counters and the result.
    """

    model: nn.Module
    settings: Settings
    batches: Batches
    evals: Batches | None
    listener: Listener
    dev: torch.device
    choice: Choice
    steps: int  # the last step of the run
    warmup: int
    eval_every: int | None
    auto_batch: bool
    saved: dict[str, Any] | None  # the checkpoint to resume from
    identity: dict[str, Any]  # what each checkpoint records as the run it belongs to
    first: int = 0  # the step a resumed run starts after
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: Any = None
    scaler: Any = None
    autocast: Any = None
    use_cache: dict[str, bool] = field(default_factory=dict)
    stream: Iterator[dict[str, torch.Tensor]] | None = None
    result: TrainResult = field(default_factory=TrainResult)
    rows: int | None = None  # rows of a batch (None: a DataLoader's batches keep their own size)
    micro: int | None = None  # rows of a micro-batch (None: whole batches)
    compiled: list[nn.Module] = field(default_factory=list)
    compiled_since: set[int] | None = None  # dynamo's compiled code before this run compiled (None: it did not)
    decide_compile: bool = False
    called: float = 0.0  # when train() was called: its preparation is the time until the first step
    started: float = 0.0
    tokens: int = 0  # trained on by this run, for its speed
    step_seconds: float = 0.0
    objective: objectives.Objective | None = None  # None: SFT, the model's own loss
    objective_loss: objectives.ObjectiveLoss | None = None
    figures: dict[str, list[float]] = field(default_factory=dict)  # this step's figures: [weighted sum, weight]

    @property
    def accumulated(self) -> int:
        """Micro-batches a step: grad_accum batches, each in as many micro-batches as it takes."""
        return self.settings.grad_accum * _parts(self.rows, self.micro)


def _plan(model: nn.Module, s: Settings) -> Run:
    """What the run will do, every check passed before anything changes: its data, length, device and checkpoint."""
    batch_size, auto_batch = _batch_plan(s.batch_size, s.grad_accum, s.effective_batch)
    resume_from = checkpoint.find(s.resume, s.output_dir) if s.resume else None
    objective = objectives.build(s.objective, s) if s.objective != "sft" else None
    dev = pick_device(s.device)
    layout = {"packing": bool(s.packing), "batching": s.batching,  # auto packs only where the model attends per example
              "can_pack": s.batching == "auto" and s.packing is None and not s.compile and objective is None
              and attends_per_example(model, dev, s.gradient_checkpointing)}
    batches = _batches(s.data, s, batch_size, model, objective, layout)
    if auto_batch and (batches.kind == "batches" or batches.stream is not None):
        raise ConfigError("train(): batch_size='auto' needs examples with a length (a list or a Dataset); "
                          "a DataLoader or a stream keeps the batch size it has, so give batch_size=")
    evals = _batches(s.eval_data, s, batch_size, model, objective, layout) if s.eval_data is not None else None
    steps, eval_every = s.steps, s.eval_every
    if steps is None:
        if batches.per_epoch is None:
            raise ConfigError("train(): this data has no length; pass steps=")
        steps = max(1, math.ceil((s.epochs or 1) * batches.per_epoch / s.grad_accum))
    if (evals is not None or s.metrics is not None) and eval_every is None:
        eval_every = max(1, steps // 5)
    examples = batches.examples if batches.kind != "batches" and batches.stream is None else None
    identity = checkpoint.identity(vars(s), examples, model, s.full, steps)
    if s.resume is True:
        checkpoint.check_resume(resume_from, identity)
    saved = checkpoint.load(resume_from) if resume_from else None
    if saved is not None and saved["step"] >= steps:
        raise ConfigError(f"train(): the checkpoint is at step {saved['step']}, the run has {steps} steps; "
                          "raise steps= to train further")
    choice = choose(dev, s.precision)
    if s.compile and not compiling.can_compile(dev):
        raise ConfigError(f"train(): compile=True needs a C++ compiler (CPU) or Triton (CUDA) on {dev.type}; use compile=False")
    if s.save_every is not None and s.overwrite:
        checkpoint.clear(s.output_dir)
    elif s.save_every is not None:
        checkpoint.check_folder(s.output_dir, identity, resuming=saved is not None)
    return Run(model=model, settings=s, batches=batches, evals=evals, listener=_listener(s.live), dev=dev,
               choice=choice, steps=steps, warmup=warmup_steps(s.warmup, steps), eval_every=eval_every,
               auto_batch=auto_batch, saved=saved, identity=identity, objective=objective)


def _batches(data: Any, s: Settings, batch_size: int, model: nn.Module, objective: objectives.Objective | None,
             layout: dict[str, Any]) -> Any:
    """The stream of batches: examples for SFT (laid out as ``layout`` says), the objective's rows otherwise."""
    if objective is None:
        return Batches(data, s.tokenizer, batch_size, s.max_length, s.seed, model=model, columns=s.columns, **layout)
    return PreferenceBatches(data, s.tokenizer, batch_size, s.max_length, s.seed, form=objective.data,
                             objective=objective.name, model=model, columns=s.columns)


def _setup(run: Run, restores: contextlib.ExitStack) -> None:
    """The model on its device, the optimizer, the data stream; a resumed run's state from its checkpoint."""
    model, s = run.model, run.settings
    if s.full:  # every parameter trains for the run, then is frozen again, as the rest of the API expects
        flags = {param: param.requires_grad for param in model.parameters()}
        model.requires_grad_(True)
        restores.callback(_set_requires_grad, flags)
    run.params = core.trainable_parameters(model)
    torch.manual_seed(s.seed)
    model.to(run.dev)
    run.use_cache = {"use_cache": False} if _accepts(model, "use_cache") else {}
    run.autocast = run.choice.autocast(run.dev) if run.choice.autocast_dtype is not None else contextlib.nullcontext()
    run.scaler = torch.amp.GradScaler(run.dev.type) if run.choice.needs_scaler else None
    if run.objective is not None:
        reference = objectives.Reference(model, run.params, s.full) if run.objective.uses_reference else None
        run.objective_loss = run.objective.make_loss(reference, run.use_cache, {"train": run.batches, "eval": run.evals})
        if s.loss_fn is not None:  # one process of several: its share of each batch, gradients summed over ranks
            s.loss_fn.inner = run.objective_loss
    run.optimizer = torch.optim.AdamW(_param_groups(run.params, s.weight_decay, lora_b_parameters(model), s.lr_ratio),
                                      lr=s.lr, **({"fused": True} if run.dev.type == "cuda" else {}))
    run.stream = iter(run.batches)
    run.result = TrainResult(device=str(run.dev), precision=run.choice.name, total_steps=run.steps,
                             trainable=sum(p.numel() for p in run.params), full=s.full)
    if run.saved is not None:
        checkpoint.restore(run.saved, model, run.optimizer, run.scaler)
        reference = run.objective_loss.reference if run.objective_loss is not None else None
        if reference is not None and run.saved.get("reference") is not None:  # the model as the first run started
            reference.restore(run.saved["reference"])
        run.first = run.saved["step"]
        run.result.history = list(run.saved["history"])
        for _ in range(run.first * s.grad_accum):  # the data stream where the checkpoint left it
            next(run.stream)
        checkpoint.restore_rng(run.saved)
        run.saved = None  # its tensors are copied in: let them go
    if s.gradient_checkpointing:
        restores.callback(_activation_checkpointing(model))


def _begin(run: Run, restores: contextlib.ExitStack) -> None:
    """The micro-batch (batch_size="auto"), compiling, the Begin event, then the model in training form."""
    model, s, dev = run.model, run.settings, run.dev
    run.rows = run.batches.batch_size if run.batches.kind != "batches" else None
    run.micro, batch_reason = run.rows, ""
    if run.auto_batch:
        run.micro, batch_reason = memory.fit_micro_batch(model, run.batches, run.rows, dev, run.params,
                                                         lambda batch: _loss(run, batch), run.autocast)
        if run.evals is not None:  # evaluation batches no larger than the training micro-batch
            run.evals.batch_size = min(run.evals.batch_size, run.micro)
    # packed rows attend example by example only uncompiled (compiled, a row's attention spans its whole width)
    run.decide_compile = (s.compile is None and not s.gradient_checkpointing and compiling.can_compile(dev)
                          and getattr(run.batches, "layout", "") != "packed")
    if s.compile:
        _compile(run)
    restores.callback(_uncompile, run)  # read at the end: blocks compiled later too
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    device_name, device_memory = _device_info(dev)
    batches = run.batches
    run.listener.on_begin(Begin(
        total_steps=run.steps, trainable=run.result.trainable, device=str(dev), precision=run.choice.name,
        examples=len(batches.examples) if batches.kind != "batches" else None,
        epochs=run.steps * s.grad_accum / batches.per_epoch if batches.per_epoch else None,
        batch_size=run.micro or 0, grad_accum=run.accumulated, full=s.full, device_name=device_name,
        device_memory=device_memory, precision_reason=run.choice.reason, schedule=s.schedule,
        warmup_steps=run.warmup, lr=s.lr, has_eval=run.evals is not None, start_step=run.first,
        batch_reason=batch_reason, objective=s.objective,
        figures=run.objective.figures if run.objective is not None else (),
        batching=getattr(batches, "batching_line", ""), prepare_s=time.perf_counter() - run.called,
    ))
    for note in batches.notes:
        run.listener.on_note(Note(note))
    if run.objective_loss is not None:
        run.listener.on_note(Note(_objective_note(run)))
    run.started = time.perf_counter()
    model.train()
    restores.callback(model.eval)
    restores.callback(memory.steady_allocator(dev))
    restores.callback(precision.hold_frozen_weights_in_bf16(model, run.choice))
    restores.callback(lm_loss.frozen_head_casts())


def _objective_note(run: Run) -> str:
    """What the objective compares with, and what precompute_ref= did or would save."""
    s, objective, reference = run.settings, run.objective, run.objective_loss.reference
    line = f"objective {objective.name} (beta={objective.beta})"
    if reference is None:
        return line + ": no reference model" + (f"; {s.num_generations} answers sampled per prompt each step"
                                                if objective.data == "prompts" else "")
    line += f"; reference: the model as it started, {reference.how}"
    if objective.data == "prompts":
        return line + f"; {s.num_generations} answers sampled per prompt each step"
    passes = len(objective.trained_slots) + (objective.data == "unpaired")
    if not s.precompute_ref:
        return line + f" ({passes} reference forward passes a row each step; precompute_ref=True computes them once)"
    began = time.perf_counter()
    with torch.no_grad():
        rows = reference.precompute(run.batches, run.dev, run.autocast, run.use_cache)
        if run.evals is not None:
            reference.precompute(run.evals, run.dev, run.autocast, run.use_cache, "eval")
    seen = run.steps * s.grad_accum * run.batches.batch_size
    return line + (f"; its log-probabilities precomputed for {rows} rows in {time.perf_counter() - began:.1f} s, "
                   f"saving {passes} forward passes a row on each of the ~{seen:,} rows the run trains on")


def _set_requires_grad(flags: dict[nn.Parameter, bool]) -> None:
    for param, flag in flags.items():
        param.requires_grad = flag


def _batch(run: Run) -> list[dict[str, torch.Tensor]]:
    """The next step's batches: grad_accum of them."""
    return [next(run.stream) for _ in range(run.settings.grad_accum)]


def _step(run: Run, step: int, step_batches: list[dict[str, torch.Tensor]], began: float) -> Step:
    """One optimizer step: the scheduled learning rate, forward and backward, clipping, the update."""
    s, optimizer = run.settings, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = s.lr * group.get("lr_scale", 1.0) * lr_factor(step, run.steps, run.warmup, s.schedule)
    run.figures = {}
    if run.objective_loss is not None:
        run.objective_loss.generation_s = 0.0
    loss, tokens = _forward_backward(run, step, step_batches)
    figures = method_steps.backward_extra_loss(run.model, run.scaler)  # e.g. AdaLoRA's orthogonality penalty
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        run.result.stopped = "non-finite loss"
        run.result.message = (
            f"loss became {loss} at step {step}; the adapter keeps the weights of step {step - 1}. "
            f"Likely causes: a learning rate too high (lr={s.lr}), fp16 overflow (try precision='bf16' or "
            "'fp32'), or a batch whose labels are all masked."
        )
        raise StopTraining
    if run.scaler:
        run.scaler.unscale_(optimizer)
    grad_norm = _clip(run.params, s.max_grad_norm)
    if run.scaler:
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        optimizer.step()
    figures.update(method_steps.after_step(run.model, step, run.steps))  # gradients still there: e.g. AdaLoRA's budget
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    run.tokens, run.step_seconds = run.tokens + tokens, run.step_seconds + seconds
    return Step(step=step, total_steps=run.steps, loss=loss, lr=optimizer.param_groups[0]["lr"], tokens=tokens,
                step_time_s=seconds, elapsed_s=0.0, tokens_per_s=run.tokens / run.step_seconds, eta_s=0.0,
                peak_mem_bytes=peak_memory(run.dev), grad_norm=grad_norm, figures={**_means(run.figures), **figures},
                generation_s=run.objective_loss.generation_s if run.objective_loss and run.objective.data == "prompts"
                else None)


def _clip(params: list[nn.Parameter], max_grad_norm: float | None) -> float:
    """The gradients' total norm before clipping; scaled down to ``max_grad_norm`` unless it is None."""
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2's norm is sharded


def _forward_backward(run: Run, step: int, step_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """The step's gradients: (its loss, its tokens). Out of memory, the step is done again in micro-batches half the size."""
    s = run.settings
    while True:
        try:
            return _accumulate(run, step_batches)
        except Exception as err:  # noqa: BLE001 (anything but running out of memory is raised)
            if not memory.is_out_of_memory(err):
                raise
            ran_out = run.micro or max(memory.rows_of(b) for b in step_batches)
        # here, outside the except, the failed try's activations are unreachable and can be freed
        run.optimizer.zero_grad(set_to_none=True)  # a backward cut short left partial gradients
        run.figures = {}
        if run.dev.type == "cuda":
            torch.cuda.empty_cache()
        if ran_out <= 1:
            raise ConfigError(_out_of_memory_advice(step, run.batches, s.gradient_checkpointing, run.choice.name))
        run.micro = ran_out // 2
        if run.evals is not None and run.evals.kind != "batches":
            run.evals.batch_size = min(run.evals.batch_size, run.micro)
        run.rows = run.rows or max(memory.rows_of(b) for b in step_batches)  # a DataLoader's: the first that ran out
        run.listener.on_note(Note(
            f"out of memory at micro-batch {ran_out} in step {step}; retrying the step with micro-batch {run.micro} "
            f"× {run.accumulated} accumulated (the same effective batch {run.rows * s.grad_accum})"))


def _accumulate(run: Run, step_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Forward and backward of one step's batches, ``run.micro`` rows at a time: (the step's loss, its tokens).

    Each micro-batch's loss counts by its share of its batch's rows, so the gradients add up
    to those of whole batches. A non-finite loss is returned as the step's loss before any
    backward of it.
    """
    loss_sum, tokens = 0.0, 0
    for whole in step_batches:
        for part, share in memory.split_batch(whole, run.micro):
            batch = {k: v.to(run.dev) for k, v in part.items()}
            with run.autocast:
                loss = _loss(run, batch)
                loss = (loss * share if share != 1.0 else loss) / len(step_batches)
            if not torch.isfinite(loss):
                return loss.item(), tokens
            (run.scaler.scale(loss) if run.scaler else loss).backward()
            loss_sum += loss.item()
            sampled = run.objective_loss.tokens if run.objective_loss is not None else None
            tokens += sampled if sampled is not None else batch_size_in_tokens(batch)
            if run.objective_loss is not None:
                _add_figures(run.figures, run.objective_loss.figures, share / len(step_batches))
    return loss_sum, tokens


def _add_figures(sums: dict[str, list[float]], figures: dict[str, float], weight: float) -> None:
    """Into ``sums`` (name -> [weighted sum, weight]): a micro-batch's figures at ``weight``."""
    for name, value in figures.items():
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += value * weight
        total[1] += weight


def _means(sums: dict[str, list[float]]) -> dict[str, float]:
    return {name: total / weight for name, (total, weight) in sums.items() if weight}


def _loss(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss_fn = run.settings.loss_fn
    if run.objective_loss is not None and loss_fn is None:
        return run.objective_loss(run.model, batch)
    return loss_fn(run.model, batch) if loss_fn else lm_loss.model_loss(run.model, batch, run.use_cache)


def _evaluate(run: Run, event: Step) -> None:
    """On evaluation steps (every eval_every and the last): the eval loss and the metrics, into the step's event."""
    s = run.settings
    if run.eval_every is None or (event.step % run.eval_every and event.step != run.steps):
        return
    if run.evals is not None and run.objective_loss is not None:
        event.eval_loss, event.eval_figures = _evaluate_objective(run)
    elif run.evals is not None:
        event.eval_loss = evaluate(run.model, run.evals, run.dev, run.autocast, run.use_cache, s.loss_fn)
    if s.metrics is not None:
        event.metrics = _metrics(run.model, s.metrics)
    run.model.train()


@torch.no_grad()
def _evaluate_objective(run: Run) -> tuple[float, dict[str, float]]:
    """The objective's mean loss and figures over one pass of eval_data."""
    run.model.eval()
    loss_fn, losses, figures, rows = run.objective_loss, [], {}, 0
    loss_fn.split = "eval"
    try:
        for batch in run.evals.once():
            batch = {k: v.to(run.dev) for k, v in batch.items()}
            with run.autocast:
                loss = loss_fn(run.model, batch)
            n = len(batch["index"])
            losses.append(loss.float().item() * n)
            _add_figures(figures, loss_fn.figures, n)
            rows += n
    finally:
        loss_fn.split = "train"
    return sum(losses) / max(rows, 1), _means(figures)


def _record(run: Run, event: Step) -> None:
    """The step's time since the run began, its estimate of the time left, and its history row."""
    event.elapsed_s = time.perf_counter() - run.started
    event.eta_s = event.elapsed_s / (event.step - run.first) * (run.steps - event.step)
    run.result.history.append(event.row())


def _checkpoint(run: Run, step: int) -> None:
    """Every save_every steps and at the last: everything a resumed run needs, under output_dir."""
    s = run.settings
    if s.save_every is not None and (step % s.save_every == 0 or step == run.steps):
        path = checkpoint.save(checkpoint.folder(s.output_dir, step), run.model, run.optimizer, run.scaler, step,
                               run.result.history, run.identity, _reference_state(run))
        run.result.checkpoint = str(path)


def _reference_state(run: Run) -> dict[str, Any] | None:
    reference = run.objective_loss.reference if run.objective_loss is not None else None
    return reference.state() if reference is not None else None


def _compile_if_it_pays(run: Run, step: int) -> None:
    """compile=None: after two eager steps, compile the repeated block if the steps left would pay it back.

    A compiled run whose block keeps recompiling (shapes or guards that change from step to step)
    goes back to eager steps, saying so, before dynamo's recompile limit would.
    """
    if run.compiled and compiling.near_recompile_limit(run.compiled_since):
        run.listener.on_note(Note(f"the decoder block recompiled {compiling.recompile_limit() - 1} times; "
                                  "eager steps from here (compile=False skips compiling)"))
        _uncompile(run)
    if not run.decide_compile or step != run.first + 2:
        return
    slowness = compiling.speed_probe() / compiling.PROBE_SECONDS  # now, beside the two steps just timed
    step_seconds = min(r["step_time_s"] for r in run.result.history[-2:])
    if compiling.compile_pays_off(run.dev, step_seconds, run.steps - step, slowness):
        run.listener.on_note(Note("compiling the decoder block for faster steps "
                                  "(a one-off pause; compile=False turns this off)"))
        _compile(run)


def _compile(run: Run) -> None:
    run.compiled_since = compiling.cache_snapshot()
    run.compiled = compiling.compile_blocks(run.model)


def _uncompile(run: Run) -> None:
    """The blocks eager again, and dynamo's entries for what this run compiled dropped (they hold its adapters)."""
    compiling.uncompile_blocks(run.compiled)
    run.compiled = []
    if run.compiled_since is not None:
        compiling.drop_new_caches(run.compiled_since)
        run.compiled_since = None


def _end(run: Run) -> TrainResult:
    """The result, completed with the run's time and batch, to the listeners' End and the caller."""
    result = run.result
    result.seconds = time.perf_counter() - run.started
    result.truncated, result.dropped = run.batches.truncated, run.batches.dropped
    result.batch_size, result.grad_accum = run.micro or 0, run.accumulated
    if result.history and not run.settings.full:  # the adapters moved: disabling them is no longer the start
        st = core.state(run.model)
        for name in st.active:
            if name in st.adapters:
                st.adapters[name].trained = True
    run.listener.on_end(End(result))
    return result


def _parts(rows: int | None, micro: int | None) -> int:
    """How many micro-batches one batch of ``rows`` makes."""
    return -(-rows // micro) if rows and micro else 1


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
