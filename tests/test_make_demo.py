"""`make demo` shows its progress and never fails because the machine is slow (no cell timeout)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
SCRIPT = ROOT / "scripts" / "run_notebook.py"


TRAIN = """# a few steps of training: the banner and the progress line
import torch, transformers, nbpeft
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
nbpeft.attach(model, "lora", r=2)
result = nbpeft.train(model, [{"input_ids": [1, 2, 3, 4]}] * 4, steps=3, batch_size=2)"""
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_demo_runs_the_quickstart_through_the_progress_script():
    recipe = re.search(r"^demo:.*?(?=^\S)", MAKEFILE.read_text(), re.S | re.M)[0]
    assert "scripts/run_notebook.py notebooks/01_quickstart.ipynb artifacts" in recipe


def test_the_script_sets_no_cell_timeout(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_notebook", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    timeouts = []
    monkeypatch.setattr(script.ProgressClient, "execute", lambda self: timeouts.append(self.timeout))
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), tmp_path / "n.ipynb")
    assert script.run(tmp_path / "n.ipynb", tmp_path) == 0
    assert timeouts == [None]


def test_progress_is_printed_as_the_cells_run_and_the_html_is_written(tmp_path):
    pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# a title"),
        nbformat.v4.new_code_cell("print('first output', flush=True)\nimport time\ntime.sleep(3)"),
        nbformat.v4.new_code_cell("from IPython.display import HTML, display\n"
                                  "handle = display(HTML('<b>step 1</b>'), display_id=True)\n"
                                  "handle.update(HTML('<b>step 2</b> &amp; more'))"),
        nbformat.v4.new_code_cell(TRAIN),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "demo.ipynb"
    nbformat.write(notebook, path)
    child = subprocess.Popen([sys.executable, str(SCRIPT), str(path), str(tmp_path / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines, running = [], None
    for line in child.stdout:
        lines.append(line.rstrip("\n"))
        if "first output" in line:
            running = child.poll() is None  # shown while the cell still sleeps, not at the end
    child.wait(timeout=120)
    assert child.returncode == 0, child.stderr.read()
    assert running is True
    assert lines[:6] == ["[cell 1/3] print('first output', flush=True)", "    first output",
                         "[cell 2/3] from IPython.display import HTML, display", "    step 1", "    step 2 & more",
                         "[cell 3/3] # a few steps of training: the banner and the progress line"]
    assert any(line.startswith("    nbpeft: training ") for line in lines)  # the banner
    assert any(line.startswith("    step 3/3 · loss ") for line in lines)  # the progress line, step by step
    assert lines[-1] == f"executed demo.ipynb: {(tmp_path / 'out' / 'demo.html').resolve()}"
    assert "first output" in (tmp_path / "out" / "demo.html").read_text()
