"""What to quantize and how: one config object shared by the swap, the files and the nodes.

A quantized model keeps the config it was built with (model.model_config reads it back); both file
formats store it whole as JSON (`to_json` / `from_json`), so a reloaded model has the same config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingError
from .quant import check_bits, check_group_size, default_group_size
from .routing import RoutingPolicy

S_IN_INITS = ("ones", "normal")
SCALES_MODES = {True: "TuneQDM", False: "PEQA"}  # train_s_in -> the name of the scales mode


@dataclass(frozen=True)
class TuneQDMConfig:
    """bits: weight bits (2..8; W4 and W8 are the published settings).
    experts: timestep experts N, each a full set of (s_out, s_in).
    train_s_in: False freezes s_in at its init; with experts=1 that is PEQA. A field of the model's
        config, never read off the layers' `requires_grad` (which other code may change).
    s_in_init: 'ones' (the reference code) or 'normal' (s_in ~ N(1, s_in_sigma), the paper's summary).
    keep_float: glob patterns of layer names left in float (e.g. '*conv_out*').
    group_size: base steps per group of this many input values (frozen, under the trainable s_out and
        s_in), 0 = one step per output channel (the form before groups existed); None = the measured
        default for `bits` (quant.default_group_size: 16 at up to 4 bits, 32 above).
    minimize_error: refine each group's step and zero point by least squares (data-free); False gives
        round-to-nearest from each group's min/max. Per-channel quantization is always round-to-nearest.
    routing: how a timestep picks its expert, in sampling and in training (default: uniform intervals).
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
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        g = default_group_size(self.bits) if self.group_size is None else check_group_size(self.group_size)
        object.__setattr__(self, "group_size", g)
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if not 1 <= self.experts <= 64:
            raise SettingError(f"experts must be 1..64, got {self.experts}")
        if self.s_in_init not in S_IN_INITS:
            raise SettingError(f"s_in_init must be one of {S_IN_INITS}, got {self.s_in_init!r}")
        self.routing.check(self.experts)

    @classmethod
    def peqa(cls, bits: int = 4, group_size: int | None = None) -> "TuneQDMConfig":
        """The baseline: one expert, s_out only."""
        return cls(bits=bits, experts=1, train_s_in=False, group_size=group_size)

    @property
    def scales_mode(self) -> str:
        return SCALES_MODES[self.train_s_in]

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (the routing policy as its own dict)."""
        out = dataclasses.asdict(self)
        out["keep_float"] = list(self.keep_float)
        out["routing"] = self.routing.to_json()
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any], defaults: "TuneQDMConfig | None" = None) -> "TuneQDMConfig":
        """The config `to_json` wrote; a field it lacks (a file written before the field existed) is taken
        from `defaults` (else the field's default). Unknown keys are refused (a newer writer's field
        would otherwise be dropped without a word)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise SettingError(f"unknown TuneQDM config fields {unknown} (written by a newer pack?)")
        kw = dataclasses.asdict(defaults) if defaults is not None else {}
        if defaults is not None:
            kw["routing"] = defaults.routing
        kw.update({k: v for k, v in value.items() if k != "routing"})
        if "routing" in value:
            kw["routing"] = RoutingPolicy.from_json(value["routing"])
        kw["keep_float"] = tuple(kw.get("keep_float", ()))
        return cls(**kw)
