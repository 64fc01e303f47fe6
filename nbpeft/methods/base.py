"""The method registry and the pieces every PEFT method shares.

A method is a config dataclass plus a class that implements :class:`Method`.
Adding a method means writing one module and calling :func:`register` once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import AdapterLayer

__all__ = ["REFERENCE_PREFIX", "AdapterLayer", "Attached", "ConfigError", "Method", "MethodConfig", "MethodInfo",
           "get_method", "method_for_file", "method_options", "methods", "option", "peft_types", "register", "registered",
           "unregister"]

# Tensor keys in the published checkpoint format: this prefix, the module path, the parameter.
REFERENCE_PREFIX = "base_model.model."


def option(default: Any, help: str, *, choices: tuple | None = None, **meta: Any) -> Any:
    """A config field with its help text (shown by ``methods()``, magics and panels)."""
    metadata = {"help": help, **meta}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class MethodConfig:
    """Base class of every method's config: type checks and choices are validated here."""

    method: ClassVar[str] = ""
    # names other tools use for our options, pointed at in "did you mean" hints
    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(self.method, f.name, value, hints[f.name])
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise ConfigError(f"{self.method}: {f.name}={value!r} is not allowed; use one of {allowed}")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError with a one-line message."""

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in options if k not in known]
        if unknown:
            import difflib

            hints = []
            for key in unknown:
                close = [cls.aliases[key]] if key in cls.aliases else difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"{cls.method}: unknown option {', '.join(hints)}; options are {', '.join(sorted(known))}"
            )
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (item, *_rest) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_type(method: str, name: str, value: Any, tp: Any) -> None:
    if not _matches(value, tp):
        raise ConfigError(
            f"{method}: {name}={value!r} has the wrong type; expected {_type_name(tp)}"
        )


class Attached(Protocol):
    """What a method may read about an adapter already on the model (``nbpeft.Adapter`` is one)."""

    name: str
    method: str
    config: MethodConfig
    targets: list[str]


class Method:
    """What a PEFT method provides to the core.

    ``select`` decides which modules the method adapts; the core wraps each of them in
    ``layer_class`` (an :class:`~nbpeft.layers.AdapterLayer`), or reuses the one already
    there, and calls its ``add``. The hooks below let a method act on the whole model and
    choose its checkpoint layout; they receive everything they need as arguments.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    layer_class: ClassVar[type[AdapterLayer]]
    peft_type: ClassVar[str]
    # Where the method comes in listings such as compare(): lower first, then by name.
    listing_order: ClassVar[int] = 1000
    # compare()'s usual setting for this method (the rest are the config's defaults).
    compare_options: ClassVar[dict[str, Any]] = {}
    # Set for a method that only combines adapters already trained (nothing to count on a bare model): why.
    needs_other_adapters: ClassVar[str | None] = None

    # What the method can do. Export, GGUF, new tokens and the tests read these; a method sets what differs.
    # The model's outputs are unchanged right after attach.
    identity_at_attach: ClassVar[bool] = False
    # The effect is a dense change ΔW of weights: to_lora() approximates it by a LoRA (its layers hold
    # ``fan_in_fan_out`` and merge in place).
    weight_delta: ClassVar[bool] = False
    # export() can fold the adapter into the base weights (a merged checkpoint or GGUF model); False for
    # methods that change activations, not weights.
    mergeable: ClassVar[bool] = False
    # Saved as a plain LoRA (A and B per module): vLLM serves it and it goes into a GGUF adapter.
    plain_lora: ClassVar[bool] = False
    # Its folder can hold the rows of new tokens (nbpeft.add_tokens) beside the adapter.
    holds_token_rows: ClassVar[bool] = True
    # The reference peft loads this method's folders.
    in_reference: ClassVar[bool] = False
    # Where a serving target treats this method's folder its own way: target -> the line check_export prints
    # (in place of the line it would print from the abilities above).
    serving_notes: ClassVar[dict[str, str]] = {}

    def disabled_is_start(self, config: MethodConfig) -> bool:
        """Whether, right after attach, disabling the adapter gives the model as it is with it: its start adds
        nothing and the base weights are untouched (the preference objectives' reference needs no copy then)."""
        return self.identity_at_attach

    def select(self, model: nn.Module, config: MethodConfig, attached: Mapping[str, Attached]) -> list[str]:
        """Module paths to adapt; ``attached`` holds the adapters already on the model, by name."""
        raise NotImplementedError

    def layer_for(self, model: nn.Module, path: str, config: MethodConfig) -> tuple[type[AdapterLayer], Any]:
        """The layer class for the module at ``path`` and what its ``add`` receives.

        That is the config, or the method's own per-module data computed here from the model:
        the config with this module's rank, or a record of the config and the model's sizes.
        The adapter keeps ``config`` itself.
        """
        return self.layer_class, config

    # Optional model-level hooks, for methods that act on the whole model (prompt and
    # prefix tuning) or keep their tensors under other names in the checkpoint.
    def on_attach(self, model: nn.Module, name: str, config: MethodConfig) -> None:
        """Called after the layers are wrapped; an error here rolls the attach back."""

    def notes(self, model: nn.Module, config: MethodConfig, targets: list[str]) -> list[str]:
        """Short remarks shown with the adapter and in the summary (e.g. 'added zero biases')."""
        return []

    def on_detach(self, model: nn.Module, name: str) -> None:
        """Called before the adapter's layers are removed: undo ``on_attach``."""

    def uses(self, config: MethodConfig) -> list[str]:
        """Names of other adapters this one computes with (AdapterFusion); detach removes it first."""
        return []

    def accepts(self, cfg: dict[str, Any]) -> bool:
        """Whether this method reads an adapter_config.json of its peft_type (a LORA file is lora or dora)."""
        return True

    def to_peft_config(self, config: MethodConfig, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        """The method's fields of adapter_config.json (besides peft_type, task_type, ...)."""
        # modules_to_save is written from the adapter: the modules it trains in full, a classifier's head by default
        return {k: v for k, v in config.to_dict().items() if k != "modules_to_save"}

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """attach() options from an adapter_config.json written by us or the reference."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        return {k: v for k, v in cfg.items() if k in fields}

    def checkpoint_tensors(self, model: nn.Module, adapter: Attached, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed as in the file; ``params`` are keyed ``<module path>.<suffix>``."""
        return {REFERENCE_PREFIX + key: p.detach() for key, p in params.items()}

    def from_checkpoint(self, model: nn.Module, adapter: Attached, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's tensors keyed like ``params`` above (the inverse of ``checkpoint_tensors``).

        Called right after ``adapter`` is attached; a method may still adjust its config.
        """
        bad = [k for k in tensors if not k.startswith(REFERENCE_PREFIX)]
        if bad:
            raise ConfigError(f"load_adapter(): key {bad[0]!r} does not start with {REFERENCE_PREFIX!r}")
        return {k[len(REFERENCE_PREFIX):]: v for k, v in tensors.items()}


@dataclass
class MethodInfo:
    name: str
    description: str
    options: dict[str, dict[str, Any]]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v['default']!r}" for k, v in self.options.items())
        return f"{self.name}: {self.description} ({opts})"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known by its name to attach(), methods(), loading and the front-ends."""
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Forget the method registered as ``name`` (adapters of it already attached stay); returns it."""
    get_method(name)  # an unknown name is a one-line error with a suggestion
    return _REGISTRY.pop(name)


def registered() -> list[Method]:
    return list(_REGISTRY.values())


def peft_types() -> list[str]:
    """The ``peft_type`` values of adapter_config.json that some registered method reads."""
    return sorted({m.peft_type for m in _REGISTRY.values()})


def method_for_file(cfg: Mapping[str, Any]) -> Method | None:
    """The method that reads an adapter_config.json, or None: of those with its ``peft_type``, the one that accepts it.

    Methods may share a ``peft_type`` (a LORA file is lora, or dora with ``use_dora``).
    """
    candidates = [m for m in _REGISTRY.values() if m.peft_type == cfg.get("peft_type")]
    return next((m for m in candidates if m.accepts(dict(cfg))), candidates[0] if candidates else None)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_options(config_class: type[MethodConfig]) -> dict[str, dict[str, Any]]:
    """Every option of a config class: default, type, help text and choices."""
    hints = typing.get_type_hints(config_class)
    out = {}
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = {
            "default": default,
            "type": _type_name(hints[f.name]),
            "help": f.metadata.get("help", ""),
            **({"choices": f.metadata["choices"]} if "choices" in f.metadata else {}),
        }
    return out


def methods() -> list[MethodInfo]:
    """The registry: each method's name, one-line description and options with defaults."""
    return [
        MethodInfo(m.name, m.description, method_options(m.config_class))
        for m in sorted(_REGISTRY.values(), key=lambda m: m.name)
    ]
