"""Every option of ``nbpeft.train``, declared once.

An option is a :class:`TrainOption`: its name, default, one line of help, the group it sits in,
what kind of value it takes and the check that value must pass. ``train()``'s signature and
docstring, ``%%peft_train`` (help, flags, Tab completion, errors), the panel's Train tab,
``export_job`` and the README's option list are all read from :data:`OPTIONS`, so a new option
is one more declaration here (and its use in the loop).

    settings = Settings.of("train()", {"lr": 1e-3, "steps": 30})   # checked, one line on a bad value
    settings.lr, settings.steps, settings.batch_size                 # every option, defaults filled in
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..data.layouts import LAYOUTS
from ..errors import ConfigError
from . import trackers
from .objectives import NAMES as OBJECTIVES
from .precision import PRECISIONS

SCHEDULES = ("constant", "linear", "cosine")
REQUIRED = inspect.Parameter.empty  # the default of an option every call must give (``data``)

# The panel shows the groups in this order, each under its title.
GROUPS = {
    "data": "Data",
    "objective": "Objective",
    "length": "Length",
    "optimizer": "Optimizer",
    "batch": "Batch",
    "evaluation": "Evaluation",
    "checkpoints": "Checkpoints",
    "hardware": "Hardware",
    "run": "Run",
}

# How a front-end takes each kind of value: the magic parses it from text, the panel picks a field for it.
KINDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "choice": "one of its choices",
    "text": "text",
    "int-or-auto": "a whole number or auto",
    "steps-or-share": "a number of steps or a share of them below 1",
    "bool-or-path": "true, or the path of a checkpoint",
    "path": "a folder path",
    "data": "a notebook variable, or a file path or glob (.jsonl, .json, .csv, .parquet)",
    "tokenizer": "a notebook variable holding a tokenizer",
    "function": "a notebook variable holding a function",
    "mapping": "name: name pairs",
    "listener": "true, false, or a notebook variable holding a listener or function",
}
# Kinds whose values belong to this kernel (its objects, or a checkpoint of this machine's run):
# a job written for other machines cannot carry them.
KERNEL_KINDS = ("data", "tokenizer", "function", "listener", "bool-or-path")


@dataclass(frozen=True)
class TrainOption:
    """One keyword of ``train()``.

    ``check(value)`` is True for an acceptable value (None passes where the default is None);
    ``expects`` finishes the error's sentence "must be ...". ``flag`` names the magic's
    ``--flag`` for the option where it has one (notebook variables and switches). ``objectives``
    names the training objectives the option belongs to (empty: every one); the panel shows it
    only while one of them is chosen, and a call giving it with another objective is refused.
    """

    name: str
    default: Any
    help: str
    group: str
    kind: str
    check: Callable[[Any], bool] | None = None
    expects: str = ""
    choices: tuple[Any, ...] = ()
    flag: bool = False
    objectives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"option {self.name}: group {self.group!r} is not one of {', '.join(GROUPS)}")
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"option {self.name}: objective {unknown[0]!r} is not one of {', '.join(OBJECTIVES)}")

    def belongs_to(self, objective: str) -> bool:
        """Whether the option applies when training with ``objective``."""
        return not self.objectives or objective in self.objectives

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def flag_name(self) -> str:
        """The option as a magic's ``--flag`` (``batch_size`` is ``--batch-size``)."""
        return "--" + self.name.replace("_", "-")

    @property
    def kernel_bound(self) -> bool:
        """Whether the option's value lives in this kernel (see ``KERNEL_KINDS``)."""
        return self.kind in KERNEL_KINDS

    def default_text(self) -> str:
        return "(required)" if self.required else repr(self.default)

    def validate(self, value: Any, caller: str = "train()") -> None:
        """Raise a one-line ConfigError when ``value`` does not pass the check."""
        if value is None and self.default is None:
            return
        if self.choices and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise ConfigError(f"{caller}: {self.name}={value!r} is not known; use one of {allowed}")
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{caller}: {self.name}={value!r} must be {self.expects}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _whole(value) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


OPTIONS: list[TrainOption] = [
    # data
    TrainOption("data", REQUIRED, "the examples to train on: any form nbpeft.data reads, or a file path or glob",
                "data", "data", flag=True),
    TrainOption("eval_data", None, "held-out examples, evaluated every eval_every steps and at the end",
                "data", "data", flag=True),
    TrainOption("tokenizer", None, "the tokenizer (default: the one that belongs to the model)",
                "data", "tokenizer", flag=True),
    TrainOption("columns", None, "other column names for nbpeft's fields, e.g. {'prompt': 'question'}",
                "data", "mapping", lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                                         for k, x in v.items()),
                "a dict of column names, e.g. {'prompt': 'question', 'response': 'answer'}"),
    TrainOption("max_length", 512, "longest example in tokens; longer ones are cut (said at the start)",
                "data", "int", _positive_int, "a positive integer"),
    TrainOption("batching", "auto", "how a batch's examples are laid out: auto (least padding on this data: packed "
                "where the model allows, else grouped by length, or padded where lengths are even), padded, grouped, packed",
                "data", "choice", choices=LAYOUTS),
    TrainOption("packing", None, "True: fill rows of max_length with whole examples (batch_size rows a batch); "
                "False: never pack (batching=auto chooses padded or grouped)",
                "data", "bool", lambda v: v is None or _flag(v), "True, False or None"),
    # objective
    TrainOption("objective", "sft", "what the run optimises: sft (next-token loss), a preference objective "
                "(dpo, ipo, orpo, simpo, kto) on preference rows, or grpo on prompts with reward=",
                "objective", "choice", choices=OBJECTIVES),
    TrainOption("beta", None, "β of dpo/ipo/kto (default 0.1), orpo's λ (0.1), simpo's β (2.0), grpo's KL weight (0.04)",
                "objective", "float", lambda v: _number(v) and v >= 0, "0 or a positive number, e.g. beta=0.1",
                objectives=("dpo", "ipo", "orpo", "simpo", "kto", "grpo")),
    TrainOption("label_smoothing", 0.0, "the share of pairs assumed mislabelled (conservative DPO), 0 to 0.5",
                "objective", "float", lambda v: _number(v) and 0 <= v < 0.5, "between 0 and 0.5, e.g. 0.1",
                objectives=("dpo", "simpo")),
    TrainOption("gamma", 0.5, "SimPO's target margin between the answers' average log-probabilities",
                "objective", "float", lambda v: _number(v) and v >= 0, "0 or more, e.g. gamma=0.5",
                objectives=("simpo",)),
    TrainOption("desirable_weight", 1.0, "KTO's weight of the rows labelled True",
                "objective", "float", lambda v: _number(v) and v > 0, "a positive number", objectives=("kto",)),
    TrainOption("undesirable_weight", 1.0, "KTO's weight of the rows labelled False",
                "objective", "float", lambda v: _number(v) and v > 0, "a positive number", objectives=("kto",)),
    TrainOption("reward", None, "grpo: reward(prompts, completions) -> list of floats, or a list of such functions",
                "objective", "function", lambda v: callable(v) or isinstance(v, (list, tuple)) and bool(v) and all(
                    callable(f) for f in v), "a function fn(prompts, completions) -> list of floats, or a list of them",
                objectives=("grpo",)),
    TrainOption("reward_weights", None, "grpo: one weight per reward function (default: 1 each)",
                "objective", "text", lambda v: isinstance(v, (list, tuple)) and all(_number(w) for w in v),
                "a list of numbers, one per reward function", objectives=("grpo",)),
    TrainOption("num_generations", 4, "grpo: answers sampled per prompt (its group)",
                "objective", "int", lambda v: _whole(v) and v >= 2, "a whole number, 2 or more", objectives=("grpo",)),
    TrainOption("max_new_tokens", 64, "grpo: longest sampled answer in tokens",
                "objective", "int", _positive_int, "a positive integer", objectives=("grpo",)),
    TrainOption("temperature", 1.0, "grpo: sampling temperature (0: greedy)",
                "objective", "float", lambda v: _number(v) and v >= 0, "0 or more, e.g. 1.0", objectives=("grpo",)),
    TrainOption("epsilon", 0.2, "grpo: the clip range of the probability ratio",
                "objective", "float", lambda v: _number(v) and 0 < v < 1, "between 0 and 1, e.g. 0.2",
                objectives=("grpo",)),
    TrainOption("precompute_ref", False, "compute the reference log-probabilities once before training, not every step",
                "objective", "bool", _flag, "True or False", objectives=("dpo", "ipo", "kto")),
    # length
    TrainOption("steps", None, "optimizer steps to train (give steps or epochs)",
                "length", "int", _positive_int, "a positive integer"),
    TrainOption("epochs", None, "passes over the data (default 1 when steps is not given)",
                "length", "float", lambda v: _number(v) and v > 0, "positive"),
    # optimizer
    TrainOption("lr", 2e-4, "peak learning rate (AdamW)",
                "optimizer", "float", lambda v: _number(v) and 0 < v < 1, "between 0 and 1, e.g. lr=2e-4"),
    TrainOption("schedule", "linear", "the learning rate after warm-up: constant, or linear/cosine down to 10%",
                "optimizer", "choice", choices=SCHEDULES),
    TrainOption("warmup", None, "warm-up steps (an int) or share of the steps (below 1); default min(10, steps/10)",
                "optimizer", "steps-or-share",
                lambda v: _number(v) and v >= 0 and (not isinstance(v, float) or v < 1 or v.is_integer()),
                "a number of steps (e.g. 10) or a share of them (e.g. 0.1)"),
    TrainOption("weight_decay", 0.0, "AdamW's decoupled weight decay, on weight matrices only",
                "optimizer", "float", lambda v: _number(v) and 0 <= v < 1,
                "between 0 and 1, e.g. weight_decay=0.01"),
    TrainOption("lr_ratio", 1.0, "LoRA+: LoRA's B matrices learn at this multiple of lr (the paper uses 16)",
                "optimizer", "float", lambda v: _number(v) and v > 0,
                "a positive number (B's learning rate over A's), e.g. 16"),
    TrainOption("max_grad_norm", 1.0, "clip the gradients' total norm to this (None: no clipping)",
                "optimizer", "float", lambda v: v is None or (_number(v) and v > 0),
                "a positive number, or None for no clipping"),
    # batch
    TrainOption("batch_size", 8, "examples a micro-batch, or auto: the largest that fits, accumulated",
                "batch", "int-or-auto", lambda v: v == "auto" or _positive_int(v),
                "a positive integer or 'auto'", flag=True),
    TrainOption("grad_accum", 1, "micro-batches accumulated into one optimizer step",
                "batch", "int", _positive_int, "a positive integer"),
    TrainOption("effective_batch", None, "with batch_size=auto: examples a step (default 8)",
                "batch", "int", _positive_int, "a positive integer"),
    # evaluation
    TrainOption("eval_every", None, "evaluate every N steps (default: five times a run)",
                "evaluation", "int", _positive_int, "a positive integer"),
    TrainOption("metrics", None, "metrics(model) -> {'name': value}, called when evaluating",
                "evaluation", "function", callable,
                "a function of the model returning a dict, e.g. {'accuracy': 0.9}"),
    # checkpoints
    TrainOption("save_every", None, "write a checkpoint to output_dir every N steps and at the end",
                "checkpoints", "int", _positive_int, "a positive number of steps"),
    TrainOption("output_dir", None, "the folder checkpoints go to",
                "checkpoints", "path", lambda v: isinstance(v, (str, bytes)) or hasattr(v, "__fspath__"),
                "a folder path"),
    TrainOption("resume", False, "continue from the latest checkpoint in output_dir (or from the one at a path)",
                "checkpoints", "bool-or-path", lambda v: isinstance(v, (bool, str)) or hasattr(v, "__fspath__"),
                "True, False or a checkpoint's path"),
    TrainOption("overwrite", False, "replace the checkpoints already in output_dir (another run's are refused without it)",
                "checkpoints", "bool", _flag, "True or False"),
    # hardware
    TrainOption("device", "auto", "auto (CUDA, then MPS, then CPU), or a device such as cpu or cuda:1",
                "hardware", "text", lambda v: isinstance(v, str), "a device name such as 'auto', 'cpu' or 'cuda'"),
    TrainOption("precision", "auto", "auto (bf16 where the hardware computes it natively), fp32, bf16 or fp16",
                "hardware", "choice", choices=PRECISIONS),
    TrainOption("gradient_checkpointing", False, "recompute activations in backward: less memory, slower steps",
                "hardware", "bool", _flag, "True or False"),
    TrainOption("compile", None, "compile the repeated block (None: when the run is long enough to pay it back)",
                "hardware", "bool", lambda v: v is None or _flag(v), "True, False or None"),
    TrainOption("processes", 1, "data-parallel processes: one per GPU, or CPU processes",
                "hardware", "int", _positive_int, "a positive integer", flag=True),
    TrainOption("shard", False, "also shard the frozen base model over the processes (FSDP2)",
                "hardware", "bool", _flag, "True or False", flag=True),
    # run
    TrainOption("seed", 0, "the seed of data order, dropout and initialisation: the same seed, the same run",
                "run", "int", _whole, "a whole number"),
    TrainOption("full", False, "train every parameter of a model without an adapter (frozen again after)",
                "run", "bool", _flag, "True or False"),
    TrainOption("loss_fn", None, "loss_fn(model, batch) -> loss, instead of the model's own loss",
                "run", "function", callable, "a function of (model, batch) returning a loss"),
    TrainOption("live", True, "the live display: True draws it, False is silent, or a listener gets the events",
                "run", "listener", lambda v: isinstance(v, bool) or callable(v) or hasattr(v, "on_step"),
                "True, False, a Listener or a function fn(event, payload)"),
    TrainOption("runs", True, "record the run in the run store (nbpeft.runs()): True, False, or the store's file path",
                "run", "bool-or-path", lambda v: isinstance(v, (bool, str)) or hasattr(v, "__fspath__"),
                "True, False or a file path, e.g. runs='runs.sqlite'"),
    TrainOption("report_to", None, "experiment trackers to log to: tensorboard, mlflow, trackio, or a list of them",
                "run", "text", trackers.valid, "one of tensorboard, mlflow, trackio, or a list of them"),
    TrainOption("logging_dir", None, "the folder TensorBoard runs go in, one subfolder each (default: ./runs)",
                "run", "path", lambda v: isinstance(v, str) or hasattr(v, "__fspath__"), "a folder path"),
]


def differs(value: Any, default: Any) -> bool:
    """Whether ``value`` is not ``default`` (compared by value only for values of one type: a DataFrame is no default)."""
    return value is not default and not (type(value) is type(default) and value == default)


def by_name() -> dict[str, TrainOption]:
    return {option.name: option for option in OPTIONS}


def keyword_options() -> list[TrainOption]:
    """The options a call gives by keyword (every option but the required ones)."""
    return [option for option in OPTIONS if not option.required]


def grouped() -> Iterator[tuple[str, list[TrainOption]]]:
    """(group title, its options) in the panel's order."""
    for group, title in GROUPS.items():
        members = [option for option in OPTIONS if option.group == group]
        if members:
            yield title, members


@contextmanager
def declared(option: TrainOption) -> Iterator[TrainOption]:
    """Add ``option`` for the duration of the block (how a test adds a throwaway option)."""
    OPTIONS.append(option)
    try:
        yield option
    finally:
        OPTIONS.remove(option)


class Settings:
    """The options of one call, checked, with every default filled in: ``settings.lr``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    @classmethod
    def of(cls, caller: str, given: dict[str, Any]) -> Settings:
        """Check ``given`` (option name -> value) and fill in the defaults; one line on the first bad one."""
        known = by_name()
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f"; did you mean {close[0]}=?" if close else f"; options are {', '.join(known)}"
                raise ConfigError(f"{caller}: unknown option {name}={given[name]!r}{hint}")
        values = {}
        for option in OPTIONS:
            if option.required and option.name not in given:
                raise ConfigError(f"{caller}: {option.name}= is required: {option.help}")
            value = given.get(option.name, option.default)
            option.validate(value, caller)
            values[option.name] = value
        objective = values.get("objective", "sft")
        for option in OPTIONS:
            if not option.belongs_to(objective) and differs(values[option.name], option.default):
                owners = ", ".join(repr(o) for o in option.objectives)
                raise ConfigError(f"{caller}: {option.name}= belongs to objective={owners}, not objective={objective!r}; "
                                  f"drop {option.name}= or choose objective={option.objectives[0]!r}")
        return cls(values)

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a call said)."""
        return {o.name: getattr(self, o.name) for o in OPTIONS if not o.required and differs(getattr(self, o.name), o.default)}

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def signature(first: list[inspect.Parameter]) -> inspect.Signature:
    """``train()``'s signature: ``first`` (the model), the required options, then every other as a keyword."""
    params = list(first)
    params += [inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for o in OPTIONS if o.required]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in keyword_options()]
    return inspect.Signature(params)


def docstring(skip: Collection[str] = (), heading: str = "Options (every keyword, by group):") -> str:
    """The options (but ``skip``) as a reference: one line each, ``name=default: help``, grouped."""
    lines = [heading]
    for title, members in grouped():
        shown = [o for o in members if o.name not in skip]
        if shown:
            lines += ["", f"{title}:"]
            lines += [f"    {o.name}={o.default_text()}: {o.help}" for o in shown]
    return "\n".join(lines)


def markdown_table() -> str:
    """The options as the README's table."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for title, members in grouped():
        rows.append(f"| **{title}** | | |")
        rows += [f"| `{o.name}` | {'required' if o.required else f'`{o.default!r}`'} | {o.help} |" for o in members]
    return "\n".join(rows)
