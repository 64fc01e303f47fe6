"""Shared fixtures: tiny random models (milliseconds) and the two bundled real models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import nbpeft
from nbpeft import core
from nbpeft.layers import IGNORE

# Every run the tests train is recorded in a throwaway store, never in the user's cache.
_RUNS_DIR = tempfile.mkdtemp(prefix="nbpeft-test-runs-")
os.environ["NBPEFT_RUNS"] = os.path.join(_RUNS_DIR, "runs.sqlite")
os.environ["TRACKIO_DIR"] = os.path.join(_RUNS_DIR, "trackio")  # trackio reads it once, when first imported
atexit.register(shutil.rmtree, _RUNS_DIR, ignore_errors=True)

# Two cores: keep torch from oversubscribing them when tests run beside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(config).eval()


def tokens(batch: int = 2, length: int = 6, vocab: int = 128) -> torch.Tensor:
    return torch.arange(batch * length).reshape(batch, length) % vocab


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def hidden(model: torch.nn.Module) -> torch.Tensor:
    """Last hidden states: tiny BERT's random classifier hides small changes in its logits."""
    with torch.no_grad():
        return model(tokens(), output_hidden_states=True).hidden_states[-1]


def logits(model: torch.nn.Module, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if input_ids is None else input_ids).logits


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed call must leave alone: weights, module types, requires_grad."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["types"] == after["types"]
    assert before["grads"] == after["grads"]
    assert before["weights"].keys() == after["weights"].keys()
    for key, value in before["weights"].items():
        assert torch.equal(value, after["weights"][key]), key


@pytest.fixture
def llama() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> transformers.GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def bert() -> transformers.BertForSequenceClassification:
    return tiny_bert()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M and its tokenizer (converted once, then seconds to load)."""
    return nbpeft.load_model("smollm2-135m")


@pytest.fixture
def smol(smollm2):
    """The session's SmolLM2 with every adapter removed again after the test."""
    model, tokenizer = smollm2
    yield model, tokenizer
    if getattr(model, "_nbpeft", None) is not None:
        nbpeft.detach(model)


@pytest.fixture(scope="session")
def minilm_classifier():
    return nbpeft.load_model("minilm-l6", task="classification", num_labels=2)


@pytest.fixture
def minilm(minilm_classifier):
    model, tokenizer = minilm_classifier
    yield model, tokenizer
    if getattr(model, "_nbpeft", None) is not None:
        nbpeft.detach(model)


CHAR_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; ids 0-2 are pad, bos, eos as in a default LlamaConfig."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat:
        tokenizer.chat_template = CHAR_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The bundled SmolLM2's own tokenizer (with its chat template); one per test module."""
    from transformers import AutoTokenizer

    from nbpeft.models import resolve_name

    return AutoTokenizer.from_pretrained(resolve_name("smollm2-135m"))


def two_adapters(model):
    """Two LoRA adapters with random B matrices, so each changes the answers."""
    torch.manual_seed(1)
    for name in ("pirate", "poet"):
        nbpeft.attach(model, "lora", name=name, r=4, targets=["q_proj", "v_proj"])
        for param_name, param in core.adapter_parameters(model, name).items():
            if "lora_B" in param_name:
                param.data.normal_(0, 0.5)
    return model


def examples(lengths=(5, 9, 3, 12, 7, 4), seed=0):
    """Pre-tokenized rows of the given lengths, their first third unlabelled."""
    torch.manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 128, (n,)).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3:]})
    return out
