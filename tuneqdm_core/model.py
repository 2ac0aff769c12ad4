"""Swapping a model's Linear/Conv2d layers for quantized ones, and reading a quantized model back.

`quantize_model` works in place on the module it is given; `structural_copy` gives a module tree of
its own whose float tensors are still shared, so a caller that must not touch its input (a ComfyUI
node) quantizes the copy, and the copy never holds the float weights it replaced.
"""
from __future__ import annotations

import copy
import ctypes
import fnmatch
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .config import TuneQDMConfig
from .errors import ModelMismatchError
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .routing import ExpertRouter

ROUTER_ATTR = "tuneqdm_router"


@dataclass
class QuantReport:
    converted: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines = [f"TuneQDM: quantized {len(self.converted)} layers in {self.seconds:.2f} s; weights "
                 f"{self.bytes_before:,} B -> {self.bytes_after:,} B ({ratio:.4f}x)"]
        lines += [f"  kept in float: {name} ({why})" for name, why in self.skipped]
        return "\n".join(lines)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def structural_copy(module: nn.Module) -> nn.Module:
    """A new module tree sharing every tensor with `module`: replacing a child in the copy leaves the
    original untouched, and costs no memory for the tensors left as they are."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: (structural_copy(child) if child is not None else None)
                    for name, child in module._modules.items()}
    return new


def _is_linear(m: nn.Module) -> bool:
    # Matched by class ancestry so ComfyUI's comfy.ops subclasses count without importing ComfyUI.
    return isinstance(m, nn.Linear) and not isinstance(m, QuantLayer)


def _is_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, QuantLayer)


def _skip_reason(name: str, m: nn.Module, config: TuneQDMConfig) -> str | None:
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.keep_float):
        return "matches keep_float"
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type == "meta":
        return "no materialised weight"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not float"
    if isinstance(m, nn.Conv2d) and isinstance(m.padding, str):
        return f"string padding {m.padding!r}"
    return None


def quantize_model(module: nn.Module, config: TuneQDMConfig, *, compute_device: torch.device | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   weight_init: Callable[[nn.Module], None] | None = None,
                   weight_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> QuantReport:
    """Replace every Linear and Conv2d under `module` (in place) with its quantized counterpart.

    `progress(done, total)` is called after each layer; it may raise to abort (an interrupt), in which
    case the module is left half converted, so callers abort only on copies they own.
    `weight_init(layer)`: for a model built on the meta device, each layer gets real (CPU) storage
    just before it is quantized and this fills it; so a model too large to hold in float is quantized
    one float layer at a time.
    `weight_transform(name, weight)` returns the weight to quantize in place of the layer's own (e.g.
    with a LoRA merged in); it runs one layer at a time, so at most one extra float weight exists.
    """
    if is_quantized(module):
        raise ValueError("this model is already TuneQDM-quantized; quantize the float model instead")
    start = time.perf_counter()
    report = QuantReport(bytes_before=tensor_bytes(module))
    router = ExpertRouter(config.experts)
    generator = torch.Generator().manual_seed(config.seed)
    # Names, not modules: a materialised float layer must be freed as soon as it is swapped out.
    targets = [n for n, m in module.named_modules() if _is_linear(m) or _is_conv2d(m)]
    for i, name in enumerate(targets):
        m = module.get_submodule(name)
        if weight_init is not None and m.weight.device.type == "meta":
            m = m.to_empty(device="cpu")
            with torch.no_grad():
                weight_init(m)
        why = _skip_reason(name, m, config)
        if why is not None:
            report.skipped.append((name, why))
        else:
            cls = QuantLinear if _is_linear(m) else QuantConv2d
            weight = m.weight if weight_transform is None else weight_transform(name, m.weight)
            q = cls.from_float(m, bits=config.bits, experts=config.experts, train_s_in=config.train_s_in,
                               s_in_init=config.s_in_init, s_in_sigma=config.s_in_sigma, generator=generator,
                               compute_device=compute_device, weight=weight)
            del weight
            _attach(q, name, router)
            _set_child(module, name, q)
            report.converted.append((name, cls.__name__, q.weight_shape))
        del m
        if progress is not None:
            progress(i + 1, len(targets))
    setattr(module, ROUTER_ATTR, router)
    report.bytes_after = tensor_bytes(module)
    release_freed_memory()
    report.seconds = time.perf_counter() - start
    return report


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed medium-sized blocks resident otherwise:
    measured here, about 300 MB of the process's footprint after quantizing SD1.5 (one float layer at
    a time, plus temporaries); training calls it between blocks (checkpointing.py). A no-op where
    glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _attach(layer: QuantLayer, name: str, router: ExpertRouter) -> None:
    layer.tuneqdm_name = name
    layer.router = router


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, child)


def quantized_layers(module: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for _, m in module.named_modules():
        if isinstance(m, QuantLayer):
            yield m.tuneqdm_name, m


def get_router(module: nn.Module) -> ExpertRouter:
    router = getattr(module, ROUTER_ATTR, None)
    if router is None:
        raise TypeError("this model is not TuneQDM-quantized (no quantized layers were found)")
    return router


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, ROUTER_ATTR, None) is not None


def model_config(module: nn.Module) -> TuneQDMConfig:
    """The config a quantized model was built with, read off its layers."""
    layers = [m for _, m in quantized_layers(module)]
    if not layers:
        raise TypeError("this model is not TuneQDM-quantized (no quantized layers were found)")
    first = layers[0]
    return TuneQDMConfig(bits=first.bits, experts=first.num_experts, train_s_in=first.s_in.requires_grad)


def fingerprint(module: nn.Module) -> str:
    """Identifies the quantized base model: layer names, shapes, bits and the per-channel steps and
    zero points, which depend on every channel's min and max. Cheap (no pass over the weights)."""
    h = hashlib.sha256()
    for name, m in quantized_layers(module):
        h.update(f"{name}|{m.weight_shape}|{m.bits};".encode())
        h.update(m.base_scale.detach().cpu().float().numpy().tobytes())
        h.update(m.zero.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_quantized_skeleton(module: nn.Module, layers: dict[str, dict], config: TuneQDMConfig) -> None:
    """Swap the named Linear/Conv2d layers of `module` (which may live on the meta device) for empty
    quantized layers, ready for `load_state_dict(assign=True)`; used to load a quantized file
    without ever materialising float weights."""
    router = ExpertRouter(config.experts)
    for name, spec in layers.items():
        try:
            existing = module.get_submodule(name)
        except AttributeError:
            raise ModelMismatchError(f"does not fit this architecture: it has no layer {name!r}") from None
        have = (type(existing).__name__, _channels(existing))
        want = ("Linear" if spec["kind"] == "linear" else "Conv2d", (spec["in"], spec["out"]))
        if not (_is_linear(existing) or _is_conv2d(existing)) or have[1] != want[1]:
            raise ModelMismatchError(f"does not fit this architecture: layer {name!r} is {want[0]} "
                                     f"{want[1][0]}->{want[1][1]} in the file, {have[0]} {have[1]} here")
        q = make_empty_layer(spec, config)
        _attach(q, name, router)
        _set_child(module, name, q)
    setattr(module, ROUTER_ATTR, router)


def _channels(m: nn.Module) -> tuple[int, int] | None:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    return None


def layer_spec(layer: QuantLayer) -> dict:
    """What it takes to rebuild an empty layer of this shape (stored in quantized-model files)."""
    if isinstance(layer, QuantLinear):
        return {"kind": "linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
    return {"kind": "conv2d", "in": layer.in_channels, "out": layer.out_channels,
            "kernel": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups, "padding_mode": layer.padding_mode,
            "bias": layer.bias is not None}


def make_empty_layer(spec: dict, config: TuneQDMConfig, device=None) -> QuantLayer:
    common = dict(bits=config.bits, experts=config.experts, train_s_in=config.train_s_in, device=device)
    if spec["kind"] == "linear":
        return QuantLinear(spec["in"], spec["out"], spec["bias"], **common)
    return QuantConv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]),
                       tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"], spec["bias"],
                       spec["padding_mode"], **common)
