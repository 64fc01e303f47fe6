"""Parameter counts of a model with adapters, as text and as an HTML table."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from torch import nn

from ..core import adapter_owners, parameter_counts, state


@dataclass
class AdapterRow:
    name: str
    method: str
    params: int
    modules: int
    active: bool
    merged: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """Total and trainable parameters, per adapter and per method."""

    model_name: str
    total: int
    trainable: int
    base: int
    adapters: list[AdapterRow] = field(default_factory=list)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    @property
    def per_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.adapters:
            out[row.method] = out.get(row.method, 0) + row.params
        return out

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for a in self.adapters:
            status = ("active" if a.active else "inactive") + (", merged" if a.merged else "")
            status += "".join(f"; {note}" for note in a.notes)
            pct = 100.0 * a.params / max(self.base, 1)
            rows.append((a.name, a.method, f"{a.modules}", f"{a.params:,}", f"{pct:.3f}%", status))
        return rows

    def __repr__(self) -> str:
        lines = [
            f"{self.model_name}: {self.total:,} parameters, {self.trainable:,} trainable ({self.trainable_pct:.3f}%)",
        ]
        if not self.adapters:
            lines.append("no adapters attached")
        for name, method, modules, params, pct, status in self._rows():
            lines.append(f"  {name:<12} {method:<8} {modules:>4} modules  {params:>12} params ({pct} of base)  {status}")
        if len(self.per_method) > 1:
            lines.append("  per method: " + ", ".join(f"{m} {n:,}" for m, n in self.per_method.items()))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("adapter", "method", "modules", "parameters", "% of base", "state"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._rows())
        caption = (
            f"{html.escape(self.model_name)}: {self.total:,} parameters, "
            f"<b>{self.trainable:,} trainable ({self.trainable_pct:.3f}%)</b>"
        )
        if not self.adapters:
            body = '<tr><td colspan="6">no adapters attached</td></tr>'
        methods = ""
        if len(self.per_method) > 1:
            methods = "<p>per method: " + ", ".join(f"{m} {n:,}" for m, n in self.per_method.items()) + "</p>"
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>{methods}"


def summary(model: nn.Module) -> Summary:
    """Total and trainable parameters of ``model``, per adapter and per method."""
    st = state(model)
    owners = adapter_owners(model)
    counts = parameter_counts(model)
    per_adapter: dict[str, int] = {}
    for p in model.parameters():
        if id(p) in owners:
            per_adapter[owners[id(p)]] = per_adapter.get(owners[id(p)], 0) + p.numel()
    rows = [
        AdapterRow(n, a.method, per_adapter.get(n, 0), len(a.targets), n in st.active, a.merged, list(a.notes))
        for n, a in st.adapters.items()
    ]
    return Summary(
        model_name=type(model).__name__,
        total=counts.total,
        trainable=counts.trainable,
        base=counts.base,
        adapters=rows,
    )
