"""4-bit NormalFloat (NF4) weights, as in QLoRA (Dettmers et al. 2023).

A weight is cut into blocks of ``block_size`` values (64 by default). Each block keeps its
absolute maximum ``absmax`` and, per value, the index of the nearest of the 16 NF4 levels
to ``value / absmax``; two 4-bit indices are packed in one byte, the first one in the high
nibble. Dequantisation is ``w = NF4[index] · absmax``, so the error of one value is at most
half the widest gap between adjacent levels times ``absmax`` (0.152 · absmax).

Double quantisation stores the fp32 ``absmax`` values themselves in 8 bits: their mean
``offset`` is subtracted, and each run of 256 of them is scaled by its own absmax and
rounded to the nearest value of a signed 8-bit dynamic (exponent + fraction) code, the
8-bit float code the reference QLoRA implementation uses. Then
``absmax ≈ code[q] · scale + offset``, which adds at most half a code gap times ``scale``
to the error of each value.

Bytes per weight: 0.5 for the indices, plus 4 / block_size for fp32 scales (0.5625 at 64),
or 1 / block_size + 4 / (256 · block_size) with double quantisation (0.5159 at 64).

``quantize``/``dequantize`` are plain torch and run anywhere; on CUDA with Triton
installed, ``dequantize`` runs a Triton kernel (``nbpeft._nf4_triton``, imported lazily).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero
# (QLoRA, appendix E; the same constants as the reference CUDA kernels).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
SCALE_BLOCK = 256  # block size of the second (8-bit) quantisation of the scales
_TINY = 1e-12  # an all-zero block keeps absmax 0 but is divided by this instead


@functools.cache
def dynamic_code() -> torch.Tensor:
    """The 256 values of the signed 8-bit dynamic code, sorted, in [-1, 1].

    For k = 0..6, the 2^k midpoints of ``linspace(0.1, 1, 2^k + 1)`` times ``10^(k-6)``,
    with both signs, plus 0 and 1: more exponent range near zero, more fraction bits near 1.
    """
    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _table(name: str, device: torch.device) -> torch.Tensor:
    values = torch.tensor(NF4_LEVELS, dtype=torch.float32) if name == "nf4" else dynamic_code()
    return values.to(device)


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``table`` for every value."""
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(values, midpoints).to(torch.uint8)


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 state of ``weight`` (any shape; flattened row-major).

    Returns ``qweight`` (uint8, two indices per byte) and either ``absmax`` (fp32 per block)
    or, with ``double_quant``, ``absmax_q`` (uint8 per block), ``absmax_scale`` (fp32 per
    256 blocks) and ``absmax_offset`` (fp32 scalar). A meta tensor gives meta tensors of
    the same shapes (for counting without weights).
    """
    if block_size < 2 or block_size % 2:
        raise ValueError(f"nf4: block_size={block_size} must be an even number, e.g. 64")
    n = weight.numel()
    blocks = num_blocks(n, block_size)
    if weight.is_meta:
        meta = {"device": "meta"}
        state = {"qweight": torch.empty(blocks * block_size // 2, dtype=torch.uint8, **meta)}
        if double_quant:
            state["absmax_q"] = torch.empty(blocks, dtype=torch.uint8, **meta)
            state["absmax_scale"] = torch.empty(num_blocks(blocks, SCALE_BLOCK), **meta)
            state["absmax_offset"] = torch.empty((), **meta)
        else:
            state["absmax"] = torch.empty(blocks, **meta)
        return state
    flat = F.pad(weight.detach().reshape(-1).float(), (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = flat.abs().amax(dim=1)
    index = _nearest(flat / absmax.clamp_min(_TINY)[:, None], _table("nf4", flat.device)).view(-1)
    state = {"qweight": (index[0::2] << 4) | index[1::2]}
    if not double_quant:
        state["absmax"] = absmax
        return state
    offset = absmax.mean()
    runs = num_blocks(blocks, SCALE_BLOCK)
    centred = F.pad(absmax - offset, (0, runs * SCALE_BLOCK - blocks)).view(runs, SCALE_BLOCK)
    scale = centred.abs().amax(dim=1)
    codes = _nearest(centred / scale.clamp_min(_TINY)[:, None], _table("dynamic", flat.device))
    state.update(absmax_q=codes.view(-1)[:blocks].contiguous(), absmax_scale=scale, absmax_offset=offset)
    return state


def absmax_of(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-block fp32 scales, dequantised when they are double-quantised."""
    if "absmax" in state:
        return state["absmax"].float()
    codes = state["absmax_q"]
    scale = state["absmax_scale"].float()
    code = _table("dynamic", codes.device)[codes.long()]
    # Each run of SCALE_BLOCK codes shares one scale: padded to whole runs, the scales broadcast
    # over them. Not code * scale[arange(n) // SCALE_BLOCK]: compiled with a dynamic n (the
    # decoder block's layers differ in size), torch 2.13's inductor fills that index with garbage
    # on CPU, and its bounds check then throws inside an OpenMP region, which aborts the process.
    runs = F.pad(code, (0, scale.numel() * SCALE_BLOCK - codes.numel())).view(scale.numel(), SCALE_BLOCK)
    return (runs * scale[:, None]).view(-1)[: codes.numel()] + state["absmax_offset"].float()


def dequantize_reference(
    state: dict[str, torch.Tensor], shape: tuple[int, ...], block_size: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``NF4[index] · absmax`` in plain torch, reshaped to ``shape``."""
    packed = state["qweight"]
    index = torch.stack((packed >> 4, packed & 15), dim=1).view(-1, block_size)
    values = _table("nf4", packed.device)[index.long()] * absmax_of(state)[:, None]
    numel = 1
    for size in shape:
        numel *= size
    return values.view(-1)[:numel].view(shape).to(dtype)


def _triton_ready(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return _has_triton()


@functools.cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def dequantize(
    state: dict[str, torch.Tensor], shape: tuple[int, ...], block_size: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight in ``dtype``: the Triton kernel on CUDA when available, else plain torch."""
    if _triton_ready(state["qweight"].device):
        from . import _nf4_triton

        return _nf4_triton.dequantize(state, shape, block_size, dtype, _table("nf4", state["qweight"].device),
                                      _table("dynamic", state["qweight"].device))
    return dequantize_reference(state, shape, block_size, dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantised again in backward instead of kept for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight (out x in) is held in NF4: ``y = deq(W) x + b``.

    The NF4 state is kept in buffers (they follow ``.to(device)`` and show in the
    state_dict); the bias, if any, stays a frozen parameter in its own dtype.
    ``compute_dtype`` is the dtype the weight is dequantised to (default: the original's).
    """

    def __init__(
        self, weight: torch.Tensor, bias: nn.Parameter | None = None, block_size: int = 64,
        double_quant: bool = True, compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self.double_quant = double_quant
        self.weight_dtype = weight.dtype
        self.compute_dtype = compute_dtype or weight.dtype
        for key, value in quantize(weight, block_size, double_quant).items():
            self.register_buffer(key, value)
        self.bias = bias

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out x in) as a regular tensor."""
        shape = (self.out_features, self.in_features)
        return dequantize(self.state(), shape, self.block_size, dtype or self.compute_dtype)

    # Eager inside a compiled decoder block (a graph break around this layer): traced by torch
    # 2.13's dynamo and inductor on CPU, SmolLM2-135M's NF4 layers gave another loss than eager
    # (6.37 against 4.37 at the first step of a QLoRA run) although each dequantisation alone matches.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the output takes the autocast dtype, as nn.Linear's does: models such as
        # DeBERTa-v2 mix this output with autocast matmuls and fail on a dtype mismatch otherwise.
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.compute_dtype
        y = _DequantizedMatmul.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if autocast else y.to(x.dtype)

    @property
    def packed_weight_numel(self) -> int:
        """The weights this layer stands for (counted as model parameters by nbpeft)."""
        return self.in_features * self.out_features

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised weight (indices and scales; not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size={self.block_size}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


@dataclass
class MemoryReport:
    """Memory of a model's NF4 weights against the dense weights they replace."""

    layers: int
    parameters: int
    nbytes: int
    original_nbytes: int

    @property
    def bytes_per_parameter(self) -> float:
        return self.nbytes / max(self.parameters, 1)

    @property
    def original_bytes_per_parameter(self) -> float:
        return self.original_nbytes / max(self.parameters, 1)

    def __repr__(self) -> str:
        if not self.layers:
            return "no NF4 layers"
        return (
            f"{self.layers} NF4 linear layers: {self.parameters:,} weights in {self.nbytes:,} bytes "
            f"({self.bytes_per_parameter:.4f} bytes/parameter; {self.original_bytes_per_parameter:g} before)"
        )


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes per parameter of every NF4 weight in ``model`` (biases are not quantised, not counted)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    params = sum(m.in_features * m.out_features for m in layers)
    original = sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in layers)
    return MemoryReport(len(layers), params, sum(m.nbytes for m in layers), original)
