"""The preference lab's page: the current prompt, its answers side by side, a button under each.

Every button calls one method of :class:`~nbpeft.inference.preferences.PreferenceLab`
(``choose(i)``, ``choose(None)`` for Neither, ``undo()``); the page is then drawn again from
the lab, so what it shows is always the lab's state.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ..inference.preferences import PreferenceLab
from .messages import note, say, shows_errors

CARD = "border:1px solid #ccc;border-radius:4px;padding:6px;white-space:pre-wrap;min-height:3em"


class LabView(widgets.VBox):
    """``lab.pairs`` grows with every click; ``view.answer_buttons[i].click()`` picks answer ``i`` from code."""

    def __init__(self, lab: PreferenceLab) -> None:
        self.lab = lab
        self.progress = widgets.HTML()
        self.prompt = widgets.HTML()
        self.cards = widgets.HBox(layout={"flex_flow": "row wrap"})
        self.answer_buttons: list[widgets.Button] = []
        self.neither_button = widgets.Button(description="Neither", icon="times", layout={"width": "auto"},
                                             tooltip="none of these is good: no pair (kept as undesirable in lab.unpaired)")
        self.undo_button = widgets.Button(description="Undo", icon="undo", layout={"width": "auto"},
                                          tooltip="take back the last choice")
        self.message = widgets.HTML()
        for widget, name in ((self.progress, "progress"), (self.prompt, "prompt"), (self.neither_button, "neither"),
                             (self.undo_button, "undo"), (self.message, "message")):
            widget.add_class(f"nbpeft-lab-{name}")
        self.neither_button.on_click(lambda _: self.choose(None))
        self.undo_button.on_click(self.undo)
        super().__init__([self.progress, self.prompt, self.cards,
                          widgets.HBox([self.neither_button, self.undo_button]), self.message])
        self.add_class("nbpeft-lab")
        self.draw()

    @shows_errors("message")
    def choose(self, answer: int | None) -> None:
        self.lab.choose(answer)
        self.draw()
        say(self.message, f"{len(self.lab.pairs)} pairs so far (lab.pairs)")

    @shows_errors("message")
    def undo(self, *_: Any) -> None:
        self.lab.undo()
        self.draw()
        note(self.message, "took back the last choice")

    def draw(self) -> None:
        """The page for the lab's current prompt, or the summary once every prompt is judged."""
        self.progress.value = f"<b>{html.escape(self.lab.progress)}</b>"
        self.undo_button.disabled = not self.lab.choices
        index = self.lab.current
        self.neither_button.disabled = index is None
        if index is None:
            self.prompt.value = (f"all judged: {len(self.lab.pairs)} preference pairs in <code>lab.pairs</code> "
                                 "(<code>lab.unpaired</code> for KTO)")
            self.answer_buttons, self.cards.children = [], ()
            return
        prompt = self.lab.prompts[index]
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        self.prompt.value = f"<b>prompt:</b> {html.escape(text)}"
        self.answer_buttons, cards = [], []
        for j, answer in enumerate(self.lab.answers[index]):
            button = widgets.Button(description=f"Pick {chr(65 + j)}", icon="check", button_style="success",
                                    tooltip="this answer is the best one", layout={"width": "auto"})
            button.add_class("nbpeft-lab-pick")
            button.on_click(lambda _, j=j: self.choose(j))
            self.answer_buttons.append(button)
            cards.append(widgets.VBox([widgets.HTML(f"<b>{chr(65 + j)}</b>"),
                                       widgets.HTML(f'<div style="{CARD}">{html.escape(answer)}</div>'), button],
                                      layout={"width": f"{max(24, 96 // len(self.lab.answers[index]))}%",
                                              "margin": "0 8px 8px 0"}))
        self.cards.children = cards
