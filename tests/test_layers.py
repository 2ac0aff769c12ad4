"""Separable quantized layers against the explicitly dequantized reference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm_core import QuantConv2d, QuantLinear, RoutingError, TuneQDMConfig, get_router, quantize_model
from tuneqdm_core.quant import integer_weight


def scaled_weight(a, s_out, s_in, groups=1):
    """diag(s_out) A diag(s_in) for one expert's scale rows: A (out, in) of a Linear, or (out, in/groups,
    kh, kw) of a Conv2d, whose input channels s_in follows group by group."""
    if a.ndim == 2:
        return s_out[:, None] * a * s_in[None, :]
    s_in_rows = s_in.reshape(groups, -1).repeat_interleave(a.shape[0] // groups, dim=0)  # (out, in/groups)
    return s_out[:, None, None, None] * a * s_in_rows[:, :, None, None]


def against_reference(q, experts, x, reference, params):
    """q(x) routed to `experts` and its gradients over x and `params` under one random output gradient,
    and the same of reference(x, *params) built on float64 leaf copies: (got, want), each (y, *grads)."""
    with route(q, experts):
        y = q(x)
    g = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, [x, *params], g))
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    y_ref = reference(*leaves)
    return got, (y_ref, *torch.autograd.grad(y_ref, leaves, g.double()))


def assert_close_each(got, want, tolerances):
    """got[i] (in float64) against want[i], each within its (rtol, atol)."""
    assert len(got) == len(want) == len(tolerances)
    for a, b, (rtol, atol) in zip(got, want, tolerances):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


def randomize_scales(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.s_out.mul_(1 + 0.3 * torch.randn(layer.s_out.shape, generator=g))
        layer.s_in.copy_(1 + 0.3 * torch.randn(layer.s_in.shape, generator=g))


def make_linear(bits, experts, bias, seed=0, in_f=37, out_f=19):
    torch.manual_seed(seed)
    float_layer = nn.Linear(in_f, out_f, bias=bias)
    q = QuantLinear.from_float(float_layer, bits=bits, experts=experts)
    randomize_scales(q, seed)
    return q


def make_conv(bits, experts, bias, seed=0, **kw):
    torch.manual_seed(seed)
    float_layer = nn.Conv2d(6, 10, **kw, bias=bias)
    q = QuantConv2d.from_float(float_layer, bits=bits, experts=experts)
    randomize_scales(q, seed)
    return q


def route(layer, experts):
    from tuneqdm_core import ExpertRouter
    layer.router = ExpertRouter(layer.num_experts)
    return layer.router.route(experts=torch.tensor(experts))


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_gradients_match_dequantized_reference(bits, bias):
    q = make_linear(bits, experts=3, bias=bias, seed=bits)
    experts = [2, 0, 2, 1]
    x = torch.randn(4, 5, q.in_features, dtype=torch.float64).float().requires_grad_()
    a = integer_weight(q.qweight, q.zero, q.bits, q.weight_shape, torch.float64)
    bias_ref = q.bias.double() if bias else None

    def reference(x, s_in, s_out):
        return torch.stack([F.linear(x[b], scaled_weight(a, s_out[e], s_in[e]), bias_ref)
                            for b, e in enumerate(experts)])

    got, want = against_reference(q, experts, x, reference, [q.s_in, q.s_out])
    assert_close_each(got, want, [(1e-5, 1e-6), (1e-5, 1e-6), (1e-4, 1e-5), (1e-4, 1e-4)])


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(2, 0), dilation=2),
    dict(kernel_size=1),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_forward_and_gradients_match_dequantized_reference(kw, bias):
    q = make_conv(4, experts=2, bias=bias, seed=1, **kw)
    experts = [1, 0, 1]
    x = torch.randn(3, 6, 9, 8).requires_grad_()
    a = integer_weight(q.qweight, q.zero, q.bits, q.weight_shape, torch.float64)
    bias_ref = q.bias.double() if bias else None

    def reference(x, s_in, s_out):
        outs = []
        for b, e in enumerate(experts):
            xb, pad = x[b:b + 1], q.padding
            if q.padding_mode != "zeros":
                xb = F.pad(xb, (pad[1], pad[1], pad[0], pad[0]), mode=q.padding_mode)
                pad = (0, 0)
            w = scaled_weight(a, s_out[e], s_in[e], q.groups)
            outs.append(F.conv2d(xb, w, bias_ref, q.stride, pad, q.dilation, q.groups))
        return torch.cat(outs)

    got, want = against_reference(q, experts, x, reference, [q.s_in, q.s_out])
    assert_close_each(got, want, [(1e-5, 1e-5), (1e-5, 1e-5), (1e-4, 1e-5), (1e-4, 1e-4)])


def test_unused_experts_get_exactly_zero_gradient():
    q = make_linear(4, experts=4, bias=True)
    x = torch.randn(3, q.in_features)
    with route(q, [3, 1, 3]):
        q(x).pow(2).sum().backward()
    for e in (0, 2):
        assert torch.count_nonzero(q.s_out.grad[e]) == 0 and torch.count_nonzero(q.s_in.grad[e]) == 0
    for e in (1, 3):
        assert torch.count_nonzero(q.s_out.grad[e]) > 0 and torch.count_nonzero(q.s_in.grad[e]) > 0


def test_base_scales_reproduce_the_float_layer_within_quantization_error():
    torch.manual_seed(0)
    float_layer = nn.Linear(64, 32)
    q = QuantLinear.from_float(float_layer, bits=8, experts=1)
    x = torch.randn(10, 64)
    y, y_float = q(x), float_layer(x)
    assert (y - y_float).abs().max() < 0.02 * y_float.abs().max()


def test_peqa_mode_freezes_s_in():
    q = QuantLinear.from_float(nn.Linear(8, 4), bits=4, experts=1, train_s_in=False)
    assert not q.s_in.requires_grad and q.s_out.requires_grad
    q(torch.randn(2, 8)).sum().backward()
    assert q.s_in.grad is None and q.s_out.grad is not None


def test_normal_s_in_init_is_reproducible():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    cfg = TuneQDMConfig(bits=4, experts=2, s_in_init="normal", s_in_sigma=0.01, seed=7)
    import copy
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(m1, cfg)
    quantize_model(m2, cfg)
    assert torch.equal(m1[0].s_in, m2[0].s_in)
    assert 0.001 < float((m1[0].s_in.detach() - 1).std()) < 0.05


def test_per_sample_routing_in_a_model_with_mixed_timesteps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5))
    quantize_model(model, TuneQDMConfig(bits=4, experts=4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QuantLinear, QuantConv2d)):
                m.s_out.mul_(torch.arange(1, 5, dtype=torch.float32)[:, None])  # expert e scales by e+1
    x = torch.randn(4, 3, 6, 6)
    t = torch.tensor([10.0, 990.0, 260.0, 500.0])  # experts 0, 3, 1, 2
    router = get_router(model)
    with torch.no_grad(), router.route(t):
        mixed = model(x)
        assert router.expert_index.tolist() == [0, 3, 1, 2]
    assert router.expert_index is None  # restored after the forward
    with torch.no_grad():
        for b, tb in enumerate(t):
            with router.route(tb.reshape(1)):
                alone = model(x[b:b + 1])
            torch.testing.assert_close(mixed[b:b + 1], alone, rtol=1e-5, atol=1e-6)
        with router.route(torch.tensor([10.0] * 4)):
            all_first = model(x)
    assert not torch.allclose(mixed[1], all_first[1])


def test_multi_expert_model_without_routing_fails_clearly():
    model = nn.Sequential(nn.Linear(4, 4))
    quantize_model(model, TuneQDMConfig(bits=8, experts=2))
    with pytest.raises(RoutingError, match="no timestep was given"):
        model(torch.randn(1, 4))


def test_two_quantized_models_do_not_share_routing():
    a, b = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))
    quantize_model(a, TuneQDMConfig(bits=8, experts=2))
    quantize_model(b, TuneQDMConfig(bits=8, experts=2))
    with get_router(a).route(torch.tensor([900.0])):
        assert get_router(b).expert_index is None
        with pytest.raises(RoutingError):
            b(torch.randn(1, 4))
        a(torch.randn(1, 4))


def test_quantizing_a_quantized_model_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    quantize_model(model, TuneQDMConfig(bits=8, experts=2))
    with pytest.raises(ValueError, match="already TuneQDM-quantized"):
        quantize_model(model, TuneQDMConfig(bits=4, experts=2))


@pytest.mark.parametrize("make", [lambda: make_linear(4, experts=2, bias=True, in_f=33, out_f=29),
                                  lambda: make_conv(8, experts=2, bias=True, kernel_size=3, padding=1)],
                         ids=["linear", "conv2d"])
def test_slicing_large_weights_by_output_channel_changes_nothing(make, monkeypatch):
    import tuneqdm_core.functional as functional

    def run(limit):
        monkeypatch.setattr(functional, "SLICE_ELEMENTS", limit)
        q = make()
        x = (torch.randn(3, 33) if isinstance(q, QuantLinear) else torch.randn(3, 6, 7, 7)).requires_grad_()
        with route(q, [1, 0, 1]):
            y = q(x)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        assert (len(q.packed_weight.row_slices()) > 1) == (limit < 1000)
        return y.detach(), x.grad, q.s_out.grad, q.s_in.grad

    whole, sliced = run(2**22), run(100)  # 100 elements: several output channels per slice at most
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layers_compute_on_the_input_device_when_their_tensors_live_elsewhere():
    """A host that offloads a layer leaves its tensors on another device than the input (ComfyUI's low-VRAM
    mode): the layer moves them for the call, on CPU to the meta device here, and its own stay put."""
    for layer, x in ((make_linear(4, 1, True), torch.empty(3, 37, device="meta")),
                     (make_conv(4, 1, True, kernel_size=3), torch.empty(2, 6, 9, 9, device="meta"))):
        y = layer(x)
        assert y.device.type == "meta"
        assert layer.qweight.device.type == "cpu" and layer.s_out.device.type == "cpu"


def test_from_float_builds_the_layer_on_the_device_asked_for():
    float_layer = nn.Linear(8, 4)
    q = QuantLinear.from_float(float_layer, bits=8, experts=1, device="meta")
    assert {t.device.type for t in q.state_dict().values()} == {"meta"}


def test_cpu_inference_hands_freed_heap_back_after_large_layers_only(monkeypatch):
    import tuneqdm_core.layers as layers_module

    calls = []
    monkeypatch.setattr(layers_module, "release_freed_memory", lambda: calls.append(1))
    big, small = (QuantLinear.from_float(nn.Linear(n, 1024), bits=4, experts=1) for n in (1024, 16))
    x_big, x_small = torch.randn(2, 1024), torch.randn(2, 16)
    with torch.no_grad():
        big(x_big)
        assert calls == [1]
        small(x_small)
        assert calls == [1]  # below RELEASE_MIN_VALUES: not worth a trim
    big(x_big.requires_grad_())
    assert calls == [1]  # training: checkpointing.py releases between blocks instead
