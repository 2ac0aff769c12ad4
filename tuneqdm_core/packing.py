"""The packed low-bit layout: how b-bit integer codes lie in bytes. The torch code and the Triton kernels
both take it from here.

Codes: a weight is (out, K) codes. Codes of up to 4 bits are packed two per byte along K, low nibble
first, so a row holds ceil(K / 2) bytes and, for an odd K, the high nibble of its last byte is padding;
that is what makes W4 half the size of W8. Codes of 5..8 bits take one byte each.

Cells: a group-wise weight stores one zero point and one step code per group, each packed like the codes
(one cell: a nibble at up to 4 bits, else a byte). A step code c runs 1..L, L the largest value a cell
holds (15 or 255), and stands for the relative step S = c / L. Files written before step codes hold S
as float16, one per group, unpacked.
"""
from __future__ import annotations

import torch

from .errors import SettingError

SUPPORTED_BITS = range(2, 9)
BYTE_BITS = 8
NIBBLE_BITS = 4
NIBBLE_MASK = (1 << NIBBLE_BITS) - 1

# How a grouped weight stores its relative steps, as the kernels' GROUPED constexpr names it.
PER_CHANNEL, FLOAT16_STEPS, STEP_CODES = 0, 1, 2


def check_bits(bits: int) -> int:
    """bits as an int, if it is one of SUPPORTED_BITS (a code fits a byte); anything else is refused."""
    if int(bits) != bits or bits not in SUPPORTED_BITS:
        raise SettingError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return int(bits)


def codes_per_byte(bits: int) -> int:
    """2 (nibbles) at up to 4 bits, else 1: the one place the layout is decided."""
    return BYTE_BITS // NIBBLE_BITS if check_bits(bits) <= NIBBLE_BITS else 1


def cell_bits(bits: int) -> int:
    """Bits of the cell one code, zero point or step code takes: 4 or 8."""
    return BYTE_BITS // codes_per_byte(bits)


def step_levels(bits: int) -> int:
    """L, the largest step code: the largest value a cell holds (15 at up to 4 bits, else 255)."""
    return (1 << cell_bits(bits)) - 1


def packed_width(k: int, bits: int) -> int:
    """Bytes per output channel for K values at this bit width."""
    return -(-k // codes_per_byte(bits))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, K) integer codes in [0, 2^bits) -> (out, packed_width) uint8."""
    q = q.to(torch.uint8)
    if codes_per_byte(bits) == 1:
        return q.contiguous()
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << NIBBLE_BITS)).contiguous()


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: (out, packed_width) uint8 -> (out, K) uint8 codes."""
    if codes_per_byte(bits) == 1:
        return packed
    return torch.stack((packed & NIBBLE_MASK, packed >> NIBBLE_BITS), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def unpack_as(packed: torch.Tensor, bits: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """`unpack` straight into a new (out, K) tensor of float `dtype`, with no full-size uint8
    intermediate (weight-sized buffers are the memory peak of a layer's call)."""
    if codes_per_byte(bits) == 1:
        return packed.to(dtype)
    a = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=dtype, device=packed.device)
    a[:, 0::2] = packed & NIBBLE_MASK
    a[:, 1::2] = packed >> NIBBLE_BITS
    return a[:, :k]


def group_zeros(zero: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Stored group zero points -> (out, G) uint8 codes."""
    return unpack(zero, bits, groups)


def group_steps(group_scale: torch.Tensor, bits: int, groups: int, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Stored group steps -> S (out, G) as `dtype`: step codes c / L, or the float16 S of older files."""
    if step_storage(group_scale) == FLOAT16_STEPS:
        return group_scale.to(dtype)
    return unpack(group_scale, bits, groups).to(dtype) / step_levels(bits)


def empty_group_cells(out: int, groups: int, bits: int, step_codes: bool = True, device=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (zero points, group steps) of a group-wise weight with `out` channels of `groups` groups,
    before they are filled: uint8 cells packed like the codes, or, without `step_codes`, the float16 S of
    files written before step codes (ones: S = 1)."""
    zero = torch.zeros(out, packed_width(groups, bits), dtype=torch.uint8, device=device)
    if step_codes:
        return zero, torch.zeros(out, packed_width(groups, bits), dtype=torch.uint8, device=device)
    return zero, torch.ones(out, groups, dtype=torch.float16, device=device)


def step_storage(group_scale: torch.Tensor | None) -> int:
    """PER_CHANNEL (no group steps), STEP_CODES (uint8 cells) or FLOAT16_STEPS (older files)."""
    if group_scale is None:
        return PER_CHANNEL
    return STEP_CODES if group_scale.dtype == torch.uint8 else FLOAT16_STEPS


def tile_constants(bits: int, group_scale: torch.Tensor | None) -> dict[str, object]:
    """The layout as the Triton weight tile takes it, constexpr arguments: PACKED (two codes per byte,
    low nibble first), GROUPED (PER_CHANNEL, FLOAT16_STEPS or STEP_CODES) and STEP_LEVELS (L as a float)."""
    return {"PACKED": codes_per_byte(bits) == 2, "GROUPED": step_storage(group_scale),
            "STEP_LEVELS": float(step_levels(bits))}
