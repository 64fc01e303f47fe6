"""The magics: each parses its line (and cell body) into the keyword arguments a Python user
would pass, makes one API call and shows the result."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.display import display
from torch import nn

import nbpeft

from ..data.batches import MissingTokenizer
from ..formats.export import FORMATS, TARGETS
from ..formats.peft_folder import WEIGHTS_FILE
from ..frontend import data_or_files, option_value, parse_options, parse_value, train_value
from ..methods.base import get_method, method_options
from ..training import options as train_options
from ..training.jobs import not_exported
from .help import train_help
from .line import USAGE, fail, split_line, split_prompt_line, usage, usage_errors
from .tables import MethodTable

# flags that are generate()'s options of the same name (--top-p is top_p=); --stop stays text
GENERATION_FLAGS = ("max-new-tokens", "temperature", "top-p", "seed", "stop")
# show_example() arguments that come from the line's I and --flags, not key=value
SHOW_VARIABLES = ("data", "tokenizer", "i", "model")


def module_lists(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``targets=q_proj`` means the module q_proj (a list of one), as in the panel's fields."""
    infos = method_options(get_method(method).config_class)
    return {key: option_value(value, infos.get(key, {})) for key, value in options.items()}


def merged_options(options: dict[str, Any], cell: str | None, parse: Callable[[str], Any] = parse_value) -> dict[str, Any]:
    """The line's options plus the cell body's, each key given once (values read by ``parse``)."""
    for key, value in parse_options(cell or "", parse).items():
        if key in options:
            fail(f"option {key!r} is given twice")
        options[key] = value
    return options


def size_text(num_bytes: int) -> str:
    return f"{num_bytes / 1024:.1f} KB" if num_bytes < 1024**2 else f"{num_bytes / 1024**2:.1f} MB"


def active_names(model: nn.Module) -> list[str]:
    return [row.name for row in nbpeft.summary(model).adapters if row.active]


def generation_options(flags: dict[str, Any]) -> dict[str, Any]:
    """The generation flags as generate()'s keywords: ``--top-p 0.9`` is ``top_p=0.9``."""
    return {flag.replace("-", "_"): value if flag == "stop" else parse_value(value)
            for flag, value in flags.items() if flag in GENERATION_FLAGS}


def unknown_option(caller: str, key: str, allowed: list[str]) -> None:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    fail(f"{caller}: unknown option {key!r}{hint}; options are {', '.join(allowed)}")


def train_texts(flags: dict[str, Any], texts: dict[str, str]) -> dict[str, str]:
    """The declared options' texts from key=value and from their --flags (``--batch-size 4`` is ``batch_size=4``,
    the switch ``--shard`` is ``shard=true``); each said once. A required option not given names the notebook
    variable of its name (``data``)."""
    known = train_options.by_name()
    for key in texts:
        if key not in known:
            unknown_option("train", key, list(known))
    for option in train_options.OPTIONS:
        flag = option.flag_name[2:]
        if option.flag and flag in flags:
            if option.name in texts:
                fail(f"{option.flag_name} and {option.name}= say the same; give one of them")
            texts[option.name] = "true" if option.kind == "bool" else flags[flag]
        elif option.required and option.name not in texts:
            texts[option.name] = option.name
    return texts


def prompts_of(magic: str, flags: dict[str, Any], cell: str | None, text: str | None = None) -> list[str]:
    """The prompt given as the line's TEXT (``%peft_generate`` only), ``--prompt TEXT``, or the cell
    body's lines (one prompt each, blank lines skipped): exactly one of them."""
    body = [line.strip() for line in (cell or "").splitlines() if line.strip()]
    given = [what for what, there in (("TEXT", text), ("--prompt", "prompt" in flags), ("the cell body", body)) if there]
    if len(given) > 1:
        fail(f"give the prompts either with {given[0]} or {given[1]}, not both; usage: {USAGE[magic]}")
    if not given:
        line_text = "TEXT, --prompt TEXT" if magic == "peft_generate" else "--prompt TEXT"
        fail(f"which prompt? give {line_text}, or one prompt per line in a %%{magic} cell; usage: {USAGE[magic]}")
    return [text] if text else [flags["prompt"]] if "prompt" in flags else body


@magics_class
class PeftMagics(Magics):
    """%peft_methods, %peft_attach, %peft_summary, %peft_use, %peft_detach, %peft_merge, %peft_unmerge,
    %peft_save, %peft_load, %%peft_train, %peft_compare, %peft_panel, %peft_generate,
    %peft_compare_answers, %peft_export, %peft_to_lora, %peft_show_example, %peft_release,
    %peft_export_job, %peft_combine, %peft_runs, %%peft_bakeoff."""

    def _var(self, name: str, hint: str) -> Any:
        if name not in self.shell.user_ns:
            fail(f"no variable {name!r} in the notebook; {hint}")
        return self.shell.user_ns[name]

    def _model(self, name: str | None) -> nn.Module:
        hint = 'load one with  model, tokenizer = nbpeft.load_model("smollm2-135m")  or pass --model NAME'
        model = self._var(name or "model", hint)
        if not isinstance(model, nn.Module):
            fail(f"{name or 'model'!r} holds a {type(model).__name__}, not a torch model; pass --model NAME")
        return model

    def _options(self, fn: Callable, options: dict[str, Any], skip: tuple[str, ...]) -> None:
        """Fail on a key=value that ``fn`` does not take, with a did-you-mean."""
        allowed = [p for p in inspect.signature(fn).parameters if p not in skip]
        for key in options:
            if key not in allowed:
                unknown_option(fn.__name__, key, allowed)

    def _tokenizer(self, flags: dict[str, Any]) -> Any:
        """``--tokenizer VAR``, else the notebook's ``tokenizer`` if there is one (else None: the API looks further)."""
        if "tokenizer" in flags:
            return self._var(flags["tokenizer"], "pass --tokenizer NAME")
        return self.shell.user_ns.get("tokenizer")

    @line_cell_magic
    @usage_errors
    def peft_attach(self, line: str, cell: str | None = None) -> None:
        """Attach an adapter:  %peft_attach METHOD key=value ... [--model VAR] [--name NAME] [--replace]

        The cell form takes further options in its body, one ``key: value`` or
        ``key=value`` per line (``#`` comments allowed)::

            %%peft_attach lora r=8
            alpha: 32
            targets: q_proj, v_proj

        Values are Python literals where possible, else strings; ``a,b`` is a list.
        Same as ``nbpeft.attach(model, METHOD, name=NAME, **options)``.
        """
        words, flags, options = split_line(line, "peft_attach", positional=1)
        if not words:
            fail(f"which method? one of {', '.join(m.name for m in nbpeft.methods())}; usage: {USAGE['peft_attach']}")
        options = merged_options(options, cell)
        if "name" in flags:
            options["name"] = flags["name"]
        if flags.get("replace"):
            options["replace"] = True
        display(nbpeft.attach(self._model(flags.get("model")), words[0], **module_lists(words[0], options)))

    @line_magic
    @usage_errors
    def peft_summary(self, line: str) -> None:
        """Parameter counts per adapter (VAR defaults to model):  %peft_summary [VAR] [--model VAR]"""
        words, flags, _ = split_line(line, "peft_summary", positional=1, options=False)
        display(nbpeft.summary(self._model(words[0] if words else flags.get("model"))))

    def _apply(self, line: str, magic: str, fn: Callable, verb: str, default: Callable) -> None:
        """Shared body of detach/merge/unmerge: ``default(row)`` picks the adapters a bare call acts on."""
        words, flags, _ = split_line(line, magic, positional=1, options=False)
        model = self._model(flags.get("model"))
        name = words[0] if words else None
        names = [name] if name else [row.name for row in nbpeft.summary(model).adapters if default(row)]
        fn(model, name)
        print(f"{verb} {', '.join(repr(n) for n in names) or 'nothing'}")

    @line_magic
    @usage_errors
    def peft_detach(self, line: str) -> None:
        """Remove an adapter (default: all):  %peft_detach [NAME] [--model VAR]"""
        self._apply(line, "peft_detach", nbpeft.detach, "detached", lambda row: True)

    @line_magic
    @usage_errors
    def peft_merge(self, line: str) -> None:
        """Fold an adapter into the base weights (default: the active ones):  %peft_merge [NAME] [--model VAR]"""
        self._apply(line, "peft_merge", nbpeft.merge, "merged", lambda row: row.active)

    @line_magic
    @usage_errors
    def peft_unmerge(self, line: str) -> None:
        """Undo %peft_merge (default: every merged adapter):  %peft_unmerge [NAME] [--model VAR]"""
        self._apply(line, "peft_unmerge", nbpeft.unmerge, "unmerged", lambda row: row.merged)

    @line_magic
    @usage_errors
    def peft_save(self, line: str) -> None:
        """Save adapters in the PEFT format:  %peft_save PATH [--name NAME] [--model VAR] [--overwrite]

        An existing adapter folder or file at PATH is replaced only with --overwrite.
        Same as ``nbpeft.save_adapter(model, PATH, name=NAME, overwrite=...)``.
        """
        words, flags, _ = split_line(line, "peft_save", positional=1, options=False)
        if not words:
            fail(f"where to? usage: {USAGE['peft_save']}")
        model = self._model(flags.get("model"))
        for folder in nbpeft.save_adapter(model, words[0], name=flags.get("name"), overwrite=flags.get("overwrite", False)):
            print(f"saved {folder}/ ({WEIGHTS_FILE}: {size_text((Path(folder) / WEIGHTS_FILE).stat().st_size)})")

    @line_magic
    @usage_errors
    def peft_load(self, line: str) -> None:
        """Load saved adapters onto the model:  %peft_load PATH [--name NAME] [--model VAR]

        The loaded adapter becomes the active one (the line says so); ``%peft_use`` switches back.
        """
        words, flags, _ = split_line(line, "peft_load", positional=1, options=False)
        if not words:
            fail(f"from where? usage: {USAGE['peft_load']}")
        if not Path(words[0]).exists():
            fail(f"{words[0]} does not exist; give the folder %peft_save wrote")
        model = self._model(flags.get("model"))
        before = active_names(model)
        for adapter in nbpeft.load_adapter(model, words[0], name=flags.get("name")):
            display(adapter)
        after = active_names(model)
        if after != before:
            back = f" (was {', '.join(map(repr, before))}; %peft_use {','.join(before)} switches back)" if before else ""
            print(f"active: {', '.join(map(repr, after))}{back}")

    def _train_variable(self, option: train_options.TrainOption, name: str) -> Any:
        """The notebook object a train option names; data may also be a file path or glob."""
        if option.kind == "data":
            fix = f"make a list of examples, or pass {option.flag_name} NAME or {option.flag_name} PATH"
            return data_or_files(name, self.shell.user_ns, fix)
        hint = f"pass {option.flag_name} NAME" if option.flag else f"{option.name}= takes {train_options.KINDS[option.kind]}"
        return self._var(name, hint)

    @line_cell_magic
    @usage_errors
    def peft_train(self, line: str, cell: str | None = None) -> None:
        """Train the active adapters.

        Every option of ``train()`` goes as ``key=value`` on the line or one per line in the
        body; the --flags in the usage line say the same as the option of their name
        (``--batch-size auto`` is ``batch_size=auto``, ``--shard`` is ``shard=true``). Same as
        ``VAR = nbpeft.train(model, data, tokenizer=tokenizer, **options)`` with VAR
        ``_peft_result`` unless --out names another; ``tokenizer`` is used when it exists.
        ``data`` (default: the variable ``data``) and ``eval_data`` name a notebook variable or
        a file path or glob; ``tokenizer``, ``metrics`` and ``loss_fn`` name notebook variables;
        ``columns`` takes ``prompt: question, response: answer``.
        """
        _, flags, texts = split_line(line, "peft_train", parse=str)
        texts = train_texts(flags, merged_options(texts, cell, parse=str))
        out = flags.get("out", "_peft_result")
        if not out.isidentifier():
            fail(f"--out {out!r} must be a variable name")
        model = self._model(flags.get("model"))
        known = train_options.by_name()
        options = {name: train_value(known[name], text, self._train_variable) for name, text in texts.items()}
        options.setdefault("tokenizer", self.shell.user_ns.get("tokenizer"))
        self.shell.user_ns[out] = nbpeft.train(model, **options)
        print(f"result in {out}")

    @line_magic
    @usage_errors
    def peft_export_job(self, line: str) -> None:
        """Write a multi-node training job:  %peft_export_job DIR [--model VAR] [--data VAR] [--tokenizer VAR] [--overwrite] key=value ...

        key=value are ``train()``'s options that can travel to other machines (listed below;
        ``batch_size`` per process) and ``nodes=``, ``processes_per_node=``, ``address=``,
        ``port=``. Same as
        ``nbpeft.export_job(model, DIR, data=data, tokenizer=tokenizer, **options)``; DIR/launch.sh
        has the torchrun and accelerate launch command lines.
        """
        words, flags, options = split_line(line, "peft_export_job", positional=1)
        if not words:
            fail(f"where to? usage: {USAGE['peft_export_job']}")
        model = self._model(flags.get("model"))
        data = self._var(flags.get("data", "data"), "make a list of examples or pass --data NAME")
        folder = nbpeft.export_job(model, words[0], data=data, tokenizer=self._tokenizer(flags),
                                   overwrite=flags.get("overwrite", False), **options)
        print(f"wrote {folder}/: train_job.py, job.json, data.jsonl, adapter_init/, accelerate_config.yaml, launch.sh")
        print(f"run on each node:  NODE_RANK=<0, 1, ...> sh {folder}/launch.sh")

    @line_magic
    @usage_errors
    def peft_methods(self, line: str) -> None:
        """The PEFT methods and their options:  %peft_methods [METHOD]

        Same as ``nbpeft.methods()``, shown as a table; with METHOD, that method's
        options with their defaults, types and help.
        """
        words, _, _ = split_line(line, "peft_methods", positional=1, options=False)
        if words:
            get_method(words[0])  # unknown names fail with a did-you-mean hint
        display(MethodTable([info for info in nbpeft.methods() if not words or info.name == words[0]], detail=bool(words)))

    @line_magic
    @usage_errors
    def peft_use(self, line: str) -> None:
        """Make adapters active (used in forward and trained):  %peft_use NAME[,NAME...] [--model VAR]

        Same as ``nbpeft.set_adapter(model, NAME)``; several names activate several adapters.
        """
        words, flags, _ = split_line(line, "peft_use", positional=1, options=False)
        model = self._model(flags.get("model"))
        if not words:
            attached = ", ".join(row.name for row in nbpeft.summary(model).adapters) or "none"
            fail(f"which adapter? attached: {attached}; usage: {USAGE['peft_use']}")
        names = [n.strip() for n in words[0].split(",") if n.strip()]
        nbpeft.set_adapter(model, names if len(names) > 1 else names[0])
        print(f"active: {', '.join(repr(n) for n in names)}")

    @line_magic
    @usage_errors
    def peft_compare(self, line: str) -> None:
        """Compare methods on one model:  %peft_compare [methods=a,b] [METHOD={'key': value}] ... [--model VAR] [--out VAR]

        Same as ``VAR = nbpeft.compare(model, methods=[...], lora={'r': 16})`` with VAR
        ``_peft_compare`` unless --out names another: the trainable parameters of each
        method, side by side, without touching the model.
        """
        _, flags, options = split_line(line, "peft_compare")
        out = flags.get("out", "_peft_compare")
        if not out.isidentifier():
            fail(f"--out {out!r} must be a variable name")
        if isinstance(options.get("methods"), str):
            options["methods"] = [options["methods"]]
        model = self._model(flags.get("model"))
        try:
            table = nbpeft.compare(model, **options)
        except TypeError as err:
            fail(f"compare: {err}; usage: {USAGE['peft_compare']}")
        self.shell.user_ns[out] = table
        display(table)

    @line_magic
    @usage_errors
    def peft_panel(self, line: str) -> None:
        """Attach, train and manage adapters in a panel:  %peft_panel [VAR] [--model VAR] [--tokenizer VAR]

        Same as ``_peft_panel = nbpeft.panel(model, tokenizer)``; the panel stays in
        ``_peft_panel`` so cells can drive it.
        """
        words, flags, _ = split_line(line, "peft_panel", positional=1, options=False)
        model = self._model(words[0] if words else flags.get("model"))
        panel = nbpeft.panel(model, self._tokenizer(flags), namespace=self.shell.user_ns)
        self.shell.user_ns["_peft_panel"] = panel
        display(panel)

    @line_cell_magic
    @usage_errors
    def peft_generate(self, line: str, cell: str | None = None) -> None:
        """Answer prompts with the model as it is now:  %peft_generate [TEXT | --prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed N] [--stop TEXT] [--model VAR] [--tokenizer VAR]

        The prompt is the line's text (``%peft_generate What is 2+2? --seed 1``, quoted or not)
        or ``--prompt TEXT``. The cell form takes one prompt per line of its body::

            %%peft_generate --max-new-tokens 20
            Tell me a joke.
            What is LoRA?

        The answers appear as they are written. Same as ``nbpeft.generate(model, tokenizer,
        prompts, stream=True, ...)``; ``--temperature`` above 0 samples, ``--top-p`` with it.
        """
        text, flags = split_prompt_line(line, "peft_generate")
        prompts = prompts_of("peft_generate", flags, cell, text)
        model = self._model(flags.get("model"))
        nbpeft.generate(model, self._tokenizer(flags), prompts if cell else prompts[0], stream=True,
                        **generation_options(flags))

    @line_cell_magic
    @usage_errors
    def peft_compare_answers(self, line: str, cell: str | None = None) -> None:
        """Adapters and the base answer the same prompts, side by side:  %peft_compare_answers [NAME ...] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--seed N] [--stop TEXT] [--no-base] [--model VAR] [--tokenizer VAR] [--out VAR] (the words are adapter NAMEs: the prompt goes after --prompt or in the cell)

        NAME ... are the adapters to ask (default: every attached one), so the prompt is always
        --prompt TEXT (or the cell body); --no-base leaves out the base model's column. The cell
        form takes one prompt per line of its body::

            %%peft_compare_answers chat sql --max-new-tokens 30
            Tell me a joke.
            List the tables.

        Same as ``VAR = nbpeft.compare_answers(model, prompts, adapters=[NAME, ...],
        tokenizer=tokenizer, include_base=..., max_new_tokens=...)`` with VAR
        ``_peft_answers`` unless --out names another; the model is as before afterwards.
        """
        names, flags, _ = split_line(line, "peft_compare_answers", positional=None, options=False)
        out = flags.get("out", "_peft_answers")
        if not out.isidentifier():
            fail(f"--out {out!r} must be a variable name")
        prompts = prompts_of("peft_compare_answers", flags, cell)
        model = self._model(flags.get("model"))
        answers = nbpeft.compare_answers(model, prompts, adapters=names or None, tokenizer=self._tokenizer(flags),
                                         include_base=not flags.get("no-base", False), **generation_options(flags))
        self.shell.user_ns[out] = answers
        display(answers)

    @line_magic
    @usage_errors
    def peft_export(self, line: str) -> None:
        """Write the model with its active adapter for another program:  %peft_export FORMAT PATH [--dtype D] [--quant Q] [--model VAR] [--tokenizer VAR] [--overwrite]  or  %peft_export check TARGET [FOLDER]

        FORMAT is ``merged`` (a plain transformers folder; --dtype float32, bfloat16 or
        float16), ``gguf`` (llama.cpp and Ollama; --quant f16 or q8_0, or q4_k_m or q5_k_m by
        llama.cpp's quantiser, which needs llama-cpp-python) or ``gguf-adapter``
        (llama.cpp's --lora). An existing, non-empty PATH is replaced only with --overwrite, as
        in %peft_save. Same as ``nbpeft.export(model, PATH, format=FORMAT, tokenizer=tokenizer,
        dtype=D, quant=Q, overwrite=...)``; the model is not changed.

        ``check TARGET`` (vllm, llama.cpp, ollama, peft) lists what that program would refuse
        or silently ignore in the model's adapters, or in a saved adapter FOLDER: same as
        ``print(nbpeft.check_export(model, TARGET))``.
        """
        words, flags, _ = split_line(line, "peft_export", positional=3, options=False)
        if not words:
            fail(f"which format? one of {', '.join(FORMATS)}, or check TARGET; usage: {USAGE['peft_export']}")
        if words[0] == "check":
            if len(words) < 2:
                fail(f"check for which program? one of {', '.join(TARGETS)}; usage: {USAGE['peft_export']}")
            unused = [f"--{f}" for f in ("dtype", "quant", "tokenizer", "overwrite") if f in flags]
            if unused:
                fail(f"{unused[0]} is for writing files, not for check; usage: {USAGE['peft_export']}")
            subject = words[2] if len(words) > 2 else self._model(flags.get("model"))
            print(nbpeft.check_export(subject, words[1]))
            return
        if len(words) < 2:
            fail(f"where to? usage: {USAGE['peft_export']}")
        if len(words) > 2:
            fail(f"unexpected {words[2]!r}; usage: {USAGE['peft_export']}")
        fmt, path = words
        for flag, applies in (("dtype", "merged"), ("quant", "gguf")):
            if flag in flags and fmt in FORMATS and fmt != applies:
                fail(f"--{flag} applies to {applies} only, not {fmt}; usage: {USAGE['peft_export']}")
        options = {key: flags[key] for key in ("dtype", "quant") if key in flags}
        model = self._model(flags.get("model"))
        print(nbpeft.export(model, path, format=fmt, tokenizer=self._tokenizer(flags),
                            overwrite=flags.get("overwrite", False), **options))

    @line_magic
    @usage_errors
    def peft_to_lora(self, line: str) -> None:
        """Turn an adapter (default: the active one) into a plain LoRA:  %peft_to_lora [NAME] [--rank R] [--name NAME] [--model VAR]

        For DoRA, (IA)³ or a LoRA of higher rank: the new LoRA (named --name, default
        NAME_lora) approximates the adapter's weight change by truncated SVD, is attached
        and made active; the line reports the approximation error. Same as
        ``nbpeft.to_lora(model, rank=R, name=NAME, source=...)``.
        """
        words, flags, _ = split_line(line, "peft_to_lora", positional=1, options=False)
        model = self._model(flags.get("model"))
        options = {"rank": parse_value(flags["rank"])} if "rank" in flags else {}
        print(nbpeft.to_lora(model, source=words[0] if words else None, name=flags.get("name"), **options))

    @line_magic
    @usage_errors
    def peft_show_example(self, line: str) -> None:
        """One training example as the model sees it:  %peft_show_example [I] [--data VAR] [--model VAR] [--tokenizer VAR] [max_length=N] [columns=...]

        Row I (default 0) of the data (default ``data``), tokenised as ``%%peft_train``
        would: the tokens under the loss highlighted, the masked ones dimmed, with counts.
        ``columns={'question': 'prompt', 'answer': 'response'}`` maps other column names.
        Same as ``nbpeft.show_example(data, tokenizer, I, max_length=N, columns=...)``;
        with no --tokenizer and no ``tokenizer`` variable, the model's own tokenizer.
        """
        words, flags, options = split_line(line, "peft_show_example", positional=1)
        self._options(nbpeft.show_example, options, SHOW_VARIABLES)
        index = parse_value(words[0]) if words else 0
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            fail(f"I={words[0]!r} must be a row number, 0 or more; usage: {USAGE['peft_show_example']}")
        data = self._var(flags.get("data", "data"), "make a list of examples or pass --data NAME")
        tokenizer = self._tokenizer(flags)
        if tokenizer is None and "model" not in flags and "model" not in self.shell.user_ns:
            fail(f"which tokenizer? pass --tokenizer NAME, or --model NAME for that model's own; "
                 f"usage: {USAGE['peft_show_example']}")
        model = self._model(flags.get("model")) if tokenizer is None or "model" in flags else None
        try:
            example = nbpeft.show_example(data, tokenizer if tokenizer is not None else model, index, **options)
        except MissingTokenizer as err:
            fail(err.with_fix("pass --tokenizer NAME"))
        display(example)

    @line_magic
    @usage_errors
    def peft_release(self, line: str) -> None:
        """Give back the memory a run held, so the next cell can train again:  %peft_release [VAR] [--model VAR]

        Drops the model's gradients and what the last error's traceback holds (a failed run's
        optimizer and activations), then returns cached memory (CUDA's cache, or the heap's);
        the weights and adapters stay. Same as ``print(nbpeft.release(model))``.
        """
        words, flags, _ = split_line(line, "peft_release", positional=1, options=False)
        print(nbpeft.release(self._model(words[0] if words else flags.get("model"))))

    @line_magic
    @usage_errors
    def peft_combine(self, line: str) -> None:
        """Mix LoRA adapters into a new one:  %peft_combine NAME=WEIGHT ... --name NAME [--how HOW] [--density D] [--majority-sign-method M] [--rank R] [--seed N] [--model VAR]

        For example ``%peft_combine chat=0.7 sql=0.3 --name mix --how ties --density 0.5``.
        --how is one of linear (default), cat, svd, ties, dare_linear, dare_ties; --density (the
        share of entries kept) is for ties and dare; --rank for svd; --seed makes dare's draw
        repeatable. Same as ``nbpeft.combine(model, {NAME: WEIGHT, ...}, name=NAME, how=HOW, ...)``;
        the new adapter is attached and made active.
        """
        _, flags, weights = split_line(line, "peft_combine")
        if not weights:
            fail(f"which adapters? give NAME=WEIGHT pairs, e.g. chat=0.7 sql=0.3; usage: {USAGE['peft_combine']}")
        if "name" not in flags:
            fail(f"name the new adapter with --name NAME; usage: {USAGE['peft_combine']}")
        options = {flag.replace("-", "_"): parse_value(flags[flag])
                   for flag in ("density", "rank", "seed") if flag in flags}
        options.update({flag.replace("-", "_"): flags[flag] for flag in ("how", "majority-sign-method") if flag in flags})
        model = self._model(flags.get("model"))
        display(nbpeft.combine(model, weights, name=flags["name"], **options))

    @line_magic
    @usage_errors
    def peft_runs(self, line: str) -> None:
        """The recorded training runs:  %peft_runs [ID ...] [--plot] [--out VAR] [model=M] [method=M] [since=DATE] [until=DATE] [status=S]

        Same as ``VAR = nbpeft.runs(model=..., method=..., since=..., until=..., status=...)``
        with VAR ``_peft_runs`` unless --out names another; IDs keep those runs only. --plot
        shows their loss curves overlaid instead (``nbpeft.plot_runs([ID, ...])``).
        """
        ids, flags, options = split_line(line, "peft_runs", positional=None)
        out = flags.get("out", "_peft_runs")
        if not out.isidentifier():
            fail(f"--out {out!r} must be a variable name")
        self._options(nbpeft.runs, options, ("store",))
        options = {key: str(value) for key, value in options.items()}  # since=2025-06-01 is a date, not a sum
        table = nbpeft.runs(**options)
        if ids:
            unknown = [i for i in ids if i not in table.ids]
            if unknown:
                fail(f"no run {unknown[0]!r} among the runs shown; %peft_runs lists them")
            table = nbpeft.RunTable([row for row in table.rows if row["run_id"] in ids], table.store)
        self.shell.user_ns[out] = table
        display(table.plot() if flags.get("plot") else table)

    @line_cell_magic
    @usage_errors
    def peft_bakeoff(self, line: str, cell: str | None = None) -> None:
        """Train several methods from the same start, side by side:  %%peft_bakeoff METHOD={'key': value} ... [methods=a,b] [--model VAR] [--data VAR] [--eval-data VAR] [--tokenizer VAR] [--out VAR] key=value ...

        For example ``%peft_bakeoff lora={r: 8} ia3={} steps=60 seed=0 --eval-data val``. A key
        that names a method holds its options (its own ``lr`` among them); ``methods=a,b`` adds
        methods with their defaults; every other key=value is train()'s. Same as
        ``VAR = nbpeft.bakeoff(model, data, methods={...}, eval_data=val, tokenizer=tokenizer, ...)``
        with VAR ``_peft_bakeoff`` unless --out names another.
        """
        _, flags, options = split_line(line, "peft_bakeoff")
        options = merged_options(options, cell)
        out = flags.get("out", "_peft_bakeoff")
        if not out.isidentifier():
            fail(f"--out {out!r} must be a variable name")
        names = {m.name for m in nbpeft.methods()}
        listed = options.pop("methods", [])
        methods = {name: {} for name in ([listed] if isinstance(listed, str) else listed)}
        for key in [k for k in options if k in names or isinstance(options[k], dict) and k != "columns"]:
            if not isinstance(options[key], dict):
                fail(f"{key}= holds the method's options as a dict, e.g. {key}={{r: 8}} or {key}={{}}")
            methods[key] = options.pop(key)
        if not methods:
            fail(f"which methods? e.g. lora={{r: 8}} ia3={{}}; usage: {USAGE['peft_bakeoff']}")
        keywords = [o.name for o in train_options.keyword_options() if o.kind not in ("data", "tokenizer")]
        for key in options:
            if key not in keywords:
                unknown_option("bakeoff", key, keywords)
        model = self._model(flags.get("model"))
        data = self._var(flags.get("data", "data"), "make a list of examples or pass --data NAME")
        if "eval-data" in flags:
            options["eval_data"] = self._var(flags["eval-data"], "pass --eval-data NAME")
        table = nbpeft.bakeoff(model, data, methods=methods, tokenizer=self._tokenizer(flags), **options)
        self.shell.user_ns[out] = table
        display(table)
        display(table.plot())

TRAIN_TEXT = inspect.cleandoc(PeftMagics.peft_train.__doc__).partition("\n")[2]


def train_doc() -> str:
    """``%%peft_train?``: the usage line and every declared train option, read when asked."""
    return f"Train the active adapters:  {usage('peft_train')}\n{TRAIN_TEXT}{train_help()}"


EXPORT_JOB_TEXT = inspect.cleandoc(PeftMagics.peft_export_job.__doc__)


def export_job_doc() -> str:
    """``%peft_export_job?``: its usage and the declared train options a job carries, read when asked."""
    return EXPORT_JOB_TEXT + train_help(tuple(not_exported()))


# IPython's ``?`` asks an object for getdoc() before reading __doc__: the help follows the declarations
PeftMagics.peft_train.getdoc = train_doc
PeftMagics.peft_train.__doc__ = train_doc()
PeftMagics.peft_export_job.getdoc = export_job_doc
