"""Training on several processes: data parallel over ``torch.distributed``, from a notebook or a launcher.

``train(model, data, processes=N)`` forks N workers (like accelerate's ``notebook_launcher``:
they inherit the model in memory, nothing is pickled), one per GPU with NCCL or N CPU
processes with gloo. Each worker runs the ordinary training loop on the same global batches
(``batch_size`` × N rows, same seed, same order) and trains on its own rows of each: rank r
takes rows ``r·b … (r+1)·b``. So N processes × batch b see exactly what 1 process × batch N·b
sees, and give the same losses and adapter weights:

- each rank's loss is weighted by its share of the global batch's labelled tokens (examples
  for classification or a custom ``loss_fn``), so the all-reduced gradient is the gradient of
  the global mean, not a mean of per-rank means;
- the adapter's gradients (only the trainable parameters: for LoRA r=8 a few MB, never the
  base model) are summed in one flat all-reduce after the last micro-batch of each step;
- the loss shown is the global loss (one scalar all-reduce per micro-batch).

Rank 0 forwards the loop's events to the notebook (the live display shows the run; tokens
count the whole global batch, so tokens/s is summed over processes) and, after every step,
the trainable parameters, so the notebook's model keeps the last completed step whatever
happens next. A crash or a killed worker ends every worker and reaches the notebook as one
line naming the rank. ``shard=True`` also shards the frozen base with FSDP2 (``fully_shard``).

Called inside a process group that is already up (``torchrun``, ``accelerate launch``),
``train()`` runs the same worker code on each rank; rank 0 reports.

When the kernel has already initialised CUDA, forked workers could not use it: the run is then
written as a job (``nbpeft.training.jobs``) and started under ``torchrun --standalone`` in fresh
processes, which rebuild the model from its path and the adapter as it is now; rank 0 reports
over a local socket (:class:`Channel`) to the same display.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import multiprocessing as mp
import os
import queue as queue_module
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from .. import core
from ..errors import ConfigError, one_line
from ..layers import IGNORE
from . import compiling, lm_loss
from .events import Begin, End, Listener, Note, Step, StopTraining, TrainResult

__all__ = ["Channel", "Forward", "ProcessFailed", "fsdp2_available", "in_group", "run", "trainable_state", "wanted"]

_inside = False  # True while a worker runs the plain loop: train() must not hand off again
POLL_S = 0.2
# Rank 0 sends the trainable parameters after every step when they are at most this large (LoRA r=8 on
# SmolLM2-135M: 1.8 MB); larger sets (full=True) travel only at the end of the run.
STATE_EVERY_STEP_BYTES = 64 << 20
GRACE_S = 10.0  # how long Stop / an interrupt waits for the workers to end their step before killing them


class ProcessFailed(RuntimeError):
    """A worker process crashed or was killed; the message is one line naming its rank."""


def in_group() -> bool:
    """Whether this process is one rank of a process group that is already up (torchrun, accelerate launch)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wanted(processes: int, shard: bool) -> bool:
    """Whether ``train()`` hands off to this module rather than running the loop itself."""
    return not _inside and (processes != 1 or isinstance(processes, bool) or shard is not False or in_group())


def run(train: Callable[..., Any], model: nn.Module, data: Any, *, processes: int, shard: bool,
        options: dict[str, Any], listener: Callable[[], Listener]) -> Any:
    """Run ``train(model, data, **options)`` data parallel; return rank 0's TrainResult.

    ``listener()`` builds the notebook's display (called once, in the process that shows it).
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"train(): processes={processes!r} must be a positive number of processes, e.g. processes=2")
    if not isinstance(shard, bool):
        raise ConfigError(f"train(): shard={shard!r} must be True or False")
    if shard and not fsdp2_available():
        raise ConfigError(f"train(): shard=True needs FSDP2 (torch >= 2.6), this is torch {torch.__version__}; drop shard=True")
    if in_group():
        world = dist.get_world_size()
        if processes not in (1, world):
            raise ConfigError(f"train(): this process group already has {world} processes; drop processes= "
                              f"(or pass processes={world})")
        rank = dist.get_rank()
        options = dict(options)
        if rank != 0:
            options["live"] = False
        report = None if rank else listener()
        return _train_rank(train, model, data, options, shard, report, getattr(report, "stop", None))
    device = _device(options.get("device", "auto"))
    if device == "cuda":
        if processes > torch.cuda.device_count():
            raise ConfigError(f"train(): processes={processes} but {torch.cuda.device_count()} GPUs are visible; "
                              f"use processes={torch.cuda.device_count()} or fewer")
    if "fork" not in mp.get_all_start_methods():
        raise ConfigError(f"train(): processes={processes} needs the 'fork' start method, which {sys.platform} lacks; "
                          "write a job with nbpeft.export_job(...) and run it with torchrun")
    if _fork_unsafe(device):
        return _relaunch(model, data, processes, shard, options, listener)
    return _launch(train, model, data, processes, shard, options, listener(), device)


# ------------------------------------------------------------------ the notebook side

def _device(requested: str) -> str:
    """Where the workers train: ``"cuda"`` (one GPU each, NCCL) or ``"cpu"`` (gloo)."""
    if requested == "auto":
        return "cuda" if torch.backends.cuda.is_built() and torch.cuda.device_count() > 0 else "cpu"
    try:
        kind = torch.device(requested).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"train(): device={requested!r} is not a device; use 'auto', 'cpu' or 'cuda'") from None
    if kind not in ("cuda", "cpu"):
        raise ConfigError(f"train(): processes= trains on CUDA GPUs or CPU processes, not {kind}; pass device='cpu'")
    return kind


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _fork_unsafe(device: str) -> bool:
    """CUDA already initialised in this process: a forked child cannot use it (the CUDA trap)."""
    return device == "cuda" and torch.cuda.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(train: Callable[..., Any], model: nn.Module, data: Any, processes: int, shard: bool,
            options: dict[str, Any], listener: Listener, device: str) -> Any:
    ctx = mp.get_context("fork")
    events, stop = ctx.Queue(), ctx.Event()
    port = _free_port()
    threads = max(1, torch.get_num_threads() // processes) if device == "cpu" else torch.get_num_threads()
    job = {"train": train, "model": model, "data": data, "options": options, "shard": shard}
    workers = [ctx.Process(target=_worker, name=f"nbpeft-rank-{rank}",
                           args=(rank, processes, port, device, threads, events, stop), kwargs=job)
               for rank in range(processes)]
    try:
        for worker in workers:
            worker.start()
        result, latest, failure = relay(events.get, lambda: _dead(workers), listener, stop.set)
    finally:
        _end(workers)
    return finish(model, processes, listener, result, latest, failure)


def relay(get: Callable[..., Any], dead: Callable[[], tuple[str, str] | None], listener: Listener,
          stop: Callable[[], None]) -> tuple[Any, tuple[int, bytes] | None, tuple[str, str] | None]:
    """Show rank 0's events until the run ends; returns (result, (step, adapter) of the last step, failure)."""
    latest: tuple[int, bytes] | None = None  # (step, trainable parameters) of the last completed step
    result, failure = None, None
    try:
        while result is None and failure is None:
            try:
                kind, *payload = get(timeout=POLL_S)
            except queue_module.Empty:
                failure = dead()
                continue
            if kind == "begin":
                listener.on_begin(payload[0])
            elif kind == "note":
                listener.on_note(payload[0])
            elif kind == "step":
                if payload[1] is not None:
                    latest = (payload[0].step, payload[1])
                try:
                    listener.on_step(payload[0])
                except StopTraining:
                    stop()
            elif kind == "end":
                result, latest = payload[0], (payload[0].steps, payload[1])
            elif kind == "error":
                failure = _first_error(payload, get, dead)
    except KeyboardInterrupt:
        stop()
        ended = _wait_end(get)
        if ended is None:
            failure = ("interrupted", "")
        else:
            result, latest = ended[0], (ended[0].steps, ended[1])
            result.stopped = "interrupted"
    return result, latest, failure


def finish(model: nn.Module, processes: int, listener: Listener, result: Any, latest: tuple[int, bytes] | None,
           failure: tuple[str, str] | None) -> Any:
    """The notebook's model takes the last completed step's adapter; a failure becomes one line."""
    if latest is not None:
        _load_state(model, latest[1])
    if failure is not None:
        kind, text = failure
        if kind == "ConfigError":
            raise ConfigError(text) from None
        if kind == "interrupted":
            raise KeyboardInterrupt(f"train(processes={processes}): interrupted; {_kept(latest)}")
        raise ProcessFailed(f"train(processes={processes}): {text}; {_kept(latest)}") from None
    result.device = f"{result.device} ×{processes}"
    listener.on_end(End(result))
    return result


def _kept(latest: tuple[int, bytes] | None) -> str:
    return (f"the model keeps the adapter of step {latest[0]}" if latest is not None
            else "the model is unchanged (no step completed)")


def _dead(workers: list[Any]) -> tuple[str, str] | None:
    """A worker that exited with an error or a signal, as (kind, one line); None while all run."""
    codes = [(rank, worker.exitcode) for rank, worker in enumerate(workers)]
    for rank, code in sorted(codes, key=lambda rc: (rc[1] or 0) >= 0):  # a signal first: the others may follow from it
        if code is not None and code != 0:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            hint = " (out of memory?)" if code == -signal.SIGKILL else ""
            return "killed", f"process {rank} (rank {rank}) was {how}{hint}"
    if all(worker.exitcode == 0 for worker in workers):
        return "killed", "every process exited without finishing the run"
    return None


def _first_error(payload: list[Any], get: Callable[..., Any], dead: Callable[[], Any]) -> tuple[str, str]:
    """The error that started it: a killed process beats the connection errors it causes in its peers."""
    errors = [payload]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            kind, *more = get(timeout=0.1)
        except queue_module.Empty:
            continue
        if kind == "error":
            errors.append(more)
    killed = dead()
    if killed is not None and "killed by" in killed[1]:
        return killed
    primary = [e for e in errors if not _is_peer_loss(e[2])] or errors
    rank, kind, text = primary[0]
    if kind == "ConfigError":
        return kind, text
    return kind, f"process {rank} (rank {rank}) failed: {text}"  # one_line names the type where it adds something


def _is_peer_loss(text: str) -> bool:
    return any(s in text for s in ("Connection closed by peer", "Connection reset", "Broken pipe", "NCCL communicator was aborted"))


def _wait_end(get: Callable[..., Any]) -> tuple[Any, bytes] | None:
    """After an interrupt: the workers end their step together and rank 0 sends the result."""
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        try:
            kind, *payload = get(timeout=POLL_S)
        except queue_module.Empty:
            continue
        except KeyboardInterrupt:
            return None
        if kind == "end":
            return payload[0], payload[1]
    return None


def _end(workers: list[Any]) -> None:
    """No process left behind: join the finished ones, kill the rest."""
    for worker in workers:
        if worker.pid is not None:
            worker.join(timeout=2.0 if worker.exitcode is None else 0)
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            worker.kill()
    for worker in workers:
        if worker.pid is not None:
            worker.join()


def _load_state(model: nn.Module, blob: bytes) -> None:
    tensors = tensors_from_bytes(blob)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# ------------------------------------------------------------------ the worker side

def _worker(rank: int, world: int, port: int, device: str, threads: int, events: Any, stop: Any, *,
            train: Callable[..., Any], model: nn.Module, data: Any, options: dict[str, Any], shard: bool) -> None:
    try:
        _die_with_parent()
        # Ctrl-C / the kernel's interrupt reaches the notebook, which stops every rank after the same step;
        # ranks interrupted on their own would stop at different points of a collective and hang
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(threads)
        options = dict(options, live=False, device=f"cuda:{rank}" if device == "cuda" else "cpu")
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
        try:
            forward = Forward(events) if rank == 0 else None
            result = _train_rank(train, model, data, options, shard, forward, stop)
            blob = trainable_state(model) if rank == 0 or shard else b""  # gathering sharded parameters takes every rank
            if rank == 0:
                events.put(("end", result, blob))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the notebook as one line
        events.put(("error", rank, "ConfigError" if isinstance(exc, ConfigError) else type(exc).__name__,
                    one_line(exc)))
        events.close()
        events.join_thread()
        os._exit(1)
    events.close()
    events.join_thread()
    os._exit(0)  # skip the parent's atexit handlers, inherited through fork


def _die_with_parent() -> None:
    """Linux: a worker is killed with its notebook kernel rather than left waiting in an all-reduce."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Forward(Listener):
    """Rank 0's events, sent to the notebook; each step also carries the trainable parameters.

    ``events.put`` takes each message; ``stop.is_set()``, when given, says the notebook asked to stop.
    """

    def __init__(self, events: Any, stop: Any = None) -> None:
        self.events, self.stop = events, stop
        self.state: Callable[[], bytes | None] = lambda: None  # None: this step's parameters stay in the worker

    def on_begin(self, begin: Begin) -> None:
        self.events.put(("begin", begin))

    def on_note(self, note: Note) -> None:
        self.events.put(("note", note))

    def on_step(self, step: Step) -> None:
        self.events.put(("step", step, self.state()))


class _Ranks(Listener):
    """Every rank: agree on Stop once a step (one scalar all-reduce), so all end after the same step."""

    def __init__(self, report: Listener | None, stop: Any, model: nn.Module, gather: bool) -> None:
        self.report, self.stop, self.model, self.gather = report, stop, model, gather

    def on_begin(self, begin: Begin) -> None:
        if self.report is not None:
            begin.device = f"{begin.device} ×{dist.get_world_size()} processes"
            self.report.on_begin(begin)

    def on_note(self, note: Note) -> None:
        if self.report is not None:
            self.report.on_note(note)

    def on_step(self, step: Step) -> None:
        blob = trainable_state(self.model) if self.gather else None  # gathering sharded parameters takes every rank
        stopped = False
        if self.report is not None:
            if blob is not None and isinstance(self.report, Forward):
                self.report.state = lambda: blob
            try:
                self.report.on_step(step)
            except StopTraining:
                stopped = True
        flag = torch.tensor([float(stopped or (self.stop is not None and self.stop.is_set()))], device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise StopTraining

    def on_end(self, end: End) -> None:
        if self.report is not None and not isinstance(self.report, Forward):
            self.report.on_end(end)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def trainable_state(model: nn.Module) -> bytes:
    """The trainable parameters (every method's, and every parameter under full=True) as bytes."""
    tensors = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            tensors[name] = value.detach().cpu().clone()
    return tensors_to_bytes(tensors)


def _train_rank(train: Callable[..., Any], model: nn.Module, data: Any, options: dict[str, Any], shard: bool,
                report: Listener | None, stop: Any = None) -> Any:
    """One rank's run: the plain loop on this rank's rows of each global batch, gradients summed over ranks."""
    global _inside
    rank, world = dist.get_rank(), dist.get_world_size()
    options = dict(options)
    if options.get("device", "auto") == "auto" and dist.get_backend() == "nccl":
        options["device"] = f"cuda:{torch.cuda.current_device()}"
    per_rank = options["batch_size"]
    options["batch_size"] = per_rank * world
    if options.get("compile") is None:
        options["compile"] = False  # ranks timing their own steps could disagree on compiling
    if rank != 0:
        options["save_every"] = None  # rank 0 writes the checkpoints
    full = options.get("full", False)
    flags = {p: p.requires_grad for p in model.parameters()} if full else {}
    if full:
        model.requires_grad_(True)
    params = core.trainable_parameters(model)
    if shard:
        _shard_base(model)
        params = core.trainable_parameters(model)
    every_step = sum(p.numel() * p.element_size() for p in params) <= STATE_EVERY_STEP_BYTES
    if isinstance(report, Forward) and every_step:
        report.state = lambda: trainable_state(model)
    sync = None if shard else _GradSync(params, world)
    options["loss_fn"] = _RankLoss(options.get("loss_fn"), model, params, rank=rank, world=world, per_rank=per_rank,
                                   grad_accum=options.get("grad_accum", 1), sync=sync, shard=shard,
                                   objective=options.get("objective", "sft") != "sft")
    options["live"] = _Ranks(report, stop, model, shard and every_step)
    _inside = True
    try:
        return train(model, data, **options)
    finally:
        _inside = False
        if sync is not None:
            sync.remove()
        for param, flag in flags.items():
            param.requires_grad = flag


def _shard_base(model: nn.Module) -> None:
    """FSDP2: each decoder block, then the rest, sharded across the ranks (the frozen base and the adapter alike).

    FSDP2 shards parameters, not buffers: QLoRA's 4-bit weights (buffers) stay whole on every
    rank; its embeddings, norms, head and adapter are sharded.
    """
    from torch.distributed.fsdp import fully_shard

    for block in compiling.repeated_blocks(model):
        fully_shard(block)
    fully_shard(model)


class _GradSync:
    """Sums the trainable parameters' gradients over the ranks, in one flat all-reduce per step.

    A post-accumulate hook counts the parameters whose gradient is in; after the last
    micro-batch of a step, the last one to arrive triggers the all-reduce.
    """

    def __init__(self, params: list[nn.Parameter], world: int) -> None:
        self.params, self.world = params, world
        self.pending, self.last = 0, False
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def expect(self, last: bool) -> None:
        self.pending, self.last = len(self.params), last

    def _ready(self, _param: nn.Parameter) -> None:
        self.pending -= 1
        if self.pending or not self.last:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
                offset += p.grad.numel()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _RankLoss:
    """This rank's share of the global batch's loss, valued as the global loss.

    Losses are taken as means over labelled tokens where the batch has token labels (the
    causal shift counted), else over examples; a custom ``loss_fn`` is assumed to do the same.
    A preference objective's loss is a mean over rows (pairs, rated answers, prompts): it is
    weighted by rows, and the loop hands it in as ``inner`` (``around_objective``); each rank
    computes its own rows' reference log-probabilities.

    The gradient is that of ``world × (this rank's labelled tokens / the batch's) × its mean
    loss``; averaged over the ranks, that is the gradient of the mean over the whole batch.
    """

    def __init__(self, inner: Callable | None, model: nn.Module, params: list[nn.Parameter], *, rank: int, world: int,
                 per_rank: int, grad_accum: int, sync: _GradSync | None, shard: bool, objective: bool = False) -> None:
        self.inner, self.params, self.rank, self.world, self.per_rank = inner, params, rank, world, per_rank
        self.around_objective = objective
        self.grad_accum, self.sync, self.calls = grad_accum, sync, 0
        self.causal = "CausalLM" in type(model).__name__
        if inner is None:
            use_cache = {"use_cache": False} if "use_cache" in _forward_args(model) else {}
            self.inner = ((lambda m, b: m(**b, **use_cache).loss) if shard
                          else (lambda m, b: lm_loss.model_loss(m, b, use_cache)))

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: every rank scores the whole batch
            return self.inner(model, batch)
        rows = _rows(batch)
        size = self.per_rank if rows == self.per_rank * self.world else -(-rows // self.world)
        lo, hi = min(self.rank * size, rows), min((self.rank + 1) * size, rows)
        # a rank left without rows (a short last batch) still runs a row, weighted zero, so collectives match
        local = _slice(batch, rows, lo, hi) if hi > lo else _slice(batch, rows, 0, 1)
        total_weight = self._weight(batch)
        weight = self._weight(local) if hi > lo else 0
        share = self.world * weight / total_weight if total_weight else 0.0
        loss = self.inner(model, local) * share
        if self.sync is not None:  # every trainable parameter gets a gradient, so the all-reduce always fires
            loss = loss + 0.0 * sum(p.sum() for p in self.params)
        value = loss.detach().clone().float()
        dist.all_reduce(value)
        value /= self.world
        self.calls += 1
        if self.sync is not None:
            self.sync.expect(self.calls % self.grad_accum == 0)
        return loss + (value - loss.detach()).to(loss.dtype)

    def _weight(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch.get("labels")
        if self.around_objective or not isinstance(labels, torch.Tensor) or labels.dim() < 2:
            return _rows(batch)
        counted = labels[:, 1:] if self.causal else labels
        return int((counted != IGNORE).sum())


def _forward_args(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _rows(batch: dict[str, Any]) -> int:
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 0


def _slice(batch: dict[str, Any], rows: int, lo: int, hi: int) -> dict[str, Any]:
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in batch.items()}


# ------------------------------------------------------------------ CUDA already initialised: fresh processes

# A relaunched job's messages are tuples of JSON values, bytes (the trainable parameters, as
# safetensors) and the run's records. On the socket: the header, a JSON list with each bytes
# item replaced by {"bytes": i} and each record by {"record": name, "fields": {...}}, then the
# bytes items; each part length-prefixed (8 bytes, little-endian).
RECORDS = {cls.__name__: cls for cls in (Begin, Note, Step, TrainResult)}


def encode(message: tuple) -> bytes:
    blobs: list[bytes] = []

    def item(value: Any) -> Any:
        if isinstance(value, bytes):
            blobs.append(value)
            return {"bytes": len(blobs) - 1}
        if type(value).__name__ in RECORDS and dataclasses.is_dataclass(value):
            return {"record": type(value).__name__, "fields": dataclasses.asdict(value)}
        return {"value": value}

    header = json.dumps([item(value) for value in message]).encode()
    return b"".join(len(part).to_bytes(8, "little") + part for part in (header, *blobs))


def decode(read: Callable[[int], bytes]) -> tuple | None:
    """One message from ``read(n)`` (a stream's read), or None at the end of the stream."""
    def part() -> bytes | None:
        size = read(8)
        return read(int.from_bytes(size, "little")) if len(size) == 8 else None

    header = part()
    if header is None:
        return None
    items = json.loads(header)
    blobs = [part() for item in items if "bytes" in item]
    return tuple(blobs[item["bytes"]] if "bytes" in item
                 else RECORDS[item["record"]](**item["fields"]) if "record" in item
                 else item["value"] for item in items)


class Channel:
    """A relaunched job's messages to the notebook over a local socket (see :func:`encode`).

    The connection opens with the run's key (``NBPEFT_EVENTS_KEY``): the notebook reads
    nothing from a connection that does not, so another local process cannot feed it messages.

    The notebook writes one byte back to ask for a stop; :meth:`is_set` reads it without waiting.
    """

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(bytes.fromhex(os.environ.get("NBPEFT_EVENTS_KEY", "")))
        self.stopped = False

    def put(self, message: tuple) -> None:
        self.sock.sendall(encode(message))

    def is_set(self) -> bool:
        if not self.stopped:
            self.sock.setblocking(False)
            try:
                self.stopped = bool(self.sock.recv(1))
            except BlockingIOError:
                pass
            finally:
                self.sock.setblocking(True)
        return self.stopped


def _read_messages(conn: socket.socket, messages: queue_module.Queue, key: bytes) -> None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), conn.makefile("rb") as stream:
        if not hmac.compare_digest(stream.read(len(key)), key):
            conn.close()  # not the job this run started
            return
        while (message := decode(stream.read)) is not None:
            messages.put(message)


def _accept(server: socket.socket, messages: queue_module.Queue, conns: list[socket.socket], key: bytes) -> None:
    with contextlib.suppress(OSError):
        while True:
            conn, _ = server.accept()
            conns.append(conn)
            threading.Thread(target=_read_messages, args=(conn, messages, key), daemon=True).start()


def _relaunch(model: nn.Module, data: Any, processes: int, shard: bool, options: dict[str, Any],
              listener: Callable[[], Listener]) -> Any:
    """The run as a job in fresh processes (``torchrun --standalone``), which rebuild the model from its
    path and the adapter as it is now; rank 0 reports here over a socket as a forked worker would."""
    from . import checkpoints, jobs

    if options.get("overwrite") and options.get("save_every") is not None:  # export_job's overwrite= is its folder's
        checkpoints.clear(options["output_dir"])
    folder = Path(tempfile.mkdtemp(prefix="nbpeft-run-"))
    given = {k: v for k, v in options.items()
             if k not in ("live", "tokenizer", "overwrite") and (k not in jobs.not_exported() or v)}
    try:
        jobs.export_job(model, folder, data=data, tokenizer=options.get("tokenizer"), processes_per_node=processes,
                        overwrite=True, **given, **({"shard": True} if shard else {}))
    except ConfigError as err:
        shutil.rmtree(folder, ignore_errors=True)
        reason = str(err).removeprefix("export_job(): ").split(";")[0]
        raise ConfigError(f"train(processes={processes}): CUDA is already initialised in this kernel, so the run must "
                          f"start in fresh processes, and it cannot be rebuilt there ({reason}); restart the kernel and "
                          "call train(..., processes=N) before anything touches the GPU") from None
    server = socket.create_server(("127.0.0.1", 0))
    messages: queue_module.Queue = queue_module.Queue()
    conns: list[socket.socket] = []
    key = secrets.token_bytes(32)
    threading.Thread(target=_accept, args=(server, messages, conns, key), daemon=True).start()
    env = dict(os.environ, NBPEFT_EVENTS=f"127.0.0.1:{server.getsockname()[1]}", NBPEFT_EVENTS_KEY=key.hex())
    shown = listener()
    with open(folder / "log.txt", "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                str(processes), str(folder / "train_job.py")], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def dead() -> tuple[str, str] | None:
                code = job.poll()
                if code is None:
                    return None
                return "killed", f"the relaunched job exited with status {code} (its log: {folder / 'log.txt'})"

            def stop() -> None:
                for conn in list(conns):
                    with contextlib.suppress(OSError):
                        conn.sendall(b"s")

            result, latest, failure = relay(messages.get, dead, shown, stop)
        finally:
            if job.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            server.close()
            for conn in conns:
                conn.close()
    if failure is None:
        shutil.rmtree(folder, ignore_errors=True)
    return finish(model, processes, shown, result, latest, failure)
