"""Run a notebook headless with its progress in the terminal, and write it as HTML.

    python scripts/run_notebook.py notebooks/01_quickstart.ipynb artifacts

Each code cell's first line is printed as the cell starts, and what the cell prints or shows
(the training banner and its progress line among it) follows as it comes, as plain text. The
executed notebook is written to ``<output dir>/<name>.html``, also when a cell fails (the exit
status is then 1). There is no cell timeout: a slow machine makes the run slower, never failed.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter


def as_text(msg_type: str, content: dict[str, Any]) -> str:
    """What a kernel message shows, as terminal text ('' for nothing to show)."""
    if msg_type == "stream":
        return content.get("text", "").rstrip("\n")
    if msg_type == "error":
        return f"{content.get('ename')}: {content.get('evalue')}"
    if msg_type not in ("display_data", "update_display_data", "execute_result"):
        return ""
    data = content.get("data", {})
    plain = data.get("text/plain", "").strip()
    if plain and not (plain.startswith("<") and plain.endswith(">")):  # a real repr, not "<... object>"
        return plain
    if "text/html" in data:  # HTML only (the training banner and progress line): its text
        return html.unescape(re.sub(r"<[^>]+>", "", data["text/html"])).strip()
    return ""  # an image or a widget: nothing to say in a terminal


class ProgressClient(NotebookClient):
    """A NotebookClient that echoes each cell's start and outputs to the terminal as they arrive."""

    def __init__(self, notebook: Any, stream: Any = sys.stdout, **kwargs: Any) -> None:
        super().__init__(notebook, on_cell_execute=self._started, **kwargs)
        self.stream = stream
        self.last_shown = ""
        self.code_cells = sum(cell.cell_type == "code" for cell in notebook.cells)

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _started(self, cell: Any, cell_index: int) -> None:
        number = sum(c.cell_type == "code" for c in self.nb.cells[: cell_index + 1])
        first = next((line for line in cell.source.splitlines() if line.strip()), "")
        self._say(f"[cell {number}/{self.code_cells}] {first}")

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        text = as_text(msg["msg_type"], msg["content"])
        if text and text != self.last_shown:  # a display updated with the same text shows once
            self._say("    " + text.replace("\n", "\n    "))
            self.last_shown = text
        return super().process_message(msg, cell, cell_index)


def run(notebook_path: Path, output_dir: Path) -> int:
    notebook = nbformat.read(notebook_path, as_version=4)
    client = ProgressClient(notebook, timeout=None, kernel_name=notebook.metadata.get("kernelspec", {}).get("name", "python3"),
                            resources={"metadata": {"path": str(notebook_path.parent)}})
    status = 0
    try:
        client.execute()
    except CellExecutionError as err:
        print(f"{notebook_path.name}: a cell failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        status = 1
    output_dir.mkdir(parents=True, exist_ok=True)
    body, _ = HTMLExporter().from_notebook_node(notebook)
    target = output_dir / (notebook_path.stem + ".html")
    target.write_text(body, encoding="utf-8")
    print(f"executed {notebook_path.name}: {target.resolve()}", flush=True)
    return status


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/run_notebook.py NOTEBOOK OUTPUT_DIR")
    sys.exit(run(Path(sys.argv[1]), Path(sys.argv[2])))
