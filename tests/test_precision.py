"""The precision decision (nbpeft.precision) on faked CPUs and GPUs, and every method under CPU bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

import nbpeft
from nbpeft.training import precision
from nbpeft.training.events import Listener
from nbpeft.training.loop import pick_precision
from nbpeft.training.precision import Choice, choose

from conftest import tiny_llama, tokens

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture(autouse=True)
def fresh_probes():
    """Each test sees the CPU probes uncached, and leaves the real answers cached again for others."""
    probes = (precision.cpu_bf16_feature, precision.cpu_bf16_time_ratio)
    for probe in probes:
        probe.cache_clear()
    yield
    for probe in probes:
        probe.cache_clear()


def fake_cpu(monkeypatch, flags: set[str], ratio: float | None = None, capability: str = "AVX512") -> list[str]:
    """A CPU with these flags; ``ratio`` is bf16's matmul time over fp32's (None: must not be measured)."""
    calls = []

    def read_flags() -> set[str]:
        calls.append("flags")
        return flags

    def time_ratio(rounds: int = 8) -> float:
        if ratio is None:
            raise AssertionError("the bf16 timing ran on a CPU without native bf16")
        calls.append("timed")
        return ratio

    monkeypatch.setattr(precision, "cpu_flags", read_flags)
    monkeypatch.setattr(precision, "cpu_bf16_time_ratio", time_ratio)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    return calls


@pytest.mark.parametrize("flags, feature", [
    ({"avx512f", "avx512_bf16"}, "avx512_bf16"),
    ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "amx_bf16"),
    ({"fp", "asimd", "bf16"}, "bf16"),  # Arm v8.6+
])
def test_auto_on_a_cpu_with_native_bf16_picks_bf16_autocast(monkeypatch, flags, feature):
    fake_cpu(monkeypatch, flags, ratio=0.25)
    assert choose(CPU) == Choice("bf16", f"bf16 autocast: this CPU computes bf16 natively ({feature})")
    assert pick_precision(CPU) == "bf16"


@pytest.mark.parametrize("flags, capability", [
    ({"avx2", "fma", "avx512f"}, "AVX512"),  # AVX-512 without its bf16 extension emulates bf16
    ({"sse4_2", "avx2"}, "AVX2"),
    (set(), "DEFAULT"),
    ({"avx512_bf16"}, "DEFAULT"),  # flags present but torch runs without vector kernels
])
def test_auto_on_a_cpu_without_native_bf16_stays_fp32_without_timing(monkeypatch, flags, capability):
    fake_cpu(monkeypatch, flags, ratio=None, capability=capability)
    choice = choose(CPU)
    assert choice.name == "fp32" and choice.reason.startswith("fp32: this CPU has no native bf16")
    assert choice.autocast_dtype is None and not choice.needs_scaler


def test_auto_stays_fp32_when_bf16_measures_no_faster(monkeypatch):
    fake_cpu(monkeypatch, {"avx512_bf16"}, ratio=0.93)
    assert choose(CPU) == Choice("fp32", "fp32: this CPU has avx512_bf16, but a bf16 matmul measured 0.93x fp32's time here")


def test_the_cpu_is_probed_once_per_process(monkeypatch):
    calls = fake_cpu(monkeypatch, {"amx_bf16"}, ratio=0.2)
    for _ in range(3):
        choose(CPU)
    assert calls.count("flags") == 1


def test_explicit_cpu_choices_are_kept_and_say_so(monkeypatch):
    fake_cpu(monkeypatch, {"avx2"}, ratio=None, capability="AVX2")
    assert choose(CPU, "fp32") == Choice("fp32", "fp32: asked for (precision='fp32')")
    bf16 = choose(CPU, "bf16")
    assert bf16.name == "bf16" and "emulated" in bf16.reason and bf16.autocast_dtype is torch.bfloat16
    with bf16.autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    with choose(CPU, "fp32").autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(nbpeft.ConfigError, match="precision='fp16' needs a GPU; use 'fp32' or 'bf16' on CPU"):
        choose(CPU, "fp16")
    with pytest.raises(nbpeft.ConfigError, match=r"precision='fp8' is not known; use one of auto, fp32, bf16, fp16"):
        choose(CPU, "fp8")


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_auto_on_a_gpu_with_native_bf16_picks_bf16(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    choice = choose(CUDA)
    assert choice == Choice("bf16", "bf16 autocast: this GPU computes bf16 natively (NVIDIA H100 80GB HBM3, sm 9.0)")
    assert choice.autocast_dtype is torch.bfloat16 and not choice.needs_scaler


def test_auto_on_an_older_gpu_picks_fp16_with_a_scaler(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    choice = choose(CUDA)
    assert choice == Choice("fp16", "fp16 autocast with a grad scaler: this GPU has no native bf16 (Tesla T4, sm 7.5)")
    assert choice.autocast_dtype is torch.float16 and choice.needs_scaler
    forced = choose(CUDA, "bf16")
    assert forced.name == "bf16" and "emulates bf16, fp16 is faster" in forced.reason
    assert choose(CUDA, "fp32").name == "fp32"


def test_the_gpu_decision_never_probes_the_cpu(monkeypatch):
    fake_cpu(monkeypatch, {"amx_bf16"}, ratio=None)
    monkeypatch.setattr(precision, "cpu_flags", lambda: pytest.fail("the CPU was probed for a GPU decision"))
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    assert choose(CUDA).name == "bf16"


def test_other_devices_default_to_fp32():
    assert choose(MPS) == Choice("fp32", "fp32: the default on mps (precision='bf16' or 'fp16' turns on autocast)")
    assert choose(MPS, "bf16").name == "bf16"


def test_this_machines_decision_follows_its_probes():
    feature = precision.cpu_bf16_feature()
    choice = choose(CPU)
    if feature is None:
        assert choice.name == "fp32"
        return
    ratio = precision.cpu_bf16_time_ratio()
    assert 0 < ratio < math.inf
    assert choice.name == ("bf16" if ratio <= precision.CPU_BF16_MAX_TIME_RATIO else "fp32")
    assert feature in choice.reason


class RecordingAdamW(torch.optim.AdamW):
    made: list[torch.optim.AdamW] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingAdamW.made.append(self)


def test_bf16_training_keeps_the_adapter_and_adamw_state_fp32(monkeypatch):
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.made.clear()
    ids = tokens(2, 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    result = nbpeft.train(model, [batch] * 3, steps=3, lr=1e-2, precision="bf16", live=False)
    assert result.precision == "bf16" and result.stopped is None
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert named and all(".lora_A." in n or ".lora_B." in n for n in named)
    assert all(p.dtype == torch.float32 for p in named.values())
    assert any(p.abs().sum() > 0 for n, p in named.items() if ".lora_B." in n)  # B left zero: it trained
    (optimizer,) = RecordingAdamW.made
    states = [optimizer.state[p] for p in named.values()]
    assert len(states) == len(named) and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in states)


def attach_method(model: torch.nn.Module, method: str) -> None:
    if method == "fusion":  # fuses adapters attached before it
        nbpeft.attach(model, "adapter", name="a", bottleneck=4)
        nbpeft.attach(model, "adapter", name="b", bottleneck=4)
        nbpeft.attach(model, "fusion", name="fused", adapters=["a", "b"])
    elif method in ("prefix", "prompt"):
        nbpeft.attach(model, method, num_virtual_tokens=4)
    else:
        nbpeft.attach(model, method)


@pytest.mark.parametrize("method", [info.name for info in nbpeft.methods()])
def test_every_method_trains_under_cpu_bf16_autocast(method):
    model = tiny_llama()
    attach_method(model, method)
    model.train()
    ids = tokens(2, 8)
    with torch.no_grad():
        fp32_loss = model(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - fp32_loss.item()) < 0.05 * fp32_loss.item()  # bf16 rounding, not a different model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, param in trainable.items():
        assert param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.slow
def test_bf16_and_fp32_runs_on_the_bundled_model_learn_alike(smol):
    from nbpeft.datasets import load_dataset

    model, tokenizer = smol
    data, eval_data = load_dataset("pirate_chat")[:24], load_dataset("pirate_eval")[:8]
    finals = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same initial adapter for both runs
        nbpeft.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
        result = nbpeft.train(model, data, tokenizer=tokenizer, steps=6, lr=2e-3, batch_size=4, max_length=64,
                              eval_data=eval_data, eval_every=6, precision=name, compile=False, live=False)
        finals[name] = result.eval_losses[-1][1]
        assert result.precision == name and result.losses[-1] < result.losses[0]
        nbpeft.detach(model)
    assert abs(finals["bf16"] - finals["fp32"]) <= 0.02 * finals["fp32"], finals


# ---------------------------------------------------------------- frozen weights held in bf16

BF16 = Choice("bf16", "test")


def test_the_split_keeps_every_fp32_bit_and_rounds_like_autocast():
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (100_000,), generator=generator, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38, 1 + 2**-8, -(1 + 2**-9), 0.1])
    for weight in (values[torch.isfinite(values)], edges, torch.randn(64, 48, generator=generator)):
        original = weight.clone()
        high, remainder = precision._split_in_place(weight)
        assert high.dtype == torch.bfloat16 and high.data_ptr() == weight.data_ptr()  # in place, no copy
        ties = (original.view(torch.int32) & 0xFFFF) == 0x8000  # the only values rounded differently
        assert torch.equal(high[~ties].float(), original[~ties].to(torch.bfloat16).float())
        assert torch.equal(precision._joined(high, remainder).view(torch.int32), original.view(torch.int32))
        precision._join_into(high, remainder, weight)
        assert torch.equal(weight.view(torch.int32), original.view(torch.int32))


def lora_llama() -> torch.nn.Module:
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4, targets=["q_proj", "v_proj"], init="random")
    return model


def test_held_weights_compute_as_autocast_would_and_come_back_bit_exact():
    model = lora_llama().eval()
    ids = tokens(2, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = model(input_ids=ids).logits
    undo = precision.hold_frozen_weights_in_bf16(model, BF16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    held = {n for n, dtype in dtypes.items() if dtype == torch.bfloat16}
    assert any("q_proj.base_layer.weight" in n for n in held) and any("mlp.up_proj.weight" in n for n in held)
    assert not any("lora_" in n or "embed" in n or "norm" in n for n in held)  # trainable, embedding, norms: fp32
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(input_ids=ids).logits, cast, rtol=0, atol=1e-2)
        assert torch.equal(model(input_ids=ids).logits, plain)  # outside autocast: the exact fp32 weights
    undo()
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in model.named_parameters())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers  # the same memory throughout
    assert not any("forward" in vars(m) for m in model.modules())


def test_only_plain_unshared_linears_outside_weight_readers_are_held():
    model = tiny_llama()
    nbpeft.attach(model, "dora", r=4, targets=["q_proj"])
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the embedding must stay fp32
    undo = precision.hold_frozen_weights_in_bf16(model, BF16)
    try:
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.base_layer.weight.dtype == torch.float32  # DoRA reads its norm
        assert attention.k_proj.weight.dtype == torch.bfloat16
        assert model.lm_head.weight.dtype == torch.float32
    finally:
        undo()
    undo = precision.hold_frozen_weights_in_bf16(model, Choice("fp32", "test"))  # nothing to hold without bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    undo()


class Interrupt(Listener):
    def on_step(self, event):
        if event.step == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "ia3", "bitfit", "ln_tuning", "qlora", "adapter", "prompt"])
def test_training_in_bf16_leaves_the_base_weights_bit_identical(method):
    model = tiny_llama()
    attach_method(model, method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = tokens(2, 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    result = nbpeft.train(model, [batch] * 4, steps=4, lr=1e-2, precision="bf16", live=False)
    assert result.precision == "bf16" and result.losses[-1] < result.losses[0]
    interrupted = nbpeft.train(model, [batch] * 4, steps=4, lr=1e-2, precision="bf16", live=Interrupt())
    assert interrupted.stopped == "interrupted"
    after = dict(model.named_parameters())
    for name, weight in frozen.items():
        assert after[name].dtype == weight.dtype and torch.equal(after[name], weight), name
    assert not any("forward" in vars(m) for m in model.modules())


def test_merge_and_detach_after_bf16_training_are_exact():
    from conftest import assert_same, snapshot

    model = tiny_llama()
    before = snapshot(model)
    nbpeft.attach(model, "lora", r=4, targets="all-linear", init="random")
    ids = tokens(2, 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    nbpeft.train(model, [batch] * 2, steps=2, lr=1e-2, precision="bf16", live=False)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    nbpeft.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    nbpeft.detach(model)
    assert_same(before, snapshot(model))
