"""Model cards: save_adapter and export write a README.md the Hub's ModelCard reads."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

import nbpeft
from nbpeft.formats import card

from conftest import char_tokenizer, tiny_llama

DATA = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"]


@pytest.fixture
def trained(tmp_path, monkeypatch):
    monkeypatch.setenv("NBPEFT_RUNS", str(tmp_path / "runs.sqlite"))
    model = tiny_llama()
    model.config._name_or_path = "someone/tiny-llama"
    nbpeft.attach(model, "lora", r=4)
    result = nbpeft.train(model, DATA, tokenizer=char_tokenizer(), steps=4, batch_size=2, eval_data=DATA[:2],
                          eval_every=2, metrics=lambda m: {"answer_rate": 0.75}, live=False)
    return model, result


def test_save_adapter_writes_a_card_the_hub_reads(trained, tmp_path) -> None:
    model, result = trained
    nbpeft.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "README.md"
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "someone/tiny-llama"
    assert loaded.data.library_name == "nbpeft" and loaded.data.pipeline_tag == "text-generation"
    assert {"peft", "nbpeft", "lora"} <= set(loaded.data.tags)
    text = loaded.text
    assert "`r=4`" in text and "4 examples, fingerprint `" in text and result.run_id in text
    assert f"| 4 | {result.final_loss:.4f} | {result.eval_losses[-1][1]:.4f} | 0.75 |" in text
    assert "![loss curve](loss.png)" in text and (tmp_path / "adapter" / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert 'nbpeft.load_adapter(model, "PATH")' in text and "PeftModel.from_pretrained" in text
    assert "- torch " in text and "- transformers " in text
    assert nbpeft.runs().rows[0]["adapter_path"] == str((tmp_path / "adapter").resolve())  # "saved to"


def test_a_card_someone_wrote_is_kept_unless_overwrite(trained, tmp_path) -> None:
    model, _ = trained
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# My adapter\nmy own words\n")
    nbpeft.save_adapter(model, folder)
    assert (folder / "README.md").read_text() == "# My adapter\nmy own words\n"
    nbpeft.save_adapter(model, folder, overwrite=True)
    assert ModelCard.load(folder / "README.md").data.library_name == "nbpeft"
    nbpeft.save_adapter(model, folder, overwrite=True)  # our own card is ours to replace
    assert (folder / "README.md").read_text().count(card.MARK) == 1


def test_a_card_without_a_recorded_run_still_says_method_and_loading(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NBPEFT_RUNS", "off")
    model = tiny_llama()
    nbpeft.attach(model, "ia3", name="chat")
    nbpeft.save_adapter(model, tmp_path / "a")
    loaded = ModelCard.load(tmp_path / "a" / "chat" / "README.md")
    assert "ia3" in loaded.data.tags and "No recorded run" in loaded.text and "base_model" not in loaded.data.to_dict()
    assert not (tmp_path / "a" / "chat" / "loss.png").exists()


def test_export_writes_a_card_with_the_merged_model(trained, tmp_path) -> None:
    model, _ = trained
    exported = nbpeft.export(model, tmp_path / "merged", tokenizer=char_tokenizer())
    assert "README.md" in exported.files and "loss.png" in exported.files
    loaded = ModelCard.load(tmp_path / "merged" / "README.md")
    assert loaded.data.base_model == "someone/tiny-llama" and "merged" in loaded.data.tags
    assert "AutoModelForCausalLM.from_pretrained" in loaded.text
