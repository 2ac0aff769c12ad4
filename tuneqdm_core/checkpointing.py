"""Activation checkpointing of a model's top-level blocks, for the duration of a training run; and, with
or without it, residual adds written `x += y` done out of place (out_of_place.py), which models such as
ComfyUI 0.8's Flux need for correct gradients."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.utils.checkpoint
from torch import nn

from .errors import InPlaceInputError
from .heap import release_freed_memory
from .out_of_place import augmented_assignment_out_of_place


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The highest modules that own parameters and are certainly called through their own forward:
    elements of top-level ModuleLists (a UNet's input and output blocks, a transformer's layers) and the
    other top-level children. A Sequential is checkpointed child by child, because models may iterate it
    instead of calling it: ComfyUI's UNets run each TimestepEmbedSequential block (input, middle and output
    blocks) layer by layer in `forward_timestep_embed`, never through the block's forward."""
    blocks = []

    def add(m: nn.Module) -> None:
        if isinstance(m, nn.Sequential):
            for c in m:
                add(c)
        elif _has_params(m):
            blocks.append(m)

    for child in model.children():
        for m in (child if isinstance(child, nn.ModuleList) else (child,)):
            add(m)
    return blocks


def _versions(values) -> list[tuple[torch.Tensor, int]]:
    # Inference tensors have no version counter (and cannot be changed outside inference mode anyway).
    return [(a, a._version) for a in values if isinstance(a, torch.Tensor) and not a.is_inference()]


@contextmanager
def checkpointed(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Recompute each block's activations in backward instead of storing them (`enabled`); in both cases
    `x += y` on activations is out of place while inside. The blocks' forwards are patched on the
    instances and restored on exit, whatever happens inside."""
    with augmented_assignment_out_of_place():
        if not enabled:
            yield 0
            return
        with _checkpointed_blocks(model) as count:
            yield count


@contextmanager
def _checkpointed_blocks(model: nn.Module) -> Iterator[int]:
    patched = []
    for block in _blocks(model):
        before = block.__dict__.get("forward")
        original = block.forward

        def run(*args, _original=original, _block=block, **kwargs):
            # Runs in the forward and again when backward recomputes the block. On the CPU, the block
            # before has just freed its activations and weight slices, and glibc would keep those heap
            # holes resident while long-lived small blocks (autograd nodes, saved inputs, gradients)
            # pin them: a W4 SD1.5 step at 32x32 peaked about 150 MB higher, for some 9% of step time.
            if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in (*args, *kwargs.values())):
                release_freed_memory()
            before = _versions((*args, *kwargs.values()))
            out = _original(*args, **kwargs)
            # `+=` is out of place here; an explicit in-place call (x.add_(y)) on an input is not, and the
            # checkpoint keeps that very tensor to recompute from: say so rather than train on wrong gradients.
            changed = [i for i, (a, v) in enumerate(before) if a._version != v]
            if changed and torch.is_grad_enabled():
                raise InPlaceInputError(
                    f"{type(_block).__name__} changes its input tensor(s) {changed} in place, which activation "
                    "checkpointing cannot recompute; train with gradient checkpointing off")
            return out

        def forward(*args, _run=run, **kwargs):
            return torch.utils.checkpoint.checkpoint(_run, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append((block, before))
    try:
        yield len(patched)
    finally:
        for block, before in patched:
            if before is None:
                del block.forward  # the class's forward is back
            else:
                block.forward = before
