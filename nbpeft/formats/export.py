"""Get a trained adapter out of the notebook: a merged checkpoint, GGUF files, checks per target.

    nbpeft.export(model, "out/merged", tokenizer=tokenizer)                   # plain transformers folder
    nbpeft.export(model, "out/gguf", format="gguf", tokenizer=tokenizer)      # llama.cpp / Ollama model
    nbpeft.export(model, "out/lora-gguf", format="gguf-adapter")              # llama.cpp LoRA adapter
    print(nbpeft.check_export(model, "vllm"))                                 # what vLLM would refuse

The notebook's model is never changed: each adapted layer is copied on its own and merged
there, and the untouched weights are shared, not copied. Everything is written to a
temporary folder next to ``path`` and renamed at the end, so a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..layers import base_path
from ..methods.base import AdapterLayer, Method, get_method, method_for_file, registered
from . import card, peft_folder
from .files import atomic_folder, check_exists, check_free, visible

FORMATS = ("merged", "gguf", "gguf-adapter")
TARGETS = ("vllm", "llama.cpp", "ollama", "peft")
_VLLM_MAX_LORA_RANK = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    path: Path
    format: str
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        notes = "".join(f"; {n}" for n in self.notes)
        return f"exported {self.format} to {self.path} ({', '.join(self.files)}){notes}"


# ---------------------------------------------------------------- the merged weights


def _active(model: nn.Module, fn: str) -> list[str]:
    st = core.state(model)
    if not st.adapters:
        raise ConfigError(f"{fn}(): this model has no adapter; attach or load one first (nbpeft.attach / nbpeft.load_adapter)")
    return list(st.active)


def _state_key(model: nn.Module) -> tuple:
    st = core.state(model)
    return tuple(st.active), tuple((n, a.merged) for n, a in st.adapters.items())


def _refuse_unmergeable(model: nn.Module, names: list[str], fn: str) -> None:
    for name in names:
        method = core.state(model).adapters[name].method
        if not get_method(method).mergeable:
            raise ConfigError(
                f"{fn}(): the {method} adapter {name!r} changes activations, not weights, so it cannot be folded into "
                "a model; export its adapter folder with nbpeft.save_adapter(model, path) instead"
            )


def _dequantised(quantised: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` holding an NF4 layer's dequantised weight (QLoRA's base)."""
    plain = nn.Linear(quantised.in_features, quantised.out_features, bias=quantised.bias is not None, device="meta")
    plain.weight = nn.Parameter(quantised.dequantize(quantised.weight_dtype), requires_grad=False)
    if quantised.bias is not None:
        plain.bias = nn.Parameter(quantised.bias.detach().clone(), requires_grad=False)
    return plain


def _merged_module(layer: AdapterLayer, names: list[str]) -> nn.Module:
    """A merged copy of the plain module under ``layer`` (the notebook's layer is not touched)."""
    if isinstance(layer, core.TrainedCopy):
        active = [n for n in names if n in layer.adapter_names]
        return copy.deepcopy(layer.modules_to_save[active[0]] if active else layer.base_layer)
    work = copy.deepcopy(layer)
    chain = []
    module: nn.Module = work
    while isinstance(module, AdapterLayer):
        # A layer that holds none of ``names`` unmerged, and nothing merged, plays no part: skip it.
        if set(names) & set(module.adapter_names) - set(module.merged) or module.merged:
            chain.append(module)
        module = module.base_layer
    if hasattr(module, "dequantize"):  # QLoRA: the update goes onto the dequantised NF4 weight
        plain = _dequantised(module)
        if chain:
            chain[0].base_layer = plain  # delta_weight reads the base weight's dtype
        with torch.no_grad():
            for n in names:
                if chain and n in chain[0].adapter_names:
                    plain.weight += chain[0].delta_weight(n).to(plain.weight.dtype)
        return plain
    for outer, inner in zip(chain, chain[1:]):
        outer.base_layer = inner
    if chain:
        chain[-1].base_layer = module
    for adapted in reversed(chain):  # innermost first
        for n in names:
            if n in adapted.adapter_names and n not in adapted.merged:
                try:
                    adapted.merge(n)
                except NotImplementedError as err:
                    raise ConfigError(f"export(): adapter {n!r} cannot be merged here: {err}") from None
    return module


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The base model's state_dict (transformers names) with the active adapters folded in.

    Weights of layers without an adapter are the notebook's own tensors (shared, not copied)
    unless ``dtype`` asks for a cast. Returns the state_dict and the dtype it is in.
    """
    names = _active(model, "export")
    _refuse_unmergeable(model, names, "export")
    layers: dict[str, AdapterLayer] = {}
    for path, layer in core.adapter_layers(model):
        layers.setdefault(path, layer)  # the outermost layer at each path
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        plain = base_path(key)
        if not any(plain.startswith(p + ".") for p in layers):
            out[plain] = value
    base_dtypes = [v.dtype for v in out.values() if v.is_floating_point()]
    for path, layer in layers.items():
        for key, value in _merged_module(layer, names).state_dict().items():
            out[f"{path}.{key}"] = value.detach()
            base_dtypes.append(value.dtype)
    target = dtype or max(set(base_dtypes), key=base_dtypes.count)
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in out.items()}, target


def _plain_model(model: nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """The model's own transformers class, without adapters, holding ``state_dict``."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    with torch.device("meta"):
        plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"export(): the merged weights do not fit {type(model).__name__} (missing {missing[:2]}, extra {unexpected[:2]})")
    plain.generation_config = copy.deepcopy(model.generation_config) if getattr(model, "generation_config", None) else plain.generation_config
    return plain


# ---------------------------------------------------------------- writing


def _tokenizer_for(model: nn.Module, tokenizer: Any, fn: str) -> Any:
    if tokenizer is not None:
        return tokenizer
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    if source and Path(source).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    raise ConfigError(f"{fn}(): no tokenizer to export with the model; pass tokenizer= (the one load_model returned)")


def _eos_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """Every token that ends a reply: the generation config's, the tokenizer's, and a chat template's turn end."""
    ids: list[int] = []
    current = getattr(generation_config, "eos_token_id", None)
    ids += current if isinstance(current, list) else [current]
    ids.append(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None) or ""
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in template:
            ids.append(tokenizer.convert_tokens_to_ids(marker))
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))


def _write_merged(model: nn.Module, folder: Path, tokenizer: Any, dtype: torch.dtype | None) -> list[str]:
    state_dict, target = merged_state_dict(model, dtype)
    plain = _plain_model(model, state_dict, target)
    eos = _eos_ids(tokenizer, plain.generation_config)
    plain.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    plain.config.eos_token_id = eos[0]
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir())


def export(
    model: nn.Module,
    path: str | Path,
    format: str = "merged",
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    quant: str = "f16",
    overwrite: bool = False,
) -> ExportResult:
    """Write the model with its active adapter for another program; the model itself is unchanged.

    - ``"merged"``: a plain transformers folder (config, safetensors, tokenizer, generation
      config) of the base with the active adapters folded in, in the base's dtype or ``dtype``.
    - ``"gguf"``: the merged model as ``model.gguf`` (``quant`` ``"f16"`` or ``"q8_0"``, written by
      nbpeft, or ``"q4_k_m"`` or ``"q5_k_m"``, llama.cpp's quantiser's work on nbpeft's f16 file,
      which needs llama-cpp-python) with its tokenizer, plus an Ollama ``Modelfile`` (llama.cpp
      architectures of the Llama family).
    - ``"gguf-adapter"``: the LoRA adapter as llama.cpp reads it (``adapter.gguf``), plus a
      ``Modelfile`` whose ``ADAPTER`` line points at it.

    An existing, non-empty ``path`` is replaced (whole) only with ``overwrite=True``, as in
    :func:`save_adapter`. The files are written to a hidden folder beside ``path`` and renamed
    into place at the end, so an export that fails or is interrupted leaves ``path`` as it was.
    """
    if format not in FORMATS:
        import difflib

        close = difflib.get_close_matches(str(format), FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"export(): format={format!r} is not known{hint}; use one of {', '.join(map(repr, FORMATS))}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"export(): dtype={dtype!r} is not supported; use one of {', '.join(map(repr, DTYPES))}")
        dtype = DTYPES[dtype]
    from . import gguf as gguf_export

    if quant not in gguf_export.QUANTS:
        raise ConfigError(f"export(): quant={quant!r} is not supported; use one of {', '.join(map(repr, gguf_export.QUANTS))}")
    if format == "gguf-adapter" and quant in gguf_export.K_QUANTS:
        raise ConfigError(f"export(): quant={quant!r} is for format='gguf' (the merged model); llama.cpp's quantiser takes whole "
                          "models, not LoRA adapters, so format='gguf-adapter' is written in f32")
    if format == "gguf":
        gguf_export.llama_quantiser(quant)  # a K-quant's missing llama-cpp-python is said now, before any work
    target = Path(path)
    check_free(target, overwrite, "export")
    names = _active(model, "export")
    before = _state_key(model)
    if format == "gguf-adapter":
        gguf_export.check_adapter(model, names)
    else:
        _refuse_unmergeable(model, names, "export")
    if format != "gguf-adapter":
        tokenizer = _tokenizer_for(model, tokenizer, "export")
    with atomic_folder(target, overwrite=overwrite) as tmp:
        notes: list[str] = []
        if format == "merged":
            files = _write_merged(model, tmp, tokenizer, dtype)
        elif format == "gguf":
            state_dict, _ = merged_state_dict(model, torch.float32)
            files, notes = gguf_export.write_model(model.config, state_dict, tokenizer, tmp, quant)
        else:
            files, notes = gguf_export.write_adapter(model, names, tmp)
        files += card.write(tmp, model, names, peft_folder.base_model_id(model), peft_folder.task_type(model), kind=format)
        if _state_key(model) != before:
            raise ConfigError("export(): the adapters were merged, unmerged or switched while exporting; nothing was written, export again")
    return ExportResult(target, format, files, notes)


# ---------------------------------------------------------------- checks per target


class ExportCheck(list):
    """One line per problem a target program will have with the export; empty means fine."""

    def __init__(self, target: str, lines: list[str]) -> None:
        super().__init__(lines)
        self.target = target

    def __repr__(self) -> str:
        return "\n".join(self) if self else f"{self.target}: no problems found"

    __str__ = __repr__


class _ForeignMethod(Method):
    """What check_export assumes of a folder whose peft_type no registered method reads (another tool's)."""

    name = ""
    mergeable = True
    in_reference = True  # most likely written by the reference itself


def _folder_facts(path: Path) -> list[dict[str, Any]]:
    """Per-adapter facts read from a saved adapter folder (adapter_config.json files)."""
    from safetensors import safe_open

    facts = []
    check_exists(path, "check_export", "a folder written by save_adapter()")
    for cfg_file in sorted([path / "adapter_config.json", *path.glob("*/adapter_config.json")]):
        if not cfg_file.exists() or (cfg_file.parent != path and not visible(cfg_file.parent)):
            continue
        cfg = json.loads(cfg_file.read_text())
        weights = cfg_file.parent / "adapter_model.safetensors"
        keys: list[str] = []
        if weights.exists():
            with safe_open(str(weights), "pt") as f:
                keys = list(f.keys())
        spec = method_for_file(cfg) or _ForeignMethod()
        method = spec.name if spec.name else str(cfg.get("peft_type", "")).lower()
        saved = list(cfg.get("modules_to_save") or [])
        saved += sorted({k.split(".")[-2] for k in keys if k.endswith((".embed_tokens.weight", ".lm_head.weight"))})
        arch = None
        base = cfg.get("base_model_name_or_path")
        if base and (Path(base) / "config.json").exists():
            arch = json.loads((Path(base) / "config.json").read_text()).get("model_type")
        facts.append({"name": cfg_file.parent.name if cfg_file.parent != path else "default", "method": method,
                      "spec": spec, "rank": cfg.get("r"), "saved": saved, "model_type": arch})
    if not facts:
        raise ConfigError(f"check_export(): {path} holds no adapter_config.json; pass the model or a folder written by save_adapter()")
    return facts


def _model_facts(model: nn.Module) -> list[dict[str, Any]]:
    st = core.state(model)
    names = _active(model, "check_export")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return [{"name": n, "method": st.adapters[n].method, "spec": get_method(st.adapters[n].method),
             "rank": getattr(st.adapters[n].config, "r", None), "saved": list(st.adapters[n].saved_modules),
             "model_type": model_type} for n in names]


def check_export(model_or_path: nn.Module | str | Path, target: str) -> ExportCheck:
    """What ``target`` (``"vllm"``, ``"llama.cpp"``, ``"ollama"``, ``"peft"``) will reject or silently ignore.

    Each line names the problem and what to do; an empty result means no known problem.
    """
    if target not in TARGETS:
        raise ConfigError(f"check_export(): target={target!r} is not known; use one of {', '.join(map(repr, TARGETS))}")
    facts = _folder_facts(Path(model_or_path)) if isinstance(model_or_path, (str, Path)) else _model_facts(model_or_path)
    lines: list[str] = []
    for fact in facts:
        who = f"adapter {fact['name']!r} ({fact['method']})"
        lines += [f"{target}: {who}: {problem}" for problem in _problems(target, fact)]
    return ExportCheck(target, lines)


def _method_line(target: str, spec: Method, method: str) -> str | None:
    """What ``target`` makes of the method itself: the method's own note for it, else what its abilities imply."""
    note = spec.serving_notes.get("llama.cpp" if target == "ollama" else target)
    if note:
        return note
    if target == "vllm" and not spec.plain_lora:
        if spec.mergeable and not spec.weight_delta:  # merging is the only way: no LoRA holds its change
            return "vLLM serves LoRA only; export format='merged'"
        return "vLLM serves LoRA only; export format='merged' if the method merges, or use nbpeft.to_lora()"
    if target in ("llama.cpp", "ollama") and not spec.mergeable:
        return "has no GGUF form; save it with nbpeft.save_adapter() for the reference peft"
    if target in ("llama.cpp", "ollama") and not spec.plain_lora:
        convert = " or convert with nbpeft.to_lora()" if spec.weight_delta else ""
        return f"GGUF adapters are LoRA only; export format='gguf' (merged){convert}"
    if target == "peft" and not spec.in_reference:
        return f"the reference has no {method} format; it refuses this folder's peft_type"
    return None


def _problems(target: str, fact: dict[str, Any]) -> list[str]:
    """What ``target`` will refuse or ignore in one adapter."""
    from . import gguf as gguf_export

    spec: Method = fact["spec"]
    rank, saved, arch = fact["rank"], fact["saved"], fact["model_type"]
    out = []
    if target in ("llama.cpp", "ollama") and arch is not None and arch not in gguf_export.ARCHITECTURES:
        out.append(f"the architecture {arch!r} is not one nbpeft writes as GGUF "
                   f"({', '.join(gguf_export.ARCHITECTURES)}); use llama.cpp's convert_hf_to_gguf.py on a merged export")
    out.append(_method_line(target, spec, fact["method"]))
    if target == "vllm" and spec.weight_delta and rank and rank > _VLLM_MAX_LORA_RANK:
        out.append(f"r={rank} is above vLLM's default max_lora_rank of {_VLLM_MAX_LORA_RANK}; "
                   f"start vLLM with --max-lora-rank {_vllm_rank(rank)} or re-attach with r<={_VLLM_MAX_LORA_RANK}")
    if target == "vllm" and saved:
        out.append(f"full copies of {', '.join(saved)} (modules_to_save) are refused; export format='merged' instead")
    if target in ("llama.cpp", "ollama") and saved:
        out.append(f"full copies of {', '.join(saved)} cannot go into a GGUF adapter; export format='gguf' (merged) instead")
    return [line for line in out if line]


def _vllm_rank(rank: int) -> int:
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512, rank) if r >= rank)


# ---------------------------------------------------------------- conversion to LoRA


@dataclass
class LoraConversion:
    """The result of :func:`to_lora`: the new adapter and how far it is from the original."""

    name: str
    source: str
    rank: int
    relative_error: float
    per_layer: dict[str, float]

    def __repr__(self) -> str:
        worst = max(self.per_layer.items(), key=lambda kv: kv[1])
        return (f"LoRA {self.name!r} (r={self.rank}) from {self.source!r}: relative Frobenius error "
                f"{self.relative_error:.2e} over all weight deltas (worst {worst[1]:.2e} at {worst[0]})")


def _weight_deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``W_adapted - W`` (out x in, float32) for every layer the adapter changes."""
    deltas = {}
    for path, layer in core.adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        if isinstance(layer.base_layer, AdapterLayer) or not hasattr(layer.base_layer, "weight") and not hasattr(layer.base_layer, "dequantize"):
            raise ConfigError(f"to_lora(): {path} holds stacked adapters; detach the others first")
        original = _merged_module(layer, [])
        merged = _merged_module(layer, [name])
        weight, before = merged.weight.float(), original.weight.float()
        if layer.fan_in_fan_out:
            weight, before = weight.T, before.T
        bias_changed = getattr(merged, "bias", None) is not None and not torch.equal(merged.bias, original.bias)
        if bias_changed:
            raise ConfigError(f"to_lora(): adapter {name!r} changes the bias of {path}, which a LoRA cannot hold")
        deltas[path] = (weight - before).detach()
    return deltas


def to_lora(model: nn.Module, rank: int = 8, name: str | None = None, source: str | None = None) -> LoraConversion:
    """Replace adapter ``source`` (default: the active one) by a plain LoRA of ``rank``.

    Works for methods whose effect is a weight delta ``ΔW`` (DoRA, (IA)³, LoRA of higher rank):
    the best rank-``rank`` approximation of each ``ΔW`` by truncated SVD,
    ``ΔW ≈ U_r S_r V_rᵀ``, becomes ``B = U_r S_r^½``, ``A = S_r^½ V_rᵀ`` with ``alpha = rank``
    (scale 1). The new adapter is attached as ``name`` (default ``source + "_lora"``) and made
    active; the source stays attached (detach it when the new one is good enough).
    The reported error is ``‖ΔW - B A‖_F / ‖ΔW‖_F`` over all layers together.
    """
    st = core.state(model)
    _active(model, "to_lora")
    source = source or st.active[0]
    if source not in st.adapters:
        raise ConfigError(f"to_lora(): no adapter named {source!r}; attached: {', '.join(st.adapters)}")
    method = st.adapters[source].method
    if not get_method(method).weight_delta:
        convert = ", ".join(m.name for m in registered() if m.weight_delta)
        raise ConfigError(f"to_lora(): the {method} adapter {source!r} is not a weight delta; only {convert} convert")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"to_lora(): rank={rank!r} must be a positive integer, e.g. rank=8")
    if st.adapters[source].merged:
        raise ConfigError(f"to_lora(): adapter {source!r} is merged; nbpeft.unmerge(model) first")
    if st.adapters[source].saved_modules:
        raise ConfigError(f"to_lora(): adapter {source!r} also trains {', '.join(st.adapters[source].saved_modules)} in full, which a LoRA cannot hold")
    name = name or f"{source}_lora"
    deltas = _weight_deltas(model, source)
    factors, errors, total_err, total_norm = {}, {}, 0.0, 0.0
    for path, delta in deltas.items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        r = min(rank, S.numel())
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        if r < rank:  # a narrow layer: pad with zeros so every layer has the same rank
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
            A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])])
        residual = (delta.double() - B @ A).norm().item()
        norm = delta.double().norm().item()
        errors[path] = residual / norm if norm else 0.0
        total_err += residual**2
        total_norm += norm**2
        factors[path] = (A.float(), B.float())
    targets = sorted(deltas)
    core.attach(model, "lora", name=name, r=rank, alpha=float(rank), targets=targets).trained = True  # the factors
    with torch.no_grad():
        for path, layer in core.adapter_layers(model):
            if path in factors and name in layer.adapter_names:
                A, B = factors[path]
                params = layer.adapter_parameters(name)
                params["lora_A.weight"].copy_(A)
                params["lora_B.weight"].copy_(B)
    core.set_adapter(model, name)
    relative = math.sqrt(total_err / total_norm) if total_norm else 0.0
    return LoraConversion(name, source, rank, relative, errors)

