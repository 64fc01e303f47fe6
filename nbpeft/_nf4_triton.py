"""The CUDA path of NF4 dequantisation: one Triton kernel (imported only on CUDA with Triton).

Each program reads ``BYTES`` packed bytes (two 4-bit indices each, high nibble first),
finds the scale of their block (decoding the 8-bit double-quantised scale in place when
there is one) and writes ``2 · BYTES`` values ``NF4[index] · absmax`` in the output dtype.
It computes exactly what ``nf4.dequantize_reference`` computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BYTES = 1024


@triton.jit
def _dequantize_kernel(
    packed_ptr, absmax_ptr, scale_ptr, offset_ptr, levels_ptr, code_ptr, out_ptr, n_bytes, n_out,
    BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, DOUBLE: tl.constexpr, BYTES: tl.constexpr,
):
    idx = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    mask = idx < n_bytes
    packed = tl.load(packed_ptr + idx, mask=mask, other=0).to(tl.int32)
    block = (idx * 2) // BLOCK  # both values of a byte lie in one block (BLOCK is even)
    if DOUBLE:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        code = tl.load(code_ptr + q, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + block // SCALE_BLOCK, mask=mask, other=0.0)
        absmax = code * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    high = tl.load(levels_ptr + (packed >> 4), mask=mask, other=0.0) * absmax
    low = tl.load(levels_ptr + (packed & 15), mask=mask, other=0.0) * absmax
    out_type = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * idx, high.to(out_type), mask=mask & (2 * idx < n_out))
    tl.store(out_ptr + 2 * idx + 1, low.to(out_type), mask=mask & (2 * idx + 1 < n_out))


def dequantize(
    state: dict[str, torch.Tensor], shape: tuple[int, ...], block_size: int, dtype: torch.dtype,
    levels: torch.Tensor, code: torch.Tensor,
) -> torch.Tensor:
    packed = state["qweight"]
    numel = 1
    for size in shape:
        numel *= size
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    double = "absmax_q" in state
    if double:
        absmax, scale, offset = state["absmax_q"], state["absmax_scale"].float(), state["absmax_offset"].float()
    else:
        absmax = state["absmax"].float()
        scale = offset = absmax  # unused: the DOUBLE branch is compiled out
    grid = (triton.cdiv(packed.numel(), BYTES),)
    _dequantize_kernel[grid](
        packed, absmax, scale, offset, levels, code, out, packed.numel(), numel,
        BLOCK=block_size, SCALE_BLOCK=256, DOUBLE=double, BYTES=BYTES,
    )
    return out.view(shape)
