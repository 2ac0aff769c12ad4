"""Group-wise base steps: W = diag(s_out) (S * (Q - z)) diag(s_in) with a frozen step S and zero point z
per group of the input dimension, their data-free error minimization, group sizes that do not divide
the input dimension, bad group sizes, and files: group-wise files round-trip, files of the format
before groups still load."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm_core import (QuantConv2d, QuantLinear, TuneQDMConfig, dequantize, fingerprint,
                          quantize_model, quantize_weight)
from tuneqdm_core.fileio import (load_quantized_model, load_scales, read_quantized_model, save_quantized_model,
                                 save_scales)
from tuneqdm_core.packing import group_steps, group_zeros, packed_width, step_levels, unpack
from tuneqdm_core.quant import check_group_size, default_group_size, integer_weight, minimize_groups, num_groups
from tuneqdm_core.scales import scales_of
from test_layers import against_reference, assert_close_each, randomize_scales, scaled_weight

REPO_ROOT = Path(__file__).resolve().parents[1]


def explicit_codes_weight(layer):
    """S * (Q - z) of a group-wise layer built explicitly in float64, S and z expanded per value."""
    out, k = layer.weight_shape[0], 1
    for d in layer.weight_shape[1:]:
        k *= d
    codes = unpack(layer.qweight, layer.bits, k).double() if layer.bits <= 4 else layer.qweight.double()
    g = layer.group_size
    idx = torch.arange(k) // g
    z = group_zeros(layer.zero, layer.bits, num_groups(k, g)).double()[:, idx]
    s = group_steps(layer.group_scale, layer.bits, num_groups(k, g), torch.float64)[:, idx]
    return (s * (codes - z)).reshape(layer.weight_shape)


def leaves(layer):
    return [layer.s_in, layer.s_out] + ([layer.bias] if layer.bias is not None else [])


@pytest.mark.parametrize("bits,group_size,in_f", [(4, 32, 96), (4, 16, 37), (8, 8, 40), (3, 8, 21), (4, 64, 20),
                                                  (2, 8, 19)])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_forward_and_all_gradients_match_autograd_on_dequantized_weight(bits, group_size, in_f, bias):
    torch.manual_seed(bits * 7 + in_f)
    q = QuantLinear.from_float(nn.Linear(in_f, 13, bias=bias), bits=bits, experts=3, group_size=group_size)
    groups = num_groups(in_f, group_size)
    assert q.group_size == group_size and q.group_scale.shape == (13, packed_width(groups, bits))
    randomize_scales(q, bits)
    q.bias.requires_grad_(True) if bias else None
    experts = [2, 0, 2, 1]
    x = torch.randn(4, 5, in_f, dtype=torch.float64).float().requires_grad_()
    a = explicit_codes_weight(q)

    def reference(x, s_in, s_out, *bias_ref):
        return torch.stack([F.linear(x[i], scaled_weight(a, s_out[e], s_in[e]), *bias_ref)
                            for i, e in enumerate(experts)])

    got, want = against_reference(q, experts, x, reference, leaves(q))
    assert_close_each(got, want, [(1e-5, 1e-5)] + [(1e-4, 1e-5)] * (len(got) - 1))


@pytest.mark.parametrize("groups,group_size", [(1, 32), (1, 20), (2, 8)])
def test_grouped_conv_forward_and_all_gradients_match_autograd_on_dequantized_weight(groups, group_size):
    torch.manual_seed(group_size)
    float_layer = nn.Conv2d(6, 10, 3, padding=1, groups=groups)  # K = 54 (groups 1) or 27: no size divides both
    q = QuantConv2d.from_float(float_layer, bits=4, experts=2, group_size=group_size)
    randomize_scales(q, group_size)
    experts = [1, 0]
    x = torch.randn(2, 6, 7, 7).requires_grad_()
    a = explicit_codes_weight(q)

    def reference(x, s_in, s_out):
        return torch.cat([F.conv2d(x[i:i + 1], scaled_weight(a, s_out[e], s_in[e], groups), q.bias.double(),
                                   1, 1, 1, groups) for i, e in enumerate(experts)])

    got, want = against_reference(q, experts, x, reference, [q.s_in, q.s_out])
    assert_close_each(got, want, [(1e-5, 1e-5)] + [(1e-4, 1e-5)] * 3)


def test_dequantize_and_integer_weight_agree_with_the_explicit_group_form():
    w = torch.randn(9, 70)
    qw = quantize_weight(w, 4, 32)  # 70 = 32 + 32 + 6: a shorter last group
    # three 4-bit zero points in two bytes, three 4-bit step codes likewise
    assert qw.group_scale.shape == (9, 2) and qw.zero.shape == (9, 2) and qw.group_scale.dtype == torch.uint8
    a = integer_weight(qw.packed, qw.zero, 4, qw.shape, torch.float64, qw.group_scale, 32)
    idx = torch.arange(70) // 32
    z = group_zeros(qw.zero, 4, 3).double()[:, idx]
    codes = unpack(qw.group_scale, 4, 3).double()
    assert codes.min() >= 1 and codes.amax(dim=1).eq(15).all()  # the channel's largest step is its base: S = 1
    explicit = (codes / 15)[:, idx] * (unpack(qw.packed, 4, 70).double() - z)
    torch.testing.assert_close(a, explicit, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(qw, torch.float64), qw.scale.double()[:, None] * explicit)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_groups_beat_per_channel_and_minimization_beats_round_to_nearest(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)
    w[3, 17] = 8.0  # an outlier widens its channel's range, not the other groups'
    def err(qw):
        return float((dequantize(qw) - w).pow(2).sum())
    per_channel = err(quantize_weight(w, bits))
    rtn = err(quantize_weight(w, bits, 32, minimize=False))
    fitted = err(quantize_weight(w, bits, 32))
    assert rtn < per_channel and fitted < rtn


def test_minimization_never_raises_any_groups_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 12, 32, generator=g) ** 3  # heavy tails
    def group_err(step, zero):
        a = (torch.round(w / step[..., None]) + zero[..., None]).clamp(0, 15) - zero[..., None]
        return (a * step[..., None] - w).pow(2).sum(-1)
    base = group_err(*minimize_groups(w, 4, 0))
    fitted = group_err(*minimize_groups(w, 4, 3))
    assert torch.all(fitted <= base * (1 + 1e-5) + 1e-9)
    assert float(fitted.sum()) < 0.97 * float(base.sum())


def test_exact_zeros_and_constant_groups_stay_exact():
    w = torch.zeros(4, 64)
    w[1, :32] = 0.5
    w[2, 32:] = -2.0
    w[3, 5] = 3.0
    for bits in (2, 4, 8):
        torch.testing.assert_close(dequantize(quantize_weight(w, bits, 32)), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1, 3, 7, 5000, 32.5, "32", True, None])
def test_bad_group_sizes_are_refused_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="group_size must be 0 \\(per output channel\\) or an integer from 8 to 4096"):
        check_group_size(bad)
    if bad is not None:  # None in a config is "the default for the bits"
        with pytest.raises(ValueError, match="group_size"):
            TuneQDMConfig(group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 64), 4, bad)


def test_the_default_group_size_follows_the_bits():
    assert [TuneQDMConfig(bits=b).group_size for b in (2, 3, 4, 5, 8)] == [16, 16, 16, 32, 32]
    assert [default_group_size(b) for b in (4, 8)] == [16, 32] and [step_levels(b) for b in (4, 8)] == [15, 255]
    assert TuneQDMConfig(bits=4, group_size=0).group_size == 0 and TuneQDMConfig(bits=8, group_size=64).group_size == 64


def test_group_size_not_dividing_the_input_is_a_shorter_last_group_and_larger_than_input_is_one_group():
    for k, g, groups in ((100, 32, 4), (36, 32, 2), (20, 64, 1), (64, 64, 1)):
        qw = quantize_weight(torch.randn(3, k), 4, g)
        assert qw.group_scale.shape == (3, packed_width(groups, 4)), (k, g)
        assert num_groups(k, g) == groups


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Flatten(1), nn.Linear(16 * 4 * 4, 40), nn.Linear(40, 8))


def test_grouped_model_file_round_trip_and_its_scales(tmp_path):
    m = model()
    quantize_model(m, TuneQDMConfig(bits=4, experts=2, group_size=32))
    assert all(layer.group_size == 32 for layer in m.modules() if hasattr(layer, "group_size"))
    x = torch.randn(2, 4, 4, 4)
    with m.tuneqdm_router.route(experts=torch.tensor([0, 1])):
        y = m(x)
    save_quantized_model(tmp_path / "m.safetensors", m)
    header, tensors = read_quantized_model(tmp_path / "m.safetensors")
    assert header.metadata["tuneqdm.version"] == "4"
    assert {spec["group_size"] for spec in header.layers.values()} == {32}
    assert {spec["group_steps"] for spec in header.layers.values()} == {"codes"}
    assert any(k.endswith("group_scale") for k in tensors)
    with torch.device("meta"):
        skeleton = model()
    loaded = load_quantized_model(tmp_path / "m.safetensors", skeleton)
    assert fingerprint(loaded) == fingerprint(m)
    with loaded.tuneqdm_router.route(experts=torch.tensor([0, 1])):
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    # scales files are unchanged in format; a grouped model's fingerprint covers its group steps
    save_scales(tmp_path / "s.safetensors", scales_of(m), m)
    assert load_scales(tmp_path / "s.safetensors", loaded).fingerprint == fingerprint(m)
    per_channel = model()
    quantize_model(per_channel, TuneQDMConfig(bits=4, experts=2, group_size=0))
    assert fingerprint(per_channel) != fingerprint(m)


def test_per_channel_files_are_written_as_before(tmp_path):
    m = model()
    quantize_model(m, TuneQDMConfig(bits=8, experts=1, group_size=0))
    save_quantized_model(tmp_path / "m.safetensors", m)
    header, tensors = read_quantized_model(tmp_path / "m.safetensors")
    assert header.metadata["tuneqdm.version"] == "2"
    assert all("group_size" not in spec for spec in header.layers.values())
    assert not any(k.endswith("group_scale") for k in tensors)


OLD_WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    sys.path.insert(0, sys.argv[1])
    from tuneqdm_core import TuneQDMConfig, quantize_model
    from tuneqdm_core.fileio import save_quantized_model, save_scales
    from tuneqdm_core.scales import scales_of
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Flatten(1), nn.Linear(16 * 4 * 4, 40), nn.Linear(40, 8))
    quantize_model(m, TuneQDMConfig(bits=4, experts=2))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and p.ndim == 2 and p.shape[0] == 2:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    out = sys.argv[2]
    save_quantized_model(out + "/old_model.safetensors", m)
    save_scales(out + "/old_scales.safetensors", scales_of(m), m)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with m.tuneqdm_router.route(experts=torch.tensor([1, 0])):
        torch.save({"x": x, "y": m(x).detach()}, out + "/old_io.pt")
""")


@pytest.mark.parametrize("marker,versions,group_size,steps", [
    ("group_scale", ("1", "2"), 0, None),  # before groups: per-channel files
    ("step_levels", ("3",), 32, torch.float16),  # before step codes: group steps in float16
])
def test_files_written_by_the_pack_before_a_format_change_still_load(tmp_path, marker, versions, group_size, steps):
    """The committed pack (git HEAD, or the commit before `marker` entered quant.py) writes a W4 model file
    and a scales file; this checkout loads both and computes the same outputs."""
    old_src = tmp_path / "old"
    old_src.mkdir()
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "--format=%H", "-S", marker, "--reverse",
                              "--", "tuneqdm_core/quant.py"], capture_output=True, text=True, check=True).stdout.split()
        base = f"{rev[0]}~1" if rev else "HEAD"
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", base, "tuneqdm_core"], capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no git history to take the old pack from: {e}")
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    if marker in (old_src / "tuneqdm_core" / "quant.py").read_text():
        pytest.skip(f"the committed pack already has {marker}: nothing older to compare with")
    subprocess.run([sys.executable, "-c", OLD_WRITER, str(old_src), str(tmp_path)], check=True, timeout=300)
    header, _ = read_quantized_model(tmp_path / "old_model.safetensors")
    assert header.metadata["tuneqdm.version"] in versions
    with torch.device("meta"):
        skeleton = model()
    loaded = load_quantized_model(tmp_path / "old_model.safetensors", skeleton)
    layers = [layer for layer in loaded.modules() if hasattr(layer, "group_size")]
    assert layers and all(layer.group_size == group_size for layer in layers)
    assert all((layer.group_scale is None) if steps is None else layer.group_scale.dtype == steps for layer in layers)
    io = torch.load(tmp_path / "old_io.pt")
    with loaded.tuneqdm_router.route(experts=torch.tensor([1, 0])):
        torch.testing.assert_close(loaded(io["x"]), io["y"], rtol=0, atol=0)
    scales = load_scales(tmp_path / "old_scales.safetensors", loaded)
    assert scales.fingerprint == fingerprint(loaded)
    assert json.loads(header.metadata["tuneqdm.layers"])
