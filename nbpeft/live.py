"""Live training display: listens to the loop's events, never drives it.

In a Jupyter kernel it shows one loss figure and one progress line, both updated in
place; elsewhere it prints plain text lines.
"""

from __future__ import annotations

import html
import io
import sys
import time
from typing import Any


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and hasattr(ip, "kernel")


def make_display() -> Any:
    return NotebookDisplay() if _in_notebook() else TextDisplay()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def progress_text(row: dict[str, Any], total: int, memory_label: str) -> str:
    step = row["step"]
    eta = row["elapsed_s"] / step * (total - step)
    parts = [f"step {step}/{total}", f"loss {row['loss']:.4f}"]
    if row.get("eval_loss") is not None:
        parts.append(f"eval {row['eval_loss']:.4f}")
    parts += [f"ETA {format_eta(eta)}", f"{row['tokens_per_s']:,.0f} tok/s", f"{memory_label} {format_bytes(row['peak_mem_bytes'])}"]
    return " · ".join(parts)


class TextDisplay:
    """Plain lines: at most about twenty progress lines per run."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.memory_label = "peak mem"

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if event == "begin":
            self.memory_label = "peak GPU mem" if payload["device"].startswith("cuda") else "peak RSS"
            self.every = max(1, payload["total_steps"] // 20)
            print(f"nbpeft: training {payload['trainable']:,} parameters for {payload['total_steps']} steps "
                  f"on {payload['device']} ({payload['precision']})", file=self.stream)
        elif event == "step":
            row, total = payload["row"], payload["total_steps"]
            if row["step"] % self.every == 0 or row["step"] == total or row.get("eval_loss") is not None:
                print(progress_text(row, total, self.memory_label), file=self.stream, flush=True)
        elif event == "note":
            print(f"nbpeft: {payload['message']}", file=self.stream, flush=True)
        elif event == "end":
            result = payload["result"]
            print(f"nbpeft: {result.message or 'done'}" if result.stopped else f"nbpeft: done, {result!r}",
                  file=self.stream, flush=True)


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


class NotebookDisplay:
    """One figure (training and eval loss against step) and one progress line, updated in place."""

    def __init__(self, min_interval_s: float = 0.5) -> None:
        self.min_interval_s = min_interval_s
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.eval_points: list[tuple[int, float]] = []
        self.last_draw = 0.0

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(payload)

    def _on_begin(self, payload: dict[str, Any]) -> None:
        from IPython.display import HTML, display
        from matplotlib.figure import Figure

        self.total = payload["total_steps"]
        self.memory_label = "peak GPU mem" if payload["device"].startswith("cuda") else "peak RSS"
        display(HTML(f"<b>nbpeft</b>: training {payload['trainable']:,} parameters for {self.total} steps on "
                     f"<b>{payload['device']}</b> ({payload['precision']})"))
        self.figure = Figure(figsize=(6.4, 3.2), dpi=90)
        self.axes = self.figure.add_subplot()
        self.axes.set_xlabel("step")
        self.axes.set_ylabel("loss")
        self.axes.set_xlim(0, self.total)
        (self.train_line,) = self.axes.plot([], [], label="train")
        (self.eval_line,) = self.axes.plot([], [], "o-", label="eval")
        self.axes.legend(loc="upper right")
        self.axes.grid(alpha=0.3)
        self.figure.tight_layout()
        self.plot_handle = display(_FigurePNG(self.figure), display_id=True)
        self.text_handle = display(HTML("starting…"), display_id=True)

    def _on_step(self, payload: dict[str, Any]) -> None:
        from IPython.display import HTML

        row = payload["row"]
        self.steps.append(row["step"])
        self.losses.append(row["loss"])
        if row.get("eval_loss") is not None:
            self.eval_points.append((row["step"], row["eval_loss"]))
        self.text_handle.update(HTML(progress_text(row, self.total, self.memory_label)))
        if time.monotonic() - self.last_draw >= self.min_interval_s:
            self._draw()

    def _on_note(self, payload: dict[str, Any]) -> None:
        from IPython.display import HTML

        self.text_handle.update(HTML(html.escape(payload["message"]) + "…"))

    def _on_end(self, payload: dict[str, Any]) -> None:
        from IPython.display import HTML

        result = payload["result"]
        self._draw()
        if result.history:
            tail = progress_text(result.history[-1], self.total, self.memory_label)
        else:
            tail = "no step completed"
        note = f"<br><b>{result.message}</b>" if result.stopped else f" · done in {result.seconds:.1f} s"
        self.text_handle.update(HTML(tail + note))

    def _draw(self) -> None:
        self.train_line.set_data(self.steps, self.losses)
        if self.eval_points:
            self.eval_line.set_data(*zip(*self.eval_points))
        self.axes.relim()
        self.axes.autoscale_view(scalex=False)
        self.plot_handle.update(_FigurePNG(self.figure))
        self.last_draw = time.monotonic()
