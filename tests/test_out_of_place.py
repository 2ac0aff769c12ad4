"""Training through blocks that add their residuals in place (ComfyUI 0.8's Flux: `img += ...` right after
LayerNorm saved `img`): gradients of one real Flux DoubleStreamBlock and SingleStreamBlock, in float64, with
and without the pack's activation checkpointing, against central finite differences along a random
direction of every parameter and input; and the rules of tuneqdm_core/out_of_place.py (what stays in place)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tuneqdm_core.checkpointing import InPlaceInputError, checkpointed
from tuneqdm_core.out_of_place import augmented_assignment_out_of_place, is_active
from tuneqdm_fixtures.host import host_version, import_comfy

WIDTH, HEADS = 64, 2


def _flux_layers():
    if host_version() < (0, 8, 0):
        pytest.skip(f"Flux blocks with in-place residuals are ComfyUI 0.8's (host {host_version()})")
    comfy = import_comfy()
    import comfy.ldm.flux.layers as layers

    return comfy, layers


def _random_(block: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in block.parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


class _Case:
    """One block, its inputs (leaves that require grad, entered as non-leaf activations as in a model) and
    a fixed random projection of its outputs as the loss."""

    def __init__(self, kind: str) -> None:
        comfy, layers = _flux_layers()
        gen = torch.Generator().manual_seed(0)
        ops, f64 = comfy.ops.disable_weight_init, torch.float64
        if kind == "double":
            self.block = layers.DoubleStreamBlock(WIDTH, HEADS, mlp_ratio=4.0, qkv_bias=True, dtype=f64, operations=ops)
            self.inputs = [torch.randn(1, 6, WIDTH, generator=gen, dtype=f64), torch.randn(1, 4, WIDTH, generator=gen, dtype=f64)]
        else:
            self.block = layers.SingleStreamBlock(WIDTH, HEADS, mlp_ratio=4.0, dtype=f64, operations=ops)
            self.inputs = [torch.randn(1, 10, WIDTH, generator=gen, dtype=f64)]
        _random_(self.block, gen)
        for x in self.inputs:
            x.requires_grad_(True)
        self.vec = torch.randn(1, WIDTH, generator=gen, dtype=f64)
        self.kind = kind
        self.host = nn.Module()
        self.host.blocks = nn.ModuleList([self.block])  # checkpointed() patches a model's top-level blocks
        self.leaves = list(self.block.parameters()) + self.inputs
        self.direction = [torch.randn(t.shape, generator=gen, dtype=f64) for t in self.leaves]
        outs = self._outputs()
        self.projections = [torch.randn(o.shape, generator=gen, dtype=f64) for o in outs]

    def _outputs(self) -> tuple[torch.Tensor, ...]:
        acts = [x * 1.0 for x in self.inputs]  # non-leaf activations, as after img_in / txt_in
        if self.kind == "double":
            return self.block(img=acts[0], txt=acts[1], vec=self.vec, pe=None)
        return (self.block(acts[0], vec=self.vec, pe=None),)

    def loss(self) -> torch.Tensor:
        return sum((o * r).sum() for o, r in zip(self._outputs(), self.projections))

    def finite_difference(self, eps: float = 1e-5) -> float:
        with torch.no_grad():
            for t, d in zip(self.leaves, self.direction):
                t.add_(eps * d)
            plus = float(self.loss())
            for t, d in zip(self.leaves, self.direction):
                t.sub_(2 * eps * d)
            minus = float(self.loss())
            for t, d in zip(self.leaves, self.direction):
                t.add_(eps * d)
        return (plus - minus) / (2 * eps)

    def autograd(self, context) -> float:
        for t in self.leaves:
            t.grad = None
        with context:
            self.loss().backward()
        return sum(float((t.grad * d).sum()) for t, d in zip(self.leaves, self.direction))


@pytest.mark.parametrize("kind", ["double", "single"])
def test_flux_block_gradients_match_finite_differences(kind):
    case = _Case(kind)
    expected = case.finite_difference()
    # As ComfyUI wrote it, autograd refuses: the residual LayerNorm saved was changed in place.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        case.autograd(contextlib.nullcontext())
    for checkpointing in (False, True):
        got = case.autograd(checkpointed(case.host, checkpointing))
        assert got == pytest.approx(expected, rel=1e-7), (checkpointing, got, expected)
    assert not is_active() and "forward" not in vars(case.block)


def test_only_graph_activations_go_out_of_place():
    a = torch.randn(3, requires_grad=True)
    with augmented_assignment_out_of_place():
        x = a * 2
        alias = x
        x += 1
        assert x is not alias and torch.equal(x, a * 2 + 1) and torch.equal(alias, a * 2)
        half = (a * 2).half()
        y = half
        y += torch.ones(3)  # float32 branch: the result keeps the half residual's dtype, as in place
        assert y.dtype == torch.float16
        buf = torch.zeros(2, 3)
        row = buf[0]
        row += a  # a view: its change must reach the base
        assert torch.equal(buf[0], a.detach())
        with torch.no_grad():  # optimizer updates and sampling stay in place
            p = torch.zeros(3)
            q = p
            q += 1
            assert q is p and torch.equal(p, torch.ones(3))
        with pytest.raises(RuntimeError, match="leaf Variable"):
            a += 1  # a leaf parameter is never rebound quietly
    assert not is_active() and "__iadd__" not in vars(torch.Tensor)
    z = torch.zeros(2, requires_grad=True) * 1
    w = z
    z += 1
    assert z is w  # back to in place


def test_checkpointed_block_that_changes_its_input_is_refused():
    class AddsInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return x.add_(self.lin(x))  # an explicit in-place call is not rewritten

    host = nn.Module()
    host.blocks = nn.ModuleList([AddsInPlace()])
    x = torch.randn(2, 4, requires_grad=True) * 1
    with checkpointed(host, True), pytest.raises(InPlaceInputError, match="AddsInPlace"):
        host.blocks[0](x)
