"""What every preference objective shares: answers' log-probabilities, the reference, the loss the loop calls.

An objective (:class:`Objective`) turns per-row log-probabilities of the batch's answers into a loss
and its figures. :class:`ObjectiveLoss` is what the loop calls as its loss: it computes the
policy's log-probabilities answer slot by answer slot (chosen, then rejected), each under
``torch.utils.checkpoint``, so only one slot's activations are ever alive (recomputed in
backward): a preference step's peak memory is close to an SFT step's on the same rows (see
``benchmarks/preference_memory.py``). The reference's log-probabilities come from
:class:`Reference`, without a copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ... import core
from ...errors import ConfigError
from ...methods.base import get_method
from .. import lm_loss

PAIR_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class Logps:
    """Per row and answer slot: the sum of the answer tokens' log-probabilities and their count, (rows, slots)."""

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        """Length-averaged: the sums over the counts."""
        return self.sums / self.counts.clamp(min=1)


class Objective:
    """One preference objective: the rows it reads, whether it needs a reference, its loss and figures.

    ``data`` is the row form (:data:`nbpeft.data.preferences.FORMS`); ``trained_slots`` the answer
    slots whose log-probabilities carry gradients (KTO's KL pair does not); ``defaults`` the values
    its options take when a call leaves them at None.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    data: ClassVar[str] = "pairs"
    uses_reference: ClassVar[bool] = True
    trained_slots: ClassVar[tuple[int, ...]] = (0, 1)
    figures: ClassVar[tuple[str, ...]] = PAIR_FIGURES
    defaults: ClassVar[dict[str, Any]] = {"beta": 0.1}

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.beta = self.option("beta")

    def option(self, name: str) -> Any:
        """The call's value of option ``name``, or this objective's default where the call left it None."""
        value = getattr(self.settings, name, None)
        return self.defaults.get(name) if value is None else value

    def loss(self, policy: Logps, reference: Logps | None, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss (a mean over its rows) and its figures, from the answers' log-probabilities."""
        raise NotImplementedError

    def make_loss(self, reference: Reference | None, use_cache: dict[str, bool], sources: dict[str, Any]
                  ) -> ObjectiveLoss:
        """What the loop calls as its loss; ``sources`` holds the train and eval batches by split."""
        return ObjectiveLoss(self, reference, use_cache, sources)


def pair_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's figures of a pair objective from its per-row rewards of the chosen and the rejected answers."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}


def _slot(batch: dict[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
    """One answer slot of a preference batch as an ordinary batch, its padding columns dropped."""
    mask = batch["attention_mask"][:, slot]
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else mask.shape[1]
    return {k: batch[k][:, slot, :used] for k in ("input_ids", "attention_mask", "labels")}


def slot_logps(model: nn.Module, batch: dict[str, torch.Tensor], slot: int, use_cache: dict[str, bool],
               recompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot's answer log-probabilities; ``recompute``: under a checkpoint, its activations kept for nothing."""
    part = _slot(batch, slot)
    if not recompute:
        return lm_loss.labelled_logps(model, part, use_cache)

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_loss.labelled_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                              "labels": labels}, use_cache)

    return checkpoint(run, part["input_ids"], part["attention_mask"], part["labels"], use_reentrant=False)


def answer_logps(model: nn.Module, batch: dict[str, torch.Tensor], use_cache: dict[str, bool],
                 trained: tuple[int, ...] = (0, 1)) -> Logps:
    """Both slots' log-probabilities; slots in ``trained`` carry gradients (when gradients are on)."""
    sums, counts = [], []
    for slot in range(batch["input_ids"].shape[1]):
        grad = torch.is_grad_enabled() and slot in trained
        with contextlib.nullcontext() if grad else torch.no_grad():
            s, c = slot_logps(model, batch, slot, use_cache, recompute=grad)
        sums.append(s)
        counts.append(c)
    return Logps(torch.stack(sums, dim=1), torch.stack(counts, dim=1))


class Reference:
    """The model as it was when the run started, without a copy of it.

    Where the active adapters add nothing yet (each method's ``disabled_is_start``, and no adapter
    trained or loaded), that is the model with its adapters disabled. Otherwise a copy of the
    trainable parameters as they start (adapter-sized) is swapped in for the reference pass.
    ``precompute`` fills a table of reference log-probabilities by row once, before training.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], full: bool) -> None:
        self.model = model
        self.disabled = not full and _adapters_add_nothing(model)
        self.start = [] if self.disabled else [p.detach().clone() for p in params]
        self.params = [] if self.disabled else params
        self.table: dict[tuple[str, int], torch.Tensor] = {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run compares with the same reference."""
        return {"disabled": self.disabled, "start": [t.detach().cpu() for t in self.start]}

    def restore(self, state: dict[str, Any]) -> None:
        """The reference of the run a checkpoint continues (its adapters may have trained since it started)."""
        self.disabled = state["disabled"]
        self.start = [t.to(p.device, p.dtype) for t, p in zip(state["start"], self.params)]
        if len(self.start) != (0 if self.disabled else len(self.params)):
            raise ConfigError("train(): the checkpoint's reference weights do not fit this model's trainable "
                              "parameters; attach the same adapter as when it was saved")
        if self.disabled:
            self.params = []

    @property
    def how(self) -> str:
        return ("the adapter disabled" if self.disabled
                else f"the starting weights swapped in ({sum(t.numel() for t in self.start):,} kept)")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the model is the reference: adapters disabled or starting weights swapped in."""
        if self.disabled:
            with core.disable_adapters(self.model):
                yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.data, self.start[i] = self.start[i], param.data
        # autocast keeps one cast copy per trainable tensor for its whole region: it would keep the swapped-out values
        torch.clear_autocast_cache()

    def logps(self, batch: dict[str, torch.Tensor], use_cache: dict[str, bool], split: str = "train") -> Logps:
        """The reference's log-probabilities of the batch's answers (from the table where precomputed)."""
        index = batch["index"].tolist()
        if self.table and all((split, i) in self.table for i in index):
            rows = torch.stack([self.table[(split, i)] for i in index]).to(batch["input_ids"].device)
            return Logps(rows[..., 0], rows[..., 1])
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with torch.no_grad(), self.active():
                logps = answer_logps(self.model, batch, use_cache, trained=())
        finally:
            self.model.train(was_training)
        return logps

    def precompute(self, batches: Any, dev: torch.device, autocast: Any, use_cache: dict[str, bool],
                   split: str = "train") -> int:
        """Fill the table for every row of ``batches``; returns the rows computed."""
        rows = 0
        for batch in batches.once():
            batch = {k: v.to(dev) for k, v in batch.items()}
            with autocast:
                logps = self.logps(batch, use_cache, split)
            both = torch.stack([logps.sums.float(), logps.counts.float()], dim=-1).cpu()
            for i, row in zip(batch["index"].tolist(), both):
                self.table[(split, i)] = row
            rows += len(both)
        return rows


def _adapters_add_nothing(model: nn.Module) -> bool:
    st = core.state(model)
    active = [st.adapters[name] for name in st.active if name in st.adapters]
    return bool(active) and all(not a.trained and not a.merged and get_method(a.method).disabled_is_start(a.config)
                                for a in active)


class ObjectiveLoss:
    """The loop's loss for a preference objective: ``loss_fn(model, batch)``, its figures left in ``figures``."""

    def __init__(self, objective: Objective, reference: Reference | None, use_cache: dict[str, bool],
                 sources: dict[str, Any] | None = None) -> None:
        self.objective, self.reference, self.use_cache = objective, reference, use_cache
        self.sources = sources or {}
        self.figures: dict[str, float] = {}
        self.split = "train"
        self.generation_s = 0.0  # time spent sampling answers (GRPO), added up until the loop resets it
        self.tokens: int | None = None  # the last call's tokens where the batch does not show them (GRPO's samples)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy = answer_logps(model, batch, self.use_cache, self.objective.trained_slots)
        reference = self.reference.logps(batch, self.use_cache, self.split) if self.reference is not None else None
        loss, figures = self.objective.loss(policy, reference, batch)
        self.figures = {name: float(value.detach()) for name, value in figures.items()}
        return loss


def check_model(model: nn.Module, objective: Objective, full: bool) -> None:
    """Refuse what an objective cannot train, in one line."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_output_embeddings") or \
            model.get_output_embeddings() is None:
        raise ConfigError(f"train(): objective={objective.name!r} trains causal language models (it scores answers "
                          f"token by token); {type(model).__name__} is not one")
    if full and objective.uses_reference:
        raise ConfigError(f"train(): objective={objective.name!r} compares with the model as it started, kept as the "
                          "adapter's starting weights; attach an adapter instead of full=True, or use "
                          "objective='orpo' or 'simpo', which need no reference")
