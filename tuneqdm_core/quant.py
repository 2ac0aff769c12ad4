"""Weight quantization primitives: asymmetric quantization per output channel or per group of the
input dimension, data-free error minimization of the group steps, and reading the codes back.

A weight of any rank is viewed as (out_channels, K) with K = prod(other dims). How its b-bit codes,
zero points and step codes lie in bytes is tuneqdm_core/packing.py's.

Group-wise (`group_size` g > 0): K is cut into ceil(K / g) groups of g consecutive values (for a conv
weight (out, in, kh, kw) that is the flattened in*kh*kw order, as GGUF's blocks); a K that g does not
divide leaves a shorter last group. Each group has its own step and zero point:

    W[n, k] = s0[n] * S[n, k // g] * (Q[n, k] - z[n, k // g])

s0 (`scale`, float32 per output channel) is the largest group step of the channel, the init of the
trainable s_out; S = c / L the group's step relative to it, coded as an integer c in 1..L stored in a
cell like a zero point's (L = 15 at up to 4 bits, two codes per byte; L = 255 above); z a code.
So a W4 group of 16 costs one byte beyond its codes, a W8 group of 32 two bytes: 4.5 and 8.5 bits per
weight, GGUF's Q4_0 and Q8_0 sizes. Files written before step codes existed hold S as float16
(`group_scale` of dtype float16); they still load and compute as written. Per-channel (g = 0) is the
original form: S = 1 and one z per channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SettingError
from .packing import check_bits, codes_per_byte, group_steps, group_zeros, pack, step_levels, unpack_as
from .packing import unpack  # noqa: F401 - the package root and the benchmarks import it from here

MIN_GROUP, MAX_GROUP = 8, 4096
REFINE_ITERATIONS = 2  # least-squares refits of each group's step and zero (measured: 2 get most of 6)


def check_group_size(group_size) -> int:
    """0 (per output channel) or an integer group size MIN_GROUP..MAX_GROUP; anything else is refused."""
    whole = not isinstance(group_size, bool) and (
        isinstance(group_size, int) or isinstance(group_size, float) and group_size.is_integer())
    g = int(group_size) if whole else -1
    if g != 0 and not MIN_GROUP <= g <= MAX_GROUP:
        raise SettingError(f"group_size must be 0 (per output channel) or an integer from {MIN_GROUP} to "
                           f"{MAX_GROUP}, got {group_size!r}")
    return g


def default_group_size(bits: int) -> int:
    """The measured default (README, "Fidelity"): groups of 16 at up to 4 bits (one byte per group for step
    and zero: Q4_0's 4.5 bits per weight, 0.8x its latent distance), 32 above (8.5 bits, Q8_0's size)."""
    return 16 if codes_per_byte(bits) == 2 else 32


def num_groups(k: int, group_size: int) -> int:
    """Groups per output channel: ceil(K / g), the last one shorter when g does not divide K; 1 per channel."""
    return 1 if group_size == 0 else max(1, -(-k // group_size))


@dataclass
class QuantizedWeight:
    """Packed integer codes of one weight plus what is needed to read them back.

    Dequantized value: scale * S * (unpack(packed) - zero), per output channel (group_size 0: zero (out,),
    no group_scale, S = 1) or per group of the input dimension (zero and group_scale one cell per group;
    S = `packing.group_steps`).
    """

    packed: torch.Tensor  # uint8 (out, packed_width)
    zero: torch.Tensor  # uint8 (out,), or per group (out, packed_width(G, bits)): packed like the codes
    scale: torch.Tensor  # float32 (out,), the base step s0 (largest group step of the channel)
    shape: tuple[int, ...]
    bits: int
    group_scale: torch.Tensor | None = None  # uint8 step codes, packed like `zero` (older files: float16 (out, G))
    group_size: int = 0

    @property
    def k(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 0, minimize: bool = True) -> QuantizedWeight:
    """Asymmetric quantization per output channel (group_size 0: round-to-nearest from min/max, as
    always) or per group of `group_size` input values (see the module docstring).

    The range is widened to include 0 so that the zero point is itself a b-bit code (stored in one
    byte) and an exact zero stays exact; trained weights straddle zero, so this rarely widens a
    channel. Per channel, the dequantized value then equals scale * round(w / scale): error at most
    half a step. Group-wise, each group's step and zero start from min/max; with `minimize` they are
    refitted by least squares (`minimize_groups`) and the step code is the better of the two around the
    fitted step (`_code_steps`): lower squared error, no longer a half-step bound. Without, the code is
    the one just above the min/max step, so that no value is clipped.
    """
    check_bits(bits)
    group_size = check_group_size(group_size)
    if group_size:
        return _quantize_grouped(weight, bits, group_size, minimize)
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


def _group_sum(x: torch.Tensor) -> torch.Tensor:
    """(rows, G, g) -> (rows, G) sums over each group. A matrix-vector product with ones: torch's CPU
    reductions over an inner dimension of 16 or 32 run many times slower than this."""
    ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.matmul(x, ones)


def _group_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each group of x (rows, G, g), by halving the group (elementwise maxima of its two
    halves, as long as g is even): for the same reason as `_group_sum`."""
    lo = hi = x
    while hi.shape[-1] % 2 == 0 and hi.shape[-1] > 1:
        half = hi.shape[-1] // 2
        lo = torch.minimum(lo[..., :half], lo[..., half:])
        hi = torch.maximum(hi[..., :half], hi[..., half:])
    if hi.shape[-1] == 1:
        return lo[..., 0], hi[..., 0]
    return lo.amin(dim=-1), hi.amax(dim=-1)


def minimize_groups(w: torch.Tensor, bits: int, iterations: int = REFINE_ITERATIONS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free error minimization of each group's (step, zero point), w (rows, G, g) float32.

    Starts from round-to-nearest on the group's min/max (range widened to include 0). Each iteration
    takes the nearest codes for the current (step, z), fits the least-squares line through
    (codes - z, w) (a new step and offset), moves z by the offset (rounded: z stays a code) and refits
    the step for that integer z, all from four sums per group. A group takes the new (step, z) only
    where its squared error with the same codes is lower; re-coding to the nearest codes can only
    lower it further, so the error never rises above round-to-nearest's (Lloyd-style descent).
    Returns (step (rows, G), zero (rows, G)) in float32, zero integer-valued in [0, 2^bits - 1]; the
    step is 0 for a group of zeros (no range: any step reproduces it).
    """
    qmax = float(2**bits - 1)
    n = w.shape[-1]
    lo, hi = _group_range(w)
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    step = (hi - lo) / qmax
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.round(-lo / step).clamp_(0, qmax)
    if iterations == 0:
        return torch.where(hi > lo, step, 0.0), zero
    sw = _group_sum(w)
    q = torch.empty_like(w)
    prod = torch.empty_like(w)
    for _ in range(iterations):
        torch.mul(w, (1.0 / step)[..., None], out=q)
        q.add_(zero[..., None]).round_().clamp_(0, qmax)
        sq = _group_sum(q)
        sqq = _group_sum(torch.mul(q, q, out=prod))
        swq = _group_sum(torch.mul(w, q, out=prod))
        # sums of a = q - z
        sa = sq - n * zero
        saa = sqq - 2 * zero * sq + n * zero * zero
        swa = swq - zero * sw
        err = step * (step * saa - 2 * swa)  # sum (w - step a)^2 minus sum w^2
        # least-squares line w ~ s * a + c, then z moved by -c / s (rounded) and s refitted for it
        den = n * saa - sa * sa
        s_ls = (n * swa - sw * sa) / den
        c = (sw - s_ls * sa) / n
        new_zero = (zero - torch.round(c / s_ls)).clamp_(0, qmax)
        shift = zero - new_zero  # a' = a + shift
        saa2 = saa + 2 * shift * sa + shift * shift * n
        swa2 = swa + shift * sw
        s_new = swa2 / saa2
        new_err = s_new * (s_new * saa2 - 2 * swa2)
        ok = (den > 0) & (saa2 > 0) & (s_new > 0) & torch.isfinite(s_new) & torch.isfinite(new_zero) & (new_err < err)
        step = torch.where(ok, s_new, step)
        zero = torch.where(ok, new_zero, zero)
    return torch.where(hi > lo, step, 0.0), zero


CHUNK_ELEMENTS = 2**20  # values quantized at a time (4 MiB temporaries): few, large ops amortise thread start-up


def _groups_of(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """(rows, K) -> views (rows, G_full, g) and, when g does not divide K, (rows, 1, K mod g)."""
    rows, k = w.shape
    full, tail = divmod(k, group_size)
    parts = []
    if full:
        parts.append(w[:, :full * group_size].reshape(rows, full, group_size))
    if tail:
        parts.append(w[:, full * group_size:].reshape(rows, 1, tail))
    return parts


def _code_steps(parts: list[torch.Tensor], step: torch.Tensor, zero: torch.Tensor, base: torch.Tensor,
                bits: int, minimize: bool) -> torch.Tensor:
    """Step codes (rows, G) in 1..L for the fitted steps `step` (rows, G) and zero points (rows, G) under
    the channel bases `base` (rows,). A coded step is a little off the fitted one, and one below it clips
    the group's extremes; so with `minimize` each group keeps the better of the nearest code and the one
    above it, each with its own nearest codes (measured on Gaussian and Student-t weights: most of what a
    wider search finds), else it takes the code above (never clips)."""
    levels = step_levels(bits)
    qmax = float(2**bits - 1)
    ratio = step / base[:, None] * levels
    if not minimize:
        return ratio.ceil_().clamp_(1, levels)
    near = ratio.round_().clamp_(1, levels)
    candidates = (near, (near + 1).clamp_(max=levels))
    errors = []
    for code in candidates:
        err, col = [], 0
        for part in parts:
            g = slice(col, col + part.shape[1])
            s = (code[:, g] * (base[:, None] / levels))[..., None]
            z = zero[:, g][..., None]
            d = torch.div(part, s).add_(z).round_().clamp_(0, qmax).sub_(z).mul_(s).sub_(part)
            err.append(_group_sum(d.mul_(d)))
            col += part.shape[1]
        errors.append(torch.cat(err, dim=1))
    return torch.where(errors[1] < errors[0], candidates[1], candidates[0])


def _quantize_grouped(weight: torch.Tensor, bits: int, group_size: int, minimize: bool) -> QuantizedWeight:
    qmax = 2**bits - 1
    levels = step_levels(bits)
    w = weight.detach().reshape(weight.shape[0], -1).float()
    out, k = w.shape
    groups = num_groups(k, group_size)
    code = torch.ones(out, groups, dtype=torch.float32, device=w.device)
    zero = torch.zeros(out, groups, dtype=torch.float32, device=w.device)
    base = torch.ones(out, dtype=torch.float32, device=w.device)
    q = torch.zeros(out, k, dtype=torch.uint8, device=w.device)
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    iterations = REFINE_ITERATIONS if minimize else 0
    # Chunks hold whole rows, so a channel's base (its largest group step) is known inside its chunk.
    for r0 in range(0, out, rows):
        sl = slice(r0, r0 + rows)
        parts = _groups_of(w[sl], group_size)
        fitted = [minimize_groups(part, bits, iterations) for part in parts]
        step = torch.cat([st for st, _ in fitted], dim=1)
        zero[sl] = torch.cat([zr for _, zr in fitted], dim=1)
        # An all-zero group (step 0 from minimize_groups) has no range: any step reproduces it, so it leaves
        # the base to the groups that have one.
        top = step.amax(dim=1)
        base[sl] = torch.where(top > 0, top, torch.ones_like(top))
        code[sl] = _code_steps(parts, step, zero[sl], base[sl], bits, minimize)
        col = 0
        for part, dst in zip(parts, _groups_of(q[sl], group_size)):
            g = slice(col, col + part.shape[1])
            s = (code[sl, g] * (base[sl, None] / levels))[..., None]
            dst.copy_(torch.div(part, s).add_(zero[sl, g][..., None]).round_().clamp_(0, qmax))
            col += part.shape[1]
    return QuantizedWeight(packed=pack(q, bits), zero=pack(zero, bits), scale=base, shape=tuple(weight.shape),
                           bits=bits, group_scale=pack(code, bits), group_size=group_size)


def integer_weight(packed: torch.Tensor, zero: torch.Tensor, bits: int, shape: tuple[int, ...],
                   dtype: torch.dtype, group_scale: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """A = Q - z as `dtype` in the weight's own shape; group-wise, A = S * (Q - z) per group.

    Per channel |A| <= 255, so it is exact in fp16, bf16 and fp32; group-wise S * (Q - z) is exact in
    fp32 and rounded once in fp16/bf16. This tensor is weight-sized: callers build it inside one
    layer's computation and drop it right after.
    """
    k = 1
    for d in shape[1:]:
        k *= d
    out = packed.shape[0]
    a = unpack_as(packed, bits, k, dtype)
    if group_scale is None:
        a -= zero.to(dtype).reshape(out, -1)[:, :1]
        return a.reshape(shape)
    groups = num_groups(k, group_size)
    zero = group_zeros(zero, bits, groups)
    steps = group_steps(group_scale, bits, groups, dtype)
    full, tail = divmod(k, group_size)
    if full:
        body = a[:, :full * group_size].view(out, full, group_size)
        body -= zero[:, :full].to(dtype)[..., None]
        body *= steps[:, :full, None]
    if tail:
        rest = a[:, full * group_size:]
        rest -= zero[:, full:].to(dtype)
        rest *= steps[:, full:]
    return a.reshape(shape)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base float weight s0 * S * (Q - z); for tests, reports and the reference-style benchmark."""
    a = integer_weight(qw.packed, qw.zero, qw.bits, qw.shape, torch.float32, qw.group_scale, qw.group_size)
    view = (-1,) + (1,) * (len(qw.shape) - 1)
    return (a * qw.scale.reshape(view)).to(dtype)
