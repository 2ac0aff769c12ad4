"""Unpacking packed integer codes in Triton: the shared weight-tile loader and a dequantize kernel.

Layout (tuneqdm_core/packing.py, which hands the kernels its constants through `group_args`): the
weight is (N, K) codes, N output channels, packed two per byte along K (low nibble first) when PACKED,
else one per byte. Per channel, `zero` is one uint8 per output channel and A = Q - z. Group-wise (group
size g), column k belongs to group k // g, `zero` holds one zero point per group (one cell each, packed
like the codes) and `group_scale` one relative step per group (a step code c in a cell, S = c / L, or
float16 S in older files): A = S * (Q - z), built in fp32 in registers.

`dequantize_codes` writes A in a float dtype. It is the conv path's weight: built inside one call,
handed to the vendor convolution and dropped (and built again in backward).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .core import errors, packing


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def weight_tile(w_ptr, zero_ptr, gs_ptr, offs_n, k0, N, K, stride_wn, stride_zn, stride_gn, GROUP,
                PACKED: tl.constexpr, GROUPED: tl.constexpr, STEP_LEVELS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A for rows `offs_n` (BLOCK_N,) and columns k0 .. k0 + BLOCK_K; zero outside the weight.
    Per channel (GROUPED 0): Q - z as int32, one z per row. Group-wise: S * (Q - z) as float32, with
    the group of column k being k // GROUP, its zero point read from `zero_ptr` (packed like the codes)
    and its relative step from `gs_ptr`: a step code c stored like the zero point, S = c / STEP_LEVELS
    (GROUPED 2), or the float16 S of files written before step codes (GROUPED 1).
    k0 must be a multiple of BLOCK_K (so even when PACKED)."""
    n_mask = offs_n < N
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = offs_n.to(tl.int64)[:, None] * stride_wn
    if PACKED:
        # One byte holds codes 2j (low nibble) and 2j+1 (high nibble): load BLOCK_K/2 bytes per row
        # and interleave the two nibbles back into K order.
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b_mask = offs_b < (K + 1) // 2
        byte = tl.load(w_ptr + rows + offs_b[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0)
        byte = byte.to(tl.int32)
        q = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))
    else:
        q = tl.load(w_ptr + rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        q = q.to(tl.int32)
    mask = n_mask[:, None] & k_mask[None, :]
    if GROUPED:
        gidx = offs_k // GROUP
        zrows = offs_n.to(tl.int64)[:, None] * stride_zn
        if PACKED:
            zb = tl.load(zero_ptr + zrows + (gidx // 2)[None, :], mask=mask, other=0).to(tl.int32)
            z = (zb >> ((gidx & 1) * 4)[None, :]) & 0xF
        else:
            z = tl.load(zero_ptr + zrows + gidx[None, :], mask=mask, other=0).to(tl.int32)
        srows = offs_n.to(tl.int64)[:, None] * stride_gn
        if GROUPED == 2:
            if PACKED:
                cb = tl.load(gs_ptr + srows + (gidx // 2)[None, :], mask=mask, other=0).to(tl.int32)
                s = ((cb >> ((gidx & 1) * 4)[None, :]) & 0xF).to(tl.float32) / STEP_LEVELS
            else:
                s = tl.load(gs_ptr + srows + gidx[None, :], mask=mask, other=0).to(tl.float32) / STEP_LEVELS
        else:
            s = tl.load(gs_ptr + srows + gidx[None, :], mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, (q - z).to(tl.float32) * s, 0.0)
    else:
        z = tl.load(zero_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)
        # Masking after the subtraction also drops the padding nibble of an odd K.
        return tl.where(mask, q - z[:, None], 0)


def group_args(zero: torch.Tensor, group_scale: torch.Tensor | None, group_size: int, bits: int) -> tuple:
    """(zero, gs_ptr, stride_zn, stride_gn, GROUP, layout) for a kernel launch, per channel with
    placeholders; `layout` holds weight_tile's constexpr arguments PACKED, GROUPED and STEP_LEVELS, as the
    packed layout's owner gives them."""
    if group_scale is None or not group_size:
        return zero, zero, 0, 0, 1, packing.tile_constants(bits, None)
    if zero.stride(1) != 1:
        zero = zero.contiguous()
    if group_scale.stride(1) != 1:
        group_scale = group_scale.contiguous()
    return (zero, group_scale, zero.stride(0), group_scale.stride(0), int(group_size),
            packing.tile_constants(bits, group_scale))


@triton.jit
def int_to_float(a, DTYPE: tl.constexpr):
    """Small integers (or the fp32 group-wise tile) -> DTYPE, integers exactly. bf16 goes through fp32:
    the interpreter's direct int -> bf16 cast returns garbage, and on a GPU the conversion is done that
    way anyway."""
    if DTYPE == tl.bfloat16:
        return a.to(tl.float32).to(DTYPE)
    return a.to(DTYPE)


@triton.jit
def _dequant_kernel(w_ptr, zero_ptr, gs_ptr, out_ptr, N, K, stride_wn, stride_zn, stride_gn, GROUP, stride_on,
                    PACKED: tl.constexpr, GROUPED: tl.constexpr, STEP_LEVELS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a = weight_tile(w_ptr, zero_ptr, gs_ptr, offs_n, k0, N, K, stride_wn, stride_zn, stride_gn, GROUP,
                    PACKED, GROUPED, STEP_LEVELS, BLOCK_N, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :]
    tl.store(ptrs, int_to_float(a, out_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dequantize_codes(packed: torch.Tensor, zero: torch.Tensor, bits: int, shape: tuple[int, ...],
                     dtype: torch.dtype, group_scale: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """A = Q - z (group-wise S * (Q - z)) as `dtype` in the weight's own `shape`; same result as
    quant.integer_weight."""
    n = int(shape[0])
    k = 1
    for d in shape[1:]:
        k *= int(d)
    if packed.dim() != 2 or packed.shape[0] != n or packed.shape[1] != packing.packed_width(k, bits):
        raise errors.ShapeError(
            f"packed codes {tuple(packed.shape)} do not fit a {bits}-bit weight of shape {tuple(shape)}")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out.reshape(shape)
    if interpreting():  # few, large blocks: the interpreter pays per block
        block_n, block_k = _pow2(n, 1, 64), _pow2(k, 2, 256)
    else:
        block_n, block_k = 32, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    zero, gs, stride_zn, stride_gn, group, layout = group_args(zero, group_scale, group_size, bits)
    _dequant_kernel[grid](packed, zero, gs, out, n, k, packed.stride(0), stride_zn, stride_gn, group, out.stride(0),
                          **layout, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.reshape(shape)
