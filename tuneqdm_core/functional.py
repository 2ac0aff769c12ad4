"""Separable quantized Linear and Conv2d: the torch reference path, and the one backend dispatcher.

For expert e and integer weight A = Q - z (group-wise: A = S * (Q - z), frozen steps S per group of
the input dimension, see quant.py) the layer computes

    y = s_out[e] * f(x * s_in[e], A) + b

so the float weight diag(s_out) A diag(s_in) never exists. Autograd keeps no weight-sized tensor
either: the custom functions save the input activation and references to the packed integers, and
rebuild A inside backward, used once and dropped. v = f(x * s_in, A), needed for the gradient of
s_out, is recomputed there too rather than stored, trading one matmul for an activation-sized buffer.

Each sample may use its own expert: `experts` holds one index per row of the batch, and the scale
gradients are accumulated into the (N, C) tables with index_add, so rows of experts no sample used
get exactly zero.

Backends (chosen here and nowhere else, per call, by `select_backend`):
  triton  CUDA tensors when triton imports: the fused packed-int4/int8 Linear kernels of the repo's
          `kernels` package (forward and backward, the weight unpacked in registers), and for Conv2d
          the Triton dequantize kernel feeding the vendor convolution (A exists only inside the call).
  torch   everything else: CPU tensors, float64, no triton, or the torch path forced for debugging
          with TUNEQDM_FORCE_TORCH=1 or `force_torch()`. This is the reference the kernels are
          tested against.
An explicit `backend="triton"` / `backend="torch"` argument overrides the choice (the tests run the
Triton path on CPU tensors under TRITON_INTERPRET=1 that way).

CPU inference in bfloat16 (opt-in, off by default): with TUNEQDM_CPU_BF16=auto (or
`cpu_inference_bf16("auto")`), a CPU float32 forward that builds no autograd graph (no_grad or
inference_mode, or nothing requiring grad) and is large enough (`BF16_MIN_FLOPS` floating-point operations or a
weight of `BF16_MIN_WEIGHT` elements) multiplies in bfloat16: x * s_in is written in bf16 (one
rounding), A is exact in bf16 (|A| <= 255), oneDNN accumulates in fp32 and returns bf16, and
s_out and the bias are applied in fp32 in the same pass that casts back. About 2x faster per large
layer on CPUs with bf16 dot instructions; relative error about 2.3e-3 per layer, 7e-3 at the output
of a random-weight SD 1.5 UNet (see `python -m tuneqdm_core.bench kernels`). "on" uses bf16 for
every such call regardless of size; "off" (the default) never. It is not the default because bf16
rounding is not continuous in the scales: sampling with scales that differ by 1e-5 (an fp16
round trip of the scales file) no longer agrees to 1e-3 over a sampler run on a chaotic random-weight
test model. Activations that already are bf16 (e.g. ComfyUI's --bf16-unet) compute in bf16 anyway.
Training (a graph is being built) always runs in the input dtype, exactly, whatever the mode.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import BackendUnavailableError, SettingError
from .quant import integer_weight

BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_BF16_MODES = ("auto", "on", "off")
# Below both, casting costs more than bf16 saves (a few tokens through a small weight).
BF16_MIN_FLOPS = 2**24
BF16_MIN_WEIGHT = 2**22
SLICE_ELEMENTS = 2**20  # at most 4 MiB of fp32 A at a time: smaller and faster here than 16 MiB


@dataclass(frozen=True)
class PackedWeight:
    """Everything needed to rebuild A of one layer (references, not copies): A = Q - z per output
    channel (group_size 0), or A = S * (Q - z) with a step S and zero z per group of `group_size`
    input values (quant.py); in both cases the layer's weight is diag(s_out) A diag(s_in)."""

    packed: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    group_scale: torch.Tensor | None = None
    group_size: int = 0

    def rows(self, sl: slice) -> "PackedWeight":
        """The output channels `sl` (codes are stored per output channel: a view, no copy)."""
        n = len(range(*sl.indices(self.shape[0])))
        gs = None if self.group_scale is None else self.group_scale[sl]
        return PackedWeight(self.packed[sl], self.zero[sl], self.bits, (n, *self.shape[1:]), gs, self.group_size)

    def to(self, device) -> "PackedWeight":
        """The same weight on `device` (tensors already there are kept)."""
        def mv(t):
            return t if t is None or t.device == device else t.to(device, non_blocking=True)
        return PackedWeight(mv(self.packed), mv(self.zero), self.bits, self.shape, mv(self.group_scale), self.group_size)

    def row_slices(self, groups: int = 1) -> list[slice]:
        """Output-channel slices whose float A stays under SLICE_ELEMENTS, so that a large layer's
        weight-sized temporaries (A, and the vendor kernel's reordered copy of it) stay small.
        Grouped convolutions are not sliced (a slice would have to follow the groups)."""
        out = self.shape[0]
        per_row = 1
        for d in self.shape[1:]:
            per_row *= d
        step = out if groups != 1 else max(1, SLICE_ELEMENTS // per_row)
        return [slice(i, min(i + step, out)) for i in range(0, out, step)]

    def integers(self, dtype: torch.dtype, backend: str = "torch") -> torch.Tensor:
        """A as `dtype` in the weight's shape (built per call; the name stays from the per-channel form)."""
        if backend == "triton":
            return _require_kernels().dequantize_codes(self.packed, self.zero, self.bits, self.shape, dtype,
                                                       self.group_scale, self.group_size)
        return integer_weight(self.packed, self.zero, self.bits, self.shape, dtype, self.group_scale,
                              self.group_size)


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


# ---------------------------------------------------------------- backend switches

class _Settings:
    """Process-wide switches (ComfyUI runs prompts in a worker thread: a thread-local switch set from
    elsewhere would not reach it). None defers to the environment variable."""

    force_torch: bool | None = None
    cpu_bf16: str | None = None


_settings = _Settings()
_kernels_state: dict = {}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def torch_forced() -> bool:
    """True when the torch path is forced: TUNEQDM_FORCE_TORCH=1 or an active `force_torch()`."""
    forced = _settings.force_torch
    return _env_flag("TUNEQDM_FORCE_TORCH") if forced is None else forced


def set_force_torch(enabled: bool | None) -> None:
    """Force (True) or allow (False) the Triton path, process-wide; None defers to TUNEQDM_FORCE_TORCH."""
    _settings.force_torch = enabled


@contextlib.contextmanager
def force_torch(enabled: bool = True) -> Iterator[None]:
    """`with force_torch():` runs every quantized layer through the torch reference path (debugging)."""
    saved = _settings.force_torch
    _settings.force_torch = enabled
    try:
        yield
    finally:
        _settings.force_torch = saved


def cpu_bf16_mode() -> str:
    mode = _settings.cpu_bf16
    if mode is None:
        mode = os.environ.get("TUNEQDM_CPU_BF16", "off").strip().lower() or "off"
        mode = {"1": "auto", "true": "auto", "yes": "auto", "0": "off", "false": "off", "no": "off"}.get(mode, mode)
    return mode if mode in CPU_BF16_MODES else "off"


def set_cpu_inference_bf16(mode: str | None) -> None:
    """'auto' (large no-grad CPU float32 calls in bf16), 'on' (all no-grad CPU float32 calls), 'off'
    (never, the default); None defers to TUNEQDM_CPU_BF16. Process-wide."""
    if mode is not None and mode not in CPU_BF16_MODES:
        raise SettingError(f"mode must be one of {CPU_BF16_MODES} or None, got {mode!r}")
    _settings.cpu_bf16 = mode


@contextlib.contextmanager
def cpu_inference_bf16(mode: str = "auto") -> Iterator[None]:
    saved = _settings.cpu_bf16
    set_cpu_inference_bf16(mode)
    try:
        yield
    finally:
        _settings.cpu_bf16 = saved


def _import_kernels():
    """The repo's `kernels` package: relative when the repo is imported as a package (inside ComfyUI),
    top-level when the repo root is on sys.path (tests, `python -m tuneqdm_core.bench`)."""
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed")
    try:
        from .. import kernels  # type: ignore[no-redef]
    except ImportError:
        if "." in (__package__ or ""):
            raise  # inside the pack's package: the pack's own kernels failed, report that
        import kernels  # type: ignore[no-redef]
    if not getattr(kernels, "TUNEQDM_KERNELS", False):
        raise ImportError(f"the `kernels` module found at {getattr(kernels, '__file__', '?')} is not TuneQDM's")
    return kernels


def _kernels():
    """The kernels module, or None (the reason is kept for `triton_status()`). Imported once."""
    if "module" not in _kernels_state:
        try:
            _kernels_state["module"], _kernels_state["error"] = _import_kernels(), None
        except Exception as e:  # noqa: BLE001 - any failure to import means: no Triton path
            _kernels_state["module"], _kernels_state["error"] = None, f"{type(e).__name__}: {e}"
    return _kernels_state["module"]


def _require_kernels():
    mod = _kernels()
    if mod is None:
        raise BackendUnavailableError(f"the Triton backend is unavailable: {_kernels_state['error']}")
    return mod


def triton_available() -> bool:
    return _kernels() is not None


def triton_status() -> str:
    """One line for logs and benchmarks: is the Triton path importable, and if not why."""
    return "triton kernels importable" if triton_available() else f"no triton path ({_kernels_state['error']})"


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """'torch' or 'triton' for a layer call on `x`: the explicit `backend` if given, else Triton on
    CUDA tensors of a supported dtype when triton imports and the torch path is not forced."""
    if backend not in (None, "auto"):
        if backend not in BACKENDS:
            raise SettingError(f"backend must be one of {BACKENDS}, 'auto' or None, got {backend!r}")
        return backend
    if torch_forced() or not x.is_cuda or x.dtype not in TRITON_DTYPES or x.numel() == 0:
        return "torch"
    return "triton" if triton_available() else "torch"


def _builds_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cpu_compute_dtype(x: torch.Tensor, flops: int, weight_numel: int) -> torch.dtype | None:
    """bf16 for a CPU float32 inference call under the current mode, else None (the input dtype)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    mode = cpu_bf16_mode()
    if mode == "off" or (mode == "auto" and flops < BF16_MIN_FLOPS and weight_numel < BF16_MIN_WEIGHT):
        return None
    return torch.bfloat16


# ---------------------------------------------------------------- torch path

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


def _scaled_input(x: torch.Tensor, s_rows: torch.Tensor, compute: torch.dtype | None) -> torch.Tensor:
    """u = x * s_in[e], written straight in the compute dtype (one pass over the activation)."""
    if compute is None or compute == x.dtype:
        return x * s_rows
    return torch.mul(x, s_rows, out=torch.empty_like(x, dtype=compute))


def _epilogue(v: torch.Tensor, s_out: torch.Tensor, bias: torch.Tensor | None, experts: torch.Tensor,
              dtype: torch.dtype, channel_dim: int) -> torch.Tensor:
    """v (in the compute dtype) -> s_out[e] * v + b in `dtype`: one pass, which also does the cast
    back from the compute dtype (type promotion to the fp32 scales)."""
    s_rows = _per_sample(s_out, experts, dtype, v.ndim, channel_dim)
    if bias is None:
        return torch.mul(v, s_rows)
    shape = [1] * v.ndim
    shape[channel_dim] = -1
    return torch.addcmul(bias.to(dtype).reshape(shape), v, s_rows)


def _sliced(weight: PackedWeight, groups: int, dtype: torch.dtype, backend: str, product, channel_dim: int):
    """product(A) computed one output-channel slice of A at a time, assembled along `channel_dim`."""
    slices = weight.row_slices(groups)
    if len(slices) == 1:
        return product(weight.integers(dtype, backend))
    out = None
    for sl in slices:
        part = product(weight.rows(sl).integers(dtype, backend))
        if out is None:
            shape = list(part.shape)
            shape[channel_dim] = weight.shape[0]
            out = part.new_empty(shape)
        out.narrow(channel_dim, sl.start, sl.stop - sl.start).copy_(part)
        del part
    return out


@dataclass(frozen=True)
class _Product:
    """v = f(u, A) of one layer kind, and what the shared forward and backward need of it."""

    channel_dim: int  # of the activation and the output; negative counts from the last
    groups: int  # convolution groups: A is sliced by output channels only when 1
    backend: str  # who builds A: torch ops, or the Triton dequantize kernel
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (u, A) -> v
    input_grad: Callable[[torch.Size, torch.Tensor, torch.Tensor], torch.Tensor]  # (u's shape, dv, A) -> du


_LINEAR = _Product(-1, 1, "torch", F.linear, lambda shape, dv, a: torch.matmul(dv, a))


def _conv_product(geo: ConvGeometry, backend: str) -> _Product:
    return _Product(1, geo.groups, backend,
                    lambda u, a: F.conv2d(u, a, None, geo.stride, geo.padding, geo.dilation, geo.groups),
                    lambda shape, dv, a: torch.nn.grad.conv2d_input(shape, a, dv, geo.stride, geo.padding,
                                                                    geo.dilation, geo.groups))


def _forward(x, s_in, s_out, bias, experts, weight: PackedWeight, op: _Product, compute: torch.dtype | None):
    """y = s_out[e] * f(x * s_in[e], A) + b, multiplying in `compute` (None: x's dtype)."""
    c = op.channel_dim % x.ndim
    u = _scaled_input(x, _per_sample(s_in, experts, x.dtype, x.ndim, c), compute)
    v = _sliced(weight, op.groups, compute or x.dtype, op.backend, lambda a: op.apply(u, a), c)
    del u
    return _epilogue(v, s_out, bias, experts, x.dtype, c)


class _Separable(torch.autograd.Function):
    """The torch path's autograd for both layer kinds, and the conv's on both backends: A comes from
    `weight.integers`, lives only inside the call, and is rebuilt in backward one slice of output
    channels at a time."""

    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, experts, weight: PackedWeight, op: _Product):
        y = _forward(x, s_in, s_out, bias, experts, weight, op, None)
        ctx.save_for_backward(x, s_in, s_out, experts)
        ctx.weight, ctx.op = weight, op
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, s_in, s_out, experts = ctx.saved_tensors
        need_x, need_in, need_out, need_b = ctx.needs_input_grad[:4]
        op = ctx.op
        dtype, n, c = x.dtype, s_in.shape[0], op.channel_dim % x.ndim
        grad_x = grad_in = grad_out = grad_b = None
        sin = _per_sample(s_in, experts, dtype, x.ndim, c) if need_out or need_x else None
        u = x * sin if need_out else None  # activation-sized: only when the s_out gradient needs it
        gv = g * _per_sample(s_out, experts, dtype, x.ndim, c) if need_x or need_in else None
        gu = None
        if need_out:
            grad_out = torch.empty(n, s_out.shape[1], dtype=torch.float32, device=x.device)
        for sl in ctx.weight.row_slices(op.groups):
            a = ctx.weight.rows(sl).integers(dtype, op.backend)
            width = sl.stop - sl.start
            if need_out:
                v = op.apply(u, a)
                grad_out[:, sl] = _expert_grad(g.narrow(c, sl.start, width) * v, experts, n, c)
                del v
            if need_x or need_in:
                part = op.input_grad(x.shape, gv.narrow(c, sl.start, width), a)
                gu = part if gu is None else gu.add_(part)
            del a
        if need_out:
            grad_out = grad_out.to(s_out.dtype)
        if need_x:
            grad_x = gu * sin
        if need_in:
            grad_in = _expert_grad(x * gu, experts, n, c).to(s_in.dtype)
        if need_b and ctx.has_bias:
            grad_b = g.float().sum(dim=[d for d in range(g.ndim) if d != c])
        return grad_x, grad_in, grad_out, grad_b, None, None, None


# ---------------------------------------------------------------- the dispatcher

def separable_linear(x: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, bias: torch.Tensor | None,
                     experts: torch.Tensor, weight: PackedWeight, *, backend: str | None = None) -> torch.Tensor:
    """x (B, ..., in); s_in (N, in); s_out (N, out); experts (B,) long. `backend`: see select_backend."""
    if select_backend(x, backend) == "triton":
        return _require_kernels().separable_linear(x, s_in, s_out, bias, experts, weight)
    if _builds_graph(x, s_in, s_out, bias):
        return _Separable.apply(x, s_in, s_out, bias, experts, weight, _LINEAR)
    n, k = weight.shape[0], weight.shape[1]
    rows = x.numel() // max(k, 1)
    return _forward(x, s_in, s_out, bias, experts, weight, _LINEAR, _cpu_compute_dtype(x, 2 * rows * n * k, n * k))


def separable_conv2d(x: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, bias: torch.Tensor | None,
                     experts: torch.Tensor, weight: PackedWeight, geo: ConvGeometry, *,
                     backend: str | None = None) -> torch.Tensor:
    """x (B, C_in, H, W) already padded for non-zero padding modes; s_in (N, C_in); s_out (N, C_out)."""
    chosen = select_backend(x, backend)
    op = _conv_product(geo, chosen)
    if _builds_graph(x, s_in, s_out, bias):
        return _Separable.apply(x, s_in, s_out, bias, experts, weight, op)
    compute = None
    if chosen == "torch":
        out_c, _, kh, kw = weight.shape
        ho = (x.shape[2] + 2 * geo.padding[0] - geo.dilation[0] * (kh - 1) - 1) // geo.stride[0] + 1
        wo = (x.shape[3] + 2 * geo.padding[1] - geo.dilation[1] * (kw - 1) - 1) // geo.stride[1] + 1
        rows = x.shape[0] * max(ho, 0) * max(wo, 0)
        per_out = weight.shape[1] * kh * kw
        compute = _cpu_compute_dtype(x, 2 * rows * out_c * per_out, out_c * per_out)
    return _forward(x, s_in, s_out, bias, experts, weight, op, compute)
