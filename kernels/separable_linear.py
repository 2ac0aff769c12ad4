"""Fused separable quantized Linear in Triton, forward and backward.

For rows m of the flattened activation x (M, K), each carrying the expert index e_m of its sample,
packed integer weight A = Q - z (N, K) (group-wise S * (Q - z), see dequant.py) and per-expert scale tables s_in (E, K), s_out (E, N):

    forward        y[m, :]  = s_out[e_m] * ((x[m] * s_in[e_m]) @ A^T) + b
    input grad     gu[m, :] = (dy[m] * s_out[e_m]) @ A,   dx[m] = gu[m] * s_in[e_m]
    scale grads    ds_out[e] = sum_{m: e_m = e} dy[m] * v[m],  v = (x * s_in[e]) @ A^T (the forward
                   kernel without its s_out epilogue), ds_in[e] = sum_{m: e_m = e} x[m] * gu[m]

The weight tile is unpacked in registers (two 4-bit codes per byte, or one 8-bit code), the zero
point subtracted, and `tl.dot` accumulates in fp32. No float weight is ever written to memory, and
autograd keeps only the activation and references to the packed codes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .core import errors
from .dequant import group_args, int_to_float, interpreting, weight_tile

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time so that neighbouring
    programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _scaled_tile(row_ptrs, scale_row_ptrs, offs, mask, stride, DOT_DTYPE: tl.constexpr):
    """Rows of an activation (or output gradient) tile at columns `offs`, times each row's expert scale
    row, in fp32 and then cast for tl.dot."""
    t = tl.load(row_ptrs + offs[None, :] * stride, mask=mask, other=0.0)
    s = tl.load(scale_row_ptrs + offs[None, :], mask=mask, other=0.0)
    return (t.to(tl.float32) * s.to(tl.float32)).to(DOT_DTYPE)


@triton.jit
def _linear_fwd_kernel(x_ptr, w_ptr, zero_ptr, gs_ptr, s_in_ptr, s_out_ptr, bias_ptr, rows_ptr, y_ptr,
                       M, N, K, stride_xm, stride_xk, stride_wn, stride_zn, stride_gn, GROUP,
                       stride_sin, stride_sout, stride_ym,
                       PACKED: tl.constexpr, GROUPED: tl.constexpr, STEP_LEVELS: tl.constexpr,
                       APPLY_S_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    expert = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    s_in_rows = s_in_ptr + expert.to(tl.int64)[:, None] * stride_sin
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        u = _scaled_tile(x_rows, s_in_rows, offs_k, mask, stride_xk, DOT_DTYPE)
        a = weight_tile(w_ptr, zero_ptr, gs_ptr, offs_n, k0, N, K, stride_wn, stride_zn, stride_gn, GROUP,
                        PACKED, GROUPED, STEP_LEVELS, BLOCK_N, BLOCK_K)
        acc = tl.dot(u, tl.trans(int_to_float(a, DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if APPLY_S_OUT:
        s_o = tl.load(s_out_ptr + expert.to(tl.int64)[:, None] * stride_sout + offs_n[None, :], mask=out_mask,
                      other=0.0)
        acc = acc * s_o.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc + b.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_input_grad_kernel(g_ptr, w_ptr, zero_ptr, gs_ptr, s_in_ptr, s_out_ptr, rows_ptr, gu_ptr, gx_ptr,
                              M, N, K, stride_gm, stride_gn, stride_wn, stride_zn, stride_sn, GROUP,
                              stride_sin, stride_sout, stride_om,
                              PACKED: tl.constexpr, GROUPED: tl.constexpr, STEP_LEVELS: tl.constexpr,
                              STORE_GU: tl.constexpr, STORE_GX: tl.constexpr,
                              DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    # Output tile (BLOCK_M, BLOCK_K) of gu = (dy * s_out[e]) @ A; the loop runs over the N output
    # channels, reading the weight tile (BLOCK_N, BLOCK_K) as it lies (A, not A^T).
    pid_m, pid_k = _grouped_pid(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    expert = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    s_out_rows = s_out_ptr + expert.to(tl.int64)[:, None] * stride_sout
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = m_mask[:, None] & (offs_n < N)[None, :]
        gs = _scaled_tile(g_rows, s_out_rows, offs_n, mask, stride_gn, DOT_DTYPE)
        a = weight_tile(w_ptr, zero_ptr, gs_ptr, offs_n, k0, N, K, stride_wn, stride_zn, stride_sn, GROUP,
                        PACKED, GROUPED, STEP_LEVELS, BLOCK_N, BLOCK_K)
        acc = tl.dot(gs, int_to_float(a, DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    out_mask = m_mask[:, None] & k_mask[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :]
    if STORE_GU:
        tl.store(gu_ptr + out_offs, acc.to(gu_ptr.dtype.element_ty), mask=out_mask)
    if STORE_GX:
        s_i = tl.load(s_in_ptr + expert.to(tl.int64)[:, None] * stride_sin + offs_k[None, :], mask=out_mask,
                      other=0.0)
        tl.store(gx_ptr + out_offs, (acc * s_i.to(tl.float32)).to(gx_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------- launch helpers

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _dot_dtype(dtype: torch.dtype):
    if dtype not in _DOT_DTYPES:
        raise errors.UnsupportedDtypeError(
            f"the Triton separable linear supports float16, bfloat16 and float32 activations, got {dtype}")
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32  # the interpreter's bf16 dot is wrong (HOST.md); bf16 -> fp32 is exact
    return _DOT_DTYPES[dtype]


def _input_precision(dtype: torch.dtype) -> str:
    # Match what torch does for an fp32 matmul: TF32 only where torch is allowed to use it.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _blocks(rows: int, cols: int, red: int) -> tuple[int, int, int, int, int]:
    """Default (BLOCK_rows, BLOCK_cols, BLOCK_red, num_warps, num_stages) for (rows x red) @ (red x cols)."""
    if interpreting():  # every block iteration costs milliseconds: a few large blocks
        return _pow2(rows, 2, 64), _pow2(cols, 2, 128), _pow2(red, 2, 128), 4, 1
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    bc = 128 if bm >= 64 else 64
    return bm, bc, 64, (8 if bm * bc >= 128 * 128 else 4), 3


GROUP_M = 8


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_forward(x2: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor | None, bias: torch.Tensor | None,
                   row_experts: torch.Tensor, packed: torch.Tensor, zero: torch.Tensor, bits: int, n_out: int,
                   out_dtype: torch.dtype | None = None, blocks: dict | None = None,
                   group_scale: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """(M, K) activation rows -> (M, N). `s_out=None` leaves out the s_out epilogue (that is v)."""
    m, k = x2.shape
    out = torch.empty(m, n_out, dtype=out_dtype or x2.dtype, device=x2.device)
    if m == 0 or n_out == 0:
        return out
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out
    s_in = s_in.contiguous()
    s_out_t = s_in if s_out is None else s_out.contiguous()
    bm, bn, bk, warps, stages = _blocks(m, n_out, k)
    if blocks:
        bm, bn, bk = blocks.get("BLOCK_M", bm), blocks.get("BLOCK_N", bn), blocks.get("BLOCK_K", bk)
        warps, stages = blocks.get("num_warps", warps), blocks.get("num_stages", stages)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)
    zero, gs, stride_zn, stride_gn, group, layout = group_args(zero, group_scale, group_size, bits)
    _linear_fwd_kernel[grid](
        x2, packed, zero, gs, s_in, s_out_t, bias if bias is not None else s_in, row_experts, out,
        m, n_out, k, x2.stride(0), x2.stride(1), packed.stride(0), stride_zn, stride_gn, group,
        s_in.stride(0), s_out_t.stride(0), out.stride(0),
        **layout, APPLY_S_OUT=s_out is not None, HAS_BIAS=bias is not None,
        DOT_DTYPE=_dot_dtype(x2.dtype), INPUT_PRECISION=_input_precision(x2.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return out


def linear_input_grad(g2: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, row_experts: torch.Tensor,
                      packed: torch.Tensor, zero: torch.Tensor, bits: int, k: int, *, want_gu: bool, want_gx: bool,
                      out_dtype: torch.dtype | None = None, blocks: dict | None = None,
                      group_scale: torch.Tensor | None = None, group_size: int = 0
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(M, N) output gradient -> (gu, grad_x), each (M, K) or None: gu = (dy * s_out[e]) @ A in float32
    (it feeds the s_in gradient) and grad_x = gu * s_in[e] in `out_dtype` (default: dy's)."""
    m, n = g2.shape
    gu = torch.empty(m, k, dtype=torch.float32, device=g2.device) if want_gu else None
    gx = torch.empty(m, k, dtype=out_dtype or g2.dtype, device=g2.device) if want_gx else None
    if m == 0 or k == 0 or not (want_gu or want_gx):
        return gu, gx
    if n == 0:
        return (None if gu is None else gu.zero_()), (None if gx is None else gx.zero_())
    s_in, s_out = s_in.contiguous(), s_out.contiguous()
    bm, bk, bn, warps, stages = _blocks(m, k, n)  # output columns run over K, the reduction over N
    if blocks:
        bm, bn, bk = blocks.get("BLOCK_M", bm), blocks.get("BLOCK_N", bn), blocks.get("BLOCK_K", bk)
        warps, stages = blocks.get("num_warps", warps), blocks.get("num_stages", stages)
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    some = gu if gu is not None else gx  # stands in for the one not stored; both are contiguous (M, K)
    zero, gs, stride_zn, stride_gn, group, layout = group_args(zero, group_scale, group_size, bits)
    _linear_input_grad_kernel[grid](
        g2, packed, zero, gs, s_in, s_out, row_experts, gu if gu is not None else some, gx if gx is not None else some,
        m, n, k, g2.stride(0), g2.stride(1), packed.stride(0), stride_zn, stride_gn, group,
        s_in.stride(0), s_out.stride(0), k,
        **layout, STORE_GU=want_gu, STORE_GX=want_gx,
        DOT_DTYPE=_dot_dtype(g2.dtype), INPUT_PRECISION=_input_precision(g2.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    return gu, gx


# ---------------------------------------------------------------- autograd

def row_experts_of(experts: torch.Tensor, batch: int, rows: int) -> torch.Tensor:
    """Per-sample experts (B,) -> one int32 expert per row of the (B * rows_per_sample, K) view."""
    e = experts.reshape(-1).to(device=experts.device, dtype=torch.int32)
    if e.numel() != batch:
        raise errors.RoutingError(f"{e.numel()} expert indices for a batch of {batch}")
    per = rows // batch if batch else 0
    return e.repeat_interleave(per) if per != 1 else e.contiguous()


def _groups(weight) -> dict:
    """The group-wise fields of a PackedWeight-like `weight` (absent on per-channel ones)."""
    return {"group_scale": getattr(weight, "group_scale", None), "group_size": getattr(weight, "group_size", 0)}


def _expert_sum(rows: torch.Tensor, row_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(num_experts, rows.shape[1], dtype=torch.float32, device=rows.device)
    return out.index_add_(0, row_experts, rows)


class SeparableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s_in, s_out, bias, experts, weight, blocks):
        k, n = weight.shape[1], weight.shape[0]
        if x.shape[-1] != k:
            raise errors.ShapeError(f"input has {x.shape[-1]} features, the weight expects {k}")
        batch = x.shape[0]
        x2 = _rows_of(x.reshape(-1, k))
        rows = row_experts_of(experts.to(x.device), batch, x2.shape[0])
        y = linear_forward(x2, s_in, s_out, bias, rows, weight.packed, weight.zero, weight.bits, n, blocks=blocks,
                           **_groups(weight))
        ctx.save_for_backward(x2, s_in, s_out, rows)
        ctx.weight, ctx.blocks, ctx.has_bias = weight, blocks, bias is not None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, g):
        x2, s_in, s_out, rows = ctx.saved_tensors
        need_x, need_in, need_out, need_b = ctx.needs_input_grad[:4]
        w, blocks = ctx.weight, ctx.blocks
        n, k, num = w.shape[0], w.shape[1], s_in.shape[0]
        g2 = _rows_of(g.reshape(-1, n).to(x2.dtype))
        grad_x = grad_in = grad_out = grad_b = None
        if need_out:
            v = linear_forward(x2, s_in, None, None, rows, w.packed, w.zero, w.bits, n, out_dtype=torch.float32,
                               blocks=blocks, **_groups(w))
            grad_out = _expert_sum(v.mul_(g2), rows, num).to(s_out.dtype)
            del v
        if need_x or need_in:
            gu, gx = linear_input_grad(g2, s_in, s_out, rows, w.packed, w.zero, w.bits, k, want_gu=need_in,
                                       want_gx=need_x, blocks=blocks, **_groups(w))
            if need_x:
                grad_x = gx.reshape(ctx.x_shape)
            if need_in:
                grad_in = _expert_sum(gu.mul_(x2), rows, num).to(s_in.dtype)
        if need_b and ctx.has_bias:
            grad_b = g2.float().sum(0)
        return grad_x, grad_in, grad_out, grad_b, None, None, None


def separable_linear(x: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, bias: torch.Tensor | None,
                     experts: torch.Tensor, weight, blocks: dict | None = None) -> torch.Tensor:
    """The Triton separable Linear. `weight` has `packed`, `zero`, `bits`, `shape` (out, in) and, group-wise,
    `group_scale` and `group_size`, like tuneqdm_core.functional.PackedWeight. x (B, ..., in); s_in (N, in); s_out (N, out); experts (B,).
    `blocks` overrides the tile sizes (BLOCK_M/BLOCK_N/BLOCK_K, num_warps, num_stages): for tests."""
    return SeparableLinearFn.apply(x, s_in, s_out, bias, experts, weight, blocks)
