"""The recorded runs as a table: HTML in a notebook, a DataFrame for analysis, curves overlaid.

    nbpeft.runs()                               # every run, newest last
    nbpeft.runs(method="lora", since="2025-06-01").to_pandas()
    nbpeft.plot_runs(["20250601-101500-3fa2", "20250601-103000-91bc"])
"""

from __future__ import annotations

import html
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..formats import run_store
from ..formats.card import curves_png
from .display import format_bytes

# The table's columns: (key, heading, how a value is shown); metrics follow the final eval loss.
COLUMNS = [
    ("run_id", "run", str), ("started", "started", lambda v: str(v).replace("T", " ")[:19]),
    ("model", "model", str), ("method", "method", str), ("status", "ended", str),
    ("steps", "steps", lambda v: f"{v:,}"), ("final_loss", "train loss", lambda v: f"{v:.4f}"),
    ("final_eval_loss", "eval loss", lambda v: f"{v:.4f}"),
]
TAIL = [("seconds", "time", lambda v: f"{v:.1f} s"), ("tokens_per_s", "tok/s", lambda v: f"{v:,.0f}"),
        ("peak_mem_bytes", "peak mem", format_bytes), ("adapter_path", "saved to", str)]


class Plot:
    """A PNG that shows itself in a notebook; ``.save(path)`` writes it."""

    def __init__(self, png: bytes) -> None:
        self.png = png

    def _repr_png_(self) -> bytes:
        return self.png

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.png)
        return Path(path)


class RunTable:
    """Runs, one row each: ``_repr_html_`` in a notebook, ``.to_pandas()``, ``.plot()`` of their curves.

    ``rows`` are dicts, each with its ``run_id`` (None for a run not recorded); ``head`` and
    ``tail`` are the (key, heading, format) columns before and after the metrics; ``label``
    the key that names a row's curve. ``curves`` maps a label to its points where they are
    at hand; the rest are read from the store at ``store``.
    """

    def __init__(self, rows: list[dict[str, Any]], store: Path | None = None, *, head: list[tuple] = COLUMNS,
                 tail: list[tuple] = TAIL, curves: dict[str, list[dict[str, Any]]] | None = None,
                 label: str = "run_id") -> None:
        self.rows, self.store, self.head, self.tail, self.label = rows, store, list(head), list(tail), label
        self.curves = dict(curves or {})

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [row["run_id"] for row in self.rows if row.get("run_id")]

    def _metric_names(self) -> list[str]:
        return list(dict.fromkeys(k for row in self.rows for k in (row.get("final_metrics") or {})))

    def _columns(self) -> list[tuple]:
        metrics = [(f"metric:{m}", m, lambda v: f"{v:.4g}") for m in self._metric_names()]
        return self.head + metrics + self.tail

    def _value(self, row: dict[str, Any], key: str) -> Any:
        return (row.get("final_metrics") or {}).get(key[7:]) if key.startswith("metric:") else row.get(key)

    def to_pandas(self) -> Any:
        """One row per run: its id, what trained and its final figures (plus its settings and message)."""
        import pandas as pd

        keys = [key for key, _, _ in self._columns()]
        more = [k for k in ("lr", "message") if k not in keys]
        records = [{key.removeprefix("metric:"): self._value(row, key) for key in keys}
                   | {"lr": row.get("lr", (row.get("options") or {}).get("lr")), "message": row.get("message")}
                   for row in self.rows]
        return pd.DataFrame(records, columns=[k.removeprefix("metric:") for k in keys] + more)

    def _cells(self, row: dict[str, Any]) -> list[str]:
        out = []
        for key, _, shown in self._columns():
            value = self._value(row, key)
            out.append("" if value is None or value == "" else shown(value))
        return out

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>no runs recorded yet" + (f" in {html.escape(str(self.store))}" if self.store else "") + "</p>"
        head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in self._columns())
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in self._cells(row)) + "</tr>"
                       for row in self.rows)
        return f'<table class="nbpeft-runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        if not self.rows:
            return "no runs recorded yet"
        titles = [title for _, title, _ in self._columns()]
        lines = [self._cells(row) for row in self.rows]
        widths = [max(len(t), *(len(line[i]) for line in lines)) for i, t in enumerate(titles)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [titles, *lines])

    def points(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        label = str(row.get(self.label))
        if label not in self.curves and self.store is not None and row.get("run_id"):
            self.curves[label] = run_store.read_points(self.store, row["run_id"])
        return self.curves.get(label, [])

    def plot(self) -> Plot:
        """Every row's train and eval loss, overlaid, as a PNG."""
        return Plot(curves_png({str(row.get(self.label)): self.points(row) for row in self.rows}))


def _day(value: Any, name: str) -> str:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    try:
        return datetime.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise ConfigError(f"runs(): {name}={value!r} is not a date; give e.g. {name}='2025-06-01'") from None


def _store(store: Any, fn: str) -> Path:
    path = run_store.location(True if store is None else store)
    if path is None:
        raise ConfigError(f"{fn}: the run store is off (NBPEFT_RUNS=off); pass store='path/to/runs.sqlite'")
    return path


def _read(path: Path, fn: str, ids: list[str] | None = None) -> list[dict[str, Any]]:
    try:
        rows = run_store.read_runs(path, ids)
    except run_store.StoreError as err:
        raise ConfigError(f"{fn}: {err}") from None
    return [{"run_id": row.pop("id"), **row} for row in rows]


def runs(model: str | None = None, method: str | None = None, since: Any = None, until: Any = None,
         status: str | None = None, store: str | Path | None = None) -> RunTable:
    """The recorded runs, oldest first; each filter narrows them.

    ``model``: part of the model's name (any case); ``method``: a method name (``"lora"``);
    ``since``/``until``: dates or ISO strings (``until`` is inclusive of its day); ``status``:
    ``finished``, ``stopped``, ``interrupted``, ``failed`` or ``running``. ``store``: another
    store file than the one ``train()`` writes to.
    """
    path = _store(store, "runs()")
    rows = _read(path, "runs()")
    if model is not None:
        rows = [r for r in rows if str(model).lower() in (r.get("model") or "").lower()]
    if method is not None:
        rows = [r for r in rows if method in (r.get("method") or "").split("+")]
    if since is not None:
        start = _day(since, "since")
        rows = [r for r in rows if (r.get("started") or "") >= start]
    if until is not None:
        end = _day(until, "until")
        end = end[:10] + "\uffff" if len(str(until)) <= 10 else end  # a bare date includes all of that day
        rows = [r for r in rows if (r.get("started") or "") <= end]
    if status is not None:
        rows = [r for r in rows if r.get("status") == status]
    return RunTable(rows, path)


def plot_runs(ids: str | list[str], store: str | Path | None = None) -> Plot:
    """The train and eval loss curves of the runs ``ids``, overlaid (a PNG in the notebook)."""
    ids = [ids] if isinstance(ids, str) else list(ids)
    path = _store(store, "plot_runs()")
    rows = {row["run_id"]: row for row in _read(path, "plot_runs()", ids)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ConfigError(f"plot_runs(): no run {missing[0]!r} in {path}; nbpeft.runs() lists the recorded runs")
    return RunTable([rows[i] for i in ids], path).plot()
