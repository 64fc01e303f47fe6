"""nbpeft.compare: trainable parameters per method, counted on a shapes-only copy."""

from __future__ import annotations

import pytest
import torch
import transformers

import nbpeft
from nbpeft.methods.base import registered

from conftest import assert_same, snapshot, tiny_llama


def needs(*names: str) -> None:
    """Skip when a method has not been registered (methods land independently)."""
    missing = [n for n in names if n not in {m.name for m in registered()}]
    if missing:
        pytest.skip(f"method {', '.join(missing)} is not registered")


def row(table: nbpeft.Comparison, method: str) -> dict:
    (found,) = [r for r in table.rows if r["method"] == method]
    return found


def test_compare_lists_every_registered_method_and_leaves_the_model_alone(llama):
    before = snapshot(llama)
    table = nbpeft.compare(llama)
    assert sorted(r["method"] for r in table.rows) == sorted(m.name for m in registered())
    assert_same(before, snapshot(llama))
    assert getattr(llama, "_nbpeft", None) is None
    assert table.total == sum(p.numel() for p in llama.parameters())
    lora = row(table, "lora")
    assert lora["settings"] == {"r": 8} and lora["modules"] == 4
    assert lora["trainable"] == 2 * 8 * ((32 + 32) + (32 + 16))  # q_proj 32->32, v_proj 32->16 per layer
    # the share attach prints: of the total with the adapter
    assert lora["percent"] == pytest.approx(100 * lora["trainable"] / (table.total + lora["trainable"]))
    assert f"({lora['percent']:.3f}% of {table.total + lora['trainable']:,})" in repr(nbpeft.attach(llama, "lora", r=8))


def test_options_override_the_usual_settings(llama):
    table = nbpeft.compare(llama, methods=["lora"], lora={"r": 16, "targets": "all-linear"})
    (only,) = table.rows
    assert only["settings"] == {"r": 16, "targets": "all-linear"}
    per_layer = (32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 2 + (64 + 32)  # q o | k v | gate up | down
    assert only["trainable"] == 2 * 16 * per_layer


def test_a_model_with_adapters_is_compared_as_its_base_and_stays_as_it_is(llama):
    needs("qlora")
    nbpeft.attach(llama, "qlora", name="quantised", init="random")
    nbpeft.attach(llama, "lora", name="plain", targets=["k_proj"], init="random")
    before = snapshot(llama)
    table = nbpeft.compare(llama, methods=["lora", "qlora"])
    assert_same(before, snapshot(llama))
    assert list(nbpeft.core.state(llama).adapters) == ["quantised", "plain"]
    assert table.total == sum(p.numel() for p in tiny_llama().parameters())  # the 4-bit weights counted as before
    assert row(table, "lora")["trainable"] == row(table, "qlora")["trainable"] == 2 * 8 * ((32 + 32) + (32 + 16))
    assert "NF4" in row(table, "qlora")["note"]


def test_bad_names_and_options_raise_before_counting(llama):
    with pytest.raises(nbpeft.ConfigError, match="did you mean 'lora'"):
        nbpeft.compare(llama, methods=["lorra"])
    with pytest.raises(nbpeft.ConfigError, match="did you mean 'lora'"):
        nbpeft.compare(llama, lorra={"r": 4})
    with pytest.raises(nbpeft.ConfigError, match="lora: r=0 must be a positive integer"):
        nbpeft.compare(llama, lora={"r": 0})
    with pytest.raises(nbpeft.ConfigError, match="must be a dict of options"):
        nbpeft.compare(llama, lora=16)


def test_a_method_that_does_not_fit_gets_a_note(llama):
    table = nbpeft.compare(llama, methods=["lora"], lora={"targets": ["c_attn"]})
    (only,) = table.rows
    assert only["trainable"] is None and only["note"].startswith("not counted: lora: no module matched")
    assert "not counted" in repr(table) and "not counted" in table._repr_html_()


def test_fusion_is_skipped_with_a_note(llama):
    needs("fusion")
    (only,) = nbpeft.compare(llama, methods=["fusion"]).rows
    assert only["trainable"] is None and only["note"].startswith("skipped: ")


def test_text_and_html_show_every_row(llama):
    table = nbpeft.compare(llama, methods=["lora"])
    text, page = repr(table), table._repr_html_()
    assert text.splitlines()[0] == f"LlamaForCausalLM: {table.total:,} parameters without adapters"
    assert "lora" in text and "1,792" in text and "r=8" in text
    assert page.startswith("<table>") and "<td>1,792</td>" in page


# A 24-layer, ~350M-parameter transformer: GPT-2 medium's shape, built on the meta device.
#
# The published table (prompt tuning of length 20: 15k (0.006%); adapters of size 64: 6M (2%);
# LoRA of rank 8: 0.8M (0.22%); BitFit: 0.32M (0.09%)) against our exact counts:
#
# - Prompt tuning: 20 x 1024 = 20,480 (0.0058%). The published percentage agrees with us; the
#   published "15k" is 20 x 768 = 15,360, the count for a 768-wide (base-size) model.
# - Adapters: Houlsby placement (after attention and after the feed-forward block, two per
#   layer), each 1024x64 + 64 down and 64x1024 + 1024 up: 24 x 2 x 132,160 = 6,343,680 (1.79%),
#   the published 6M. Pfeiffer placement (one per layer, our default) is half: 3,171,840.
# - LoRA: GPT-2 fuses q, k and v into one Conv1D c_attn (1024 -> 3072), so "q and v" is one
#   target: A 8x1024 + B 3072x8 = 32,768 per layer, 786,432 in all (0.2216%). Separate q and v
#   adapters would also give 2 x 8 x (1024 + 1024) = 32,768 per layer: the count matches the
#   published 0.8M, but our update reaches the keys too (one shared A for q, k and v).
# - BitFit: our default trains the biases of the linear layers, 24 x (3072 + 1024 + 4096 + 1024)
#   = 221,184 (0.062%); every bias including LayerNorm's is 271,360 (0.076%). The published
#   0.32M (0.09%) is matched by bitfit with layer_norms=True, which also trains the LayerNorm
#   gains: 271,360 + 50,176 = 321,536 (0.0906%).
GPT2_MEDIUM_TOTAL = 354_823_168


@pytest.fixture(scope="module")
def gpt2_medium():
    config = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(config)


def test_gpt2_medium_lora_and_prompt_against_the_published_table(gpt2_medium):
    needs("prompt")
    table = nbpeft.compare(gpt2_medium, methods=["lora", "prompt"])
    assert table.total == GPT2_MEDIUM_TOTAL
    lora, prompt = row(table, "lora"), row(table, "prompt")
    assert (lora["trainable"], lora["modules"]) == (786_432, 24)
    assert f"{lora['percent']:.2f}" == "0.22"  # published: 0.8M (0.22%)
    assert prompt["settings"] == {"num_virtual_tokens": 20}
    assert prompt["trainable"] == 20_480
    assert f"{prompt['percent']:.3f}" == "0.006"  # published: 15k (0.006%); 15k = 20 x 768


def test_gpt2_medium_adapters_against_the_published_table(gpt2_medium):
    needs("adapter")
    houlsby = nbpeft.compare(gpt2_medium, methods=["adapter"], adapter={"config": "houlsby"})
    pfeiffer = nbpeft.compare(gpt2_medium, methods=["adapter"], adapter={"config": "pfeiffer"})
    assert row(houlsby, "adapter")["settings"] == {"bottleneck": 64, "config": "houlsby"}
    assert row(houlsby, "adapter")["trainable"] == 24 * 2 * (1024 * 64 + 64 + 64 * 1024 + 1024) == 6_343_680
    assert round(row(houlsby, "adapter")["percent"]) == 2  # published: 6M (2%)
    assert row(pfeiffer, "adapter")["trainable"] == 3_171_840


def test_gpt2_medium_bitfit_against_the_published_table(gpt2_medium):
    needs("bitfit")
    biases = nbpeft.compare(gpt2_medium, methods=["bitfit"])
    with_norms = nbpeft.compare(gpt2_medium, methods=["bitfit"], bitfit={"layer_norms": True})
    assert row(biases, "bitfit")["trainable"] == 24 * (3072 + 1024 + 4096 + 1024) == 221_184
    assert sum(p.numel() for n, p in gpt2_medium.named_parameters() if n.endswith(".bias")) == 271_360
    assert row(with_norms, "bitfit")["trainable"] == 321_536
    assert f"{row(with_norms, 'bitfit')['percent']:.2f}" == "0.09"  # published: 0.32M (0.09%)


def test_gpt2_medium_other_methods(gpt2_medium):
    needs("dora", "ia3", "prefix", "qlora")
    table = nbpeft.compare(gpt2_medium, methods=["dora", "ia3", "prefix", "qlora"])
    assert row(table, "dora")["trainable"] == 786_432 + 24 * 3072  # LoRA plus a magnitude per output
    # one vector over the fused c_attn output (its query third held at 1) and one over the feed-forward input
    assert row(table, "ia3")["trainable"] == 24 * (3072 + 4096)
    assert row(table, "prefix")["trainable"] == 20 * 24 * 2 * 1024  # a key and a value per token and layer
    assert row(table, "qlora")["trainable"] == 786_432
