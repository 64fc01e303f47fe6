"""export_job(): the notebook's attach + train, as a job two torchrun "nodes" on 127.0.0.1 run to the same adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nbpeft

from conftest import char_tokenizer, tiny_llama

DATA = [f"example {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3) for i in range(14)]
TRAIN = {"steps": 3, "batch_size": 2, "lr": 1e-2, "precision": "fp32"}


@pytest.fixture
def saved_base(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "base")
    char_tokenizer(chat=False).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_model(base: Path) -> torch.nn.Module:
    model, _ = nbpeft.load_model(str(base))
    torch.manual_seed(1)
    nbpeft.attach(model, "lora", r=4, targets="all-linear")
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_two_node_job_writes_the_adapter_the_notebook_trains(saved_base, tmp_path):
    port = free_port()
    job = nbpeft.export_job(lora_model(saved_base), tmp_path / "job", data=DATA, nodes=2, processes_per_node=1,
                            port=port, **TRAIN)
    assert {"train_job.py", "job.json", "data.jsonl", "adapter_init", "tokenizer", "accelerate_config.yaml",
            "launch.sh"} <= {p.name for p in job.iterdir()}
    launch = (job / "launch.sh").read_text()
    assert "--nnodes 2" in launch and "--node-rank ${NODE_RANK:-0}" in launch and f"{port}" in launch
    assert "--machine_rank" in launch
    config = (job / "accelerate_config.yaml").read_text()
    assert "num_machines: 2" in config and "num_processes: 2" in config and f"main_process_port: {port}" in config

    # launch.sh as a cluster would run it, once per "node", both on 127.0.0.1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(nbpeft.__file__).parent.parent),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    nodes = [subprocess.Popen(["sh", str(job / "launch.sh")], env=dict(env, NODE_RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "adapter saved" in outputs[0] and "adapter saved" not in outputs[1]

    notebook = lora_model(saved_base)  # the same run in one process on the global batch of 2 × 2
    nbpeft.train(notebook, DATA, **dict(TRAIN, batch_size=4), live=False)
    from_job, _ = nbpeft.load_model(str(saved_base))
    nbpeft.load_adapter(from_job, job / "adapter")
    got = {n: p for n, p in from_job.named_parameters() if "lora_" in n}
    want = {n: p for n, p in notebook.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in got.items() if "lora_B" in n)  # it trained


def test_export_job_refuses_what_cannot_travel(saved_base, tmp_path):
    model = lora_model(saved_base)
    with pytest.raises(nbpeft.ConfigError, match="loss_fn= cannot travel"):
        nbpeft.export_job(model, tmp_path / "job", data=DATA, loss_fn=lambda m, b: 0)
    with pytest.raises(nbpeft.ConfigError, match="no name or path"):
        other = tiny_llama()
        nbpeft.attach(other, "lora")
        nbpeft.export_job(other, tmp_path / "job", data=DATA)
    assert not (tmp_path / "job").exists()


def test_the_magic_writes_the_same_job(saved_base, tmp_path):
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython() or get_ipython()
    if "nbpeft" not in ip.extension_manager.loaded:
        ip.run_line_magic("load_ext", "nbpeft")
    ip.user_ns.update(model=lora_model(saved_base), rows=DATA)
    try:
        ip.run_line_magic("peft_export_job", f"{tmp_path / 'job'} --data rows nodes=2 steps=3 batch_size=2")
    finally:
        ip.user_ns.pop("model"), ip.user_ns.pop("rows")
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["base"] == str(saved_base) and job["train"] == {"steps": 3, "batch_size": 2}
    assert "--nnodes 2" in (tmp_path / "job" / "launch.sh").read_text()
    assert len((tmp_path / "job" / "data.jsonl").read_text().splitlines()) == len(DATA)


def test_with_cuda_already_initialised_the_run_restarts_in_fresh_processes(saved_base, monkeypatch):
    from nbpeft.training import distributed

    monkeypatch.setattr(distributed, "_fork_unsafe", lambda device: True)  # as when the kernel touched CUDA
    seen = []
    model = lora_model(saved_base)
    result = nbpeft.train(model, DATA, processes=2, live=lambda kind, payload: seen.append(kind), **TRAIN)
    assert seen[0] == "begin" and seen.count("step") == 3 and seen[-1] == "end"
    assert result.steps == 3 and result.device == "cpu ×2"
    notebook = lora_model(saved_base)
    expected = nbpeft.train(notebook, DATA, **dict(TRAIN, batch_size=4), live=False)
    torch.testing.assert_close(result.losses, expected.losses, rtol=1e-5, atol=1e-6)
    want = {n: p for n, p in notebook.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, want[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(nbpeft.ConfigError, match="CUDA is already initialised.*cannot be rebuilt there.*loss_fn="):
        nbpeft.train(model, DATA, processes=2, loss_fn=lambda m, b: m(**b).loss, **TRAIN)


def test_the_event_socket_reads_nothing_from_a_connection_without_the_runs_key():
    import queue
    import socket
    import threading

    from nbpeft.training import distributed

    server = socket.create_server(("127.0.0.1", 0))
    messages, key = queue.Queue(), bytes(range(32))
    threading.Thread(target=distributed._accept, args=(server, messages, [], key), daemon=True).start()
    blob = distributed.encode(("note", nbpeft.training.events.Note("hello")))
    for sent_key, expected in ((bytes(32), 0), (key, 1)):
        with socket.create_connection(server.getsockname()) as conn:
            conn.sendall(sent_key + blob)
        deadline = time.monotonic() + 10
        while messages.qsize() < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert messages.qsize() == expected
    assert messages.get() == ("note", nbpeft.training.events.Note("hello"))
    server.close()


def test_event_messages_carry_records_parameters_and_plain_values_as_json_and_safetensors(llama):
    import io

    from nbpeft.training import distributed
    from nbpeft.training.events import Begin, Step, TrainResult

    nbpeft.attach(llama, "lora", r=2, init="random")
    state = distributed.trainable_state(llama)
    step = Step(step=3, total_steps=9, loss=1.5, lr=1e-3, tokens=64, step_time_s=0.25, elapsed_s=0.8,
                tokens_per_s=256.0, eta_s=1.5, peak_mem_bytes=1 << 20, eval_loss=None, metrics={"acc": 0.5})
    result = TrainResult(history=[{"step": 1, "loss": float("nan")}], device="cpu", total_steps=9, stopped="stopped")
    sent = [("begin", Begin(total_steps=9, trainable=10, device="cpu", precision="fp32")), ("step", step, state),
            ("step", step, None), ("end", result, b""), ("error", 1, "RuntimeError", "boom")]
    stream = io.BytesIO(b"".join(distributed.encode(message) for message in sent))
    got = []
    while (message := distributed.decode(stream.read)) is not None:
        got.append(message)
    assert [m[0] for m in got] == [m[0] for m in sent]
    assert got[0] == sent[0] and got[2] == sent[2] and got[4] == sent[4]
    assert got[1][1] == step and isinstance(got[1][2], bytes)
    assert got[3][1].stopped == "stopped" and got[3][1].total_steps == 9 and got[3][2] == b""
    assert got[3][1].steps == 1 and got[3][1].losses[0] != got[3][1].losses[0]  # NaN survives
    before = {n: p.detach().clone() for n, p in llama.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in llama.parameters():
            if p.requires_grad:
                p.zero_()
    distributed._load_state(llama, got[1][2])
    for name, param in llama.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), name


def test_export_job_checks_its_train_keywords_against_the_declaration(saved_base, tmp_path):
    from nbpeft.training import options
    from nbpeft.training.jobs import not_exported

    model = lora_model(saved_base)
    for keywords, message in [
        ({"lrr": 1e-3}, "export_job(): unknown option lrr=0.001; did you mean lr=?"),
        ({"node": 2}, "export_job(): unknown option node=2; did you mean nodes=?"),
        ({"steps": 0}, "export_job(): steps=0 must be a positive integer"),
        ({"processes": 2}, "export_job(): processes= is the launcher's; give nodes= and processes_per_node= instead"),
        ({"metrics": print}, "export_job(): metrics= cannot travel to a cluster job"),
    ]:
        with pytest.raises(nbpeft.ConfigError) as caught:
            nbpeft.export_job(model, tmp_path / "job", data=DATA, **keywords)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not (tmp_path / "job").exists()
    # what cannot travel follows the kinds: a new option holding a function is refused without a list to edit
    extra = options.TrainOption("on_batch", None, "called on each batch", "run", "function", callable, "a function")
    with options.declared(extra):
        assert "on_batch" in not_exported()
        with pytest.raises(nbpeft.ConfigError, match="on_batch= cannot travel"):
            nbpeft.export_job(model, tmp_path / "job", data=DATA, on_batch=print)
    assert {"live", "loss_fn", "metrics", "eval_data", "resume", "processes"} <= set(not_exported())
    assert "steps=None: optimizer steps" in nbpeft.export_job.__doc__ and "loss_fn=" not in nbpeft.export_job.__doc__
