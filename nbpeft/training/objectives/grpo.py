"""GRPO (Shao et al. 2024): answers sampled while training, scored by reward functions, compared within their group.

For each prompt ``x`` the model samples ``G`` answers (``num_generations``) with the same sampler as
``nbpeft.generate`` (:mod:`nbpeft.training.sampling`). Each answer's reward ``r`` is the weighted
sum of the reward functions (``reward=``, ``reward_weights=``); its advantage is
``A = (r − mean(group)) / (std(group) + 1e-4)``. With ``ρ_t = π(y_t|·) / π_old(y_t|·)`` (1 in value: one
update per sample, its gradient that of ``log π``) and the k3 estimate of the KL to the reference
``k_t = e^(ref_t − log π_t) − (ref_t − log π_t) − 1``, the loss over every answer token of the batch is

    loss = mean_t [ −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε) A) + β k_t ]

(the tokens of the whole batch averaged together, TRL's default ``"dapo"`` normalisation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ...errors import ConfigError
from ...layers import IGNORE
from .. import lm_loss, sampling
from .base import Objective, ObjectiveLoss, Reference

Reward = Callable[[list[Any], list[str]], list[float]]


def group_advantages(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reward less its group's mean, over the group's standard deviation (+1e-4); and those deviations."""
    grouped = rewards.view(-1, group)
    std = grouped.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + 1e-4)).reshape(-1), std.squeeze(1)


def grpo_token_losses(logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
                      epsilon: float, beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token GRPO loss (rows, tokens) and the k3 KL estimate (None without a reference)."""
    ratio = torch.exp(logps - logps.detach())
    advantage = advantages.unsqueeze(1)
    losses = -torch.min(ratio * advantage, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantage)
    if ref_logps is None:
        return losses, None
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1
    return losses + beta * kl, kl


class GRPO(Objective):
    name = "grpo"
    description = "Group Relative Policy Optimization: sampled answers scored by reward functions"
    data = "prompts"
    trained_slots = (0,)
    figures = ("reward", "reward_std", "kl", "completions/mean_length")
    defaults = {"beta": 0.04}

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        reward = getattr(settings, "reward", None)
        if reward is None:
            raise ConfigError("train(): objective='grpo' needs reward=fn, fn(prompts, completions) -> list of floats "
                              "(or a list of such functions)")
        self.rewards: list[Reward] = list(reward) if isinstance(reward, (list, tuple)) else [reward]
        weights = getattr(settings, "reward_weights", None)
        self.weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.rewards):
            raise ConfigError(f"train(): reward_weights= has {len(self.weights)} weights for {len(self.rewards)} "
                              "reward functions; give one weight per function")
        self.uses_reference = self.beta > 0

    def make_loss(self, reference: Reference | None, use_cache: dict[str, bool], sources: dict[str, Any]) -> ObjectiveLoss:
        return GRPOLoss(self, reference, use_cache, sources)


def reward_name(fn: Reward, taken: set[str]) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    while name in taken:
        name += "_"
    return name


class GRPOLoss(ObjectiveLoss):
    """Sample, score, then the clipped policy loss with the KL term; ``generation_s`` counts the sampling time."""

    def __init__(self, objective: GRPO, reference: Reference | None, use_cache: dict[str, bool],
                 sources: dict[str, Any]) -> None:
        super().__init__(objective, reference, use_cache, sources)
        taken: set[str] = set()
        self.reward_names = []
        for fn in objective.rewards:
            self.reward_names.append(reward_name(fn, taken))
            taken.add(self.reward_names[-1])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        objective, settings = self.objective, self.objective.settings
        group = settings.num_generations
        source = self.sources[self.split]
        index = batch["index"]
        texts = list(source.prompts(index))  # each answered `group` times from one pass over it
        raw = [p for p in source.raw_prompts(index) for _ in range(group)]
        began = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                sampling_args = ({"do_sample": True, "temperature": float(settings.temperature), "top_p": 1.0, "top_k": 0}
                                 if settings.temperature > 0 else {"do_sample": False})
                out, prompt_mask, skip = sampling.sample(model, source.tokenizer, texts, settings.max_new_tokens,
                                                         sampling_args, num_samples=group)
        finally:
            model.train(was_training)
        self.generation_s += time.perf_counter() - began
        rows = self._rows(out, prompt_mask, skip, source.tokenizer)
        self.tokens = int(rows["attention_mask"].sum())
        completions = [source.tokenizer.decode(row, skip_special_tokens=True) for row in self._answers(rows, skip)]
        rewards, per_function = self._rewards(raw, completions, out.device)
        advantages, stds = group_advantages(rewards, group)
        logps = lm_loss.token_logps(model, rows, self.use_cache)
        ref = None
        if self.reference is not None:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), self.reference.active():
                    ref = lm_loss.token_logps(model, rows, self.use_cache)
            finally:
                model.train(was_training)
        mask = (rows["labels"][:, 1:] != IGNORE).float()
        losses, kl = grpo_token_losses(logps, ref, advantages, settings.epsilon, objective.beta)
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)
        figures = {"reward": rewards.mean(), "reward_std": stds.mean(),
                   "kl": (kl * mask).sum() / mask.sum().clamp(min=1) if kl is not None else torch.zeros(()),
                   "completions/mean_length": mask.sum(1).mean()}
        figures.update({f"rewards/{name}/mean": values.mean() for name, values in zip(self.reward_names, per_function)})
        self.figures = {name: float(value.detach()) for name, value in figures.items()}
        return loss

    @staticmethod
    def _rows(out: torch.Tensor, prompt_mask: torch.Tensor, skip: int, tokenizer: Any) -> dict[str, torch.Tensor]:
        """The sampled rows as a batch: the answer labelled up to and including its end-of-sequence token."""
        new = out[:, skip:]
        eos = tokenizer.eos_token_id
        ended = (new == eos) if eos is not None else torch.zeros_like(new, dtype=torch.bool)
        first = torch.where(ended.any(1), ended.int().argmax(1), torch.full_like(ended[:, 0], new.shape[1], dtype=torch.long))
        answer_mask = torch.arange(new.shape[1], device=new.device).unsqueeze(0) <= first.unsqueeze(1)
        attention = torch.cat([prompt_mask, answer_mask.long()], dim=1)
        labels = torch.cat([torch.full_like(prompt_mask, IGNORE), torch.where(answer_mask, new, IGNORE)], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens, as generate's
        return {"input_ids": out, "attention_mask": attention, "labels": labels, "position_ids": positions}

    @staticmethod
    def _answers(rows: dict[str, torch.Tensor], skip: int) -> list[list[int]]:
        labels = rows["labels"][:, skip:]
        return [[t for t in row.tolist() if t != IGNORE] for row in labels]

    def _rewards(self, prompts: list[Any], completions: list[str], device: torch.device
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        per_function = []
        for name, fn in zip(self.reward_names, self.objective.rewards):
            values = fn(prompts, completions)
            if not hasattr(values, "__len__") or len(values) != len(completions):
                raise ConfigError(f"train(): reward function {name} returned {type(values).__name__}; return one number "
                                  f"per completion ({len(completions)})")
            per_function.append(torch.tensor([float(v) for v in values], device=device))
        total = sum(w * values for w, values in zip(self.objective.weights, per_function))
        return total, per_function
