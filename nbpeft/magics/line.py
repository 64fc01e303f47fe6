"""A magic's line: positional words, ``--flags`` and ``key=value`` options, and its errors.

Every magic's usage line is written once in ``USAGE`` (``%%peft_train``'s is built from the
declared train options when asked, see :func:`usage`); the flags a magic takes are read
from it, so ``%magic?``, the parser, the error wording and Tab completion cannot disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from ..frontend import OPTION, one_line, options_from_tokens, parse_value, tokens
from ..training import options as train_options

USAGE = {
    "peft_methods": "%peft_methods [METHOD]",
    "peft_attach": "%peft_attach METHOD key=value ... [--model VAR] [--name NAME] [--replace]",
    "peft_summary": "%peft_summary [VAR] [--model VAR]",
    "peft_use": "%peft_use NAME[,NAME...] [--model VAR]",
    "peft_detach": "%peft_detach [NAME] [--model VAR]",
    "peft_merge": "%peft_merge [NAME] [--model VAR]",
    "peft_unmerge": "%peft_unmerge [NAME] [--model VAR]",
    "peft_save": "%peft_save PATH [--name NAME] [--model VAR] [--overwrite]",
    "peft_load": "%peft_load PATH [--name NAME] [--model VAR]",
    "peft_release": "%peft_release [VAR] [--model VAR]",
    "peft_compare": "%peft_compare [methods=a,b] [METHOD={'key': value}] ... [--model VAR] [--out VAR]",
    "peft_panel": "%peft_panel [VAR] [--model VAR] [--tokenizer VAR]",
    "peft_generate": "%peft_generate [TEXT | --prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-p P] "
                     "[--seed N] [--stop TEXT] [--model VAR] [--tokenizer VAR]",
    "peft_compare_answers": "%peft_compare_answers [NAME ...] --prompt TEXT [--max-new-tokens N] [--temperature T] "
                            "[--top-p P] [--seed N] [--stop TEXT] [--no-base] [--model VAR] [--tokenizer VAR] [--out VAR]"
                            " (the words are adapter NAMEs: the prompt goes after --prompt or in the cell)",
    "peft_export": "%peft_export FORMAT PATH [--dtype D] [--quant Q] [--model VAR] [--tokenizer VAR] [--overwrite]"
                   "  or  %peft_export check TARGET [FOLDER]",
    "peft_to_lora": "%peft_to_lora [NAME] [--rank R] [--name NAME] [--model VAR]",
    "peft_export_job": "%peft_export_job DIR [--model VAR] [--data VAR] [--tokenizer VAR] [--overwrite] key=value ...",
    "peft_show_example": "%peft_show_example [I] [--data VAR] [--model VAR] [--tokenizer VAR] [max_length=N] [columns=...]",
    "peft_combine": "%peft_combine NAME=WEIGHT ... --name NAME [--how HOW] [--density D] [--majority-sign-method M] "
                    "[--rank R] [--seed N] [--model VAR]",
    "peft_bakeoff": "%%peft_bakeoff METHOD={'key': value} ... [methods=a,b] [--model VAR] [--data VAR] [--eval-data VAR] "
                    "[--tokenizer VAR] [--out VAR] key=value ...",
    "peft_runs": "%peft_runs [ID ...] [--plot] [--out VAR] [model=M] [method=M] [since=DATE] [until=DATE] [status=S]",
}
# --flags that take no value (a switch); every other flag takes one. A train option of kind bool that is a flag is one too.
SWITCHES = ("overwrite", "no-base", "plot", "replace")
FLAGS = {magic: tuple(dict.fromkeys(re.findall(r"--([\w-]+)", usage))) for magic, usage in USAGE.items()}
# what a train option's --flag takes, by the option's kind (a bool is a switch)
METAVARS = {"data": "VAR|PATH", "tokenizer": "VAR", "function": "VAR", "int": "N", "float": "X",
            "int-or-auto": "N|auto", "choice": "CHOICE", "path": "PATH", "text": "TEXT"}
MAGICS = (*USAGE, "peft_train")
# the API's words for what a magic takes positionally or as a switch, most specific first
WORDINGS = {
    "peft_compare_answers": {"keep include_base=True": "leave out --no-base"},
    "peft_export": {"export format='merged'": "%peft_export merged PATH", "export format='gguf'": "%peft_export gguf PATH",
                    "format='gguf-adapter'": "gguf-adapter", "format=": "FORMAT ", "target=": "TARGET "},
    "peft_to_lora": {"nbpeft.unmerge(model) first": "%peft_unmerge first"},
    "peft_show_example": {"i=": "I="},
}


def usage(magic: str) -> str:
    """``magic``'s usage line; ``%%peft_train``'s names each declared train option that is a --flag."""
    if magic != "peft_train":
        return USAGE[magic]
    declared = " ".join(f"[{o.flag_name}]" if o.kind == "bool" else f"[{o.flag_name} {METAVARS.get(o.kind, 'VALUE')}]"
                        for o in train_options.OPTIONS if o.flag)
    return f"%%peft_train [--model VAR] [--out VAR] {declared} key=value ..."


def flags(magic: str) -> tuple[str, ...]:
    """The --flags of ``magic``, without their dashes, in usage order."""
    return FLAGS[magic] if magic in FLAGS else tuple(dict.fromkeys(re.findall(r"--([\w-]+)", usage(magic))))


def switches(magic: str) -> tuple[str, ...]:
    """``magic``'s flags that take no value."""
    if magic != "peft_train":
        return SWITCHES
    return tuple(o.flag_name[2:] for o in train_options.OPTIONS if o.flag and o.kind == "bool")


def fail(message: str) -> None:
    raise UsageError(f"nbpeft: {message}")


def unquote(word: str) -> str:
    value = parse_value(word) if word[:1] in "'\"" else word
    return value if isinstance(value, str) else word


def split_line(
    line: str, magic: str, positional: int | None = 0, options: bool = True, parse: Callable[[str], Any] = parse_value
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """``magic``'s line as (up to ``positional`` words, any number if None; --flags; key=value options if ``options``).

    A switch flag reads as True; any other flag takes the next word (or ``--flag=value``).
    ``parse`` reads each option's value text (``str`` keeps the text as typed).
    """
    usage_line, magic_flags, magic_switches = usage(magic), flags(magic), switches(magic)
    found_words, found, rest = [], {}, []
    line_tokens = iter(tokens(line))
    for token in line_tokens:
        if token.startswith("--"):
            flag, eq, value = token[2:].partition("=")
            if flag not in magic_flags:
                allowed = ", ".join(f"--{f}" for f in magic_flags) or "none"
                fail(f"unknown flag --{flag} (flags: {allowed}); usage: {usage_line}")
            if flag in magic_switches:
                if eq:
                    fail(f"--{flag} takes no value; usage: {usage_line}")
                found[flag] = True
                continue
            value = value if eq else next(line_tokens, "")
            if not value or value.startswith("--"):
                fail(f"--{flag} needs a value; usage: {usage_line}")
            found[flag] = unquote(value)
        elif OPTION.fullmatch(token):
            if not options:
                fail(f"unknown option {token!r}; usage: {usage_line}")
            rest.append(token)
        else:
            found_words.append(unquote(token))
    if positional is not None and len(found_words) > positional:
        if options:
            fail(f"expected key=value, got {found_words[positional]!r}; usage: {usage_line}")
        fail(f"unexpected {found_words[positional]!r}; usage: {usage_line}")
    return found_words, found, options_from_tokens(rest, parse)


# A --flag word of a free-text line, with its =value if any; and a quoted span of prompt text, which
# may hold flag-like words. Quotes count only at a word's edges, so "What's" opens no quote.
_FLAG_WORD = re.compile(r"(?<!\S)--[A-Za-z][\w-]*(?:=(?:\"[^\"]*\"|'[^']*'|\S*))?(?!\S)")
_QUOTED = re.compile(r"(?<!\S)([\"'])(?:(?!\1).)*\1(?!\S)")
_VALUE = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|\S+)")


def split_prompt_line(line: str, magic: str) -> tuple[str | None, dict[str, Any]]:
    """``magic``'s line as (its prompt text or None, --flags): the words that are neither flags nor a flag's value.

    ``What is 2+2? --seed 1`` is the prompt ``What is 2+2?``; a prompt in quotes (``'say --hi'``)
    is taken as it is written inside them.
    """
    masked = _QUOTED.sub(lambda found: "x" * len(found[0]), line)
    flag_text, prompt, at = [], [], 0
    for found in _FLAG_WORD.finditer(masked):
        if found.start() < at:  # inside the value of the flag before
            continue
        prompt.append(line[at:found.start()])
        end = found.end()
        if "=" not in found[0] and found[0][2:] not in SWITCHES and (value := _VALUE.match(line, end)):
            end = value.end()
        flag_text.append(line[found.start():end])
        at = end
    prompt.append(line[at:])
    _, flags, _ = split_line(" ".join(flag_text), magic, options=False)
    text = " ".join(part.strip() for part in prompt if part.strip())
    if _QUOTED.fullmatch(text):
        text = unquote(text)
    return text or None, flags


def spellings(magic: str) -> dict[str, str]:
    """The API's ``keyword=`` spelling of each of ``magic``'s flags, mapped to the flag.

    ``pick another name= or detach it first`` reads ``pick another --name or detach it
    first`` in ``%peft_attach``, whose adapter name is the ``--name`` flag. ``WORDINGS``
    adds a magic's positional words (``format=`` is ``FORMAT`` in ``%peft_export``).
    """
    found = dict(WORDINGS.get(magic, {}))
    magic_switches = switches(magic)
    for flag in flags(magic):
        keyword = flag.replace("-", "_")
        switch = flag in magic_switches
        found[f"{keyword}=True" if switch else f"{keyword}="] = f"--{flag}" if switch else f"--{flag} "
    return found


def usage_errors(magic: Callable) -> Callable:
    """Turn the API's ValueError/ConfigError (and file errors) into one ``nbpeft:`` line, in magic syntax."""

    @functools.wraps(magic)
    def run(self: Any, line: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return magic(self, line, *args, **kwargs)
        except (ValueError, OSError) as err:
            raise UsageError("nbpeft: " + one_line(err, spellings(magic.__name__))) from None

    return run
