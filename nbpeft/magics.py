"""IPython magics: a thin text front-end over the Python API.

    %load_ext nbpeft
    %peft_methods
    %peft_attach lora r=8 targets=q_proj,v_proj
    %peft_summary
    %peft_panel

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.display import display
from torch import nn

import nbpeft

from .io import WEIGHTS_FILE
from .methods.base import get_method, method_options

_WORDS = {"true": True, "false": False, "none": None}
_OPTION = re.compile(r"([A-Za-z_][\w-]*)\s*[=:]\s*(.*)", re.DOTALL)
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
    """%peft_methods, %peft_attach, %peft_summary, %peft_use, %peft_detach, %peft_merge, %peft_unmerge,
    %peft_save, %peft_load, %%peft_train, %peft_compare, %peft_panel."""

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

    @line_magic
    @_friendly
    def peft_methods(self, line: str) -> None:
        """The PEFT methods and their options:  %peft_methods [METHOD]

        Same as ``nbpeft.methods()``, shown as a table; with METHOD, that method's
        options with their defaults, types and help.
        """
        usage = "%peft_methods [METHOD]"
        words, _, _ = _split_line(line, (), usage, positional=1, options=False)
        if words:
            get_method(words[0])  # unknown names fail with a did-you-mean hint
        display(MethodTable([info for info in nbpeft.methods() if not words or info.name == words[0]], detail=bool(words)))

    @line_magic
    @_friendly
    def peft_use(self, line: str) -> None:
        """Make adapters active (used in forward and trained):  %peft_use NAME[,NAME...] [--model VAR]

        Same as ``nbpeft.set_adapter(model, NAME)``; several names activate several adapters.
        """
        usage = "%peft_use NAME[,NAME...] [--model VAR]"
        words, flags, _ = _split_line(line, ("model",), usage, positional=1, options=False)
        model = self._model(flags.get("model"))
        if not words:
            attached = ", ".join(row.name for row in nbpeft.summary(model).adapters) or "none"
            _fail(f"which adapter? attached: {attached}; usage: {usage}")
        names = [n.strip() for n in words[0].split(",") if n.strip()]
        nbpeft.set_adapter(model, names if len(names) > 1 else names[0])
        print(f"active: {', '.join(repr(n) for n in names)}")

    @line_magic
    @_friendly
    def peft_compare(self, line: str) -> None:
        """Compare methods on one model:  %peft_compare [methods=a,b] [METHOD={'key': value}] ... [--model VAR] [--out VAR]

        Same as ``VAR = nbpeft.compare(model, methods=[...], lora={'r': 16})`` with VAR
        ``_peft_compare`` unless --out names another: the trainable parameters of each
        method, side by side, without touching the model.
        """
        usage = "%peft_compare [methods=a,b] [METHOD={'key': value}] ... [--model VAR] [--out VAR]"
        compare = getattr(nbpeft, "compare", None)
        if compare is None:
            _fail("this nbpeft has no compare(); upgrade nbpeft to compare methods")
        _, flags, options = _split_line(line, ("model", "out"), usage)
        out = flags.get("out", "_peft_compare")
        if not out.isidentifier():
            _fail(f"--out {out!r} must be a variable name")
        if isinstance(options.get("methods"), str):
            options["methods"] = [options["methods"]]
        model = self._model(flags.get("model"))
        try:
            table = compare(model, **options)
        except TypeError as err:
            _fail(f"compare: {err}; usage: {usage}")
        self.shell.user_ns[out] = table
        display(table)

    @line_magic
    @_friendly
    def peft_panel(self, line: str) -> None:
        """Attach, train and manage adapters in a panel:  %peft_panel [VAR] [--tokenizer VAR]

        Same as ``_peft_panel = nbpeft.panel(model, tokenizer)``; the panel stays in
        ``_peft_panel`` so cells can drive it.
        """
        usage = "%peft_panel [VAR] [--tokenizer VAR]"
        words, flags, _ = _split_line(line, ("model", "tokenizer"), usage, positional=1, options=False)
        model = self._model(words[0] if words else flags.get("model"))
        if "tokenizer" in flags:
            tokenizer = self._var(flags["tokenizer"], "pass --tokenizer NAME")
        else:
            tokenizer = self.shell.user_ns.get("tokenizer")
        panel = nbpeft.panel(model, tokenizer, namespace=self.shell.user_ns)
        self.shell.user_ns["_peft_panel"] = panel
        display(panel)


class MethodTable:
    """``nbpeft.methods()`` as a table: one row per method, or one per option with ``detail``."""

    def __init__(self, infos: list[Any], detail: bool = False) -> None:
        self.infos, self.detail = infos, detail

    def _rows(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        if self.detail:
            head = ("method", "option", "default", "type", "help")
            return head, [
                (info.name, key, repr(opt["default"]), opt["type"],
                 opt["help"] + (f" (one of {', '.join(map(repr, opt['choices']))})" if "choices" in opt else ""))
                for info in self.infos for key, opt in info.options.items()
            ]
        head = ("method", "description", "options (default)")
        return head, [
            (info.name, info.description, ", ".join(f"{k}={v['default']!r}" for k, v in info.options.items()))
            for info in self.infos
        ]

    def __repr__(self) -> str:
        _, rows = self._rows()
        if self.detail:
            return "\n".join(f"{r[0]} {r[1]}={r[2]} ({r[3]}): {r[4]}" for r in rows)
        width = max([len(r[0]) for r in rows] + [6])
        return "\n".join(f"{r[0]:<{width}}  {r[1]}\n{'':<{width}}  options: {r[2]}" for r in rows)

    def _repr_html_(self) -> str:
        import html

        head, rows = self._rows()
        cells = "".join(f"<th>{h}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{cells}</tr>{body}</table>"


def _attach_help() -> str:
    lines = ["", "Methods and their options (key=default (type): help):"]
    for info in nbpeft.methods():
        lines += ["", f"{info.name}: {info.description}"]
        for key, opt in info.options.items():
            choices = f"; one of {', '.join(map(repr, opt['choices']))}" if "choices" in opt else ""
            lines.append(f"    {key}={opt['default']!r} ({opt['type']}): {opt['help']}{choices}")
    return "\n".join(lines)


def _signature_help(fn: Callable | None, skip: tuple[str, ...]) -> str:
    if fn is None:
        return ""
    params = inspect.signature(fn).parameters.values()
    shown = [p for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return "\n\nOptions (key=default): " + ", ".join(
        f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in shown
    )


def _train_help() -> str:
    return _signature_help(getattr(nbpeft, "train", None), _TRAIN_VARIABLES)


def _compare_help() -> str:
    compare = getattr(nbpeft, "compare", None)
    if compare is None:
        return "\n\nThis nbpeft has no compare()."
    names = [m.name for m in nbpeft.methods()]
    return _signature_help(compare, ("model",)) + (
        "\nMETHOD={'key': value} sets that method's options, with METHOD one of " + ", ".join(names)
    )


# Completion: the words each magic takes, for the notebook's Tab key. ----------------------

_FLAGS = {
    "peft_methods": (), "peft_attach": ("--model", "--name"), "peft_summary": ("--model",), "peft_use": ("--model",),
    "peft_detach": ("--model", "--name"), "peft_merge": ("--model", "--name"), "peft_unmerge": ("--model", "--name"),
    "peft_save": ("--model", "--name"), "peft_load": ("--model", "--name"), "peft_panel": ("--tokenizer",),
    "peft_train": ("--model", "--data", "--eval-data", "--tokenizer", "--out"),
    "peft_compare": ("--model", "--out"),
}
_MAGIC_LINE = re.compile(r"\s*%%?(peft_\w+)(.*)", re.DOTALL)


def _option_keys(magic: str, method: str | None) -> dict[str, dict[str, Any]]:
    """Option keys a magic takes as key=value, with their info (choices, type)."""
    if magic == "peft_attach" and method:
        try:
            return method_options(get_method(method).config_class)
        except ValueError:
            return {}
    fn = getattr(nbpeft, {"peft_train": "train", "peft_compare": "compare"}.get(magic, ""), None)
    if fn is None:
        return {}
    skip = ("model",) + _TRAIN_VARIABLES[1:] + (("live",) if magic == "peft_train" else ())
    params = inspect.signature(fn).parameters.values()
    keys = {p.name: {"type": "bool" if isinstance(p.default, bool) else ""} for p in params
            if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if magic == "peft_compare":
        keys.setdefault("methods", {"type": "list"})
        keys.update({m.name: {"type": "dict"} for m in nbpeft.methods()})
    return keys


def _variables(shell: Any, kind: str) -> list[str]:
    names = [n for n in shell.user_ns if not n.startswith("_") and n not in shell.user_ns_hidden]
    if kind == "model":
        return [n for n in names if isinstance(shell.user_ns[n], nn.Module)]
    if kind in ("data", "eval-data"):
        from .widgets.training import data_variables

        return data_variables(shell.user_ns)
    return names


def _adapter_names(shell: Any, flags: dict[str, str]) -> list[str]:
    model = shell.user_ns.get(flags.get("model", "model"))
    return [row.name for row in nbpeft.summary(model).adapters] if isinstance(model, nn.Module) else []


def completions(shell: Any, text: str) -> tuple[str, list[str]]:
    """(the word being typed, its completions) for the text of a cell up to the cursor."""
    found = _MAGIC_LINE.fullmatch(text)
    if not found or found[1] not in _FLAGS:
        return "", []
    magic, rest = found[1], found[2]
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
            previous = "" if "=" in word else word
        elif "=" not in word and ":" not in word:
            positional.append(word)
    if previous:  # the value of a --flag
        kind = previous[2:]
        names = {"name": _adapter_names(shell, flags), "out": []}.get(kind) or _variables(shell, kind)
        return typed, [n for n in names if n.startswith(typed)]
    method = positional[0] if positional else None
    if typed.startswith("-"):
        return typed, [f for f in _FLAGS[magic] if f.startswith(typed)]
    if magic in ("peft_attach", "peft_methods") and not positional and "=" not in typed:
        return typed, [m.name for m in nbpeft.methods() if m.name.startswith(typed)]
    if magic in ("peft_summary", "peft_panel") and not positional:
        return typed, [n for n in _variables(shell, "model") if n.startswith(typed)]
    if magic == "peft_use" and not positional:
        head, _, last = typed.rpartition(",")
        prefix = head + "," if head else ""
        chosen = head.split(",")
        return typed, [prefix + n for n in _adapter_names(shell, flags) if n.startswith(last) and n not in chosen]
    keys = _option_keys(magic, method)
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
        f for f in _FLAGS[magic] if f.startswith(typed) and typed
    ]


def _matcher(shell: Any) -> Callable:
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


_ATTACH_DOC = inspect.cleandoc(PeftMagics.peft_attach.__doc__)
_TRAIN_DOC = inspect.cleandoc(PeftMagics.peft_train.__doc__)
_COMPARE_DOC = inspect.cleandoc(PeftMagics.peft_compare.__doc__)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbpeft``: register the magics (help built from the registry) and Tab completion."""
    PeftMagics.peft_attach.__doc__ = _ATTACH_DOC + _attach_help()
    PeftMagics.peft_train.__doc__ = _TRAIN_DOC + _train_help()
    PeftMagics.peft_compare.__doc__ = _COMPARE_DOC + _compare_help()
    ipython.register_magics(PeftMagics)
    completer = getattr(ipython, "Completer", None)
    if completer is not None:
        completer.custom_matchers[:] = [m for m in completer.custom_matchers if not _is_ours(m)]
        completer.custom_matchers.append(_matcher(ipython))


def _is_ours(matcher: Any) -> bool:
    return getattr(matcher, "matcher_identifier", None) == "nbpeft"


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbpeft``: IPython has no public unregister, so remove ours from its tables."""
    manager = ipython.magics_manager
    ours = manager.registry.pop(PeftMagics.__name__, None)
    for table in manager.magics.values():
        for name in list(table):
            if getattr(table[name], "__self__", None) is ours and ours is not None:
                del table[name]
    completer = getattr(ipython, "Completer", None)
    if completer is not None:
        completer.custom_matchers[:] = [m for m in completer.custom_matchers if not _is_ours(m)]
