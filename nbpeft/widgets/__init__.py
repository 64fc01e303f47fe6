"""ipywidgets panels: a thin front-end that reads widget values and calls the Python API.

    p = nbpeft.panel(model, tokenizer)
    p                       # tabs: Attach, Train, Adapters, Runs, Answers

Everything a panel does is also drivable from code (``p.attach_tab.attach_button.click()``),
so a notebook that uses it runs headless too.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
from torch import nn

from ..errors import ConfigError
from ..training.display import notebook_shell
from .adapters import AdaptersTab
from .answers import AnswersTab
from .attach import AttachTab
from .preview import Preview, preview
from .runs import RunsTab
from .training import TrainTab

__all__ = ["AdaptersTab", "AnswersTab", "AttachTab", "Panel", "Preview", "RunsTab", "TrainTab", "panel", "preview"]


def _notebook_namespace() -> dict[str, Any]:
    shell = notebook_shell()
    return shell.user_ns if shell is not None else {}


class Panel(widgets.Tab):
    """Five tabs over one model: attach an adapter, train it, manage the adapters, compare the recorded runs,
    compare answers (and collect preferences between them)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, namespace: dict[str, Any] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"panel(): expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.namespace = namespace if namespace is not None else _notebook_namespace()
        self.adapters_tab = AdaptersTab(model, on_change=self.refresh, busy=self._busy, tokenizer=tokenizer)
        self.attach_tab = AttachTab(model, on_change=self.refresh, busy=self._busy, before=self.adapters_tab.enable)
        self.train_tab = TrainTab(model, tokenizer, self.namespace, on_start=self.adapters_tab.enable)
        self.runs_tab = RunsTab()
        self.answers_tab = AnswersTab(model, tokenizer, self.namespace, busy=self._busy, on_pairs=self._train_on)
        super().__init__(children=[self.attach_tab, self.train_tab, self.adapters_tab, self.runs_tab, self.answers_tab],
                         titles=("Attach", "Train", "Adapters", "Runs", "Answers"))
        self.observe(self._selected, "selected_index")
        self.add_class("nbpeft-panel")

    def _selected(self, change: dict[str, Any]) -> None:
        """A tab that shows the kernel's state reads it again when it is opened."""
        tab = self.children[change["new"]] if change["new"] is not None else None
        if tab is self.runs_tab or tab is self.answers_tab:
            tab.refresh()

    def _busy(self) -> str | None:
        return "training is running; press Stop in the Train tab first" if self.train_tab.running else None

    @property
    def result(self) -> Any:
        """The last training run's result (also in the notebook variable ``_peft_result``)."""
        return self.train_tab.result

    def refresh(self) -> None:
        """Re-read the model after a change: adapter table, attach preview, the adapters that answer."""
        self.adapters_tab.refresh()
        self.attach_tab.refresh()
        self.answers_tab.refresh()

    def _train_on(self, name: str) -> None:
        """The Train tab's data becomes the notebook variable ``name`` (the preference pairs being collected)."""
        self.train_tab.refresh_data()
        self.train_tab.fields["data"].widget.value = name
        objective = self.train_tab.fields.get("objective")
        if objective is not None and "dpo" in getattr(objective.widget, "options", ()):
            objective.widget.value = "dpo"


def panel(model: nn.Module, tokenizer: Any = None, *, namespace: dict[str, Any] | None = None) -> Panel:
    """Attach, train and manage adapters on ``model`` from a tabbed ipywidgets panel.

    ``namespace`` holds the variables the Train tab offers as data (default: the notebook's).
    """
    return Panel(model, tokenizer, namespace)
