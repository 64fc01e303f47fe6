"""Prefix tuning: trainable keys and values in front of every attention layer.

Each layer ``l`` gets ``n`` learned key/value pairs ``(K_l, V_l)`` (heads x n x head_dim)
that every real token attends to, as if ``n`` virtual tokens preceded the input::

    attn_l(q, [K_l; k], [V_l; v])

All of them are stored as one tensor ``prompt_embeddings`` of shape
``n x (layers * 2 * kv_heads * head_dim)``, read as ``(n, layers * 2, kv_heads, head_dim)``:
entry ``2l`` is layer ``l``'s keys, ``2l + 1`` its values (the reference layout; with
grouped-query attention the prefix has the key/value heads, not the query heads).

With ``projection=True`` the prefix is computed during training as
``MLP(T) = W2 tanh(W1 T + b1) + b2`` from ``n`` token vectors ``T``; a saved file holds the
computed prefix, so it loads as a plain one.

The prefix enters through the model's key/value cache: a forward pre-hook hands the model
a cache prefilled with it (and ones in front of the attention mask). The real tokens then
sit at positions ``n, n+1, ...``, as in the reference implementation.

Encoder-decoders (T5, BART, Whisper) keep their cache in the decoder, so there the prefix
sits in front of the decoder's self-attention and the decoder mask widens; the encoder and the
cross-attention run unchanged. This is where the reference puts it (peft 0.21.2 and 0.22.0 with
transformers 5.25.0 alike), and it also decides which stored layer each decoder layer reads: its
``num_transformer_submodules`` is 2 for these models, so it stacks the file's ``2L`` key/value
entries twice and hands them out four per layer (self-attention key, value, cross-attention key,
value), then empties the cross-attention cache. Decoder layer ``i`` therefore reads stored layer
``2i mod L`` (:func:`decoder_layer_entries`); with an even ``L`` the odd stored layers are never
read. nbpeft reads the same entries, so a file means the same prefix in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_factory
from .base import Attached, Method, MethodConfig, option, register
from .prompt import (
    HEAD_PREFIX,
    as_kwargs,
    cache_arg,
    cache_length,
    embedding_path,
    extend_mask_and_positions,
    find_wrapper,
    forward_params,
    get_cache,
    install_hook,
    is_encoder_decoder,
    model_sizes,
    remove_hook,
    split_checkpoint,
)


@dataclass
class PrefixConfig(MethodConfig):
    method = "prefix"
    aliases: ClassVar[dict[str, str]] = {
        "n_tokens": "num_virtual_tokens", "num_tokens": "num_virtual_tokens", "virtual_tokens": "num_virtual_tokens",
        "prefix_projection": "projection", "encoder_hidden_size": "projection_hidden",
    }
    num_virtual_tokens: int = option(20, "how many trainable key/value pairs each attention layer gets")
    projection: bool = option(False, "compute the prefix through a two-layer MLP while training (saved folded)")
    projection_hidden: int = option(512, "hidden width of the projection MLP")
    init: str = option(
        "vocab",
        "'vocab': the keys/values the model computes for sampled vocabulary tokens; 'random': N(0, 1)",
        choices=("vocab", "random"),
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter (default: a classifier's head)"
    )

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"prefix: num_virtual_tokens={self.num_virtual_tokens} must be a positive integer, e.g. 20")
        if self.projection_hidden < 1:
            raise ConfigError(f"prefix: projection_hidden={self.projection_hidden} must be a positive integer, e.g. 512")


@dataclass(frozen=True)
class PrefixShape:
    """What :meth:`PrefixKV.add` receives: the config and the model's sizes (``model_sizes``)."""

    config: PrefixConfig
    sizes: dict[str, int]


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class PrefixKV(AdapterLayer):
    """Wraps the input embedding (unchanged) and holds each adapter's key/value prefix."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prefix = nn.ParameterDict()  # name -> n x (layers * 2 * kv_dim), without projection
        self.prefix_tokens = nn.ParameterDict()  # name -> n x kv_dim, with projection
        self.prefix_mlp = nn.ModuleDict()
        self.shapes: dict[str, tuple[int, int, int, int]] = {}  # name -> (n, layers, kv_heads, head_dim)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.shapes)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add(self, name: str, shape: PrefixShape) -> None:
        config, sizes = shape.config, shape.sizes
        n, layers, heads, head_dim = config.num_virtual_tokens, sizes["layers"], sizes["kv_heads"], sizes["head_dim"]
        width = layers * 2 * heads * head_dim
        factory = adapter_factory(self.base_layer.weight)
        if config.projection:
            mlp = nn.Sequential(nn.Linear(heads * head_dim, config.projection_hidden, **factory), nn.Tanh(),
                                nn.Linear(config.projection_hidden, width, **factory))
            self.prefix_tokens[name] = nn.Parameter(torch.randn(n, heads * head_dim, **factory))
            self.prefix_mlp[name] = mlp
        else:  # init='vocab' fills it in PrefixTuning.on_attach, which can run the model
            start = torch.randn if config.init == "random" else torch.zeros
            self.prefix[name] = nn.Parameter(start(n, width, **factory))
        self.shapes[name] = (n, layers, heads, head_dim)

    def delete(self, name: str) -> None:
        for table in (self.prefix, self.prefix_tokens, self.prefix_mlp):
            if name in table:
                del table[name]
        del self.shapes[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.prefix:
            return {"prompt_embeddings": self.prefix[name]}
        mlp = {f"prefix_mlp.{k}": p for k, p in self.prefix_mlp[name].named_parameters()}
        return {"prefix_tokens": self.prefix_tokens[name], **mlp}

    def flat(self, name: str) -> torch.Tensor:
        """The prefix as saved: n x (layers * 2 * kv_heads * head_dim)."""
        if name in self.prefix:
            return self.prefix[name]
        return self.prefix_mlp[name](self.prefix_tokens[name])

    @torch.no_grad()
    def set_flat(self, name: str, value: torch.Tensor) -> None:
        """Start adapter ``name`` at ``value`` (n x width).

        With projection the MLP's output layer is solved for it: ``b2`` is the mean row and
        ``W2`` the least-squares fit of the rest on the hidden activations ``tanh(W1 T + b1)``.
        """
        if name in self.prefix:
            self.prefix[name].copy_(value)
            return
        mlp, tokens = self.prefix_mlp[name], self.prefix_tokens[name]
        hidden = mlp[1](mlp[0](tokens)).float()
        mean = value.float().mean(dim=0)
        fit = torch.linalg.lstsq(hidden, value.float() - mean).solution  # hidden_width x width
        mlp[2].weight.copy_(fit.T)
        mlp[2].bias.copy_(mean)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer (keys, values), each batch x kv_heads x n_total x head_dim, or None if no adapter applies."""
        names = [n for n in self.active if n in self.shapes]
        if self.disabled or not names:
            return None
        parts = []
        for name in names:
            n, layers, heads, head_dim = self.shapes[name]
            # (n, layers*2, heads, head_dim) -> (layers*2, heads, n, head_dim)
            parts.append(self.flat(name).to(dtype).view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3))
        kv = torch.cat(parts, dim=2).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(kv.shape[0] // 2)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{n}: {s[0]} tokens" for n, s in self.shapes.items())
        return f"adapters=[{sizes}], active={list(self.active)}"


def decoder_layer_entries(layers: int) -> list[int]:
    """For each decoder layer of an encoder-decoder, the stored layer whose keys and values it reads.

    The reference doubles the ``2L`` stacked entries and gives decoder layer ``i`` entries ``4i`` and
    ``4i + 1`` of the doubled stack, which are stored layer ``2i mod L``'s key and value.
    """
    return [(2 * i) % layers for i in range(layers)]


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    if is_encoder_decoder(model):
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    return DynamicCache(config=model.config)


def _self_attention_cache(cache: Any) -> Any:
    """The part of a cache that holds self-attention keys and values (the decoder's, in an encoder-decoder)."""
    return getattr(cache, "self_attention_cache", cache)


def prefix_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of the whole model: start the cache with the active prefixes, widen the mask."""
    layer = find_wrapper(model, PrefixKV)
    names = [a for a in layer.active if a in layer.shapes] if layer is not None and not layer.disabled else []
    if not names:
        return None
    kwargs = as_kwargs(model, args, kwargs)
    if cache_length(kwargs) == 0:  # the first forward; later ones find the prefix in the cache
        if model.training and _checkpointing(model):
            raise ConfigError("prefix: gradient checkpointing cannot replay the key/value prefix; "
                              "train with gradient_checkpointing=False")
        ref = next((kwargs.get(k) for k in _BATCH_KEYS if kwargs.get(k) is not None), None)
        if ref is None:
            raise ConfigError("prefix: the model was called without input_ids or inputs_embeds")
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]  # encoder_outputs
        arg = cache_arg(getattr(model, "base_model", model))
        cache = get_cache(kwargs)
        kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else _new_cache(model)
        target = _self_attention_cache(cache)
        pairs = layer.key_values(ref.shape[0], layer.weight.dtype)
        if is_encoder_decoder(model):
            pairs = [pairs[j] for j in decoder_layer_entries(len(pairs))]
        for i, (keys, values) in enumerate(pairs):
            target.update(keys, values, i)
        kwargs[arg] = cache
        if is_encoder_decoder(model) and kwargs.get("use_cache") is False:
            # Whisper drops a cache it is told not to use, and the prefix with it; None means the config's choice
            kwargs["use_cache"] = None
    n = sum(layer.shapes[a][0] for a in names)
    if is_encoder_decoder(model):
        # the prefix is in the decoder's self-attention: its mask widens, the encoder's stays
        mask = kwargs.get("decoder_attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["decoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    else:
        extend_mask_and_positions(kwargs, n)
    return (), kwargs


# Where the batch size can be read from, first found first (decoder inputs come after the input).
_BATCH_KEYS = ("inputs_embeds", "input_ids", "input_features", "encoder_outputs", "decoder_input_ids", "decoder_inputs_embeds")


class PrefixTuning(Method):
    name = "prefix"
    description = "Prefix tuning: trainable keys/values in front of every attention layer"
    config_class = PrefixConfig
    layer_class = PrefixKV
    peft_type = "PREFIX_TUNING"
    listing_order = 51
    usual_lr = 1e-2  # the reference's prefix-tuning examples
    compare_options = {"num_virtual_tokens": 20}
    in_reference = True
    holds_token_rows = False  # the reference keeps trainable tokens only beside LoRA

    def select(self, model: nn.Module, config: PrefixConfig, attached: Mapping[str, Attached]) -> list[str]:
        path = embedding_path(model, self.name)
        backbone = getattr(model, "base_model", model)
        if cache_arg(backbone) is None:
            instead = "method 'prompt', lora or ia3" if "inputs_embeds" in forward_params(model) else "lora, ia3 or adapter"
            raise ConfigError(f"prefix: {type(model).__name__} takes no key/value cache, so prefix tuning does not "
                              f"support it; use {instead} instead")
        if _checkpointing(model):
            raise ConfigError("prefix: gradient checkpointing is on; call model.gradient_checkpointing_disable() first")
        return [path]

    def layer_for(self, model: nn.Module, path: str, config: PrefixConfig) -> tuple[type[AdapterLayer], PrefixShape]:
        return self.layer_class, PrefixShape(config, model_sizes(model, self.name))

    def on_attach(self, model: nn.Module, name: str, config: PrefixConfig) -> None:
        layer = find_wrapper(model, PrefixKV)
        if config.init == "vocab" and not layer.weight.is_meta:
            layer.set_flat(name, _vocab_prefix(model, layer, name))
        install_hook(model, prefix_hook, first=False)

    def on_detach(self, model: nn.Module, name: str) -> None:
        layer = find_wrapper(model, PrefixKV)
        if layer is None or layer.adapter_names == [name]:
            remove_hook(model, prefix_hook)

    def notes(self, model: nn.Module, config: PrefixConfig, targets: list[str]) -> list[str]:
        sizes = model_sizes(model, self.name)
        return [f"{config.num_virtual_tokens} key/value pairs in each of {sizes['layers']} layers"]

    def to_peft_config(self, config: PrefixConfig, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        sizes = model_sizes(model, self.name)
        token_dim = sizes["kv_heads"] * sizes["head_dim"]
        return {
            "num_virtual_tokens": config.num_virtual_tokens,
            "num_layers": sizes["layers"],
            "token_dim": token_dim,
            "num_attention_heads": sizes["kv_heads"],
            "num_transformer_submodules": 2 if is_encoder_decoder(model) else 1,
            "encoder_hidden_size": token_dim,
            "prefix_projection": False,
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if int(cfg.get("num_transformer_submodules") or 1) not in (1, 2):
            raise ConfigError("load_adapter(): this prefix file has num_transformer_submodules other than 1 or 2; "
                              "nbpeft reads only those")
        # the file holds the computed prefix, so it always loads without projection
        return {"num_virtual_tokens": int(cfg.get("num_virtual_tokens") or 20), "init": "random"}

    def checkpoint_tensors(self, model: nn.Module, adapter: Attached, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        path, name = adapter.targets[0], adapter.name
        out = {HEAD_PREFIX + key: p.detach() for key, p in params.items() if not key.startswith(path + ".")}
        with torch.no_grad():
            out["prompt_embeddings"] = find_wrapper(model, PrefixKV).flat(name).detach()
        return out

    def from_checkpoint(self, model: nn.Module, adapter: Attached, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return split_checkpoint(adapter, tensors, self.name)


@torch.no_grad()
def _vocab_prefix(model: nn.Module, layer: PrefixKV, name: str) -> torch.Tensor:
    """The keys and values the model computes for ``n`` random vocabulary tokens, flattened like the file.

    Real activations keep the attention sensible at the start (random keys and values can swamp it).
    """
    n, layers, heads, head_dim = layer.shapes[name]
    ids = torch.randint(0, layer.weight.shape[0], (1, n), device=layer.weight.device)
    backbone = getattr(model, "base_model", model)
    cache = _new_cache(model)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        if is_encoder_decoder(model):  # the decoder's keys and values, reading one zero encoder state
            decoder = model.get_decoder()
            hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else None
            states = torch.zeros(1, 1, hidden or layer.weight.shape[1], device=ids.device, dtype=layer.weight.dtype)
            decoder(input_ids=ids, encoder_hidden_states=states, past_key_values=cache, use_cache=True)
        else:
            backbone(input_ids=ids, **{cache_arg(backbone): cache}, use_cache=True)
    finally:
        for module, training in modes.items():
            module.training = training
    keys, values = _cache_tensors(_self_attention_cache(cache))
    if len(keys) != layers or keys[0].shape[1:] != (heads, n, head_dim):
        raise ConfigError(f"prefix: the model's cache has {len(keys)} layers of {tuple(keys[0].shape[1:])}, expected "
                          f"{layers} of ({heads}, {n}, {head_dim}); pass init='random'")
    if is_encoder_decoder(model):
        # stored layer j starts as the first decoder layer that reads it; layers no decoder layer reads keep their own
        source = list(range(layers))
        for i in reversed(range(layers)):
            source[decoder_layer_entries(layers)[i]] = i
        keys, values = [keys[i] for i in source], [values[i] for i in source]
    # (layers*2, heads, n, head_dim) -> (n, layers*2*heads*head_dim)
    stacked = torch.stack([t[0] for pair in zip(keys, values) for t in pair])
    return stacked.permute(2, 0, 1, 3).reshape(n, -1)


def _cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers]
    return list(cache.key_cache), list(cache.value_cache)


register(PrefixTuning())
