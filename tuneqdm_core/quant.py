"""Weight quantization primitives: per-output-channel asymmetric round-to-nearest, and bit packing.

A weight of any rank is viewed as (out_channels, K) with K = prod(other dims). Values with up to 4 bits
are packed two per byte along K (low nibble first), which is what makes W4 half the size of W8;
5..8 bits take one byte each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = range(2, 9)


def check_bits(bits: int) -> int:
    if int(bits) != bits or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return int(bits)


def packed_width(k: int, bits: int) -> int:
    """Bytes per output channel for K values at this bit width."""
    return (k + 1) // 2 if check_bits(bits) <= 4 else k


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, K) integer codes in [0, 2^bits) -> (out, packed_width) uint8."""
    q = q.to(torch.uint8)
    if check_bits(bits) > 4:
        return q.contiguous()
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: (out, packed_width) uint8 -> (out, K) uint8 codes."""
    if check_bits(bits) > 4:
        return packed
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return pairs.reshape(packed.shape[0], -1)[:, :k]


@dataclass
class QuantizedWeight:
    """Packed integer codes of one weight plus what is needed to read them back.

    Dequantized value: (unpack(packed) - zero) * scale, per output channel.
    """

    packed: torch.Tensor  # uint8 (out, packed_width)
    zero: torch.Tensor  # uint8 (out,), always a representable code because 0 is inside every range
    scale: torch.Tensor  # float32 (out,), the base step s0
    shape: tuple[int, ...]
    bits: int

    @property
    def k(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


def quantize_weight(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """Round-to-nearest asymmetric quantization per output channel.

    The range is widened to include 0 so that the zero point is itself a b-bit code (stored in one
    byte) and an exact zero stays exact; trained weights straddle zero, so this rarely widens a
    channel. The dequantized value then equals scale * round(w / scale): error at most half a step.
    """
    check_bits(bits)
    qmax = 2**bits - 1
    w = weight.detach().reshape(weight.shape[0], -1).float()
    lo = w.amin(dim=1).clamp_(max=0.0)
    hi = w.amax(dim=1).clamp_(min=0.0)
    scale = (hi - lo) / qmax
    # An all-zero channel has no range: any positive step reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    q = torch.div(w, scale[:, None]).round_().add_(zero[:, None]).clamp_(0, qmax)
    return QuantizedWeight(
        packed=pack(q, bits),
        zero=zero.to(torch.uint8),
        scale=scale,
        shape=tuple(weight.shape),
        bits=bits,
    )


def integer_weight(packed: torch.Tensor, zero: torch.Tensor, bits: int, shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """A = Q - z as `dtype`, in the weight's own shape.

    |A| <= 255, so it is exact in fp16, bf16 and fp32. This tensor is weight-sized: callers build it
    inside one layer's computation and drop it right after.
    """
    k = 1
    for d in shape[1:]:
        k *= d
    out = packed.shape[0]
    if bits > 4:
        a = packed.to(dtype)
    else:
        # Nibbles go straight into the float buffer: no full-size uint8 intermediate.
        a = torch.empty(out, 2 * packed.shape[1], dtype=dtype, device=packed.device)
        a[:, 0::2] = packed & 0xF
        a[:, 1::2] = packed >> 4
        a = a[:, :k]
    a -= zero.to(dtype)[:, None]
    return a.reshape(shape)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base float weight s0 * (Q - z); for tests, reports and the reference-style benchmark."""
    a = integer_weight(qw.packed, qw.zero, qw.bits, qw.shape, torch.float32)
    view = (-1,) + (1,) * (len(qw.shape) - 1)
    return (a * qw.scale.reshape(view)).to(dtype)
