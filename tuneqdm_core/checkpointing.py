"""Activation checkpointing of a model's top-level blocks, for the duration of a training run."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.utils.checkpoint
from torch import nn


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The highest modules that own parameters: elements of top-level ModuleLists (a UNet's input and
    output blocks, a transformer's layers) and the other top-level children."""
    blocks = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(c for c in child if _has_params(c))
        elif _has_params(child):
            blocks.append(child)
    return blocks


@contextmanager
def checkpointed(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Recompute each block's activations in backward instead of storing them. The blocks' forwards
    are patched on the instances and restored on exit, whatever happens inside."""
    if not enabled:
        yield 0
        return
    patched = []
    for block in _blocks(model):
        before = block.__dict__.get("forward")
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

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
