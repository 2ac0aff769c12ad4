"""Quantized drop-in replacements for Linear and Conv2d with separable, per-expert scales.

Buffers (frozen): `qweight` packed integer codes, `zero` zero points, `base_scale` the round-to-nearest
step s0. Parameters: `s_out` (N, out) and `s_in` (N, in), one row per timestep expert, plus a frozen
float `bias`. The dequantized weight of expert e is diag(s_out[e]) (Q - z) diag(s_in[e]); it is
never built (see functional.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import ConvGeometry, PackedWeight, separable_conv2d, separable_linear
from .quant import QuantizedWeight, check_bits, packed_width, quantize_weight
from .routing import ExpertRouter


class QuantLayer(nn.Module):
    """Shared state and behaviour of the quantized layers."""

    in_channels: int
    out_channels: int

    def _init_quant(self, out_channels: int, in_channels: int, k: int, bits: int, experts: int,
                    train_s_in: bool, has_bias: bool, device=None) -> None:
        self.bits = check_bits(bits)
        if experts < 1:
            raise ValueError(f"experts must be at least 1, got {experts}")
        self.num_experts = experts
        self.tuneqdm_name = ""
        self.router: ExpertRouter | None = None
        self.register_buffer("qweight", torch.zeros(out_channels, packed_width(k, bits), dtype=torch.uint8, device=device))
        self.register_buffer("zero", torch.zeros(out_channels, dtype=torch.uint8, device=device))
        self.register_buffer("base_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.s_out = nn.Parameter(torch.ones(experts, out_channels, device=device))
        self.s_in = nn.Parameter(torch.ones(experts, in_channels, device=device), requires_grad=train_s_in)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device), requires_grad=False) if has_bias else None

    def _set_quantized(self, qw: QuantizedWeight, bias: torch.Tensor | None, s_in_init: str,
                       s_in_sigma: float, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            self.qweight.copy_(qw.packed)
            self.zero.copy_(qw.zero)
            self.base_scale.copy_(qw.scale)
            self.s_out.copy_(qw.scale.expand_as(self.s_out))
            if s_in_init == "normal":
                noise = torch.randn(self.s_in.shape, generator=generator, device="cpu")
                self.s_in.copy_(1.0 + s_in_sigma * noise)
            elif s_in_init != "ones":
                raise ValueError(f"s_in_init must be 'ones' or 'normal', got {s_in_init!r}")
            if bias is not None:
                self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def packed_weight(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.zero, self.bits, self.weight_shape)

    def current_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_out, s_in) for this forward: the router's override if one is active, else our own."""
        router = self.router
        if router is not None and router.scales is not None:
            try:
                return router.scales[self.tuneqdm_name]
            except KeyError:
                raise KeyError(f"active scale set has no entry for layer {self.tuneqdm_name!r}") from None
        return self.s_out, self.s_in

    def _experts(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            if self.num_experts > 1:
                raise RuntimeError(f"layer {self.tuneqdm_name!r} has {self.num_experts} experts but no router")
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.router.experts_for_batch(x.shape[0], x.device)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, bits={self.bits}, experts={self.num_experts}, "
                f"train_s_in={self.s_in.requires_grad}, bias={self.bias is not None}")


class QuantLinear(QuantLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 experts: int = 1, train_s_in: bool = True, device=None) -> None:
        super().__init__()
        self.in_channels = self.in_features = in_features
        self.out_channels = self.out_features = out_features
        self.weight_shape = (out_features, in_features)
        self._init_quant(out_features, in_features, in_features, bits, experts, train_s_in, bias, device)

    @classmethod
    def from_float(cls, layer: nn.Linear, *, bits: int, experts: int, train_s_in: bool = True,
                   s_in_init: str = "ones", s_in_sigma: float = 0.01, generator: torch.Generator | None = None,
                   compute_device: torch.device | None = None, weight: torch.Tensor | None = None) -> "QuantLinear":
        """`weight` replaces the layer's own weight (same shape) when given."""
        device = layer.weight.device
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, bits=bits, experts=experts,
                train_s_in=train_s_in, device=device)
        qw = _quantize_on(layer.weight if weight is None else weight, bits, compute_device)
        q._set_quantized(qw, layer.bias, s_in_init, s_in_sigma, generator)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_out, s_in = self.current_scales()
        if x.ndim == 1:
            return self.forward(x[None])[0]
        return separable_linear(x, s_in, s_out, self.bias, self._experts(x), self.packed_weight)


class QuantConv2d(QuantLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, bits: int = 4,
                 experts: int = 1, train_s_in: bool = True, device=None) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        if isinstance(padding, str):
            raise ValueError("string padding ('same'/'valid') is not supported; give explicit padding")
        self.padding, self.groups, self.padding_mode = pair(padding), groups, padding_mode
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        k = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self._init_quant(out_channels, in_channels, k, bits, experts, train_s_in, bias, device)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, *, bits: int, experts: int, train_s_in: bool = True,
                   s_in_init: str = "ones", s_in_sigma: float = 0.01, generator: torch.Generator | None = None,
                   compute_device: torch.device | None = None, weight: torch.Tensor | None = None) -> "QuantConv2d":
        """`weight` replaces the layer's own weight (same shape) when given."""
        q = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, bits=bits,
                experts=experts, train_s_in=train_s_in, device=layer.weight.device)
        qw = _quantize_on(layer.weight if weight is None else weight, bits, compute_device)
        q._set_quantized(qw, layer.bias, s_in_init, s_in_sigma, generator)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_out, s_in = self.current_scales()
        padding = self.padding
        if self.padding_mode != "zeros":
            # Scaling input channels commutes with reflect/replicate/circular padding, so pad first.
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        geo = ConvGeometry(self.stride, padding, self.dilation, self.groups)
        return separable_conv2d(x, s_in, s_out, self.bias, self._experts(x), self.packed_weight, geo)


def _quantize_on(weight: torch.Tensor, bits: int, compute_device: torch.device | None) -> QuantizedWeight:
    """Quantize on `compute_device` (a GPU makes this many times faster) and bring the small results
    back to the weight's own device."""
    if compute_device is None or torch.device(compute_device) == weight.device:
        return quantize_weight(weight, bits)
    qw = quantize_weight(weight.to(compute_device), bits)
    home = weight.device
    return QuantizedWeight(qw.packed.to(home), qw.zero.to(home), qw.scale.to(home), qw.shape, qw.bits)
