"""IPython magics: a thin text front-end over the Python API.

    %load_ext nbpeft
    %peft_attach lora r=8 targets=q_proj,v_proj
    %peft_summary

Each magic parses its line (and cell body) into the keyword arguments a Python user
would pass, makes one API call and shows the result. Every mistake is one line on
stderr that starts with ``nbpeft:`` (an IPython ``UsageError``, so no traceback, and
"Run all" stops there); the API itself guarantees the model is left untouched.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import re
from pathlib import Path
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.display import display
from torch import nn

import nbpeft

from .io import WEIGHTS_FILE
from .methods.base import get_method, method_options

_WORDS = {"true": True, "false": False, "none": None}
_OPTION = re.compile(r"([A-Za-z_][\w-]*)\s*[=:]\s*(.*)", re.S)
_NAME_LIKE = re.compile(r"[A-Za-z_][\w.]*")
# train() arguments that name notebook variables: they come from --flags, not key=value.
_TRAIN_VARIABLES = ("model", "data", "tokenizer", "eval_data")


def _fail(message: str) -> None:
    raise UsageError(f"nbpeft: {message}")


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
    return text


def _words(line: str) -> list[str]:
    """Split on spaces outside quotes and brackets; ``#`` at the start of a word begins a comment."""
    words, word, depth, quote, escaped = [], "", 0, "", False
    for ch in line:
        if quote:
            word += ch
            quote = "" if ch == quote and not escaped else quote
            escaped = ch == "\\" and not escaped
        elif ch.isspace() and depth == 0:
            if word:
                words.append(word)
            word = ""
        elif ch == "#" and not word and depth == 0:
            break
        else:
            word += ch
            quote = ch if ch in "'\"" else ""
            depth += (ch in "[({") - (ch in "])}")
    if quote or depth:
        _fail(f"unbalanced quotes or brackets in {line.strip()!r}")
    return words + [word] if word else words


def _tokens(text: str) -> list[str]:
    """Words of every line, with ``key = value``, ``key: value`` and ``a, b`` glued back."""
    tokens: list[str] = []
    for line in text.splitlines():
        glued: list[str] = []
        for word in _words(line):
            if glued and (glued[-1][-1] in "=:," or word[0] in "=,"):
                glued[-1] += word
            else:
                glued.append(word)
        tokens += glued
    return tokens


def _options(tokens: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for token in tokens:
        match = _OPTION.fullmatch(token)
        if not match:
            _fail(f"expected key=value, got {token!r}")
        key, value = match[1].replace("-", "_"), match[2]
        if key in options:
            _fail(f"option {key!r} is given twice")
        if not value:
            _fail(f"option {key!r} has no value, e.g. {key}=8")
        options[key] = parse_value(value)
    return options


def parse_options(text: str) -> dict[str, Any]:
    """Options from ``key=value`` words or ``key: value`` lines; blank lines and ``#`` comments are skipped.

    >>> parse_options("r=8 targets=q_proj,v_proj\\n# note\\nrslora: true")
    {'r': 8, 'targets': ['q_proj', 'v_proj'], 'rslora': True}
    """
    return _options(_tokens(text))


def _unquote(word: str) -> str:
    value = parse_value(word) if word[:1] in "'\"" else word
    return value if isinstance(value, str) else word


def _split_line(
    line: str, flags: tuple[str, ...], usage: str, positional: int = 0, options: bool = True
) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """A magic's line as (up to ``positional`` words, --flags, key=value options if ``options``)."""
    words, found, rest = [], {}, []
    tokens = iter(_tokens(line))
    for token in tokens:
        if token.startswith("--"):
            flag, eq, value = token[2:].partition("=")
            if flag not in flags:
                allowed = ", ".join(f"--{f}" for f in flags) or "none"
                _fail(f"unknown flag --{flag} (flags: {allowed}); usage: {usage}")
            value = value if eq else next(tokens, "")
            if not value or value.startswith("--"):
                _fail(f"--{flag} needs a value; usage: {usage}")
            found[flag] = _unquote(value)
        elif _OPTION.fullmatch(token):
            if not options:
                _fail(f"unknown option {token!r}; usage: {usage}")
            rest.append(token)
        else:
            words.append(_unquote(token))
    if len(words) > positional:
        if options:
            _fail(f"expected key=value, got {words[positional]!r}; usage: {usage}")
        _fail(f"unexpected {words[positional]!r}; usage: {usage}")
    return words, found, _options(rest)


def _listify(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``targets=q_proj`` means the module q_proj (a list), not the regex 'q_proj'."""
    types = {key: info["type"] for key, info in method_options(get_method(method).config_class).items()}
    return {
        key: [value] if "list" in types.get(key, "") and isinstance(value, str) and _NAME_LIKE.fullmatch(value) else value
        for key, value in options.items()
    }


def _friendly(magic: Callable) -> Callable:
    """Turn the API's ValueError/ConfigError (and file errors) into one ``nbpeft:`` line."""

    @functools.wraps(magic)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return magic(*args, **kwargs)
        except (ValueError, OSError) as err:
            raise UsageError("nbpeft: " + " ".join(str(err).splitlines())) from None

    return run


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1024:.1f} KB" if num_bytes < 1024**2 else f"{num_bytes / 1024**2:.1f} MB"


@magics_class
class PeftMagics(Magics):
    """%peft_attach, %peft_summary, %peft_detach, %peft_merge, %peft_unmerge, %peft_save, %peft_load, %%peft_train."""

    def _var(self, name: str, hint: str) -> Any:
        if name not in self.shell.user_ns:
            _fail(f"no variable {name!r} in the notebook; {hint}")
        return self.shell.user_ns[name]

    def _model(self, name: str | None) -> nn.Module:
        hint = 'load one with  model, tokenizer = nbpeft.load_model("smollm2-135m")  or pass --model NAME'
        model = self._var(name or "model", hint)
        if not isinstance(model, nn.Module):
            _fail(f"{name or 'model'!r} holds a {type(model).__name__}, not a torch model; pass --model NAME")
        return model

    @line_cell_magic
    @_friendly
    def peft_attach(self, line: str, cell: str | None = None) -> None:
        """Attach an adapter:  %peft_attach METHOD key=value ... [--model VAR] [--name NAME]

        The cell form takes further options in its body, one ``key: value`` or
        ``key=value`` per line (``#`` comments allowed)::

            %%peft_attach lora r=8
            alpha: 32
            targets: q_proj, v_proj

        Values are Python literals where possible, else strings; ``a,b`` is a list.
        Same as ``nbpeft.attach(model, METHOD, name=NAME, **options)``.
        """
        usage = "%peft_attach METHOD key=value ... [--model VAR] [--name NAME]"
        words, flags, options = _split_line(line, ("model", "name"), usage, positional=1)
        if not words:
            _fail(f"which method? one of {', '.join(m.name for m in nbpeft.methods())}; usage: {usage}")
        for key, value in parse_options(cell or "").items():
            if key in options:
                _fail(f"option {key!r} is given twice")
            options[key] = value
        if "name" in flags:
            options["name"] = flags["name"]
        display(nbpeft.attach(self._model(flags.get("model")), words[0], **_listify(words[0], options)))

    @line_magic
    @_friendly
    def peft_summary(self, line: str) -> None:
        """Parameter counts per adapter:  %peft_summary [VAR]   (default VAR: model)"""
        words, flags, _ = _split_line(line, ("model",), "%peft_summary [VAR]", positional=1, options=False)
        display(nbpeft.summary(self._model(words[0] if words else flags.get("model"))))

    def _apply(self, line: str, magic: str, fn: Callable, verb: str, default: Callable) -> None:
        """Shared body of detach/merge/unmerge: ``default(row)`` picks the adapters a bare call acts on."""
        _, flags, _ = _split_line(line, ("model", "name"), f"%{magic} [--name NAME] [--model VAR]", options=False)
        model = self._model(flags.get("model"))
        name = flags.get("name")
        names = [name] if name else [row.name for row in nbpeft.summary(model).adapters if default(row)]
        fn(model, name)
        print(f"{verb} {', '.join(repr(n) for n in names) or 'nothing'}")

    @line_magic
    @_friendly
    def peft_detach(self, line: str) -> None:
        """Remove an adapter (default: all):  %peft_detach [--name NAME] [--model VAR]"""
        self._apply(line, "peft_detach", nbpeft.detach, "detached", lambda row: True)

    @line_magic
    @_friendly
    def peft_merge(self, line: str) -> None:
        """Fold an adapter into the base weights (default: the active ones):  %peft_merge [--name NAME] [--model VAR]"""
        self._apply(line, "peft_merge", nbpeft.merge, "merged", lambda row: row.active)

    @line_magic
    @_friendly
    def peft_unmerge(self, line: str) -> None:
        """Undo %peft_merge (default: every merged adapter):  %peft_unmerge [--name NAME] [--model VAR]"""
        self._apply(line, "peft_unmerge", nbpeft.unmerge, "unmerged", lambda row: row.merged)

    @line_magic
    @_friendly
    def peft_save(self, line: str) -> None:
        """Save adapters in the PEFT format:  %peft_save PATH [--name NAME] [--model VAR]"""
        usage = "%peft_save PATH [--name NAME] [--model VAR]"
        words, flags, _ = _split_line(line, ("model", "name"), usage, positional=1, options=False)
        if not words:
            _fail(f"where to? usage: {usage}")
        for folder in nbpeft.save_adapter(self._model(flags.get("model")), words[0], name=flags.get("name")):
            print(f"saved {folder}/ ({WEIGHTS_FILE}: {_size((Path(folder) / WEIGHTS_FILE).stat().st_size)})")

    @line_magic
    @_friendly
    def peft_load(self, line: str) -> None:
        """Load saved adapters onto the model:  %peft_load PATH [--name NAME] [--model VAR]"""
        usage = "%peft_load PATH [--name NAME] [--model VAR]"
        words, flags, _ = _split_line(line, ("model", "name"), usage, positional=1, options=False)
        if not words:
            _fail(f"from where? usage: {usage}")
        for adapter in nbpeft.load_adapter(self._model(flags.get("model")), words[0], name=flags.get("name")):
            display(adapter)

    @line_cell_magic
    @_friendly
    def peft_train(self, line: str, cell: str | None = None) -> None:
        """Train the active adapters:  %%peft_train [--model VAR] [--data VAR] [--eval-data VAR] [--tokenizer VAR] [--out VAR] key=value ...

        The body holds further options, one per line. Same as
        ``VAR = nbpeft.train(model, data, tokenizer=tokenizer, **options)`` with VAR
        ``_peft_result`` unless --out names another; ``tokenizer`` is used when it exists.
        """
        usage = "%%peft_train [--model VAR] [--data VAR] [--eval-data VAR] [--tokenizer VAR] [--out VAR] key=value ..."
        _, flags, options = _split_line(line, ("model", "data", "eval-data", "tokenizer", "out"), usage)
        for key, value in parse_options(cell or "").items():
            if key in options:
                _fail(f"option {key!r} is given twice")
            options[key] = value
        train = getattr(nbpeft, "train", None)
        if train is None:
            _fail("this nbpeft has no train()")
        allowed = [p for p in inspect.signature(train).parameters if p not in _TRAIN_VARIABLES]
        for key in options:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                _fail(f"train: unknown option {key!r}{hint}; options are {', '.join(allowed)}")
        out = flags.get("out", "_peft_result")
        if not out.isidentifier():
            _fail(f"--out {out!r} must be a variable name")
        model = self._model(flags.get("model"))
        data = self._var(flags.get("data", "data"), "make a list of examples or pass --data NAME")
        if "tokenizer" in flags:
            options["tokenizer"] = self._var(flags["tokenizer"], "pass --tokenizer NAME")
        else:
            options["tokenizer"] = self.shell.user_ns.get("tokenizer")
        if "eval-data" in flags:
            options["eval_data"] = self._var(flags["eval-data"], "pass --eval-data NAME")
        self.shell.user_ns[out] = train(model, data, **options)
        print(f"result in {out}")


def _attach_help() -> str:
    lines = ["", "Methods and their options (key=default (type): help):"]
    for info in nbpeft.methods():
        lines += ["", f"{info.name}: {info.description}"]
        for key, opt in info.options.items():
            choices = f"; one of {', '.join(map(repr, opt['choices']))}" if "choices" in opt else ""
            lines.append(f"    {key}={opt['default']!r} ({opt['type']}): {opt['help']}{choices}")
    return "\n".join(lines)


def _train_help() -> str:
    train = getattr(nbpeft, "train", None)
    if train is None:
        return ""
    params = inspect.signature(train).parameters.values()
    return "\n\nOptions (key=default): " + ", ".join(
        f"{p.name}={p.default!r}" for p in params if p.name not in _TRAIN_VARIABLES
    )


_ATTACH_DOC = inspect.cleandoc(PeftMagics.peft_attach.__doc__)
_TRAIN_DOC = inspect.cleandoc(PeftMagics.peft_train.__doc__)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbpeft``: register the magics, with help built from the method registry."""
    PeftMagics.peft_attach.__doc__ = _ATTACH_DOC + _attach_help()
    PeftMagics.peft_train.__doc__ = _TRAIN_DOC + _train_help()
    ipython.register_magics(PeftMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbpeft``: IPython has no public unregister, so remove ours from its tables."""
    manager = ipython.magics_manager
    ours = manager.registry.pop(PeftMagics.__name__, None)
    for kind, table in manager.magics.items():
        for name in list(table):
            if getattr(table[name], "__self__", None) is ours and ours is not None:
                del table[name]
