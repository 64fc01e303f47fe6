"""nbpeft.train: data forms, device/precision choice, events, clean stops, live display."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader

import nbpeft
from nbpeft.data import IGNORE, Batches, encode
from nbpeft.live import NotebookDisplay, TextDisplay, progress_text
from nbpeft.precision import choose
from nbpeft.train import StopTraining, pick_device, pick_precision

from conftest import tiny_bert, tiny_llama


class CharTokenizer:
    """A tiny tokenizer (one id per character) with the interface train() uses."""

    eos_token = "\x03"
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None, return_tensors=None):
        ids = [1 + ord(c) % 120 for c in text]
        if truncation and max_length:
            ids = ids[:max_length]
        return {"input_ids": ids}


def random_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (2, 8))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def test_text_training_lowers_the_loss_and_keeps_the_adapter(llama):
    nbpeft.attach(llama, "lora", r=8, targets="all-linear")
    data = ["the cat sat on the mat"] * 8
    result = nbpeft.train(llama, data, tokenizer=CharTokenizer(), steps=30, lr=3e-2, batch_size=4, live=False)
    assert result.steps == 30 and result.stopped is None
    # a frozen random head of width 32 bounds the logits, so a tiny model's loss falls only a little
    assert result.losses[-1] < result.losses[0] - 0.2
    assert result.device == "cpu" and result.precision == choose(torch.device("cpu")).name  # auto's choice
    row = result.history[-1]
    assert {"step", "loss", "eval_loss", "lr", "tokens_per_s", "step_time_s", "peak_mem_bytes", "elapsed_s"} <= row.keys()
    assert row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0
    assert "default" in nbpeft.summary(llama).adapters[0].name
    assert not llama.training  # back in eval mode afterwards


def test_only_adapter_parameters_change(llama):
    base = {k: v.clone() for k, v in llama.state_dict().items()}
    nbpeft.attach(llama, "lora", r=4)
    nbpeft.train(llama, random_batches(), steps=3, lr=1e-2, live=False)
    state = llama.state_dict()
    for key, value in base.items():
        wrapped = key.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")
        assert torch.equal(state[wrapped], value), key
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.lora_B.default.weight"], torch.zeros(32, 4))


def test_prompt_response_masks_the_prompt():
    tok = CharTokenizer()
    enc = encode({"prompt": "hi", "response": "yo"}, "prompt-response", tok, 64)
    assert enc["labels"][:2] == [IGNORE, IGNORE]
    assert enc["labels"][2:] == enc["input_ids"][2:] and len(enc["input_ids"]) == 5  # "hi" + "yo" + eos
    batches = Batches([{"prompt": "hi", "response": "yo"}, {"prompt": "hello", "response": "y"}], tok, 2, 64, 0)
    batch = next(iter(batches))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_examples_that_lose_their_response_to_truncation_are_dropped():
    tok = CharTokenizer()
    data = [{"prompt": "a long prompt here", "response": "ok"}, {"prompt": "hi", "response": "ok"}]
    assert len(Batches(data, tok, 2, 6, 0).examples) == 1
    with pytest.raises(nbpeft.ConfigError, match="raise max_length"):
        Batches(data[:1], tok, 2, 6, 0)


def test_prompt_response_training(llama):
    nbpeft.attach(llama, "lora", r=8)
    data = [{"prompt": "question", "response": "answer"}] * 4
    result = nbpeft.train(llama, data, tokenizer=CharTokenizer(), steps=10, lr=1e-2, batch_size=2, live=False)
    assert result.losses[-1] < result.losses[0]


def test_classification_training():
    model = tiny_bert()
    nbpeft.attach(model, "lora", r=4)
    data = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 4
    result = nbpeft.train(model, data, tokenizer=CharTokenizer(), steps=15, lr=1e-2, batch_size=4, live=False)
    assert result.losses[-1] < result.losses[0]


def test_dataloader_of_tokenised_batches_and_eval(llama):
    nbpeft.attach(llama, "lora", r=4)
    loader = DataLoader(random_batches(), batch_size=None)
    result = nbpeft.train(llama, loader, eval_data=random_batches(2), epochs=2, lr=1e-2, live=False)
    assert result.steps == 8  # 4 batches per epoch x 2 epochs
    assert [step for step, _ in result.eval_losses] == [1, 2, 3, 4, 5, 6, 7, 8]  # eval_every = steps // 5 = 1


def test_grad_accum_counts_tokens_of_every_micro_batch(llama):
    nbpeft.attach(llama, "lora", r=4)
    result = nbpeft.train(llama, random_batches(), steps=2, grad_accum=2, live=False)
    assert result.steps == 2


def test_events_reach_a_listener_in_order(llama):
    nbpeft.attach(llama, "lora", r=4)
    events = []
    nbpeft.train(llama, random_batches(), steps=3, live=lambda event, payload: events.append(event))
    assert events == ["begin", "step", "step", "step", "end"]


def test_keyboard_interrupt_stops_cleanly_and_returns_the_history(llama):
    nbpeft.attach(llama, "lora", r=4)

    def interrupt_at_step_2(event, payload):
        if event == "step" and payload["row"]["step"] == 2:
            raise KeyboardInterrupt

    result = nbpeft.train(llama, random_batches(), steps=10, live=interrupt_at_step_2)
    assert result.stopped == "interrupted" and result.steps == 2
    assert "interrupted after step 2 of 10" in result.message
    assert not llama.training
    assert llama(torch.arange(6)[None]).logits.isfinite().all()  # still usable


def test_a_listener_can_stop_training(llama):
    nbpeft.attach(llama, "lora", r=4)

    def stop(event, payload):
        if event == "step":
            raise StopTraining

    result = nbpeft.train(llama, random_batches(), steps=10, live=stop)
    assert result.stopped == "stopped" and result.steps == 1


def test_nan_loss_stops_with_likely_causes(llama):
    nbpeft.attach(llama, "lora", r=4)
    with torch.no_grad():
        llama.model.norm.weight.fill_(float("nan"))
    result = nbpeft.train(llama, random_batches(), steps=5, live=False)
    assert result.stopped == "non-finite loss" and result.steps == 0
    assert "learning rate" in result.message and "fp16" in result.message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps=0 must be a positive integer"),
        ({"lr": 5.0}, "lr=5.0 must be between 0 and 1"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"steps": 2, "epochs": 1}, "give steps= or epochs=, not both"),
        ({"precision": "fp8"}, "precision='fp8' is not known"),
        ({"device": "tpu9"}, "device='tpu9'"),
    ],
)
def test_bad_training_options(llama, kwargs, message):
    nbpeft.attach(llama, "lora")
    with pytest.raises(nbpeft.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nbpeft.train(llama, random_batches(), live=False, **kwargs)


def test_training_without_adapter_or_tokenizer_says_what_to_do(llama):
    for p in llama.parameters():
        p.requires_grad = False
    with pytest.raises(nbpeft.ConfigError, match="attach an adapter first"):
        nbpeft.train(llama, ["text"], live=False)
    nbpeft.attach(llama, "lora")
    with pytest.raises(nbpeft.ConfigError, match="pass tokenizer=tokenizer"):
        nbpeft.train(llama, ["text"], live=False)
    with pytest.raises(nbpeft.ConfigError, match="cannot read examples"):
        nbpeft.train(llama, [{"question": 1}], live=False)


def test_device_and_precision_choice():
    dev = pick_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else dev.type)
    assert pick_precision(torch.device("cpu")) == choose(torch.device("cpu")).name  # decided in nbpeft.precision
    with pytest.raises(nbpeft.ConfigError, match="needs a GPU"):
        pick_precision(torch.device("cpu"), "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(nbpeft.ConfigError, match="no CUDA GPU is visible"):
            pick_device("cuda")


def test_bf16_autocast_on_cpu_trains(llama):
    nbpeft.attach(llama, "lora", r=4)
    result = nbpeft.train(llama, random_batches(), steps=2, precision="bf16", live=False)
    assert result.precision == "bf16" and result.steps == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_precision_and_gpu_memory():
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    result = nbpeft.train(model, random_batches(), steps=2, live=False)
    assert result.device.startswith("cuda") and result.precision in ("bf16", "fp16")
    assert result.history[-1]["peak_mem_bytes"] == torch.cuda.max_memory_allocated()


def test_gradient_checkpointing_gives_the_same_loss():
    losses = []
    for checkpointing in (False, True):
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4, init="random")
        result = nbpeft.train(model, random_batches(), steps=3, lr=1e-2, gradient_checkpointing=checkpointing, live=False)
        losses.append(result.losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_text_display_prints_a_few_lines(llama):
    nbpeft.attach(llama, "lora", r=4)
    out = io.StringIO()
    nbpeft.train(llama, random_batches(), steps=40, live=TextDisplay(out))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("nbpeft: training") and f"on cpu ({choose(torch.device('cpu')).name})" in lines[0]
    assert 3 <= len(lines) <= 23
    assert "step 40/40" in lines[-2] and "tok/s" in lines[-2] and "peak RSS" in lines[-2]


def test_displays_show_notes():
    out = io.StringIO()
    TextDisplay(out)("note", {"message": "compiling the decoder block"})
    assert out.getvalue() == "nbpeft: compiling the decoder block\n"
    display = NotebookDisplay()
    updates = []
    display.text_handle = type("Handle", (), {"update": lambda self, obj: updates.append(obj.data)})()
    display("note", {"message": "a <b> note"})
    assert updates == ["a &lt;b&gt; note…"]
    display("an event from a later version", {})  # unknown events are ignored


def test_notebook_display_updates_one_figure_in_place(llama, monkeypatch):
    """The figure is displayed once with a display id and then only updated."""
    import IPython.display

    shown, updates = [], []

    class Handle:
        def __init__(self, obj):
            self.obj = obj

        def update(self, obj):
            updates.append(type(obj).__name__)

    def fake_display(obj, display_id=False):
        shown.append(type(obj).__name__)
        return Handle(obj) if display_id else None

    monkeypatch.setattr(IPython.display, "display", fake_display)
    nbpeft.attach(llama, "lora", r=4)
    display = NotebookDisplay(min_interval_s=0.0)
    nbpeft.train(llama, random_batches(), steps=5, eval_data=random_batches(1), live=display)
    assert shown == ["HTML", "_FigurePNG", "HTML"]
    assert updates.count("_FigurePNG") == 6 and updates.count("HTML") == 6  # 5 steps + the end
    assert len(display.train_line.get_xdata()) == 5 and len(display.eval_line.get_xdata()) == 5


def test_progress_text():
    row = {"step": 5, "loss": 1.23456, "eval_loss": 1.5, "elapsed_s": 10.0, "tokens_per_s": 1234.0, "peak_mem_bytes": 3 * 2**30}
    text = progress_text(row, 10, "peak GPU mem")
    assert text == "step 5/10 · loss 1.2346 · eval 1.5000 · ETA 0:10 · 1,234 tok/s · peak GPU mem 3.0 GiB"
