"""Model cards: the ``README.md`` that ``save_adapter`` and ``export`` write beside the weights.

The Hugging Face Hub's format: YAML front matter (``base_model``, ``library_name``, ``tags``,
``pipeline_tag``) and then Markdown: the method and its settings, the training data and
options of the run that trained it (from the run store, where it was recorded), its
evaluation figures, the loss curve (``loss.png`` beside the card), the framework versions,
and how to load it with nbpeft and with the reference implementation.

A ``README.md`` someone wrote is kept (``overwrite=True`` replaces it); a card nbpeft wrote
before is replaced, since it describes the weights that were there.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import platform
from pathlib import Path
from typing import Any

from torch import nn

from .. import core
from . import run_store

CARD_FILE = "README.md"
CURVE_FILE = "loss.png"
MARK = "<!-- written by nbpeft: saving again replaces this card; remove this line to keep your edits -->"
PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
             "QUESTION_ANS": "question-answering", "SEQ_2_SEQ_LM": "text2text-generation",
             "FEATURE_EXTRACTION": "feature-extraction"}
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}
VERSIONS = ("nbpeft", "torch", "transformers", "safetensors")


def curves_png(curves: dict[str, list[dict[str, Any]]], width: float = 7.0, height: float = 3.4, dpi: int = 90) -> bytes:
    """Train loss (lines) and eval loss (dashed, dots) of each labelled curve, one colour each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    axes = figure.add_subplot()
    for index, (label, points) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        axes.plot([p["step"] for p in points], [p["loss"] for p in points], color=colour, label=f"{label} train")
        evals = [p for p in points if p.get("eval_loss") is not None]
        if evals:
            axes.plot([p["step"] for p in evals], [p["eval_loss"] for p in evals], color=colour, linestyle="--",
                      marker="o", markersize=3, label=f"{label} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    if curves:
        axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_of(adapter: core.Adapter) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The recorded run that trained ``adapter`` and its points; (None, []) when none was recorded or readable."""
    path = run_store.path_of(adapter.run_id) if adapter.run_id else None
    if path is None:
        return None, []
    try:
        rows = run_store.read_runs(path, [adapter.run_id])
        return (rows[0], run_store.read_points(path, adapter.run_id)) if rows else (None, [])
    except run_store.StoreError:
        return None, []


def front_matter(base: str | None, task: str | None, methods: list[str], kind: str) -> str:
    tags = ["nbpeft", "peft", *methods] + ([] if kind == "adapter" else [kind])
    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines.append("library_name: nbpeft")
    if task in PIPELINES:
        lines.append(f"pipeline_tag: {PIPELINES[task]}")
    lines += ["tags:", *(f"- {json.dumps(t)}" for t in dict.fromkeys(tags)), "---"]
    return "\n".join(lines)


def _method_section(adapters: list[core.Adapter]) -> list[str]:
    out = ["## Method", ""]
    for adapter in adapters:
        settings = ", ".join(f"`{k}={v!r}`" for k, v in adapter.options.items() if v is not None)
        share = 100.0 * adapter.num_params / max(adapter.model_params, 1)
        out.append(f"- **{adapter.name}**: {adapter.method} on {len(adapter.targets)} modules ({adapter.target_text()}), "
                   f"{adapter.num_params:,} trainable parameters ({share:.3f}% of {adapter.model_params:,}); {settings}")
    return out + [""]


def _training_section(run: dict[str, Any], points: list[dict[str, Any]], curve: bool) -> list[str]:
    out = ["## Training", "", f"Run `{run['id']}` started {run['started']} on {run['device']} in {run['precision']}, "
           f"{run['steps']} of {run['total_steps']} steps, ended: {run['status']}."]
    if run.get("data_size") or run.get("data_fingerprint"):
        size = f"{run['data_size']:,} examples" if run.get("data_size") else "examples"
        out.append(f"Training data: {size}" + (f", fingerprint `{run['data_fingerprint']}`" if run.get("data_fingerprint")
                                                else "") + ".")
    options = run.get("options") or {}
    if options:
        out += ["", "Options: " + ", ".join(f"`{k}={v!r}`" for k, v in options.items() if v is not None)]
    metrics = _metric_names(points)
    heads = ["step", "train loss", "eval loss", *metrics]
    out += ["", "### Results", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    shown = [p for p in points if p.get("eval_loss") is not None or p.get("metrics")] or points[-1:]
    for p in shown:
        cells = [str(p["step"]), f"{p['loss']:.4f}", "" if p.get("eval_loss") is None else f"{p['eval_loss']:.4f}"]
        cells += [f"{p['metrics'][m]:.4g}" if m in p.get("metrics", {}) else "" for m in metrics]
        out.append("| " + " | ".join(cells) + " |")
    if run.get("seconds"):
        out += ["", f"{run['seconds']:.1f} s, {run['tokens_per_s']:,.0f} tokens/s, peak memory "
                f"{run['peak_mem_bytes'] / 2**20:,.0f} MiB."]
    if curve:
        out += ["", f"![loss curve]({CURVE_FILE})"]
    return [*out, ""]


def _metric_names(points: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for p in points for k in (p.get("metrics") or {})))


def _loading_section(base: str | None, task: str | None, kind: str) -> list[str]:
    base_id = base or "BASE_MODEL"
    if kind == "merged":
        return ["## How to load", "", "```python", "from transformers import AutoTokenizer, "
                f"{AUTO_CLASSES.get(task, 'AutoModel')}", "",
                f'model = {AUTO_CLASSES.get(task, "AutoModel")}.from_pretrained("PATH")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", ""]
    if kind.startswith("gguf"):
        return ["## How to load", "", "With Ollama: `ollama create my-model -f Modelfile`, then `ollama run my-model`; "
                "with llama.cpp: the `.gguf` file" + (" as `--lora` on the base model" if kind == "gguf-adapter" else "")
                + ".", ""]
    auto = AUTO_CLASSES.get(task, "AutoModel")
    return ["## How to load", "", "With nbpeft:", "", "```python", "import nbpeft", "",
            f'model, tokenizer = nbpeft.load_model("{base_id}")', 'nbpeft.load_adapter(model, "PATH")', "```", "",
            "With the reference implementation (`peft`):", "", "```python", f"from transformers import {auto}",
            "from peft import PeftModel", "", f'base = {auto}.from_pretrained("{base_id}")',
            'model = PeftModel.from_pretrained(base, "PATH")', "```", ""]


def render(adapters: list[core.Adapter], base: str | None, task: str | None, *, kind: str = "adapter",
           run: dict[str, Any] | None = None, points: list[dict[str, Any]] = (), curve: bool = False) -> str:
    """The card's text for ``adapters`` (``kind``: adapter, merged, gguf or gguf-adapter), with the run that trained them."""
    title = {"adapter": "adapter", "merged": "merged model", "gguf": "GGUF model", "gguf-adapter": "GGUF adapter"}[kind]
    methods = list(dict.fromkeys(a.method for a in adapters))
    lines = [front_matter(base, task, methods, kind), MARK, "",
             f"# {' + '.join(methods) or 'nbpeft'} {title}" + (f" for {base}" if base else ""), "",
             f"Trained with nbpeft ({' + '.join(methods)}) on top of `{base or 'the base model'}`.", ""]
    lines += _method_section(adapters)
    lines += _training_section(run, points, curve) if run else ["## Training", "", "No recorded run trained this "
                                                                "adapter in this session.", ""]
    lines += _loading_section(base, task, kind)
    versions = [f"- {name} {v}" for name in VERSIONS if (v := _version(name))]
    lines += ["## Framework versions", "", f"- Python {platform.python_version()}", *versions, ""]
    return "\n".join(lines)


def write(folder: Path, model: nn.Module, names: list[str], base: str | None, task: str | None, *,
          kind: str = "adapter", overwrite: bool = False, saved_as: Path | None = None) -> list[str]:
    """Write ``README.md`` (and ``loss.png`` when a run was recorded) into ``folder``; the file names written.

    A card nbpeft did not write is kept unless ``overwrite``. Saving an adapter also notes
    where it was saved (``saved_as``: the folder's final place when ``folder`` is the temporary
    one it is written in) on the run that trained it (``nbpeft.runs()``'s "saved to").
    """
    folder = Path(folder)
    card = folder / CARD_FILE
    # the card at the folder's final place counts too: a save keeps it there unless told to overwrite
    for existing in (card, Path(saved_as or folder) / CARD_FILE):
        if existing.exists() and not overwrite and MARK not in existing.read_text(errors="replace"):
            return []
    st = core.state(model)
    adapters = [st.adapters[n] for n in names if n in st.adapters]
    run, points = _run_of(adapters[0]) if adapters else (None, [])
    written = []
    # a file kept from an earlier save may be a hard link to it: a new file, never a write through the link
    (folder / CURVE_FILE).unlink(missing_ok=True)
    card.unlink(missing_ok=True)
    if points:
        (folder / CURVE_FILE).write_bytes(curves_png({run["id"]: points}))
        written.append(CURVE_FILE)
    card.write_text(render(adapters, base, task, kind=kind, run=run, points=points, curve=bool(points)))
    if run is not None and kind == "adapter":
        try:
            run_store.update_run(run_store.path_of(run["id"]), run["id"], {"adapter_path": str(Path(saved_as or folder).resolve())})
        except run_store.StoreError:
            pass  # the card is written; the record only misses where the adapter went
    return [CARD_FILE, *written]
