"""``nbpeft.methods()`` as a table for ``%peft_methods``: text for consoles, HTML for notebooks."""

from __future__ import annotations

import html
from typing import Any

# JupyterLab right-aligns table cells; prose reads from the left
LEFT = ' style="text-align:left"'


class MethodTable:
    """One row per method, or one per option with ``detail``."""

    def __init__(self, infos: list[Any], detail: bool = False) -> None:
        self.infos, self.detail = infos, detail

    def rows(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """(column heads, rows of cell text)."""
        if self.detail:
            head = ("method", "option", "default", "type", "help")
            return head, [
                (info.name, key, repr(opt["default"]), opt["type"],
                 opt["help"] + (f" (one of {', '.join(map(repr, opt['choices']))})" if "choices" in opt else ""))
                for info in self.infos for key, opt in info.options.items()
            ]
        head = ("method", "description", "options (default)")
        return head, [
            (info.name, info.description, ", ".join(f"{k}={v['default']!r}" for k, v in info.options.items()))
            for info in self.infos
        ]

    def __repr__(self) -> str:
        _, rows = self.rows()
        if self.detail:
            return "\n".join(f"{r[0]} {r[1]}={r[2]} ({r[3]}): {r[4]}" for r in rows)
        width = max([len(r[0]) for r in rows] + [6])
        return "\n".join(f"{r[0]:<{width}}  {r[1]}\n{'':<{width}}  options: {r[2]}" for r in rows)

    def _repr_html_(self) -> str:
        head, rows = self.rows()
        cells = "".join(f"<th{LEFT}>{h}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td{LEFT}>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{cells}</tr>{body}</table>"
