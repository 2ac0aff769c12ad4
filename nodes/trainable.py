"""ComfyUI runs every prompt under torch.inference_mode, so the tensors a loader created are inference
tensors, which autograd refuses to save for backward. For the length of a training run, the float
tensors of the non-quantized modules (norms, embeddings, layers kept in float) are swapped for
ordinary copies and put back afterwards; the packed quantized weights are never copied."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..tuneqdm_core import QuantLayer


@contextmanager
def grad_ready(module: nn.Module) -> Iterator[None]:
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for m in module.modules():
            if isinstance(m, QuantLayer):
                continue
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        copy = t.clone()
                        store[name] = nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy
                        swapped.append((store, name, t))
        yield
    finally:
        for store, name, original in swapped:
            store[name] = original
