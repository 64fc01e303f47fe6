"""Prompt tuning: trainable virtual-token embeddings prepended to the input.

For input embeddings ``E = embed(x)`` (batch x L x d) and a learned prompt ``P`` (n x d)
the model runs on the concatenation::

    model(inputs_embeds=[P; E], attention_mask=[1..1; m], labels=[-100..-100; y])

Only ``P`` trains (plus a classifier's head). The outputs cover ``n + L`` positions, as in
the reference implementation. Callers keep describing the real tokens only (masks,
position ids, labels, a cache from an earlier call): a forward pre-hook on the model
adds the virtual tokens, so ``model(...)``, ``model.generate(...)`` and :func:`nbpeft.train`
work unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import architectures, targeting
from ..errors import ConfigError
from ..layers import IGNORE, AdapterLayer, adapter_dtype, find_layer, innermost
from .base import REFERENCE_PREFIX, Attached, Method, MethodConfig, option, register

# The reference keeps a prompt adapter's saved modules (a classifier head) under "base_model."
# alone: it wraps no tuner model around the transformers model for these methods.
HEAD_PREFIX = "base_model."
_INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


# Helpers shared with prefix tuning (prefix.py): both act on the model's input sequence.

def embedding_path(model: nn.Module, method: str) -> str:
    """The module path of ``model.get_input_embeddings()``, or a one-line error."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None:
        raise ConfigError(f"{method}: the model has no input embedding (get_input_embeddings()); use a transformers model")
    embedding = innermost(embedding)
    for path, module in targeting.base_modules(model).items():
        if module is embedding and path:
            return path
    raise ConfigError(f"{method}: the input embedding is not a submodule of the model")


def forward_params(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def as_kwargs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of ``model.forward`` turned into keyword arguments."""
    names = forward_params(model)
    return {**dict(zip(names, args)), **kwargs}


def cache_arg(module: nn.Module) -> str | None:
    """The name the model's backbone gives its key/value cache argument (transformers 5 renamed it)."""
    params = forward_params(module)
    return next((a for a in ("cache", "past_key_values") if a in params), None)


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The caller's key/value cache under either name, or None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def cache_length(kwargs: dict[str, Any]) -> int:
    cache = get_cache(kwargs)
    if cache is None:
        return 0
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else int(cache[0][0].shape[-2])


def extend_mask_and_positions(kwargs: dict[str, Any], n: int) -> None:
    """Make room for ``n`` virtual tokens in front: the mask gets ones, position ids shift by ``n``."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor):
        kwargs["position_ids"] = positions + n


def install_hook(model: nn.Module, hook: Callable, *, first: bool) -> None:
    """Register ``hook`` (a module-level function) as a forward pre-hook of the whole model, once.

    The hook finds its wrapper from the model it is called on, so a deep copy of the model
    (compare(), previews) carries a working hook of its own.
    """
    if hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(hook, with_kwargs=True, prepend=first)


def remove_hook(model: nn.Module, hook: Callable) -> None:
    # by identity, not through a handle: a handle kept on a deep copy would point at the original model
    for key in [k for k, h in model._forward_pre_hooks.items() if h is hook]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


def find_wrapper(model: nn.Module, cls: type) -> AdapterLayer | None:
    """The ``cls`` wrapper on the model's input embedding, if there is one."""
    get = getattr(model, "get_input_embeddings", None)
    return find_layer(get(), cls) if callable(get) else None


def split_checkpoint(adapter: Attached, tensors: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """File keys to parameter keys: ``prompt_embeddings`` sits on the embedding, the rest are saved modules."""
    path = adapter.targets[0]
    out = {}
    for key, value in tensors.items():
        if key == "prompt_embeddings":
            out[f"{path}.prompt_embeddings"] = value
        elif key.startswith(REFERENCE_PREFIX):  # as for other methods; read too
            out[key[len(REFERENCE_PREFIX):]] = value
        elif key.startswith(HEAD_PREFIX):
            out[key[len(HEAD_PREFIX):]] = value
        else:
            raise ConfigError(f"load_adapter(): unexpected key {key!r} in a {method} file")
    return out


def model_sizes(model: nn.Module, method: str) -> dict[str, int]:
    """Layers, heads, key/value heads and head size from the transformers config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{method}: the model has no transformers config; use a transformers model")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    except AttributeError as err:
        raise ConfigError(f"{method}: cannot read the model's size from its config ({err})") from None
    kv_heads = architectures.key_value_heads(config)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"layers": layers, "heads": heads, "hidden": hidden, "kv_heads": kv_heads, "head_dim": head_dim}


@dataclass
class PromptConfig(MethodConfig):
    method = "prompt"
    aliases: ClassVar[dict[str, str]] = {
        "n_tokens": "num_virtual_tokens", "num_tokens": "num_virtual_tokens", "virtual_tokens": "num_virtual_tokens",
        "prompt_tuning_init": "init", "prompt_tuning_init_text": "init_text", "text": "init_text",
    }

    num_virtual_tokens: int = option(20, "how many trainable prompt vectors go before the input")
    init: str = option(
        "random",
        "'random': N(0, std of the embedding matrix); 'vocab': embeddings of sampled vocabulary tokens; "
        "'text': embeddings of init_text's tokens, repeated or cut to num_virtual_tokens",
        choices=("random", "vocab", "text"),
    )
    init_text: str | None = option(None, "the text for init='text', e.g. 'Classify the sentiment of this review:'")
    tokenizer_name_or_path: str | None = option(None, "tokenizer name or folder for init='text'")
    tokenizer: Any = option(None, "a tokenizer object for init='text' (instead of tokenizer_name_or_path)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"prompt: num_virtual_tokens={self.num_virtual_tokens} must be a positive integer, e.g. 20")
        if self.init != "text" and self.init_text is not None:
            raise ConfigError("prompt: init_text is used only with init='text'; add init='text' or drop init_text")
        if self.init == "text":
            if not self.init_text:
                raise ConfigError("prompt: init='text' needs init_text='...', e.g. 'Classify the sentiment of this review:'")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ConfigError("prompt: init='text' needs a tokenizer; pass tokenizer=tokenizer or tokenizer_name_or_path='...'")
        if self.tokenizer is not None and self.tokenizer_name_or_path:
            raise ConfigError("prompt: give tokenizer= or tokenizer_name_or_path=, not both")
        if self.tokenizer is not None and not callable(self.tokenizer):
            raise ConfigError(f"prompt: tokenizer={type(self.tokenizer).__name__} is not a tokenizer; pass the one from load_model()")

    @property
    def tokenizer_name(self) -> str | None:
        if self.tokenizer_name_or_path:
            return self.tokenizer_name_or_path
        return getattr(self.tokenizer, "name_or_path", None) or None

    def to_dict(self) -> dict[str, Any]:
        # a tokenizer object is shown (and stored) by its name
        out = dict(vars(self))
        if self.tokenizer is not None:
            out.update(tokenizer=None, tokenizer_name_or_path=self.tokenizer_name)
        return out

    def load_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        except Exception as err:  # noqa: BLE001  (any loading failure becomes one line)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"prompt: cannot load tokenizer {self.tokenizer_name_or_path!r} ({first}); pass tokenizer=<tokenizer object>"
            ) from None


def text_token_ids(config: PromptConfig, vocab_size: int) -> list[int]:
    """``init_text``'s token ids, repeated or cut to exactly ``num_virtual_tokens``."""
    ids = list(config.load_tokenizer()(config.init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt: init_text={config.init_text!r} has no tokens; give some words")
    if max(ids) >= vocab_size:
        raise ConfigError(f"prompt: the tokenizer gives token id {max(ids)} but the model has {vocab_size} embeddings; "
                          "use the model's own tokenizer")
    n = config.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptEmbedding(AdapterLayer):
    """The input embedding plus named prompts ``P`` (n x d); the embedding itself is unchanged.

    The model-level hook asks :meth:`prompt` for the active prompts and prepends them.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.prompt_embeddings)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @torch.no_grad()
    def add(self, name: str, config: PromptConfig) -> None:
        table = self.base_layer.weight
        vocab, n = table.shape[0], config.num_virtual_tokens
        dtype = adapter_dtype(table.dtype)
        if config.init == "text":
            ids = torch.tensor(text_token_ids(config, vocab), device=table.device)
            init = table[ids].to(dtype)
        elif config.init == "vocab":
            init = table[torch.randint(0, vocab, (n,), device=table.device)].to(dtype)
        else:
            init = torch.randn(n, table.shape[1], device=table.device, dtype=dtype) * table.float().std().to(dtype)
        self.prompt_embeddings[name] = nn.Parameter(init.clone())

    def delete(self, name: str) -> None:
        del self.prompt_embeddings[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.prompt_embeddings[name]}

    def prompt(self) -> torch.Tensor | None:
        """The active prompts, concatenated (n_total x d), or None when none applies."""
        names = [n for n in self.active if n in self.prompt_embeddings]
        if self.disabled or not names:
            return None
        return torch.cat([self.prompt_embeddings[n] for n in names], dim=0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{n}: {p.shape[0]} tokens" for n, p in self.prompt_embeddings.items())
        return f"adapters=[{sizes}], active={list(self.active)}"


def prompt_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of the whole model: put the active prompts in front of the input."""
    layer = find_wrapper(model, PromptEmbedding)
    prompt = layer.prompt() if layer is not None else None
    if prompt is None:
        return None
    kwargs = as_kwargs(model, args, kwargs)
    if is_encoder_decoder(model):
        _widen_encoder_mask(prompt.shape[0], kwargs)
    else:
        _prepend(model, prompt, kwargs)
    return (), kwargs


# Encoder-decoders: the prompt goes in front of the encoder's input, added by a pre-hook on the
# encoder itself, since generate() runs the encoder on its own. The model-level hook only widens
# the attention mask, which the model hands to both the encoder and the decoder's cross-attention.

def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _widen_encoder_mask(n: int, kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    encoded = kwargs.get("encoder_outputs")
    if encoded is not None and mask.shape[1] + n != encoded[0].shape[1]:
        return  # the caller's mask already covers the prompt
    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def encoder_prompt_hook(encoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of an encoder-decoder's encoder: the active prompts before its input."""
    layer = encoder.__dict__.get("_prompt_layer")
    prompt = layer.prompt() if layer is not None else None
    if prompt is None:
        return None
    kwargs = as_kwargs(encoder, args, kwargs)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            raise ConfigError("prompt: the encoder was called without input_ids or inputs_embeds")
        embeds = encoder.get_input_embeddings()(kwargs["input_ids"])
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == embeds.shape[1]:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], prompt.shape[0]), mask], dim=1)
    kwargs["input_ids"] = None
    batch = embeds.shape[0]
    kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    return (), kwargs


def _link_encoder(model: nn.Module, layer: PromptEmbedding | None) -> None:
    """Point the encoder's hook at the prompt layer (a plain attribute: not a submodule, copied with the model)."""
    encoder = model.get_encoder()
    if layer is None:
        encoder.__dict__.pop("_prompt_layer", None)
        remove_hook(encoder, encoder_prompt_hook)
    else:
        object.__setattr__(encoder, "_prompt_layer", layer)
        install_hook(encoder, encoder_prompt_hook, first=True)


def _prepend(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> None:
    n = prompt.shape[0]
    if cache_length(kwargs) > 0:
        # a later step of generation: the cache already holds the prompt
        extend_mask_and_positions(kwargs, n)
        return
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            raise ConfigError("prompt: the model was called without input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(kwargs["input_ids"])
    batch = embeds.shape[0]
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    positions = kwargs.get("position_ids")
    extend_mask_and_positions(kwargs, n)
    if isinstance(positions, torch.Tensor):
        front = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], n)
        kwargs["position_ids"] = torch.cat([front, kwargs["position_ids"]], dim=-1)
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:  # token labels; a class label stays as it is
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE), labels], dim=1)
    types = kwargs.get("token_type_ids")
    if isinstance(types, torch.Tensor) and types.dim() == 2:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)


class Prompt(Method):
    name = "prompt"
    description = "Prompt tuning: trainable virtual-token embeddings before the input"
    config_class = PromptConfig
    layer_class = PromptEmbedding
    peft_type = "PROMPT_TUNING"
    listing_order = 50
    usual_lr = 3e-2  # the reference's prompt-tuning examples
    compare_options = {"num_virtual_tokens": 20}
    in_reference = True
    holds_token_rows = False  # the reference keeps trainable tokens only beside LoRA

    def select(self, model: nn.Module, config: PromptConfig, attached: Mapping[str, Attached]) -> list[str]:
        path = embedding_path(model, self.name)
        if "inputs_embeds" not in forward_params(model):
            raise ConfigError(f"prompt: {type(model).__name__}.forward takes no inputs_embeds (its input is not token "
                              "embeddings), so a prompt cannot be prepended; use lora, ia3 or adapter instead")
        if is_encoder_decoder(model) and "inputs_embeds" not in forward_params(model.get_encoder()):
            raise ConfigError(f"prompt: the encoder of {type(model).__name__} takes no inputs_embeds, so a prompt "
                              "cannot be prepended; use lora, ia3 or adapter instead")
        return [path]

    def on_attach(self, model: nn.Module, name: str, config: PromptConfig) -> None:
        # first, so that it sees the caller's cache before a prefix adapter fills it
        install_hook(model, prompt_hook, first=True)
        if is_encoder_decoder(model):
            _link_encoder(model, find_wrapper(model, PromptEmbedding))

    def on_detach(self, model: nn.Module, name: str) -> None:
        layer = find_wrapper(model, PromptEmbedding)
        if layer is None or layer.adapter_names == [name]:
            remove_hook(model, prompt_hook)
            if is_encoder_decoder(model):
                _link_encoder(model, None)

    def notes(self, model: nn.Module, config: PromptConfig, targets: list[str]) -> list[str]:
        return [f"{config.num_virtual_tokens} virtual tokens before the input"]

    def to_peft_config(self, config: PromptConfig, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        sizes = model_sizes(model, self.name)
        init = _INIT_TO_PEFT[config.init]
        tokenizer = config.tokenizer_name
        if init == "TEXT" and not tokenizer:
            init = "RANDOM"  # the reference refuses TEXT without a tokenizer name; the tensor is what counts
        return {
            "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": int(targeting.base_modules(model)[targets[0]].weight.shape[1]),
            # the reference's layout for encoder-decoders: rows for a decoder prompt it never uses
            "num_transformer_submodules": 2 if is_encoder_decoder(model) else 1,
            "num_layers": sizes["layers"],
            "num_attention_heads": sizes["heads"],
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
            "tokenizer_name_or_path": tokenizer if init == "TEXT" else None,
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if int(cfg.get("num_transformer_submodules") or 1) not in (1, 2):
            raise ConfigError("load_adapter(): this prompt file has num_transformer_submodules other than 1 or 2; "
                              "nbpeft reads only those")
        # the saved tensor replaces the initial prompt, so text init (which needs the tokenizer) is skipped
        init = "vocab" if cfg.get("prompt_tuning_init") == "SAMPLE_VOCAB" else "random"
        return {"num_virtual_tokens": int(cfg.get("num_virtual_tokens") or 20), "init": init}

    def checkpoint_tensors(self, model: nn.Module, adapter: Attached, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        path = adapter.targets[0]
        out = {("prompt_embeddings" if key == f"{path}.prompt_embeddings" else HEAD_PREFIX + key): p.detach()
               for key, p in params.items()}
        if is_encoder_decoder(model):  # the second copy fills the decoder rows the reference keeps but never reads
            out["prompt_embeddings"] = out["prompt_embeddings"].repeat(2, 1)
        return out

    def from_checkpoint(self, model: nn.Module, adapter: Attached, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = adapter.config.num_virtual_tokens
        if "prompt_embeddings" in tensors and tensors["prompt_embeddings"].shape[0] == 2 * n:
            # an encoder-decoder file: the first n rows are the encoder's prompt, the only ones in use
            tensors = {**tensors, "prompt_embeddings": tensors["prompt_embeddings"][:n]}
        return split_checkpoint(adapter, tensors, self.name)


register(Prompt())
