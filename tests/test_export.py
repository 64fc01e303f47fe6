"""nbpeft.export / check_export / to_lora: files checked with plain transformers and the gguf reader."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types

import gguf
import jinja2
import numpy as np
import pytest
import torch
import transformers

import nbpeft
from nbpeft.formats import gguf as gguf_export
from nbpeft.formats.export import check_export, export, merged_state_dict, to_lora
from nbpeft.formats.gguf import reorder_rotary_rows
from nbpeft.methods.base import ConfigError
from nbpeft.models import resolve_name

from conftest import assert_same, snapshot

IDS = torch.tensor([[1, 5, 9, 300, 20, 7000]])


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_name("smollm2-135m"))


def small_llama(vocab: int, seed: int = 0, tied: bool = True, hidden: int = 64) -> transformers.LlamaForCausalLM:
    """A tiny random Llama with SmolLM2's vocabulary, so the real tokenizer fits it."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def lora_model(tokenizer):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, "lora", r=4, init="random", targets="all-linear")
    return model


def run_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


RELOAD = """
import sys, torch, transformers
assert "nbpeft" not in sys.modules
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor([[1, 5, 9, 300, 20, 7000]])).logits
torch.save({"logits": logits, "dtype": str(next(model.parameters()).dtype), "vocab": len(tok),
            "eos": model.generation_config.eos_token_id}, sys.argv[2])
"""


def test_merged_folder_reloads_in_plain_transformers(lora_model, tokenizer, tmp_path):
    want = run_logits(lora_model)
    before = snapshot(lora_model)
    result = export(lora_model, tmp_path / "merged", tokenizer=tokenizer)
    assert_same(before, snapshot(lora_model))  # the notebook's model is untouched
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(result.files)
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "merged"), str(out)], check=True, cwd=tmp_path)
    reloaded = torch.load(out)
    assert reloaded["dtype"] == "torch.float32" and reloaded["vocab"] == len(tokenizer)
    assert reloaded["eos"] == tokenizer.eos_token_id
    with nbpeft.disable_adapters(lora_model):
        base = run_logits(lora_model)
    assert (want - base).abs().max() > 1e-2  # the adapter is not the identity
    torch.testing.assert_close(reloaded["logits"], want, atol=1e-5, rtol=1e-5)


def test_merged_in_chosen_dtype_and_with_a_merged_adapter(lora_model, tokenizer, tmp_path):
    nbpeft.merge(lora_model)
    want = run_logits(lora_model)
    export(lora_model, tmp_path / "bf16", tokenizer=tokenizer, dtype="bfloat16")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = reloaded.float()(IDS).logits
    assert (got - want).abs().max() < 0.05


def test_qlora_base_is_dequantised(tokenizer, tmp_path):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, "qlora", r=4, init="random", targets=["q_proj", "v_proj"])
    want = run_logits(model)
    export(model, tmp_path / "q", tokenizer=tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(run_logits(reloaded), want, atol=1e-4, rtol=1e-4)


def test_bad_input_is_one_line_and_leaves_nothing(lora_model, tokenizer, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        export(lora_model, tmp_path / "full", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="did you mean 'gguf'"):
        export(lora_model, tmp_path / "a", format="ggfu", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="no adapter"):
        export(small_llama(len(tokenizer)), tmp_path / "b", tokenizer=tokenizer)
    prefix = small_llama(len(tokenizer))
    nbpeft.attach(prefix, "prefix", num_virtual_tokens=2)
    with pytest.raises(ConfigError, match="save_adapter"):
        export(prefix, tmp_path / "c", tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


class UnmergingTokenizer:
    """A tokenizer whose saving unmerges the model: the adapter state changes mid-export."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def save_pretrained(self, folder):
        nbpeft.unmerge(self.model)
        return self.tokenizer.save_pretrained(folder)


def test_state_change_mid_export_leaves_no_files(lora_model, tokenizer, tmp_path):
    nbpeft.merge(lora_model)
    with pytest.raises(ConfigError, match="while exporting; nothing was written"):
        export(lora_model, tmp_path / "m", tokenizer=UnmergingTokenizer(tokenizer, lora_model))
    assert list(tmp_path.iterdir()) == []


def test_gguf_adapter_layout(tokenizer, tmp_path):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, "lora", r=4, alpha=8.0, rslora=True, init="random", targets=["q_proj", "k_proj", "v_proj"])
    export(model, tmp_path / "a", format="gguf-adapter")
    reader = gguf.GGUFReader(tmp_path / "a" / "adapter.gguf")
    fields = {k: reader.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha")}
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                      "adapter.lora.alpha": pytest.approx(8.0 / 2 * 4)}  # alpha / sqrt(r) written as alpha' / r
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 3 * 2
    layer = model.model.layers[1].self_attn
    k_a = layer.k_proj.lora_A["default"].weight.detach().numpy()
    k_b = layer.k_proj.lora_B["default"].weight.detach().numpy()
    assert list(tensors["blk.1.attn_k.weight.lora_a"].shape) == [64, 4]  # ne = [in, r]
    assert list(tensors["blk.1.attn_k.weight.lora_b"].shape) == [4, 32]  # ne = [r, out]
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_a"].data, k_a)
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"].data, reorder_rotary_rows(k_b, 2))
    v_b = layer.v_proj.lora_B["default"].weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"].data, v_b)  # v is not reordered
    assert "ADAPTER ./adapter.gguf" in (tmp_path / "a" / "Modelfile").read_text()


def test_gguf_adapter_refuses_dora(tokenizer, tmp_path):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, "dora", r=4)
    with pytest.raises(ConfigError, match="to_lora"):
        export(model, tmp_path / "d", format="gguf-adapter")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quant, kind", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_model_layout(lora_model, tokenizer, tmp_path, quant, kind):
    export(lora_model, tmp_path / "g", format="gguf", tokenizer=tokenizer, quant=quant)
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert reader.fields["general.type"].contents() == "model"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert len(tensors) == 1 + 1 + 2 * 9
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == kind
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    merged, _ = merged_state_dict(lora_model, torch.float32)
    want = reorder_rotary_rows(merged["model.layers.0.self_attn.q_proj.weight"].numpy(), 4)
    got = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, tensors["blk.0.attn_q.weight"].tensor_type)
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=0.02 if quant == "q8_0" else 2e-3)
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_k_quant_without_llama_cpp_says_how_to_install(lora_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp fails as when it is not installed
    with monkeypatch.context() as patch:
        patch.setattr("nbpeft.formats.export.merged_state_dict", lambda *a, **k: pytest.fail("slow work before the check"))
        for quant in gguf_export.K_QUANTS:
            with pytest.raises(ConfigError) as err:
                export(lora_model, tmp_path / "g", format="gguf", tokenizer=tokenizer, quant=quant)
            assert str(err.value) == (f"export(): quant={quant!r} is written by llama.cpp's quantiser, which needs "
                                      "llama-cpp-python: pip install llama-cpp-python (it compiles llama.cpp from source, "
                                      "which takes minutes)")
    assert list(tmp_path.iterdir()) == []
    export(lora_model, tmp_path / "q8", format="gguf", tokenizer=tokenizer, quant="q8_0")  # nbpeft's own need nothing


def test_gguf_adapter_refuses_k_quants(lora_model, tmp_path):
    with pytest.raises(ConfigError, match=r"^export\(\): quant='q4_k_m' is for format='gguf' \(the merged model\); llama.cpp's quantiser takes whole"):
        export(lora_model, tmp_path / "a", format="gguf-adapter", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


# what llama.cpp's quantiser makes of each K-quant: the file type, the main matrix type, the finer one some layers get
K_QUANT_TYPES = {"q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K", "Q6_K"), "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K", "Q6_K")}


@pytest.mark.parametrize("quant", list(gguf_export.K_QUANTS))
def test_k_quants_by_llama_cpps_quantiser(tokenizer, tmp_path, quant):
    llama_cpp = pytest.importorskip("llama_cpp", reason="the K-quants need llama-cpp-python (pip install llama-cpp-python)")
    model = small_llama(len(tokenizer), hidden=256)  # rows of 256: every matrix fits the K blocks, no fallback type
    nbpeft.attach(model, "lora", r=4, init="random", targets="all-linear")
    result = export(model, tmp_path / "g", format="gguf", tokenizer=tokenizer, quant=quant)
    assert result.notes[-1] == f"{quant} by llama.cpp's quantiser (llama-cpp-python {llama_cpp.__version__})"  # no fallback
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == sorted(result.files)  # the f16 file is gone
    assert [p.name for p in tmp_path.iterdir()] == ["g"]
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    file_type, main, finer = K_QUANT_TYPES[quant]
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[file_type]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
    matrices = [n for n in types if not n.endswith("_norm.weight")]
    assert {types[n] for n in matrices} == {main, finer} and types["blk.0.attn_q.weight"] == main
    merged, _ = merged_state_dict(model, torch.float32)
    want = reorder_rotary_rows(merged["model.layers.0.self_attn.q_proj.weight"].numpy(), 4)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
    assert np.abs(got - want).max() < 0.25 * np.abs(want).max()  # 4 or 5 bits per weight: close, not exact
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_k_quant_fallback_types_and_failures_are_one_line(lora_model, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="the K-quants need llama-cpp-python (pip install llama-cpp-python)")
    result = export(lora_model, tmp_path / "g", format="gguf", tokenizer=tokenizer, quant="q4_k_m")  # rows of 64
    fallback = re.search(r"; (\d+) of (\d+) tensors in a fallback type \(rows not a multiple of 256\)\)$", result.notes[-1])
    tensors = gguf.GGUFReader(tmp_path / "g" / "model.gguf").tensors
    assert fallback and int(fallback[2]) == len(tensors)
    not_k = [t for t in tensors if len(t.shape) == 2 and t.tensor_type.name not in ("Q4_K", "Q6_K")]
    assert 0 < int(fallback[1]) <= len(not_k), {t.name: t.tensor_type.name for t in tensors}
    monkeypatch.setattr(gguf_export, "_write_gguf", lambda config, sd, tok, path, quant: path.write_bytes(b"no gguf") and [])
    with pytest.raises(RuntimeError, match=r"^export\(\): llama.cpp's quantiser could not write q5_k_m: .*fail") as err:
        export(lora_model, tmp_path / "bad", format="gguf", tokenizer=tokenizer, quant="q5_k_m")
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # nothing of the failed export, not even its hidden folder


def test_check_export_lines(tokenizer, tmp_path):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, "lora", r=8)
    assert check_export(model, "vllm") == [] and check_export(model, "llama.cpp") == []
    nbpeft.detach(model)
    nbpeft.attach(model, "dora", r=32)
    lines = check_export(model, "vllm")
    assert len(lines) == 2 and "DoRA" in lines[0] and "--max-lora-rank 32" in lines[1]
    assert "to_lora" in str(check_export(model, "llama.cpp"))
    nbpeft.detach(model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    nbpeft.attach(gpt2, "lora", r=4, modules_to_save=["lm_head"])
    assert any("modules_to_save" in line for line in check_export(gpt2, "vllm"))
    assert any("'gpt2' is not one nbpeft writes" in line for line in check_export(gpt2, "ollama"))
    nbpeft.save_adapter(gpt2, tmp_path / "saved")
    assert any("lm_head" in line for line in check_export(tmp_path / "saved", "vllm"))
    with pytest.raises(ConfigError, match="target='sglang' is not known"):
        check_export(gpt2, "sglang")


@pytest.mark.parametrize("method, options", [("dora", {"r": 4}), ("ia3", {}), ("lora", {"r": 16, "init": "random"})])
def test_to_lora_reproduces_weight_deltas(tokenizer, method, options):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, method, name="src", **options)
    with torch.no_grad():  # move the adapter away from the identity
        for p in nbpeft.core.adapter_parameters(model, "src").values():
            p.add_(0.05 * torch.randn_like(p))
    want = run_logits(model)
    full = to_lora(model, rank=64, name="full")  # rank >= every layer's width: exact
    assert full.relative_error < 1e-5
    torch.testing.assert_close(run_logits(model), want, atol=1e-4, rtol=1e-4)
    low = to_lora(model, rank=1, source="src", name="low")
    assert 1e-3 < low.relative_error < 1
    assert "relative Frobenius error" in repr(low)


def test_to_lora_refuses_non_delta_methods(tokenizer):
    model = small_llama(len(tokenizer))
    nbpeft.attach(model, "prefix", num_virtual_tokens=2)
    with pytest.raises(ConfigError, match="not a weight delta"):
        to_lora(model, rank=4)


def test_exported_lora_folder_config_is_known_to_vllm_rules(lora_model, tmp_path):
    nbpeft.save_adapter(lora_model, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and check_export(tmp_path / "lora", "vllm") == []


# ---------------------------------------------------------------- Ollama's Modelfile

OLLAMA_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
                   "message", "requires"}  # the instructions Ollama's Modelfile parser accepts


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, value) pairs as Ollama reads them: '#' comments, values bare, "quoted" or \"\"\"multi-line\"\"\"."""
    commands, rest = [], text
    while rest := rest.lstrip():
        if rest.startswith("#"):
            rest = rest.partition("\n")[2]
            continue
        name, _, rest = rest.partition(" ")
        assert name.lower() in OLLAMA_COMMANDS, f"{name!r} is not a Modelfile instruction"
        if name.lower() == "parameter":
            key, _, rest = rest.partition(" ")
            name = f"{name} {key}"
        if rest.startswith('"""'):
            value, closed, rest = rest[3:].partition('"""')
            assert closed, f"{name}: unterminated triple quote"
        else:
            value, _, rest = rest.partition("\n")
            value = value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
        commands.append((name, value))
    return commands


GO_ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.S)


def render_go(template: str, values: dict) -> str:
    """Go's text/template for the actions nbpeft writes (range/end over a list, fields of dot), trim markers
    included; anything else fails the test, so a new construct needs this renderer (or Go) to check it."""
    pieces, last, trim_next = [], 0, False
    for match in GO_ACTION.finditer(template):
        text = template[last:match.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        pieces += [("text", text.rstrip(" \t\r\n") if match.group(1) else text), ("action", match.group(2))]
        last, trim_next = match.end(), bool(match.group(3))
    tail = template[last:]
    pieces.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))

    def block(index: int) -> tuple[list, int]:
        nodes = []
        while index < len(pieces) and pieces[index] != ("action", "end"):
            kind, body = pieces[index]
            if kind == "action" and body.startswith("range "):
                inner, index = block(index + 1)
                assert index < len(pieces), f"{{{{ {body} }}}} has no {{{{ end }}}}"
                nodes.append(("range", body.removeprefix("range "), inner))
            else:
                assert kind == "text" or re.fullmatch(r"\.\w+", body), f"Go template action {body!r} is not one this test renders"
                nodes.append((kind, body))
            index += 1
        return nodes, index

    def run(nodes: list, dot: dict) -> str:
        out = []
        for kind, body, *inner in nodes:
            if kind == "range":
                out += [run(inner[0], item) for item in dot[body.removeprefix(".")]]
            else:
                out.append(body if kind == "text" else str(dot[body[1:]]))
        return "".join(out)

    nodes, end = block(0)
    assert end == len(pieces), "an {{ end }} without its range"
    return run(nodes, values)


def ollama_prompt(modelfile: dict[str, str], messages: list[dict]) -> str:
    """The prompt Ollama's chat endpoint renders: the Modelfile's SYSTEM goes first unless the request starts
    with a system message, then TEMPLATE runs over the messages."""
    if messages[0]["role"] != "system" and "SYSTEM" in modelfile:
        messages = [{"role": "system", "content": modelfile["SYSTEM"]}] + messages
    return render_go(modelfile["TEMPLATE"], {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


CHAT = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "And grass?"}]


def test_modelfile_is_ollama_syntax_and_its_template_renders_the_chat_template(lora_model, tokenizer, tmp_path):
    export(lora_model, tmp_path / "g", format="gguf", tokenizer=tokenizer)
    commands = parse_modelfile((tmp_path / "g" / "Modelfile").read_text())
    assert [name for name, _ in commands] == ["FROM", "TEMPLATE", "SYSTEM", "PARAMETER stop", "PARAMETER stop"]
    fields = dict(commands[:3])
    assert fields["FROM"] == "./model.gguf" and (tmp_path / "g" / fields["FROM"]).is_file()
    assert [value for _, value in commands[3:]] == ["<|im_start|>", "<|im_end|>"]
    for messages in (CHAT, [{"role": "system", "content": "Answer in one word."}] + CHAT):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(fields, messages) == want
    adapter = parse_modelfile(gguf_export.modelfile("/base", None, adapter="./adapter.gguf"))
    assert adapter == [("FROM", "/base"), ("ADAPTER", "./adapter.gguf")]


LLAMA3_CHAT = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_modelfile_template_for_llama3_chat(tmp_path):
    tokenizer = types.SimpleNamespace(chat_template=LLAMA3_CHAT)
    commands = parse_modelfile(gguf_export.modelfile("./model.gguf", tokenizer))
    fields = dict(commands)
    assert "SYSTEM" not in fields and ("PARAMETER stop", "<|eot_id|>") in commands
    for messages in (CHAT, [{"role": "system", "content": "Answer in one word."}] + CHAT):
        # bos_token is empty: llama.cpp puts the BOS token in front itself (tokenizer.ggml.add_bos_token)
        want = jinja2.Template(LLAMA3_CHAT).render(messages=messages, bos_token="", add_generation_prompt=True)
        assert ollama_prompt(fields, messages) == want


def test_modelfile_says_when_it_cannot_translate_a_template():
    tokenizer = types.SimpleNamespace(chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    text = gguf_export.modelfile("./model.gguf", tokenizer)
    assert parse_modelfile(text) == [("FROM", "./model.gguf")] and "write TEMPLATE by hand" in text


def test_overwrite_replaces_an_existing_export_whole_and_only_when_asked(lora_model, tokenizer, tmp_path):
    export(lora_model, tmp_path / "out", format="gguf-adapter")
    (tmp_path / "out" / "stale.txt").write_text("from an older export")
    with pytest.raises(ConfigError) as err:
        export(lora_model, tmp_path / "out", format="gguf-adapter")
    assert str(err.value) == (f"export(): {tmp_path / 'out'} already exists and is not empty; "
                              "choose another path or pass overwrite=True")
    assert (tmp_path / "out" / "stale.txt").exists()
    result = export(lora_model, tmp_path / "out", format="gguf-adapter", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(result.files) == ["Modelfile", "README.md", "adapter.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


def test_check_of_a_folder_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_export(tmp_path / "missing", "vllm")
    assert str(err.value) == (f"check_export(): {tmp_path / 'missing'} does not exist; "
                              "give the path of a folder written by save_adapter()")
