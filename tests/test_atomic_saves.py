"""Saves cannot half-happen: a process killed (SIGKILL) while saving leaves the old files or the new ones.

A child process saves "new" adapters over "old" ones and is killed at a chosen point of the
save (or after a delay, while it saves in a loop); whatever is left must load with exactly
one of the two sets of weights, and after an overwrite no subfolder of the old save remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import nbpeft
from nbpeft.formats.files import atomic_folder

BUILD = textwrap.dedent('''
    import torch, transformers, nbpeft

    def build(version):
        """'old': adapters default and extra (a subfolder); 'new': default only, other weights."""
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
        names = ["default", "extra"] if version == "old" else ["default"]
        for name in names:
            nbpeft.attach(model, "lora", name=name, r=64, targets="all-linear")
        torch.manual_seed(1 if version == "old" else 2)
        with torch.no_grad():
            for p in [p for n, p in model.named_parameters() if "lora_" in n]:
                p.normal_()
        return model
''')
namespace: dict = {}
exec(BUILD, namespace)
build = namespace["build"]

# The child saves "new" over "old"; KILL_AT names the step of the save at which it kills itself.
CHILD = BUILD + textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from nbpeft.formats import files, peft_folder

    path, kill_at = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(module, name):
        real = getattr(module, name)
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            die()
            return out
        setattr(module, name, wrapped)

    def before(module, name):
        setattr(module, name, lambda *args, **kwargs: die())

    if kill_at == "weights-written":
        after(peft_folder, "save_file")
    elif kill_at == "before-swap":
        before(files, "_swap")
    elif kill_at == "after-swap":
        after(files, "_swap")
    elif kill_at == "while-removing-old":
        real_rmtree = files.shutil.rmtree
        def rmtree(path, *args, **kwargs):  # remove one file of the old folder, then die
            found = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).exists() else []
            if not found:
                return real_rmtree(path, *args, **kwargs)
            found[0].unlink()
            die()
        files.shutil.rmtree = rmtree
    new, old = build("new"), build("old")
    print("ready", flush=True)
    while True:  # "loop": killed from outside after a delay
        nbpeft.save_adapter(new, path, overwrite=True)
        if kill_at != "loop":
            break
        nbpeft.save_adapter(old, path, overwrite=True)
''')


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def versions() -> dict[str, dict[str, torch.Tensor]]:
    return {v: adapter_weights(build(v)) for v in ("old", "new")}


def loaded_version(path: Path, versions: dict) -> str:
    """Which complete save ``path`` holds ('old' or 'new'); fails on anything else."""
    model = build("new")
    nbpeft.detach(model)
    names = [a.name for a in nbpeft.load_adapter(model, path)]
    found = adapter_weights(model)
    match = [v for v, weights in versions.items() if found.keys() == weights.keys()
             and all(torch.equal(found[k], weights[k]) for k in weights)]
    assert len(match) == 1, f"{path} holds neither the old save nor the new one (adapters {names})"
    if match == ["new"]:
        assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    return match[0]


def run_child(path: Path, kill_at: str, delay: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(nbpeft.__file__).parents[1]), *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), kill_at], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"ready"
    if delay is not None:
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    return child.wait(timeout=300)


@pytest.mark.parametrize("kill_at", ["weights-written", "before-swap", "after-swap", "while-removing-old"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_adapters(tmp_path, versions, kill_at):
    path = tmp_path / "adapter"
    nbpeft.save_adapter(build("old"), path)
    assert loaded_version(path, versions) == "old"
    assert run_child(path, kill_at) == -signal.SIGKILL
    expected = "old" if kill_at in ("weights-written", "before-swap") else "new"
    assert loaded_version(path, versions) == expected
    nbpeft.save_adapter(build("old"), path, overwrite=True)  # the next save clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert loaded_version(path, versions) == "old"


def test_a_save_loop_killed_after_various_delays_always_leaves_a_whole_save(tmp_path, versions):
    path = tmp_path / "adapter"
    nbpeft.save_adapter(build("old"), path)
    for delay in (0.0, 0.05, 0.2, 0.5):
        assert run_child(path, "loop", delay) == -signal.SIGKILL
        loaded_version(path, versions)


def test_overwrite_of_every_adapter_leaves_no_subfolder_of_the_older_save(tmp_path, versions):
    path = tmp_path / "adapter"
    nbpeft.save_adapter(build("old"), path)
    assert (path / "extra" / "adapter_config.json").exists()
    nbpeft.save_adapter(build("new"), path, overwrite=True)
    assert loaded_version(path, versions) == "new"


def test_saving_one_named_adapter_keeps_the_others_beside_it(tmp_path):
    old = build("old")
    path = tmp_path / "adapter"
    nbpeft.save_adapter(old, path)
    before = (path / "extra" / "adapter_model.safetensors").read_bytes()
    nbpeft.save_adapter(build("new"), path, name="default", overwrite=True)
    assert (path / "extra" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_block_leaves_the_destination_as_it_was(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out", overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        raise RuntimeError("failed while writing")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_training_checkpoints_are_written_whole(tmp_path, monkeypatch):
    from nbpeft.training import checkpoints

    model = build("new")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    first = checkpoints.save(checkpoints.folder(tmp_path, 1), model, optimizer, None, 1, [])
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoints.save(checkpoints.folder(tmp_path, 2), model, optimizer, None, 2, [])
    assert checkpoints.latest(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
