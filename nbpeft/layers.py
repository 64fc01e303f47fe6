"""The adapter layer contract and the wrapper chain every method builds on.

An adapter layer wraps a module (``base_layer``) and holds one or more named adapters.
Layers of different methods may stack on one module, ``L1(L2(Linear))``: that is the
*wrapper chain*. Only the functions here walk it (:func:`innermost`, :func:`find_layer`,
:func:`wrappers`); everything else asks them.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

Layer = TypeVar("Layer", bound="AdapterLayer")

# The label of a position the loss does not look at (prompt tokens, padding, virtual tokens),
# as torch's cross_entropy and transformers' models read it.
IGNORE = -100


class AdapterLayer(nn.Module, ABC):
    """A module that wraps ``base_layer`` and holds one or more named adapters.

    Subclasses keep per-adapter parameters in ``nn.ModuleDict``/``nn.ParameterDict``
    keyed by adapter name and implement :meth:`add`, :meth:`delete`,
    :meth:`adapter_parameters` and :attr:`adapter_names`; layers whose math allows it
    also implement :meth:`merge` and :meth:`unmerge`. ``active`` names the adapters used
    in forward, ``merged`` those folded into the base weight, and ``disabled`` switches
    every adapter off (``nbpeft.disable_adapters``).

    What a layer can do besides is declared below with a default that does nothing; the
    core, export and precision code read these and nothing else.
    """

    # Whether forward reads the base weight itself, not only by calling the base layer (DoRA's
    # weight norm): such a weight must stay exact, so precision.hold_frozen_weights_in_bf16 skips it.
    reads_base_weight: ClassVar[bool] = True
    # Whether forward honours ``rows`` (one adapter per row of the batch, nbpeft.adapter_rows).
    routes_rows: ClassVar[bool] = False
    # Whether the wrapped weight is stored (in, out), as GPT-2's Conv1D: weight deltas are transposed.
    fan_in_fan_out: bool = False
    # While rows are routed: adapter name -> the rows of the batch that use it, and the batch's row count.
    rows: dict[str, torch.Tensor] | None = None
    row_count = 0

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False
        self.originals: dict[str, torch.Tensor] = {}  # CPU copies kept by keep_original, by key

    # Model code reads its layers' attributes (T5's feed-forward reads ``self.wo.weight.dtype``):
    # what neither this layer nor nn.Module has comes from the wrapped module, however deep.
    # Private names stay this layer's own, so nn.Module's internals, copying and pickling never
    # reach through.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("_") or not modules or "base_layer" not in modules:
                raise
        inner = innermost(modules["base_layer"])
        try:
            return getattr(inner, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} (around {type(inner).__name__}) has no attribute {name!r}") from None

    @property
    @abstractmethod
    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in the order they were added."""

    @abstractmethod
    def add(self, name: str, config: Any) -> None:
        """Create adapter ``name`` from its method's config (the model is unchanged at this point)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Drop adapter ``name``'s parameters and settings (called by :meth:`remove`)."""

    @abstractmethod
    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s parameters keyed as in the checkpoint, relative to the wrapped module."""

    def remove(self, name: str) -> None:
        """Remove adapter ``name``; it is no longer active."""
        self.delete(name)
        self.active = tuple(a for a in self.active if a != name)

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight; layers whose math forbids it raise."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`. A layer that never merges has nothing to undo."""

    def route_rows(self, rows: dict[str, torch.Tensor] | None, count: int = 0) -> None:
        """From now on each adapter in ``rows`` updates only its rows of a ``count``-row batch (None: back to normal).

        Only layers whose class sets ``routes_rows`` are routed; their forward reads ``rows``.
        """
        self.rows, self.row_count = rows, count

    @property
    def initial_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(A₀, B₀)`` of each adapter whose init rewrote the base weight (PiSSA, OLoRA); none here."""
        return {}

    # W + Δ - Δ is not W in floating point: a CPU copy of each tensor a merge changes, taken before
    # the change, is put back when the change is undone, so unmerge and detach are bit-exact.
    @torch.no_grad()
    def keep_original(self, key: str, tensor: torch.Tensor) -> None:
        """Keep a CPU copy of ``tensor`` under ``key`` unless one is kept already (the first copy is the original)."""
        if key not in self.originals:
            self.originals[key] = tensor.detach().to("cpu", copy=True)

    @torch.no_grad()
    def restore_original(self, key: str, tensor: torch.Tensor) -> None:
        """Write the copy kept under ``key`` back into ``tensor`` bit for bit and drop it; none kept, nothing done."""
        original = self.originals.pop(key, None)
        if original is not None:
            tensor.copy_(original)

    def keep_original_weight(self) -> None:
        """Before a merge: keep the base weight as it is with nothing merged."""
        self.keep_original("weight", self.base_layer.weight)

    def restore_original_weight(self) -> None:
        """After an unmerge: once nothing is merged any more, put the exact base weight back."""
        if not self.merged:
            self.restore_original("weight", self.base_layer.weight)

    @torch.no_grad()
    def merge_delta(self, name: str, method: str) -> None:
        """Fold ``self.delta_weight(name)`` into the base weight, keeping the original for an exact unmerge."""
        if isinstance(self.base_layer, AdapterLayer):
            raise NotImplementedError(f"{method} over another adapter's layer cannot be folded into the base weight")
        if name not in self.merged:
            self.keep_original_weight()
            self.base_layer.weight += self.delta_weight(name)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge_delta(self, name: str) -> None:
        """Undo :meth:`merge_delta`; once nothing is merged, the exact original weight is back."""
        if name in self.merged:
            self.base_layer.weight -= self.delta_weight(name)
            self.merged.remove(name)
            self.restore_original_weight()

    def innermost(self) -> nn.Module:
        """The module at the bottom of the chain: the model's own module, however deep."""
        return innermost(self)

    def find(self, cls: type[Layer]) -> Layer | None:
        """The first layer of class ``cls`` in the chain from this one inwards, or None."""
        return find_layer(self, cls)


def wrappers(module: nn.Module) -> Iterator[AdapterLayer]:
    """The adapter layers of ``module``'s chain, outermost first (none for a plain module)."""
    while isinstance(module, AdapterLayer):
        yield module
        module = module.base_layer


def innermost(module: nn.Module) -> nn.Module:
    """The wrapped module at the bottom of the chain (``module`` itself when it is no adapter layer)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def find_layer(module: nn.Module, cls: type[Layer]) -> Layer | None:
    """The first layer of class ``cls`` in ``module``'s chain, or None."""
    return next((layer for layer in wrappers(module) if isinstance(layer, cls)), None)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of new adapter tensors for a base of ``dtype``.

    Low-precision and quantised bases keep fp32 adapters: their small updates would be
    rounded away in bf16 or fp16.
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def adapter_factory(weight: torch.Tensor) -> dict[str, Any]:
    """``device`` and ``dtype`` keywords for new adapter tensors beside the base ``weight``."""
    return {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}


def base_path(path: str) -> str:
    """A module path as it is in the model without adapters (``base_layer`` steps dropped)."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer with the base-model path of the module it wraps."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield base_path(path), module


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (the model itself for ``""``)."""
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in place of what is there."""
    parent, _, leaf = path.rpartition(".")
    setattr(get_module(model, parent), leaf, module)


@contextlib.contextmanager
def undo_on_error() -> Iterator[list[Callable[[], None]]]:
    """A list to append each step's undo to; if the block fails, the steps are undone, last first.

    ``with undo_on_error() as undo: undo.append(add_adapter(...))`` makes an attach all or nothing.
    """
    undo: list[Callable[[], None]] = []
    try:
        yield undo
    except BaseException:
        for step in reversed(undo):
            step()
        raise


def add_adapter(model: nn.Module, path: str, cls: type[AdapterLayer], name: str, config: Any) -> Callable[[], None]:
    """Add adapter ``name`` to the ``cls`` layer at ``path``, wrapping the module first if it has none.

    Returns the undo: it removes the adapter and, if this call wrapped the module, unwraps it.
    A failure leaves the module as it was.
    """
    current = get_module(model, path)
    layer = find_layer(current, cls)
    wrapped = layer is None
    if layer is None:
        layer = cls(current)
        set_module(model, path, layer)
    try:
        layer.add(name, config)
    except Exception:
        if wrapped:
            set_module(model, path, current)
        raise
    layer.train(current.training)  # new adapter modules follow the model's train/eval mode

    def undo() -> None:
        layer.remove(name)
        if wrapped:
            set_module(model, path, current)

    return undo


class TrainedCopy(AdapterLayer):
    """A module trained in full for an adapter (e.g. a classifier head or a layer norm).

    The original stays untouched; each adapter gets its own trainable copy.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add(self, name: str, config: Any) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.modules_to_save[name].named_parameters())

    def merge(self, name: str) -> None:
        """A full copy has nothing to fold: it simply stays in use."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.disabled:
            for name in self.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name](*args, **kwargs)
        return self.base_layer(*args, **kwargs)
