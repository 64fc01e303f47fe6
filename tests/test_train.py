"""nbpeft.train: data forms, device/precision choice, events, clean stops, live display."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils.data import DataLoader

import nbpeft
from nbpeft.data.batches import IGNORE, Batches, encode
from nbpeft.training import checkpoints as checkpoint
from nbpeft.training.display import LossCurve, NotebookDisplay, TextDisplay, banner_text, progress_text, summary_text
from nbpeft.training.events import Begin, End, Listener, Note, Step
from nbpeft.training.loop import StopTraining, TrainResult, lr_factor, pick_device, pick_precision
from nbpeft.training.precision import choose

from conftest import tiny_bert, tiny_gpt2, tiny_llama


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
    assert {"step", "loss", "eval_loss", "lr", "tokens", "tokens_per_s", "step_time_s", "peak_mem_bytes", "elapsed_s",
            "eta_s", "metrics"} <= row.keys()
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
    nbpeft.train(llama, random_batches(), steps=3, live=lambda event, payload: events.append((event, type(payload))))
    assert events == [("begin", Begin), ("step", Step), ("step", Step), ("step", Step), ("end", End)]


def test_a_typed_listener_gets_dataclasses_with_named_fields(llama):
    nbpeft.attach(llama, "lora", r=4)

    class Record(Listener):  # only what it overrides is called; the rest are no-ops
        def __init__(self):
            self.seen = []

        def on_begin(self, begin):
            self.seen.append(("begin", begin.total_steps, begin.trainable, begin.device, begin.has_eval))

        def on_step(self, step):
            self.seen.append(("step", step.step, step.eval_loss is not None))

        def on_end(self, end):
            self.seen.append(("end", end.result.steps))

    record = Record()
    result = nbpeft.train(llama, random_batches(), steps=2, eval_data=random_batches(1), eval_every=2, live=record)
    assert record.seen == [("begin", 2, result.trainable, "cpu", True), ("step", 1, False), ("step", 2, True), ("end", 2)]
    assert result.trainable == nbpeft.summary(llama).trainable


def test_keyboard_interrupt_stops_cleanly_and_returns_the_history(llama):
    nbpeft.attach(llama, "lora", r=4)

    def interrupt_at_step_2(event, payload):
        if event == "step" and payload.step == 2:
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


# the live displays ------------------------------------------------------------------------------

def test_text_display_prints_a_few_lines_and_the_run_average(llama):
    nbpeft.attach(llama, "lora", r=4)
    out = io.StringIO()
    result = nbpeft.train(llama, random_batches(), steps=40, live=TextDisplay(out))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("nbpeft: training") and f" · cpu · {choose(torch.device('cpu')).name}" in lines[0]
    assert "10 epochs · 1 batch per step · 40 steps" in lines[0]  # ready-made batches: 4 per epoch
    assert 3 <= len(lines) <= 23
    assert "step 40/40" in lines[-2] and "elapsed" in lines[-2] and "ETA 0:00" in lines[-2] and "peak RSS" in lines[-2]
    # the closing line: the run's average speed (not the last step's), time and peak memory
    assert lines[-1] == f"nbpeft: {summary_text(result, 'peak RSS')}"
    assert f"{result.tokens_per_s:,.0f} tok/s on average" in lines[-1]
    step_speeds = {f"{row['tokens'] / row['step_time_s']:,.0f}" for row in result.history[-1:]}
    assert result.tokens_per_s == pytest.approx(sum(r["tokens"] for r in result.history)
                                                / sum(r["step_time_s"] for r in result.history))
    assert lines[-1].startswith("nbpeft: done: 40 steps · ") and step_speeds  # run average computed from every step


def test_banner_has_what_people_expect():
    begin = Begin(total_steps=1, trainable=1, device="cuda:0", precision="bf16", examples=1, epochs=1.0, batch_size=4,
                  grad_accum=2, device_name="NVIDIA H200", device_memory=140 * 2**30, precision_reason="the GPU supports it")
    text = banner_text(begin)
    assert text == ("training 1 parameter · 1 example · 1 epoch · effective batch 8 (4 × 2 accumulated) · 1 step · "
                    "cuda:0 (NVIDIA H200, 140.0 GiB) · bf16 (the GPU supports it)")
    auto = banner_text(Begin(total_steps=1, trainable=1, device="cpu", precision="fp32", batch_size=4, grad_accum=2,
                             batch_reason="batch_size='auto': 2.00 GB free RAM, 40 MB an example, probed in 0.1 s"))
    assert "· batch auto: 4 × 2 accumulated = 8 (2.00 GB free RAM, 40 MB an example, probed in 0.1 s) ·" in auto
    full = banner_text(Begin(total_steps=75, trainable=22_713_602, device="cpu", precision="fp32", examples=240,
                             epochs=5.0, batch_size=16, full=True))
    assert full.startswith("full fine-tuning: all 22,713,602 parameters train · 240 examples · 5 epochs · effective batch 16")


def test_banner_counts_examples_and_epochs_of_text_data(llama):
    nbpeft.attach(llama, "lora", r=4)
    out = io.StringIO()
    nbpeft.train(llama, ["a b c", "d e f", "g h"], tokenizer=CharTokenizer(), epochs=2, batch_size=2, live=TextDisplay(out))
    assert f"3 examples · 2 epochs · effective batch 2 · 4 steps · cpu · {choose(torch.device('cpu')).name}" in out.getvalue().splitlines()[0]


def test_displays_show_notes():
    out = io.StringIO()
    TextDisplay(out).on_note(Note("compiling the decoder block"))
    assert out.getvalue() == "nbpeft: compiling the decoder block\n"
    display = NotebookDisplay()
    updates = []
    display.text_handle = type("Handle", (), {"update": lambda self, obj: updates.append(obj.data)})()
    display.on_note(Note("a <b> note"))
    assert updates == ["a &lt;b&gt; note…"]


def _fake_display(monkeypatch):
    import IPython.display

    shown, updates = [], []

    class Handle:
        def __init__(self, obj):
            self.obj = obj

        def update(self, obj):
            updates.append((type(obj).__name__, getattr(obj, "data", None)))

    def fake_display(obj, display_id=False):
        shown.append(type(obj).__name__)
        return Handle(obj) if display_id else None

    monkeypatch.setattr(IPython.display, "display", fake_display)
    return shown, updates


def test_notebook_display_updates_one_figure_in_place(llama, monkeypatch):
    """The figure, the progress line and the eval table are displayed once and then only updated."""
    shown, updates = _fake_display(monkeypatch)
    nbpeft.attach(llama, "lora", r=4)
    display = NotebookDisplay(min_interval_s=0.0)
    nbpeft.train(llama, random_batches(), steps=5, eval_data=random_batches(1), live=display)
    assert shown == ["HTML", "_FigurePNG", "HTML", "HTML"]
    kinds = [kind for kind, _ in updates]
    assert kinds.count("_FigurePNG") == 6  # 5 steps + the end
    tables = [data for _, data in updates if data and data.startswith("<table")]
    assert len(tables) == 5 and "<th>eval loss</th>" in tables[-1] and tables[-1].count("<tr>") == 6
    lines = display.axes.get_lines()
    assert len(lines[0].get_xdata()) == 5 and len(lines[1].get_xdata()) == 5


def test_eval_table_has_step_losses_and_metrics(llama):
    nbpeft.attach(llama, "lora", r=4)
    calls = []

    def metrics(model):
        calls.append(model.training)
        return {"accuracy": 0.5 + len(calls) / 10}

    out = io.StringIO()
    result = nbpeft.train(llama, random_batches(), steps=4, eval_every=2, eval_data=random_batches(1), metrics=metrics,
                          live=TextDisplay(out))
    assert calls == [False, False]  # evaluated at steps 2 and 4, in eval mode
    assert [row["metrics"] for row in result.history] == [{}, {"accuracy": 0.6}, {}, {"accuracy": 0.7}]
    text = out.getvalue()
    table = text[text.index("step  training loss"):].splitlines()
    assert table[0].split() == ["step", "training", "loss", "eval", "loss", "accuracy"]
    mean_1_2 = (result.losses[0] + result.losses[1]) / 2  # the training loss since the last evaluation
    assert table[1].split() == ["2", f"{mean_1_2:.4f}", f"{result.history[1]['eval_loss']:.4f}", "0.6"]


def test_metrics_must_return_a_dict(llama):
    nbpeft.attach(llama, "lora", r=4)
    with pytest.raises(nbpeft.ConfigError, match="metrics= returned float; return a dict"):
        nbpeft.train(llama, random_batches(), steps=1, metrics=lambda model: 0.5, live=False)


def _step(n: int, total: int, eval_loss: float | None = None) -> Step:
    return Step(step=n, total_steps=total, loss=2.0 - n / 10, lr=1e-3, tokens=10, step_time_s=0.1, elapsed_s=0.1 * n,
                tokens_per_s=100.0, eta_s=0.0, peak_mem_bytes=2**20, eval_loss=eval_loss)


def _curve(total: int, steps: int, has_eval: bool) -> LossCurve:
    curve = LossCurve()
    curve.start(Begin(total_steps=total, trainable=1, device="cpu", precision="fp32", has_eval=has_eval))
    for n in range(1, steps + 1):
        curve.add(_step(n, total, 1.5 if has_eval and n == steps else None))
    return curve


def test_legend_says_eval_only_with_eval_data():
    from matplotlib.figure import Figure

    for has_eval, labels in ((False, ["train"]), (True, ["train", "eval"])):
        axes = Figure().add_subplot()
        _curve(3, 3, has_eval).draw(axes)
        assert [t.get_text() for t in axes.get_legend().get_texts()] == labels


def test_a_one_step_run_draws_a_visible_point_and_the_last_point_is_not_clipped():
    from matplotlib.figure import Figure

    axes = Figure().add_subplot()
    _curve(1, 1, False).draw(axes)
    (line,) = axes.get_lines()
    assert line.get_marker() == "o" and list(line.get_xdata()) == [1]
    assert axes.get_xlim()[1] > 1
    for total in (8, 400):
        axes = Figure().add_subplot()
        _curve(total, total, True).draw(axes)
        right = axes.get_xlim()[1]
        assert right > total and axes.transData.transform((right, 0))[0] - axes.transData.transform((total, 0))[0] >= 3
    assert _curve(1, 1, False).png()[:4] == b"\x89PNG"


def test_plurals():
    one = banner_text(Begin(total_steps=1, trainable=1, device="cpu", precision="fp32", examples=1, epochs=1.0))
    assert "1 step" in one and "1 steps" not in one and "1 parameter " in one and "1 example " in one
    result = TrainResult(history=[{"step": 1, "loss": 1.0, "tokens": 5, "step_time_s": 0.5, "peak_mem_bytes": 1}])
    assert summary_text(result).startswith("done: 1 step · ")


def test_progress_text():
    step = Step(step=5, total_steps=10, loss=1.23456, lr=1e-3, tokens=100, step_time_s=0.1, elapsed_s=10.0,
                tokens_per_s=1234.0, eta_s=10.0, peak_mem_bytes=3 * 2**30, eval_loss=1.5, grad_norm=0.9123)
    text = progress_text(step, "peak GPU mem")
    assert text == ("step 5/10 · loss 1.2346 · eval 1.5000 · lr 1.0e-03 · grad 0.91 · 0:10 elapsed · ETA 0:10 · "
                    "1,234 tok/s · peak GPU mem 3.0 GiB")


def test_steps_carry_the_learning_rate_and_the_gradient_norm(llama):
    nbpeft.attach(llama, "lora", r=4)
    steps = []
    result = nbpeft.train(llama, random_batches(), steps=4, lr=1e-2, warmup=2, schedule="constant",
                          live=lambda kind, payload: steps.append(payload) if kind == "step" else None)
    assert [s.lr for s in steps] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])
    assert all(s.grad_norm > 0 and math.isfinite(s.grad_norm) for s in steps)
    assert [row["grad_norm"] for row in result.history] == [s.grad_norm for s in steps]
    assert [row["lr"] for row in result.history] == [s.lr for s in steps]
    assert f"grad {steps[-1].grad_norm:.2f}" in progress_text(steps[-1])


def _first_step(max_grad_norm):
    """One step from B = 0 at a constant lr: the largest change in B, and the gradient norm the step reported."""
    model = tiny_llama()
    nbpeft.attach(model, "lora", r=4)
    steps = []
    nbpeft.train(model, random_batches(), steps=1, lr=1e-2, warmup=0, schedule="constant", max_grad_norm=max_grad_norm,
                 live=lambda kind, payload: steps.append(payload) if kind == "step" else None)
    moved = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)
    return moved, steps[0].grad_norm


def test_max_grad_norm_clips_and_none_does_not():
    free, free_norm = _first_step(None)
    clipped, clipped_norm = _first_step(1e-12)
    # the norm reported is the one before clipping: the same gradients either way
    assert clipped_norm == pytest.approx(free_norm, rel=1e-5) and free_norm > 1e-6
    # AdamW's first update is lr · g / (|g| + 1e-8): about lr unclipped, far below it once g is clipped under eps
    assert free == pytest.approx(1e-2, rel=0.05)
    assert clipped < 1e-4
    loose, _ = _first_step(1e6)  # a bound the gradients never reach changes nothing
    assert loose == free


def test_the_loss_plot_ticks_whole_steps_only():
    from matplotlib.figure import Figure

    for total in (2, 3, 5):
        figure = Figure()
        axes = figure.add_subplot()
        _curve(total, total, False).draw(axes)
        ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (total, ticks)


# no silent full fine-tune -----------------------------------------------------------------------

def test_a_model_without_adapter_is_refused_and_left_alone():
    from conftest import assert_same, snapshot

    model = tiny_llama()  # every parameter trainable, as a model built by hand is
    before = snapshot(model)
    with pytest.raises(nbpeft.ConfigError) as err:
        nbpeft.train(model, random_batches(), steps=1, live=False)
    assert str(err.value) == ('train(): this model has no adapter; attach one first, e.g. nbpeft.attach(model, "lora"), '
                              "or pass full=True to fine-tune every parameter")
    assert_same(before, snapshot(model))


def test_full_fine_tuning_is_explicit_and_freezes_again_afterwards(llama):
    llama.requires_grad_(False)  # as load_model returns it
    out = io.StringIO()
    before = llama.model.layers[0].mlp.up_proj.weight.clone()
    result = nbpeft.train(llama, random_batches(), steps=2, lr=1e-2, full=True, live=TextDisplay(out))
    total = sum(p.numel() for p in llama.parameters())
    assert result.full and result.trainable == total and result.steps == 2
    assert out.getvalue().startswith(f"nbpeft: full fine-tuning: all {total:,} parameters train")
    assert not torch.equal(before, llama.model.layers[0].mlp.up_proj.weight)  # the base itself trained
    assert not any(p.requires_grad for p in llama.parameters())  # frozen again


def test_full_fine_tuning_refuses_a_model_with_adapters(llama):
    nbpeft.attach(llama, "lora", r=4)
    with pytest.raises(nbpeft.ConfigError, match=r"full=True fine-tunes the base model, but adapters are attached \(default\); "
                                                 r"detach them first"):
        nbpeft.train(llama, random_batches(), steps=1, full=True, live=False)


def test_load_model_returns_a_frozen_model_and_detach_freezes_it_again(tmp_path):
    import transformers

    from nbpeft.models import cache_dir

    tiny_llama().save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m").save_pretrained(tmp_path)
    model, _ = nbpeft.load_model(str(tmp_path))
    assert not any(p.requires_grad for p in model.parameters())
    assert nbpeft.summary(model).trainable == 0
    with pytest.raises(nbpeft.ConfigError, match="this model has no adapter"):
        nbpeft.train(model, random_batches(), steps=1, live=False)
    adapter = nbpeft.attach(model, "lora", r=4)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter.num_params
    nbpeft.detach(model)
    assert not any(p.requires_grad for p in model.parameters())


# schedules, weight decay, checkpoints -----------------------------------------------------------

def test_schedules_with_warmup():
    assert [lr_factor(s, 10, 2, "constant") for s in (1, 2, 3, 10)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 2, "linear") for s in (2, 6, 10)] == pytest.approx([1.0, 0.55, 0.1])
    assert [lr_factor(s, 10, 2, "cosine") for s in (2, 6, 10)] == pytest.approx([1.0, 0.55, 0.1])
    assert lr_factor(4, 10, 2, "cosine") > lr_factor(4, 10, 2, "linear")  # cosine stays high longer


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0.5, [0.5, 1.0, 1.0, 1.0]),  # a share of the steps: 2 of 4
    ("linear", 1, [1.0, 0.7, 0.4, 0.1]),
    ("cosine", 0, [0.1 + 0.9 * (1 + math.cos(math.pi * s / 4)) / 2 for s in (1, 2, 3, 4)]),
])
def test_train_follows_the_schedule(llama, schedule, warmup, expected):
    nbpeft.attach(llama, "lora", r=4)
    result = nbpeft.train(llama, random_batches(), steps=4, lr=1e-2, schedule=schedule, warmup=warmup, live=False)
    assert [row["lr"] / 1e-2 for row in result.history] == pytest.approx(expected)


def test_weight_decay_shrinks_adapter_matrices():
    weights = []
    for decay in (0.0, 0.5):
        model = tiny_llama()
        nbpeft.attach(model, "lora", r=4, init="random")
        a_before = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.norm()
        nbpeft.train(model, random_batches(), steps=3, lr=1e-2, weight_decay=decay, live=False)
        weights.append(model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.norm() / a_before)
    assert weights[1] < weights[0] - 0.005


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "step"}, "schedule='step' is not known; use one of constant, linear, cosine"),
    ({"warmup": -1}, "warmup=-1 must be a number of steps"),
    ({"weight_decay": 2}, "weight_decay=2 must be between 0 and 1"),
    ({"save_every": 2}, "save_every= needs output_dir="),
    ({"save_every": 0, "output_dir": "x"}, "save_every=0 must be a positive number of steps"),
    ({"resume": True}, "resume=True needs output_dir="),
    ({"metrics": 3}, "metrics=3 must be a function of the model"),
])
def test_bad_schedule_and_checkpoint_options(llama, kwargs, message):
    nbpeft.attach(llama, "lora")
    with pytest.raises(nbpeft.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nbpeft.train(llama, random_batches(), live=False, **kwargs)


def _dropout_lora():
    model = tiny_gpt2()  # GPT-2's dropout and LoRA's dropout: the RNG state matters
    nbpeft.attach(model, "lora", r=4, dropout=0.3, init="random", targets=["c_attn"])
    return model


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    data = ["the cat sat on the mat", "a dog ran", "birds sing at dawn", "fish swim", "the sun is up"]
    options = {"tokenizer": CharTokenizer(), "steps": 6, "batch_size": 2, "lr": 1e-2, "schedule": "cosine",
               "weight_decay": 0.1, "eval_data": data[:2], "eval_every": 2}
    whole = nbpeft.train(_dropout_lora(), data, live=False, **options)

    def stop_at_4(event, payload):
        if event == "step" and payload.step == 4:
            raise StopTraining

    first = nbpeft.train(_dropout_lora(), data, live=stop_at_4, save_every=3, output_dir=tmp_path, **options)
    assert first.steps == 4 and first.checkpoint == str(tmp_path / "checkpoint-000003")
    model = _dropout_lora()
    begins = []
    resumed = nbpeft.train(model, data, resume=True, output_dir=tmp_path,
                           live=lambda event, payload: begins.append(payload.start_step) if event == "begin" else None,
                           **options)
    assert begins == [3] and resumed.steps == 6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-6)
    assert [s for s, _ in resumed.eval_losses] == [s for s, _ in whole.eval_losses] == [2, 4, 6]
    assert [v for _, v in resumed.eval_losses] == pytest.approx([v for _, v in whole.eval_losses], rel=1e-6)
    assert first.losses[:3] == pytest.approx(whole.losses[:3], rel=1e-6)


def test_resume_says_what_is_wrong(tmp_path, llama):
    nbpeft.attach(llama, "lora", r=4)
    with pytest.raises(nbpeft.ConfigError, match="holds no checkpoint; train with save_every=N first"):
        nbpeft.train(llama, random_batches(), steps=2, resume=True, output_dir=tmp_path, live=False)
    nbpeft.train(llama, random_batches(), steps=2, save_every=2, output_dir=tmp_path, live=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002"]
    with pytest.raises(nbpeft.ConfigError, match="the checkpoint is at step 2, the run has 2 steps; raise steps="):
        nbpeft.train(llama, random_batches(), steps=2, resume=tmp_path, live=False)
    other = tiny_llama()
    nbpeft.attach(other, "lora", r=4, targets=["k_proj"])
    with pytest.raises(nbpeft.ConfigError, match="the checkpoint trained other parameters than this model's"):
        nbpeft.train(other, random_batches(), steps=4, resume=tmp_path / "checkpoint-000002", live=False)


# whose checkpoints a folder holds ----------------------------------------------------------------

def _saving(model, tmp_path, **options):
    options = {"steps": 4, "lr": 1e-2, "save_every": 2, "output_dir": tmp_path, "live": False, **options}
    return nbpeft.train(model, random_batches(), **options)


def _checkpoint_names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def test_a_new_run_into_another_runs_folder_is_refused_until_overwrite(tmp_path, llama):
    nbpeft.attach(llama, "lora", r=4)
    _saving(llama, tmp_path, steps=6)
    assert _checkpoint_names(tmp_path) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006"]
    with pytest.raises(nbpeft.ConfigError, match=r"holds checkpoints of another run \(lr=0.01, 6 steps; latest "
                                                 r"checkpoint-000006\) than this one \(lr=0.001, 3 steps\); "
                                                 "pass overwrite=True to replace them, or another output_dir="):
        _saving(llama, tmp_path, steps=3, lr=1e-3, save_every=3)
    assert len(_checkpoint_names(tmp_path)) == 3  # nothing written over
    (tmp_path / "notes.txt").write_text("mine")
    result = _saving(llama, tmp_path, steps=3, lr=1e-3, save_every=3, overwrite=True)
    assert _checkpoint_names(tmp_path) == ["checkpoint-000003"] and result.checkpoint.endswith("checkpoint-000003")
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only checkpoints are replaced
    assert checkpoint.run_of(tmp_path / "checkpoint-000003")["options"]["lr"] == 1e-3
    _saving(llama, tmp_path, steps=3, lr=1e-3, save_every=3)  # the same run again: its own folder is fine
    with pytest.raises(nbpeft.ConfigError, match="resume=True continues the checkpoints in output_dir and "
                                                 "overwrite=True replaces them"):
        _saving(llama, tmp_path, resume=True, overwrite=True)


def test_resume_continues_only_its_own_run(tmp_path, llama):
    nbpeft.attach(llama, "lora", r=4)
    _saving(llama, tmp_path, steps=4, save_every=2)
    latest = tmp_path / "checkpoint-000004"
    with pytest.raises(nbpeft.ConfigError) as info:
        _saving(llama, tmp_path, steps=6, lr=2e-4, resume=True, save_every=None)
    message = str(info.value)
    assert message.startswith(f"train(): {latest} belongs to another run (lr=0.01) than this one (lr=0.0002); ")
    assert f"pass resume={str(latest)!r}" in message and "\n" not in message
    # the checkpoint named outright continues with this call's options; the same run with more steps, from the latest
    assert _saving(llama, tmp_path, steps=6, lr=2e-4, resume=latest, save_every=None).steps == 6
    assert _saving(llama, tmp_path, steps=6, resume=True, save_every=None).steps == 6


def test_resume_refuses_a_run_on_other_data(tmp_path, llama):
    nbpeft.attach(llama, "lora", r=4)
    options = {"tokenizer": CharTokenizer(), "batch_size": 2, "output_dir": tmp_path, "live": False}
    nbpeft.train(llama, ["the cat sat", "a dog ran"], steps=2, save_every=2, **options)
    with pytest.raises(nbpeft.ConfigError, match=r"checkpoint-000002 belongs to another run \(data [0-9a-f]{12}\) "
                                                 r"than this one \(data [0-9a-f]{12}\)"):
        nbpeft.train(llama, ["the cat sat", "a dog sat"], steps=4, resume=True, **options)


def test_the_data_fingerprint_follows_the_examples():
    a = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    assert checkpoint.fingerprint(a) == checkpoint.fingerprint([dict(e) for e in a])
    assert checkpoint.fingerprint(a) != checkpoint.fingerprint([{"input_ids": [1, 2, 4], "labels": [1, 2, 3]}])
    assert checkpoint.fingerprint([{"input_ids": [12, 3]}]) != checkpoint.fingerprint([{"input_ids": [1, 23]}])
    pixels = [{"pixel_values": torch.ones(3, 2, 2), "labels": 1}]
    assert checkpoint.fingerprint(pixels) != checkpoint.fingerprint([{"pixel_values": torch.zeros(3, 2, 2), "labels": 1}])
    assert checkpoint.fingerprint(None) is None
