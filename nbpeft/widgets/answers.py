"""The answers tab: adapters and the base model answer the same prompts; Collect preferences
opens the preference lab over those answers and keeps its pairs in a notebook variable, which
the Train tab is then given as its data.

Compare is ``nbpeft.compare_answers(model, prompts, adapters=..., include_base=..., samples=...,
temperature=..., max_new_tokens=...)``; Collect preferences is the same call with ``pick=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from torch import nn

import nbpeft

from ..errors import ConfigError
from ..inference.preferences import PreferenceLab
from .fields import LABEL
from .lab import LabView
from .messages import note, say, shows_errors

# the API's keyword spellings as this tab labels them
SPELLINGS = {"adapters=": "adapters ", "samples=": "samples ", "temperature=": "temperature ",
             "include_base=True": "tick base model", "max_new_tokens=": "max new tokens "}
FIELD = {"layout": {"width": "330px"}, **LABEL}


class AnswersTab(widgets.VBox):
    """Prompts, the adapters to ask, samples and sampling; Compare shows a table, Collect preferences the lab.

    ``tab.lab`` is the lab opened last; its pairs are in the notebook variable named in ``pairs in``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, namespace: dict[str, Any] | None = None,
                 busy: Callable[[], str | None] = lambda: None,
                 on_pairs: Callable[[str], None] = lambda name: None) -> None:
        self.model, self.tokenizer, self.busy, self.on_pairs = model, tokenizer, busy, on_pairs
        self.namespace = namespace if namespace is not None else {}
        self.lab: PreferenceLab | None = None
        self.prompts = widgets.Textarea(placeholder="one prompt per line", description="prompts",
                                        layout={"width": "600px", "height": "90px"}, style=LABEL["style"])
        self.adapters = widgets.SelectMultiple(options=[], description="adapters", rows=3, **FIELD)
        self.include_base = widgets.Checkbox(value=True, description="base model", indent=False,
                                             tooltip="the base model (adapters disabled) answers too",
                                             layout={"width": "auto"})
        self.samples = widgets.BoundedIntText(value=1, min=1, max=16, description="samples",
                                              tooltip="answers of ONE adapter to each prompt (needs temperature above 0)",
                                              **FIELD)
        self.temperature = widgets.BoundedFloatText(value=0.0, min=0.0, max=5.0, step=0.1, description="temperature",
                                                    **FIELD)
        self.max_new_tokens = widgets.BoundedIntText(value=48, min=1, max=4096, description="max new tokens", **FIELD)
        self.variable = widgets.Text(value="prefs", description="pairs in", tooltip="the notebook variable for lab.pairs",
                                     **FIELD)
        self.compare_button = widgets.Button(description="Compare", icon="columns", layout={"width": "auto"})
        self.collect_button = widgets.Button(description="Collect preferences", icon="thumbs-up",
                                             button_style="info", layout={"width": "auto"},
                                             tooltip="judge the answers one prompt at a time; the choices become pairs")
        self.table, self.message = widgets.HTML(), widgets.HTML()
        self.lab_box = widgets.VBox()
        for widget, name in ((self.prompts, "prompts"), (self.adapters, "adapters"), (self.samples, "samples"),
                             (self.temperature, "temperature"), (self.max_new_tokens, "max-new-tokens"),
                             (self.variable, "variable"), (self.compare_button, "compare"),
                             (self.collect_button, "collect"), (self.table, "table"), (self.message, "message")):
            widget.add_class(f"nbpeft-answers-{name}")
        self.compare_button.on_click(self.compare)
        self.collect_button.on_click(self.collect)
        super().__init__([self.prompts, widgets.HBox([self.adapters, self.include_base]), self.samples,
                          self.temperature, self.max_new_tokens, self.variable,
                          widgets.HBox([self.compare_button, self.collect_button]), self.message, self.table,
                          self.lab_box])
        self.refresh()

    def refresh(self) -> None:
        """Offer the model's adapters as they are now (all selected at first)."""
        names = [row.name for row in nbpeft.summary(self.model).adapters]
        chosen = [n for n in self.adapters.value if n in names]
        self.adapters.options = names
        self.adapters.value = chosen if chosen or not names else names

    def options(self, pick: bool) -> dict[str, Any]:
        """The ``compare_answers`` keyword arguments the fields say."""
        reason = self.busy()
        if reason:
            raise ConfigError(reason)
        prompts = [line.strip() for line in self.prompts.value.splitlines() if line.strip()]
        if not prompts:
            raise ConfigError("type a prompt first, one per line")
        return {"prompts": prompts, "adapters": list(self.adapters.value), "tokenizer": self.tokenizer,
                "include_base": self.include_base.value, "samples": self.samples.value,
                "temperature": self.temperature.value, "max_new_tokens": self.max_new_tokens.value, "pick": pick}

    @shows_errors("message", SPELLINGS)
    def compare(self, *_: Any) -> None:
        options = self.options(pick=False)
        note(self.message, "generating…")
        answers = nbpeft.compare_answers(self.model, **options)
        self.table.value = answers._repr_html_()
        say(self.message, f"{len(answers.prompts)} prompts answered by {', '.join(answers.columns)}")

    @shows_errors("message", SPELLINGS)
    def collect(self, *_: Any) -> None:
        name = self.variable.value.strip()
        if not name.isidentifier():
            raise ConfigError(f"pairs in {name!r} must be a variable name, e.g. prefs")
        options = self.options(pick=True)
        note(self.message, "generating…")
        self.lab = nbpeft.compare_answers(self.model, **options)
        self.lab.listeners.append(lambda lab: self._publish(lab, name))
        self._publish(self.lab, name)
        self.table.value = ""
        self.lab_box.children = [LabView(self.lab)]
        say(self.message, f"pick the best answer to each prompt; the pairs go to {name} and the Train tab's data")
        self.on_pairs(name)

    def _publish(self, lab: PreferenceLab, name: str) -> None:
        """The notebook variable holds the lab's pairs as they are after every choice."""
        self.namespace[name] = lab.pairs
