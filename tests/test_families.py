"""Every method on every family: tiny random models of 20 transformers families × every method.

Each supported pair attaches with default targets, keeps the outputs at attach where the
method promises it, changes them after one optimiser step, saves and loads into a fresh
copy with equal outputs, detaches back to the exact base, and trains two steps with
``nbpeft.train`` on the batch the family takes (token ids, pixels, audio features,
seq2seq labels). The pairs a method cannot do are listed in ``families.REFUSED`` and
must be refused with one line. The README table is written from the same checks
(``python tests/families_table.py``).
"""

from __future__ import annotations

import pytest

from families import FAMILIES, METHODS, REFUSED, check_method, check_refusal, tiny_model

CASES = [(f, m) for f in FAMILIES for m in METHODS]


def test_the_matrix_covers_the_families_of_the_issue() -> None:
    assert len(FAMILIES) >= 20 and set(REFUSED) <= set(CASES)
    assert {"llama", "mixtral", "falcon", "t5", "bart", "whisper", "vit", "deberta-v2", "gemma3_text"} <= set(FAMILIES)


@pytest.mark.parametrize(("family", "method"), [c for c in CASES if c not in REFUSED])
def test_method_works_on_family(family: str, method: str, tmp_path) -> None:
    check_method(family, method, tmp_path / "adapter")


@pytest.mark.parametrize(("family", "method"), sorted(REFUSED))
def test_method_refuses_family_in_one_line(family: str, method: str) -> None:
    check_refusal(family, method)


@pytest.mark.parametrize(("family", "task", "cls"), [
    ("t5", "seq2seq-lm", "T5ForConditionalGeneration"),
    ("bert", "token-classification", "BertForTokenClassification"),
    ("vit", "image-classification", "ViTForImageClassification"),
    ("whisper", "audio-classification", "WhisperForAudioClassification"),
])
def test_load_model_takes_the_task_users_need(family: str, task: str, cls: str, tmp_path) -> None:
    import transformers

    import nbpeft
    from nbpeft.models import cache_dir

    tiny_model(family).save_pretrained(tmp_path)
    if family == "vit":
        transformers.ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path)
    elif family == "whisper":
        transformers.WhisperFeatureExtractor(feature_size=8).save_pretrained(tmp_path)
    else:
        transformers.AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m").save_pretrained(tmp_path)
    model, inputs = nbpeft.load_model(str(tmp_path), task=task, **({"num_labels": 3} if task != "seq2seq-lm" else {}))
    assert type(model).__name__ == cls and not any(p.requires_grad for p in model.parameters())
    assert callable(inputs)
    if task != "seq2seq-lm":
        assert model.config.num_labels == 3
    nbpeft.attach(model, "lora")  # default targets by role on the task's model too
    with pytest.raises(nbpeft.ConfigError, match=r"has no seq2seq-lm model in transformers; pick another task=") if family == "vit" \
            else pytest.raises(nbpeft.ConfigError, match="num_labels only applies"):
        nbpeft.load_model(str(tmp_path), task="seq2seq-lm", **({"num_labels": 2} if family != "vit" else {}))
