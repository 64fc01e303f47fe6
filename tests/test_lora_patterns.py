"""LoRA's per-module options (rank_pattern, alpha_pattern, layers, exclude, lora_bias), LoRA on
embeddings, and reading the LoRA files the reference writes with them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbpeft
from nbpeft import targeting
from nbpeft.core import adapter_parameters
from nbpeft.frontend import option_value, parse_options, parse_value
from nbpeft.methods.base import method_options
from nbpeft.methods.lora import LoraConfig, LoRAEmbedding, LoRALinear

from conftest import assert_same, logits, snapshot, tiny_bert, tiny_gpt2, tiny_llama, tokens


def lora_layers(model: torch.nn.Module) -> dict[str, LoRALinear]:
    return {path: layer for path, layer in nbpeft.core.adapter_layers(model) if isinstance(layer, LoRALinear)}


def randomise(model: torch.nn.Module, name: str = "default", seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def save_and_reload(model: torch.nn.Module, folder, fresh: torch.nn.Module) -> dict:
    nbpeft.save_adapter(model, folder)
    nbpeft.load_adapter(fresh, folder)
    return json.loads((folder / "adapter_config.json").read_text())


# ---------------------------------------------------------------- rank and alpha patterns


def test_rank_and_alpha_patterns_give_each_module_its_rank_and_scale(llama):
    nbpeft.attach(llama, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"],
                  rank_pattern={"v_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}, alpha_pattern={"q_proj": 3})
    found = {path: (layer.lora_A["default"].out_features, layer.scaling["default"]) for path, layer in lora_layers(llama).items()}
    assert found == {
        "model.layers.0.self_attn.q_proj": (6, 3 / 6),
        "model.layers.0.self_attn.v_proj": (2, 8 / 2),
        "model.layers.1.self_attn.q_proj": (4, 3 / 4),
        "model.layers.1.self_attn.v_proj": (2, 8 / 2),
    }


def test_the_first_matching_pattern_key_wins_and_keys_match_whole_names():
    patterns = {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}
    assert targeting.pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert targeting.pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None  # not part of a name
    assert targeting.pattern_key({r"layers\.[01]\..*_proj": 1}, "model.layers.1.mlp.up_proj") is not None
    assert targeting.pattern_key({"^model.layers.0.mlp.up_proj": 1}, "model.layers.0.mlp.up_proj") is not None


def test_rslora_scales_each_module_by_its_own_rank(llama):
    nbpeft.attach(llama, "lora", r=4, alpha=8, rslora=True, targets=["q_proj"], rank_pattern={"q_proj": 16})
    assert {layer.scaling["default"] for layer in lora_layers(llama).values()} == {8 / 4.0}


def test_a_pattern_key_that_matches_nothing_is_noted(llama):
    adapter = nbpeft.attach(llama, "lora", targets=["q_proj"], rank_pattern={"qproj": 16})
    assert "rank_pattern key 'qproj' matched no adapted module" in repr(adapter)


@pytest.mark.parametrize("options, message", [
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0 must be a positive integer"),
    ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\]=2.5 must be a positive integer"),
    ({"alpha_pattern": {"q_proj": -1}}, r"alpha_pattern\['q_proj'\]=-1 must be a positive number"),
    ({"rank_pattern": {"q_proj(": 4}}, r"rank_pattern has 'q_proj\(', which is not a valid regex"),
    ({"layers": [-1]}, r"layers=\[-1\] must be block numbers from 0"),
    ({"layers_pattern": "layers"}, r"layers_pattern='layers' only applies with layers"),
    ({"targets": ["embed_tokens"], "layers": [0]}, r"layers=\[0\] needs block numbers.*pass layers_pattern"),
    ({"exclude": ["q_projj"]}, r"exclude=\['q_projj'\] names no module of this model; did you mean 'q_proj'"),
    ({"targets": ["q_proj"], "exclude": "q_proj|.*q_proj"}, r"no module is left to adapt"),
    ({"layers_to_transform": [0]}, r"unknown option 'layers_to_transform' \(did you mean 'layers'\?\)"),
    ({"exclude_modules": ["q_proj"]}, r"unknown option 'exclude_modules' \(did you mean 'exclude'\?\)"),
])
def test_bad_options_are_refused_in_one_line_and_change_nothing(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=message):
        nbpeft.attach(llama, "lora", **options)
    assert_same(before, snapshot(llama))


# ---------------------------------------------------------------- layers= and exclude


def test_layers_adapts_only_the_blocks_named(llama):
    nbpeft.attach(llama, "lora", targets=["q_proj", "v_proj"], layers=[1])
    assert sorted(lora_layers(llama)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    nbpeft.attach(llama, "lora", name="first", targets="all-linear", layers=0)
    first = [p for p, layer in lora_layers(llama).items() if "first" in layer.adapter_names]
    assert len(first) == 7 and all(p.startswith("model.layers.0.") for p in first)


def test_layers_finds_blocks_of_bert_and_with_layers_pattern_those_of_gpt2():
    bert = tiny_bert()
    nbpeft.attach(bert, "lora", targets=["query"], layers=[1])
    assert list(lora_layers(bert)) == ["bert.encoder.layer.1.attention.self.query"]
    gpt2 = tiny_gpt2()
    nbpeft.attach(gpt2, "lora", targets=["c_attn"], layers=[0], layers_pattern="h")
    assert list(lora_layers(gpt2)) == ["transformer.h.0.attn.c_attn"]


def test_layer_index_takes_the_block_number_not_a_deeper_one():
    assert targeting.layer_index("model.layers.3.mlp.experts.0.w1") == 3
    assert targeting.layer_index("model.embed_tokens") is None
    assert targeting.layer_index("transformer.h.2.attn.c_attn", "h") == 2
    assert targeting.layer_index("transformer.h.2.attn.c_attn", "layers") is None
    assert targeting.layer_index("encoder.block.1.layer.0.SelfAttention.q", ["block"]) == 1


def test_exclude_by_names_and_by_regex(llama):
    nbpeft.attach(llama, "lora", targets=["q_proj", "v_proj"], exclude=["layers.1.self_attn.q_proj"])
    assert "model.layers.1.self_attn.q_proj" not in lora_layers(llama) and len(lora_layers(llama)) == 3
    other = tiny_llama()
    nbpeft.attach(other, "lora", targets="all-linear", exclude=r".*\.mlp\..*")
    assert sorted({p.rsplit(".", 1)[-1] for p in lora_layers(other)}) == ["k_proj", "o_proj", "q_proj", "v_proj"]


# ---------------------------------------------------------------- lora_bias


def test_lora_bias_starts_at_zero_is_scaled_with_the_update_and_trains(llama):
    base = logits(llama)
    nbpeft.attach(llama, "lora", r=4, alpha=8, targets=["q_proj"], lora_bias=True)
    assert torch.equal(logits(llama), base)
    params = adapter_parameters(llama, "default")
    bias = params["model.layers.0.self_attn.q_proj.lora_B.bias"]
    assert bias.requires_grad and torch.equal(bias, torch.zeros(32))
    randomise(llama)
    layer = llama.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x) + 2.0 * (x @ A.T @ B.T + bias), atol=1e-6)
    before = bias.detach().clone()
    optimiser = torch.optim.SGD(nbpeft.core.trainable_parameters(llama), lr=0.1)
    llama(tokens(), labels=tokens()).loss.backward()
    optimiser.step()
    assert not torch.equal(bias, before)


def test_lora_bias_merges_into_a_base_bias_and_detach_is_exact():
    bert = tiny_bert()
    before = snapshot(bert)
    nbpeft.attach(bert, "lora", targets=["query", "value"], lora_bias=True, modules_to_save=[])
    randomise(bert)
    unmerged = logits(bert)
    nbpeft.merge(bert)
    assert torch.allclose(logits(bert), unmerged, atol=1e-5)
    nbpeft.unmerge(bert)
    nbpeft.detach(bert)
    assert_same(before, snapshot(bert))


def test_lora_bias_without_a_base_bias_cannot_merge(llama):
    nbpeft.attach(llama, "lora", targets=["q_proj"], lora_bias=True)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged: its lora_bias has no base bias"):
        nbpeft.merge(llama)


def test_dora_refuses_lora_bias_and_embeddings(llama):
    with pytest.raises(nbpeft.ConfigError, match="dora: lora_bias=True is not supported with DoRA"):
        nbpeft.attach(llama, "dora", lora_bias=True)
    with pytest.raises(nbpeft.ConfigError, match="matched only Embedding modules, which dora cannot adapt"):
        nbpeft.attach(llama, "dora", targets=["embed_tokens"])


# ---------------------------------------------------------------- LoRA on embeddings


def test_embedding_lora_is_identity_at_attach_and_round_trips(llama, tmp_path):
    base = logits(llama)
    before = snapshot(llama)
    nbpeft.attach(llama, "lora", r=4, alpha=8, targets=["embed_tokens", "q_proj"])
    layer = llama.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding)
    assert torch.equal(layer.lora_embedding_A["default"], torch.zeros(4, 128))  # A zero, B random
    assert layer.lora_embedding_B["default"].abs().sum() > 0
    assert torch.equal(logits(llama), base)
    randomise(llama)
    ids = tokens()
    with torch.no_grad():
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        assert torch.allclose(layer(ids), layer.base_layer(ids) + 2.0 * A.T[ids] @ B.T, atol=1e-6)
    changed = logits(llama)
    assert not torch.allclose(changed, base)

    fresh = tiny_llama()
    config = save_and_reload(llama, tmp_path, fresh)
    assert config["target_modules"] == ["embed_tokens", "q_proj"]
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items() if "embed" in k}
    assert shapes == {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 128),
                      "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4)}
    assert torch.equal(logits(fresh), changed)

    nbpeft.merge(llama)
    assert torch.allclose(logits(llama), changed, atol=1e-5)
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_embedding_lora_refuses_lora_bias(llama):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="lora_bias=True does not apply to an embedding"):
        nbpeft.attach(llama, "lora", targets=["embed_tokens"], lora_bias=True)
    assert_same(before, snapshot(llama))


# ---------------------------------------------------------------- files


def test_options_are_saved_in_the_reference_form_and_read_back(llama, tmp_path):
    options = {"targets": ["q_proj", "v_proj"], "layers": [1], "exclude": ["layers.1.self_attn.v_proj"],
               "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 4.0}, "lora_bias": True}
    nbpeft.attach(llama, "lora", **options)
    randomise(llama)
    fresh = tiny_llama()
    config = save_and_reload(llama, tmp_path, fresh)
    assert {k: config[k] for k in ("target_modules", "layers_to_transform", "exclude_modules", "rank_pattern",
                                   "alpha_pattern", "lora_bias", "layers_pattern")} == {
        "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "exclude_modules": ["layers.1.self_attn.v_proj"],
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 4.0}, "lora_bias": True, "layers_pattern": None}
    loaded = nbpeft.core.state(fresh).adapters["default"]
    assert {k: getattr(loaded.config, k) for k in options} == options
    assert loaded.targets == ["model.layers.1.self_attn.q_proj"]
    assert torch.equal(logits(fresh), logits(llama))


def test_overlapping_pattern_keys_keep_their_meaning_in_a_file_written_with_sorted_keys(llama, tmp_path):
    nbpeft.attach(llama, "lora", targets=["q_proj"], rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6})
    fresh = tiny_llama()
    config = save_and_reload(llama, tmp_path, fresh)  # sorted, the layer-0 key would come first and win
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 2}
    assert {p: layer.lora_A["default"].out_features for p, layer in lora_layers(fresh).items()} == {
        "model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2}


def test_a_selection_leaf_names_cannot_describe_is_saved_as_exact_paths(llama, tmp_path):
    nbpeft.attach(llama, "lora", targets=r"model\.layers\.1\.self_attn\.(q|v)_proj", exclude=["v_proj"])
    nbpeft.save_adapter(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == r"^(model\.layers\.1\.self_attn\.q_proj)$"
    assert config["layers_to_transform"] is None and config["exclude_modules"] is None
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)
    assert nbpeft.core.state(fresh).adapters["default"].targets == ["model.layers.1.self_attn.q_proj"]


def write_reference_file(folder, **config) -> None:
    """A LoRA folder for the tiny Llama with r=4 on q_proj, with ``config``'s keys added to its adapter_config.json."""
    source = tiny_llama()
    nbpeft.attach(source, "lora", r=4, targets=["q_proj"])
    randomise(source)
    nbpeft.save_adapter(source, folder)
    written = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**written, **config}))


def test_harmless_keys_from_newer_writers_are_ignored(llama, tmp_path):
    write_reference_file(tmp_path, peft_version="0.21.2", megatron_config=None, megatron_core="megatron.core",
                         loftq_config={}, eva_config=None, corda_config=None, qalora_group_size=16,
                         auto_mapping={"base_model_class": "LlamaForCausalLM"}, some_future_key={"x": 1})
    [adapter] = nbpeft.load_adapter(llama, tmp_path)
    assert adapter.method == "lora" and len(adapter.targets) == 2


def test_target_names_the_model_lacks_are_skipped_on_load(llama, tmp_path):
    write_reference_file(tmp_path, target_modules=["q_proj", "query", "c_attn"])  # one file for several families
    [adapter] = nbpeft.load_adapter(llama, tmp_path)
    assert adapter.config.targets == ["q_proj"] and len(adapter.targets) == 2


@pytest.mark.parametrize("key, value", [
    ("bias", "all"), ("layer_replication", [[0, 1], [0, 2]]), ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]),
])
def test_keys_that_would_change_outputs_are_refused_by_name(llama, tmp_path, key, value):
    write_reference_file(tmp_path, **{key: value})
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=rf"this LoRA file sets {key}=.*which nbpeft's lora does not support"):
        nbpeft.load_adapter(llama, tmp_path)
    assert_same(before, snapshot(llama))


def test_modules_to_save_names_the_model_lacks_are_dropped(tmp_path):
    source = tiny_bert()
    nbpeft.attach(source, "lora", targets=["query"])  # trains the classifier head by default
    randomise(source)
    nbpeft.save_adapter(source, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier", "score"]}))
    fresh = tiny_bert()
    [adapter] = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.saved_modules == ["classifier"]
    assert torch.equal(logits(fresh), logits(source))


def test_a_saved_module_the_model_lacks_is_refused_when_the_file_holds_its_tensors(tmp_path):
    source = tiny_bert()
    nbpeft.attach(source, "lora", targets=["query"])
    nbpeft.save_adapter(source, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.score.weight"] = torch.zeros(2, 32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier", "score"]}))
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(nbpeft.ConfigError, match=r"does not fit this model: unexpected 1 \(e.g. score.weight\)"):
        nbpeft.load_adapter(fresh, tmp_path)
    assert_same(before, snapshot(fresh))


def test_a_copy_of_the_embedding_beside_embedding_lora_loads_only_if_it_equals_the_model(llama, tmp_path):
    nbpeft.attach(llama, "lora", r=4, targets=["embed_tokens"])
    randomise(llama)
    nbpeft.save_adapter(llama, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"  # what the reference adds
    save_file({**tensors, key: llama.model.embed_tokens.base_layer.weight.detach().clone()},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    fresh = tiny_llama()
    nbpeft.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(llama))
    other = tiny_llama(seed=1)
    before = snapshot(other)
    with pytest.raises(nbpeft.ConfigError, match="holds a copy of model.embed_tokens's weights that differs from this model's"):
        nbpeft.load_adapter(other, tmp_path)
    assert_same(before, snapshot(other))


# ---------------------------------------------------------------- front-ends


def test_a_magic_line_with_patterns_attaches_what_the_keywords_do(llama):
    from nbpeft.magics.commands import module_lists

    options = module_lists("lora", parse_options("targets=q_proj,v_proj rank_pattern={q_proj: 2} layers=1 exclude=v_proj"))
    assert options == {"targets": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 2}, "layers": 1, "exclude": ["v_proj"]}
    nbpeft.attach(llama, "lora", **options)
    assert {p: layer.lora_A["default"].out_features for p, layer in lora_layers(llama).items()} == {
        "model.layers.1.self_attn.q_proj": 2}


def test_dict_options_parse_from_a_line_and_from_a_panel_box():
    options = parse_options("rank_pattern={q_proj: 16, layers.0.self_attn.v_proj: 2} alpha_pattern={'v_proj': 4} layers=0,1")
    assert options == {"rank_pattern": {"q_proj": 16, "layers.0.self_attn.v_proj": 2}, "alpha_pattern": {"v_proj": 4},
                       "layers": [0, 1]}
    info = method_options(LoraConfig)["rank_pattern"]
    assert option_value(parse_value("q_proj: 16, v_proj: 4"), info) == {"q_proj": 16, "v_proj": 4}
    assert option_value(parse_value("q_proj:16"), info) == {"q_proj": 16}
    assert option_value(parse_value("{}"), info) == {}
    with pytest.raises(nbpeft.ConfigError, match="expected name: value pairs"):
        parse_value("{q_proj}")


@pytest.mark.parametrize("options", [{"rank_pattern": {"v_proj": 2}}, {"lora_bias": True}, {"targets": ["embed_tokens", "q_proj"]}])
def test_a_gguf_adapter_refuses_what_it_cannot_hold(llama, options):
    from nbpeft.formats.gguf import check_adapter

    nbpeft.attach(llama, "lora", **options)
    with pytest.raises(nbpeft.ConfigError, match="which a GGUF adapter cannot hold; export format='gguf' \\(merged\\)"):
        check_adapter(llama, ["default"])
