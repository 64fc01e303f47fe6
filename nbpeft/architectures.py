"""What nbpeft knows about each model family, in one table keyed by ``config.model_type``.

Each row says where the parts of a transformer block live, by *role*; methods ask for
roles, never for module names:

- ``query``, ``key``, ``value``: the separate attention projections;
- ``qkv``: one fused projection for all three (GPT-2's ``c_attn``), in families without
  the separate ones; ``qkv_thirds`` when its output is queries, keys and values in three
  equal blocks (what (IA)³'s ``fused_qkv`` option splits);
- ``attention_output``: the projection whose output joins the residual after attention;
- ``ffn_in`` and ``ffn_out``: the feed-forward block's input and output projections;
- ``expert_parameters``: mixture-of-experts weights stored as 3-D parameters
  (``experts x out x in``) instead of linear layers, by parameter path suffix;
- ``ffn_block_output``: where no single linear layer ends the feed-forward block (a
  mixture of experts), the module whose output is the block's result (bottleneck adapters
  go there).

Encoder-decoder rows name the projections of both stacks (self- and cross-attention).

A role's patterns are module names or name suffixes (``"mlp.down_proj"`` matches every
``...layers.N.mlp.down_proj``) or, where a suffix would be ambiguous, a :class:`Regex`
matched against the full module path. ``plain_lm_head`` marks causal LMs whose logits are
exactly the last hidden state through a linear head (``nbpeft.training.lm_loss`` computes their loss
in blocks). Adding a family is adding a row; a role left out means no method defaults to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn


class Regex(str):
    """A role pattern matched against the full module path (where a name suffix would be ambiguous)."""


Patterns = tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """Module patterns per role for one model family (see the module docstring)."""

    query: Patterns = ()
    key: Patterns = ()
    value: Patterns = ()
    qkv: Patterns = ()
    qkv_thirds: bool = False
    attention_output: Patterns = ()
    ffn_in: Patterns = ()
    ffn_out: Patterns = ()
    expert_parameters: Patterns = ()
    ffn_block_output: Patterns = ()
    plain_lm_head: bool = False

    def patterns(self, role: str) -> Patterns:
        return getattr(self, role)


_LLAMA = Family(
    query=("q_proj",), key=("k_proj",), value=("v_proj",), attention_output=("self_attn.o_proj",),
    ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out=("mlp.down_proj",), plain_lm_head=True,
)
# BERT's feed-forward output is layer.N.output.dense; the suffix "output.dense" would also
# pick the attention's output projection (attention.output.dense).
_BERT = Family(
    query=("query",), key=("key",), value=("value",), attention_output=("attention.output.dense",),
    ffn_in=("intermediate.dense",), ffn_out=(Regex(r".*\.layer\.\d+\.output\.dense"),),
)
# BLOOM and Falcon: one fused query_key_value, heads interleaved (no leading query block).
_BLOOM = Family(
    qkv=("self_attention.query_key_value",), attention_output=("self_attention.dense",),
    ffn_in=("mlp.dense_h_to_4h",), ffn_out=("mlp.dense_4h_to_h",),
)
# BART-style encoder-decoders: self-attention in both stacks, cross-attention (encoder_attn) in
# the decoder; q/k/v suffixes reach both kinds of attention, as the reference's defaults do.
_BART = Family(
    query=("q_proj",), key=("k_proj",), value=("v_proj",), attention_output=("self_attn.out_proj", "encoder_attn.out_proj"),
    ffn_in=("fc1",), ffn_out=("fc2",),
)
# Causal LMs with a plain linear head whose roles are not written down yet: no method
# defaults to their modules (pass targets=...), but the fast loss applies.
_PLAIN_HEAD_ONLY = Family(plain_lm_head=True)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": replace(_LLAMA, plain_lm_head=False),  # its logits are soft-capped
    "gemma3_text": replace(_LLAMA, plain_lm_head=False),
    # Mixtral's experts are 3-D parameters (experts.gate_up_proj, experts.down_proj), not linear layers.
    "mixtral": replace(_LLAMA, ffn_in=(), ffn_out=(), plain_lm_head=False, ffn_block_output=("mlp.experts",),
                       expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    "phi3": Family(qkv=("qkv_proj",), attention_output=("self_attn.o_proj",), ffn_in=("mlp.gate_up_proj",),
                   ffn_out=("mlp.down_proj",), plain_lm_head=True),
    "opt": Family(query=("q_proj",), key=("k_proj",), value=("v_proj",), attention_output=("self_attn.out_proj",),
                  ffn_in=("fc1",), ffn_out=("fc2",)),
    "bert": _BERT,
    "roberta": _BERT,
    "deberta-v2": replace(_BERT, query=("query_proj",), key=("key_proj",), value=("value_proj",)),
    "distilbert": Family(query=("q_lin",), key=("k_lin",), value=("v_lin",), attention_output=("attention.out_lin",),
                         ffn_in=("ffn.lin1",), ffn_out=("ffn.lin2",)),
    "gpt2": Family(qkv=("c_attn",), qkv_thirds=True, attention_output=("attn.c_proj",), ffn_in=("mlp.c_fc",),
                   ffn_out=("mlp.c_proj",), plain_lm_head=True),
    "gpt_neox": Family(qkv=("query_key_value",), attention_output=("attention.dense",), ffn_in=("mlp.dense_h_to_4h",),
                       ffn_out=("mlp.dense_4h_to_h",), plain_lm_head=True),
    "bloom": _BLOOM,
    "falcon": _BLOOM,
    # T5 v1.0 has one wi, v1.1 and T0 a gated pair wi_0 / wi_1; o is the output of self- and cross-attention.
    "t5": Family(query=("q",), key=("k",), value=("v",), attention_output=("SelfAttention.o", "EncDecAttention.o"),
                 ffn_in=(Regex(r".*\.DenseReluDense\.wi(?:_[01])?"),), ffn_out=("DenseReluDense.wo",)),
    "bart": _BART,
    "whisper": _BART,
    "vit": Family(query=("attention.q_proj",), key=("attention.k_proj",), value=("attention.v_proj",),
                  attention_output=("attention.o_proj",), ffn_in=("mlp.fc1",), ffn_out=("mlp.fc2",)),
    **{t: _PLAIN_HEAD_ONLY for t in ("smollm3", "olmo", "olmo2", "stablelm", "starcoder2")},
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type``, or None for a model without a transformers config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def family(model: nn.Module) -> Family | None:
    """The row of ``model``'s family, or None when nbpeft does not know it."""
    return FAMILIES.get(model_type(model))


def role_targets(model: nn.Module, *roles: str) -> str | list[str] | None:
    """The ``targets`` value that selects ``roles`` on ``model``, or None if any role is unknown here.

    Plain names give a list (``["q_proj", "v_proj"]``); with any :class:`Regex` among them,
    one regex for all. A module named by several roles (a fused projection) appears once.
    """
    row = family(model)
    if row is None or not all(row.patterns(role) for role in roles):
        return None
    patterns = list(dict.fromkeys(p for role in roles for p in row.patterns(role)))
    if not any(isinstance(p, Regex) for p in patterns):
        return patterns
    if len(patterns) == 1:
        return str(patterns[0])
    return "|".join(f"(?:{p})" if isinstance(p, Regex) else rf"(?:.*\.)?{re.escape(p)}" for p in patterns)


def key_value_heads(config: object) -> int:
    """How many key/value heads the attention has, read from the key each family uses.

    ``num_key_value_heads`` (grouped-query attention, Llama and most others); Falcon's
    ``new_decoder_architecture`` with ``num_kv_heads``; ``multi_query`` (Falcon's older layout,
    GPT-BigCode) means one; else as many as the query heads.
    """
    heads = getattr(config, "num_attention_heads", None)
    grouped = getattr(config, "num_key_value_heads", None)
    if grouped:
        return grouped
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    return getattr(config, "num_kv_heads", None) or heads


def has_plain_lm_head(model: nn.Module) -> bool:
    row = family(model)
    return row is not None and row.plain_lm_head
