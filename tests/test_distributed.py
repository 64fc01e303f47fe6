"""train(processes=N): N gloo processes on CPU train exactly as one process on the N-times larger batch."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest
import torch
import torch.distributed as dist

import nbpeft
from nbpeft.training import distributed
from nbpeft.training.events import StopTraining

from conftest import char_tokenizer, tiny_llama

pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="processes=N forks its workers")

DATA = [f"example {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3) for i in range(14)]  # lengths differ: padding matters


def lora_llama(method: str = "lora", **options) -> torch.nn.Module:
    model = tiny_llama()
    torch.manual_seed(1)
    nbpeft.attach(model, method, **options)
    return model


def trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fit(model: torch.nn.Module, data: list | None = None, **options):
    options = {"tokenizer": char_tokenizer(chat=False), "steps": 4, "lr": 1e-2, "precision": "fp32", "live": False,
               **options}
    return nbpeft.train(model, DATA if data is None else data, **options)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def workers_alive() -> list[str]:
    return [p.name for p in mp.active_children() if p.name.startswith("nbpeft-rank-")]


@pytest.mark.parametrize("method, options, batch, accum", [
    ("lora", {"r": 4, "targets": "all-linear"}, 2, 1),
    ("ia3", {}, 2, 2),  # another method, with gradient accumulation
    ("lora", {"r": 4}, 3, 1),  # 14 examples in global batches of 6: the last one is short
])
def test_two_processes_equal_one_process_on_the_double_batch(method, options, batch, accum):
    one, two = lora_llama(method, **options), lora_llama(method, **options)
    expected = fit(one, batch_size=2 * batch, grad_accum=accum)
    got = fit(two, batch_size=batch, grad_accum=accum, processes=2)
    assert got.steps == expected.steps == 4 and got.stopped is None
    torch.testing.assert_close(got.losses, expected.losses, rtol=1e-5, atol=1e-6)
    assert [r["tokens"] for r in got.history] == [r["tokens"] for r in expected.history]  # every process's tokens
    # the gradients summed over the processes are the whole batch's: the same norm, the same learning rate
    torch.testing.assert_close([r["grad_norm"] for r in got.history], [r["grad_norm"] for r in expected.history],
                               rtol=1e-4, atol=1e-6)
    assert [r["lr"] for r in got.history] == pytest.approx([r["lr"] for r in expected.history])
    assert_close(trained(two), trained(one))
    assert trained(two).keys() and any(not torch.equal(v, trained(lora_llama(method, **options))[k])
                                       for k, v in trained(two).items())  # it did train
    assert got.device == "cpu ×2" and type(got) is type(expected)
    assert not workers_alive()


def test_the_live_display_sees_the_run_from_rank_0():
    seen: list[tuple[str, object]] = []
    fit(lora_llama(r=4), batch_size=2, processes=2, eval_data=DATA[:4], eval_every=2,
        live=lambda kind, payload: seen.append((kind, payload)))
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "begin" and kinds.count("step") == 4 and kinds[-1] == "end"
    steps = [payload for kind, payload in seen if kind == "step"]
    assert [s.eval_loss is not None for s in steps] == [False, True, False, True]
    assert all(s.tokens_per_s > 0 and s.loss > 0 and s.lr > 0 and s.grad_norm > 0 for s in steps)
    begin = seen[0][1]
    assert "×2 processes" in begin.device and begin.effective_batch == 4
    assert seen[-1][1].result.steps == 4


def stop_at(step: int):
    def listener(kind, payload):
        if kind == "step" and payload.step == step:
            raise StopTraining
    return listener


def test_stop_from_the_notebook_ends_every_process_after_the_same_step():
    model = lora_llama(r=4)
    # the workers do not wait for the display: they stop at the first step end after Stop reaches them
    result = fit(model, batch_size=2, processes=2, steps=30, live=stop_at(2))
    assert result.stopped == "stopped" and 2 <= result.steps < 30
    assert not workers_alive()
    reference = lora_llama(r=4)
    fit(reference, batch_size=4, steps=30, live=stop_at(result.steps))
    assert_close(trained(model), trained(reference))  # the parent holds the adapter of the step it reports


def failing_loss(rank: int, at_call: int):
    calls = [0]

    def loss(model, batch):
        if torch.is_grad_enabled() and dist.get_rank() == rank:
            calls[0] += 1
            if calls[0] == at_call:
                raise RuntimeError("boom in the loss\nsecond line")
        return model(**batch, use_cache=False).loss
    return loss


def test_a_crash_in_rank_1_is_one_line_and_the_model_keeps_the_last_step():
    model = lora_llama(r=4)
    with pytest.raises(distributed.ProcessFailed) as info:
        fit(model, batch_size=2, processes=2, loss_fn=failing_loss(1, at_call=2))
    message = str(info.value)
    assert "\n" not in message and "rank 1" in message and "RuntimeError: boom in the loss" in message
    assert "step 1" in message
    assert not workers_alive()
    reference = lora_llama(r=4)
    fit(reference, batch_size=4, steps=1, loss_fn=lambda m, b: m(**b, use_cache=False).loss)
    assert_close(trained(model), trained(reference))  # the adapter of step 1: warm-up makes step 1 the same


def test_a_crash_before_the_first_step_leaves_the_model_unchanged():
    model = lora_llama(r=4)
    before = trained(model)
    with pytest.raises(distributed.ProcessFailed, match="process 0 \\(rank 0\\) failed: RuntimeError"):
        fit(model, batch_size=2, processes=2, loss_fn=failing_loss(0, at_call=1))
    assert_close(trained(model), before)
    assert all(torch.equal(trained(model)[k], before[k]) for k in before)
    assert not workers_alive()


def test_a_killed_process_is_named_and_none_is_left_behind():
    def kill_rank_1(kind, payload):
        if kind == "step" and payload.step == 2:
            worker = next(p for p in mp.active_children() if p.name == "nbpeft-rank-1")
            os.kill(worker.pid, signal.SIGKILL)

    model = lora_llama(r=4)
    with pytest.raises(distributed.ProcessFailed) as info:
        fit(model, batch_size=2, processes=2, steps=200, live=kill_rank_1)
    message = str(info.value)
    assert "\n" not in message and "rank 1" in message and "SIGKILL" in message
    assert "keeps the adapter of step" in message
    assert not workers_alive()


@pytest.mark.parametrize("processes", [0, -1, "2", True])
def test_bad_processes_is_a_one_line_config_error(processes):
    model = lora_llama(r=4)
    before = trained(model)
    with pytest.raises(nbpeft.ConfigError, match="processes="):
        fit(model, batch_size=2, processes=processes)
    assert all(torch.equal(trained(model)[k], before[k]) for k in before)


def sharded_loss(model, batch):
    """The model's loss, after checking that this rank holds only its half of the base's weights."""
    embed = model.get_input_embeddings().weight
    if type(embed).__name__ != "DTensor" or embed.to_local().shape[0] * 2 != embed.shape[0]:
        raise AssertionError(f"the embedding is not sharded in two: {type(embed).__name__}")
    return model(**batch, use_cache=False).loss


@pytest.mark.skipif(not distributed.fsdp2_available(), reason="shard=True needs FSDP2 (torch.distributed.fsdp.fully_shard)")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sharded_base_trains_like_the_unsharded_run(method):
    one, two = lora_llama(method, r=4, targets="all-linear"), lora_llama(method, r=4, targets="all-linear")
    expected = fit(one, batch_size=4)
    got = fit(two, batch_size=2, processes=2, shard=True, loss_fn=sharded_loss)
    torch.testing.assert_close(got.losses, expected.losses, rtol=1e-5, atol=1e-6)
    a, b = trained(one), trained(two)
    assert a.keys() == b.keys()
    for name in a:  # the sharded all-gathers and reduce-scatters sum in another order
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not workers_alive()


def test_an_interrupt_in_the_notebook_stops_every_process_and_keeps_the_run():
    def interrupt(kind, payload):
        if kind == "step" and payload.step == 1:
            for worker in mp.active_children():  # the kernel's interrupt reaches the workers too: they ignore it
                if worker.name.startswith("nbpeft-rank-"):
                    os.kill(worker.pid, signal.SIGINT)
        if kind == "step" and payload.step == 2:
            raise KeyboardInterrupt

    model = lora_llama(r=4)
    result = fit(model, batch_size=2, processes=2, steps=30, live=interrupt)
    assert result.stopped == "interrupted" and 2 <= result.steps < 30
    assert not workers_alive()
    reference = lora_llama(r=4)
    fit(reference, batch_size=4, steps=30, live=stop_at(result.steps))
    assert_close(trained(model), trained(reference))


def test_bad_data_is_the_same_one_line_config_error_as_in_one_process():
    model = lora_llama(r=4)
    before = trained(model)
    with pytest.raises(nbpeft.ConfigError) as one:
        fit(model, [{"question": "no text column"}], batch_size=2)
    with pytest.raises(nbpeft.ConfigError) as two:
        fit(model, [{"question": "no text column"}], batch_size=2, processes=2)
    assert str(two.value) == str(one.value) and "\n" not in str(two.value)
    assert all(torch.equal(trained(model)[k], before[k]) for k in before)
    assert not workers_alive()


def test_the_cuda_trap_without_a_path_to_rebuild_from_is_one_line_saying_what_to_do(monkeypatch):
    monkeypatch.setattr(distributed, "_fork_unsafe", lambda device: True)  # as when the kernel touched CUDA
    model = lora_llama(r=4)  # built in memory: fresh processes could not rebuild it
    before = trained(model)
    with pytest.raises(nbpeft.ConfigError) as info:
        fit(model, batch_size=2, processes=2)
    message = str(info.value)
    assert "\n" not in message and "CUDA is already initialised" in message and "no name or path" in message
    assert "restart the kernel" in message
    assert all(torch.equal(trained(model)[k], before[k]) for k in before)
    assert not workers_alive()


@pytest.mark.parametrize("device, message", [("gpu", "is not a device"), ("mps", "not mps; pass device='cpu'")])
def test_devices_processes_cannot_use_are_one_line_errors(device, message):
    with pytest.raises(nbpeft.ConfigError, match=message):
        fit(lora_llama(r=4), batch_size=2, processes=2, device=device)


def test_full_fine_tuning_in_two_processes_with_the_weights_sent_at_the_end(monkeypatch):
    monkeypatch.setattr(distributed, "STATE_EVERY_STEP_BYTES", 0)  # as for a model too large to send every step
    one, two = tiny_llama(), tiny_llama()
    fit(one, batch_size=4, full=True)
    result = fit(two, batch_size=2, processes=2, full=True)
    assert result.steps == 4
    a, b = one.state_dict(), two.state_dict()
    for name in a:  # every weight trains here: the rounding of the split sums shows up to ~1.4e-6
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.equal(two.lm_head.weight, tiny_llama().lm_head.weight)  # it trained


PAIRS = [{"prompt": f"q{i}", "chosen": "yes" * (1 + i % 3), "rejected": "no" * (1 + i % 2)} for i in range(8)]


@pytest.mark.parametrize("objective, options", [("dpo", {"init": "random"}), ("simpo", {})])
def test_a_preference_objective_in_two_processes_equals_one_process_on_the_double_batch(objective, options):
    """Each rank computes its own rows' reference log-probabilities; the loss is a mean over pairs."""
    one, two = lora_llama(r=4, **options), lora_llama(r=4, **options)
    expected = fit(one, PAIRS, batch_size=4, objective=objective, tokenizer=char_tokenizer())
    got = fit(two, PAIRS, batch_size=2, objective=objective, processes=2, tokenizer=char_tokenizer())
    torch.testing.assert_close(got.losses, expected.losses, rtol=1e-5, atol=1e-6)
    assert_close(trained(two), trained(one))
    assert not workers_alive()


def test_kto_in_two_processes_takes_the_whole_batch_kl_estimate():
    """Each rank's KL mean is averaged over the ranks, as one process computes it on the double batch."""
    rows = [{"prompt": f"q{i}", "completion": "yes" * (1 + i % 3), "label": i % 3 != 0} for i in range(8)]
    one, two = lora_llama(r=4, init="random"), lora_llama(r=4, init="random")
    expected = fit(one, rows, batch_size=4, objective="kto", tokenizer=char_tokenizer())
    got = fit(two, rows, batch_size=2, objective="kto", processes=2, tokenizer=char_tokenizer())
    assert any(row["kl"] > 0 for row in expected.history)  # the KL term is in play, so a per-rank one would differ
    torch.testing.assert_close([row["kl"] for row in got.history], [row["kl"] for row in expected.history],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.losses, expected.losses, rtol=1e-5, atol=1e-6)
    for name, weight in trained(one).items():  # AdamW turns gradients near zero into steps of noise (<= 2e-5 here)
        torch.testing.assert_close(trained(two)[name], weight, rtol=0, atol=1e-4, msg=name)
    assert not workers_alive()


def test_grpo_in_two_processes_samples_on_each_rank():
    model = lora_llama(r=4)
    result = fit(model, [{"prompt": f"say {i}"} for i in range(4)], batch_size=1, objective="grpo", processes=2,
                 steps=2, num_generations=2, max_new_tokens=4, tokenizer=char_tokenizer(),
                 reward=lambda prompts, completions: [float(len(c)) for c in completions])
    assert result.steps == 2 and all(r["reward"] >= 0 for r in result.history)
    assert not workers_alive()
