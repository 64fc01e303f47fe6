"""Tiny random models of the transformers families nbpeft knows, and a batch each can train on.

Shared by the compatibility matrix (``tests/test_families.py``), the family-table test in
``tests/test_layers.py`` and the README table (``python -m tests.families_table``). Every model
is built from its config (no download) with hidden size 16 and one layer per stack, in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import nn

import nbpeft
from nbpeft.methods.base import get_method, registered

VOCAB = 96
BATCH, LENGTH = 2, 6
_DECODER = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_ENCODER = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "pad_token_id": 0}
_SEQ2SEQ = {"vocab_size": VOCAB, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}

# family (config.model_type) -> (model class, config); the kind of batch each takes is in KIND
BUILDERS: dict[str, Callable[[], tuple[type, tf.PretrainedConfig]]] = {
    "llama": lambda: (tf.LlamaForCausalLM, tf.LlamaConfig(**_DECODER)),
    "mistral": lambda: (tf.MistralForCausalLM, tf.MistralConfig(**_DECODER)),
    "qwen2": lambda: (tf.Qwen2ForCausalLM, tf.Qwen2Config(**_DECODER)),
    "qwen3": lambda: (tf.Qwen3ForCausalLM, tf.Qwen3Config(**_DECODER, head_dim=4)),
    "gemma2": lambda: (tf.Gemma2ForCausalLM, tf.Gemma2Config(**_DECODER, head_dim=4)),
    "gemma3_text": lambda: (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**_DECODER, head_dim=4)),
    "phi3": lambda: (tf.Phi3ForCausalLM, tf.Phi3Config(**_DECODER)),
    "mixtral": lambda: (tf.MixtralForCausalLM, tf.MixtralConfig(**_DECODER, num_local_experts=2, num_experts_per_tok=1)),
    "gpt2": lambda: (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=4, n_positions=32,
                                                        bos_token_id=1, eos_token_id=2)),
    # no num_key_value_heads key at all, as in GPT-NeoX checkpoints (the reference's prefix tuning fails on an explicit None)
    "gpt_neox": lambda: (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"})),
    "falcon": lambda: (tf.FalconForCausalLM, tf.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=4, bos_token_id=1, eos_token_id=2)),
    "bloom": lambda: (tf.BloomForCausalLM, tf.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=4,
                                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "opt": lambda: (tf.OPTForCausalLM, tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                                    num_attention_heads=4, word_embed_proj_dim=16, pad_token_id=0,
                                                    bos_token_id=1, eos_token_id=2)),
    "t5": lambda: (tf.T5ForConditionalGeneration, tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                              num_heads=4, pad_token_id=0, eos_token_id=2,
                                                              decoder_start_token_id=0)),
    "bart": lambda: (tf.BartForConditionalGeneration, tf.BartConfig(**_SEQ2SEQ, max_position_embeddings=32)),
    "whisper": lambda: (tf.WhisperForConditionalGeneration, tf.WhisperConfig(
        **_SEQ2SEQ, num_mel_bins=8, max_source_positions=8, max_target_positions=32, suppress_tokens=[],
        begin_suppress_tokens=[])),
    "bert": lambda: (tf.BertForSequenceClassification, tf.BertConfig(**_ENCODER, max_position_embeddings=32)),
    "roberta": lambda: (tf.RobertaForSequenceClassification, tf.RobertaConfig(**{**_ENCODER, "pad_token_id": 1},
                                                                             max_position_embeddings=32)),
    "deberta-v2": lambda: (tf.DebertaV2ForSequenceClassification, tf.DebertaV2Config(**_ENCODER, max_position_embeddings=32)),
    "vit": lambda: (tf.ViTForImageClassification, tf.ViTConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=1, num_attention_heads=4, num_labels=3)),
}
FAMILIES = list(BUILDERS)
KIND = {**{f: "causal-lm" for f in FAMILIES}, "t5": "seq2seq", "bart": "seq2seq", "whisper": "speech-seq2seq",
        "bert": "classification", "roberta": "classification", "deberta-v2": "classification", "vit": "image-classification"}


# The config fields that count layers, whichever a family uses (an encoder-decoder has two stacks).
_LAYER_FIELDS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers", "n_layer")


def tiny_model(family: str, seed: int = 0, layers: int = 1) -> nn.Module:
    """A randomly initialised model of ``family`` (the same weights for the same seed), in eval mode.

    ``layers`` > 1 gives every stack that many layers: one layer cannot show a mix-up of layers.
    """
    cls, config = BUILDERS[family]()
    if layers != 1:
        values = config.to_dict()
        values.pop("layer_types", None)  # a per-layer list: the config builds it again for the new depth
        values.update({key: layers for key in _LAYER_FIELDS if key in values})
        config = type(config)(**values)
    torch.manual_seed(seed)
    return cls(config).eval()


def tiny_batch(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch with labels for the model's own loss: token ids, pixels or audio features as the family takes."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    kind = KIND[family]
    if kind == "causal-lm":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if kind == "classification":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    if kind == "image-classification":
        return {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=generator), "labels": torch.tensor([0, 2])}
    labels = torch.randint(3, VOCAB, (BATCH, 4), generator=generator)
    if kind == "speech-seq2seq":
        return {"input_features": torch.randn(BATCH, 8, 16, generator=generator), "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels; an encoder-decoder gets its decoder inputs (the labels shifted right)."""
    out = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(model.config, "is_encoder_decoder", False):
        labels = batch["labels"]
        start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
        out["decoder_input_ids"] = torch.cat([start, labels[:, :-1]], dim=1)
    return out


@torch.no_grad()
def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch`` (labels left out)."""
    return model(**inputs(model, batch)).logits


# ---------------------------------------------------------------- the compatibility matrix

# Options the matrix attaches with: Houlsby's layout (two bottlenecks per block) for the adapter,
# few virtual tokens for prompt and prefix to stay fast; every other method runs with its defaults.
FAST_OPTIONS: dict[str, dict] = {
    "adapter": {"config": "houlsby"}, "prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4},
    "oft": {"oft_block_size": 4},  # the default 32 does not divide the tiny models' 16 features: attach refuses it
    # AdaLoRA starts P and Q at N(0, 0.02²) and Λ at 0: at the default scale one step moves BLOOM's tiny logits by < 1e-6
    "adalora": {"alpha": 64.0},
}


def registered_methods() -> list[str]:
    """Every registered method by name, in listing order."""
    return [m.name for m in sorted(registered(), key=lambda m: (m.listing_order, m.name))]


# Every registered method, with its default targets.
METHODS = registered_methods()
# What a method cannot do on a family: attach refuses with one line that contains this text.
REFUSED: dict[tuple[str, str], str] = {
    ("vit", "prompt"): "takes no inputs_embeds",
    ("whisper", "prompt"): "takes no inputs_embeds",
    ("vit", "prefix"): "takes no key/value cache",
    ("deberta-v2", "prefix"): "takes no key/value cache",
}


def attach_default(model: nn.Module, method: str) -> None:
    """Attach ``method`` with its default targets; a method that combines trained adapters (fusion) first
    gets two bottleneck adapters to combine."""
    if get_method(method).needs_other_adapters is None:
        nbpeft.attach(model, method, **FAST_OPTIONS.get(method, {}))
        return
    for name in ("a", "b"):
        nbpeft.attach(model, "adapter", name=name, config="houlsby")
        with torch.no_grad():  # as if trained: a fusion of zero updates would learn nothing
            for param in nbpeft.core.adapter_parameters(model, name).values():
                param.normal_(0, 0.5)
    nbpeft.attach(model, "fusion", name="fusion", adapters=["a", "b"])


def check_refusal(family: str, method: str, why: str | None = None) -> str:
    """Attach must refuse with one line naming why (``why``, else the text in REFUSED), leaving the model as it
    was; returns the message."""
    from conftest import assert_same, snapshot  # here, so that benchmarks/compat.py can import this file without pytest

    model = tiny_model(family)
    before = snapshot(model)
    try:
        attach_default(model, method)
    except nbpeft.ConfigError as err:
        message = str(err)
    else:
        raise AssertionError(f"{method} on {family} attached; expected a refusal")
    assert (why or REFUSED[(family, method)]) in message and "\n" not in message, message
    if get_method(method).needs_other_adapters is None:
        assert_same(before, snapshot(model))
    return message


def check_method(family: str, method: str, folder) -> None:
    """Attach with default targets, identity at attach (where promised), one step changes outputs,
    save -> fresh copy -> load gives equal outputs, detach restores the base exactly, 2 steps of train."""
    from conftest import assert_same, snapshot

    model, batch = tiny_model(family), tiny_batch(family)
    base, before = outputs(model, batch), snapshot(model)
    attach_default(model, method)
    attached = outputs(model, batch)
    if get_method(method).identity_at_attach:  # qlora is not: its base is already 4-bit
        torch.testing.assert_close(attached, base, rtol=0, atol=1e-6)

    params = nbpeft.core.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    stepped = outputs(model, batch)
    assert (stepped - attached).abs().max() > 1e-6, "one optimiser step left the outputs unchanged"

    nbpeft.save_adapter(model, folder)
    fresh = tiny_model(family)
    nbpeft.load_adapter(fresh, folder)
    torch.testing.assert_close(outputs(fresh, batch), stepped)

    nbpeft.detach(model)
    assert_same(before, snapshot(model))
    assert torch.equal(outputs(model, batch), base)

    start = {k: p.detach().clone() for k, p in enumerate(nbpeft.core.trainable_parameters(fresh))}
    loader = torch.utils.data.DataLoader([batch, tiny_batch(family, seed=2)], batch_size=None)
    result = nbpeft.train(fresh, loader, steps=2, lr=1e-2, warmup=0, live=False, compile=False)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(row["tokens"] > 0 for row in result.history)
    trained = nbpeft.core.trainable_parameters(fresh)
    assert any(not torch.equal(start[k], p) for k, p in enumerate(trained)), "train() changed no parameter"
