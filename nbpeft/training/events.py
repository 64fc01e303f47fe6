"""What the training loop tells its listeners: four typed events, in the spirit of fastprogress,
the last carrying the run's :class:`TrainResult`.

A listener subclasses :class:`Listener` and overrides the methods it cares about::

    class Printer(Listener):
        def on_step(self, step: Step) -> None:
            print(step.step, step.loss)

A plain function ``fn(event_name, payload)`` works too: :func:`as_listener` adapts it, and
it receives the same dataclasses (``fn("step", Step(...))``). Raising
:class:`StopTraining` from any handler stops the run cleanly after the current step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class StopTraining(Exception):
    """Raised by a listener to stop cleanly after the current step."""


@dataclass
class Begin:
    """The run about to start: what trains, on what, for how long."""

    total_steps: int
    trainable: int
    device: str
    precision: str
    examples: int | None = None  # None for a DataLoader without a length of examples
    epochs: float | None = None  # None when the data has no length
    batch_size: int = 1  # 0 for ready-made batches (a DataLoader): their size is theirs
    grad_accum: int = 1
    full: bool = False  # every parameter trains (full fine-tuning)
    device_name: str = ""  # e.g. the GPU's name
    device_memory: int = 0  # bytes of GPU memory; 0 when not known
    precision_reason: str = ""
    schedule: str = "linear"
    warmup_steps: int = 0
    lr: float = 0.0
    has_eval: bool = False
    start_step: int = 0  # > 0 when resuming from a checkpoint
    batch_reason: str = ""  # how batch_size="auto" chose the micro-batch ("" when it was given)
    objective: str = "sft"
    figures: tuple[str, ...] = ()  # the objective's figures each step reports (TRL's names, e.g. "rewards/margins")
    batching: str = ""  # the batch layout and its padding share, e.g. "batching auto: packed (padding 0.4%; ...)"
    prepare_s: float = 0.0  # seconds from the train() call to the first step: reading, tokenising, planning

    def __post_init__(self) -> None:
        self.figures = tuple(self.figures)  # a job's events arrive through JSON as lists

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass
class Step:
    """One optimizer step. ``eval_loss``, ``eval_figures`` and ``metrics`` are filled on evaluation steps.

    ``figures`` are a preference objective's own values of the step (TRL's names: ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ...), means over its rows.
    """

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens: int
    step_time_s: float
    elapsed_s: float  # since this run started (a resumed run counts from its restart)
    tokens_per_s: float  # averaged over the steps of this run, not this step alone
    eta_s: float
    peak_mem_bytes: int
    grad_norm: float | None = None  # the gradients' total norm before clipping
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)  # the objective's and the attached methods' (AdaLoRA's ranks)
    eval_figures: dict[str, float] = field(default_factory=dict)
    generation_s: float | None = None  # of step_time_s, the time spent sampling answers (GRPO)

    def row(self) -> dict[str, Any]:
        """The step as a history row: its fields, each figure a column of its own (eval ones prefixed ``eval_``)."""
        row = {k: v for k, v in vars(self).items() if k not in ("figures", "eval_figures")}
        row["metrics"] = dict(self.metrics)
        row.update(self.figures)
        row.update({f"eval_{name}": value for name, value in self.eval_figures.items()})
        return row


@dataclass
class Note:
    """A message worth showing while training, e.g. a one-off compile pause."""

    message: str


@dataclass
class TrainResult:
    """What a run did: one history row per step (and the eval losses), its time, speed and memory."""

    history: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    total_steps: int = 0
    stopped: str | None = None
    message: str = ""
    seconds: float = 0.0
    trainable: int = 0
    full: bool = False
    checkpoint: str | None = None  # the last checkpoint written, if any
    truncated: int = 0  # training examples cut by max_length
    dropped: int = 0  # of those, the ones left with no labelled token (not trained on)
    batch_size: int = 0  # the micro-batch at the end (batch_size="auto" or an out-of-memory retry may change it)
    grad_accum: int = 1  # micro-batches a step at the end
    run_id: str | None = None  # the run's name in the run store (nbpeft.runs()); None when not recorded

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        return [(row["step"], row["eval_loss"]) for row in self.history if row.get("eval_loss") is not None]

    def figure(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of a preference objective's figure, e.g. ``result.figure("rewards/margins")``;
        ``"eval_rewards/margins"`` for its value on ``eval_data``."""
        return [(row["step"], row[name]) for row in self.history if row.get(name) is not None]

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    @property
    def tokens_per_s(self) -> float:
        """Average speed of the run: every token trained on over the time the steps took."""
        seconds = sum(row["step_time_s"] for row in self.history)
        return sum(row["tokens"] for row in self.history) / seconds if seconds else 0.0

    @property
    def peak_mem_bytes(self) -> int:
        return max((row["peak_mem_bytes"] for row in self.history), default=0)

    def __repr__(self) -> str:
        if not self.history:
            return f"TrainResult(no steps; {self.message or 'nothing ran'})"
        first, last = self.history[0]["loss"], self.history[-1]["loss"]
        state = f", stopped: {self.stopped}" if self.stopped else ""
        return (
            f"TrainResult({self.steps}/{self.total_steps} steps on {self.device} {self.precision}, "
            f"loss {first:.4f} -> {last:.4f}, {self.seconds:.1f} s, {self.tokens_per_s:,.0f} tok/s{state})"
        )


@dataclass
class End:
    """The run is over; ``result`` is the :class:`TrainResult` that ``train`` returns."""

    result: TrainResult


class Listener:
    """Receives the loop's events; every handler does nothing unless overridden."""

    def on_begin(self, begin: Begin) -> None:
        pass

    def on_step(self, step: Step) -> None:
        pass

    def on_note(self, note: Note) -> None:
        pass

    def on_end(self, end: End) -> None:
        pass


class FunctionListener(Listener):
    """Adapts ``fn(event_name, payload)``: ``fn("begin", Begin(...))``, ``fn("step", Step(...))``, ..."""

    def __init__(self, fn: Callable[[str, Any], None]) -> None:
        self.fn = fn

    def on_begin(self, begin: Begin) -> None:
        self.fn("begin", begin)

    def on_step(self, step: Step) -> None:
        self.fn("step", step)

    def on_note(self, note: Note) -> None:
        self.fn("note", note)

    def on_end(self, end: End) -> None:
        self.fn("end", end)


def as_listener(live: Listener | Callable[[str, Any], None]) -> Listener:
    return live if isinstance(live, Listener) else FunctionListener(live)


class Together(Listener):
    """Several listeners as one: each event goes to each, in order."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners

    def on_begin(self, begin: Begin) -> None:
        for listener in self.listeners:
            listener.on_begin(begin)

    def on_step(self, step: Step) -> None:
        for listener in self.listeners:
            listener.on_step(step)

    def on_note(self, note: Note) -> None:
        for listener in self.listeners:
            listener.on_note(note)

    def on_end(self, end: End) -> None:
        for listener in self.listeners:
            listener.on_end(end)


class Guarded(Listener):
    """A listener that must never stop training (a run record, a tracker): its first error is said
    once through ``say`` and it hears nothing more."""

    def __init__(self, inner: Listener, name: str, say: Callable[[Note], None]) -> None:
        self.inner, self.name, self.say = inner, name, say
        self.broken = False

    def _call(self, handler: str, payload: Any) -> None:
        if self.broken:
            return
        try:
            getattr(self.inner, handler)(payload)
        except Exception as err:  # noqa: BLE001 (a full disk or a server gone must not end the run)
            self.broken = True
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.say(Note(f"{self.name} stopped: {text}; training goes on"))

    def on_begin(self, begin: Begin) -> None:
        self._call("on_begin", begin)

    def on_step(self, step: Step) -> None:
        self._call("on_step", step)

    def on_note(self, note: Note) -> None:
        self._call("on_note", note)

    def on_end(self, end: End) -> None:
        self._call("on_end", end)
