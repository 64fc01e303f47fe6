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
from ..frontend import data_variables, tokenizer_variables
from ..methods.base import get_method, method_options
from .commands import SHOW_VARIABLES, TRAIN_VARIABLES
from .line import FLAGS, SWITCHES

_MAGIC_LINE = re.compile(r"\s*%%?(peft_\w+)(.*)", re.DOTALL)
# magics whose first word is an adapter name, and those whose first word is a model variable
_NAME_FIRST = ("peft_use", "peft_detach", "peft_merge", "peft_unmerge", "peft_to_lora")
_MODEL_FIRST = ("peft_summary", "peft_panel")
# what a --flag's value can be, where it is one of a known few (free text: nothing to offer)
_FLAG_VALUES = {"dtype": list(DTYPES), "quant": list(QUANTS), "out": [], "prompt": [], "max-new-tokens": [],
                "temperature": [], "top-p": [], "seed": [], "stop": [], "rank": [],
                "processes": [], "batch-size": ["auto"], "how": list(HOWS), "density": [],
                "majority-sign-method": list(SIGN_METHODS)}


def option_keys(magic: str, method: str | None) -> dict[str, dict[str, Any]]:
    """Option keys a magic takes as key=value, with their info (choices, type)."""
    if magic == "peft_attach" and method:
        try:
            return method_options(get_method(method).config_class)
        except ValueError:
            return {}
    fn = {"peft_train": nbpeft.train, "peft_compare": nbpeft.compare, "peft_show_example": nbpeft.show_example}.get(magic)
    if fn is None:
        return {}
    skip = SHOW_VARIABLES if magic == "peft_show_example" else TRAIN_VARIABLES + (("live",) if magic == "peft_train" else ())
    params = inspect.signature(fn).parameters.values()
    keys = {p.name: {"type": "bool" if isinstance(p.default, bool) else ""} for p in params
            if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if magic == "peft_compare":
        keys.setdefault("methods", {"type": "list"})
        keys.update({m.name: {"type": "dict"} for m in nbpeft.methods()})
    return keys


def variables(shell: Any, kind: str) -> list[str]:
    if kind in ("data", "eval-data"):
        return data_variables(shell.user_ns)
    if kind == "tokenizer":
        return tokenizer_variables(shell.user_ns)
    names = [n for n in shell.user_ns if not n.startswith("_") and n not in shell.user_ns_hidden]
    if kind == "model":
        return [n for n in names if isinstance(shell.user_ns[n], nn.Module)]
    return names


def adapter_names(shell: Any, flags: dict[str, str]) -> list[str]:
    model = shell.user_ns.get(flags.get("model", "model"))
    return [row.name for row in nbpeft.summary(model).adapters] if isinstance(model, nn.Module) else []


def completions(shell: Any, text: str) -> tuple[str, list[str]]:
    """(the word being typed, its completions) for the text of a cell up to the cursor."""
    found = _MAGIC_LINE.fullmatch(text)
    if not found or found[1] not in FLAGS:
        return "", []
    magic, rest = found[1], found[2]
    flag_words = [f"--{f}" for f in FLAGS[magic]]
    if not rest[:1].isspace() and not rest.startswith("\n"):
        return "", []
    *done, typed = re.split(r"\s+", rest.lstrip()) if rest.strip() else [""]
    if rest[-1:].isspace():
        done, typed = done + [typed] if typed else done, ""
    flags, positional, previous = {}, [], ""
    for word in done:
        if previous:
            flags[previous[2:]], previous = word, ""
        elif word.startswith("--"):
            previous = word if "=" not in word and word[2:] in FLAGS[magic] and word[2:] not in SWITCHES else ""
        elif "=" not in word and ":" not in word:
            positional.append(word)
    if previous:  # the value of a --flag
        kind = previous[2:]
        if kind == "name":
            names = adapter_names(shell, flags)
        else:
            names = _FLAG_VALUES[kind] if kind in _FLAG_VALUES else variables(shell, kind)
        return typed, [n for n in names if n.startswith(typed)]
    method = positional[0] if positional else None
    if typed.startswith("-"):
        return typed, [f for f in flag_words if f.startswith(typed)]
    if magic in ("peft_attach", "peft_methods") and not positional and "=" not in typed:
        return typed, [m.name for m in nbpeft.methods() if m.name.startswith(typed)]
    if magic in _MODEL_FIRST and not positional:
        return typed, [n for n in variables(shell, "model") if n.startswith(typed)]
    if magic == "peft_compare_answers":  # any number of adapter names, then flags
        return typed, [n for n in adapter_names(shell, flags) if n.startswith(typed) and n not in positional]
    if magic == "peft_export" and len(positional) < 2:
        choices = [*FORMATS, "check"] if not positional else TARGETS if positional[0] == "check" else []
        return typed, [c for c in choices if c.startswith(typed)]
    if magic in _NAME_FIRST and not positional:
        head, _, last = typed.rpartition(",") if magic == "peft_use" else ("", "", typed)
        prefix = head + "," if head else ""
        chosen = head.split(",")
        return typed, [prefix + n for n in adapter_names(shell, flags) if n.startswith(last) and n not in chosen]
    keys = option_keys(magic, method)
    if "=" in typed:
        key, _, value = typed.partition("=")
        info = keys.get(key, {})
        if magic == "peft_compare" and key == "methods":
            head, _, last = value.rpartition(",")
            prefix = f"{key}={head}," if head else f"{key}="
            return typed, [prefix + m.name for m in nbpeft.methods() if m.name.startswith(last)]
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
