"""The preference lab: choices become preference pairs (plain Python), its page only calls the lab,
and compare_answers(pick=True) fills it from adapters or from samples of one adapter."""

from __future__ import annotations

import html
import json
import re

import pytest

import nbpeft
from nbpeft import core
from nbpeft.errors import ConfigError
from nbpeft.inference.preferences import Choice, PreferenceLab
from nbpeft.widgets.lab import LabView

from conftest import char_tokenizer, two_adapters

PROMPTS = ["Capital of France?", "7 times 8?", "Opposite of cheap?"]
ANSWERS = [["Paris.", "Well, I think it is Paris!", "Lyon, maybe?"],
           ["56.", "Hmm, 54?", "56."],
           ["Expensive.", "Pricey, I guess!", "Hard to say!"]]


@pytest.fixture
def lab() -> PreferenceLab:
    return PreferenceLab(PROMPTS, ANSWERS)


def text(widget) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", widget.value))


# the lab in plain Python -----------------------------------------------------------------------

def test_picking_one_of_n_answers_gives_n_minus_1_pairs_and_moves_on(lab):
    assert lab.current == 0 and lab.progress == "0 of 3 judged" and lab.pairs == []
    assert lab.choose(0) == Choice(0, 0)
    assert lab.pairs == [{"prompt": PROMPTS[0], "chosen": "Paris.", "rejected": "Well, I think it is Paris!"},
                         {"prompt": PROMPTS[0], "chosen": "Paris.", "rejected": "Lyon, maybe?"}]
    assert lab.current == 1 and lab.progress == "1 of 3 judged"
    lab.choose(2)  # "56." twice: the copy of the picked answer gives no pair
    assert lab.pairs[2:] == [{"prompt": PROMPTS[1], "chosen": "56.", "rejected": "Hmm, 54?"}]
    lab.choose(None)  # neither: no pair
    assert len(lab.pairs) == 3 and lab.done and lab.current is None and lab.progress == "3 of 3 judged"


def test_undo_takes_back_the_last_choice(lab):
    lab.choose(0)
    lab.choose(1)
    assert lab.undo() == Choice(1, 1)
    assert lab.current == 1 and len(lab.pairs) == 2 and lab.progress == "1 of 3 judged"
    lab.choose(0)
    assert lab.pairs[-1] == {"prompt": PROMPTS[1], "chosen": "56.", "rejected": "Hmm, 54?"}
    lab.undo()
    lab.undo()
    assert lab.pairs == [] and lab.current == 0
    with pytest.raises(ConfigError, match=r"^undo\(\): nothing to undo; no answer is chosen yet$"):
        lab.undo()


def test_bad_choices_get_one_line_and_change_nothing(lab):
    for bad in (3, -1, "A", True):
        with pytest.raises(ConfigError, match=r"^choose\(\): answer=.* must be 0 to 2 \(one of this prompt's 3 "
                                              r"answers\), or None for neither$"):
            lab.choose(bad)
    assert lab.choices == []
    for answer in (0, 0, 0):
        lab.choose(answer)
    with pytest.raises(ConfigError, match=r"^choose\(\): all 3 prompts are judged; undo\(\) to change"):
        lab.choose(0)
    with pytest.raises(ConfigError, match=r"every prompt needs two answers or more"):
        PreferenceLab(["a"], [["only one"]])


def test_the_unpaired_view_keeps_neither_as_undesirable(lab):
    lab.choose(0)
    lab.choose(0)
    lab.choose(None)
    rows = lab.unpaired
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("Paris.", True), ("Well, I think it is Paris!", False), ("Lyon, maybe?", False),
        ("56.", True), ("Hmm, 54?", False),  # the second "56." is neither good nor bad
        ("Expensive.", False), ("Pricey, I guess!", False), ("Hard to say!", False)]
    assert lab.rows(unpaired=True) == rows and lab.rows() == lab.pairs


def test_rows_export_as_jsonl_and_as_a_datasets_dataset(lab, tmp_path):
    lab.choose(1)
    path = lab.save_jsonl(tmp_path / "prefs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == lab.pairs
    with pytest.raises(ConfigError, match=r"^save_jsonl\(\): .*prefs.jsonl exists; pass overwrite=True"):
        lab.save_jsonl(path)
    lab.save_jsonl(path, unpaired=True, overwrite=True)
    assert len(path.read_text().splitlines()) == 3
    pytest.importorskip("datasets")
    table = lab.to_dataset()
    assert table.column_names == ["prompt", "chosen", "rejected"] and table.to_list() == lab.pairs
    assert lab.to_dataset(unpaired=True).column_names == ["prompt", "completion", "label"]


def test_conversation_prompts_give_conversational_rows():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    lab = PreferenceLab([chat], [["Hello.", "Oh hi there, how are you doing today!"]])
    lab.choose(0)
    assert lab.pairs == [{"prompt": chat, "chosen": [{"role": "assistant", "content": "Hello."}],
                          "rejected": [{"role": "assistant", "content": "Oh hi there, how are you doing today!"}]}]


# the page --------------------------------------------------------------------------------------

def test_the_page_only_calls_the_lab(lab):
    view = LabView(lab)
    assert "0 of 3 judged" in text(view.progress) and PROMPTS[0] in text(view.prompt)
    assert [b.description for b in view.answer_buttons] == ["Pick A", "Pick B", "Pick C"]
    assert view.undo_button.disabled
    view.answer_buttons[1].click()
    assert lab.choices == [Choice(0, 1)] and "1 of 3 judged" in text(view.progress)
    assert PROMPTS[1] in text(view.prompt) and "2 pairs so far" in text(view.message)
    view.undo_button.click()
    assert lab.choices == [] and PROMPTS[0] in text(view.prompt)
    view.answer_buttons[0].click()
    view.neither_button.click()
    view.answer_buttons[2].click()
    assert [c.picked for c in lab.choices] == [0, None, 2] and lab.done
    assert "all judged: 4 preference pairs" in text(view.prompt) and view.answer_buttons == []
    assert view.neither_button.disabled and not view.undo_button.disabled


# compare_answers(pick=True) --------------------------------------------------------------------

def test_pick_gives_a_lab_over_the_table_of_answers(llama):
    model, tok = two_adapters(llama), char_tokenizer()
    prompts = ["Hello", "Is 1 < 2?"]
    table = nbpeft.compare_answers(model, prompts, tokenizer=tok, max_new_tokens=8)
    lab = nbpeft.compare_answers(model, prompts, tokenizer=tok, max_new_tokens=8, pick=True)
    assert isinstance(lab, PreferenceLab) and lab.prompts == prompts
    assert lab.sources == [["base", "pirate", "poet"]] * 2
    assert lab.answers == [[table.answers[c][i] for c in ("base", "pirate", "poet")] for i in range(2)]
    lab.choose(1)
    assert {p["chosen"] for p in lab.pairs} == {table.answers["pirate"][0]} and len(lab.pairs) >= 1


def test_samples_of_one_adapter_fill_the_lab(llama):
    model, tok = two_adapters(llama), char_tokenizer()
    options = {"max_new_tokens": 10, "temperature": 3.0, "seed": 0}
    lab = nbpeft.compare_answers(model, ["Hello", "Hi"], adapters="poet", tokenizer=tok, samples=3, pick=True,
                                 **options)
    core.set_adapter(model, "poet")
    assert lab.answers == nbpeft.generate(model, tok, ["Hello", "Hi"], num_samples=3, **options)
    assert lab.sources[0] == ["poet #1", "poet #2", "poet #3"]
    table = nbpeft.compare_answers(model, "Hello", adapters="poet", tokenizer=tok, samples=2, **options)
    assert table.columns == ["poet #1", "poet #2"]


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 3, "temperature": 1.0}, r"samples=3 draws several answers of one adapter; pass adapters= one of "
                                         r"'pirate', 'poet'"),
    ({"samples": 3, "adapters": "poet"}, r"samples=3 draws different answers only when sampling; pass temperature="),
    ({"samples": 0}, r"samples=0 must be a positive integer"),
    ({"pick": True, "adapters": "poet", "include_base": False}, r"pick=True needs two answers or more per prompt"),
])
def test_lab_errors_are_one_line(llama, kwargs, message):
    model = two_adapters(llama)
    with pytest.raises(ConfigError, match=r"^compare_answers\(\): " + message):
        nbpeft.compare_answers(model, "Hello", tokenizer=char_tokenizer(), max_new_tokens=4, **kwargs)


def test_the_pairs_train_with_dpo_as_they_are(llama):
    model, tok = two_adapters(llama), char_tokenizer()
    lab = nbpeft.compare_answers(model, ["Hello", "Hi", "Hey"], tokenizer=tok, max_new_tokens=6, pick=True)
    for answer in (1, 2, 0):
        lab.choose(answer)
    core.set_adapter(model, "poet")
    result = nbpeft.train(model, lab.pairs, tokenizer=tok, objective="dpo", steps=2, batch_size=2, live=False)
    assert len(result.history) == 2 and result.figure("rewards/margins")
    result = nbpeft.train(model, lab.unpaired, tokenizer=tok, objective="kto", steps=1, batch_size=4, live=False)
    assert len(result.history) == 1


# the panel's Answers tab -----------------------------------------------------------------------

def test_collect_preferences_in_the_panel_feeds_the_train_tab(llama):
    model, tok = two_adapters(llama), char_tokenizer()
    namespace = {"tok": tok}
    panel = nbpeft.panel(model, tok, namespace=namespace)
    tab = panel.answers_tab
    assert panel.get_title(4) == "Answers" and list(tab.adapters.value) == ["pirate", "poet"]
    tab.prompts.value = "Hello\n\n  Is 1 < 2?\n"
    tab.max_new_tokens.value = 6
    tab.compare_button.click()
    assert "3 columns" not in text(tab.message) and "2 prompts answered by base, pirate, poet" in text(tab.message)
    tab.collect_button.click()
    view = tab.lab_box.children[0]
    assert isinstance(view, LabView) and view.lab is tab.lab and namespace["prefs"] == []
    assert panel.train_tab.fields["data"].widget.value == "prefs"
    view.answer_buttons[2].click()  # poet's answer to "Hello" over the base's and pirate's
    assert tab.lab.choices == [Choice(0, 2)] and "1 of 2 judged" in text(view.progress)
    assert namespace["prefs"] == tab.lab.pairs and {p["prompt"] for p in namespace["prefs"]} == {"Hello"}
    view.undo_button.click()
    assert namespace["prefs"] == []
    view.answer_buttons[0].click()
    view.neither_button.click()
    assert tab.lab.done and namespace["prefs"] == tab.lab.pairs
    assert panel.train_tab.fields["data"].read("train") is namespace["prefs"]
    assert panel.train_tab.fields["objective"].widget.value == "dpo"
    options = panel.train_tab.options()
    assert options["data"] is namespace["prefs"] and options["objective"] == "dpo"


def test_answers_tab_samples_one_adapter_and_says_what_is_wrong(llama):
    model = two_adapters(llama)
    namespace: dict = {}
    tab = nbpeft.panel(model, char_tokenizer(), namespace=namespace).answers_tab
    tab.collect_button.click()
    assert text(tab.message).strip() == "type a prompt first, one per line"
    tab.prompts.value = "Hello"
    tab.samples.value = 3
    tab.collect_button.click()
    assert "samples 3 draws different answers only when sampling; pass temperature above 0 too" in text(tab.message)
    tab.temperature.value = 2.0
    tab.collect_button.click()
    assert "samples 3 draws several answers of one adapter; pass adapters one of 'pirate', 'poet'" in text(tab.message)
    tab.adapters.value = ["poet"]
    tab.variable.value = "sampled"
    tab.collect_button.click()
    assert tab.lab.sources[0] == ["poet #1", "poet #2", "poet #3"] and namespace["sampled"] == []
    tab.lab_box.children[0].answer_buttons[1].click()
    assert len(namespace["sampled"]) == len({*tab.lab.answers[0]} - {tab.lab.answers[0][1]})
    tab.variable.value = "1x"
    tab.collect_button.click()
    assert "pairs in '1x' must be a variable name" in text(tab.message)
