"""packing=True: whole examples in rows of max_length, no attention or loss across their boundaries."""

from __future__ import annotations

import pytest
import torch

import nbpeft
from nbpeft.data import batches as data
from nbpeft.data.batches import IGNORE, Batches, collate, collate_packed, pack
from nbpeft.datasets import load_dataset
from nbpeft.training import attention, lm_loss

from conftest import examples, tiny_gpt2, tiny_llama
from families import FAMILIES, KIND, tiny_batch, tiny_model


@pytest.fixture
def attention_calls(monkeypatch):
    """The arguments of every attention.causal_attention call made during the test."""
    calls = []
    attend = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(a) or attend(*a))
    return calls


def test_pack_fills_rows_with_whole_examples_each_once():
    exs = examples()
    rows = pack(exs, 16)
    assert all(sum(len(e["input_ids"]) for e in row) <= 16 for row in rows)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in exs)
    assert len(rows) == 3  # 40 tokens in rows of 16: the fewest rows


def test_pack_fills_each_row_as_full_as_the_next_examples_allow_in_their_order():
    exs = examples((3, 4, 5, 6, 2))
    rows = pack(exs, 10)
    # first fit would leave [3, 4, 2], [5], [6]; the best fill of each row needs two
    assert [[len(e["input_ids"]) for e in row] for row in rows] == [[3, 5, 2], [4, 6]]
    many = examples([1 + (7 * i) % 23 for i in range(2000)], seed=1)
    rows = pack(many, 64)
    placed = [id(e) for row in rows for e in row]
    assert sorted(placed) == sorted(id(e) for e in many)
    assert all(sum(len(e["input_ids"]) for e in row) == 64 for row in rows[:-3])  # full rows, but for the last few
    order = {id(e): i for i, e in enumerate(many)}
    starts = [order[id(row[0])] for row in rows]
    assert starts == sorted(starts)  # each row starts with the earliest example not yet placed
    assert all(order[id(e)] - order[id(row[0])] <= data.PACK_LOOKAHEAD + len(rows) for row in rows for e in row)


def test_positions_restart_per_example_and_no_example_predicts_the_next_ones_first_token():
    exs = examples((3, 4))
    batch = collate_packed([exs], pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["input_ids"][0].tolist() == exs[0]["input_ids"] + exs[1]["input_ids"]
    assert batch["labels"][0, 3].item() == IGNORE
    assert batch["labels"][0, 4:].tolist() == exs[1]["labels"][1:]
    padded = collate_packed([exs[:1], exs[1:]], pad_id=0)
    assert padded["position_ids"][0].tolist() == [0, 1, 2, 0]  # padding is a sequence of its own
    assert padded["labels"][0, 3].item() == IGNORE


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packed_loss_equals_the_padded_loss_on_the_same_examples(make):
    model = make()
    exs = examples()
    padded = collate(exs, pad_id=0)
    packed = collate_packed(pack(exs, 16), pad_id=0)
    want = model(**padded).loss
    assert torch.allclose(lm_loss.model_loss(model, padded, {}), want, atol=1e-6)
    assert torch.allclose(lm_loss.model_loss(model, packed, {}), want, atol=1e-6)  # the blockwise path
    assert torch.allclose(model(**packed, use_cache=False).loss, want, atol=1e-6)  # the model's own
    # without restarting positions, examples would see each other and the loss would differ
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert not torch.allclose(lm_loss.model_loss(model, leaky, {}), want, atol=1e-3)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packed_rows_attend_example_by_example_with_the_masked_loss_and_gradients(make, monkeypatch):
    model = make()
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="random")
    model.eval()
    packed = collate_packed(pack(examples(), 16), pad_id=0)
    segmented = []
    find = attention._segments
    monkeypatch.setattr(attention, "_segments", lambda mask: segmented.append(find(mask)) or segmented[-1])
    params = [p for p in model.parameters() if p.requires_grad]
    ours = lm_loss.model_loss(model, packed, {})
    assert segmented and all(runs is not None for runs in segmented)  # the per-example path ran
    assert model.config._attn_implementation == "sdpa"  # and was put back
    masked = model(**packed, use_cache=False).loss  # the model's own: SDPA with the block-diagonal mask
    assert ours.item() == pytest.approx(masked.item(), abs=1e-6)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(masked, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_by_matmul_equals_sdpa_with_its_gradients(dtype, padded):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, 37, 16, dtype=dtype, requires_grad=True) for heads in (6, 2, 2))
    grad = torch.randn(2, 6, 37, 16, dtype=dtype)
    mask = None
    if padded:  # the second row's last 9 keys are padding, as transformers masks a right-padded batch
        mask = torch.ones(37, 37, dtype=torch.bool).tril().expand(2, 1, 37, 37).clone()
        mask[1, :, :, 28:] = False
        mask[1, :, 28:, 0] = True
        grad[1, :, 28:] = 0  # padding's outputs go nowhere
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                            enable_gqa=True)
    got = attention.causal_attention(q, k, v, 16 ** -0.5, mask=mask)
    assert got.dtype == dtype
    real = (slice(None), slice(None), slice(0, 28 if padded else 37))
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 2e-2}
    torch.testing.assert_close(got[real], want[real], **tol)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, **({"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}))
    # under autocast, fp32 inputs are computed as SDPA computes them there: in bf16, with a bf16 result
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=mask is None,
                                                                enable_gqa=True)
    got = attention.causal_attention(q32, k32, v32, 16 ** -0.5, torch.bfloat16, mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_keeping_or_recomputing_the_probabilities_gives_the_same_bits(dtype, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, 40, 8, dtype=dtype, requires_grad=True) for heads in (4, 2, 2))
    grad = torch.randn(2, 4, 40, 8, dtype=dtype)
    results = {}
    for keep in (8, 0):  # 40 tokens <= 8 x head_dim 8: kept for backward; under 0: computed again in backward
        monkeypatch.setattr(attention, "KEEP_PROBS", keep)
        out = attention.causal_attention(q, k, v, 8 ** -0.5, dtype)
        results[keep] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for kept, recomputed in zip(results[8], results[0]):
        assert torch.equal(kept, recomputed)


def test_under_bf16_autocast_packed_rows_attend_by_matmul_with_the_masked_loss_and_gradients(attention_calls):
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="random")
    model.eval()
    packed = collate_packed(pack(examples(), 16), pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss.model_loss(model, packed, {})
        masked = model(**packed, use_cache=False).loss  # SDPA (its bf16 kernel) with the block-diagonal mask
    rows = pack(examples(), 16)
    width = packed["input_ids"].shape[1]
    runs = [len(e["input_ids"]) for row in rows for e in row]
    runs += [width - sum(runs_of) for runs_of in ([len(e["input_ids"]) for e in row] for row in rows) if sum(runs_of) < width]
    groups = {-(-n // attention.BUCKET) for n in runs}  # examples of similar length attend in one call
    assert len(attention_calls) == model.config.num_hidden_layers * len(groups) < model.config.num_hidden_layers * len(runs)
    assert ours.item() == pytest.approx(masked.item(), rel=1e-2)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(masked, params)):
        assert (a - b).norm() <= 0.05 * b.norm()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("padded", [False, True])
def test_under_bf16_autocast_attention_by_matmul_gives_sdpas_loss_and_gradients(make, padded, attention_calls):
    model = make()
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="random")
    model.eval()
    batch = collate(examples(), 0, 1, 16) if padded else {"input_ids": torch.randint(1, 128, (3, 12))}
    batch.setdefault("labels", batch["input_ids"].clone())
    assert padded == ("attention_mask" in batch and not bool(batch["attention_mask"].all()))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss.model_loss(model, batch, {})
        own = model(**batch, use_cache=False).loss  # SDPA's bf16 kernel
    assert len(attention_calls) == model.config.num_hidden_layers
    assert all((args[5] is not None) == padded for args in attention_calls)  # the padding mask, else plain causal
    assert model.config._attn_implementation == "sdpa"  # put back
    assert ours.item() == pytest.approx(own.item(), rel=1e-2)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(own, params)):
        assert (a - b).norm() <= 0.05 * b.norm()


def test_packed_training_runs_and_lowers_the_loss(llama):
    class Chars:
        eos_token, pad_token_id, chat_template = "\x03", 0, None

        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": [1 + ord(c) % 120 for c in text]}

    nbpeft.attach(llama, "lora", r=8, targets="all-linear")
    data = [{"prompt": f"q{i}", "response": "the cat sat"} for i in range(12)]
    batches = Batches(data, Chars(), 2, 48, 0, packing=True)
    # 12 examples of 14-15 tokens, three to a row of 48: 4 rows, 2 batches (6 without packing)
    assert batches.per_epoch == 2 and Batches(data, Chars(), 2, 48, 0).per_epoch == 6
    result = nbpeft.train(llama, data, tokenizer=Chars(), steps=15, batch_size=2, max_length=48, lr=3e-2,
                          packing=True, live=False)
    assert result.losses[-1] < result.losses[0]


def test_packed_training_with_gradient_checkpointing_gives_the_same_losses():
    # checkpointing recomputes each layer in backward, after the loss's own attention is put back
    data = [{"prompt": f"q{i}", "response": "the cat sat " * (1 + i % 3)} for i in range(12)]

    class Chars:
        eos_token, pad_token_id, chat_template = "\x03", 0, None

        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": [1 + ord(c) % 120 for c in text]}

    losses = []
    for checkpointing in (False, True):
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4, init="random")
        result = nbpeft.train(model, data, tokenizer=Chars(), steps=3, batch_size=2, max_length=64, lr=1e-2,
                              packing=True, gradient_checkpointing=checkpointing, live=False)
        losses.append(result.losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_packing_is_refused_where_it_cannot_apply():
    rows = [{"text": "good", "label": 1}]
    with pytest.raises(nbpeft.ConfigError, match="packing=True applies to text, prompt-response and conversations"):
        Batches(rows, object(), 2, 16, 0, packing=True)
    ready = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    with pytest.raises(nbpeft.ConfigError, match="packing=True needs examples, not ready batches"):
        Batches(ready, None, 2, 16, 0, packing=True)
    with pytest.raises(nbpeft.ConfigError, match="packing='yes' must be True or False"):
        Batches(["a"], None, 2, 16, 0, packing="yes")


@pytest.mark.slow
def test_on_smollm2_the_packed_loss_equals_the_unpacked_loss(smol):
    model, tokenizer = smol
    data = load_dataset("radio_chat")[:8]
    padded = Batches(data, tokenizer, 8, 256, 0)
    packed = Batches(data, tokenizer, 8, 256, 0, packing=True)
    padded_batch, packed_batch = next(padded.once()), next(packed.once())
    assert packed_batch["input_ids"].shape[0] < padded_batch["input_ids"].shape[0]
    assert int((packed_batch["labels"] != IGNORE).sum()) == int((padded_batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        want = lm_loss.model_loss(model, padded_batch, {"use_cache": False})
        got = lm_loss.model_loss(model, packed_batch, {"use_cache": False})
        own = model(**packed_batch, use_cache=False).loss
    assert abs(got.item() - want.item()) < 1e-4 and abs(own.item() - want.item()) < 1e-4


# Families whose attention takes the matmul path under bf16 on CPU (without dropout, as here in eval
# mode); the others keep SDPA (soft-capping, their own attention code, ...). Either way the training
# loss is the model's own.
BY_MATMUL = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "gpt2", "gemma3_text", "opt"}
# Falcon's attention goes through transformers' attention interface in newer releases (5.25: the matmul
# path), through its own code in older ones (SDPA): either is right as long as the loss is the model's.
EITHER = {"falcon"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if KIND[f] == "causal-lm"])
def test_every_decoder_family_keeps_its_own_loss_under_bf16_with_a_padded_row(family, attention_calls):
    model = tiny_model(family)
    batch = dict(tiny_batch(family))
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    batch["labels"] = batch["input_ids"].clone()
    batch["attention_mask"][0, -3:] = 0
    batch["labels"][0, -3:] = IGNORE
    nbpeft.attach(model, "lora", r=4, init="random")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_loss.model_loss(model, batch, {"use_cache": False})
        own = model(**batch, use_cache=False).loss
    layers = model.config.num_hidden_layers
    expected = {layers} if family in BY_MATMUL else {0, layers} if family in EITHER else {0}
    assert len(attention_calls) in expected
    assert ours.item() == pytest.approx(own.item(), rel=5e-3)
