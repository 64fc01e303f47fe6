"""Live training display: listens to the loop's events, never drives it.

One state object, :class:`LossCurve`, keeps what was seen (training and eval points, the
evaluation table, what to label); the wording of the banner, the progress line and the
closing line lives here once. Two renderers use them: :class:`TextDisplay` (plain lines,
outside notebooks) and :class:`NotebookDisplay` (a figure, a progress line and an
evaluation table, updated in place). The panel's Train tab is the third
(``nbpeft.widgets.training.PanelDisplay``).
"""

from __future__ import annotations

import html
import io
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .events import Begin, End, Listener, Note, Step


def notebook_shell() -> Any | None:
    """The running IPython shell, or None; IPython is looked up only if something already imported it."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def in_notebook() -> bool:
    """Whether this runs in a notebook's kernel (a terminal IPython has no kernel)."""
    shell = notebook_shell()
    return shell is not None and hasattr(shell, "kernel")


def make_display() -> Listener:
    return NotebookDisplay() if in_notebook() else TextDisplay()


# wording ----------------------------------------------------------------------------------------

def plural(count: int, word: str, many: str | None = None) -> str:
    """``plural(1, "step")`` is ``"1 step"``, ``plural(3, "step")`` is ``"3 steps"``."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def memory_label(device: str) -> str:
    return "peak GPU mem" if device.startswith("cuda") else "peak RSS"


def banner_text(begin: Begin) -> str:
    """What is about to train, on what, for how long: one line."""
    what = (f"full fine-tuning: all {plural(begin.trainable, 'parameter')} train" if begin.full
            else f"training {plural(begin.trainable, 'parameter')}")
    parts = [what]
    if begin.examples is not None:
        parts.append(plural(begin.examples, "example"))
    if begin.epochs is not None:
        parts.append(plural(round(begin.epochs, 2), "epoch") if begin.epochs != int(begin.epochs)
                     else plural(int(begin.epochs), "epoch"))
    if begin.batch_reason:  # batch_size="auto": what it chose, and how
        how = begin.batch_reason.removeprefix("batch_size='auto': ")
        parts.append(f"batch auto: {begin.batch_size} × {begin.grad_accum} accumulated = {begin.effective_batch} ({how})")
    elif begin.batch_size:
        how = f" ({begin.batch_size} × {begin.grad_accum} accumulated)" if begin.grad_accum > 1 else ""
        parts.append(f"effective batch {begin.effective_batch}{how}")
    else:  # ready-made batches: their size is the DataLoader's
        parts.append(f"{plural(begin.grad_accum, 'batch', 'batches')} per step")
    if begin.objective != "sft":
        parts.insert(1, f"objective {begin.objective}")
    steps = plural(begin.total_steps, "step")
    if begin.start_step:
        steps += f", resuming after step {begin.start_step}"
    parts.append(steps)
    device = begin.device
    if begin.device_name:
        device += f" ({begin.device_name}" + (f", {format_bytes(begin.device_memory)}" if begin.device_memory else "") + ")"
    parts.append(device)
    parts.append(begin.precision + (f" ({begin.precision_reason})" if begin.precision_reason else ""))
    if begin.batching:
        parts.append(begin.batching)
    if begin.prepare_s:
        parts.append(f"prepared in {begin.prepare_s:.1f} s")
    return " · ".join(parts)


def progress_text(step: Step, memory: str = "peak mem") -> str:
    parts = [f"step {step.step}/{step.total_steps}", f"loss {step.loss:.4f}"]
    if step.eval_loss is not None:
        parts.append(f"eval {step.eval_loss:.4f}")
    parts += [f"{name} {value:.3f}" for name, value in step.figures.items()]
    parts.append(f"lr {step.lr:.1e}")
    if step.grad_norm is not None:
        parts.append(f"grad {step.grad_norm:.2f}")
    if step.generation_s is not None:
        parts.append(f"generation {step.generation_s:.1f} s · training {step.step_time_s - step.generation_s:.1f} s")
    parts += [f"{format_eta(step.elapsed_s)} elapsed", f"ETA {format_eta(step.eta_s)}",
              f"{step.tokens_per_s:,.0f} tok/s", f"{memory} {format_bytes(step.peak_mem_bytes)}"]
    return " · ".join(parts)


def summary_text(result: Any, memory: str = "peak mem") -> str:
    """The closing line: how the run ended, its time, its average speed and its peak memory."""
    if not result.history:
        return result.message or "no step completed"
    head = result.message if result.stopped else f"done: {plural(result.steps, 'step')}"
    return (f"{head} · {result.seconds:.1f} s · {result.tokens_per_s:,.0f} tok/s on average · "
            f"{memory} {format_bytes(result.peak_mem_bytes)}")


# state ------------------------------------------------------------------------------------------

@dataclass
class EvalRow:
    step: int
    train_loss: float  # mean training loss since the previous evaluation
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


class LossCurve:
    """What a display shows: the training and eval points, the evaluation table, the labels."""

    def __init__(self) -> None:
        self.begin: Begin | None = None
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.evals: list[EvalRow] = []
        self.last: Step | None = None
        self.figures: dict[str, list[tuple[int, float]]] = {}  # a preference objective's, by name

    @property
    def total(self) -> int:
        return self.begin.total_steps if self.begin else 1

    @property
    def memory(self) -> str:
        return memory_label(self.begin.device) if self.begin else "peak mem"

    @property
    def has_eval(self) -> bool:
        return bool(self.begin and self.begin.has_eval)

    def start(self, begin: Begin) -> None:
        self.__init__()
        self.begin = begin

    def add(self, step: Step) -> None:
        self.steps.append(step.step)
        self.losses.append(step.loss)
        self.last = step
        for name, value in step.figures.items():
            self.figures.setdefault(name, []).append((step.step, value))
        if step.eval_loss is not None or step.metrics:
            since = self.evals[-1].step if self.evals else 0
            window = [loss for s, loss in zip(self.steps, self.losses) if s > since]
            self.evals.append(EvalRow(step.step, sum(window) / len(window), step.eval_loss, dict(step.metrics)))

    @property
    def eval_points(self) -> list[tuple[int, float]]:
        return [(row.step, row.eval_loss) for row in self.evals if row.eval_loss is not None]

    def labels(self) -> list[str]:
        """The legend: "eval" only when there is evaluation data."""
        return ["train", "eval"] if self.has_eval else ["train"]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The evaluation table: headers and formatted rows."""
        names = list(dict.fromkeys(name for row in self.evals for name in row.metrics))
        headers = ["step", "training loss"] + (["eval loss"] if self.has_eval else []) + names
        rows = []
        for row in self.evals:
            cells = [str(row.step), f"{row.train_loss:.4f}"]
            if self.has_eval:
                cells.append("" if row.eval_loss is None else f"{row.eval_loss:.4f}")
            cells += [f"{row.metrics[n]:.4g}" if n in row.metrics else "" for n in names]
            rows.append(cells)
        return headers, rows

    def table_html(self) -> str:
        headers, rows = self.table()
        if not rows:
            return ""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f'<table class="nbpeft-eval-table"><tr>{head}</tr>{body}</table>'

    def table_text(self) -> str:
        headers, rows = self.table()
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)

    def draw(self, axes: Any) -> None:
        """The loss curve on a matplotlib axes: the same picture in the notebook and the panel."""
        from matplotlib.ticker import MaxNLocator

        axes.clear()
        single = len(self.steps) == 1  # one point draws no line: mark it
        axes.plot(self.steps, self.losses, marker="o" if single else None, label="train")
        if self.has_eval:
            points = self.eval_points
            axes.plot([s for s, _ in points], [v for _, v in points], "o-", label="eval")
        first = self.begin.start_step if self.begin else 0
        # room past the last step, so its point (and marker) is never cut by the frame
        axes.set_xlim(first, self.total + max(0.5, 0.03 * (self.total - first)))
        axes.margins(y=0.08)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 0.5 ticks on a short run
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right")
        self._draw_figures(axes)

    def _draw_figures(self, axes: Any) -> None:
        """A preference objective's rewards on a second scale, dashed, beside the loss."""
        shown = {name: points for name, points in self.figures.items()
                 if name.startswith("rewards/") and name != "rewards/accuracies" or name == "kl"}
        twin = getattr(axes, "_nbpeft_twin", None)
        if twin is not None:
            twin.clear()
        if not shown:
            return
        if twin is None:
            twin = axes._nbpeft_twin = axes.twinx()
        for name, points in shown.items():
            twin.plot([s for s, _ in points], [v for _, v in points], "--", label=name)
        twin.set_ylabel("reward")
        twin.legend(loc="upper left", fontsize="small")

    def png(self, width: float = 6.4, height: float = 3.2, dpi: int = 90) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(width, height), dpi=dpi)
        self.draw(figure.add_subplot())
        figure.tight_layout()
        buffer = io.BytesIO()
        FigureCanvasAgg(figure).print_png(buffer)
        return buffer.getvalue()


# renderers --------------------------------------------------------------------------------------

class TextDisplay(Listener):
    """Plain lines: the banner, at most about twenty progress lines, the eval table, the summary."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.curve = LossCurve()
        self.every = 1

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_begin(self, begin: Begin) -> None:
        self.curve.start(begin)
        self.every = max(1, (begin.total_steps - begin.start_step) // 20)
        self._print("nbpeft: " + banner_text(begin))

    def on_step(self, step: Step) -> None:
        self.curve.add(step)
        if step.step % self.every == 0 or step.step == step.total_steps or step.eval_loss is not None:
            self._print(progress_text(step, self.curve.memory))

    def on_note(self, note: Note) -> None:
        self._print(f"nbpeft: {note.message}")

    def on_end(self, end: End) -> None:
        if len(self.curve.evals) > 1 or self.curve.evals and self.curve.evals[0].metrics:
            self._print(self.curve.table_text())
        self._print("nbpeft: " + summary_text(end.result, self.curve.memory))


class _FigurePNG:
    """A figure that renders as PNG by itself: a bare Figure shows only as text unless pyplot's inline backend is on."""

    def __init__(self, figure: Any) -> None:
        self.figure = figure

    def __repr__(self) -> str:
        return "<loss curve>"

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()


class NotebookDisplay(Listener):
    """The banner, one loss figure, one progress line and the evaluation table, updated in place."""

    def __init__(self, min_interval_s: float = 0.5) -> None:
        self.min_interval_s = min_interval_s
        self.curve = LossCurve()
        self.last_draw = 0.0

    def on_begin(self, begin: Begin) -> None:
        from IPython.display import HTML, display
        from matplotlib.figure import Figure

        self.curve.start(begin)
        display(HTML("<b>nbpeft</b>: " + html.escape(banner_text(begin))))
        self.figure = Figure(figsize=(6.4, 3.2), dpi=90)
        self.axes = self.figure.add_subplot()
        self.curve.draw(self.axes)
        self.figure.tight_layout()
        self.plot_handle = display(_FigurePNG(self.figure), display_id=True)
        self.text_handle = display(HTML("starting…"), display_id=True)
        self.table_handle = display(HTML(""), display_id=True)

    def on_step(self, step: Step) -> None:
        from IPython.display import HTML

        had = len(self.curve.evals)
        self.curve.add(step)
        self.text_handle.update(HTML(progress_text(step, self.curve.memory)))
        if len(self.curve.evals) != had:
            self.table_handle.update(HTML(self.curve.table_html()))
        if time.monotonic() - self.last_draw >= self.min_interval_s:
            self._draw()

    def on_note(self, note: Note) -> None:
        from IPython.display import HTML

        self.text_handle.update(HTML(html.escape(note.message) + "…"))

    def on_end(self, end: End) -> None:
        from IPython.display import HTML

        self._draw()
        last = html.escape(progress_text(self.curve.last, self.curve.memory)) + "<br>" if self.curve.last else ""
        self.text_handle.update(HTML(last + "<b>" + html.escape(summary_text(end.result, self.curve.memory)) + "</b>"))

    def _draw(self) -> None:
        self.curve.draw(self.axes)
        self.plot_handle.update(_FigurePNG(self.figure))
        self.last_draw = time.monotonic()
