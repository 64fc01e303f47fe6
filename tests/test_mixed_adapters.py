"""One adapter per row: a mixed batch in one pass equals running each row with its adapter alone."""

from __future__ import annotations

import pytest
import torch

import nbpeft
from nbpeft.core import ROW_HOOKS, adapter_layers
from nbpeft.training import lm_loss

from conftest import assert_same, char_tokenizer, snapshot, tiny_gpt2, tiny_llama, tokens


def strong(model: torch.nn.Module) -> torch.nn.Module:
    """Larger random updates (B and DoRA magnitudes), so that every adapter visibly changes the output."""
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.mul_(30)
            elif "lora_magnitude_vector" in key:
                param.mul_(1.5)
    return model


@pytest.fixture
def three() -> torch.nn.Module:
    """Tiny Llama with a DoRA (k_proj), a LoRA of rank 4 (q/v) and one of rank 2 on every linear layer."""
    model = tiny_llama()
    nbpeft.attach(model, "dora", name="d", r=2, init="random", targets=["k_proj"])
    nbpeft.attach(model, "lora", name="a", r=4, init="random")
    nbpeft.attach(model, "lora", name="b", r=2, init="random", targets="all-linear")
    return strong(model)


def alone(model: torch.nn.Module, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Logits of one row run with one adapter active (or none)."""
    with torch.no_grad():
        if name in (None, "__base__"):
            with nbpeft.disable_adapters(model):
                return model(ids).logits
        nbpeft.set_adapter(model, name)
        return model(ids).logits


def test_mixed_batch_equals_each_row_alone(three):
    ids = tokens(6, 7)
    names = ["a", "__base__", "b", "d", None, "a"]
    with torch.no_grad():
        mixed = three(ids, adapter_names=names).logits
    rows = [alone(three, ids[i:i + 1], n)[0] for i, n in enumerate(names)]
    for i, row in enumerate(rows):
        torch.testing.assert_close(mixed[i], row, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rows[0], rows[1], atol=1e-3) and not torch.allclose(rows[2], rows[1], atol=1e-3)
    assert not torch.allclose(rows[3], rows[1], atol=1e-3)
    assert all(layer.rows is None for _, layer in adapter_layers(three))  # the routing ends with the call


def test_the_context_manager_and_a_fan_in_fan_out_model():
    model = tiny_gpt2()
    nbpeft.attach(model, "lora", name="x", r=4, init="random")
    nbpeft.attach(model, "lora", name="y", r=4, init="random", targets=["c_attn", "c_fc"])
    strong(model)
    ids, names = tokens(3, 5), ["y", "x", "__base__"]
    with nbpeft.adapter_rows(model, names), torch.no_grad():
        mixed = model(ids).logits
        again = model(ids).logits  # the block holds for every call inside it
    torch.testing.assert_close(mixed, again)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, ids[i:i + 1], n)[0], rtol=1e-5, atol=1e-5)


def test_generate_answers_each_prompt_with_its_adapter(three):
    tok = char_tokenizer()
    prompts = ["Hi", "A longer question?", "Mid length", "Hello"]
    names = ["a", "__base__", "b", "d"]
    mixed = nbpeft.generate(three, tok, prompts, max_new_tokens=8, adapter_names=names)
    expected = []
    for prompt, name in zip(prompts, names):
        if name == "__base__":
            with nbpeft.disable_adapters(three):
                expected.append(nbpeft.generate(three, tok, prompt, max_new_tokens=8))
        else:
            nbpeft.set_adapter(three, name)
            expected.append(nbpeft.generate(three, tok, prompt, max_new_tokens=8))
    assert mixed == expected
    assert len(set(expected)) > 1
    # batches of two: each batch takes its slice of the names
    assert nbpeft.generate(three, tok, prompts, max_new_tokens=8, adapter_names=names, batch_size=2) == expected


@pytest.mark.parametrize("names, message", [
    ("a", "takes one adapter name per row"),
    (["a", "zz"], r"adapter_names\[1\]='zz' is not attached"),
    (["a", "b", "a"], "adapter_names= has 3 names for a batch of 2 rows"),
])
def test_bad_names_are_one_line_and_leave_no_routing(three, names, message):
    with pytest.raises(nbpeft.ConfigError, match=message) as err, torch.no_grad():
        three(tokens(2, 5), adapter_names=names)
    assert "\n" not in str(err.value)
    assert all(layer.rows is None for _, layer in adapter_layers(three))
    with torch.no_grad():
        three(tokens(2, 5))  # works as before


def test_training_mode_is_refused(three):
    three.train()
    with pytest.raises(nbpeft.ConfigError, match=r"adapter_names= is for inference; call model.eval\(\) first"):
        three(tokens(2, 5), adapter_names=["a", "b"])


def test_merged_adapters_are_refused(three):
    nbpeft.merge(three, "a")
    with pytest.raises(nbpeft.ConfigError, match="adapter 'a' is merged into the weights.*unmerge"):
        three(tokens(2, 5), adapter_names=["b", "b"])


def test_methods_that_cannot_route_rows_are_refused():
    model = tiny_llama()
    nbpeft.attach(model, "lora", name="a", r=4)
    nbpeft.attach(model, "prompt", name="p", num_virtual_tokens=3)
    nbpeft.attach(model, "ia3", name="i")
    before = snapshot(model)
    with pytest.raises(nbpeft.ConfigError, match="adapter_names= names the ia3 adapter 'i', which cannot run on some rows only"):
        with nbpeft.adapter_rows(model, ["a", "i"]):
            pass
    nbpeft.set_adapter(model, "p")  # a prompt active would change every row's sequence
    with pytest.raises(nbpeft.ConfigError, match="the active prompt adapter 'p' would act on every row"):
        model(tokens(2, 5), adapter_names=["a", None])
    nbpeft.set_adapter(model, "a")
    with nbpeft.adapter_rows(model, ["a", None]), torch.no_grad():
        model(tokens(2, 5))
    nbpeft.set_adapter(model, "i")
    assert_same(before, snapshot(model))


def test_nested_routing_is_refused(three):
    with nbpeft.adapter_rows(three, ["a", "b"]):
        with pytest.raises(nbpeft.ConfigError, match="already routed"):
            three(tokens(2, 5), adapter_names=["b", "a"])


def test_hooks_come_with_lora_and_go_with_it_and_leave_the_fast_loss_on():
    model = tiny_llama()
    nbpeft.attach(model, "prompt", name="p", num_virtual_tokens=2)
    assert not [h for h in model._forward_hooks.values() if h in ROW_HOOKS]
    nbpeft.attach(model, "lora", name="a")
    assert [h for h in model._forward_pre_hooks.values() if h in ROW_HOOKS]
    nbpeft.detach(model, "p")
    assert lm_loss.supports_fast_loss(model, {"input_ids": tokens(), "labels": tokens()})
    nbpeft.detach(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_generate_checks_the_names_before_answering(three):
    tok = char_tokenizer()
    with pytest.raises(nbpeft.ConfigError, match=r"generate\(\): adapter_names= needs one name per prompt \(2\)"):
        nbpeft.generate(three, tok, ["Hi", "Ho"], max_new_tokens=2, adapter_names=["a"])
    with pytest.raises(nbpeft.ConfigError, match=r"generate\(\): adapter_names\[2\]='zz' is not attached"):
        nbpeft.generate(three, tok, ["Hi", "Ho", "Ha"], max_new_tokens=2, adapter_names=["a", "b", "zz"], batch_size=1)
    assert all(layer.rows is None for _, layer in adapter_layers(three))
