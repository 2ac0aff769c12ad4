"""Quantization primitives: packing round trips and the half-step error bound."""
import pytest
import torch

from tuneqdm_core import dequantize, quantize_weight
from tuneqdm_core.packing import pack, packed_width, unpack


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 7, 16, 33])
def test_pack_unpack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    q = torch.randint(0, 2**bits, (5, k), generator=g, dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_width(k, bits))
    assert torch.equal(unpack(packed, bits, k), q)


def test_four_bit_is_two_per_byte_and_eight_bit_one():
    assert packed_width(1280, 4) == 640
    assert packed_width(1281, 4) == 641
    assert packed_width(1280, 8) == 1280


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(7, 13), (5, 3, 3, 3), (1, 1), (33, 65)])
def test_dequantization_error_at_most_half_a_step(bits, shape):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
    qw = quantize_weight(w, bits)
    assert qw.zero.dtype == torch.uint8 and int(qw.zero.max()) <= 2**bits - 1
    err = (dequantize(qw) - w).abs().reshape(shape[0], -1).amax(dim=1)
    assert torch.all(err <= qw.scale * 0.5 * (1 + 1e-5) + 1e-12), (err / qw.scale).max()
    codes = unpack(qw.packed, bits, qw.k)
    assert int(codes.max()) <= 2**bits - 1


def test_special_channels_are_exact():
    w = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [-2.0, -2.0, -2.0], [0.0, 0.0, 3.0]])
    for bits in (2, 4, 8):
        assert torch.allclose(dequantize(quantize_weight(w, bits)), w, atol=1e-7)


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        quantize_weight(torch.randn(3, 3), 9)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(3, 3), 1)
