"""Weight adapters (LoRA and the like) on quantized layers, applied at call time.

A quantized layer has no float weight to patch. An adapter instead adds its own output to the layer's:
`y = base_strength * separable(x) + delta(x)`. A low-rank adapter computes `scale * up(mid(down(x)))`
with its small matrices, so no weight-sized tensor is built and the fused kernels stay in use. An
adapter of any other form gives its weight difference as a function, which builds that one layer's
difference inside the call and drops it after.

Adapters reach the layers the way scales do: through the model's router, for one forward, so that
model clones sharing modules never see each other's adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .functional import ConvGeometry
from .errors import UnsupportedError


@dataclass(frozen=True)
class LowRank:
    """down (r, in[, kh, kw]), optional mid (r, r, kh, kw) for convolutions, up (out, r[, 1, 1])."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None
    base_strength: float = 1.0

    def to(self, device: torch.device, dtype: torch.dtype, copy: bool = False) -> "LowRank":
        move = (lambda t: None if t is None else t.to(device=device, dtype=dtype, copy=copy))
        return LowRank(move(self.down), move(self.up), self.scale, move(self.mid), self.base_strength)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down.flatten(1)), self.up.flatten(1)) * self.scale

    def conv2d(self, x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
        if geo.groups != 1:
            raise UnsupportedError("a low-rank adapter on a grouped convolution is not supported")
        # The spatial kernel (and so the layer's stride, padding and dilation) sits on mid when there is one.
        if self.mid is None:
            h = F.conv2d(x, _as_conv(self.down), None, geo.stride, geo.padding, geo.dilation)
        else:
            h = F.conv2d(x, _as_conv(self.down))
            h = F.conv2d(h, self.mid, None, geo.stride, geo.padding, geo.dilation)
        return F.conv2d(h, _as_conv(self.up)) * self.scale


@dataclass(frozen=True)
class WeightDelta:
    """Any other adapter: `delta()` returns the layer's float weight difference (built per call)."""

    delta: Callable[[], torch.Tensor]
    base_strength: float = 1.0

    def to(self, device: torch.device, dtype: torch.dtype, copy: bool = False) -> "WeightDelta":
        # The difference is built anew at each call: a copy of nothing.
        delta = self.delta
        return WeightDelta(lambda: delta().to(device=device, dtype=dtype), self.base_strength)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta())

    def conv2d(self, x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
        return F.conv2d(x, self.delta(), None, geo.stride, geo.padding, geo.dilation, geo.groups)


Adapter = LowRank | WeightDelta


def _as_conv(w: torch.Tensor) -> torch.Tensor:
    return w if w.ndim == 4 else w[:, :, None, None]


def apply_adapters(y: torch.Tensor, bias: torch.Tensor | None, adapters: tuple[Adapter, ...],
                   out: Callable[[Adapter], torch.Tensor], channel_dim: int) -> torch.Tensor:
    """Adds each adapter's output to a layer output `y` (bias included), in order; a base strength
    other than 1 scales what the weight computed so far, not the bias (ComfyUI's strength_model)."""
    for a in adapters:
        if a.base_strength != 1.0:
            b = 0 if bias is None else bias.reshape([-1 if d == channel_dim % y.ndim else 1 for d in range(y.ndim)])
            y = (y - b) * a.base_strength + b
        y = y + out(a).to(y.dtype)
    return y
