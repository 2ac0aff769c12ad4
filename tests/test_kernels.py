"""The Triton kernels (run on CPU tensors through TRITON_INTERPRET=1, set in conftest.py) against the
torch reference path, the dispatcher, and the CPU bf16 inference path.

The interpreter costs milliseconds per block iteration, so shapes stay small; cases that must cross
block boundaries force small blocks explicitly.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import kernels
from tuneqdm_core import functional
from tuneqdm_core.functional import ConvGeometry, PackedWeight, separable_conv2d, separable_linear
from tuneqdm_core.packing import group_steps
from tuneqdm_core.quant import integer_weight, num_groups, quantize_weight

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tolerances relative to the largest reference value: fp32 is exact up to summation order; fp16 and
# bf16 round the activation once before the product and the result once after it.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_case(bits, n, k, experts=3, seed=0, group_size=0):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, group_size)
    weight = PackedWeight(qw.packed, qw.zero, bits, (n, k), qw.group_scale, group_size)
    s_in = 1 + 0.3 * torch.randn(experts, k, generator=g)
    s_out = qw.scale[None] * (1 + 0.3 * torch.randn(experts, n, generator=g))
    bias = torch.randn(n, generator=g)
    return weight, s_in, s_out, bias


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def run_linear(x, s_in, s_out, bias, experts, weight, g, **kw):
    """Output and gradients (x, s_in, s_out, bias) of one call; kw goes to the function."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, s_in, s_out)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    fn = kw.pop("fn", separable_linear)
    y = fn(leaves[0], leaves[1], leaves[2], b, experts, weight, **kw)
    y.backward(g.to(y.dtype))
    return [y] + [t.grad for t in leaves] + ([None] if b is None else [b.grad])


def check_against_reference(got, ref, dtype):
    names = ("y", "grad_x", "grad_s_in", "grad_s_out", "grad_bias")
    for name, a, r in zip(names, got, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.shape == r.shape, name
        if name in ("y", "grad_x"):
            assert a.dtype == dtype, name
        assert rel_err(a, r) < TOL[dtype], (name, rel_err(a, r))


def check_linear(x, s_in, s_out, bias, experts, weight, g, **kw):
    """One call with `kw` (a backend, or the kernel itself with forced blocks) against the torch path
    multiplying the same (rounded) activation in float64."""
    got = run_linear(x, s_in, s_out, bias, experts, weight, g, **kw)
    ref = run_linear(x.double(), s_in.double(), s_out.double(), None if bias is None else bias.double(), experts,
                     weight, g.double(), backend="torch")
    check_against_reference(got, ref, x.dtype)
    return got


def check_conv(x, s_in, s_out, bias, experts, weight, geo):
    """The conv's Triton path (the dequantize kernel feeding the vendor convolution) against its torch path."""
    g = torch.randn_like(separable_conv2d(x, s_in, s_out, bias, experts, weight, geo, backend="torch"))
    got = run_linear(x, s_in, s_out, bias, experts, weight, g, fn=separable_conv2d, geo=geo, backend="triton")
    ref = run_linear(x, s_in, s_out, bias, experts, weight, g, fn=separable_conv2d, geo=geo, backend="torch")
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_forward_and_backward_match_torch_reference(bits, dtype, bias):
    n, k = 19, 37  # odd K: the last byte's high nibble is padding at 4 bits
    weight, s_in, s_out, b = make_case(bits, n, k, seed=bits)
    experts = torch.tensor([2, 0, 2, 1])  # mixed experts in one batch, expert 2 twice
    x = torch.randn(4, 5, k).to(dtype)
    g = torch.randn(4, 5, n)
    check_linear(x, s_in, s_out, b if bias else None, experts, weight, g, backend="triton")


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_linear_crosses_block_boundaries_in_every_dimension(bits):
    # M = 21 rows, N = 23, K = 45 with 8 x 16 x 16 blocks: ragged last blocks everywhere, several
    # K iterations (forward) and N iterations (input gradient), odd K at 4 bits.
    n, k = 23, 45
    weight, s_in, s_out, b = make_case(bits, n, k, experts=4, seed=10 + bits)
    experts = torch.tensor([3, 1, 3])
    x = torch.randn(3, 7, k)
    g = torch.randn(3, 7, n)
    blocks = {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16}
    got = check_linear(x, s_in, s_out, b, experts, weight, g, fn=kernels.separable_linear, blocks=blocks)
    # Experts no row used get exactly zero scale gradient.
    for e in (0, 2):
        assert torch.count_nonzero(got[2][e]) == 0 and torch.count_nonzero(got[3][e]) == 0


def test_fused_linear_bf16_activations_and_2d_input():
    # bf16 in and out (the interpreter multiplies in fp32: its bf16 dot is wrong, see HOST.md).
    n, k = 24, 33
    weight, s_in, s_out, b = make_case(4, n, k, experts=2, seed=3)
    experts = torch.tensor([1, 0, 0, 1, 1])
    x = torch.randn(5, k).to(torch.bfloat16)
    g = torch.randn(5, n)
    check_linear(x, s_in, s_out, b, experts, weight, g, backend="triton")


def test_fused_linear_only_the_needed_gradients():
    # PEQA: s_in frozen; x needs no gradient either (a first layer): only s_out and nothing else.
    n, k = 16, 20
    weight, s_in, s_out, _ = make_case(4, n, k, experts=1, seed=4)
    x = torch.randn(2, 3, k)
    s_out = s_out.clone().requires_grad_()
    experts = torch.zeros(2, dtype=torch.long)
    y = separable_linear(x, s_in, s_out, None, experts, weight, backend="triton")
    (y * y).sum().backward()
    s_out_ref = s_out.detach().double().requires_grad_()
    y_ref = separable_linear(x.double(), s_in.double(), s_out_ref, None, experts, weight, backend="torch")
    (y_ref * y_ref).sum().backward()
    assert rel_err(s_out.grad, s_out_ref.grad) < 1e-5


def test_fused_linear_one_token():
    n, k = 40, 31
    weight, s_in, s_out, b = make_case(8, n, k, experts=2, seed=5)
    x = torch.randn(1, 1, k)
    with torch.no_grad():
        y = separable_linear(x, s_in, s_out, b, torch.tensor([1]), weight, backend="triton")
        y_ref = separable_linear(x.double(), s_in.double(), s_out.double(), b.double(), torch.tensor([1]), weight,
                                 backend="torch")
    assert y.shape == (1, 1, n) and rel_err(y, y_ref) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(7, 13), (19, 37), (5, 3, 3, 3), (12, 4, 1, 1), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_kernel_matches_integer_weight(bits, shape, dtype):
    qw = quantize_weight(torch.randn(shape, generator=torch.Generator().manual_seed(bits)), bits)
    a = kernels.dequantize_codes(qw.packed, qw.zero, bits, qw.shape, dtype)
    ref = integer_weight(qw.packed, qw.zero, bits, qw.shape, dtype)
    assert a.dtype == dtype and a.shape == tuple(shape)
    assert torch.equal(a, ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("geo", [
    ConvGeometry((1, 1), (1, 1), (1, 1), 1),
    ConvGeometry((2, 2), (1, 1), (1, 1), 2),
])
def test_conv_triton_path_matches_torch_reference(bits, geo):
    torch.manual_seed(bits)
    c_in, c_out, experts = 6, 10, 2
    qw = quantize_weight(torch.randn(c_out, c_in // geo.groups, 3, 3), bits)
    weight = PackedWeight(qw.packed, qw.zero, bits, qw.shape)
    s_in = 1 + 0.3 * torch.randn(experts, c_in)
    s_out = qw.scale[None] * (1 + 0.3 * torch.randn(experts, c_out))
    b = torch.randn(c_out)
    ex = torch.tensor([1, 0, 1])
    x = torch.randn(3, c_in, 7, 6)
    check_conv(x, s_in, s_out, b, ex, weight, geo)


# ---------------------------------------------------------------- group-wise base steps

@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 8), (8, 16), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_fused_linear_forward_and_backward_match_torch_reference(bits, group_size, dtype):
    n, k = 19, 45  # 45 = odd K (padding nibble at 4 bits) and no group size divides it: a shorter last group
    weight, s_in, s_out, b = make_case(bits, n, k, seed=bits + group_size, group_size=group_size)
    experts = torch.tensor([2, 0, 2, 1])
    x = torch.randn(4, 5, k).to(dtype)
    g = torch.randn(4, 5, n)
    check_linear(x, s_in, s_out, b, experts, weight, g, backend="triton")


@pytest.mark.parametrize("bits", [4, 8])
def test_grouped_fused_linear_crosses_block_boundaries(bits):
    # Blocks of 16 along K, groups of 8 (two per block) and 24 (groups straddle blocks).
    for group_size in (8, 24):
        weight, s_in, s_out, b = make_case(bits, 23, 45, experts=4, seed=group_size, group_size=group_size)
        experts = torch.tensor([3, 1, 3])
        x, g = torch.randn(3, 7, 45), torch.randn(3, 7, 23)
        blocks = {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16}
        check_linear(x, s_in, s_out, b, experts, weight, g, fn=kernels.separable_linear, blocks=blocks)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((19, 37), 8), ((5, 3, 3, 3), 16), ((12, 64), 32), ((3, 9), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps", ["codes", "float16"])  # float16: the group steps of files before step codes
def test_grouped_dequant_kernel_matches_integer_weight(bits, shape, group_size, dtype, steps):
    qw = quantize_weight(torch.randn(shape, generator=torch.Generator().manual_seed(bits)), bits, group_size)
    gs = qw.group_scale
    if steps == "float16":
        gs = group_steps(gs, bits, num_groups(qw.k, group_size), torch.float16)
    a = kernels.dequantize_codes(qw.packed, qw.zero, bits, qw.shape, dtype, gs, group_size)
    ref = integer_weight(qw.packed, qw.zero, bits, qw.shape, dtype, gs, group_size)
    assert a.dtype == dtype and a.shape == tuple(shape)
    # fp32: S * (Q - z) exactly; fp16: the torch path rounds (Q - z) and S's product in fp16 the same way
    torch.testing.assert_close(a, ref, rtol=1e-3 if dtype == torch.float16 else 0, atol=0)


def test_grouped_conv_triton_path_matches_torch_reference():
    torch.manual_seed(0)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    qw = quantize_weight(torch.randn(10, 6, 3, 3), 4, 32)  # K = 54: groups of 32 and 22
    weight = PackedWeight(qw.packed, qw.zero, 4, qw.shape, qw.group_scale, 32)
    s_in = 1 + 0.3 * torch.randn(2, 6)
    s_out = qw.scale[None] * (1 + 0.3 * torch.randn(2, 10))
    b, ex, x = torch.randn(10), torch.tensor([1, 0]), torch.randn(2, 6, 5, 6)
    check_conv(x, s_in, s_out, b, ex, weight, geo)


# ---------------------------------------------------------------- the dispatcher

def fake_input(device_cuda=True, dtype=torch.float16):
    """What select_backend reads of a tensor, without needing a GPU."""
    return types.SimpleNamespace(is_cuda=device_cuda, dtype=dtype, numel=lambda: 8)


def test_dispatcher_picks_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("TUNEQDM_FORCE_TORCH", raising=False)
    assert functional.triton_available(), functional.triton_status()
    assert functional.select_backend(torch.randn(2, 3)) == "torch"
    assert functional.select_backend(fake_input()) == "triton"
    assert functional.select_backend(fake_input(dtype=torch.float64)) == "torch"
    assert functional.select_backend(torch.randn(2, 3), "triton") == "triton"  # explicit wins
    with pytest.raises(ValueError):
        functional.select_backend(torch.randn(2, 3), "cuda")


def test_force_torch_switch_and_environment_variable(monkeypatch):
    monkeypatch.delenv("TUNEQDM_FORCE_TORCH", raising=False)
    with functional.force_torch():
        assert functional.torch_forced() and functional.select_backend(fake_input()) == "torch"
        with functional.force_torch(False):
            assert functional.select_backend(fake_input()) == "triton"
    assert functional.select_backend(fake_input()) == "triton"
    monkeypatch.setenv("TUNEQDM_FORCE_TORCH", "1")
    assert functional.select_backend(fake_input()) == "torch"
    assert functional.select_backend(fake_input(), "triton") == "triton"


def test_cpu_layers_never_reach_the_kernels(monkeypatch):
    from tuneqdm_core import QuantConv2d, QuantLinear

    def boom(*a, **k):
        raise AssertionError("a kernel ran for a CPU tensor without being asked to")

    monkeypatch.setattr(kernels, "separable_linear", boom)
    monkeypatch.setattr(kernels, "dequantize_codes", boom)
    lin = QuantLinear.from_float(torch.nn.Linear(8, 4), bits=4, experts=1)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(3, 4, 3, padding=1), bits=8, experts=1)
    lin(torch.randn(2, 8)).sum().backward()
    conv(torch.randn(1, 3, 5, 5)).sum().backward()


def test_kernels_import_both_as_top_level_and_inside_the_pack_package(tmp_path):
    # Inside ComfyUI the repo is a package (custom_nodes/<pack>), so tuneqdm_core finds `..kernels`.
    (tmp_path / "somepack").symlink_to(REPO_ROOT, target_is_directory=True)
    code = ("import somepack.tuneqdm_core.functional as f; m = f._kernels(); "
            "assert m is not None, f.triton_status(); print(m.__name__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "somepack.kernels"
    assert functional._kernels().__name__ == "kernels"  # here: the repo root is on sys.path


# ---------------------------------------------------------------- CPU bf16 inference path

def test_cpu_bf16_inference_is_close_and_training_stays_exact():
    n, k = 48, 64
    weight, s_in, s_out, b = make_case(4, n, k, experts=2, seed=6)
    x = torch.randn(2, 80, k)
    ex = torch.tensor([0, 1])
    with torch.no_grad():
        exact = separable_linear(x.double(), s_in.double(), s_out.double(), b.double(), ex, weight)
        with functional.cpu_inference_bf16("off"):
            off = separable_linear(x, s_in, s_out, b, ex, weight)
        with functional.cpu_inference_bf16("on"):
            fast = separable_linear(x, s_in, s_out, b, ex, weight)
        # auto: this call is below the size threshold, so it stays in fp32.
        with functional.cpu_inference_bf16("auto"):
            small = separable_linear(x, s_in, s_out, b, ex, weight)
    assert fast.dtype == torch.float32
    assert rel_err(off, exact) < 1e-6 and rel_err(small, exact) < 1e-6
    assert 1e-5 < rel_err(fast, exact) < 2e-2  # it really ran in bf16, and it is close
    # A forward that builds a graph is never in bf16, whatever the mode: training stays exact.
    g = torch.randn(2, 80, n)
    with functional.cpu_inference_bf16("on"):
        got = run_linear(x, s_in, s_out, b, ex, weight, g)
    ref = run_linear(x.double(), s_in.double(), s_out.double(), b.double(), ex, weight, g.double())
    check_against_reference(got, ref, torch.float32)


def test_cpu_bf16_is_opt_in(monkeypatch):
    monkeypatch.delenv("TUNEQDM_CPU_BF16", raising=False)
    assert functional.cpu_bf16_mode() == "off"
    monkeypatch.setenv("TUNEQDM_CPU_BF16", "auto")
    assert functional.cpu_bf16_mode() == "auto"
    with functional.cpu_inference_bf16("off"):
        assert functional.cpu_bf16_mode() == "off"
    assert functional.cpu_bf16_mode() == "auto"
    # auto picks bf16 for a large weight even for one token, never for a graph-building call.
    n, k = 2048, 2048
    qw = quantize_weight(torch.randn(n, k), 8)
    weight = PackedWeight(qw.packed, qw.zero, 8, (n, k))
    x, s_in, s_out = torch.randn(1, k), torch.ones(1, k), qw.scale[None]
    ex = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        fast = separable_linear(x, s_in, s_out, None, ex, weight)
    exact = separable_linear(x.double(), s_in.double(), s_out.double(), None, ex, weight)
    assert 1e-5 < rel_err(fast, exact) < 2e-2
    s_out = s_out.clone().requires_grad_()
    assert rel_err(separable_linear(x, s_in, s_out, None, ex, weight), exact) < 1e-6


def test_cpu_bf16_conv_inference_is_close():
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(32, 16, 3, 3), 8)
    weight = PackedWeight(qw.packed, qw.zero, 8, qw.shape)
    s_in, s_out, b = 1 + 0.1 * torch.randn(1, 16), qw.scale[None].clone(), torch.randn(32)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(2, 16, 16, 16)
    ex = torch.zeros(2, dtype=torch.long)
    with torch.no_grad(), functional.cpu_inference_bf16("on"):
        fast = separable_conv2d(x, s_in, s_out, b, ex, weight, geo)
    with torch.no_grad(), functional.cpu_inference_bf16("off"):
        exact = separable_conv2d(x, s_in, s_out, b, ex, weight, geo)
    assert 1e-5 < rel_err(fast, exact) < 2e-2
