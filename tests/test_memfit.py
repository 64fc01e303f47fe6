"""Memory that fits itself: batch_size="auto", a step retried smaller after running out of memory, release()."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch

import nbpeft
from nbpeft.training import memory
from nbpeft.training.display import banner_text
from nbpeft.training.events import Begin, Listener, Note

from conftest import char_tokenizer, tiny_llama

# 16 examples of different lengths: two steps an epoch at an effective batch of 8
DATA = [f"example {i}: " + "ab" * (i % 5 + 1) for i in range(16)]


class Recorder(Listener):
    def __init__(self) -> None:
        self.begin: Begin | None = None
        self.notes: list[str] = []

    def on_begin(self, begin: Begin) -> None:
        self.begin = begin

    def on_note(self, note: Note) -> None:
        self.notes.append(note.message)


def adapted(seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    nbpeft.attach(model, "lora", r=4, targets=["q_proj", "v_proj"])
    return model


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(model: torch.nn.Module, listener: Listener | None = None, **options) -> nbpeft.TrainResult:
    options = {"steps": 3, "lr": 1e-2, "max_length": 48, "device": "cpu", "precision": "fp32", "compile": False,
               "batching": "padded", **options}  # the same layout at every micro-batch size: losses compare exactly
    return nbpeft.train(model, DATA, tokenizer=char_tokenizer(chat=False), live=listener or False, **options)


class RunsOutAbove:
    """Makes a module raise CUDA's out-of-memory error for a batch above ``rows`` rows, in forward or in backward.

    ``after`` calls pass first, so the error can come in the middle of a run.
    """

    def __init__(self, module: torch.nn.Module, rows: int, backward: bool = False, after: int = 0) -> None:
        self.rows, self.after, self.calls, self.raised = rows, after, 0, 0
        if backward:
            self.handle = module.register_full_backward_pre_hook(lambda _, grads: self.check(grads[0]))
        else:
            self.handle = module.register_forward_pre_hook(
                lambda _, args, kwargs: self.check(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)

    def check(self, tensor: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > self.after and tensor.shape[0] > self.rows:
            self.raised += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (a test: {tensor.shape[0]} rows > {self.rows})")


# out-of-memory in the middle of a run ---------------------------------------------------

@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("backward, after", [(False, 0), (True, 1)], ids=["forward-first-step", "backward-mid-run"])
def test_a_step_that_runs_out_is_retried_with_half_the_micro_batch(backward, after):
    """The run completes with the losses and adapter of a run that used the smaller micro-batch from the start."""
    model, listener = adapted(), Recorder()
    fault = RunsOutAbove(model.model.layers[0], rows=4, backward=backward, after=after)
    result = run(model, listener, batch_size=8)
    assert fault.raised == 1 and result.steps == 3 and result.stopped is None
    step = 1 if not backward else 2  # backward: the first step's one pass went through, the second's ran out
    assert listener.notes == [f"out of memory at micro-batch 8 in step {step}; retrying the step with micro-batch 4 "
                              "× 2 accumulated (the same effective batch 8)"]
    assert (result.batch_size, result.grad_accum) == (4, 2)

    smaller = adapted()
    expected = run(smaller, batch_size=4, grad_accum=2)
    # mid-run, the first step ran whole: the same sum in another order, float rounding apart
    assert result.losses == pytest.approx(expected.losses, rel=1e-4)
    assert [row["tokens"] for row in result.history] == [row["tokens"] for row in expected.history]
    for name, weight in adapter_weights(smaller).items():
        torch.testing.assert_close(adapter_weights(model)[name], weight, rtol=1e-4, atol=1e-5)


def test_ready_made_batches_are_split_too():
    """A DataLoader's batches keep their size as the effective batch; the step is done in halves of them."""
    torch.manual_seed(0)
    loader = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (2, 4, 12))]
    model, listener = adapted(), Recorder()
    RunsOutAbove(model.model.layers[0], rows=2)
    result = nbpeft.train(model, loader, steps=2, lr=1e-2, precision="fp32", compile=False, live=listener)
    assert listener.notes == ["out of memory at micro-batch 4 in step 1; retrying the step with micro-batch 2 "
                              "× 2 accumulated (the same effective batch 4)"]
    halves = [{k: v[rows] for k, v in batch.items()} for batch in loader for rows in (slice(0, 2), slice(2, 4))]
    expected = nbpeft.train(adapted(), halves, steps=2, grad_accum=2, lr=1e-2, precision="fp32", compile=False, live=False)
    assert result.losses == pytest.approx(expected.losses, rel=1e-5)


def test_running_out_at_micro_batch_one_says_what_to_do_and_keeps_the_adapter():
    model, listener = adapted(), Recorder()
    before = adapter_weights(model)
    RunsOutAbove(model.model.layers[0], rows=0)
    with pytest.raises(nbpeft.ConfigError) as err:
        run(model, listener, batch_size=4)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train(): out of memory at step 1 even with micro-batch 1; try a lower max_length= (now 48), "
                              "gradient_checkpointing=True")
    assert "nbpeft.release(model)" in message
    assert [note.split(";")[0] for note in listener.notes] == [
        "out of memory at micro-batch 4 in step 1", "out of memory at micro-batch 2 in step 1"]
    assert err.value.__context__ is None  # the failed tries' tensors are not kept alive by the error
    for name, weight in adapter_weights(model).items():
        assert torch.equal(weight, before[name])


def test_other_errors_are_not_retried():
    model, listener = adapted(), Recorder()

    def broken(model, batch):
        raise RuntimeError("a bug in the loss")

    with pytest.raises(RuntimeError, match="a bug in the loss"):
        run(model, listener, batch_size=8, loss_fn=broken)
    assert listener.notes == []


def test_split_batch_matches_batches_formed_from_the_smaller_groups():
    from nbpeft.data.batches import PAD_MULTIPLE, collate

    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (3, 40, 5, 7)]
    whole = collate(examples, 0, PAD_MULTIPLE, 64)
    parts = memory.split_batch(whole, 2)
    assert [share for _, share in parts] == [0.5, 0.5]
    for (part, _), group in zip(parts, (examples[:2], examples[2:])):
        expected = collate(group, 0, PAD_MULTIPLE, 64)
        assert part.keys() == expected.keys()
        for key in expected:
            assert torch.equal(part[key], expected[key]), key
    assert memory.split_batch(whole, 4) == [(whole, 1.0)]
    odd = memory.split_batch(collate(examples[:3], 0, PAD_MULTIPLE, 64), 2)
    assert [share for _, share in odd] == [2 / 3, 1 / 3]


def test_out_of_memory_errors_are_recognised():
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"))
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))


# batch_size="auto" ---------------------------------------------------------------------

def per_example_bytes(model: torch.nn.Module, rows: int = 1) -> int:
    """What the probe measures, measured here on the same widest example."""
    from nbpeft.data.batches import Batches

    batches = Batches(DATA, char_tokenizer(chat=False), 8, 48, 0)
    return memory.saved_activation_bytes(model, memory.probe_batch(batches, rows),
                                         lambda batch: model(**batch).loss, torch.autocast("cpu", enabled=False))


def test_saved_activations_grow_with_the_examples_and_leave_out_the_weights():
    """Twice the rows, twice the bytes: the weights (a constant, as large as one row's here) are not in the count."""
    model = adapted()
    one, two = per_example_bytes(model, 1), per_example_bytes(model, 2)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert one > weights / 4
    assert 1.9 < two / one < 2.1


@pytest.mark.parametrize("room, micro", [(10**6, 8), (3, 2), (1.5, 1)])
def test_auto_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch(monkeypatch, room, micro):
    """Free RAM for ``room`` examples (by the probe's own measure): the largest divisor of 8 at most that."""
    model, listener = adapted(), Recorder()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_example = per_example_bytes(model) * memory.ACTIVATION_OVERHEAD
    monkeypatch.setattr(memory, "free_ram", lambda: int((room * per_example + 3 * trainable) / memory.FREE_SHARE))
    result = run(model, listener, batch_size="auto", steps=2)
    begin = listener.begin
    assert (begin.batch_size, begin.grad_accum, begin.effective_batch) == (micro, 8 // micro, 8)
    assert (result.batch_size, result.grad_accum) == (micro, 8 // micro)
    banner = banner_text(begin)
    assert f"batch auto: {micro} × {8 // micro} accumulated = 8 (" in banner and " probed in " in banner
    assert "\n" not in banner
    given = run(adapted(), batch_size=micro, grad_accum=8 // micro, steps=2)
    assert result.losses == pytest.approx(given.losses, rel=1e-5)


def test_auto_leaves_the_random_stream_alone_and_evaluates_in_micro_batches(monkeypatch):
    """With dropout, the probe's forward must not shift the run's random numbers; eval batches follow the micro-batch."""
    def with_dropout():
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4, targets=["q_proj", "v_proj"], dropout=0.2)
        return model

    per_example = per_example_bytes(adapted()) * memory.ACTIVATION_OVERHEAD
    monkeypatch.setattr(memory, "free_ram", lambda: int(3.2 * per_example / memory.FREE_SHARE))
    listener = Recorder()
    held_out = DATA[:6]
    result = run(with_dropout(), listener, batch_size="auto", steps=2, eval_data=held_out, eval_every=1)
    assert listener.begin.batch_size == 2
    given = run(with_dropout(), batch_size=2, grad_accum=4, steps=2, eval_data=held_out, eval_every=1)
    assert result.losses == pytest.approx(given.losses, rel=1e-5)
    assert [loss for _, loss in result.eval_losses] == pytest.approx([loss for _, loss in given.eval_losses], rel=1e-5)


def test_auto_takes_effective_batch():
    listener = Recorder()
    run(adapted(), listener, batch_size="auto", effective_batch=4, steps=1)
    assert listener.begin.effective_batch == 4 and listener.begin.batch_reason.startswith("batch_size='auto'")


@pytest.mark.parametrize("options, message", [
    ({"batch_size": "auto", "grad_accum": 2},
     "train(): batch_size='auto' chooses the accumulation itself; give the effective batch instead, e.g. effective_batch=16"),
    ({"batch_size": 4, "effective_batch": 16},
     "train(): effective_batch= goes with batch_size='auto'; with batch_size=4 the effective batch is batch_size × grad_accum"),
    ({"batch_size": "4"}, "train(): batch_size='4' must be a positive integer or 'auto'"),
    ({"batch_size": "auto", "effective_batch": 0}, "train(): effective_batch=0 must be a positive integer"),
])
def test_auto_errors(options, message):
    with pytest.raises(nbpeft.ConfigError) as err:
        run(adapted(), **options)
    assert str(err.value) == message


def test_auto_refuses_ready_made_batches():
    loader = [{"input_ids": torch.ones(2, 6, dtype=torch.long), "labels": torch.ones(2, 6, dtype=torch.long)}]
    with pytest.raises(nbpeft.ConfigError, match="batch_size='auto' needs examples with a length"):
        nbpeft.train(adapted(), loader, batch_size="auto", steps=1, live=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_backs_off_until_a_step_runs():
    model, listener = adapted(), Recorder()
    fault = RunsOutAbove(model.model.layers[0], rows=2)
    result = run(model, listener, batch_size="auto", device="cuda", steps=2, precision="fp32")
    assert listener.begin.batch_size == 2 and fault.raised >= 2  # 8 and 4 ran out in the probe
    assert listener.notes == [] and result.steps == 2


# release -------------------------------------------------------------------------------

def test_release_drops_what_a_failed_run_held(monkeypatch):
    """A run that fails mid-step leaves its optimizer and gradients behind the last error; release frees them."""
    optimizers = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(weakref.ref(self))

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    calls = []

    def fails_in_step_two(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in step two")
        return model(**batch).loss

    model = adapted()
    try:
        run(model, batch_size=8, loss_fn=fails_in_step_two)
    except RuntimeError:
        sys.last_type, sys.last_value, sys.last_traceback = sys.exc_info()  # as IPython keeps the last error
    monkeypatch.setattr(sys, "last_value", sys.last_value)  # undone after the test
    trained = next(p for p in model.parameters() if p.requires_grad)
    trained.grad = torch.ones_like(trained)  # left over from a step
    assert optimizers[0]() is not None  # the failed run's optimizer lives on in the traceback
    released = nbpeft.release(model)
    assert optimizers[0]() is None
    assert all(p.grad is None for p in model.parameters())
    assert sys.last_traceback is not None  # the error can still be shown
    text = repr(released)
    assert text.startswith("released: ") and "\n" not in text
    assert released.before > 0 and released.after > 0
    assert any(p.requires_grad for p in model.parameters()) and list(nbpeft.summary(model).adapters)
    del sys.last_type, sys.last_traceback
