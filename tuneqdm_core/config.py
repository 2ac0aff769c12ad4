"""What to quantize and how: one config object shared by the swap, the files and the nodes."""
from __future__ import annotations

from dataclasses import dataclass

from .quant import check_bits, check_group_size, default_group_size

S_IN_INITS = ("ones", "normal")


@dataclass(frozen=True)
class TuneQDMConfig:
    """bits: weight bits (2..8; W4 and W8 are the published settings).
    experts: timestep experts N, each a full set of (s_out, s_in).
    train_s_in: False freezes s_in at its init; with experts=1 that is PEQA.
    s_in_init: 'ones' (the reference code) or 'normal' (s_in ~ N(1, s_in_sigma), the paper's summary).
    keep_float: glob patterns of layer names left in float (e.g. '*conv_out*').
    group_size: base steps per group of this many input values (frozen, under the trainable s_out and
        s_in), 0 = one step per output channel (the form before groups existed); None = the measured
        default for `bits` (quant.default_group_size: 16 at up to 4 bits, 32 above).
    minimize_error: refine each group's step and zero point by least squares (data-free); False gives
        round-to-nearest from each group's min/max. Per-channel quantization is always round-to-nearest.
    """

    bits: int = 4
    experts: int = 4
    train_s_in: bool = True
    s_in_init: str = "ones"
    s_in_sigma: float = 0.01
    seed: int = 0
    keep_float: tuple[str, ...] = ()
    group_size: int | None = None
    minimize_error: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        g = default_group_size(self.bits) if self.group_size is None else check_group_size(self.group_size)
        object.__setattr__(self, "group_size", g)
        if not 1 <= self.experts <= 64:
            raise ValueError(f"experts must be 1..64, got {self.experts}")
        if self.s_in_init not in S_IN_INITS:
            raise ValueError(f"s_in_init must be one of {S_IN_INITS}, got {self.s_in_init!r}")

    @classmethod
    def peqa(cls, bits: int = 4, group_size: int | None = None) -> "TuneQDMConfig":
        """The baseline: one expert, s_out only."""
        return cls(bits=bits, experts=1, train_s_in=False, group_size=group_size)
