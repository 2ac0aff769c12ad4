"""Separable quantized Linear and Conv2d, torch reference path.

For expert e and integer weight A = Q - z the layer computes

    y = s_out[e] * f(x * s_in[e], A) + b

so the float weight diag(s_out) A diag(s_in) never exists. Autograd keeps no weight-sized tensor
either: the custom functions save the input activation and references to the packed integers, and
rebuild A inside backward, used once and dropped. v = f(x * s_in, A), needed for the gradient of
s_out, is recomputed there too rather than stored, trading one matmul for an activation-sized buffer.

Each sample may use its own expert: `experts` holds one index per row of the batch, and the scale
gradients are accumulated into the (N, C) tables with index_add, so rows of experts no sample used
get exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import integer_weight


@dataclass(frozen=True)
class PackedWeight:
    """Everything needed to rebuild A = Q - z of one layer (references, not copies)."""

    packed: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: tuple[int, ...]

    def integers(self, dtype: torch.dtype) -> torch.Tensor:
        return integer_weight(self.packed, self.zero, self.bits, self.shape, dtype)


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _per_sample(table: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype, ndim: int,
                channel_dim: int) -> torch.Tensor:
    """Rows of `table` (N, C) for each sample, shaped to broadcast against an ndim activation."""
    rows = table.index_select(0, experts).to(dtype)
    shape = [rows.shape[0]] + [1] * (ndim - 1)
    shape[channel_dim] = rows.shape[1]
    return rows.reshape(shape)


def _expert_grad(prod: torch.Tensor, experts: torch.Tensor, num_experts: int, channel_dim: int) -> torch.Tensor:
    """Sum a (B, ...) product over everything but batch and channel, then per expert: (N, C)."""
    dims = [d for d in range(1, prod.ndim) if d != channel_dim]
    per_sample = prod.float().sum(dim=dims) if dims else prod.float()
    out = torch.zeros(num_experts, per_sample.shape[1], dtype=torch.float32, device=prod.device)
    return out.index_add_(0, experts, per_sample)


class _SeparableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, experts, weight: PackedWeight):
        a = weight.integers(x.dtype)
        v = F.linear(x * _per_sample(s_in, experts, x.dtype, x.ndim, x.ndim - 1), a)
        del a
        y = v * _per_sample(s_out, experts, x.dtype, x.ndim, x.ndim - 1)
        if bias is not None:
            y = y + bias.to(x.dtype)
        ctx.save_for_backward(x, s_in, s_out, experts)
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, s_in, s_out, experts = ctx.saved_tensors
        need_x, need_in, need_out, need_b = ctx.needs_input_grad[:4]
        dtype, n, c = x.dtype, s_in.shape[0], x.ndim - 1
        a = ctx.weight.integers(dtype)
        grad_x = grad_in = grad_out = grad_b = None
        sin = _per_sample(s_in, experts, dtype, x.ndim, c)
        if need_out:
            v = F.linear(x * sin, a)
            grad_out = _expert_grad(g * v, experts, n, c).to(s_out.dtype)
            del v
        if need_x or need_in:
            gu = torch.matmul(g * _per_sample(s_out, experts, dtype, x.ndim, c), a)
            if need_x:
                grad_x = gu * sin
            if need_in:
                grad_in = _expert_grad(x * gu, experts, n, c).to(s_in.dtype)
        if need_b and ctx.has_bias:
            grad_b = g.reshape(-1, g.shape[-1]).float().sum(0)
        return grad_x, grad_in, grad_out, grad_b, None, None


class _SeparableConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, experts, weight: PackedWeight, geo: ConvGeometry):
        a = weight.integers(x.dtype)
        v = F.conv2d(x * _per_sample(s_in, experts, x.dtype, 4, 1), a, None,
                     geo.stride, geo.padding, geo.dilation, geo.groups)
        del a
        y = v * _per_sample(s_out, experts, x.dtype, 4, 1)
        if bias is not None:
            y = y + bias.to(x.dtype).reshape(1, -1, 1, 1)
        ctx.save_for_backward(x, s_in, s_out, experts)
        ctx.weight, ctx.geo = weight, geo
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, s_in, s_out, experts = ctx.saved_tensors
        need_x, need_in, need_out, need_b = ctx.needs_input_grad[:4]
        geo, dtype, n = ctx.geo, x.dtype, s_in.shape[0]
        a = ctx.weight.integers(dtype)
        grad_x = grad_in = grad_out = grad_b = None
        u = x * _per_sample(s_in, experts, dtype, 4, 1)
        if need_out:
            v = F.conv2d(u, a, None, geo.stride, geo.padding, geo.dilation, geo.groups)
            grad_out = _expert_grad(g * v, experts, n, 1).to(s_out.dtype)
            del v
        if need_x or need_in:
            gu = torch.nn.grad.conv2d_input(u.shape, a, g * _per_sample(s_out, experts, dtype, 4, 1),
                                            geo.stride, geo.padding, geo.dilation, geo.groups)
            if need_x:
                grad_x = gu * _per_sample(s_in, experts, dtype, 4, 1)
            if need_in:
                grad_in = _expert_grad(x * gu, experts, n, 1).to(s_in.dtype)
        if need_b and ctx.has_bias:
            grad_b = g.float().sum(dim=(0, 2, 3))
        return grad_x, grad_in, grad_out, grad_b, None, None, None


def separable_linear(x: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, bias: torch.Tensor | None,
                     experts: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """x (B, ..., in); s_in (N, in); s_out (N, out); experts (B,) long."""
    return _SeparableLinear.apply(x, s_in, s_out, bias, experts, weight)


def separable_conv2d(x: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, bias: torch.Tensor | None,
                     experts: torch.Tensor, weight: PackedWeight, geo: ConvGeometry) -> torch.Tensor:
    """x (B, C_in, H, W) already padded for non-zero padding modes; s_in (N, C_in); s_out (N, C_out)."""
    return _SeparableConv2d.apply(x, s_in, s_out, bias, experts, weight, geo)
