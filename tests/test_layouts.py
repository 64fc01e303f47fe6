"""batching=: each batch's examples laid out with the least padding the data and the model allow."""

from __future__ import annotations

import io

import pytest
import torch
import transformers

import nbpeft
from nbpeft.data import layouts
from nbpeft.data.batches import Batches, collate, collate_packed
from nbpeft.inference import generate as generation
from nbpeft.training import attention, lm_loss
from nbpeft.training.display import TextDisplay

from conftest import char_tokenizer, examples, tiny_llama

SPREAD = [5 + (37 * i) % 120 for i in range(64)]  # 5 to 124 tokens


def test_auto_keeps_padded_batches_where_lengths_are_even_and_packs_or_groups_where_they_spread():
    even = examples([40] * 32)
    assert layouts.choose(even, 8, 16, 512, 0, can_pack=True)[0] == "padded"
    spread = examples(SPREAD)
    layout, shares = layouts.choose(spread, 8, 16, 512, 0, can_pack=True)
    assert layout == "packed" and shares["packed"] < 0.05 < 0.3 < shares["padded"]
    layout, shares = layouts.choose(spread, 8, 16, 512, 0, can_pack=False)
    assert layout == "grouped" and "packed" not in shares and shares["grouped"] < shares["padded"] / 2
    assert layouts.choose(examples([40] * 16 + [80] * 16), 8, 16, 512, 0, can_pack=False)[0] == "grouped"


def test_a_packed_batch_holds_each_example_once_in_rows_with_little_padding():
    exs = examples(SPREAD[:8])
    for limit in (124, 4096):
        rows = layouts.pack_batch(exs, 16, limit)
        assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in exs)
        assert all(sum(len(e["input_ids"]) for e in row) <= max(limit, layouts.ROW_LIMIT) for row in rows)
        assert len(rows) < len(exs)
        assert 1 - sum(SPREAD[:8]) / (len(rows) * layouts.packed_width(rows, 16)) < 0.05


def test_grouped_batches_cover_every_example_once_and_repeat_with_the_seed():
    data = [{"input_ids": e["input_ids"]} for e in examples(SPREAD)]

    def epoch(seed):
        stream = iter(Batches(data, None, 8, 512, seed, batching="grouped"))
        return [next(stream)["input_ids"] for _ in range(8)]

    first = epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0)))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, epoch(1)))
    assert sum(int((b != 0).sum()) for b in first) == sum(SPREAD)


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_examples_of_many_lengths_attend_in_few_calls_with_the_padded_loss_and_gradients(autocast, monkeypatch):
    calls = []
    attend = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(a) or attend(*a))
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="random")
    exs = examples([5, 40, 21, 37, 3, 18, 33, 9])
    packed = collate_packed(layouts.pack_batch(exs, 16, 64), pad_id=0, multiple=16)
    padded = collate(exs, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = lm_loss.model_loss(model, packed, {})
        want = model(**padded, use_cache=False).loss
    assert ours.item() == pytest.approx(want.item(), rel=1e-2 if autocast else 1e-5)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(want, params)):
        assert (a - b).norm() <= (0.05 if autocast else 1e-4) * b.norm()
    if autocast:  # one call per group of similar lengths (of 16), not one per example
        assert 0 < len(calls) <= model.config.num_hidden_layers * 4


def test_per_example_attention_is_checked_on_the_model():
    cpu = torch.device("cpu")
    assert attention.attends_per_example(tiny_llama(), cpu)
    assert not attention.attends_per_example(tiny_llama(), cpu, checkpointing=True)
    prompted = tiny_llama()
    nbpeft.attach(prompted, "prompt", num_virtual_tokens=2)  # virtual tokens go before a row, not each example
    assert not attention.attends_per_example(prompted, cpu)
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    assert not attention.attends_per_example(eager, cpu)


def chats(n=24):
    return [{"prompt": "q" * (3 + (7 * i) % 40), "response": "a" * (2 + (11 * i) % 50)} for i in range(n)]


def test_train_packs_by_default_says_so_and_learns_what_padded_batches_learn():
    out = io.StringIO()
    losses = {}
    for batching in ("auto", "padded"):
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4)
        result = nbpeft.train(model, chats(), tokenizer=char_tokenizer(), steps=3, batching=batching, runs=False,
                              live=TextDisplay(out) if batching == "auto" else False)
        losses[batching] = [h["loss"] for h in result.history]
    banner = out.getvalue().splitlines()[0]
    assert "batching auto: packed (padding" in banner and "random padded batches" in banner and "prepared in" in banner
    assert losses["auto"] == pytest.approx(losses["padded"], rel=1e-4)


def test_packing_false_never_packs_and_the_same_seed_gives_the_same_run():
    runs = []
    for _ in range(2):
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4)
        seen: list[str] = []

        def listen(event, payload, seen=seen):
            if event == "begin":
                seen.append(payload.batching)

        nbpeft.train(model, chats(), tokenizer=char_tokenizer(), steps=2, packing=False, runs=False, live=listen)
        runs.append((seen[0], [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    assert runs[0][0].startswith("batching auto: grouped")
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(nbpeft.ConfigError, match="batching='packed' applies to text"):
        Batches([{"text": "a b", "label": 1}], char_tokenizer(), 2, 16, 0, batching="packed")
    with pytest.raises(nbpeft.ConfigError, match="batching='tight' is not known"):
        Batches(["a b"], char_tokenizer(), 2, 16, 0, batching="tight")


def test_generate_answers_through_merged_lora_and_puts_the_exact_weights_back(monkeypatch):
    tok = char_tokenizer()
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, init="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as patch:
        patch.setattr(generation, "MERGE_LIMIT_BYTES", 0)  # too large to merge: answered unmerged
        unmerged_answer = nbpeft.generate(model, tok, "hello", max_new_tokens=8)
    merges = []
    original = generation.merge
    monkeypatch.setattr(generation, "merge", lambda *a: merges.append(a) or original(*a))
    answer = nbpeft.generate(model, tok, "hello", max_new_tokens=8)
    assert merges and answer == unmerged_answer
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(KeyboardInterrupt), generation.merged_while_generating(model):
        assert nbpeft.core.state(model).adapters["default"].merged
        raise KeyboardInterrupt
    assert not nbpeft.core.state(model).adapters["default"].merged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_generate_leaves_other_methods_and_non_fp32_weights_unmerged():
    model = tiny_llama().to(torch.bfloat16)
    nbpeft.attach(model, "lora", r=4)
    with generation.merged_while_generating(model):
        assert not nbpeft.core.state(model).adapters["default"].merged
    lora = tiny_llama()
    nbpeft.attach(lora, "lora", r=4)
    with nbpeft.disable_adapters(lora), generation.merged_while_generating(lora):
        assert not nbpeft.core.state(lora).adapters["default"].merged
    ia3 = tiny_llama()
    nbpeft.attach(ia3, "ia3")
    with generation.merged_while_generating(ia3):
        assert not nbpeft.core.state(ia3).adapters["default"].merged
    assert isinstance(ia3, transformers.PreTrainedModel)
