"""Save and load adapters in the published PEFT checkpoint format.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; adapter
``default`` goes in the folder itself and any other name in a subfolder of that name.
Tensor keys are ``base_model.model.<module path>.<parameter>`` with no adapter name,
the layout the reference implementation and serving tools read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import core, targeting
from ..data import new_tokens as tokens
from ..errors import ConfigError
from ..layers import adapter_layers
from ..methods import lora_init
from ..methods.base import REFERENCE_PREFIX, get_method, method_for_file, peft_types
from ..methods.lora import LoRALinear
from ..models import cache_dir
from . import card
from .files import atomic_folder, check_exists, visible

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# the built-in models load from a local cache folder; adapter configs name them by hub id
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def task_type(model: nn.Module) -> str:
    cls = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if cls.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


def _folder(path: Path, name: str) -> Path:
    return path if name == "default" else path / name


def base_model_id(model: nn.Module) -> str | None:
    """What adapter_config.json names as the base model: a built-in model's hub id, else what transformers recorded."""
    recorded = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if recorded and Path(recorded).parent == cache_dir():
        return BUILTIN_HUB_IDS.get(Path(recorded).name, recorded)
    return recorded


def save_adapter(
    model: nn.Module, path: str | Path, name: str | None = None, overwrite: bool = False, as_plain_lora: bool = False
) -> list[Path]:
    """Write adapter ``name`` (default: every adapter) to ``path``; returns the folders written.

    An existing adapter folder or a file in the way is replaced only with ``overwrite=True``;
    saving every adapter (``name=None``) with it replaces the whole folder, so no adapter of an
    older save is left beside the new ones. The files are written to a hidden folder beside
    ``path`` and renamed into place: a save that is interrupted leaves the old files as they were.

    A lora adapter with ``init='pissa'`` or ``'olora'`` is saved as the reference saves it: its
    ``A`` and ``B``, and the init, which loading runs again on the original model to rebuild the
    residual base. ``as_plain_lora=True`` writes instead the plain LoRA of rank ``2r`` that it
    amounts to on the original base (``s·(B A - B₀ A₀)``, B₀ A₀ from attach): it loads on the
    unchanged model and beside other adapters.
    """
    names = core.resolve_adapter_names(model, name, "save_adapter")
    if as_plain_lora:
        for n in names:
            _check_plain_lora(model, n)
    path = Path(path)
    folders = [_folder(path, n) for n in names]
    files = [p for p in dict.fromkeys([path, *folders]) if p.is_file()]
    adapters = [f for f in folders if (f / CONFIG_FILE).exists() or (f / WEIGHTS_FILE).exists()]
    if (files or adapters) and not overwrite:
        taken, what = (files[0], "is a file") if files else (adapters[0], "already holds an adapter")
        raise ConfigError(f"save_adapter(): {taken} {what}; choose another path or pass overwrite=True")
    contents = [(n, *_contents(model, n, as_plain_lora)) for n in names]
    if name is not None and "default" not in names:
        # named adapters only: each subfolder is replaced on its own, its siblings stay
        for n, config, tensors in contents:
            with atomic_folder(_folder(path, n), overwrite=overwrite) as folder:
                _write(folder, config, tensors)
                card.write(folder, model, [n], base_model_id(model), task_type(model), overwrite=overwrite,
                           saved_as=_folder(path, n))
        return folders
    # every adapter (or 'default', which lives in the folder itself) in one folder; an overwrite of
    # every adapter replaces it whole, so no subfolder of an older save survives
    with atomic_folder(path, overwrite=overwrite, keep_others=not (overwrite and name is None)) as folder:
        for n, config, tensors in contents:
            _write(_folder(folder, n), config, tensors)
            card.write(_folder(folder, n), model, [n], base_model_id(model), task_type(model), overwrite=overwrite,
                       saved_as=_folder(path, n))
    return folders


def _contents(model: nn.Module, name: str, as_plain_lora: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adapter ``name``'s ``adapter_config.json`` (as a dict) and its tensors, on the CPU."""
    adapter = core.state(model).adapters[name]
    spec = get_method(adapter.method)
    config = {
        "peft_type": spec.peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_id(model),
        "inference_mode": True,
        "modules_to_save": adapter.saved_modules or None,
        **spec.to_peft_config(adapter.config, model, adapter.targets),
        **tokens.peft_config(model, name),
    }
    tensors = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in spec.checkpoint_tensors(model, adapter, core.adapter_parameters(model, name)).items()
    }
    if as_plain_lora:
        config, tensors = _as_plain_lora(model, name, config, tensors)
    return config, tensors


def _write(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _initial_factors(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(A₀, B₀)`` of adapter ``name`` by ``<prefix><module path>``, for layers whose init rewrote the base."""
    return {REFERENCE_PREFIX + path: layer.initial_factors[name] for path, layer in adapter_layers(model)
            if name in layer.initial_factors}


def _check_plain_lora(model: nn.Module, name: str) -> None:
    adapter = core.state(model).adapters[name]
    init = getattr(adapter.config, "init", None)
    if adapter.method != "lora" or init not in ("pissa", "olora") or not _initial_factors(model, name):
        what = f"a {adapter.method} adapter" + (f" with init={init!r}" if init else "")
        raise ConfigError(f"save_adapter(): as_plain_lora=True converts a lora adapter with init='pissa' or 'olora'; "
                          f"{name!r} is {what}; save it without as_plain_lora")


def _as_plain_lora(
    model: nn.Module, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of the rank-2r plain LoRA equal to adapter ``name`` on the original base."""
    tensors = lora_init.plain_lora(tensors, _initial_factors(model, name))
    alpha_factor = 2**0.5 if config.get("use_rslora") else 2  # the scale alpha/r (or alpha/sqrt(r)) stays the same
    config = {
        **config, "init_lora_weights": True, "r": 2 * config["r"], "lora_alpha": alpha_factor * config["lora_alpha"],
        "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
        "alpha_pattern": {k: alpha_factor * v for k, v in (config.get("alpha_pattern") or {}).items()},
    }
    return config, tensors


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"load_adapter(): {folder / CONFIG_FILE} is not valid JSON ({err})") from None


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None,
                 hotswap: bool = False) -> list[core.Adapter]:
    """Attach the adapter(s) saved at ``path`` (by nbpeft or the reference implementation).

    Shapes and module names are checked against the model; on any mismatch the error
    says what differs and the model is left as it was. ``hotswap=True`` writes the file's
    LoRA into the already loaded adapter ``name`` (default 'default') instead, with no
    recompile of a compiled model (see :func:`hotswap_adapter`).
    """
    if hotswap:
        return [hotswap_adapter(model, path, name or "default")]
    path = check_exists(path, "load_adapter", "a folder written by save_adapter()")
    if name is not None and (path / name / CONFIG_FILE).exists():
        folders = {name: path / name}
    elif name is not None and (path / CONFIG_FILE).exists():
        folders = {name: path}
    else:
        # "default" lives in the folder itself, every other adapter in a subfolder
        folders = {"default": path} if (path / CONFIG_FILE).exists() else {}
        folders.update({p.name: p for p in sorted(path.glob(f"*/{CONFIG_FILE}")) for p in [p.parent] if visible(p)})
        if not folders:
            raise ConfigError(f"load_adapter(): no {CONFIG_FILE} in {path} (or its subfolders); save one with save_adapter()")
    loaded = []
    for adapter_name, folder in folders.items():
        loaded.append(_load_one(model, folder, adapter_name))
    return loaded


def _load_one(model: nn.Module, folder: Path, name: str) -> core.Adapter:
    cfg = _read_config(folder)
    spec = method_for_file(cfg)
    if spec is None:
        raise ConfigError(f"load_adapter(): {folder} holds a {cfg.get('peft_type')} adapter; nbpeft loads {', '.join(peft_types())}")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        alt = "adapter_model.bin" if (folder / "adapter_model.bin").exists() else None
        why = f" (only {alt}, a pickle file, which nbpeft does not load; re-save it as safetensors)" if alt else ""
        raise ConfigError(f"load_adapter(): {weights_path} is missing{why}")
    tensors = load_file(str(weights_path))
    options = spec.from_peft_config(cfg)
    if isinstance(options.get("targets"), list):  # names for other architectures: the reference skips them too
        modules = [p for p in targeting.base_modules(model) if p]
        present = [t for t in options["targets"] if any(targeting.match(p, [t]) for p in modules)]
        options["targets"] = present or options["targets"]
    options["modules_to_save"] = saved_module_paths(model, cfg.get("modules_to_save") or [])
    token_rows = tokens.check_fits(model, cfg[tokens.CONFIG_KEY], folder) if cfg.get(tokens.CONFIG_KEY) else {}
    adapter = core.attach(model, spec.name, name=name, **options)
    try:
        found = spec.from_checkpoint(model, adapter, tensors)
        if token_rows:
            tokens.add_rows(model, name, token_rows)
            found = tokens.without_base_rows(model, name, found, folder)
        _copy_tensors(model, name, without_base_copies(model, name, found, folder), folder)
    except Exception:
        core.detach(model, name)
        raise
    adapter.trained = True
    return adapter


def saved_module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """A file's ``modules_to_save`` as this model's module paths.

    A name stands for every module whose path ends in it (as the reference reads it); names
    this model lacks are dropped, so a classifier file listing ``["classifier", "score"]``
    loads into a model with either head. Tensors the file holds for a dropped module still
    make the load fail, as tensors that do not fit.
    """
    modules = targeting.base_modules(model)
    paths = [p for p in modules if p and any(p == n or p.endswith("." + n) for n in names)]
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]  # a head's own layers go with it


@torch.no_grad()
def without_base_copies(model: nn.Module, name: str, found: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """``found`` without the copies of base weights the reference saves beside adapted embeddings.

    They are dropped when they equal this model's weights; one that differs would change the
    outputs, so it is refused (nbpeft never overwrites base weights on load).
    """
    params = core.adapter_parameters(model, name)
    modules = targeting.base_modules(model)
    out = dict(found)
    for key in found:
        if key in params or not key.endswith(".weight"):
            continue
        path = key.removesuffix(".weight").removesuffix(".base_layer")
        weight = getattr(modules.get(path), "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue  # not a base weight: _copy_tensors reports it
        saved = out.pop(key)
        if saved.shape != weight.shape or not torch.equal(saved.to(weight.dtype), weight.detach().to(saved.device)):
            raise ConfigError(f"load_adapter(): {folder} holds a copy of {path}'s weights that differs from this model's "
                              "(saved from another base model or after a vocabulary resize); load it onto that model")
    return out


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    params = core.adapter_parameters(model, name)
    stripped = {}
    for key, value in tensors.items():
        if key not in params:  # some writers keep the adapter name inside the key
            key = key.replace(f".{name}.", ".").replace(".default.", ".")
        stripped[key] = value
    missing = sorted(set(params) - set(stripped))
    unexpected = sorted(set(stripped) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        raise ConfigError(f"load_adapter(): {folder} does not fit this model: " + "; ".join(parts))
    bad = [(k, tuple(stripped[k].shape), tuple(p.shape)) for k, p in params.items() if stripped[k].shape != p.shape]
    if bad:
        k, got, want = bad[0]
        raise ConfigError(f"load_adapter(): {len(bad)} shape mismatches, e.g. {k}: file {got}, model {want}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(stripped[key].to(param.dtype))


def hotswap_adapter(model: nn.Module, path: str | Path, name: str = "default") -> core.Adapter:
    """Put the LoRA saved at ``path`` in place of adapter ``name``'s weights, tensor by tensor.

    The file must adapt the same modules with a rank at most the loaded adapter's: a lower rank
    is padded with zeros, and the ratio of the two scales (alpha / r) goes into ``B``, so the
    outputs are those of the file's adapter while every tensor keeps its shape and dtype and
    every layer its Python settings. A model compiled with ``torch.compile`` (or the compiled
    wrapper itself) therefore runs the new adapter without recompiling. Nothing changes on error.
    """
    fn = "load_adapter(hotswap=True)"
    model = getattr(model, "_orig_mod", model)  # the module under a torch.compile wrapper
    st = core.state(model)
    if name not in st.adapters:
        raise ConfigError(f"{fn}: no adapter named {name!r} to replace; load the first one without hotswap=True")
    adapter = st.adapters[name]
    if adapter.method != "lora" or adapter.merged or adapter.saved_modules:
        why = ("is merged; nbpeft.unmerge(model) first" if adapter.merged
               else f"also trains {', '.join(adapter.saved_modules)}" if adapter.saved_modules else f"is {adapter.method}")
        raise ConfigError(f"{fn}: adapter {name!r} {why}; hot-swapping takes an unmerged plain lora adapter")
    folder = check_exists(path, "load_adapter", "a folder written by save_adapter()")
    if not (folder / CONFIG_FILE).exists() and (folder / name / CONFIG_FILE).exists():
        folder = folder / name
    if not (folder / CONFIG_FILE).exists():
        raise ConfigError(f"{fn}: no {CONFIG_FILE} in {folder}; save one with save_adapter()")
    cfg = _read_config(folder)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save") or cfg.get(tokens.CONFIG_KEY):
        raise ConfigError(f"{fn}: {folder} is not a plain LoRA file (no DoRA, modules_to_save or new tokens); "
                          "load it without hotswap=True")
    options = get_method("lora").from_peft_config(cfg)
    if options.get("rank_pattern") or options.get("alpha_pattern"):
        raise ConfigError(f"{fn}: {folder} sets ranks per layer; load it without hotswap=True")
    r, alpha = options["r"], options["alpha"]
    scale = alpha / (math.sqrt(r) if options["rslora"] else r)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        raise ConfigError(f"{fn}: {weights_path} is missing")
    params = core.adapter_parameters(model, name)
    found = get_method("lora").from_checkpoint(model, adapter, load_file(str(weights_path)))
    # some writers keep the adapter name inside the key
    found = {key if key in params else key.replace(f".{name}.", ".").replace(".default.", "."): value
             for key, value in found.items()}
    if set(found) != set(params):
        missing, unexpected = sorted(set(params) - set(found)), sorted(set(found) - set(params))
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the loaded adapter has not"
        raise ConfigError(f"{fn}: {folder} adapts other modules than {name!r} ({what}); load it without hotswap=True")
    writes = []
    for path_, layer in core.adapter_layers(model):
        if not isinstance(layer, LoRALinear) or name not in layer.lora_A:
            continue
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        new_A, new_B = found[f"{path_}.lora_A.weight"], found[f"{path_}.lora_B.weight"]
        if new_A.shape[0] > A.shape[0]:
            raise ConfigError(f"{fn}: {folder} has rank {new_A.shape[0]} at {path_}, above the loaded adapter's "
                              f"{A.shape[0]}; load the adapter of the highest rank first, then swap in the others")
        if new_A.shape[1:] != A.shape[1:] or new_B.shape[0] != B.shape[0] or new_B.shape[1] != new_A.shape[0]:
            raise ConfigError(f"{fn}: {folder} does not fit {path_}: A {tuple(new_A.shape)}, B {tuple(new_B.shape)}")
        writes.append((A, B, new_A, new_B * (scale / layer.scaling[name])))
    with torch.no_grad():
        for A, B, new_A, new_B in writes:
            A.zero_()[: new_A.shape[0]].copy_(new_A)
            B.zero_()[:, : new_B.shape[1]].copy_(new_B)
    adapter.trained = True
    return adapter
