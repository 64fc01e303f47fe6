"""Training again and again in one kernel: nothing left behind (hooks, memory, optimizer state, gradients)."""

from __future__ import annotations

import gc
import sys
import weakref

import torch

import nbpeft
from nbpeft.training import memory
from nbpeft.training.events import Listener, Step

from conftest import assert_same, char_tokenizer, snapshot, tiny_llama

DATA = [f"example {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3) for i in range(12)]


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks (and backward hooks) on every module, plus the global ones every module runs."""
    per_module = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     + len(m._backward_pre_hooks) for m in model.modules())
    glob = torch.nn.modules.module
    return per_module + sum(len(hooks) for hooks in (glob._global_forward_hooks, glob._global_forward_pre_hooks,
                                                     glob._global_backward_hooks, glob._global_backward_pre_hooks))


def live_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers still alive that hold one of ``model``'s parameters (other tests' may be alive too)."""
    ours = {id(p) for p in model.parameters()}
    return [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)
            and any(id(p) in ours for group in o.param_groups for p in group["params"])]


def cycle(model: torch.nn.Module, **options) -> tuple[nbpeft.TrainResult, list[weakref.ref]]:
    """Attach, train, detach: the result, and weak references to the adapter's parameters."""
    nbpeft.attach(model, "lora", r=4, targets="all-linear")
    adapter = [weakref.ref(p) for p in model.parameters() if p.requires_grad]
    result = nbpeft.train(model, DATA, tokenizer=char_tokenizer(chat=False), steps=2, batch_size=4, lr=1e-2,
                          live=False, **options)
    nbpeft.detach(model)
    return result, adapter


def test_twenty_cycles_leave_no_hooks_and_flat_memory():
    model = tiny_llama()
    before, hooks = snapshot(model), hook_count(model)
    resident = []
    for n in range(20):
        # every other run checkpoints activations: transformers hooks the embeddings for it
        result, adapter = cycle(model, gradient_checkpointing=n % 2 == 1)
        assert result.steps == 2 and result.stopped is None
        assert hook_count(model) == hooks
        gc.collect()
        assert adapter and not any(ref() is not None for ref in adapter)  # no optimizer or hook keeps them
        memory.trim_heap()  # what glibc keeps free is not held by a run
        resident.append(memory.resident_bytes())
    assert_same(before, snapshot(model))  # detach is exact: the base as it was
    # the first cycles warm up caches (autograd, tokenizer, allocator pools); after them the resident set stays level
    growth = resident[-1] - resident[9]
    assert growth < 4 * 2**20, [f"{r / 2**20:.1f}" for r in resident]


class InterruptAt(Listener):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: Step) -> None:
        if step.step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_leaves_no_optimizer_state_or_gradients():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    result = nbpeft.train(model, DATA, tokenizer=char_tokenizer(chat=False), steps=10, batch_size=4,
                          live=InterruptAt(2))
    assert result.stopped == "interrupted" and result.steps == 2
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is None for p in trained)
    assert not live_optimizers(model)  # freed as the call returned, without waiting for the garbage collector
    released = nbpeft.release(model)
    assert released.device == "cpu" and repr(released).startswith("released: resident memory")


class FailAt(InterruptAt):
    def on_step(self, step: Step) -> None:
        if step.step == self.step:
            raise RuntimeError("the listener failed")


def test_release_gives_back_what_a_failed_run_holds():
    """A run that fails keeps its optimizer alive in the error's frames (as a notebook keeps the last error)."""
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    try:
        nbpeft.train(model, DATA, tokenizer=char_tokenizer(chat=False), steps=10, batch_size=4, live=FailAt(2))
    except RuntimeError as err:
        sys.last_type, sys.last_value, sys.last_traceback = type(err), err, err.__traceback__
    try:
        assert live_optimizers(model)  # held by the failed call's frames
        # the gradients of the failed step's parameters, as if it had failed inside backward
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.ones_like(param)
        released = nbpeft.release(model)
        assert not live_optimizers(model)
        assert all(p.grad is None for p in model.parameters())
        assert "released:" in repr(released)
    finally:
        del sys.last_type, sys.last_value, sys.last_traceback
