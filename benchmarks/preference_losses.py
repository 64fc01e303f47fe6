"""nbpeft's preference losses against TRL's on the same batch of log-probabilities.

One random batch: per-token log-probabilities of chosen and rejected answers of different
lengths (zero outside each answer, as TRL's fused head leaves them), and reference sums. Each
objective's loss and figures are computed by nbpeft (``nbpeft.training.objectives``) and by TRL
1.16's own code on the same numbers:

- dpo (sigmoid) and ipo: ``DPOTrainer._compute_loss`` with a model that returns the given
  log-probabilities and the reference log-probabilities precomputed;
- conservative dpo (label_smoothing > 0): TRL 1.16's DPO sigmoid loss takes no label smoothing,
  so the formula is checked against ``CPOTrainer.cpo_loss`` (sigmoid, the same function of the
  log-ratio) fed the policy-minus-reference log-ratios;
- orpo: ``ORPOTrainer.odds_ratio_loss`` on the length-averaged log-probabilities, combined as
  TRL's ``get_batch_loss_metrics`` does (``nll - losses.mean()``) with the same NLL (TRL takes its
  NLL over prompt and answer tokens; nbpeft over the answer's, as the paper's SFT term);
- simpo: ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` on the length-averaged log-probabilities;
- kto: ``KTOTrainer._compute_loss`` with the KL pairs' log-probabilities from the same model.

Every difference must be at most 1e-5; when one is not, the script says which and prints no
table of results.

    bash benchmarks/setup_ref_venv.sh
    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/preference_losses.py
"""

from __future__ import annotations

import os
import sys
import types
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental in 1.16

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from nbpeft.training.objectives import Logps, build  # noqa: E402
from nbpeft.training.options import Settings  # noqa: E402

TOLERANCE = 1e-5
ROWS, WIDTH = 6, 24


class FakeModel:
    """Returns the given per-token log-probabilities for each batch of input ids it is called with."""

    def __init__(self, by_ids: dict[int, torch.Tensor]) -> None:
        self.by_ids = by_ids

    def __call__(self, input_ids: torch.Tensor, **_: object) -> types.SimpleNamespace:
        log_probs = self.by_ids[input_ids.data_ptr()]
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids (rows, width), completion mask, per-token log-probs (rows, width - 1), zero outside the answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (ROWS, WIDTH), generator=g)
    mask = torch.zeros(ROWS, WIDTH, dtype=torch.long)
    for r in range(ROWS):
        start = int(torch.randint(3, 8, (1,), generator=g))
        end = int(torch.randint(start + 2, WIDTH + 1, (1,), generator=g))
        mask[r, start:end] = 1
    per_token = -torch.rand(ROWS, WIDTH - 1, generator=g, dtype=torch.float64).float() * 0.2 * mask[:, 1:]
    return ids, mask, per_token


def stub(**attributes: object) -> types.SimpleNamespace:
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        unwrap_model=lambda m: m)
    return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerator,
                                 aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                                 _total_train_tokens=0, _tp_size=1, **attributes)


def nbpeft_loss(objective: str, policy: Logps, reference: Logps | None, extra: dict | None = None,
                **options: object) -> tuple[float, dict[str, float]]:
    settings = Settings.of("train()", {"data": [], "objective": objective, **options})
    loss, figures = build(objective, settings).loss(policy, reference, extra or {})
    return loss.item(), {k: v.item() for k, v in figures.items()}


def pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Logps, Logps, torch.Tensor]:
    ids, mask, per_token = batch(0)  # rows 0..2 chosen, 3..5 rejected: TRL's [chosen; rejected]
    half = ROWS // 2
    sums, counts = per_token.sum(1), mask[:, 1:].sum(1)
    ref = sums + torch.randn(ROWS, generator=torch.Generator().manual_seed(1)) * 0.5
    policy = Logps(torch.stack([sums[:half], sums[half:]], 1), torch.stack([counts[:half], counts[half:]], 1))
    reference = Logps(torch.stack([ref[:half], ref[half:]], 1), policy.counts)
    return ids, mask, per_token, policy, reference, ref


def compare_dpo(loss_type: str, beta: float) -> tuple[float, float, dict[str, tuple[float, float]]]:
    ids, mask, per_token, policy, reference, ref = pairs()
    half = ROWS // 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:half], "ref_rejected_logps": ref[half:]}
    trainer = stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                   loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False)
    trl = DPOTrainer._compute_loss(trainer, FakeModel({ids.data_ptr(): per_token}), inputs, False).item()
    ours, figures = nbpeft_loss({"sigmoid": "dpo", "ipo": "ipo"}[loss_type], policy, reference, beta=beta)
    trl_figures = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return trl, ours, {k: (trl_figures[k], figures[k]) for k in trl_figures}


def cpo(loss_type: str, beta: float, smoothing: float, gamma: float = 0.0) -> types.SimpleNamespace:
    return stub(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma)


def compare_conservative_dpo(beta: float, smoothing: float) -> tuple[float, float, dict]:
    _, _, _, policy, reference, _ = pairs()
    ratios = policy.sums - reference.sums
    losses, _, _ = CPOTrainer.cpo_loss(cpo("sigmoid", beta, smoothing), ratios[:, 0], ratios[:, 1])
    ours, _ = nbpeft_loss("dpo", policy, reference, beta=beta, label_smoothing=smoothing)
    return losses.mean().item(), ours, {}


def compare_simpo(beta: float, gamma: float) -> tuple[float, float, dict]:
    _, _, _, policy, _, _ = pairs()
    losses, chosen, rejected = CPOTrainer.cpo_loss(cpo("simpo", beta, 0.0, gamma), *policy.means.unbind(1))
    ours, figures = nbpeft_loss("simpo", policy, None, beta=beta, gamma=gamma)
    return losses.mean().item(), ours, {"rewards/chosen": (chosen.mean().item(), figures["rewards/chosen"]),
                                        "rewards/rejected": (rejected.mean().item(), figures["rewards/rejected"])}


def compare_orpo(beta: float) -> tuple[float, float, dict]:
    _, _, _, policy, _, _ = pairs()
    trainer = stub(beta=beta)
    losses, chosen, rejected, ratio, _ = ORPOTrainer.odds_ratio_loss(trainer, *policy.means.unbind(1))
    nll = -policy.sums[:, 0].sum() / policy.counts[:, 0].sum()
    ours, figures = nbpeft_loss("orpo", policy, None, beta=beta)
    return (nll - losses.mean()).item(), ours, {"log_odds_ratio": (ratio.item(), figures["log_odds_ratio"]),
                                                "rewards/chosen": (chosen.mean().item(), figures["rewards/chosen"])}


def compare_kto(beta: float, desirable: float, undesirable: float) -> tuple[float, float, dict]:
    ids, mask, per_token = batch(2)
    kl_ids, kl_mask, kl_per_token = batch(3)
    labels = torch.tensor([True, False, True, True, False, True])
    ref = per_token.sum(1) + torch.randn(ROWS, generator=torch.Generator().manual_seed(4)) * 0.5
    ref_kl = kl_per_token.sum(1) - 0.3
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    trainer = stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                   desirable_weight=desirable, undesirable_weight=undesirable)
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    model = FakeModel({ids.data_ptr(): per_token, kl_ids.data_ptr(): kl_per_token})
    trl = KTOTrainer._compute_loss(trainer, model, inputs, False).item()
    counts = torch.stack([mask[:, 1:].sum(1), kl_mask[:, 1:].sum(1)], 1)
    policy = Logps(torch.stack([per_token.sum(1), kl_per_token.sum(1)], 1), counts)
    reference = Logps(torch.stack([ref, ref_kl], 1), counts)
    ours, figures = nbpeft_loss("kto", policy, reference, {"desirable": labels}, beta=beta,
                                desirable_weight=desirable, undesirable_weight=undesirable)
    return trl, ours, {"kl": (trainer._metrics["train"]["kl"][-1], figures["kl"])}


def main() -> None:
    cases = [
        ("dpo beta=0.1", lambda: compare_dpo("sigmoid", 0.1)),
        ("dpo beta=0.5", lambda: compare_dpo("sigmoid", 0.5)),
        ("conservative dpo beta=0.1 label_smoothing=0.2", lambda: compare_conservative_dpo(0.1, 0.2)),
        ("ipo beta=0.1", lambda: compare_dpo("ipo", 0.1)),
        ("orpo beta=0.1", lambda: compare_orpo(0.1)),
        ("simpo beta=2.0 gamma=0.5", lambda: compare_simpo(2.0, 0.5)),
        ("kto beta=0.1", lambda: compare_kto(0.1, 1.0, 1.0)),
        ("kto beta=0.3 weights 1.33/0.7", lambda: compare_kto(0.3, 1.33, 0.7)),
    ]
    lines, failed = [], []
    for name, run in cases:
        trl, ours, figures = run()
        worst = max([abs(trl - ours)] + [abs(a - b) for a, b in figures.values()])
        lines.append(f"{name:<48} TRL {trl:>11.6f}  nbpeft {ours:>11.6f}  largest difference {worst:.1e}"
                     f" (loss and {len(figures)} figures)")
        if not worst <= TOLERANCE:
            failed.append(f"{name}: differs by {worst:.2e} (TRL {trl:.6f}, nbpeft {ours:.6f}, figures {figures})")
    if failed:
        print("preference_losses: nbpeft does not match TRL within 1e-5:\n" + "\n".join(failed), file=sys.stderr)
        sys.exit(1)
    import trl

    print(f"nbpeft against TRL {trl.__version__}, the same log-probabilities, every difference within {TOLERANCE}:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
