"""Preference objectives: each loss against its formula, the preference rows, the reference without a copy, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nbpeft
from nbpeft.data.preferences import PreferenceBatches, encode_answer
from nbpeft.errors import ConfigError
from nbpeft.layers import IGNORE
from nbpeft.training import lm_loss
from nbpeft.training.objectives import OBJECTIVES, Logps, Reference, build
from nbpeft.training.options import Settings

from conftest import char_tokenizer, tiny_gpt2, tiny_llama

PAIRS = [{"prompt": f"q{i}", "chosen": "yes" * (i % 3 + 1), "rejected": "no" * (i % 2 + 1)} for i in range(8)]


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen weight and buffer, copied."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return frozen | {n: b.detach().clone() for n, b in model.named_buffers()}


def same(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    after = base_weights(model)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def settings(objective: str, **options) -> Settings:
    return Settings.of("train()", {"data": [], "objective": objective, **options})


def logps(seed: int = 0, rows: int = 5) -> tuple[Logps, Logps]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (rows, 2), generator=g)
    policy = Logps(-torch.rand(rows, 2, generator=g) * counts, counts)
    reference = Logps(-torch.rand(rows, 2, generator=g) * counts, counts)
    return policy, reference


# ------------------------------------------------------------------ each loss is its paper's formula

def test_dpo_is_the_logsigmoid_of_the_log_ratio_and_label_smoothing_is_conservative_dpo():
    policy, ref = logps()
    (pc, pr), (rc, rr) = policy.sums.unbind(1), ref.sums.unbind(1)
    for smoothing in (0.0, 0.2):
        loss, figures = build("dpo", settings("dpo", beta=0.3, label_smoothing=smoothing)).loss(policy, ref, {})
        h = 0.3 * ((pc - rc) - (pr - rr))
        expected = (-(1 - smoothing) * torch.log(torch.sigmoid(h)) - smoothing * torch.log(torch.sigmoid(-h))).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    chosen, rejected = 0.3 * (pc - rc), 0.3 * (pr - rr)
    assert figures["rewards/margins"].item() == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)
    assert figures["rewards/accuracies"].item() == pytest.approx((chosen > rejected).float().mean().item())


def test_ipo_regresses_the_length_averaged_log_ratio_to_one_over_two_beta():
    policy, ref = logps(1)
    avg = [x.sums / x.counts for x in (policy, ref)]
    h = (avg[0][:, 0] - avg[1][:, 0]) - (avg[0][:, 1] - avg[1][:, 1])
    loss, _ = build("ipo", settings("ipo", beta=0.5)).loss(policy, ref, {})
    assert loss.item() == pytest.approx(((h - 1 / (2 * 0.5)) ** 2).mean().item(), abs=1e-6)


def test_orpo_is_the_chosen_nll_minus_lambda_log_sigmoid_of_the_log_odds_ratio():
    policy, _ = logps(2)
    avg = policy.sums / policy.counts
    odds = [a - torch.log(1 - torch.exp(a)) for a in avg.unbind(1)]
    nll = -policy.sums[:, 0].sum() / policy.counts[:, 0].sum()
    expected = nll - 0.25 * torch.log(torch.sigmoid(odds[0] - odds[1])).mean()
    loss, figures = build("orpo", settings("orpo", beta=0.25)).loss(policy, None, {})
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert figures["nll_loss"].item() == pytest.approx(nll.item(), abs=1e-6)


def test_simpo_is_the_logsigmoid_of_the_scaled_average_margin_less_gamma():
    policy, _ = logps(3)
    avg = policy.sums / policy.counts
    expected = -torch.log(torch.sigmoid(2.0 * (avg[:, 0] - avg[:, 1]) - 0.7)).mean()
    loss, _ = build("simpo", settings("simpo", beta=2.0, gamma=0.7)).loss(policy, None, {})
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_kto_compares_each_answer_with_the_clamped_kl_of_the_mismatched_pairs():
    policy, ref = logps(4, rows=6)
    desirable = torch.tensor([True, False, True, True, False, False])
    ratio = policy.sums - ref.sums
    kl = max(ratio[:, 1].mean().item(), 0.0)
    expected = []
    for r, good in zip(ratio[:, 0].tolist(), desirable.tolist()):
        expected.append(1.5 * (1 - 1 / (1 + math.exp(-0.1 * (r - kl)))) if good
                        else 0.5 * (1 - 1 / (1 + math.exp(-0.1 * (kl - r)))))
    objective = build("kto", settings("kto", desirable_weight=1.5, undesirable_weight=0.5))
    loss, figures = objective.loss(policy, ref, {"desirable": desirable})
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert figures["kl"].item() == pytest.approx(kl, abs=1e-6)


def test_answer_log_probabilities_equal_a_log_softmax_of_the_full_logits():
    for model in (tiny_llama(), tiny_gpt2()):
        ids = torch.randint(3, 128, (3, 10))
        labels = ids.clone()
        labels[:, :4] = IGNORE
        labels[1, 7:] = IGNORE
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        sums, counts = lm_loss.labelled_logps(model, batch, {"use_cache": False})
        logits = model(input_ids=ids).logits[:, :-1].float()
        picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        keep = labels[:, 1:] != IGNORE
        assert torch.allclose(sums, (picked * keep).sum(1), atol=1e-4)
        assert counts.tolist() == keep.sum(1).tolist()


# ------------------------------------------------------------------ the rows

def test_string_pairs_learn_the_answer_alone_through_the_chat_template_ending_with_end_of_turn(smol_tokenizer):
    ids, labels = encode_answer(smol_tokenizer, "What is 2+2?", "Four.")
    answer = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert smol_tokenizer.decode(answer) == "Four.<|im_end|>"
    assert "What is 2+2?" in smol_tokenizer.decode(ids) and "<|im_start|>assistant" in smol_tokenizer.decode(ids)


def test_conversational_rows_as_trl_writes_them_equal_their_string_form(smol_tokenizer):
    string = encode_answer(smol_tokenizer, "Hi there", "Hello!")
    messages = encode_answer(smol_tokenizer, [{"role": "user", "content": "Hi there"}],
                             [{"role": "assistant", "content": "Hello!"}])
    assert string == messages
    # an earlier assistant turn in the prompt is context, not learnt
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ids, labels = encode_answer(smol_tokenizer, turns, [{"role": "assistant", "content": "d"}])
    assert smol_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE]) == "d<|im_end|>"


def test_a_malformed_row_is_refused_in_one_line_naming_it():
    rows = PAIRS[:3] + [{"prompt": "q", "chosen": "a"}]
    with pytest.raises(ConfigError, match=r"row 3 has no 'rejected'") as err:
        PreferenceBatches(rows, char_tokenizer(), 2, 64, 0, form="pairs", objective="dpo")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="row 0 has label 'yes'"):
        PreferenceBatches([{"prompt": "q", "completion": "a", "label": "yes"}], char_tokenizer(), 2, 64, 0,
                          form="unpaired", objective="kto")


def test_kto_rows_pair_each_prompt_with_the_previous_rows_completion_for_the_kl_estimate():
    rows = [{"prompt": "p0", "completion": "aa", "label": True}, {"prompt": "p1", "completion": "bbb", "label": False}]
    tok = char_tokenizer()
    batch = next(PreferenceBatches(rows, tok, 2, 64, 0, form="unpaired", objective="kto").once())
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["desirable"].tolist() == [True, False]
    text = tok.decode(batch["input_ids"][1, 1][batch["attention_mask"][1, 1].bool()])
    assert "p1" in text and "aa" in text and "bbb" not in text


def test_max_length_cuts_are_said_once():
    batches = PreferenceBatches([{"prompt": "x" * 40, "chosen": "y" * 40, "rejected": "z"}], char_tokenizer(), 1, 48, 0,
                                form="pairs", objective="dpo")
    assert any("max_length=48 cut 1 of 1" in note for note in batches.notes)
    assert batches.examples[0]["slots"][0][0].__len__() == 48


# ------------------------------------------------------------------ the reference

def test_the_reference_is_the_disabled_adapter_when_it_adds_nothing_else_the_starting_weights():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    params = nbpeft.core.trainable_parameters(model)
    assert Reference(model, params, full=False).disabled
    nbpeft.core.state(model).adapters["default"].trained = True
    reference = Reference(model, params, full=False)
    assert not reference.disabled and sum(t.numel() for t in reference.start) == sum(p.numel() for p in params)
    pissa = tiny_llama()
    nbpeft.attach(pissa, "lora", r=4, init="pissa")
    assert not Reference(pissa, nbpeft.core.trainable_parameters(pissa), full=False).disabled


def test_the_swapped_in_starting_weights_give_the_starting_model_under_autocast():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, init="random")
    params = nbpeft.core.trainable_parameters(model)
    x = torch.randint(0, 128, (1, 6))
    start = model(x).logits
    reference = Reference(model, params, full=False)
    with torch.no_grad():
        for p in params:
            p.add_(0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moved = model(x).logits  # fills autocast's cast cache with the moved weights
        with torch.no_grad(), reference.active():
            again = model(x).logits
    assert not torch.allclose(moved.float(), start, atol=1e-2)
    assert torch.allclose(again.float(), start, atol=3e-2)


# ------------------------------------------------------------------ training

def test_dpo_raises_the_margin_keeps_the_base_bit_identical_and_reports_trl_figures():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    base = base_weights(model)
    result = nbpeft.train(model, PAIRS, tokenizer=char_tokenizer(), objective="dpo", beta=0.5, steps=6, batch_size=4,
                          lr=2e-2, precision="fp32", live=False, runs=False, eval_data=PAIRS[:4])
    margins = [value for _, value in result.figure("rewards/margins")]
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 0.05
    assert result.losses[-1] < result.losses[0] < math.log(2) + 1e-4
    assert [step for step, _ in result.figure("eval_rewards/accuracies")] == [1, 2, 3, 4, 5, 6]
    assert same(base, model)
    assert nbpeft.core.state(model).adapters["default"].trained


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "prefix"])
def test_every_objective_trains_every_kind_of_method_and_leaves_the_base_alone(objective, method):
    model = tiny_llama()
    nbpeft.attach(model, method, **({"num_virtual_tokens": 3} if method in ("prompt", "prefix") else {}))
    base = base_weights(model)
    rows = PAIRS if objective != "kto" else [
        {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
        for i, r in enumerate(PAIRS)]
    extra = {}
    if objective == "grpo":
        rows = [{"prompt": r["prompt"]} for r in PAIRS]
        extra = {"reward": lambda prompts, completions: [float(len(c) % 3) for c in completions], "max_new_tokens": 6,
                 "num_generations": 2}
    result = nbpeft.train(model, rows, tokenizer=char_tokenizer(), objective=objective, steps=2, batch_size=4,
                          lr=1e-2, precision="fp32", live=False, runs=False, **extra)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert "rewards/chosen" in result.history[-1] or "reward" in result.history[-1]
    assert same(base, model)


def test_precomputed_reference_log_probabilities_give_the_same_run():
    runs = []
    for precompute in (False, True):
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4, init="random")
        runs.append(nbpeft.train(model, PAIRS, tokenizer=char_tokenizer(), objective="dpo", steps=3, batch_size=4,
                                 lr=1e-2, precision="fp32", live=False, runs=False, precompute_ref=precompute).losses)
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)


@pytest.mark.parametrize("precompute", [False, True])
def test_a_resumed_dpo_run_keeps_the_reference_its_run_started_with(tmp_path, precompute):
    """Resumed in the same kernel, the adapter has trained since the run began: still the run's first reference."""
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)  # starts at identity: the reference is the adapter disabled
    options = dict(tokenizer=char_tokenizer(), objective="dpo", beta=0.5, steps=4, batch_size=4, lr=2e-2,
                   precision="fp32", live=False, runs=False, save_every=2, output_dir=tmp_path,
                   precompute_ref=precompute)
    whole = nbpeft.train(model, PAIRS, **options)
    resumed = nbpeft.train(model, PAIRS, **options, resume=str(tmp_path / "checkpoint-000002"))
    for name in ("rewards/chosen", "rewards/rejected", "loss"):
        assert [row[name] for row in resumed.history[2:]] == pytest.approx(
            [row[name] for row in whole.history[2:]], rel=1e-4, abs=1e-6), name


def test_options_of_another_objective_and_what_objectives_cannot_go_with_are_refused_in_one_line():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    cases = [({"objective": "dpo", "gamma": 1.0}, "gamma= belongs to objective='simpo'"),
             ({"beta": 0.2}, "beta= belongs to objective="),
             ({"objective": "dpo", "packing": True}, "packing=True goes with objective='sft'"),
             ({"objective": "dpo", "batch_size": "auto"}, "batch_size='auto' goes with objective='sft'"),
             ({"objective": "kto"}, "row 0 has no 'completion'")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
            nbpeft.train(model, PAIRS, tokenizer=char_tokenizer(), steps=1, live=False, runs=False, **options)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="attach an adapter instead of full=True"):
        nbpeft.train(tiny_llama(), PAIRS, tokenizer=char_tokenizer(), objective="dpo", full=True, steps=1, live=False,
                     runs=False)


def test_a_pair_objective_computes_chosen_and_rejected_one_after_the_other_with_the_same_gradient():
    """The slot-by-slot checkpointed forward gives the gradient of the loss on both answers at once."""
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, init="random")
    tok = char_tokenizer()
    batch = next(PreferenceBatches(PAIRS[:4], tok, 4, 64, 0, form="pairs", objective="simpo").once())
    objective = build("simpo", settings("simpo"))
    from nbpeft.training.objectives import ObjectiveLoss

    ObjectiveLoss(objective, None, {"use_cache": False})(model, batch).backward()
    sequential = [p.grad.clone() for p in nbpeft.core.trainable_parameters(model)]
    model.zero_grad()
    flat = {k: batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "labels")}
    logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"]).logits[:, :-1]
    keep = flat["labels"][:, 1:] != IGNORE
    picked = torch.log_softmax(logits, -1).gather(-1, flat["input_ids"][:, 1:, None]).squeeze(-1)
    means = ((picked * keep).sum(1) / keep.sum(1)).view(4, 2)
    (-F.logsigmoid(2.0 * (means[:, 0] - means[:, 1]) - 0.5)).mean().backward()
    for a, p in zip(sequential, nbpeft.core.trainable_parameters(model)):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_the_train_tab_shows_an_objectives_options_only_while_it_is_chosen():
    from nbpeft.widgets.training import TrainTab

    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    tab = TrainTab(model, char_tokenizer(), namespace={"data": PAIRS})
    assert tab.fields["gamma"].row.layout.display == "none" and tab.fields["beta"].row.layout.display == "none"
    tab.objective.value = "simpo"
    assert tab.fields["gamma"].row.layout.display is None and tab.fields["beta"].row.layout.display is None
    assert tab.fields["desirable_weight"].row.layout.display == "none"
    tab.gamma.value = 1.0
    assert tab.options()["gamma"] == 1.0 and tab.options()["objective"] == "simpo"
    tab.objective.value = "dpo"
    assert "gamma" not in tab.options()


def test_the_magic_takes_an_objective_and_its_options(monkeypatch):
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython() or get_ipython()
    if "nbpeft" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "nbpeft")
    calls = []
    monkeypatch.setattr(nbpeft, "train", lambda model, data, **keywords: calls.append(keywords) or "result")
    ip.user_ns.update(model=tiny_llama(), data=PAIRS)
    try:
        result = ip.run_cell("%%peft_train steps=2\nobjective: dpo\nbeta: 0.2\nprecompute_ref: true\nlive: false\n")
    finally:
        for name in ("model", "data", "_peft_result"):
            ip.user_ns.pop(name, None)
    assert result.success, result.error_in_exec
    assert calls[0]["objective"] == "dpo" and calls[0]["beta"] == 0.2 and calls[0]["precompute_ref"] is True


def test_show_example_shows_both_answers_of_a_pair_with_the_tokens_under_the_loss(smol_tokenizer):
    shown = nbpeft.show_example([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}], smol_tokenizer)
    assert list(shown.answers) == ["chosen", "rejected"]
    chosen = shown.answers["chosen"]
    assert "".join(t for t, on in zip(chosen.tokens, chosen.trained) if on) == "Hello!<|im_end|>"
    assert "⟦Go away.<|im_end|>⟧" in repr(shown).replace("⟦Go", "⟦Go") and "<b>rejected</b>" in shown._repr_html_()
    rated = nbpeft.show_example([{"prompt": "Hi", "completion": "Hey", "label": False}], smol_tokenizer)
    assert list(rated.answers) == ["completion (undesirable)"]


# ------------------------------------------------------------------ GRPO

def test_grpo_advantages_are_normalised_within_each_group_and_the_loss_is_the_clipped_ratio_plus_k3():
    from nbpeft.training.objectives.grpo import group_advantages, grpo_token_losses

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    advantages, stds = group_advantages(rewards, 3)
    first = rewards[:3]
    assert torch.allclose(advantages[:3], (first - first.mean()) / (first.std() + 1e-4))
    assert stds.tolist() == pytest.approx([first.std().item(), rewards[3:].std().item()])
    logps = torch.log(torch.rand(2, 4)).requires_grad_()
    ref = torch.log(torch.rand(2, 4))
    losses, kl = grpo_token_losses(logps, ref, torch.tensor([0.5, -1.0]), 0.2, 0.1)
    delta = ref - logps.detach()
    assert torch.allclose(kl, torch.exp(delta) - delta - 1)
    assert torch.allclose(losses, -torch.tensor([[0.5], [-1.0]]) + 0.1 * kl)  # the ratio is 1 in value
    losses.sum().backward()  # its gradient is that of log π: −A + β ∂k3
    assert torch.allclose(logps.grad, -torch.tensor([[0.5], [-1.0]]) + 0.1 * (1 - torch.exp(delta)), atol=1e-6)


def test_grpo_samples_scores_and_trains_leaving_the_base_alone():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    base = base_weights(model)
    seen = []

    def short(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return [1.0 if len(c) < 6 else 0.0 for c in completions]

    result = nbpeft.train(model, [{"prompt": f"say {i}"} for i in range(4)], tokenizer=char_tokenizer(),
                          objective="grpo", reward=[short, lambda p, c: [0.0] * len(c)], reward_weights=[1.0, 0.5],
                          num_generations=3, max_new_tokens=8, steps=2, batch_size=2, lr=1e-2, precision="fp32",
                          live=False, runs=False)
    assert len(seen) == 2 and len(seen[0][0]) == 6 and seen[0][0][0] == seen[0][0][2]  # 3 answers per prompt
    row = result.history[-1]
    assert {"reward", "reward_std", "kl", "rewards/short/mean", "rewards/<lambda>/mean"} <= row.keys()
    assert 0 < row["generation_s"] < row["step_time_s"]
    assert same(base, model)
    with pytest.raises(ConfigError, match="objective='grpo' needs reward=fn"):
        nbpeft.train(model, [{"prompt": "x"}], tokenizer=char_tokenizer(), objective="grpo", steps=1, live=False,
                     runs=False)


def test_grpo_raises_the_mean_reward_on_smollm2(smol):
    """Reward: answers of few words. A short run on the bundled SmolLM2 makes its answers shorter."""
    model, tokenizer = smol
    nbpeft.attach(model, "lora", r=16, targets="all-linear")

    def few_words(prompts, completions):
        return [-len(c.split()) / 10 for c in completions]

    prompts = [{"prompt": p} for p in ("Tell me about the sea.", "What is a cat?", "Describe a city.", "Why is the sky blue?")]
    result = nbpeft.train(model, prompts, tokenizer=tokenizer, objective="grpo", reward=few_words, num_generations=4,
                          max_new_tokens=16, steps=6, batch_size=2, lr=5e-3, warmup=0, schedule="constant",
                          live=False, runs=False, seed=0)
    rewards = [value for _, value in result.figure("reward")]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2, rewards


def test_the_progress_line_and_the_live_plot_show_the_objectives_figures():
    from nbpeft.training.display import LossCurve, progress_text
    from nbpeft.training.events import Begin, Step

    steps = [Step(step=i, total_steps=3, loss=0.7 - 0.1 * i, lr=1e-3, tokens=10, step_time_s=1.0, elapsed_s=i,
                  tokens_per_s=10.0, eta_s=0.0, peak_mem_bytes=1 << 20, generation_s=0.4 if i == 3 else None,
                  figures={"rewards/margins": 0.1 * i, "rewards/accuracies": 0.5}) for i in (1, 2, 3)]
    line = progress_text(steps[-1])
    assert "rewards/margins 0.300" in line and "rewards/accuracies 0.500" in line
    assert "generation 0.4 s · training 0.6 s" in line
    curve = LossCurve()
    curve.start(Begin(total_steps=3, trainable=10, device="cpu", precision="fp32", objective="dpo",
                      figures=("rewards/margins", "rewards/accuracies")))
    for step in steps:
        curve.add(step)
    assert curve.figures["rewards/margins"] == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert curve.png()[:4] == b"\x89PNG"


def test_a_combined_adapter_is_not_taken_for_a_fresh_one():
    model = tiny_llama()
    nbpeft.attach(model, "lora", name="a", r=4, init="random")
    nbpeft.attach(model, "lora", name="b", r=4, init="random")
    nbpeft.combine(model, {"a": 0.5, "b": 0.5}, name="mix")
    nbpeft.set_adapter(model, "mix")
    assert not Reference(model, nbpeft.core.trainable_parameters(model), full=False).disabled


def test_per_token_log_probabilities_through_the_head_in_blocks_equal_the_full_logits_path(monkeypatch):
    """GRPO's log-probabilities: only labelled positions pass the head, with the same values and gradients."""
    torch.manual_seed(0)
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, init="random")
    input_ids = torch.randint(3, 50, (3, 9))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE
    labels[1, 7:] = IGNORE
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    results = []
    for blocked in (True, False):
        if not blocked:
            monkeypatch.setattr(lm_loss, "_backbone_and_head", lambda model: None)
        model.zero_grad()
        logps = lm_loss.token_logps(model, batch, {"use_cache": False})
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (blocked_logps, blocked_grads), (full_logps, full_grads) = results
    assert (blocked_logps[labels[:, 1:] == IGNORE] == 0).all() and (blocked_logps[labels[:, 1:] != IGNORE] < 0).all()
    torch.testing.assert_close(blocked_logps, full_logps, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(blocked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
