"""Quantized drop-in replacements for Linear and Conv2d with separable, per-expert scales.

Buffers (frozen): `qweight` packed integer codes, `zero` zero points, `base_scale` the step s0 per
output channel, and, for group-wise layers (`group_size` > 0), `group_scale`: each group's step
relative to s0 as a step code (quant.py; float16 in layers read from older files), with `zero` and
`group_scale` then one cell per group each, packed like the codes (packing.py). Parameters: `s_out`
(N, out) and `s_in` (N, in), one row per timestep expert, plus a frozen float `bias`. The dequantized weight of expert e is diag(s_out[e]) (Q - z) diag(s_in[e]), or
diag(s_out[e]) (S * (Q - z)) diag(s_in[e]) group-wise; it is never built (see functional.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, LowRank, apply_adapters
from .errors import MissingScalesError, ModelMismatchError, RoutingError, SettingError, UnsupportedError
from .functional import ConvGeometry, PackedWeight, separable_conv2d, separable_linear
from .heap import release_freed_memory
from .packing import check_bits, empty_group_cells, packed_width
from .quant import QuantizedWeight, check_group_size, num_groups, quantize_weight
from .routing import ExpertRouter


PLACEHOLDER = "weight"
# CPU inference hands freed heap pages back after layers at least this large: the float weight such a layer
# builds and drops, and the activations freed since, would otherwise stay resident. Measured on the full-size
# SD1.5 UNet at a 64x64 latent, batch 2: one forward's peak above the loaded model 0.53 GB, 0.35 GB with this,
# and the same time (17 s); after every layer 0.30 GB but 10% slower.
RELEASE_MIN_VALUES = 2**20


class QuantLayer(nn.Module):
    """Shared state and behaviour of the quantized layers.

    A layer whose tensors live on another device than its input (a host that offloads some layers and
    keeps the rest on the GPU) moves them to the input's device for that one call. `comfy_cast_weights`
    is the attribute by which ComfyUI's model patcher recognises a layer that can be offloaded that
    way; the layer behaves the same whatever the patcher sets it to.
    """

    in_channels: int
    out_channels: int
    comfy_cast_weights = False

    def _init_quant(self, out_channels: int, in_channels: int, k: int, bits: int, experts: int,
                    train_s_in: bool, has_bias: bool, device=None, group_size: int = 0,
                    step_codes: bool = True) -> None:
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size)
        if experts < 1:
            raise SettingError(f"experts must be at least 1, got {experts}")
        self.num_experts = experts
        self.tuneqdm_name = ""
        self.router: ExpertRouter | None = None
        # No float weight exists. An empty `weight` keeps the layer's `<name>.weight` key in the state dict,
        # the key by which hosts address a layer's weight (ComfyUI maps LoRA keys and keeps patches by it);
        # the patches then reach the layer as adapters (adapters.py). Files never store it.
        self.register_buffer(PLACEHOLDER, torch.empty(0, device=device))
        self.register_buffer("qweight", torch.zeros(out_channels, packed_width(k, bits), dtype=torch.uint8, device=device))
        if self.group_size:
            zero, steps = empty_group_cells(out_channels, num_groups(k, self.group_size), bits, step_codes, device)
            self.register_buffer("zero", zero)
            self.register_buffer("group_scale", steps)
        else:
            self.register_buffer("zero", torch.zeros(out_channels, dtype=torch.uint8, device=device))
            self.group_scale = None  # not a buffer: per-channel state dicts (and files) are as they always were
        self.register_buffer("base_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.s_out = nn.Parameter(torch.ones(experts, out_channels, device=device))
        self.s_in = nn.Parameter(torch.ones(experts, in_channels, device=device), requires_grad=train_s_in)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device), requires_grad=False) if has_bias else None

    @classmethod
    def from_float(cls, layer: nn.Linear | nn.Conv2d, *, bits: int, experts: int, train_s_in: bool = True,
                   s_in_init: str = "ones", s_in_sigma: float = 0.01, generator: torch.Generator | None = None,
                   compute_device: torch.device | None = None, weight: torch.Tensor | None = None,
                   device: torch.device | str | None = None, group_size: int = 0,
                   minimize: bool = True) -> QuantLayer:
        """The quantized twin of a float `layer` (an nn.Linear for QuantLinear, an nn.Conv2d for
        QuantConv2d). `weight` replaces the layer's own weight (same shape) when given; the layer is built
        on `device` (default: the weight's). `group_size` 0: one step per output channel; else per group
        of that many input values, `minimize` refining each group's step and zero (quant.py)."""
        weight = layer.weight if weight is None else weight
        device = weight.device if device is None else torch.device(device)
        q = cls._shaped_like(layer, bits=bits, experts=experts, train_s_in=train_s_in, device=device,
                             group_size=group_size)
        qw = _quantize_on(weight, bits, compute_device, device, group_size, minimize)
        q._set_quantized(qw, layer.bias, s_in_init, s_in_sigma, generator)
        return q

    @classmethod
    def _shaped_like(cls, layer: nn.Module, **options) -> QuantLayer:
        """An empty layer of this kind with `layer`'s geometry; `options` are the quantization's."""
        raise NotImplementedError

    def _set_quantized(self, qw: QuantizedWeight, bias: torch.Tensor | None, s_in_init: str,
                       s_in_sigma: float, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            self.qweight.copy_(qw.packed)
            if qw.group_size != self.group_size:
                raise ModelMismatchError(f"quantized with group size {qw.group_size}, the layer has {self.group_size}")
            self.zero.copy_(qw.zero)
            if self.group_scale is not None:
                if qw.group_scale.dtype != self.group_scale.dtype or qw.group_scale.shape != self.group_scale.shape:
                    raise ModelMismatchError(f"group steps {qw.group_scale.dtype} {tuple(qw.group_scale.shape)} "
                                             f"do not fit the layer's {self.group_scale.dtype} {tuple(self.group_scale.shape)}")
                self.group_scale.copy_(qw.group_scale)
            self.base_scale.copy_(qw.scale)
            self.s_out.copy_(qw.scale.expand_as(self.s_out))
            if s_in_init == "normal":
                noise = torch.randn(self.s_in.shape, generator=generator, device="cpu")
                self.s_in.copy_(1.0 + s_in_sigma * noise)
            elif s_in_init != "ones":
                raise SettingError(f"s_in_init must be 'ones' or 'normal', got {s_in_init!r}")
            if bias is not None:
                self.bias = nn.Parameter(bias.detach().to(self.qweight.device, copy=True), requires_grad=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + PLACEHOLDER, torch.empty(0, device=self.qweight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def packed_weight(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.zero, self.bits, self.weight_shape, self.group_scale, self.group_size)

    def current_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_out, s_in) for this forward: the router's override if one is active, else our own."""
        router = self.router
        if router is not None and router.scales is not None:
            try:
                return router.scales[self.tuneqdm_name]
            except KeyError:
                raise MissingScalesError(f"active scale set has no entry for layer {self.tuneqdm_name!r}") from None
        return self.s_out, self.s_in

    def operands(self, x: torch.Tensor) -> tuple[PackedWeight, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(packed weight, s_out, s_in, bias) on x's device, moved for this call only where they live
        elsewhere (`.to` keeps the scales' autograd graph)."""
        s_out, s_in = self.current_scales()
        packed, bias, dev = self.packed_weight, self.bias, x.device
        if self.qweight.device != dev:
            packed = packed.to(dev)
        if bias is not None and bias.device != dev:
            bias = bias.to(dev, non_blocking=True)
        return packed, s_out.to(dev, non_blocking=True), s_in.to(dev, non_blocking=True), bias

    def adapters(self) -> tuple[Adapter, ...]:
        router = self.router
        if router is None or not router.adapters:
            return ()
        return router.adapters.get(self.tuneqdm_name, ())

    def _released(self, y: torch.Tensor) -> torch.Tensor:
        if y.device.type == "cpu" and not torch.is_grad_enabled() and self.weight_numel >= RELEASE_MIN_VALUES:
            release_freed_memory()
        return y

    @property
    def weight_numel(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    def _with_adapters(self, y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       out: Callable[[Adapter, torch.Tensor], torch.Tensor], channel_dim: int) -> torch.Tensor:
        adapters = self.adapters()
        if not adapters:
            return y
        moved = tuple(a if _matches(a, x) else a.to(x.device, x.dtype) for a in adapters)
        return apply_adapters(y, bias, moved, lambda a: out(a, x), channel_dim)

    def _experts(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            if self.num_experts > 1:
                raise RoutingError(f"layer {self.tuneqdm_name!r} has {self.num_experts} experts but no router")
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.router.experts_for_batch(x.shape[0], x.device)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"{self.in_channels}, {self.out_channels}, bits={self.bits}{group}, experts={self.num_experts}, "
                f"train_s_in={self.s_in.requires_grad}, bias={self.bias is not None}")


class QuantLinear(QuantLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 experts: int = 1, train_s_in: bool = True, device=None, group_size: int = 0,
                 step_codes: bool = True) -> None:
        super().__init__()
        self.in_channels = self.in_features = in_features
        self.out_channels = self.out_features = out_features
        self.weight_shape = (out_features, in_features)
        self._init_quant(out_features, in_features, in_features, bits, experts, train_s_in, bias, device, group_size,
                         step_codes)

    @classmethod
    def _shaped_like(cls, layer: nn.Linear, **options) -> "QuantLinear":
        return cls(layer.in_features, layer.out_features, layer.bias is not None, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            return self.forward(x[None])[0]
        packed, s_out, s_in, bias = self.operands(x)
        y = separable_linear(x, s_in, s_out, bias, self._experts(x), packed)
        return self._released(self._with_adapters(y, x, bias, lambda a, h: a.linear(h), -1))


class QuantConv2d(QuantLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, bits: int = 4,
                 experts: int = 1, train_s_in: bool = True, device=None, group_size: int = 0,
                 step_codes: bool = True) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        if isinstance(padding, str):
            raise UnsupportedError("string padding ('same'/'valid') is not supported; give explicit padding")
        self.padding, self.groups, self.padding_mode = pair(padding), groups, padding_mode
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        k = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self._init_quant(out_channels, in_channels, k, bits, experts, train_s_in, bias, device, group_size, step_codes)

    @classmethod
    def _shaped_like(cls, layer: nn.Conv2d, **options) -> "QuantConv2d":
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, s_out, s_in, bias = self.operands(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            # Scaling input channels commutes with reflect/replicate/circular padding, so pad first.
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        geo = ConvGeometry(self.stride, padding, self.dilation, self.groups)
        y = separable_conv2d(x, s_in, s_out, bias, self._experts(x), packed, geo)
        return self._released(self._with_adapters(y, x, bias, lambda a, h: a.conv2d(h, geo), 1))


def _quantize_on(weight: torch.Tensor, bits: int, compute_device: torch.device | None,
                 home: torch.device, group_size: int = 0, minimize: bool = True) -> QuantizedWeight:
    """Quantize on `compute_device` (a GPU makes this many times faster) and bring the small results
    to `home`, where the layer lives."""
    qw = quantize_weight(weight if compute_device is None else weight.to(compute_device), bits, group_size, minimize)
    gs = None if qw.group_scale is None else qw.group_scale.to(home)
    return QuantizedWeight(qw.packed.to(home), qw.zero.to(home), qw.scale.to(home), qw.shape, qw.bits, gs,
                           qw.group_size)


def _matches(adapter: Adapter, x: torch.Tensor) -> bool:
    if isinstance(adapter, LowRank):
        return adapter.down.device == x.device and adapter.down.dtype == x.dtype
    return False  # a WeightDelta's difference is built per call and cast to x on the way
