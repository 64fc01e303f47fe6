"""The panels map onto the Python API: generated fields, exact previews, buttons, background training."""

from __future__ import annotations

import html
import re
import sys
import threading
import time

import ipywidgets as widgets
import pytest
import torch
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import nbpeft
from nbpeft.core import state
from nbpeft.methods.base import ConfigError, get_method, method_options
from nbpeft.widgets import Panel, preview
from nbpeft.widgets.attach import target_choices
from nbpeft.widgets.fields import option_fields, read_options

from conftest import assert_same, logits, snapshot, tiny_bert, tiny_llama, tokens

METHODS = [info.name for info in nbpeft.methods()]


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": tokens(), "labels": tokens()} for _ in range(n)]


def text(widget: widgets.HTML) -> str:
    """What a person reads in an HTML widget."""
    return html.unescape(re.sub(r"<[^>]+>", " ", widget.value))


def make_panel(model: torch.nn.Module, **namespace) -> Panel:
    return nbpeft.panel(model, namespace=dict(namespace))


def structure(model: torch.nn.Module) -> tuple:
    """What must agree between two ways of attaching: module types, parameter names, shapes, flags."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()])


# generated fields ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_fields_cover_every_option_with_its_default_and_help(method):
    config_class = get_method(method).config_class
    infos = method_options(config_class)
    fields = option_fields(config_class)
    assert list(fields) == list(infos)
    for key, field in fields.items():
        assert field.value == infos[key]["default"], key
        assert field.widget.tooltip == infos[key]["help"]
        assert infos[key]["help"] in text(field.row.children[1])
        if "choices" in infos[key]:
            assert isinstance(field.widget, widgets.Dropdown) and list(field.widget.options) == list(infos[key]["choices"])
    assert read_options(fields) == {}


def test_field_widgets_follow_the_option_types():
    fields = option_fields(get_method("lora").config_class)
    kinds = {key: type(field.widget) for key, field in fields.items()}
    assert kinds == {"r": widgets.BoundedIntText, "alpha": widgets.FloatText, "dropout": widgets.FloatText,
                     "targets": widgets.Text, "rslora": widgets.Checkbox, "init": widgets.Dropdown,
                     "pissa_niter": widgets.BoundedIntText,
                     "modules_to_save": widgets.Text, "rank_pattern": widgets.Text, "alpha_pattern": widgets.Text,
                     "layers": widgets.Text, "layers_pattern": widgets.Text, "exclude": widgets.Text,
                     "lora_bias": widgets.Checkbox, "target_parameters": widgets.Text}
    fields["modules_to_save"].widget.value = "lm_head"
    fields["targets"].widget.value = "q_proj, v_proj"
    fields["r"].widget.value = 4
    assert read_options(fields) == {"modules_to_save": ["lm_head"], "targets": ["q_proj", "v_proj"], "r": 4}
    fields["targets"].widget.value = ".*q_proj"
    assert fields["targets"].value == ".*q_proj"
    fields["rank_pattern"].widget.value = "v_proj: 4, layers.0.self_attn.q_proj: 16"
    fields["layers"].widget.value = "0, 2"
    assert fields["rank_pattern"].value == {"v_proj": 4, "layers.0.self_attn.q_proj": 16} and fields["layers"].value == [0, 2]


def test_target_choices_group_leaf_names_with_counts(llama):
    choices = dict(target_choices(llama, get_method("lora")))
    assert choices["q_proj ×2"] == "q_proj" and choices["down_proj ×2"] == "down_proj"
    assert not any(label.startswith(("layers ", "mlp ", "self_attn ")) for label in choices)  # containers hold no weights


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter", "qlora"])
def test_target_choices_offer_only_what_the_method_can_adapt(llama, method):
    leaves = [leaf for _, leaf in target_choices(llama, get_method(method))]
    embedding = ["embed_tokens"] if method == "lora" else []  # LoRA also adapts embeddings
    assert leaves == [*embedding, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for leaf in leaves:  # each one attaches
        nbpeft.attach(tiny_llama(), method, targets=[leaf])


def test_target_choices_follow_the_method(llama):
    tab = make_panel(llama).attach_tab
    assert [leaf for _, leaf in tab.targets.options] == [leaf for _, leaf in target_choices(llama, get_method("lora"))]
    tab.method.value = "bitfit"  # biases of norms too: the method says so, not a list in the panel
    assert "input_layernorm" in [leaf for _, leaf in tab.targets.options]
    assert not {"embed_tokens", "lm_head"} & {leaf for _, leaf in tab.targets.options}  # heads go in modules_to_save


# preview ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_preview_is_exactly_what_attach_gives(method, make):
    model = make()
    before = snapshot(model)
    try:
        expected = preview(model, method)
    except ConfigError:
        with pytest.raises(ConfigError):
            nbpeft.attach(make(), method)
        return
    assert_same(before, snapshot(model))
    adapter = nbpeft.attach(model, method)
    counts = nbpeft.summary(model)
    assert (expected.trainable, expected.total, expected.adapter_params) == (counts.trainable, counts.total, adapter.num_params)


def test_preview_on_a_model_that_already_has_an_adapter(llama):
    nbpeft.attach(llama, "lora", r=2, name="first")
    expected = preview(llama, "lora", name="second", r=4, targets="all-linear")
    nbpeft.attach(llama, "lora", name="second", r=4, targets="all-linear")
    assert (expected.trainable, expected.total) == (nbpeft.summary(llama).trainable, nbpeft.summary(llama).total)
    with pytest.raises(ConfigError, match="already attached"):
        preview(llama, "lora", name="first")


def test_panel_preview_updates_on_every_change_and_never_touches_the_model(llama):
    before = snapshot(llama)
    tab = make_panel(llama).attach_tab
    seen = [tab.last_preview.trainable]
    tab.fields["r"].widget.value = 4
    seen.append(tab.last_preview.trainable)
    tab.targets.value = ("q_proj", "k_proj", "v_proj")
    seen.append(tab.last_preview.trainable)
    tab.targets.value = ()
    tab.regex.value = "all-linear"
    seen.append(tab.last_preview.trainable)
    tab.fields["modules_to_save"].widget.value = "lm_head"
    seen.append(tab.last_preview.trainable)
    # q: 32->32, k and v: 32->16 (2 KV heads of 8); r (in + out) per layer, two layers
    assert seen[:3] == [8 * (32 + 32 + 32 + 16) * 2, 4 * (32 + 32 + 32 + 16) * 2, 4 * (64 + 48 + 48) * 2]
    assert seen[3] == nbpeft.attach(tiny_llama(), "lora", r=4, targets="all-linear").num_params
    assert seen[4] == seen[3] + 128 * 32
    assert "would train" in text(tab.preview) and f"{seen[4]:,}" in text(tab.preview)
    assert_same(before, snapshot(llama))


@pytest.mark.slow
def test_preview_on_smollm2_matches_attach(smol):
    model, _ = smol
    tab = make_panel(model).attach_tab
    started = time.perf_counter()
    tab.fields["r"].widget.value = 16
    elapsed = time.perf_counter() - started
    shown = tab.last_preview
    assert shown.trainable == 16 * (576 + 576 + 576 + 192) * 30  # q_proj and v_proj (3 KV heads of 64)
    assert f"{shown.trainable:,} trainable of {shown.total:,}" in text(tab.preview)
    tab.attach_button.click()
    counts = nbpeft.summary(model)
    assert (counts.trainable, counts.total) == (shown.trainable, shown.total) == (921_600, 134_515_008 + 921_600)
    assert elapsed < 2.0


# attach and detach through the panel --------------------------------------------------------------

@pytest.fixture(scope="module")
def ip():
    shell = start_ipython() or get_ipython()  # the shell is a process-wide singleton
    if "nbpeft" not in shell.extension_manager.loaded:
        shell.run_line_magic("load_ext", "nbpeft")
    return shell


@pytest.mark.parametrize("settings, line", [
    ({"r": 4, "alpha": 8.0, "rslora": True, "init": "gaussian", "targets": ("q_proj", "v_proj")},
     "lora r=4 alpha=8 rslora=true init=gaussian targets=q_proj,v_proj"),
    ({"dropout": 0.1, "regex": r".*\.(q|o)_proj", "modules_to_save": "lm_head"},
     r"lora dropout=0.1 targets='.*\.(q|o)_proj' modules_to_save=lm_head"),
    ({"method": "ia3", "targets": ("k_proj", "down_proj"), "feedforward": "down_proj"},
     "ia3 targets=k_proj,down_proj feedforward=down_proj"),
    ({"method": "bitfit", "regex": "all-linear"}, "bitfit targets=all-linear"),
])
def test_panel_and_magic_give_identical_models(ip, settings, line):
    settings = dict(settings)
    panel_model, magic_model = tiny_llama(), tiny_llama()
    tab = make_panel(panel_model).attach_tab
    tab.method.value = settings.pop("method", "lora")
    tab.targets.value = settings.pop("targets", ())
    tab.regex.value = settings.pop("regex", "")
    for key, value in settings.items():
        tab.fields[key].widget.value = value
    torch.manual_seed(0)
    tab.attach_button.click()
    assert "Adapter 'default'" in text(tab.message), tab.message.value
    ip.user_ns["model"] = magic_model
    try:
        torch.manual_seed(0)
        with capture_output():
            result = ip.run_cell(f"%peft_attach {line}")
    finally:
        ip.user_ns.pop("model")
    assert result.success
    assert structure(panel_model) == structure(magic_model)
    assert state(panel_model).adapters["default"].config == state(magic_model).adapters["default"].config
    for (key, a), b in zip(panel_model.state_dict().items(), magic_model.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("change, message", [
    (lambda t: setattr(t.fields["r"].widget, "value", 0), "lora: r=0 must be a positive integer"),
    (lambda t: setattr(t.regex, "value", "qproj["), "lora: targets='qproj[' is not a valid regex"),
    (lambda t: setattr(t.regex, "value", "nothing.*"), "lora: the regex targets='nothing.*' matched no module"),
    (lambda t: setattr(t.fields["modules_to_save"].widget, "value", "head"),
     "attach(): modules_to_save=['head'] not found in the model"),
    (lambda t: setattr(t.name, "value", "not a name"), "attach(): adapter name 'not a name' must be a simple identifier"),
    (lambda t: (setattr(t.targets, "value", ("q_proj",)), setattr(t.regex, "value", "all-linear")),
     "lora: choose target modules or type a regex, not both"),
])
def test_errors_show_inline_and_leave_the_model_alone(llama, change, message):
    before = snapshot(llama)
    tab = make_panel(llama).attach_tab
    change(tab)
    assert tab.last_preview is None and message in text(tab.preview)
    assert tab.attach_button.disabled  # the page cannot click it; a cell still can
    tab.attach_button.click()  # no exception escapes the button
    assert message in text(tab.message) and "#b00020" in tab.message.value
    assert_same(before, snapshot(llama))
    assert not state(llama).adapters


def test_attach_then_detach_buttons(llama):
    before = snapshot(llama)
    panel = make_panel(llama)
    tab = panel.attach_tab
    tab.name.value = "chat"
    tab.attach_button.click()
    assert list(state(llama).adapters) == ["chat"]
    assert ">chat</td>" in panel.adapters_tab.table.value
    assert "already attached" in text(tab.preview) and "#b00020" not in tab.preview.value  # a note, not an error
    assert tab.attach_button.disabled
    tab.attach_button.click()
    assert "an adapter named 'chat' is already attached; pick another adapter name or detach it" in text(tab.message)
    tab.detach_button.click()
    assert text(tab.message).strip() == "detached 'chat'"
    assert_same(before, snapshot(llama))
    tab.detach_button.click()
    assert "this model has no adapter" in text(tab.message)


def test_switching_method_rebuilds_the_fields(llama):
    tab = make_panel(llama).attach_tab
    tab.targets.value = ("q_proj",)
    tab.method.value = "prompt"
    assert list(tab.fields) == list(method_options(get_method("prompt").config_class))
    assert tab.target_box.layout.display == "none" and tab.targets.value == ()
    assert tab.last_preview.trainable == nbpeft.attach(tiny_llama(), "prompt").num_params
    tab.method.value = "lora"
    assert tab.target_box.layout.display is None and "r" in tab.fields


def test_panel_rejects_what_is_not_a_model():
    with pytest.raises(ConfigError, match="panel\\(\\): expected a torch.nn.Module, got str"):
        nbpeft.panel("model")


# training ----------------------------------------------------------------------------------------

def test_train_tab_shows_notes_from_the_loop():
    from nbpeft.training.events import Note
    from nbpeft.widgets.training import PanelDisplay

    status = widgets.HTML()
    live = PanelDisplay(widgets.IntProgress(), status, widgets.Image())
    live.on_note(Note("compiling <block>"))
    assert status.value == "compiling &lt;block&gt;…"


def test_train_tab_trains_in_the_background_and_keeps_the_result(llama):
    namespace = {"data": batches(), "other": 3, "_hidden": [1]}
    panel = nbpeft.panel(llama, namespace=namespace)
    tab = panel.train_tab
    assert list(tab.data.options) == ["data"] and tab.data.value == "data"
    nbpeft.attach(llama, "lora", r=2)
    tab.steps.value, tab.lr.value, tab.device.value = 3, 1e-2, "cpu"
    before = llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone()
    tab.start_button.click()
    result = tab.wait(timeout=60)
    assert result is not None and result.steps == 3 and not result.stopped
    assert namespace["_peft_result"] is result and panel.result is result
    assert not torch.equal(before, llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    assert tab.progress.value == 3 and tab.progress.max == 3
    assert "step 3/3" in tab.status.value and "tok/s" in tab.status.value and "peak RSS" in tab.status.value
    assert tab.plot.value[:4] == b"\x89PNG"
    assert "the result is in _peft_result" in text(tab.message)
    assert not tab.start_button.disabled and tab.stop_button.disabled


def test_stop_ends_a_background_run_after_the_current_step(llama):
    nbpeft.attach(llama, "lora", r=2)
    tab = nbpeft.panel(llama, namespace={"data": batches()}).train_tab
    tab.steps.value = 100_000
    tab.start_button.click()
    deadline = time.monotonic() + 60
    while tab.progress.value < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tab.running and tab.stop_button.disabled is False
    tab.stop_button.click()
    last_shown = tab.progress.value  # the flag is set: the run checks it at this step's event or the next
    result = tab.wait(timeout=60)
    assert not tab.running
    assert result.stopped == "stopped" and last_shown <= result.steps <= last_shown + 1
    assert result.message == f"stopped after step {result.steps} of 100000; the adapter stays attached"
    assert "stopped after step" in tab.status.value


def test_other_buttons_wait_while_training_runs(llama):
    nbpeft.attach(llama, "lora", r=2)
    panel = nbpeft.panel(llama, namespace={"data": batches()})
    release = threading.Event()
    original = panel.train_tab._listen

    def slow(event, payload):
        original(event, payload)
        if event == "step":
            release.wait(30)

    panel.train_tab._listen = slow
    panel.train_tab.steps.value = 2
    panel.train_tab.start_button.click()
    try:
        panel.attach_tab.name.value = "other"
        panel.attach_tab.attach_button.click()
        assert "training is running; press Stop in the Train tab first" in text(panel.attach_tab.message)
        panel.adapters_tab.merge_button.click()
        assert "training is running" in text(panel.adapters_tab.message)
        panel.train_tab.start_button.click()
        assert "training is already running" in text(panel.train_tab.message)
        assert list(state(llama).adapters) == ["default"]
    finally:
        release.set()
    assert panel.train_tab.wait(timeout=60).steps == 2


@pytest.mark.parametrize("data, message", [
    ("", "train: which data?"),
    ("nope", "train: no variable 'nope' in the notebook"),
    ("numbers", "train(): cannot read examples like"),
])
def test_train_errors_show_inline(llama, data, message):
    nbpeft.attach(llama, "lora")
    tab = nbpeft.panel(llama, namespace={"numbers": [[1, 2]]}).train_tab
    tab.data.value = data
    tab.start_button.click()
    tab.wait(timeout=30)
    assert message in text(tab.message) and tab.result is None


def test_train_without_an_adapter_says_what_to_do(llama):
    llama.requires_grad_(False)
    tab = nbpeft.panel(llama, namespace={"data": batches()}).train_tab
    tab.start_button.click()
    tab.wait(timeout=30)
    assert 'this model has no adapter; attach one first, e.g. nbpeft.attach(model, "lora")' in text(tab.message)


# the adapters tab --------------------------------------------------------------------------------

def test_adapters_tab_calls_the_core_api(llama, tmp_path):
    base = logits(llama)
    nbpeft.attach(llama, "lora", r=2, init="random", name="chat")
    nbpeft.attach(llama, "lora", r=4, init="random", name="sql")
    panel = make_panel(llama)
    tab = panel.adapters_tab
    assert list(tab.adapter.options) == ["chat", "sql"] and tab.adapter.value == "sql"
    assert ">chat</td>" in tab.table.value and ">inactive</td>" in tab.table.value
    sql = logits(llama)

    tab.adapter.value = "chat"
    tab.activate_button.click()
    assert state(llama).active == ["chat"] and "activate: 'chat'" in text(tab.message)
    chat = logits(llama)
    assert not torch.allclose(chat, sql)

    tab.disable_button.click()
    assert torch.allclose(logits(llama), base, atol=1e-6) and tab.disabled and ">disabled</td>" in tab.table.value
    tab.disable_button.click()
    assert torch.allclose(logits(llama), chat, atol=1e-6) and not tab.disabled

    tab.merge_button.click()
    assert state(llama).adapters["chat"].merged and "active, merged" in tab.table.value
    assert torch.allclose(logits(llama), chat, atol=1e-5)
    tab.unmerge_button.click()
    assert not state(llama).adapters["chat"].merged

    tab.path.value = str(tmp_path)
    tab.save_button.click()
    assert (tmp_path / "chat" / "adapter_config.json").exists() and "saved" in text(tab.message)
    tab.delete_button.click()
    tab.confirm_button.click()
    assert list(state(llama).adapters) == ["sql"] and list(tab.adapter.options) == ["sql"]
    tab.path.value, tab.load_name.value = str(tmp_path / "chat"), "chat"
    tab.load_button.click()
    assert "loaded 'chat'" in text(tab.message) and list(tab.adapter.options) == ["sql", "chat"]
    nbpeft.set_adapter(llama, "chat")
    assert torch.allclose(logits(llama), chat, atol=1e-6)
    assert ">chat</td>" in panel.adapters_tab.table.value


def test_disable_ends_before_any_other_action(llama):
    nbpeft.attach(llama, "lora", init="random", name="chat")
    adapted = logits(llama)
    tab = make_panel(llama).adapters_tab
    tab.disable_button.click()
    tab.merge_button.click()
    assert not tab.disabled and state(llama).adapters["chat"].merged
    assert torch.allclose(logits(llama), adapted, atol=1e-5)


@pytest.mark.parametrize("button, message", [
    ("activate_button", "this model has no adapter; attach one in the first tab"),
    ("delete_button", "this model has no adapter; attach one in the first tab"),
    ("save_button", "save: type a folder in path first"),
    ("load_button", "load: type the adapter's folder in path first"),
])
def test_adapters_tab_errors_show_inline(llama, button, message):
    tab = make_panel(llama).adapters_tab
    getattr(tab, button).click()
    assert message in text(tab.message) and "#b00020" in tab.message.value


def test_load_from_a_missing_folder(llama, tmp_path):
    tab = make_panel(llama).adapters_tab
    tab.path.value = str(tmp_path / "missing")
    tab.load_button.click()
    assert f"load: {tmp_path / 'missing'} does not exist" in text(tab.message)
    tab.path.value = str(tmp_path)
    tab.load_button.click()
    assert "load_adapter(): no adapter_config.json in" in text(tab.message)  # a folder, but no adapter in it
    assert not state(llama).adapters


def test_merge_of_a_method_that_cannot_merge(llama):
    nbpeft.attach(llama, "prompt")
    tab = make_panel(llama).adapters_tab
    tab.merge_button.click()
    assert "#b00020" in tab.message.value and "merge" in text(tab.message)


# the attach tab as a person reads it ----------------------------------------------------------------

def red(widget: widgets.HTML) -> bool:
    return "#b00020" in widget.value


def test_no_error_line_is_left_after_a_successful_attach(llama):
    tab = make_panel(llama).attach_tab
    tab.attach_button.click()  # 'default'
    tab.attach_button.click()  # 'default' again: refused
    assert red(tab.message)
    tab.name.value = "second"  # the refusal no longer applies
    assert not red(tab.message) and not red(tab.preview) and not tab.attach_button.disabled
    tab.fields["r"].widget.value = 0
    tab.attach_button.click()
    assert red(tab.message) and red(tab.preview)
    tab.fields["r"].widget.value = 4
    tab.attach_button.click()
    assert list(state(llama).adapters) == ["default", "second"]
    assert not red(tab.message) and not red(tab.preview) and "Adapter 'second'" in text(tab.message)


def test_targets_help_follows_the_selection(llama):
    tab = make_panel(llama).attach_tab
    assert text(tab.targets_help) == "none selected: the method's default targets (q_proj, v_proj)"
    tab.method.value = "ia3"  # another method, other defaults on the same model
    assert text(tab.targets_help) == "none selected: the method's default targets (k_proj, v_proj, down_proj)"
    tab.method.value = "lora"
    tab.targets.value = ("q_proj", "v_proj")
    assert text(tab.targets_help) == "2 selected: q_proj, v_proj"
    tab.regex.value = "all-linear"
    assert text(tab.targets_help) == "clear the selection or the regex" and tab.attach_button.disabled
    tab.targets.value = ()
    assert text(tab.targets_help) == "the regex below chooses the targets" and not tab.attach_button.disabled


@pytest.mark.parametrize("method", METHODS)
def test_every_label_has_one_width(llama, method):
    from nbpeft.widgets.fields import LABEL

    tab = make_panel(llama).attach_tab
    tab.method.value = method
    labelled = [tab.method, tab.name, tab.targets, tab.regex] + [f.widget for f in tab.fields.values()]
    assert {w.style.description_width for w in labelled} == {LABEL["style"]["description_width"]}
    assert all(getattr(w, "indent", True) for w in labelled)  # checkboxes keep the label column too


# the adapters tab as a person reads it ---------------------------------------------------------------

def test_adapter_buttons_share_one_row(llama):
    tab = make_panel(llama).adapters_tab
    row = tab.buttons.children
    for button in (tab.activate_button, tab.merge_button, tab.unmerge_button, tab.delete_button, tab.disable_button):
        assert button in row and button.layout.width == "auto"
    assert tab.buttons.layout.flex_flow == "row nowrap"


def test_adapter_table_heads_align_with_their_columns(llama):
    nbpeft.attach(llama, "lora", name="chat")
    table = make_panel(llama).adapters_tab.table.value
    heads = re.findall(r'<th style="[^"]*text-align:(\w+)">([^<]+)</th>', table)
    cells = re.findall(r'<td style="[^"]*text-align:(\w+)">', table)
    assert [h for _, h in heads] == ["adapter", "method", "modules", "parameters", "% of base", "state"]
    assert [a for a, _ in heads] == cells == ["left", "left", "right", "right", "right", "left"]
    assert "white-space:nowrap" in table


def test_delete_asks_first(llama):
    nbpeft.attach(llama, "lora", name="chat")
    tab = make_panel(llama).adapters_tab
    tab.delete_button.click()
    assert list(state(llama).adapters) == ["chat"] and tab.confirm_box.layout.display is None
    assert "delete 'chat'" in text(tab.confirm_text)
    tab.cancel_button.click()
    assert tab.confirm_box.layout.display == "none" and list(state(llama).adapters) == ["chat"]
    tab.delete_button.click()
    tab.confirm_button.click()
    assert not state(llama).adapters and tab.confirm_box.layout.display == "none"
    assert "delete: 'chat'" in text(tab.message)


def test_save_overwrites_only_when_ticked(llama, tmp_path):
    nbpeft.attach(llama, "lora", init="random")
    tab = make_panel(llama).adapters_tab
    tab.path.value = str(tmp_path / "a")
    tab.save_button.click()
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = weights.read_bytes()
    with torch.no_grad():
        llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    tab.save_button.click()
    assert red(tab.message) and weights.read_bytes() == saved
    assert text(tab.message).strip() == f"save_adapter(): {tmp_path / 'a'} already holds an adapter; choose another path or tick overwrite"
    tab.overwrite.value = True
    tab.save_button.click()
    assert not red(tab.message) and weights.read_bytes() != saved

    (tmp_path / "file").write_text("notes")
    tab.overwrite.value = False
    tab.path.value = str(tmp_path / "file")
    tab.save_button.click()
    assert "is a file; choose another path or tick overwrite" in text(tab.message) and "Errno" not in text(tab.message)
    assert (tmp_path / "file").read_text() == "notes"


# the adapters tab's Export section --------------------------------------------------------------

def test_export_writes_a_gguf_adapter_and_leaves_the_model_alone(llama, tmp_path):
    import gguf

    nbpeft.attach(llama, "lora", r=2, init="random")
    tab = make_panel(llama).adapters_tab
    before = snapshot(llama)
    tab.export_format.value = "gguf-adapter"
    tab.export_path.value = str(tmp_path / "a")
    tab.export_button.click()
    assert not red(tab.message), text(tab.message)
    assert text(tab.message).strip() == f"exported gguf-adapter to {tmp_path / 'a'} (adapter.gguf, Modelfile, README.md)"
    reader = gguf.GGUFReader(tmp_path / "a" / "adapter.gguf")
    assert reader.fields["adapter.type"].contents() == "lora" and len(reader.tensors) == 2 * 2 * 2
    assert_same(snapshot(llama), before)


def test_export_merged_in_the_chosen_dtype(llama, tmp_path):
    import json

    from test_generate import char_tokenizer

    nbpeft.attach(llama, "lora", r=2, init="random")
    tab = nbpeft.panel(llama, char_tokenizer(), namespace={}).adapters_tab
    assert tab.export_format.value == "merged" and not tab.export_dtype.disabled and tab.export_quant.disabled
    tab.export_dtype.value = "float16"
    tab.export_path.value = str(tmp_path / "m")
    tab.export_button.click()
    assert not red(tab.message), text(tab.message)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_dtype_and_quant_follow_the_format(llama):
    tab = make_panel(llama).adapters_tab
    states = {}
    for fmt in ("merged", "gguf", "gguf-adapter"):
        tab.export_format.value = fmt
        states[fmt] = (tab.export_dtype.disabled, tab.export_quant.disabled)
    assert states == {"merged": (False, True), "gguf": (True, False), "gguf-adapter": (True, True)}
    from nbpeft.formats.export import DTYPES, FORMATS
    from nbpeft.formats.gguf import QUANTS

    assert list(tab.export_format.options) == list(FORMATS) and list(tab.export_quant.options) == list(QUANTS)
    assert {"q4_k_m", "q5_k_m"} <= set(tab.export_quant.options)  # llama.cpp's K-quants
    assert [value for _, value in tab.export_dtype.options] == ["base", *DTYPES]
    assert tab.export_dtype.label == "as the base"  # shown, not blank: the base's dtype by default


def test_k_quant_without_llama_cpp_is_one_line(llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    nbpeft.attach(llama, "lora", r=2, init="random")
    tab = make_panel(llama).adapters_tab
    tab.export_format.value = "gguf"
    tab.export_quant.value = "q4_k_m"
    tab.export_path.value = str(tmp_path / "g")
    tab.export_button.click()
    shown = text(tab.message).strip()
    assert red(tab.message) and shown == ("export(): quant (gguf) 'q4_k_m' is written by llama.cpp's quantiser, which needs "
                                         "llama-cpp-python: pip install llama-cpp-python (it compiles llama.cpp from source, "
                                         "which takes minutes)"), shown
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setup, message", [
    ("no path", "export: type a new folder in export to first"),
    ("taken", "export(): {path} already exists and is not empty; choose another path or tick overwrite"),
    ("no adapter", "export(): this model has no adapter; attach or load one first"),
    ("no tokenizer", "export(): no tokenizer to export with the model; open the panel with nbpeft.panel(model, tokenizer)"),
    ("prefix", "export(): the prefix adapter 'default' changes activations, not weights, so it cannot be folded"),
])
def test_export_errors_are_one_line(llama, tmp_path, setup, message):
    if setup == "prefix":
        nbpeft.attach(llama, "prefix")
    elif setup != "no adapter":
        nbpeft.attach(llama, "lora", r=2, init="random")
    tab = make_panel(llama).adapters_tab
    path = tmp_path / "out"
    if setup == "taken":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    tab.export_format.value = "merged" if setup in ("no tokenizer", "prefix") else "gguf-adapter"
    tab.export_path.value = "" if setup == "no path" else str(path)
    before = snapshot(llama)
    tab.export_button.click()
    shown = text(tab.message).strip()
    assert red(tab.message) and shown.startswith(message.format(path=path)), shown
    assert "\n" not in shown and "Traceback" not in shown and "Error:" not in shown
    assert_same(snapshot(llama), before)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if setup == "taken" else [])  # no partial folder
    if setup == "taken":
        assert [p.name for p in path.iterdir()] == ["notes.txt"]
        tab.overwrite.value = True  # the message's fix: the export then replaces the folder
        tab.export_button.click()
        assert sorted(p.name for p in path.iterdir()) == ["Modelfile", "README.md", "adapter.gguf"], text(tab.message)


def test_check_shows_each_line_of_check_export(llama):
    nbpeft.attach(llama, "lora", r=2)
    tab = make_panel(llama).adapters_tab
    tab.check_button.click()
    assert text(tab.message).strip() == "vllm: no problems found" and not red(tab.message)
    nbpeft.detach(llama)
    nbpeft.attach(llama, "dora", r=32)
    tab.refresh()
    tab.check_target.value = "vllm"
    tab.check_button.click()
    expected = nbpeft.check_export(llama, "vllm")
    assert len(expected) == 2 and re.findall(r"<li>(.*?)</li>", tab.message.value) == [html.escape(line) for line in expected]
    assert list(tab.check_target.options) == ["vllm", "llama.cpp", "ollama", "peft"]


def test_convert_to_lora_replaces_the_selected_adapter(llama):
    nbpeft.attach(llama, "dora", r=4, init="random", name="chat")
    nbpeft.attach(llama, "lora", r=2, name="sql")
    panel = make_panel(llama)
    tab = panel.adapters_tab
    tab.adapter.value = "chat"
    tab.lora_rank.value = 2
    tab.to_lora_button.click()
    assert not red(tab.message), text(tab.message)
    assert text(tab.message).strip().startswith("LoRA 'chat_lora' (r=2) from 'chat': relative Frobenius error ")
    assert state(llama).active == ["chat_lora"] and state(llama).adapters["chat_lora"].config.r == 2
    assert ">chat_lora</td>" in tab.table.value and "chat_lora" in tab.adapter.options

    tab.adapter.value = "chat_lora"
    nbpeft.merge(llama, "chat_lora")
    tab.to_lora_button.click()
    assert red(tab.message) and text(tab.message).strip() == "to_lora(): adapter 'chat_lora' is merged; press Unmerge first"


def test_export_rows_line_up(llama):
    from nbpeft.widgets.adapters import FIELD_WIDTH
    from nbpeft.widgets.fields import LABEL

    tab = make_panel(llama).adapters_tab
    fields = [row.children[0] for row in tab.export_rows]
    assert [f.description for f in fields] == ["export as", "dtype (merged)", "quant (gguf)", "export to", "check for", "LoRA rank"]
    assert {f.style.description_width for f in fields} == {LABEL["style"]["description_width"]}
    assert {f.layout.width for f in fields} == {FIELD_WIDTH}
    buttons = [row.children[1] for row in tab.export_rows if len(row.children) > 1]
    assert buttons == [tab.export_button, tab.check_button, tab.to_lora_button]
    assert all(b.layout.width == "auto" for b in buttons)
    assert all(row in tab.children for row in tab.export_rows)
