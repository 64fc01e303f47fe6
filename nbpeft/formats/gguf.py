"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package.

Facts this module builds on (from llama.cpp's converters, ``convert_hf_to_gguf.py`` and
``convert_lora_to_gguf.py``):

- Tensor names come from ``gguf``'s ``TensorNameMap`` (``model.layers.0.self_attn.q_proj`` →
  ``blk.0.attn_q``). A numpy array of shape ``(rows, cols)`` is stored with GGUF ``ne = [cols, rows]``.
- For the ``llama`` architecture the query and key rows are reordered from the transformers
  rotary layout (two halves) to llama.cpp's (interleaved pairs), per head; for a LoRA only
  ``B`` (whose rows are the output rows) is reordered.
- A LoRA adapter is ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha``, and per target ``<base name>.weight.lora_a`` (PEFT's ``A``, r x in)
  and ``.lora_b`` (``B``, out x r). llama.cpp scales by ``alpha / rank`` with rank read from
  the shapes, so an rsLoRA scale ``alpha / sqrt(r)`` is written as ``alpha' = alpha * sqrt(r)``.
- The K-quants (``q4_k_m``, ``q5_k_m``) are llama.cpp's own: its quantiser picks a type per tensor
  (some layers one step finer, a row length that is no multiple of 256 a fallback type), so nbpeft
  writes f16 and hands that file to ``llama_model_quantize`` (llama-cpp-python's binding), as
  llama.cpp's ``llama-quantize`` does. A LoRA adapter has no K-quant form: the quantiser refuses
  an adapter file (it reads a model's hyperparameters, ``llama.context_length`` first), llama.cpp's
  own ``convert_lora_to_gguf.py`` writes f32, f16, bf16 or q8_0 only, and ``lora_b``'s rows are
  ``rank`` long, short of a 256-wide K block.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..methods.base import get_method

# the K-quants, written by llama.cpp's quantiser from nbpeft's f16 file: its ftype constant for each
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
QUANTS = ("f16", "q8_0", *K_QUANTS)  # f16 and q8_0 are written by nbpeft itself
# transformers model_type -> (llama.cpp architecture, whether q/k rows are reordered)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _arch(config: Any, fn: str) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{fn}(): nbpeft writes GGUF for {', '.join(ARCHITECTURES)}, not {model_type!r}; export format='merged' "
            "and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(
            f"{fn}(): rope scaling {rope.get('rope_type')!r} is not written by nbpeft; export format='merged' and "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[model_type]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def reorder_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _name_map(arch: str, blocks: int) -> Any:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, blocks)


def _rows_heads(key: str, config: Any) -> int | None:
    """How many heads to reorder for this tensor (None: not a query/key)."""
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if key.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


# ---------------------------------------------------------------- tokenizer


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenisation rules (it has no other way to know them)."""
    pre = spec.get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level with GPT-2's split pattern and nothing else
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if r"\\p{N}| ?[^" in text:
        return "qwen2"
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, notes: list[str]) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ConfigError(
            "export(): nbpeft writes GGUF tokenizers for byte-level BPE (SmolLM2, Llama 3, Qwen2); export "
            "format='merged' and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_tokenizer(spec)
    if pre == "default":
        notes.append("tokenizer pre-tokenisation not recognised: llama.cpp uses its default rules")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if isinstance(value, int):
            setter(value)
    first = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(first) and first[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- model


def llama_quantiser(quant: str) -> Any:
    """llama-cpp-python's ``llama_cpp`` for a K-quant, imported only then; None for what nbpeft writes itself.

    Called before anything is written, so a missing package costs nothing but the one-line error.
    """
    if quant not in K_QUANTS:
        return None
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise ConfigError(f"export(): quant={quant!r} is written by llama.cpp's quantiser, which needs llama-cpp-python: "
                          "pip install llama-cpp-python (it compiles llama.cpp from source, which takes minutes)") from None
    except (ImportError, OSError, RuntimeError) as err:  # installed, but its compiled library does not load
        raise ConfigError(f"export(): quant={quant!r} needs llama-cpp-python, which is installed but does not load ({err}); "
                          "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-python") from None
    return llama_cpp


# ggml's log levels (ggml.h); a CONT line continues the one before. llama-cpp-python's own logger maps
# an older numbering (WARN reads as ERROR there), so its logging level cannot hold the warnings back
_LOG_WARN, _LOG_CONT = 3, 5


def _quantise(llama_cpp: Any, source: Path, target: Path, quant: str) -> str:
    """``target``: llama.cpp's ``quant`` of the f16 GGUF ``source``, by its own quantiser (as ``llama-quantize`` does).

    llama.cpp's log is held back while it runs (a line per tensor); its warnings and errors are
    kept, the last error goes into the exception, and the line that counts the tensors given a
    fallback type (rows not a multiple of 256) is returned.
    """
    kept: list[str] = []
    level = [0]

    @llama_cpp.llama_log_callback
    def keep(log_level: int, text: bytes, _: Any) -> None:
        level[0] = level[0] if log_level == _LOG_CONT else log_level
        if level[0] >= _LOG_WARN:
            kept.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = torch.get_num_threads()  # the threads this process already uses, not every core
    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(keep, None)
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(previous, previous_data)
    lines = [line.strip() for line in "".join(kept).splitlines() if line.strip()]
    if code != 0:
        why = next((line for line in reversed(lines) if "fail" in line or "error" in line), f"code {code}")
        raise RuntimeError(f"export(): llama.cpp's quantiser could not write {quant}: {why}")
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", "\n".join(lines))
    return f"{fallback[1]} of {fallback[2]} tensors in a fallback type (rows not a multiple of 256)" if fallback else ""


def write_model(config: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any, folder: Path, quant: str) -> tuple[list[str], list[str]]:
    """``model.gguf`` (``quant``: f16, q8_0 or a K-quant; vectors f32) and an Ollama ``Modelfile``.

    f16 and q8_0 are written here; a K-quant is llama.cpp's quantisation of the f16 file, which
    is written beside it in ``folder`` (the export's hidden folder) and removed afterwards.
    """
    llama_cpp = llama_quantiser(quant)
    if llama_cpp is None:
        notes = _write_gguf(config, state_dict, tokenizer, folder / "model.gguf", quant)
        notes += ["q8_0 by nbpeft's quantiser"] if quant == "q8_0" else []
    else:
        f16 = folder / ".model.f16.gguf"
        notes = _write_gguf(config, state_dict, tokenizer, f16, "f16")
        fallback = _quantise(llama_cpp, f16, folder / "model.gguf", quant)
        f16.unlink()
        version = getattr(llama_cpp, "__version__", "?")
        notes.append(f"{quant} by llama.cpp's quantiser (llama-cpp-python {version}{'; ' + fallback if fallback else ''})")
    (folder / "Modelfile").write_text(modelfile("./model.gguf", tokenizer))
    return ["model.gguf", "Modelfile"], notes


def _write_gguf(config: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any, path: Path, quant: str) -> list[str]:
    """The model as one GGUF file at ``path``, matrices in f16 or q8_0; returns notes for the export's line."""
    import gguf

    arch, reorder = _arch(config, "export")
    blocks = config.num_hidden_layers
    names = _name_map(arch, blocks)
    notes: list[str] = []
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name + " (nbpeft merged)")
    writer.add_block_count(blocks)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, tokenizer, config.vocab_size, notes)
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when there is no output tensor
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"export(): no llama.cpp name for {key!r}; export format='merged' and use llama.cpp's converter")
        data = tensor.detach().float().cpu().numpy()
        heads = _rows_heads(key, config) if reorder else None
        if heads:
            data = reorder_rotary_rows(data, heads)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif quant == "q8_0" and data.shape[-1] % 32 == 0:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes


# ---------------------------------------------------------------- LoRA adapter


def check_adapter(model: nn.Module, names: list[str]) -> None:
    """Refuse, in one line, what a llama.cpp LoRA adapter cannot hold."""
    st = core.state(model)
    if len(names) != 1:
        raise ConfigError(f"export(): format='gguf-adapter' writes one adapter; make one active with nbpeft.set_adapter(model, {names[0]!r})")
    adapter = st.adapters[names[0]]
    spec = get_method(adapter.method)
    if not spec.plain_lora:
        hint = "convert it with nbpeft.to_lora(model, rank=...) first" if spec.weight_delta else "save it with nbpeft.save_adapter()"
        raise ConfigError(f"export(): format='gguf-adapter' takes LoRA; the {adapter.method} adapter {adapter.name!r} cannot go there: "
                          f"export format='gguf' (merged) or {hint}")
    if adapter.saved_modules:
        raise ConfigError(f"export(): adapter {adapter.name!r} trains {', '.join(adapter.saved_modules)} in full, which a GGUF "
                          "adapter cannot hold; export format='gguf' (merged) instead")
    if adapter.merged:
        raise ConfigError(f"export(): adapter {adapter.name!r} is merged into the weights; nbpeft.unmerge(model) first")
    config = adapter.config
    if config.rank_pattern or config.alpha_pattern or config.lora_bias or any(".lora_embedding_" in k for k in core.adapter_parameters(model, adapter.name)):
        raise ConfigError(f"export(): adapter {adapter.name!r} has per-module ranks or alphas, a lora_bias or an embedding "
                          "update, which a GGUF adapter cannot hold; export format='gguf' (merged) instead")
    _arch(model.config, "export")


def write_adapter(model: nn.Module, names: list[str], folder: Path) -> tuple[list[str], list[str]]:
    """``adapter.gguf`` for llama.cpp (``--lora``) and a ``Modelfile`` with its ``ADAPTER`` line."""
    import gguf

    config = model.config
    arch, reorder = _arch(config, "export")
    name = names[0]
    adapter = core.state(model).adapters[name]
    rank, scale = adapter.config.r, adapter.config.scaling
    tensor_names = _name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(folder / "adapter.gguf"), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))  # llama.cpp multiplies by alpha / rank
    for path, layer in core.adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        key = f"{path}.weight"
        target = tensor_names.get_name(key, try_suffixes=(".weight",))
        if target is None or (key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)):
            raise ConfigError(f"export(): llama.cpp has no separate tensor for {path}; re-attach without it or export format='gguf'")
        params = layer.adapter_parameters(name)
        lora_a = params["lora_A.weight"].detach().float().cpu().numpy()
        lora_b = params["lora_B.weight"].detach().float().cpu().numpy()
        heads = _rows_heads(key, config) if reorder else None
        if heads:
            lora_b = reorder_rotary_rows(lora_b, heads)
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(lora_a))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(lora_b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    base = getattr(config, "_name_or_path", "") or "<the base model's GGUF or safetensors folder>"
    (folder / "Modelfile").write_text(modelfile(base, None, adapter="./adapter.gguf"))
    notes = [f"rsLoRA scale folded into alpha={scale * rank:g}"] if adapter.config.rslora else []
    return ["adapter.gguf", "Modelfile"], notes


# ---------------------------------------------------------------- Ollama


def _go_template(chat_template: str) -> tuple[str | None, str | None, list[str]]:
    """(TEMPLATE, default SYSTEM, stop strings) for the chat formats nbpeft recognises."""
    if "<|im_start|>" in chat_template:
        system = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", chat_template, re.S)
        template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                    "{{ end }}<|im_start|>assistant\n")
        return template, system.group(1) if system else None, ["<|im_start|>", "<|im_end|>"]
    if "<|start_header_id|>" in chat_template:
        template = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
        return template, None, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return None, None, []


def modelfile(source: str, tokenizer: Any, adapter: str | None = None) -> str:
    """An Ollama Modelfile: ``FROM`` the model, ``ADAPTER`` if any, the chat ``TEMPLATE`` it was trained with."""
    lines = [f"FROM {source}"]
    if adapter:
        lines += ["# ADAPTER needs FROM to be exactly the base model the adapter was trained on", f"ADAPTER {adapter}"]
    chat = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(chat, str):
        template, system, stops = _go_template(chat)
        if template is None:
            lines.append("# the chat template is not one nbpeft translates: write TEMPLATE by hand from tokenizer_config.json")
        else:
            lines.append(f'TEMPLATE """{template}"""')
            if system:
                lines.append(f'SYSTEM """{system}"""')
            lines += [f'PARAMETER stop "{s}"' for s in stops]
    elif adapter:
        lines.append("# the base model's TEMPLATE applies (Ollama takes it from FROM)")
    return "\n".join(lines) + "\n"
