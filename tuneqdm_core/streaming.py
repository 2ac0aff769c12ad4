"""Quantize while loading: a model built on the meta device is filled from a file one layer at a time,
each Linear/Conv2d quantized as soon as its float weight is read, so no more than one layer's float
weight is ever in memory and the float model never exists."""
from __future__ import annotations

from typing import Callable, Collection

import torch
from torch import nn

from .config import TuneQDMConfig
from .errors import ModelMismatchError
from .heap import release_freed_memory
from .model import LayerKind, QuantReport, quantize_model, torch_layer_kind

TensorReader = Callable[[str], torch.Tensor]
"""key (as in the module's state dict) -> the file's tensor for it, as a float tensor where it is a weight."""


def quantize_from_file(module: nn.Module, config: TuneQDMConfig, read: TensorReader, keys: Collection[str], *,
                       source: str, device: torch.device | str = "cpu", compute_device: torch.device | None = None,
                       layer_kind: LayerKind = torch_layer_kind,
                       progress: Callable[[int, int], None] | None = None) -> QuantReport:
    """Quantize `module` (built on the meta device) from the tensors `read` gives for `keys`.

    Every tensor of `module` must have its key in `keys`; tensors the module keeps in float are cast
    to the dtype the module was built with. A key in `keys` that the module does not use is listed in
    the report. `source` names the file in errors.
    """
    keys = set(keys)
    used: set[str] = set()

    def take(key: str, like: torch.Tensor) -> torch.Tensor:
        """The file's tensor for `key`, checked against `like`'s shape, in the file's dtype."""
        if key not in keys:
            raise ModelMismatchError(f"{source}: has no tensor {key!r}, which this model needs")
        t = read(key)
        if tuple(t.shape) != tuple(like.shape):
            raise ModelMismatchError(f"{source}: tensor {key!r} is {tuple(t.shape)} in the file, "
                                     f"{tuple(like.shape)} in the model")
        used.add(key)
        return t

    def fill_layer(name: str, layer: nn.Module) -> None:
        if layer.weight.element_size() < 2:
            layer.float()  # an fp8 model dtype is for what stays float: quantize from the file's precision
        # copy_ converts as it copies: no converted temporary beside the file's tensor and the layer's own.
        layer.weight.copy_(take(f"{name}.weight", layer.weight))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(take(f"{name}.bias", layer.bias))

    def each_layer(done: int, total: int) -> None:
        # glibc keeps the freed float layers' pages otherwise (its mmap threshold grows after the first large
        # free), and the peak would hold several layers instead of one.
        release_freed_memory()
        if progress is not None:
            progress(done, total)

    report = quantize_model(module, config, compute_device=compute_device, progress=each_layer,
                            weight_init=fill_layer, layer_kind=layer_kind, device=device)
    # What stays float (norms, embeddings, layers kept in float), one module at a time.
    for prefix, m in module.named_modules():
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                value = take(key, t).to(device=device, dtype=t.dtype)
                store[name] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    unused = sorted(keys - used)
    if unused:
        report.notes.append(f"{len(unused)} tensors of the file are not part of the model (first: {unused[0]})")
    return report
