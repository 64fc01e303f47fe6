"""The fast training paths give the plain path's loss and gradients (nbpeft.fast)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import nbpeft
from nbpeft.layers import IGNORE
from nbpeft.training import compiling, lm_loss, memory

from conftest import tiny_bert, tiny_gpt2, tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_model(make=tiny_llama, targets=("q_proj", "v_proj")) -> torch.nn.Module:
    """A tiny model with a LoRA whose B is random, so every adapter gradient is non-zero."""
    model = make()
    nbpeft.attach(model, "lora", r=4, targets=list(targets), init="random")
    return model.eval()  # eval: no dropout, so both paths see the same function


def masked_batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    """Three rows: a masked prompt, a full row, and right padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[0, :5] = IGNORE
    attention_mask[2, 7:] = 0
    labels[2, 7:] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    return loss.item(), list(torch.autograd.grad(loss, trainable(model)))


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_linear_cross_entropy_matches_cross_entropy_and_its_gradients(rows):
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (11,))
    ours = lm_loss.linear_cross_entropy(hidden, weight, bias, targets, rows=rows)
    plain = F.cross_entropy(hidden @ weight.T + bias, targets)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(3.0 * ours, (hidden, weight, bias)),
                    torch.autograd.grad(3.0 * plain, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_passes_gradcheck():
    torch.manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,))
    assert torch.autograd.gradcheck(lambda h, w: lm_loss.linear_cross_entropy(h, w, None, targets, rows=2), (hidden, weight))


def test_frozen_head_gets_no_gradient_and_no_weight_work():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    loss = lm_loss.linear_cross_entropy(hidden, weight, None, torch.randint(0, 20, (6,)), rows=4)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("make,targets", [(tiny_llama, ("q_proj", "v_proj")), (tiny_gpt2, ("c_attn",))])
def test_causal_lm_loss_equals_the_models_loss_and_gradients(make, targets):
    model = lora_model(make, targets)
    batch = masked_batch()
    plain_loss, plain_grads = loss_and_grads(model, model(**batch).loss)
    fast_loss, fast_grads = loss_and_grads(model, lm_loss.causal_lm_loss(model, batch, rows=4))
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_skips_positions_without_a_label():
    model = lora_model()
    batch = masked_batch()
    only_last = batch["labels"].clone()
    only_last[:, :-1] = IGNORE  # one labelled token per row: three rows of logits instead of 27
    batch["labels"] = only_last
    assert lm_loss.causal_lm_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def test_unsupported_models_and_batches_fall_back():
    batch = masked_batch()
    prompt_hooked = lora_model()
    prompt_hooked.register_forward_pre_hook(lambda module, args: None)  # e.g. prompt tuning's model-level hook
    head_adapted = tiny_llama()
    nbpeft.attach(head_adapted, "lora", r=2, targets=["lm_head"])
    classifier = tiny_bert()
    for model in (prompt_hooked, head_adapted, classifier):
        assert lm_loss.causal_lm_loss(model, batch) is None
    one_label_per_row = {"input_ids": batch["input_ids"], "labels": torch.tensor([1, 0, 1])}
    assert lm_loss.causal_lm_loss(lora_model(), one_label_per_row) is None
    # the fallback is the model's own loss
    torch.testing.assert_close(lm_loss.model_loss(prompt_hooked, batch, {}), prompt_hooked(**batch).loss)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 1e-3)])  # bf16: rounding of the gradients
def test_train_default_path_follows_the_plain_loss_curve(precision, tolerance):
    """loss_fn= forces the model's own loss: both runs must give the same history."""
    batches = [masked_batch() for _ in range(4)]
    runs = []
    for loss_fn in (None, lambda model, batch: model(**batch).loss):
        model = lora_model()
        runs.append(nbpeft.train(model, batches, steps=4, lr=1e-2, live=False, loss_fn=loss_fn, compile=False,
                                 precision=precision).losses)
    assert runs[0] == pytest.approx(runs[1], rel=tolerance)


def test_repeated_blocks_are_the_decoder_layers():
    model = tiny_llama()
    assert compiling.repeated_blocks(model) == list(model.model.layers)


def test_block_rows_are_even_and_stay_under_the_budget():
    cpu = torch.device("cpu")
    # smollm2: 511 labelled rows x 49,152 words -> 4 even blocks of 128 rows (24 MiB of fp32 each)
    assert lm_loss.block_rows(511, 49152, cpu) == 128
    assert lm_loss.block_rows(511, 49152, cpu) * 49152 * 4 < 32 << 20
    assert lm_loss.block_rows(7, 100, cpu) == 7  # one block when it fits
    assert lm_loss.block_rows(0, 100, cpu) == 1
    assert lm_loss.block_rows(3, 10**9, cpu) == 1  # a vocabulary over the budget: one row at a time


def test_linear_cross_entropy_is_stable_for_extreme_logits():
    hidden = torch.tensor([[50.0, 0.0], [-50.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([1, 0])  # each target's logit is 400 below the row's best
    ours = lm_loss.linear_cross_entropy(hidden, weight, None, targets)
    expected = F.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(ours, expected)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(400.0)
    ours.backward()
    assert torch.isfinite(hidden.grad).all()


def test_compile_pays_off_only_for_long_enough_runs():
    cpu = torch.device("cpu")
    assert not compiling.compile_pays_off(cpu, step_seconds=1.0, steps_left=10)
    assert compiling.compile_pays_off(cpu, step_seconds=1.0, steps_left=10_000)
    # slower steps pay the compile back sooner
    assert compiling.compile_pays_off(cpu, step_seconds=30.0, steps_left=100)
    assert not compiling.compile_pays_off(torch.device("meta"), step_seconds=30.0, steps_left=10**6)


def test_compile_auto_decides_after_two_timed_steps(monkeypatch):
    """compile=None times two eager steps, then asks compile_pays_off with the faster one."""
    asked, compiled = [], []
    monkeypatch.setattr(compiling, "can_compile", lambda device: True)
    monkeypatch.setattr(compiling, "compile_pays_off", lambda device, seconds, left, slowness=1.0: asked.append((seconds, left)) or True)
    monkeypatch.setattr(compiling, "compile_blocks", lambda model: compiled.append(len(asked)) or [])
    model = lora_model()
    events = []
    result = nbpeft.train(model, [masked_batch()], steps=5, lr=1e-3,
                          live=lambda event, payload: events.append((event, len(compiled), payload)))
    notes = [(count, payload.message) for event, count, payload in events if event == "note"]
    assert len(notes) == 1 and notes[0][0] == 0 and "compiling" in notes[0][1]  # said before compiling
    assert [e for e, _, _ in events] == ["begin", "step", "step", "note", "step", "step", "step", "end"]
    assert len(asked) == 1 and asked[0][1] == 3
    assert asked[0][0] == min(row["step_time_s"] for row in result.history[:2])
    assert compiled == [1]  # compiled once, after the question
    asked.clear(), compiled.clear()
    nbpeft.train(model, [masked_batch()], steps=5, lr=1e-3, live=False, compile=False)
    assert asked == [] and compiled == []


def test_compile_auto_weighs_the_compile_by_how_slow_the_machine_is_now():
    """A busy or slow machine makes the steps and the compile slower alike: the decision stays the same."""
    cpu = torch.device("cpu")
    for steps_left, pays in ((14, False), (10_000, True)):
        assert {compiling.compile_pays_off(cpu, 2.0 * slow, steps_left, slowness=slow) for slow in (1, 4, 25)} == {pays}
    # without the probe's scaling, the 25x slower steps would have looked worth compiling a 14-step run for
    assert compiling.compile_pays_off(cpu, 2.0 * 25, 14)
    assert 0 < compiling.speed_probe() < 60


def test_compile_auto_passes_the_probed_slowness(monkeypatch):
    asked = []
    monkeypatch.setattr(compiling, "can_compile", lambda device: True)
    monkeypatch.setattr(compiling, "speed_probe", lambda: compiling.PROBE_SECONDS * 6)
    monkeypatch.setattr(compiling, "compile_pays_off", lambda device, seconds, left, slowness: asked.append(slowness))
    nbpeft.train(lora_model(), [masked_batch()], steps=4, lr=1e-3, live=False)
    assert asked == [pytest.approx(6.0)]


def _eager_backend_compile(monkeypatch) -> None:
    """Blocks compiled by dynamo alone (its guards and recompiles as with inductor, no C++ build): fast."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: original(self, backend="eager"))


def test_many_compiled_runs_in_one_process_each_compile_and_leave_no_cache_behind(monkeypatch):
    """One kernel training adapter after adapter: each run compiles afresh, none runs into dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    _eager_backend_compile(monkeypatch)
    model, batch = tiny_llama(), masked_batch()
    before = compiling.cache_snapshot()
    plan = [("lora", {"r": 4}), ("ia3", {}), ("adapter", {"bottleneck": 8}), ("dora", {"r": 4})] * 3
    for method, options in plan:
        nbpeft.attach(model, method, **options)
        graphs = counters["stats"]["unique_graphs"]
        events = []
        nbpeft.train(model, [batch], steps=2, lr=1e-3, compile=True, live=lambda event, payload, events=events: events.append(payload))
        nbpeft.detach(model)
        assert counters["stats"]["unique_graphs"] > graphs, (method, "ran eagerly: not compiled")
        assert compiling.new_cache_entries(before) == {}, method  # the run's graphs, guards and adapters let go
        assert not [e for e in events if "recompiled" in str(getattr(e, "message", ""))]
        assert all(block._compiled_call_impl is None for block in compiling.repeated_blocks(model))


def test_a_block_that_keeps_recompiling_goes_back_to_eager_steps_with_a_note(monkeypatch):
    _eager_backend_compile(monkeypatch)
    monkeypatch.setattr(compiling, "recompile_limit", lambda: 2)  # one entry left at the first compiled step
    model = lora_model()
    events = []
    result = nbpeft.train(model, [masked_batch()], steps=3, lr=1e-3, compile=True,
                          live=lambda event, payload: events.append((event, payload)))
    notes = [payload.message for event, payload in events if event == "note"]
    assert len(notes) == 1 and "eager steps from here" in notes[0], notes
    assert [event for event, _ in events].index("note") == 2  # after the first step
    assert result.steps == 3 and all(block._compiled_call_impl is None for block in compiling.repeated_blocks(model))


_ALLOCATOR_PROBE = """
import json, resource, sys
import torch
from nbpeft.training import compiling, lm_loss, memory

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

def step():  # one step's worth of activations: 40 x 3 MiB, all freed at the end
    held = [torch.ones(3 << 18) for _ in range(40)]
    del held

undo = memory.steady_allocator(torch.device("cpu")) if sys.argv[1] == "on" else (lambda: None)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss_mib()
undo()
print(json.dumps({"faults": faults, "held_mib": held, "after_mib": rss_mib()}))
"""


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's allocator only")
def test_steady_allocator_reuses_pages_between_steps_and_gives_them_back_after():
    """In a fresh process each (page faults count every thread of a process)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    def probe(mode: str) -> dict:
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE, mode], capture_output=True, text=True,
                              cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    default, steady = probe("off"), probe("on")
    assert default["faults"] > 10_000  # glibc's default: fresh pages again (31,000 faults in 3 steps here)
    assert steady["faults"] < default["faults"] / 10  # 768 here
    assert steady["after_mib"] < steady["held_mib"] - 60  # the undo handed the kept 120 MiB back


def test_compile_auto_stays_off_for_short_runs_and_blocks_run_eagerly_after():
    model = lora_model()
    nbpeft.train(model, [masked_batch()], steps=2, lr=1e-3, live=False)
    assert all(block._compiled_call_impl is None for block in compiling.repeated_blocks(model))


@pytest.mark.skipif(not compiling.can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler")
def test_compiled_training_matches_eager_training():
    batches = [masked_batch() for _ in range(2)]
    runs = []
    for compile in (False, True):
        model = lora_model()
        runs.append(nbpeft.train(model, batches, steps=2, lr=1e-2, live=False, compile=compile).losses)
        assert all(block._compiled_call_impl is None for block in compiling.repeated_blocks(model))
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


@cuda
def test_causal_lm_loss_under_bf16_autocast_on_gpu():
    model = lora_model().cuda()
    batch = {k: v.cuda() for k, v in masked_batch().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(**batch).loss.float()
        ours = lm_loss.causal_lm_loss(model, batch)
    assert ours.item() == pytest.approx(plain.item(), rel=2e-2)
    ours.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable(model))


def test_a_frozen_head_is_cast_once_per_run_and_again_when_it_changes():
    weight, hidden = torch.randn(50, 8), torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    undo = lm_loss.frozen_head_casts()
    try:
        first = lm_loss._head_weight(weight, torch.bfloat16)
        assert lm_loss._head_weight(weight, torch.bfloat16) is first
        with torch.autocast("cpu", dtype=torch.bfloat16):
            held = lm_loss.linear_cross_entropy(hidden, weight, None, targets)
        weight.mul_(2)  # a weight changed between steps is cast again
        again = lm_loss._head_weight(weight, torch.bfloat16)
        assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    finally:
        undo()
    assert lm_loss._head_weight(weight, torch.bfloat16) is not lm_loss._head_weight(weight, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lm_loss.linear_cross_entropy(hidden, weight / 2, None, targets)
    assert torch.equal(held, plain)
