"""T-Few: the three losses against a hand computation, the batches, and training (IA)³ on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

import nbpeft
from nbpeft.data.batches import IGNORE
from nbpeft.training import tfew

from conftest import tiny_llama

FRUITS = ["apple", "banana", "cherry", "grape", "mango", "peach"]
TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers"]
# An arbitrary code the model cannot know: fruits are "blue", tools are "green".
EXAMPLES = [
    ex
    for fruit, tool in zip(FRUITS, TOOLS)
    for ex in ({"prompt": f"Word: {fruit}. Code:", "choices": ["blue", "green"], "label": 0},
               {"prompt": f"Word: {tool}. Code:", "choices": ["blue", "green"], "label": 1})
]


def test_losses_match_a_hand_computation():
    log = math.log
    pad = 0.0
    # example 0: label 0; choice 0 has tokens with p = 0.5, 0.25; choice 1 one token with p = 0.5
    # example 1: label 1; choice 0 one token with p = 0.8; choice 1 two tokens with p = 0.1; no third choice
    token_logp = torch.tensor([
        [[log(0.5), log(0.25)], [log(0.5), pad], [pad, pad]],
        [[log(0.8), pad], [log(0.1), log(0.1)], [pad, pad]],
    ])
    mask = torch.tensor([[[1, 1], [1, 0], [0, 0]], [[1, 0], [1, 1], [0, 0]]], dtype=torch.bool)
    choice_mask = torch.tensor([[True, True, False], [True, True, False]])
    terms = tfew.tfew_terms(token_logp, mask, torch.tensor([0, 1]), choice_mask)
    # L_LM: minus the correct choice's mean log-prob: 1.5·ln 2 and ln 10
    assert terms["lm"].item() == pytest.approx((1.5 * log(2) + log(10)) / 2, rel=1e-6)
    # L_UL: -log(1 - p) over the wrong choices' tokens: ln 2 and ln 5
    assert terms["unlikelihood"].item() == pytest.approx((log(2) + log(5)) / 2, rel=1e-5)
    # L_LN: β = (-1.5 ln 2, -ln 2) -> ln(1 + √2); β = (ln 0.8, ln 0.1), label 1 -> ln 9
    assert terms["length_norm"].item() == pytest.approx((log(1 + math.sqrt(2)) + log(9)) / 2, rel=1e-6)
    scores = tfew.length_normalised(token_logp, mask)
    assert scores[0].tolist() == pytest.approx([-1.5 * log(2), -log(2), 0.0])


def test_token_logprobs_are_shifted_next_token_logprobs(llama):
    batch = {
        "input_ids": torch.tensor([[5, 6, 7], [5, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]),
        "choice_label": torch.tensor([0]),
        "choice_mask": torch.tensor([[True, True]]),
    }
    token_logp, mask = tfew.choice_token_logprobs(llama, batch)
    with torch.no_grad():
        logp = llama(batch["input_ids"][:1]).logits.log_softmax(-1)[0]
    assert token_logp.shape == (1, 2, 2) and mask[0].tolist() == [[True, True], [True, False]]
    assert token_logp[0, 0, 0].item() == pytest.approx(logp[0, 6].item(), abs=1e-5)
    assert token_logp[0, 0, 1].item() == pytest.approx(logp[1, 7].item(), abs=1e-5)


def test_batches_mask_the_prompt_and_pad_missing_choices(smollm2):
    _, tokenizer = smollm2
    examples = [{"prompt": "Is fire hot?", "choices": ["yes", "no"], "label": 0},
                {"prompt": "Pick a colour:", "choices": ["red", "green", "light blue"], "label": 2}]
    batch = next(iter(tfew.choice_batches(examples, tokenizer, batch_size=2, shuffle=False)))
    assert batch["input_ids"].shape[0] == 2 * 3
    assert batch["choice_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["choice_label"].tolist() == [0, 2]
    answer = tokenizer(" light blue", add_special_tokens=False)["input_ids"]
    row_labels = batch["labels"][5]
    assert row_labels[row_labels != IGNORE].tolist() == answer
    assert (batch["labels"][2] == IGNORE).all()  # the padded third choice of example 0
    # a long prompt is cut from the left: the choice keeps its tokens
    long = tfew.encode_example({"prompt": "word " * 100, "choices": ["yes", "no"], "label": 0}, tokenizer, max_length=16)
    ids, labels = long["sequences"][0]
    assert len(ids) == 16 and [t for t in labels if t != IGNORE] == tokenizer(" yes", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([], "non-empty list"),
        ([{"prompt": "x", "choices": ["a"], "label": 0}], "example 0 needs"),
        ([{"prompt": "x", "choices": ["a", "b"], "label": 2}], "example 0 has label=2"),
        ([{"prompt": "x", "choices": ["a", "b"], "label": 0}, {"prompt": "y", "choices": "ab", "label": 0}], "example 1"),
    ],
)
def test_bad_examples_give_one_line_errors(examples, message):
    tokenizer = None  # never reached: the examples are checked first
    with pytest.raises(nbpeft.ConfigError, match=message) as err:
        tfew.choice_batches(examples, tokenizer)
    assert "\n" not in str(err.value)


def test_tfew_loss_trains_ia3_on_smollm2(smol):
    model, tokenizer = smol
    nbpeft.attach(model, "ia3")
    eval_batches = list(nbpeft.choice_batches(EXAMPLES, tokenizer, batch_size=4, shuffle=False))

    def loss() -> float:
        with torch.no_grad():
            return sum(nbpeft.tfew_loss(model, b).item() for b in eval_batches) / len(eval_batches)

    loss_before, accuracy_before = loss(), nbpeft.choice_accuracy(model, EXAMPLES, tokenizer)
    loader = nbpeft.choice_batches(EXAMPLES, tokenizer, batch_size=4)
    result = nbpeft.train(model, loader, steps=4, lr=3e-2, loss_fn=nbpeft.tfew_loss, live=False)
    assert result.steps == 4
    loss_after, accuracy_after = loss(), nbpeft.choice_accuracy(model, EXAMPLES, tokenizer)
    assert loss_after < 0.5 * loss_before
    assert accuracy_after >= accuracy_before and accuracy_after > 0.5
    unlabeled = [{k: v for k, v in ex.items() if k != "label"} for ex in EXAMPLES]
    predictions = nbpeft.predict_choices(model, unlabeled, tokenizer)
    assert sum(p == ex["label"] for p, ex in zip(predictions, EXAMPLES)) / len(EXAMPLES) == accuracy_after
    print(f"T-Few on SmolLM2: loss {loss_before:.3f} -> {loss_after:.3f}, accuracy {accuracy_before:.2f} -> {accuracy_after:.2f}")


def test_tfew_loss_backpropagates_into_ia3_only():
    model = tiny_llama()
    nbpeft.attach(model, "ia3")
    batch = tfew.collate_choices(
        [{"sequences": [([1, 2, 3], [IGNORE, 2, 3]), ([1, 4], [IGNORE, 4])], "label": 1}], pad_id=0
    )
    nbpeft.tfew_loss(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("ia3_l" in n for n in grads)
