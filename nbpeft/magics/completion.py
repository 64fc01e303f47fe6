"""Tab completion for the magics: methods, option keys and values, flags, variables, adapter names."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

import nbpeft

from ..adapters.combine import HOWS, SIGN_METHODS
from ..formats.export import DTYPES, FORMATS, TARGETS
from ..formats.gguf import QUANTS
from ..frontend import data_variables, function_variables, tokenizer_variables
from ..methods.base import get_method, method_options
from ..training import options as train_options
from .commands import SHOW_VARIABLES
from .line import MAGICS, flags, switches

_MAGIC_LINE = re.compile(r"\s*%%?(peft_\w+)(.*)", re.DOTALL)
# magics whose first word is an adapter name, and those whose first word is a model variable
_NAME_FIRST = ("peft_use", "peft_detach", "peft_merge", "peft_unmerge", "peft_to_lora")
_MODEL_FIRST = ("peft_summary", "peft_panel")
# what a --flag's value can be, where it is one of a known few (free text: nothing to offer)
_FLAG_VALUES = {"dtype": list(DTYPES), "quant": list(QUANTS), "out": [], "prompt": [], "max-new-tokens": [],
                "temperature": [], "top-p": [], "seed": [], "stop": [], "rank": [],
                "how": list(HOWS), "density": [],
                "majority-sign-method": list(SIGN_METHODS)}


def option_keys(magic: str, method: str | None) -> dict[str, dict[str, Any]]:
    """Option keys a magic takes as key=value, with their info (choices, type)."""
    if magic == "peft_attach" and method:
        try:
            return method_options(get_method(method).config_class)
        except ValueError:
            return {}
    if magic == "peft_train":
        return {o.name: {"type": o.kind, "choices": o.choices} for o in train_options.OPTIONS}
    fn = {"peft_compare": nbpeft.compare, "peft_show_example": nbpeft.show_example}.get(magic)
    if fn is None:
        return {}
    skip = SHOW_VARIABLES if magic == "peft_show_example" else ()
    params = inspect.signature(fn).parameters.values()
    keys = {p.name: {"type": "bool" if isinstance(p.default, bool) else ""} for p in params
            if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if magic == "peft_compare":
        keys.setdefault("methods", {"type": "list"})
        keys.update({m.name: {"type": "dict"} for m in nbpeft.methods()})
    return keys


def train_values(shell: Any, option: train_options.TrainOption) -> list[str]:
    """What a train option's value can be, where there are a known few: its choices, true/false, auto,
    or the notebook variables of its kind."""
    found = {"bool": ["true", "false"], "int-or-auto": ["auto"], "listener": ["true", "false"],
             "bool-or-path": ["true", "false"], "data": data_variables(shell.user_ns),
             "tokenizer": tokenizer_variables(shell.user_ns), "function": function_variables(shell.user_ns)}
    words = [str(c) for c in option.choices] or found.get(option.kind, [])
    return words + function_variables(shell.user_ns) if option.kind == "listener" else words


def variables(shell: Any, kind: str) -> list[str]:
    if kind in ("data", "eval-data"):
        return data_variables(shell.user_ns)
    if kind == "tokenizer":
        return tokenizer_variables(shell.user_ns)
    names = [n for n in shell.user_ns if not n.startswith("_") and n not in shell.user_ns_hidden]
    if kind == "model":
        return [n for n in names if isinstance(shell.user_ns[n], nn.Module)]
    return names


def flag_values(shell: Any, magic: str, flag: str, given: dict[str, str]) -> list[str]:
    """What the value of ``--flag`` can be: adapter names, a train option's values, a known few, or variables."""
    if flag == "name":
        return adapter_names(shell, given)
    declared = {o.flag_name[2:]: o for o in train_options.OPTIONS if o.flag}
    if magic == "peft_train" and flag in declared:
        return train_values(shell, declared[flag])
    return _FLAG_VALUES[flag] if flag in _FLAG_VALUES else variables(shell, flag)


def adapter_names(shell: Any, flags: dict[str, str]) -> list[str]:
    model = shell.user_ns.get(flags.get("model", "model"))
    return [row.name for row in nbpeft.summary(model).adapters] if isinstance(model, nn.Module) else []


def completions(shell: Any, text: str) -> tuple[str, list[str]]:
    """(the word being typed, its completions) for the text of a cell up to the cursor."""
    found = _MAGIC_LINE.fullmatch(text)
    if not found or found[1] not in MAGICS:
        return "", []
    magic, rest = found[1], found[2]
    magic_flags, magic_switches = flags(magic), switches(magic)
    flag_words = [f"--{f}" for f in magic_flags]
    if not rest[:1].isspace() and not rest.startswith("\n"):
        return "", []
    *done, typed = re.split(r"\s+", rest.lstrip()) if rest.strip() else [""]
    if rest[-1:].isspace():
        done, typed = done + [typed] if typed else done, ""
    given_flags, positional, previous = {}, [], ""
    for word in done:
        if previous:
            given_flags[previous[2:]], previous = word, ""
        elif word.startswith("--"):
            previous = word if "=" not in word and word[2:] in magic_flags and word[2:] not in magic_switches else ""
        elif "=" not in word and ":" not in word:
            positional.append(word)
    if previous:  # the value of a --flag
        return typed, [n for n in flag_values(shell, magic, previous[2:], given_flags) if n.startswith(typed)]
    method = positional[0] if positional else None
    if typed.startswith("-"):
        return typed, [f for f in flag_words if f.startswith(typed)]
    if magic in ("peft_attach", "peft_methods") and not positional and "=" not in typed:
        return typed, [m.name for m in nbpeft.methods() if m.name.startswith(typed)]
    if magic in _MODEL_FIRST and not positional:
        return typed, [n for n in variables(shell, "model") if n.startswith(typed)]
    if magic == "peft_compare_answers":  # any number of adapter names, then flags
        return typed, [n for n in adapter_names(shell, given_flags) if n.startswith(typed) and n not in positional]
    if magic == "peft_export" and len(positional) < 2:
        choices = [*FORMATS, "check"] if not positional else TARGETS if positional[0] == "check" else []
        return typed, [c for c in choices if c.startswith(typed)]
    if magic in _NAME_FIRST and not positional:
        head, _, last = typed.rpartition(",") if magic == "peft_use" else ("", "", typed)
        prefix = head + "," if head else ""
        chosen = head.split(",")
        return typed, [prefix + n for n in adapter_names(shell, given_flags) if n.startswith(last) and n not in chosen]
    keys = option_keys(magic, method)
    if "=" in typed:
        key, _, value = typed.partition("=")
        info = keys.get(key, {})
        if magic == "peft_compare" and key == "methods":
            head, _, last = value.rpartition(",")
            prefix = f"{key}={head}," if head else f"{key}="
            return typed, [prefix + m.name for m in nbpeft.methods() if m.name.startswith(last)]
        if magic == "peft_train" and key in keys:
            choices = train_values(shell, train_options.by_name()[key])
        else:
            choices = [str(c) for c in info.get("choices", ())] or (["true", "false"] if info.get("type") == "bool" else [])
        return typed, [f"{key}={c}" for c in choices if c.startswith(value)]
    given = {w.partition("=")[0] for w in done if "=" in w}
    return typed, [f"{k}=" for k in keys if k.startswith(typed) and k not in given] + [
        f for f in flag_words if f.startswith(typed) and typed
    ]


def matcher(shell: Any) -> Callable:
    """An IPython context matcher that completes the magics' words (identifier ``nbpeft``)."""
    from IPython.core.completer import SimpleCompletion, context_matcher

    @context_matcher(identifier="nbpeft")
    def peft_matcher(context: Any) -> dict[str, Any]:
        lines = context.full_text.split("\n")
        upto = "\n".join(lines[: context.cursor_line] + [context.text_until_cursor])
        if context.cursor_line:  # the body of a %%cell magic: options only, after the first line's words
            first = lines[0]
            upto = first + " " + context.text_until_cursor if first.lstrip().startswith("%%") else ""
        fragment, words = completions(shell, upto) if upto else ("", [])
        return {"completions": [SimpleCompletion(w, type="magic option") for w in words],
                "matched_fragment": fragment, "suppress": bool(words), "ordered": True}

    return peft_matcher


def is_ours(matcher: Any) -> bool:
    return getattr(matcher, "matcher_identifier", None) == "nbpeft"
