"""What the two notebook front-ends (magics and panels) share: the option grammar, one-line
errors and the lookup of notebook variables.

The magics and the panels never import each other; both read text and variables through
this module, so ``targets=q_proj`` in a magic and ``q_proj`` in a panel's text box mean
the same thing.
"""

from __future__ import annotations

import ast
import functools
import glob
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import batches as data
from .data import preferences
from .errors import ConfigError
from .errors import one_line as one_line  # the front-ends show every error through it
from .training.display import notebook_shell
from .training.options import TrainOption

_WORDS = {"true": True, "false": False, "none": None}
OPTION = re.compile(r"([A-Za-z_][\w-]*)\s*[=:]\s*(.*)", re.DOTALL)
_MODULE_NAME = re.compile(r"[A-Za-z_][\w.]*")


def parse_value(text: str) -> Any:
    """A Python literal where possible; ``a,b`` -> a list; true/false/none -> True/False/None."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    if "," in text and text[0] not in "[({'\"":
        return [parse_value(part.strip()) for part in text.split(",") if part.strip()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        pass
    if text.startswith("[") and text.endswith("]"):  # [q_proj, v_proj]: a list of bare names
        return [parse_value(part.strip()) for part in text[1:-1].split(",") if part.strip()]
    if text.startswith("{") and text.endswith("}"):  # {q_proj: 16, v_proj: 4}: a dict keyed by bare names
        return name_values(text[1:-1])
    return text


def name_values(text: str) -> dict[str, Any]:
    """``q_proj: 16, v_proj: 4`` as ``{'q_proj': 16, 'v_proj': 4}`` (a key may hold ``:``; the value is after the last)."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, colon, value = part.rpartition(":")
        if not colon or not key.strip() or not value.strip():
            raise ConfigError(f"expected name: value pairs such as {{q_proj: 16}}, got {part!r}")
        pairs[key.strip().strip("'\"")] = parse_value(value.strip())
    return pairs


def option_value(value: Any, info: dict[str, Any]) -> Any:
    """A bare module name given to an option that takes a list is a list of that one name;
    ``name: value`` pairs given to an option that takes a dict are that dict.

    ``targets=q_proj`` means the module q_proj, not the regex 'q_proj' the API would read
    from a plain string; ``all-linear`` and regexes are not bare names and stay strings.
    ``info`` is the option's entry in ``method_options``.
    """
    if "list" in info.get("type", "") and isinstance(value, str) and _MODULE_NAME.fullmatch(value):
        return [value]
    if info.get("type", "").startswith("dict") and isinstance(value, (str, list)):  # q_proj:16, v_proj:4
        return name_values(value if isinstance(value, str) else ",".join(str(v) for v in value))
    return value


def words(line: str) -> list[str]:
    """Split on spaces outside quotes and brackets; ``#`` at the start of a word begins a comment."""
    found, word, depth, quote, escaped = [], "", 0, "", False
    for ch in line:
        if quote:
            word += ch
            quote = "" if ch == quote and not escaped else quote
            escaped = ch == "\\" and not escaped
        elif ch.isspace() and depth == 0:
            if word:
                found.append(word)
            word = ""
        elif ch == "#" and not word and depth == 0:
            break
        else:
            word += ch
            quote = ch if ch in "'\"" else ""
            depth += (ch in "[({") - (ch in "])}")
    if quote or depth:
        raise ConfigError(f"unbalanced quotes or brackets in {line.strip()!r}")
    return found + [word] if word else found


def tokens(text: str) -> list[str]:
    """Words of every line, with ``key = value``, ``key: value`` and ``a, b`` glued back."""
    found: list[str] = []
    for line in text.splitlines():
        glued: list[str] = []
        for word in words(line):
            if glued and (glued[-1][-1] in "=:," or word[0] in "=,"):
                glued[-1] += word
            else:
                glued.append(word)
        found += glued
    return found


def options_from_tokens(found: list[str], parse: Callable[[str], Any] = parse_value) -> dict[str, Any]:
    """``key=value`` tokens as a dict of values read by ``parse`` (``eval-every`` is ``eval_every``)."""
    options: dict[str, Any] = {}
    for token in found:
        match = OPTION.fullmatch(token)
        if not match:
            raise ConfigError(f"expected key=value, got {token!r}")
        key, value = match[1].replace("-", "_"), match[2]
        if key in options:
            raise ConfigError(f"option {key!r} is given twice")
        if not value:
            raise ConfigError(f"option {key!r} has no value, e.g. {key}=8")
        options[key] = parse(value)
    return options


def parse_options(text: str, parse: Callable[[str], Any] = parse_value) -> dict[str, Any]:
    """Options from ``key=value`` words or ``key: value`` lines; blank lines and ``#`` comments are skipped.

    >>> parse_options("r=8 targets=q_proj,v_proj\\n# note\\nrslora: true")
    {'r': 8, 'targets': ['q_proj', 'v_proj'], 'rslora': True}
    """
    return options_from_tokens(tokens(text), parse)


def _hidden_names() -> set[str]:
    """IPython's own variables (In, Out, exit...), which are no data of the user's."""
    return set(getattr(notebook_shell(), "user_ns_hidden", {}))


def trainable_data(value: Any) -> bool:
    """Whether ``train()`` accepts ``value`` as data (``data.kind_of``, or preference rows for an objective)."""
    try:
        data.kind_of(value)
    except ConfigError:
        return preferences.form_of(value) is not None
    return True


def data_variables(namespace: dict[str, Any]) -> list[str]:
    """Names of notebook variables that ``train()`` takes as data, in the order they were made."""
    hidden = _hidden_names()
    return [name for name, value in namespace.items()
            if not name.startswith("_") and name not in hidden and trainable_data(value)]


def tokenizer_variables(namespace: dict[str, Any]) -> list[str]:
    """Names of notebook variables that look like tokenizers (they encode text and know their padding)."""
    return [name for name, value in namespace.items()
            if not name.startswith("_") and callable(value) and hasattr(value, "pad_token_id")]


def function_variables(namespace: dict[str, Any]) -> list[str]:
    """Names of notebook variables holding functions (for ``metrics=``, ``loss_fn=``, ``live=``)."""
    hidden = _hidden_names()
    return [name for name, value in namespace.items() if not name.startswith("_") and name not in hidden
            and isinstance(value, (types.FunctionType, functools.partial))]


def names_files(text: str) -> bool:
    """Whether ``text`` is a path that exists or a glob that matches a file: what ``train()`` reads as data."""
    if any(ch in text for ch in "*?["):
        return any(Path(p).is_file() for p in glob.glob(text, recursive=True))
    return Path(text).exists()


def data_or_files(name: str, namespace: dict[str, Any], fix: str, caller: str = "") -> Any:
    """The notebook variable ``name``, else ``name`` itself where it names files (train() reads them).

    Neither: a one-line ConfigError that names both, then ``fix``; ``caller`` starts it (``"train: "``).
    """
    if name in namespace:
        return namespace[name]
    if names_files(name):
        return name
    raise ConfigError(f"{caller}no variable {name!r} in the notebook, nor a file or glob of that name; {fix}")


def name_pairs(text: str, option: str) -> dict[str, str]:
    """``prompt: question, response: answer`` or ``{prompt: question}`` as ``{'prompt': 'question', ...}``."""
    text = text.strip()
    if text[:1] == "{" and text[-1:] == "}":
        value = parse_value(text)
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        text = text[1:-1]
    try:
        return {key: str(value) for key, value in name_values(text).items()}
    except ConfigError:
        raise ConfigError(f"{option}={text!r} must be name: name pairs, e.g. {option}=prompt: question, "
                          "response: answer") from None


def unquoted(text: str) -> str:
    """``'a b'`` -> ``a b``; text without quotes as it is."""
    value = parse_value(text) if text[:1] in "'\"" else text
    return value if isinstance(value, str) else text


def train_value(option: TrainOption, text: str, variable: Callable[[TrainOption, str], Any]) -> Any:
    """``text`` (as typed in a magic or a panel's text box) as ``option``'s value for ``train()``.

    Numbers, true/false/none and choices are read as in ``parse_value``; a path or text stays
    text; ``columns`` reads ``name: name`` pairs; kinds that name notebook objects (data,
    tokenizers, functions, listeners) get what ``variable(option, name)`` finds.
    """
    text = text.strip()
    if option.kind == "mapping":
        return name_pairs(text, option.name)
    if option.kind in ("data", "tokenizer", "function"):
        return variable(option, unquoted(text))
    value = parse_value(text)
    if option.kind in ("path", "text", "bool-or-path"):
        keep = (str, bool) if option.kind == "bool-or-path" else str
        return value if value is None or isinstance(value, keep) else unquoted(text)
    if option.kind == "listener" and isinstance(value, str):
        return variable(option, value)
    return value
