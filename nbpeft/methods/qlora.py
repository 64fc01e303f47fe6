"""QLoRA: LoRA on a frozen base whose linear weights are stored in 4-bit NF4.

Each targeted linear layer's weight ``W`` is replaced by its NF4 form ``Q(W)`` (see
``nbpeft.nf4``: blocks of 64, double-quantised scales) and dequantised on the fly::

    y = deq(Q(W)) x + b + (alpha / r) · B A x

``B`` starts at zero, so right after attach the model equals the *quantised* base. The
weights take about 0.516 bytes per parameter instead of 4 (``nbpeft.nf4.memory_report``).

Choices:

- **Restoring on detach.** NF4 is lossy, so the original weights are kept aside, outside
  the model (not in its parameters, buffers or state_dict, not moved by ``.to()``), as
  ``keep_original`` says: ``"cpu"`` (default) moves them to host memory, which frees the
  accelerator but not the RAM of a CPU-only model; ``"disk"`` writes them to a temporary
  safetensors file and frees the memory everywhere; ``"none"`` drops them. With ``"cpu"`` or
  ``"disk"``, detach restores the original state_dict bit for bit; with ``"none"`` it puts
  back the dequantised NF4 weights (the module types are restored, the values are not).
- **Merging** raises: adding ``B·A`` to a 4-bit weight would be rounded away by
  re-quantisation. The adapter runs unmerged; to merge, use its LoRA tensors on the
  full-precision model (below).
- **Saving** writes ``peft_type: "QLORA"`` (our own name, so a plain LoRA file is never read
  as QLoRA or back) with every LoRA field plus ``quant_type``, ``block_size``,
  ``double_quant`` and ``compute_dtype``; the tensors are the reference LoRA keys
  (``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``). The NF4 base is not saved:
  loading quantises the fresh model the same way (quantisation is deterministic). Setting
  ``peft_type`` to ``"LORA"`` in adapter_config.json turns the folder into a LoRA file for the
  full-precision model (nbpeft's lora reads it; recent reference versions drop the four extra
  keys with a warning, older ones reject them).
- All qlora adapters on one layer share its quantisation; attach qlora before any other
  adapter on the same layers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import nf4, targeting
from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_dtype, find_layer
from . import lora_init
from .base import Attached, option, register
from .lora import LoRA, LoraConfig, LoRALinear, default_targets

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QLoraConfig(LoraConfig):
    method = "qlora"
    aliases: ClassVar[dict[str, str]] = {
        **LoraConfig.aliases, "bnb_4bit_compute_dtype": "compute_dtype", "blocksize": "block_size",
        "bnb_4bit_use_double_quant": "double_quant", "nested_quant": "double_quant",
    }

    block_size: int = option(64, "values per NF4 block (one absmax scale each)",
                             choices=(32, 64, 128, 256, 512, 1024, 2048, 4096))
    double_quant: bool = option(True, "store the block scales in 8 bits too (0.516 instead of 0.5625 bytes/weight)")
    compute_dtype: str = option("auto", "dtype the weights are dequantised to ('auto': the original dtype)",
                                choices=("auto", *_DTYPES))
    loftq_iter: int = option(1, "init='loftq': alternating quantise / low-rank SVD steps (1 quantises W itself)")
    keep_original: str = option(
        "cpu", "where the original weights wait for detach: 'cpu' (host memory), 'disk' (a temporary file), "
        "or 'none' (dropped; detach restores the dequantised weights)", choices=("cpu", "disk", "none"),
    )

    def validate(self) -> None:
        super().validate()
        if self.loftq_iter < 1:
            raise ConfigError(f"qlora: loftq_iter={self.loftq_iter} must be 1 or more, e.g. 1")
        if self.init in lora_init.REWEIGHTING and self.keep_original == "none":
            raise ConfigError(f"qlora: init={self.init!r} needs the original weights; use keep_original='cpu' or 'disk'")

    @property
    def quantisation(self) -> tuple[int, bool, str, str]:
        return (self.block_size, self.double_quant, self.compute_dtype, self.keep_original)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class QLoRALinear(LoRALinear):
    """LoRA over an :class:`~nbpeft.nf4.NF4Linear` that replaced the original layer.

    The first adapter quantises the base; removing the last one puts the original back.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.quantisation: tuple[int, bool, str, str] | None = None
        self._nf4_store: str | None = None

    def add(self, name: str, config: QLoraConfig) -> None:
        if self.quantisation is None:
            self._quantise(config)
        base = self.base_layer
        self.add_update(name, config, {"device": base.qweight.device, "dtype": adapter_dtype(base.weight_dtype)})

    @torch.no_grad()
    def _quantise(self, config: QLoraConfig) -> None:
        original = self.base_layer
        weight = original.weight
        dense = weight.T if self.fan_in_fan_out else weight  # NF4Linear holds (out, in)
        compute = None if config.compute_dtype == "auto" else _DTYPES[config.compute_dtype]
        quantised = nf4.NF4Linear(dense, original.bias, config.block_size, config.double_quant, compute)
        # Build everything first: nothing below can fail half-way.
        store = None
        if config.keep_original == "disk" and not weight.is_meta:
            handle, store = tempfile.mkstemp(prefix="nbpeft-qlora-", suffix=".safetensors")
            os.close(handle)
            save_file({"weight": weight.detach().cpu().contiguous()}, store)
            weakref.finalize(self, _unlink, store)  # if the model goes away without a detach
        # Kept out of the module tree: not a submodule, not in the state_dict, not moved by .to().
        self.__dict__["_nf4_original"] = original
        self._nf4_store = store
        if weight.is_meta:  # a shapes-only copy (nbpeft.compare): nothing to set aside
            pass
        elif config.keep_original == "cpu":
            weight.data = weight.data.to("cpu")
        else:
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
        self.base_layer = quantised
        self.quantisation = config.quantisation

    def remove(self, name: str) -> None:
        super().remove(name)  # the last adapter gone: the original weights come back
        if not self.adapter_names and self.quantisation is not None:
            self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        original = self.__dict__.pop("_nf4_original")
        quantised, weight, keep = self.base_layer, original.weight, self.quantisation[3]
        device = quantised.qweight.device
        if weight.is_meta:  # a shapes-only copy (nbpeft.compare): nothing to load
            pass
        elif keep == "cpu":
            weight.data = weight.data.to(device)
        elif keep == "disk":
            weight.data = load_file(self._nf4_store)["weight"].to(device)
            _unlink(self._nf4_store)
        else:
            dense = quantised.dequantize(weight.dtype)
            weight.data = (dense.T if self.fan_in_fan_out else dense).contiguous()
        self.base_layer = original
        self.quantisation = self._nf4_store = None

    def dense_weight(self) -> torch.Tensor:
        """The original full-precision weight (out x in), not its NF4 form."""
        if self.quantisation[3] == "disk":
            weight = load_file(self._nf4_store)["weight"]
        else:
            weight = self.__dict__["_nf4_original"].weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def replace_base_weight(self, dense: torch.Tensor) -> None:
        """Quantise ``dense`` (out x in) in place of the original; the original stays aside as before."""
        if len(self.adapter_names) > 1:
            raise ConfigError("qlora: an init that rewrites the 4-bit base must come with the layer's first qlora adapter")
        self._requantise(dense)

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        if len(self.adapter_names) > 1:  # others stay: they get the plain NF4 form of the original back
            self._requantise(self.dense_weight())

    def _requantise(self, dense: torch.Tensor) -> None:
        old = self.base_layer
        original_dtype = self.__dict__["_nf4_original"].weight.dtype
        compute = None if self.quantisation[2] == "auto" else _DTYPES[self.quantisation[2]]
        self.base_layer = nf4.NF4Linear(dense.to(old.qweight.device, original_dtype), old.bias, old.block_size,
                                        old.double_quant, compute)

    def _loftq(self, weight: torch.Tensor, rank: int, scaling: float, config: QLoraConfig) -> lora_init.Init:
        block, double = self.base_layer.block_size, self.base_layer.double_quant
        dtype = self.__dict__["_nf4_original"].weight.dtype

        def roundtrip(dense: torch.Tensor) -> torch.Tensor:
            state = nf4.quantize(dense.to(dtype), block, double)
            return nf4.dequantize(state, tuple(dense.shape), block, torch.float32)

        return lora_init.loftq(weight, rank, scaling, roundtrip, config.loftq_iter)

    def merge(self, name: str) -> None:
        raise ConfigError(
            f"merge(): the qlora adapter {name!r} cannot be merged into 4-bit NF4 weights (re-quantising would round "
            "the update away); keep it unmerged, or save_adapter() it and load it as 'LORA' on the full-precision model"
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", base in NF4"


class QLoRA(LoRA):
    name = "qlora"
    description = "LoRA on a frozen base whose linear weights are 4-bit NF4 (QLoRA); not mergeable"
    config_class = QLoraConfig
    layer_class = QLoRALinear
    peft_type = "QLORA"
    listing_order = 12
    identity_at_attach = False  # the 4-bit base already differs from the original
    in_reference = False
    serving_notes = {
        "vllm": "the file says peft_type 'QLORA'; set it to 'LORA' in adapter_config.json and serve it on the "
                "full-precision base",
        "peft": "peft_type 'QLORA' is nbpeft's own; set it to 'LORA' in adapter_config.json to load the LoRA on the "
                "full-precision base",
    }

    def kinds(self) -> tuple[type, ...]:
        return (*targeting.linear_types(), nf4.NF4Linear)  # NF4Linear: layers an earlier qlora adapter quantised

    def select(self, model: nn.Module, config: QLoraConfig, attached: Mapping[str, Attached]) -> list[str]:
        targets = config.targets if config.targets is not None else default_targets(model, self.name)
        chosen = targeting.resolve(model, targets, self.kinds(), self.name)
        chosen = targeting.narrow(model, chosen, targets, self.name, layers=config.layers,
                                  layers_pattern=config.layers_pattern, exclude=config.exclude)
        for path in chosen:
            outer = model.get_submodule(path)
            layer = find_layer(outer, QLoRALinear)
            if layer is not None:
                if layer.quantisation != config.quantisation:
                    block, double, dtype, keep = layer.quantisation
                    raise ConfigError(
                        f"qlora: {path} is already quantised with block_size={block}, double_quant={double}, "
                        f"compute_dtype={dtype!r}, keep_original={keep!r}; use the same options for every qlora adapter"
                    )
            elif isinstance(outer, (AdapterLayer, nf4.NF4Linear)):
                raise ConfigError(
                    f"qlora: {path} already carries another adapter; attach qlora first (it replaces the base weights)"
                )
        return chosen

    def notes(self, model: nn.Module, config: QLoraConfig, targets: list[str]) -> list[str]:
        report = nf4.memory_report(model)
        kept = {
            "cpu": "originals kept in host memory for detach",
            "disk": "originals kept in a temporary file for detach",
            "none": "originals dropped (detach restores the NF4 values)",
        }[config.keep_original]
        memory = f"{report.bytes_per_parameter:.4f} bytes/parameter (was {report.original_bytes_per_parameter:g})"
        return [*super().notes(model, config, targets), f"base weights in NF4: {memory}; {kept}"]

    def to_peft_config(self, config: QLoraConfig, model: nn.Module, chosen: list[str]) -> dict[str, Any]:
        return {
            **super().to_peft_config(config, model, chosen),
            "quant_type": "nf4",
            "block_size": config.block_size,
            "double_quant": config.double_quant,
            "compute_dtype": config.compute_dtype,
            **({"loftq_config": {"loftq_bits": 4, "loftq_iter": config.loftq_iter}} if config.init == "loftq" else {}),
        }

    def from_peft_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("quant_type", "nf4") != "nf4":
            raise ConfigError(f"load_adapter: quant_type={cfg['quant_type']!r} is not supported; qlora uses 'nf4'")
        options = super().from_peft_config(cfg)
        for key in ("block_size", "double_quant", "compute_dtype"):
            if key in cfg:
                options[key] = cfg[key]
        if options.get("init") == "loftq":
            options["loftq_iter"] = int((cfg.get("loftq_config") or {}).get("loftq_iter", 1))
        return options


register(QLoRA())
