"""New tokens: grow the vocabulary and train only the new embedding rows, as part of an adapter.

    nbpeft.attach(model, "lora")
    nbpeft.add_tokens(model, tokenizer, ["<tool>", "</tool>"])

The adapter holds its own copy ``V`` (n x hidden) of the rows of the listed token ids and
uses it in place of the base rows; every other row stays the frozen base row::

    embed(i)        = V[k]            if i == ids[k]   else  E[i]
    logits[..., j]  = h · V[k] (+ b)  if j == ids[k]   else  h · W[j] (+ b)

``V`` starts as a copy of the current rows, so the model is unchanged right after; it is
saved as ``<embedding path>.token_adapter.trainable_tokens_delta`` with the LoRA config key
``trainable_token_indices``, the reference's layout (the name says delta, the values are
whole rows). With tied input and output embeddings the head reads the embedding's ``V``;
with untied ones the head has its own ``V``, saved under the head's path.

Detach removes ``V`` and leaves the grown vocabulary: every original row bit-exact, the
new rows back at their initial value (the mean of the original rows), and the tokenizer
keeps the tokens, so tokenizer and model still agree (a tokenizer cannot drop added tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..errors import ConfigError
from ..layers import (
    AdapterLayer,
    adapter_factory,
    add_adapter,
    base_path,
    find_layer,
    get_module,
    innermost,
    undo_on_error,
)
from ..methods.base import get_method

__all__ = ["NewTokens", "TokenEmbedding", "TokenHead", "add_tokens", "add_rows", "check_fits", "peft_config",
           "without_base_rows"]

CONFIG_KEY = "trainable_token_indices"


@dataclass
class TokenRows:
    """What a token layer's ``add`` receives: the token ids, and for a tied head the embedding layer it reads."""

    ids: list[int]
    tied_to: TokenEmbedding | None = None


def _merged_rows(name: str) -> str:
    """The key of the base rows adapter ``name`` replaced when merged, in the layer's ``originals``."""
    return f"rows under {name}"


class TokenLayer(AdapterLayer):
    """Per-adapter rows ``V`` for chosen token ids, used in place of the base rows."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_ids: dict[str, list[int]] = {}
        self.tied_to: dict[str, TokenEmbedding] = {}  # a plain dict: the tied layer is not a submodule

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_ids)

    @torch.no_grad()
    def add(self, name: str, config: TokenRows) -> None:
        if config.tied_to is not None:
            self.tied_to[name] = config.tied_to
            self.token_ids[name] = []
            return
        weight = self.innermost().weight
        known = self.token_ids.get(name, [])
        new = [i for i in dict.fromkeys(config.ids) if i not in known]
        rows = weight[new].detach().to(**adapter_factory(weight))
        if name in self.trainable_tokens_delta:  # a second add_tokens extends the adapter's rows
            rows = torch.cat([self.trainable_tokens_delta[name].detach(), rows])
        self.trainable_tokens_delta[name] = nn.Parameter(rows)
        self.token_ids[name] = known + new

    def delete(self, name: str) -> None:
        if name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
        for table in (self.token_ids, self.tied_to):
            table.pop(name, None)
        self.originals.pop(_merged_rows(name), None)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.tied_to:
            return {}  # the embedding layer owns (and saves) the tied rows
        return {"token_adapter.trainable_tokens_delta": self.trainable_tokens_delta[name]}

    def token_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s token ids (a tensor on the base weight's device) and their rows ``V``."""
        source = self.tied_to.get(name, self)
        ids = torch.tensor(source.token_ids[name], dtype=torch.long, device=self.innermost().weight.device)
        return ids, source.trainable_tokens_delta[name]

    def live(self) -> list[str]:
        return [] if self.disabled else [n for n in self.active if n in self.token_ids and n not in self.merged]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError("token rows over another adapter's layer cannot be folded into the base weight")
        if name in self.merged:
            return
        if name not in self.tied_to:  # a tied head's rows are written once, through the embedding
            weight = self.innermost().weight
            ids, values = self.token_rows(name)
            self.keep_original(_merged_rows(name), weight[ids])
            weight.index_copy_(0, ids, values.to(weight.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        original = self.originals.pop(_merged_rows(name), None)
        if original is not None:
            weight = self.innermost().weight
            ids, _ = self.token_rows(name)
            weight.index_copy_(0, ids, original.to(weight.device))
        self.merged.remove(name)

    def extra_repr(self) -> str:
        return f"tokens={ {n: len(self.token_rows(n)[0]) for n in self.token_ids} }, active={list(self.active)}"


class TokenEmbedding(TokenLayer):
    """An input embedding whose rows for the adapter's token ids come from ``V``."""

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(input_ids, *args, **kwargs)
        for name in self.live():
            ids, values = self.token_rows(name)
            match = input_ids.unsqueeze(-1) == ids
            rows = F.embedding(match.int().argmax(-1), values)
            scale = getattr(self.innermost(), "embed_scale", None)  # scaled embeddings (Gemma) multiply in forward
            if scale is not None:
                rows = rows * scale
            out = torch.where(match.any(-1, keepdim=True), rows.to(out.dtype), out)
        return out


class TokenHead(TokenLayer):
    """An output embedding (LM head) whose logits for the adapter's token ids use ``V``."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(hidden, *args, **kwargs)
        bias = getattr(self.innermost(), "bias", None)
        for name in self.live():
            ids, values = self.token_rows(name)
            logits = F.linear(hidden.to(values.dtype), values)
            if bias is not None:
                logits = logits + bias[ids]
            out = out.index_copy(-1, ids, logits.to(out.dtype))
        return out


@dataclass
class NewTokens:
    """What :func:`add_tokens` did: the tokens, their ids, the vocabulary size and the adapter that trains them."""

    tokens: list[str]
    ids: list[int]
    vocab_size: int
    adapter: str | None = None
    grown_from: int = 0
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        listed = ", ".join(f"{t} → {i}" for t, i in zip(self.tokens, self.ids))
        grown = (f"vocabulary {self.grown_from:,} → {self.vocab_size:,}" if self.vocab_size > self.grown_from
                 else f"vocabulary stays {self.vocab_size:,} (the ids were free rows)")
        trains = (f"their rows train with adapter {self.adapter!r}" if self.adapter else
                  "no adapter attached, so their rows stay at the mean embedding; "
                  "attach an adapter first and then add_tokens to train them")
        return f"added {len(self.tokens)} tokens ({listed}); {grown}; {trains}"


def add_tokens(model: nn.Module, tokenizer: Any, tokens: list[str], name: str | None = None) -> NewTokens:
    """Add ``tokens`` to ``tokenizer`` and ``model``; with an adapter attached, train their rows as part of it.

    New embedding rows (input, and output when untied) start as the mean of the existing
    rows. ``name`` picks the adapter (default: the active one); with no adapter attached only
    the vocabulary grows, e.g. to load an adapter saved with these tokens. Tokens already in
    the vocabulary are refused and nothing changes.
    """
    tokens = _check_tokens(tokens)
    if not callable(getattr(tokenizer, "add_tokens", None)) or not callable(getattr(tokenizer, "get_vocab", None)):
        raise ConfigError(f"add_tokens(): tokenizer= must be a transformers tokenizer, got {type(tokenizer).__name__}")
    adapter = _target_adapter(model, name)
    embed_path, head_path, tied = embedding_paths(model, "add_tokens")
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if present:
        shown = ", ".join(f"{t!r} (id {vocab[t]})" for t in present[:3])
        raise ConfigError(f"add_tokens(): {shown} already in the vocabulary; pass only new tokens (none were added)")

    tokenizer.add_tokens(tokens)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    grown_from = innermost(get_module(model, embed_path)).num_embeddings
    _grow(model, max(ids) + 1)
    result = NewTokens(tokens, ids, innermost(get_module(model, embed_path)).num_embeddings, adapter, grown_from)
    if adapter is not None:
        add_rows(model, adapter, {embed_path: ids, **({head_path: ids} if head_path and not tied else {})})
    return result


def _check_tokens(tokens: Any) -> list[str]:
    if isinstance(tokens, str):
        raise ConfigError(f"add_tokens(): tokens={tokens!r} is one string; pass a list, e.g. [{tokens!r}]")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise ConfigError(f"add_tokens(): tokens={tokens!r} must be a non-empty list of strings, e.g. ['<tool>']")
    bad = [t for t in tokens if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ConfigError(f"add_tokens(): {bad[0]!r} is not a token; every token must be a non-empty string, e.g. '<tool>'")
    twice = [t for i, t in enumerate(tokens) if t in tokens[:i]]
    if twice:
        raise ConfigError(f"add_tokens(): {twice[0]!r} is listed twice; list each token once")
    return list(tokens)


def _target_adapter(model: nn.Module, name: str | None) -> str | None:
    """The adapter that trains the new rows: ``name``, else the one active adapter, else None (none attached)."""
    st = core.state(model)
    if name is None and not st.adapters:
        return None
    if name is None:
        if len(st.active) != 1:
            raise ConfigError(f"add_tokens(): adapters {', '.join(st.active)} are active; pick one with name=")
        name = st.active[0]
    (name,) = core.resolve_adapter_names(model, name, "add_tokens")
    if not get_method(st.adapters[name].method).holds_token_rows:
        raise ConfigError(f"add_tokens(): a {st.adapters[name].method} adapter cannot hold token rows in the saved "
                          "format; attach a lora adapter and pass its name=")
    return name


def embedding_paths(model: nn.Module, fn: str) -> tuple[str, str | None, bool]:
    """The input embedding's path, the output embedding's (or None) and whether the two share one weight."""
    get_input = getattr(model, "get_input_embeddings", None)
    embed = get_input() if callable(get_input) else None
    if not isinstance(innermost(embed) if embed is not None else None, nn.Embedding):
        raise ConfigError(f"{fn}(): this model has no input embedding (get_input_embeddings()) to add token rows to")
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    paths = {id(m): base_path(p) for p, m in model.named_modules()}
    tied = head is not None and innermost(head).weight is innermost(embed).weight
    return paths[id(embed)], paths[id(head)] if head is not None else None, tied


@torch.no_grad()
def _grow(model: nn.Module, size: int) -> None:
    """Give the input (and output) embedding ``size`` rows; new rows are the mean of the existing ones."""
    embed_path, head_path, tied = embedding_paths(model, "add_tokens")
    embed = innermost(get_module(model, embed_path))
    head = innermost(get_module(model, head_path)) if head_path else None
    old = embed.num_embeddings
    if size <= old:
        return
    embed.weight = _grown(embed.weight, size)
    embed.num_embeddings = size
    if head is not None:
        head.weight = embed.weight if tied else _grown(head.weight, size)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(torch.cat([head.bias, head.bias.new_zeros(size - old)]),
                                     requires_grad=head.bias.requires_grad)
        head.out_features = size
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for c in {id(config): config, id(text): text}.values():
            if hasattr(c, "vocab_size"):
                c.vocab_size = size


def _grown(weight: nn.Parameter, size: int) -> nn.Parameter:
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    rows = torch.cat([weight.detach(), mean.expand(size - weight.shape[0], -1)])
    return nn.Parameter(rows, requires_grad=weight.requires_grad)


def add_rows(model: nn.Module, name: str, indices: dict[str, list[int]]) -> None:
    """Make the rows of ``indices`` ({embedding path: token ids}) part of adapter ``name``.

    A tied output embedding follows the input embedding's rows. All or nothing.
    """
    embed_path, head_path, tied = embedding_paths(model, "add_tokens")
    with undo_on_error() as undo:
        for path, ids in indices.items():
            cls = TokenEmbedding if path == embed_path else TokenHead
            undo.append(add_adapter(model, path, cls, name, TokenRows(list(ids))))
        if tied and head_path and embed_path in indices:
            source = find_layer(get_module(model, embed_path), TokenEmbedding)
            undo.append(add_adapter(model, head_path, TokenHead, name, TokenRows([], tied_to=source)))
    st = core.state(model)
    adapter = st.adapters[name]
    core.set_adapter(model, st.active)  # the new rows take the adapter's requires_grad
    core.count_adapter(model, adapter)
    count = sum(len(ids) for path, ids in token_indices(model, name).items() if path == embed_path)
    adapter.notes = [n for n in adapter.notes if not n.startswith("trains the rows of")]
    adapter.notes.append(f"trains the rows of {count} tokens")


def token_indices(model: nn.Module, name: str) -> dict[str, list[int]]:
    """{embedding path: token ids} of adapter ``name``'s own rows (a tied head has none of its own)."""
    return {path: list(layer.token_ids[name]) for path, layer in core.adapter_layers(model)
            if isinstance(layer, TokenLayer) and name in layer.token_ids and name not in layer.tied_to}


def peft_config(model: nn.Module, name: str) -> dict[str, Any]:
    """The ``trainable_token_indices`` entry of adapter ``name``'s adapter_config.json (empty without token rows)."""
    indices = token_indices(model, name)
    return {CONFIG_KEY: indices} if indices else {}


def saved_indices(model: nn.Module, saved: Any, folder: Path) -> dict[str, list[int]]:
    """A file's ``trainable_token_indices`` (a list for the input embedding, or {module name: ids}) by path."""
    embed_path, head_path, tied = embedding_paths(model, "load_adapter")
    if isinstance(saved, list):
        saved = {embed_path: saved}
    if not isinstance(saved, dict):
        raise ConfigError(f"load_adapter(): {folder}: {CONFIG_KEY} must be a list of ids or {{module: ids}}")
    out = {}
    for key, ids in saved.items():
        path = next((p for p in (embed_path, head_path) if p and (p == key or p.endswith("." + key))), None)
        if path is None:
            raise ConfigError(f"load_adapter(): {folder}: {CONFIG_KEY} names {key!r}, which is not this model's "
                              f"input embedding ({embed_path!r}) or output embedding ({head_path!r})")
        out[path] = [int(i) for i in ids]
    if tied and head_path in out:  # a tied head follows the embedding's rows
        if out.get(embed_path, out[head_path]) != out[head_path]:
            raise ConfigError(f"load_adapter(): {folder}: the tied embeddings {embed_path!r} and {head_path!r} "
                              f"list different token ids in {CONFIG_KEY}; nbpeft loads tied rows only when they agree")
        out[embed_path] = out.pop(head_path)
    return out


@torch.no_grad()
def without_base_rows(model: nn.Module, name: str, found: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """``found`` (a file's tensors by module path) without the whole embedding matrices the reference adds.

    After a resize the reference also saves each embedding's full matrix, and a tied head's
    copy of the rows. nbpeft keeps the model's own matrix: its rows below the first token
    row (the original vocabulary) must equal the saved ones, else nothing is loaded. Rows
    from there on are the resize's initial values; an untied head the file does not list
    keeps the model's own (so the new tokens' logits follow this model's head there).
    """
    params = core.adapter_parameters(model, name)
    embed_path, head_path, tied = embedding_paths(model, "load_adapter")
    first = min((min(ids) for ids in token_indices(model, name).values() if ids), default=0)
    out = dict(found)
    for path in filter(None, (embed_path, head_path)):
        if tied and path == head_path:
            out.pop(f"{path}.token_adapter.trainable_tokens_delta", None)
        weight = innermost(get_module(model, path)).weight
        for key in (f"{path}.weight", f"{path}.token_adapter.base_layer.weight"):
            if key in params or key not in out:
                continue
            saved = out.pop(key)
            if saved.shape[1:] != weight.shape[1:] or not torch.equal(saved[:first].to(weight), weight[:first]):
                raise ConfigError(f"load_adapter(): {folder} holds a whole {path} matrix that differs from this model's; "
                                  "it was saved from another base model: load the adapter onto that one")
    return out


def check_fits(model: nn.Module, saved: Any, folder: Path) -> dict[str, list[int]]:
    """The file's token rows by path; a ConfigError if they reach past this model's vocabulary."""
    indices = saved_indices(model, saved, folder)
    rows = innermost(get_module(model, embedding_paths(model, "load_adapter")[0])).num_embeddings
    largest = max((max(ids) for ids in indices.values() if ids), default=-1)
    if largest >= rows:
        raise ConfigError(
            f"load_adapter(): {folder} trains token rows up to id {largest}, but this model's vocabulary has {rows:,} "
            f"rows; add the same tokens first with nbpeft.add_tokens(model, tokenizer, [...]) "
            f"or model.resize_token_embeddings({largest + 1})")
    return indices
