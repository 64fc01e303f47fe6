"""The preference lab: judge answers prompt by prompt; the choices become preference pairs.

Each prompt has two or more candidate answers (adapters and the base model answering it, or
several samples of one adapter). Picking one of ``n`` answers records ``n - 1`` pairs
``{"prompt", "chosen", "rejected"}``: the picked answer over each of the others (an answer word
for word the same as the picked one gives no pair: it says nothing about which is better).
"Neither" records no pair; the unpaired (KTO) view keeps it, every answer of that prompt
labelled undesirable. :attr:`PreferenceLab.pairs` is what ``nbpeft.train(objective="dpo")``
takes as data.

The lab is plain Python (``choose``, ``undo``, ``pairs``, ``to_dataset``, ``save_jsonl``); in a
notebook it shows itself as the answers side by side with a button for each
(:mod:`nbpeft.widgets.lab`, which only calls these methods).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Choice:
    """The answer picked for ``prompts[prompt]``: an index into its answers, or None for "neither"."""

    prompt: int
    picked: int | None


class PreferenceLab:
    """Prompts, their candidate answers (``answers[i]``, named ``sources[i]``) and the choices made so far."""

    def __init__(self, prompts: Sequence[str | Messages], answers: Sequence[Sequence[str]],
                 sources: Sequence[Sequence[str]] | None = None) -> None:
        if len(prompts) != len(answers) or not prompts:
            raise ConfigError("PreferenceLab(): give one list of answers per prompt, and at least one prompt")
        if any(len(a) < 2 for a in answers):
            raise ConfigError("PreferenceLab(): every prompt needs two answers or more to choose between; "
                              "compare two adapters, or the base model and an adapter, or draw samples=2 or more")
        self.prompts = list(prompts)
        self.answers = [list(a) for a in answers]
        self.sources = [list(s) for s in sources] if sources is not None else [
            [f"answer {chr(65 + j)}" for j in range(len(a))] for a in answers]
        self.choices: list[Choice] = []
        self.listeners: list[Callable[[PreferenceLab], None]] = []

    # judging ----------------------------------------------------------------------------------

    @property
    def current(self) -> int | None:
        """The index of the prompt being judged (the first one not judged yet); None once all are."""
        done = {c.prompt for c in self.choices}
        return next((i for i in range(len(self.prompts)) if i not in done), None)

    @property
    def done(self) -> bool:
        return self.current is None

    @property
    def progress(self) -> str:
        return f"{len(self.choices)} of {len(self.prompts)} judged"

    def choose(self, answer: int | None) -> Choice:
        """Pick answer number ``answer`` (0-based) of the current prompt, or None for "neither"; then the next prompt."""
        index = self.current
        if index is None:
            raise ConfigError(f"choose(): all {len(self.prompts)} prompts are judged; undo() to change the last choice")
        count = len(self.answers[index])
        if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < count):
            raise ConfigError(f"choose(): answer={answer!r} must be 0 to {count - 1} (one of this prompt's "
                              f"{count} answers), or None for neither")
        choice = Choice(index, answer)
        self.choices.append(choice)
        self._changed()
        return choice

    def undo(self) -> Choice:
        """Take back the last choice: its prompt is the current one again."""
        if not self.choices:
            raise ConfigError("undo(): nothing to undo; no answer is chosen yet")
        choice = self.choices.pop()
        self._changed()
        return choice

    def _changed(self) -> None:
        for listener in self.listeners:
            listener(self)

    # the rows ---------------------------------------------------------------------------------

    @property
    def pairs(self) -> list[dict[str, Any]]:
        """``{"prompt", "chosen", "rejected"}`` for each choice: the picked answer over each other one.

        A conversation prompt gives conversational rows as TRL writes them: the prompt's messages,
        and each answer as one assistant message.
        """
        rows = []
        for choice in self.choices:
            if choice.picked is None:
                continue
            answers = self.answers[choice.prompt]
            chosen = answers[choice.picked]
            for j, rejected in enumerate(answers):
                if j != choice.picked and rejected != chosen:
                    rows.append({"prompt": self._prompt(choice.prompt), "chosen": self._answer(chosen),
                                 "rejected": self._answer(rejected)})
        return rows

    @property
    def unpaired(self) -> list[dict[str, Any]]:
        """The KTO view: ``{"prompt", "completion", "label"}`` for every answer of every judged prompt.

        The picked answer is labelled True and the others False; after "neither", all are False.
        """
        rows = []
        for choice in self.choices:
            answers = self.answers[choice.prompt]
            picked = answers[choice.picked] if choice.picked is not None else None
            for j, answer in enumerate(answers):
                if j == choice.picked or answer != picked:  # a copy of the picked answer is neither good nor bad
                    rows.append({"prompt": self._prompt(choice.prompt), "completion": self._answer(answer),
                                 "label": j == choice.picked})
        return rows

    def rows(self, unpaired: bool = False) -> list[dict[str, Any]]:
        """:attr:`pairs`, or with ``unpaired=True`` the KTO view (:attr:`unpaired`)."""
        return self.unpaired if unpaired else self.pairs

    def to_dataset(self, unpaired: bool = False) -> Any:
        """The rows as a 🤗 ``datasets.Dataset`` (needs the ``datasets`` package)."""
        try:
            import datasets
        except ImportError:
            raise ConfigError("to_dataset(): needs the datasets package: pip install datasets; "
                              "lab.pairs is the same rows as a list") from None
        rows = self.rows(unpaired)
        if not rows:
            raise ConfigError("to_dataset(): no rows yet; pick an answer for at least one prompt first")
        return datasets.Dataset.from_list(rows)

    def save_jsonl(self, path: str | Path, unpaired: bool = False, overwrite: bool = False) -> Path:
        """Write the rows to ``path``, one JSON object a line (``train()`` reads such a file as data)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"save_jsonl(): {path} exists; pass overwrite=True to replace it, or another path")
        with path.open("w", encoding="utf-8") as f:
            for row in self.rows(unpaired):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def _prompt(self, index: int) -> str | Messages:
        return self.prompts[index]

    def _answer(self, text: str) -> str | Messages:
        return [{"role": "assistant", "content": text}] if self._conversational else text

    @property
    def _conversational(self) -> bool:
        return any(not isinstance(p, str) for p in self.prompts)

    # showing ----------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"PreferenceLab({self.progress}, {len(self.pairs)} pairs)"

    def _ipython_display_(self) -> None:  # pragma: no cover - exercised through IPython
        from IPython.display import display

        from ..widgets.lab import LabView

        display(LabView(self))
