"""Attach, detach, merge and switch adapters on a model.

The model keeps one small record, ``model._nbpeft`` (a :class:`PeftState`): which
adapters exist, which are active, and the ``requires_grad`` flags the base model had
before the first attach. Everything else lives in the adapter layers themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import targeting
from .errors import ConfigError
from .layers import AdapterLayer, TrainedCopy, adapter_layers, add_adapter, base_path, set_module, undo_on_error
from .methods.base import MethodConfig, get_method

__all__ = ["BASE_ROW", "ROW_HOOKS", "Adapter", "ParameterCounts", "PeftState", "TrainedCopy", "adapter_layers",
           "adapter_owners", "adapter_parameters", "adapter_rows", "attach", "count_adapter", "detach",
           "disable_adapters", "merge", "packed_weights", "parameter_counts", "resolve_adapter_names", "set_adapter",
           "state", "trainable_parameters", "unmerge"]

_CLASSIFIER_HEADS = ("classifier", "score")


@dataclass
class Adapter:
    """One named adapter on a model, as returned by :func:`attach`."""

    name: str
    method: str
    config: MethodConfig
    targets: list[str]
    saved_modules: list[str] = field(default_factory=list)
    num_params: int = 0
    model_params: int = 0  # the base model's parameters
    total_params: int = 0  # the model's total when attached (base + every adapter), as parameter_counts() says
    merged: bool = False
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None  # the last recorded train() run that trained it: what its model card reports
    # Its weights moved since attach (train(), load_adapter()): disabling it no longer gives the model it started from.
    trained: bool = False

    @property
    def options(self) -> dict[str, Any]:
        return self.config.to_dict()

    def target_text(self) -> str:
        """The adapted modules by leaf name, e.g. ``q_proj ×30, v_proj ×30``."""
        counts: dict[str, int] = {}
        for path in self.targets:
            leaf = path.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
        return ", ".join(f"{leaf} ×{n}" for leaf, n in counts.items())

    def __repr__(self) -> str:
        pct = 100.0 * self.num_params / max(self.total_params, 1)
        extra = f"; also trains {', '.join(self.saved_modules)}" if self.saved_modules else ""
        notes = "".join(f"; {note}" for note in self.notes)
        return (
            f"Adapter {self.name!r}: {self.method} on {len(self.targets)} modules ({self.target_text()}){extra}; "
            f"{self.num_params:,} trainable parameters ({pct:.3f}% of {self.total_params:,}){notes}"
        )


@dataclass
class PeftState:
    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    base_requires_grad: dict[str, bool] = field(default_factory=dict)


def state(model: nn.Module) -> PeftState:
    st = getattr(model, "_nbpeft", None)
    return st if st is not None else PeftState()


def _default_saved_modules(model: nn.Module) -> list[str]:
    if "ForSequenceClassification" not in type(model).__name__ and "ForTokenClassification" not in type(model).__name__:
        return []
    return [p for p in targeting.base_modules(model) if p in _CLASSIFIER_HEADS]


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """An adapter's parameters keyed as in the published checkpoint format (no prefix)."""
    out = {}
    for path, layer in adapter_layers(model):
        if name in layer.adapter_names:
            for suffix, param in layer.adapter_parameters(name).items():
                out[f"{path}.{suffix}"] = param
    return out


def attach(model: nn.Module, method: str, *, name: str = "default", replace: bool = False, **options: Any) -> Adapter:
    """Add a named adapter to ``model`` and freeze everything else.

    Every option is validated before the model is touched, and any error leaves the
    model exactly as it was (module types, state_dict and requires_grad flags).
    ``replace=True`` puts a fresh adapter in place of an attached one of the same name
    (what re-running an attach cell means), once the new one's options have passed.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach(): expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"attach(): name={name!r} must be a simple identifier such as 'default' or 'sql'")
    st = state(model)
    if name in st.adapters and not replace:
        raise ConfigError(f"attach(): an adapter named {name!r} is already attached; pick another name= or detach it "
                          "first (replace=True puts a fresh one in its place)")
    spec = get_method(method)
    config = spec.config_class.from_options(options)
    others = {n: a for n, a in st.adapters.items() if n != name}
    chosen = spec.select(model, config, others)
    saved = config.modules_to_save if config.modules_to_save is not None else _default_saved_modules(model)
    modules = targeting.base_modules(model)
    missing = [m for m in saved if m not in modules]
    if missing:
        raise ConfigError(f"attach(): modules_to_save={missing} not found in the model")
    if name in st.adapters:  # replace=True, and the new adapter's options passed
        detach(model, name)
        st = state(model)

    first = not st.adapters
    with undo_on_error() as undo:
        for path, cls, layer_config in [(p, *spec.layer_for(model, p, config)) for p in chosen] + [(p, TrainedCopy, config) for p in saved]:
            undo.append(add_adapter(model, path, cls, name, layer_config))
        spec.on_attach(model, name, config)

    if first:
        owners = adapter_owners(model)
        st.base_requires_grad = {
            base_path(n): p.requires_grad for n, p in model.named_parameters() if id(p) not in owners
        }
    if _routes_rows(spec.name):
        install_row_hooks(model)
    adapter = Adapter(name=name, method=spec.name, config=config, targets=chosen, saved_modules=list(saved),
                      notes=spec.notes(model, config, chosen))
    st.adapters[name] = adapter
    model._nbpeft = st
    set_adapter(model, name)
    count_adapter(model, adapter)
    return adapter


@dataclass(frozen=True)
class ParameterCounts:
    """The one parameter count every display reads (attach, summary, compare, the panels).

    ``total`` is the base model's parameters (NF4-packed weights counted as the weights they
    hold) plus every attached adapter's; ``trainable`` those that train now (the active
    adapters', or every parameter under full fine-tuning); the share is of ``total``.
    """

    base: int
    adapters: int
    trainable: int

    @property
    def total(self) -> int:
        return self.base + self.adapters

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def parameter_counts(model: nn.Module) -> ParameterCounts:
    owners = adapter_owners(model)
    params = list(model.parameters())
    return ParameterCounts(base=sum(p.numel() for p in params if id(p) not in owners) + packed_weights(model),
                           adapters=sum(p.numel() for p in params if id(p) in owners),
                           trainable=sum(p.numel() for p in params if p.requires_grad))


def count_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Record ``adapter``'s own parameters and the model's counts beside it (for its one-line display)."""
    counts = parameter_counts(model)
    adapter.num_params = sum(p.numel() for p in adapter_parameters(model, adapter.name).values())
    adapter.model_params, adapter.total_params = counts.base, counts.total


def packed_weights(model: nn.Module) -> int:
    """Weights a module keeps in packed buffers instead of parameters (e.g. NF4): they still count."""
    # an adapter layer reads like the module it wraps: count the packed module itself only
    return sum(getattr(m, "packed_weight_numel", 0) for m in model.modules() if not isinstance(m, AdapterLayer))


def adapter_owners(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> adapter name, for every adapter parameter in the model."""
    owners = {}
    for _, layer in adapter_layers(model):
        for n in layer.adapter_names:
            for param in layer.adapter_parameters(n).values():
                owners[id(param)] = n
    return owners


def resolve_adapter_names(model: nn.Module, name: str | list[str] | None, fn: str) -> list[str]:
    """The adapters ``name`` designates (None: all), or a ConfigError worded for the caller ``fn()``."""
    st = state(model)
    if not st.adapters:
        raise ConfigError(f"{fn}(): this model has no adapter; attach one first with nbpeft.attach(model, 'lora')")
    if name is None:
        return list(st.adapters)
    names = [name] if isinstance(name, str) else list(name)
    for n in names:
        if n not in st.adapters:
            raise ConfigError(f"{fn}(): no adapter named {n!r}; attached: {', '.join(st.adapters)}")
    return names


def set_adapter(model: nn.Module, name: str | list[str]) -> None:
    """Make ``name`` (or several names) the active adapter(s): used in forward and trained."""
    names = resolve_adapter_names(model, name, "set_adapter")
    st = state(model)
    for _, layer in adapter_layers(model):
        layer.active = tuple(n for n in names if n in layer.adapter_names)
    st.active = names
    owners = adapter_owners(model)
    for param in model.parameters():
        param.requires_grad = owners.get(id(param)) in names


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter (or all) and restore the original modules exactly."""
    names = resolve_adapter_names(model, name, "detach")
    st = state(model)
    names = _detach_order(st, names)
    for n in names:
        get_method(st.adapters[n].method).on_detach(model, n)
        for _, layer in list(adapter_layers(model)):
            if n in layer.adapter_names:
                layer.unmerge(n)
                layer.remove(n)
        del st.adapters[n]
    # Unwrap layers that hold no adapter any more, innermost first.
    for path, module in sorted(model.named_modules(), key=lambda kv: -kv[0].count(".")):
        if isinstance(module, AdapterLayer) and not module.adapter_names:
            set_module(model, path, module.base_layer)
    if st.adapters:
        remaining = [n for n in st.active if n in st.adapters] or [next(iter(st.adapters))]
        set_adapter(model, remaining)
    else:
        for param_name, param in model.named_parameters():
            param.requires_grad = st.base_requires_grad.get(param_name, param.requires_grad)
        del model._nbpeft
    if not any(_routes_rows(a.method) for a in st.adapters.values()):
        remove_row_hooks(model)


def _detach_order(st: PeftState, names: list[str]) -> list[str]:
    """Adapters that use others (a fusion) go first; one still in use by a staying adapter is refused."""
    users = {n: get_method(a.method).uses(a.config) for n, a in st.adapters.items()}
    for n in names:
        staying = [u for u, used in users.items() if n in used and u not in names]
        if staying:
            raise ConfigError(f"detach(): adapter {n!r} is used by {staying[0]!r}; detach {staying[0]!r} first")
    return sorted(names, key=lambda n: not users[n])


def merge(model: nn.Module, name: str | list[str] | None = None) -> None:
    """Fold adapters into the base weights (default: the active ones): no extra latency."""
    names = resolve_adapter_names(model, name if name is not None else state(model).active, "merge")
    layers = list(adapter_layers(model))
    for n in names:
        done = []
        for _, layer in layers:
            if n in layer.adapter_names and n not in layer.merged:
                try:
                    layer.merge(n)
                except NotImplementedError as err:
                    for merged_layer in reversed(done):  # all or nothing
                        merged_layer.unmerge(n)
                    why = f": {err}" if str(err) else ""
                    raise ConfigError(f"merge(): the {state(model).adapters[n].method} adapter {n!r} cannot be merged{why}") from None
                done.append(layer)
        state(model).adapters[n].merged = True


def unmerge(model: nn.Module, name: str | list[str] | None = None) -> None:
    """Undo :func:`merge`: the base weights return to their values before the merge."""
    st = state(model)
    names = resolve_adapter_names(model, name if name is not None else [n for n, a in st.adapters.items() if a.merged], "unmerge")
    for n in names:
        for _, layer in adapter_layers(model):
            if n in layer.adapter_names:
                layer.unmerge(n)
        st.adapters[n].merged = False


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model's behaviour inside the block; adapters come back afterwards."""
    st = state(model)
    merged = [n for n, a in st.adapters.items() if a.merged]
    if merged:
        unmerge(model, merged)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        if merged:
            merge(model, merged)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]



# One adapter per row ---------------------------------------------------------------------------

BASE_ROW = "__base__"  # the row name (like None) for "no adapter"


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch uses adapter ``names[i]`` alone ("__base__" or None: none).

    One forward pass serves a batch mixing adapters, with the outputs of running each row with
    its adapter alone. ``model(..., adapter_names=[...])`` does the same for one call. Inference
    only; for adapters whose layers can route rows (the LoRA family), unmerged.
    """
    start_rows(model, names, "adapter_rows()")
    try:
        yield model
    finally:
        end_rows(model)


def start_rows(model: nn.Module, names: Sequence[str | None], fn: str) -> None:
    """Route each row to its adapter on every layer that holds one, or a one-line ConfigError worded for ``fn``."""
    rows = row_plan(model, names, fn)
    by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
    for layer in _row_layers(model):
        device = next(layer.parameters()).device
        if device not in by_device:
            by_device[device] = {n: torch.tensor(r, device=device) for n, r in rows.items()}
        layer.route_rows(by_device[device], len(names))


def row_plan(model: nn.Module, names: Sequence[str | None], fn: str) -> dict[str, list[int]]:
    """Adapter name -> the rows that use it, once ``names`` is checked against the model (else a ConfigError)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(f"{fn}: adapter_names= takes one adapter name per row of the batch, e.g. ['chat', '__base__']")
    st = state(model)
    if not st.adapters:
        raise ConfigError(f"{fn}: this model has no adapter; attach one first with nbpeft.attach(model, 'lora')")
    if model.training:
        raise ConfigError(f"{fn}: adapter_names= is for inference; call model.eval() first")
    if any(layer.rows is not None for layer in _row_layers(model)):
        raise ConfigError(f"{fn}: the rows are already routed to adapters (nested adapter_rows or adapter_names=)")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None and name != BASE_ROW:
            if name not in st.adapters:
                raise ConfigError(f"{fn}: adapter_names[{i}]={name!r} is not attached; attached: {', '.join(st.adapters)}, "
                                  f"or {BASE_ROW!r} for the base model")
            rows.setdefault(name, []).append(i)
    layers = list(adapter_layers(model))
    routable = {n: bool(held) and all(layer.routes_rows for layer in held)
                for n in st.adapters for held in [[layer for _, layer in layers if n in layer.adapter_names]]}
    for n, adapter in st.adapters.items():
        if adapter.merged:
            raise ConfigError(f"{fn}: adapter {n!r} is merged into the weights, which every row would use; "
                              "nbpeft.unmerge(model) first")
        if n in rows or n in st.active:
            if not routable[n] and n in rows:
                raise ConfigError(f"{fn}: adapter_names= names the {adapter.method} adapter {n!r}, which cannot run "
                                  "on some rows only (LoRA-family adapters can)")
            if not routable[n]:
                raise ConfigError(f"{fn}: the active {adapter.method} adapter {n!r} would act on every row; "
                                  "set_adapter() to a LoRA-family adapter first")
            if adapter.saved_modules:
                raise ConfigError(f"{fn}: adapter {n!r} also trains whole modules ({', '.join(adapter.saved_modules)}), "
                                  "which every row would use; one adapter per row needs adapters without modules_to_save")
    return rows


def end_rows(model: nn.Module) -> None:
    for layer in _row_layers(model):
        layer.route_rows(None)


def _routes_rows(method: str) -> bool:
    return get_method(method).layer_class.routes_rows


def _row_layers(model: nn.Module) -> list[AdapterLayer]:
    return [layer for _, layer in adapter_layers(model) if layer.routes_rows]


def _rows_from_call(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook: ``model(..., adapter_names=[...])`` routes the rows for this call."""
    if "adapter_names" not in kwargs:
        return None
    names = kwargs.pop("adapter_names")
    if names is not None:
        start_rows(model, names, f"{type(model).__name__}.forward()")
        model._nbpeft_rows_from_call = True
    return args, kwargs


def _end_rows_from_call(model: nn.Module, args: tuple, output: Any) -> None:
    if model.__dict__.pop("_nbpeft_rows_from_call", False):
        end_rows(model)


ROW_HOOKS = (_rows_from_call, _end_rows_from_call)


def install_row_hooks(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` reach the layers (module-level hooks, found by identity: a deep copy works)."""
    if _rows_from_call not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_rows_from_call, with_kwargs=True)
        model.register_forward_hook(_end_rows_from_call, always_call=True)


def remove_row_hooks(model: nn.Module) -> None:
    for hooks, hook in ((model._forward_pre_hooks, _rows_from_call), (model._forward_hooks, _end_rows_from_call)):
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
