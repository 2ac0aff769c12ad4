"""Adapters on quantized layers against the explicit float computation of the patched weight."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm_core import QuantConv2d, QuantLinear, TuneQDMConfig, get_router, quantize_model
from tuneqdm_core.adapters import LowRank, WeightDelta
from tuneqdm_core.quant import integer_weight


def dequantized(layer) -> torch.Tensor:
    a = integer_weight(layer.qweight, layer.zero, layer.bits, layer.weight_shape, torch.float64, layer.group_scale,
                       layer.group_size)
    s_out, s_in = layer.s_out[0].double(), layer.s_in[0].double()
    if a.ndim == 2:
        return s_out[:, None] * a * s_in[None, :]
    return s_out[:, None, None, None] * a * s_in[None, :, None, None]


def routed(model, layer_name, adapters, x):
    with get_router(model).route(experts=torch.zeros(x.shape[0], dtype=torch.long), adapters={layer_name: adapters}):
        return model(x)


def test_low_rank_and_delta_on_a_linear_equal_the_patched_weight():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    quantize_model(model, TuneQDMConfig(bits=8, experts=1))
    layer = model[0]
    up, down = torch.randn(7, 3, generator=g), torch.randn(3, 12, generator=g)
    diff = torch.randn(7, 12, generator=g)
    x = torch.randn(5, 12, generator=g)
    adapters = (LowRank(down=down, up=up, scale=0.5, base_strength=0.8), WeightDelta(lambda: diff))
    w = (dequantized(layer) * 0.8 + 0.5 * (up @ down).double() + diff.double())
    expected = F.linear(x.double(), w, layer.bias.double())
    torch.testing.assert_close(routed(model, "0", adapters, x).double(), expected, rtol=1e-4, atol=1e-4)
    # Outside the routed call the layer is the plain quantized layer again.
    torch.testing.assert_close(model(x).double(), F.linear(x.double(), dequantized(layer), layer.bias.double()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_mid", [False, True])
def test_low_rank_on_a_conv_equals_the_patched_weight(with_mid):
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(6, 5, 3, stride=2, padding=1))
    quantize_model(model, TuneQDMConfig(bits=8, experts=1))
    layer = model[0]
    if with_mid:
        down, mid, up = torch.randn(2, 6, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g)
        delta = torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    else:
        down, mid, up = torch.randn(2, 6, 3, 3, generator=g), None, torch.randn(5, 2, 1, 1, generator=g)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(5, 6, 3, 3)
    x = torch.randn(2, 6, 9, 9, generator=g)
    w = dequantized(layer) + 0.3 * delta.double()
    expected = F.conv2d(x.double(), w, layer.bias.double(), stride=2, padding=1)
    got = routed(model, "0", (LowRank(down=down, up=up, mid=mid, scale=0.3),), x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_layers_keep_a_weight_key_that_files_do_not_store():
    from tuneqdm_core.model import file_state_dict

    model = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(3, 2, 1))
    quantize_model(model, TuneQDMConfig(bits=4, experts=1))
    assert {"0.weight", "1.weight"} <= set(model.state_dict())
    assert model.state_dict()["0.weight"].numel() == 0
    assert not {"0.weight", "1.weight"} & set(file_state_dict(model))
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantConv2d)
