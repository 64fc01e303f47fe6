"""NF4 quantisation (nbpeft.nf4) and the qlora method."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nbpeft
from nbpeft import nf4
from nbpeft.layers import IGNORE
from nbpeft.methods.qlora import QLoRALinear

from conftest import assert_same, logits, snapshot, tiny_llama, tokens

ROOT = Path(__file__).resolve().parent.parent

LEVELS = torch.tensor(nf4.NF4_LEVELS)
NF4_HALF_GAP = (LEVELS[1:] - LEVELS[:-1]).max().item() / 2  # 0.1519, between -1 and -0.696
CODE_HALF_GAP = (nf4.dynamic_code()[1:] - nf4.dynamic_code()[:-1]).max().item() / 2


# ----------------------------------------------------------------------------- NF4 itself

def test_nf4_levels_are_the_normal_quantiles_of_the_paper():
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) taken between
    # offset = 1 - (1/30 + 1/32)/2 and 1/2, an exact zero, then scaled to [-1, 1].
    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    assert torch.allclose(levels.float(), LEVELS, atol=1e-6)
    assert LEVELS[7] == 0 and LEVELS[0] == -1 and LEVELS[-1] == 1


def test_dynamic_code_has_256_sorted_values_in_unit_range():
    code = nf4.dynamic_code()
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code.min() > -1 and code.max() == 1 and (code == 0).any()


@pytest.mark.parametrize("shape", [(96, 64), (37, 29), (3, 1000)])
@pytest.mark.parametrize("block_size", [64, 32, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_is_within_the_data_type_bound(shape, block_size, double_quant):
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.logspace(-3, 0, shape[0])[:, None]  # scales that vary by block
    state = nf4.quantize(weight, block_size, double_quant)
    restored = nf4.dequantize(state, shape, block_size)
    assert restored.shape == weight.shape and restored.dtype == torch.float32
    blocks = nf4.num_blocks(weight.numel(), block_size)
    padded = torch.nn.functional.pad(weight.reshape(-1), (0, blocks * block_size - weight.numel()))
    absmax = padded.view(blocks, block_size).abs().amax(dim=1)
    scale_bound = torch.zeros(blocks)
    if double_quant:  # |absmax - decoded absmax| <= half a code gap x the scale of its 256-run
        run = torch.arange(blocks) // nf4.SCALE_BLOCK
        scale_bound = CODE_HALF_GAP * state["absmax_scale"][run]
        assert torch.all((nf4.absmax_of(state) - absmax).abs() <= scale_bound * (1 + 1e-5) + 1e-12)
    bound = NF4_HALF_GAP * absmax + scale_bound
    error = torch.nn.functional.pad((restored - weight).reshape(-1), (0, blocks * block_size - weight.numel()))
    per_block = error.view(blocks, block_size).abs().amax(dim=1)
    assert torch.all(per_block <= bound * (1 + 1e-5) + 1e-12)
    # and NF4 really is 4-bit: at most 16 distinct values per block
    assert all(restored.reshape(-1)[i:i + block_size].unique().numel() <= 16 for i in range(0, 256, block_size))


def test_codes_are_packed_two_per_byte_high_nibble_first():
    absmax = 0.5
    weight = (LEVELS * absmax).repeat(4)  # one block of 64 = the 16 levels four times
    state = nf4.quantize(weight, 64, double_quant=False)
    assert state["qweight"].dtype == torch.uint8 and state["qweight"].numel() == 32
    assert state["qweight"][:8].tolist() == [(2 * i) << 4 | (2 * i + 1) for i in range(8)]
    assert torch.equal(state["absmax"], torch.tensor([absmax]))
    assert torch.equal(nf4.dequantize(state, (64,), 64), weight)  # the levels are exact


def test_an_all_zero_block_stays_zero():
    weight = torch.cat([torch.zeros(64), torch.randn(64)])
    restored = nf4.dequantize(nf4.quantize(weight, 64, True), (128,), 64)
    assert torch.equal(restored[:64], torch.zeros(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_the_torch_reference(double_quant, dtype):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    weight = torch.randn(1000, 777, device="cuda")  # not a multiple of the block size
    state = nf4.quantize(weight, 64, double_quant)
    fast = nf4.dequantize(state, weight.shape, 64, dtype)
    reference = nf4.dequantize_reference(state, weight.shape, 64, dtype)
    assert fast.dtype == dtype and fast.device.type == "cuda"
    assert torch.allclose(fast.float(), reference.float(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-7)


# Layers of several sizes through one compiled function, as a compiled decoder block sees them: the
# second size makes the length dynamic. Run in a child process, since a bad index used to abort it.
COMPILED_DEQUANTIZE = """
import sys, torch
from nbpeft import nf4
torch.manual_seed(0)
compiled = torch.compile(nf4.dequantize_reference)
for out, inp in [(64, 64), (32, 64), (128, 64), (576, 576), (1536, 576)]:
    state = nf4.quantize(torch.randn(out, inp), 64, True)
    got, want = compiled(state, (out, inp)), nf4.dequantize_reference(state, (out, inp))
    if not torch.equal(got, want):
        sys.exit(f"{out}x{inp}: compiled dequantisation differs by {(got - want).abs().max().item()}")
print("same")
"""


@pytest.mark.slow
def test_compiled_dequantisation_matches_eager_across_layer_sizes():
    from nbpeft.training import compiling

    if not compiling.can_compile(torch.device("cpu")):
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", COMPILED_DEQUANTIZE], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("same"), (done.returncode, done.stderr[-2000:])


# ----------------------------------------------------------------------------- qlora on tiny models

def test_identity_at_attach_relative_to_the_quantised_base(llama):
    ids = tokens()
    reference = tiny_llama()  # the same weights, each target replaced by its NF4 round trip
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear) and module is not reference.lm_head:
                module.weight.copy_(nf4.dequantize(nf4.quantize(module.weight), module.weight.shape))
    nbpeft.attach(llama, "qlora", targets="all-linear")
    quantised = logits(llama, ids)
    with nbpeft.disable_adapters(llama):
        assert torch.equal(logits(llama, ids), quantised)  # B = 0: the adapter adds nothing
    assert torch.allclose(quantised, logits(reference, ids), atol=1e-5)


def test_trainable_parameters_follow_the_lora_formula(llama):
    adapter = nbpeft.attach(llama, "qlora", r=4)
    assert adapter.num_params == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the 4-bit weights still count as the model's parameters
    assert adapter.model_params == sum(p.numel() for p in tiny_llama().parameters())
    assert nbpeft.summary(llama).total == adapter.model_params + adapter.num_params


@pytest.mark.parametrize("keep", ["cpu", "disk"])
def test_detach_restores_the_exact_state_dict(llama, keep):
    before = snapshot(llama)
    nbpeft.attach(llama, "qlora", targets="all-linear", keep_original=keep, init="random")
    layer = llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QLoRALinear) and isinstance(layer.base_layer, nf4.NF4Linear)
    assert not any(k.endswith(("q_proj.weight", "q_proj.base_layer.weight")) for k in llama.state_dict())
    if keep == "disk":  # the dense weight is really gone from memory until detach
        assert layer._nf4_original.weight.numel() == 0
    nbpeft.detach(llama)
    assert_same(before, snapshot(llama))


def test_keep_original_none_frees_the_weight_and_restores_nf4_values(llama):
    before = snapshot(llama)
    q_proj = llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    nbpeft.attach(llama, "qlora", keep_original="none")
    assert llama.model.layers[0].self_attn.q_proj._nf4_original.weight.numel() == 0
    nbpeft.detach(llama)
    after = snapshot(llama)
    assert before["types"] == after["types"] and before["grads"] == after["grads"]
    restored = after["weights"]["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(restored, nf4.dequantize(nf4.quantize(q_proj), q_proj.shape))
    assert not torch.equal(restored, q_proj)


def test_gpt2_conv1d_is_quantised_in_its_own_layout(gpt2):
    before = snapshot(gpt2)
    ids = tokens()
    nbpeft.attach(gpt2, "qlora")
    layer = gpt2.transformer.h[0].attn.c_attn
    original = layer._nf4_original  # Conv1D stores (in, out); NF4Linear holds (out, in)
    assert (layer.base_layer.out_features, layer.base_layer.in_features) == (96, 32)
    assert torch.allclose(layer.base_layer.dequantize(), original.weight.T, atol=0.2 * original.weight.abs().max().item())
    x = torch.randn(2, 3, 32)
    assert torch.allclose(layer(x), original(x), atol=0.1)
    assert logits(gpt2, ids).isfinite().all()
    nbpeft.detach(gpt2)
    assert_same(before, snapshot(gpt2))


def test_merge_is_refused_and_changes_nothing(llama):
    nbpeft.attach(llama, "qlora", init="random")
    ids = tokens()
    expected = logits(llama, ids)
    with pytest.raises(nbpeft.ConfigError, match="cannot be merged into 4-bit NF4"):
        nbpeft.merge(llama)
    assert torch.equal(logits(llama, ids), expected)
    assert not nbpeft.core.state(llama).adapters["default"].merged


@pytest.mark.parametrize("options, message", [
    ({"r": 0}, "qlora: r=0 must be a positive integer"),
    ({"block_size": 48}, "block_size=48 is not allowed"),
    ({"compute_dtype": "int8"}, "compute_dtype='int8' is not allowed"),
    ({"keep_original": "gpu"}, "keep_original='gpu' is not allowed"),
    ({"targets": ["qproj"]}, "did you mean 'q_proj'"),
    ({"blocksize": 64}, "did you mean 'block_size'"),
    ({"double_quant": "yes"}, "double_quant='yes' has the wrong type"),
])
def test_bad_options_are_rejected_and_the_model_is_untouched(llama, options, message):
    before = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match=message):
        nbpeft.attach(llama, "qlora", **options)
    assert_same(before, snapshot(llama))


def test_a_second_qlora_adapter_shares_the_quantisation(llama):
    before = snapshot(llama)
    nbpeft.attach(llama, "qlora", name="one", init="random")
    during = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="already quantised with block_size=64"):
        nbpeft.attach(llama, "qlora", name="two", block_size=128)
    assert_same(during, snapshot(llama))
    nbpeft.attach(llama, "qlora", name="two", init="random")
    nbpeft.detach(llama, "one")
    assert isinstance(llama.model.layers[0].self_attn.q_proj.base_layer, nf4.NF4Linear)
    nbpeft.detach(llama, "two")
    assert_same(before, snapshot(llama))


def test_qlora_after_another_adapter_on_the_same_layer_is_refused(llama):
    nbpeft.attach(llama, "lora", name="plain")
    during = snapshot(llama)
    with pytest.raises(nbpeft.ConfigError, match="already carries another adapter; attach qlora first"):
        nbpeft.attach(llama, "qlora", name="quantised")
    assert_same(during, snapshot(llama))


def test_save_then_load_into_a_fresh_quantised_model(llama, tmp_path):
    ids = tokens()
    nbpeft.attach(llama, "qlora", r=4, init="random", targets=["q_proj", "v_proj"])
    expected = logits(llama, ids)
    nbpeft.save_adapter(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "QLORA" and config["r"] == 4 and config["quant_type"] == "nf4"
    assert config["block_size"] == 64 and config["double_quant"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"
    )  # the reference LoRA keys; no quantised base weights in the file
    fresh = tiny_llama()
    (adapter,) = nbpeft.load_adapter(fresh, tmp_path)
    assert adapter.method == "qlora" and isinstance(fresh.model.layers[1].self_attn.v_proj.base_layer, nf4.NF4Linear)
    assert torch.equal(logits(fresh, ids), expected)


def test_the_saved_lora_tensors_load_as_plain_lora_on_the_full_model(llama, tmp_path):
    ids = tokens()
    nbpeft.attach(llama, "qlora", r=4, init="random")
    nbpeft.save_adapter(llama, tmp_path)
    lora_a = llama.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()
    with nbpeft.disable_adapters(llama):
        quantised_base = logits(llama, ids)
    with_adapter = logits(llama, ids)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    full = tiny_llama()
    full_base = logits(full, ids)
    (adapter,) = nbpeft.load_adapter(full, tmp_path)
    assert adapter.method == "lora"
    assert torch.equal(full.model.layers[0].self_attn.q_proj.lora_A["default"].weight, lora_a)
    # the same update on the full-precision base: it moves the output the same way
    delta_full, delta_quantised = logits(full, ids) - full_base, with_adapter - quantised_base
    assert torch.allclose(delta_full, delta_quantised, atol=0.1 * delta_quantised.abs().max().item())
    nbpeft.merge(full)  # and there it merges


def test_gradients_reach_lora_through_the_4bit_layers(llama):
    nbpeft.attach(llama, "qlora", targets="all-linear", init="random")
    loss = llama(tokens(), labels=tokens()).loss
    loss.backward()
    first = llama.model.layers[0].self_attn.q_proj
    assert first.lora_A["default"].weight.grad.abs().sum() > 0  # backward went through 13 NF4 layers
    assert all(b.grad is None for b in first.base_layer.buffers())


def test_bfloat16_compute_dtype(llama):
    ids = tokens()
    full = logits(llama, ids)
    nbpeft.attach(llama, "qlora", targets="all-linear", compute_dtype="bfloat16")
    assert llama.model.layers[0].mlp.up_proj.base_layer.compute_dtype == torch.bfloat16
    out = logits(llama, ids)
    assert out.dtype == torch.float32 and torch.allclose(out, full, atol=0.15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_original_waits_in_host_memory():
    model = tiny_llama().cuda()
    before = snapshot(model)
    nbpeft.attach(model, "qlora", init="random")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer._nf4_original.weight.device.type == "cpu" and layer.base_layer.qweight.is_cuda
    assert logits(model, tokens().cuda()).isfinite().all()
    nbpeft.detach(model)
    assert model.model.layers[0].self_attn.q_proj.weight.is_cuda
    assert_same(before, snapshot(model))


# ----------------------------------------------------------------------------- qlora on SmolLM2

SMOL_TEXT = [
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums, cafes and long history.",
    "Once upon a time there was a little girl who lived in a village near the forest. She liked to walk.",
]


def test_smollm2_memory_per_parameter(smol):
    model, _ = smol
    adapter = nbpeft.attach(model, "qlora", r=8)
    assert adapter.num_params == 30 * 8 * ((576 + 576) + (576 + 192))  # LoRA's formula: 460,800
    report = nf4.memory_report(model)
    assert report.layers == 60 and report.parameters == 30 * (576 * 576 + 576 * 192)
    # 0.5 for the 4-bit indices + 1/64 for 8-bit scales + fp32 scales of scales and one offset per layer
    extra = sum(4 * math.ceil(n / 64 / 256) + 4 for n in (576 * 576, 576 * 192))
    expected = report.parameters * (0.5 + 1 / 64) + 30 * extra
    assert report.nbytes == expected
    assert 0.5156 < report.bytes_per_parameter < 0.5160  # measured 0.5159
    assert "0.5159 bytes/parameter" in repr(adapter)
    nbpeft.detach(model)
    nbpeft.attach(model, "qlora", double_quant=False)
    assert nf4.memory_report(model).bytes_per_parameter == 0.5625


def test_smollm2_quantised_logits_stay_close(smol):
    model, tokenizer = smol
    before = snapshot(model)
    batch = tokenizer(SMOL_TEXT, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        full = model(**batch, labels=labels)
        nbpeft.attach(model, "qlora", targets="all-linear")
        quantised = model(**batch, labels=labels)
    ref, out = full.logits[mask], quantised.logits[mask]
    relative = ((out - ref).norm() / ref.norm()).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    # measured with every linear layer in NF4: relative logit error 0.46, top-1 agreement 0.65,
    # KL 0.33 nats/token, loss 3.113 -> 3.207 (4-bit integer absmax blocks of 64: 0.87, 0.54, 0.70, 3.52)
    assert relative < 0.6 and top1 > 0.55 and kl.item() < 0.5
    assert abs(quantised.loss.item() - full.loss.item()) < 0.2
    nbpeft.detach(model)
    assert_same(before, snapshot(model))


def test_smollm2_training_lowers_the_loss(smol):
    model, tokenizer = smol
    nbpeft.attach(model, "qlora", r=8)
    data = [{"prompt": "Say hello.", "response": "Arr! Ahoy there, matey!"}] * 4
    result = nbpeft.train(model, data, tokenizer=tokenizer, steps=4, lr=5e-3, batch_size=2, max_length=48, live=False)
    assert result.losses[-1] < result.losses[0]

