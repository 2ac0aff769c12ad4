"""Swapping a model's Linear/Conv2d layers for quantized ones, and reading a quantized model back.

`quantize_model` works in place on the module it is given. A caller that must not touch its input (a
ComfyUI node) quantizes a `structural_copy` (a module tree of its own whose tensors are still shared;
the copy never holds the float weights it replaced) and then calls `own_tensors`, so that the
quantized model shares no tensor with the float one.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .config import TuneQDMConfig
from .errors import AlreadyQuantizedError, ModelMismatchError, NotQuantizedError
from .layers import PLACEHOLDER, QuantConv2d, QuantLayer, QuantLinear
from .heap import release_freed_memory
from .routing import ExpertRouter
from .thread_tuner import tuned_threads

ROUTER_ATTR = "tuneqdm_router"
CONFIG_ATTR = "tuneqdm_config"  # the TuneQDMConfig the model was quantized (or loaded) with: model_config() reads it


@dataclass
class QuantReport:
    converted: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines = [f"TuneQDM: quantized {len(self.converted)} layers in {self.seconds:.2f} s; weights "
                 f"{self.bytes_before:,} B -> {self.bytes_after:,} B ({ratio:.4f}x)"]
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  kept in float: {name} ({why})" for name, why in self.skipped]
        return "\n".join(lines)


LayerKind = Callable[[nn.Module], "str | None"]
"""module -> 'linear', 'conv2d' or None: which layers computing a linear map or a 2-D convolution
`quantize_model` converts. Hosts with their own layer classes (ComfyUI's op classes that are not
nn.Linear subclasses) pass their own."""

WeightOf = Callable[[str, nn.Module], torch.Tensor]
"""(layer name, layer) -> the float weight to quantize, e.g. unpatched with a LoRA merged in."""


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once. Tensor subclasses without a
    plain storage (e.g. a host's fp8 wrapper tensors) count by their own numel * element_size."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key: object = id(t)
        if t.device.type != "meta":
            try:
                key = (t.untyped_storage().data_ptr(), t.device)
            except (RuntimeError, NotImplementedError, TypeError):
                pass
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


def own_tensors(module: nn.Module, original: Callable[[str], "torch.Tensor | None"],
                device: torch.device | str) -> None:
    """Replace every parameter and buffer of `module` that `original(key)` knows (keys as in
    `state_dict`, non-persistent buffers included) with a private copy of what it returns, on
    `device`; tensors it does not know, or knows in another shape (those made by quantization), are
    kept. After a `structural_copy` and `quantize_model`, this leaves a model that shares no tensor
    with its source, so moving or patching one never moves or patches the other."""
    for prefix, m in module.named_modules():
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                src = original(f"{prefix}.{name}" if prefix else name)
                if src is None or src.shape != t.shape:
                    continue  # made by quantization (a float layer's weight is no quantized layer's)
                copy_ = src.detach().to(device=device, copy=True)
                store[name] = nn.Parameter(copy_, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy_


def torch_layer_kind(m: nn.Module) -> str | None:
    """The plain torch rule; subclasses (ComfyUI's comfy.ops classes among them) count."""
    if isinstance(m, QuantLayer):
        return None
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    return None


def _skip_reason(name: str, m: nn.Module, config: TuneQDMConfig) -> str | None:
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.keep_float):
        return "matches keep_float"
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type == "meta":
        return "no materialised weight"
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not float"
    if isinstance(getattr(m, "padding", None), str):
        return f"string padding {m.padding!r}"
    return None


def _unquantized_reason(m: nn.Module) -> str | None:
    """Why a weight layer that is not converted stays float (listed in the report, never silent)."""
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)):
        return f"{type(m).__name__}: only Linear and Conv2d have a quantized form"
    return None


def quantize_model(module: nn.Module, config: TuneQDMConfig, *, compute_device: torch.device | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   weight_init: Callable[[str, nn.Module], None] | None = None,
                   weight_of: WeightOf | None = None, layer_kind: LayerKind = torch_layer_kind,
                   device: torch.device | str | None = None) -> QuantReport:
    """Replace every Linear and Conv2d under `module` (in place) with its quantized counterpart.

    `progress(done, total)` is called after each layer; it may raise to abort (an interrupt), in which
    case the module is left half converted, so callers abort only on copies they own.
    `weight_init(name, layer)`: for a model built on the meta device, each layer gets real (CPU) storage
    just before it is quantized and this fills it; so a model too large to hold in float is quantized
    one float layer at a time.
    `weight_of(name, layer)` returns the float weight to quantize in place of the layer's own (e.g.
    unpatched, dequantized from fp8, with a LoRA merged in); it runs one layer at a time, so at most one
    extra float weight exists. `layer_kind` says which layers are converted. The quantized layers are
    built on `device` (default: where each float weight lives).
    """
    if is_quantized(module):
        raise AlreadyQuantizedError("this model is already TuneQDM-quantized; quantize the float model instead")
    start = time.perf_counter()
    report = QuantReport(bytes_before=tensor_bytes(module))
    router = ExpertRouter(config.experts, config.routing)
    generator = torch.Generator().manual_seed(config.seed)
    # Names, not modules: a materialised float layer must be freed as soon as it is swapped out.
    targets = []
    for n, m in module.named_modules():
        if layer_kind(m) is not None:
            targets.append(n)
        elif not isinstance(m, QuantLayer) and (why := _unquantized_reason(m)) is not None:
            report.skipped.append((n, why))
    with tuned_threads() as tuner:
        for i, name in enumerate(targets):
            m = module.get_submodule(name)
            if weight_init is not None and m.weight.device.type == "meta":
                m = m.to_empty(device="cpu")
                with torch.no_grad():
                    weight_init(name, m)
            why = _skip_reason(name, m, config)
            if why is not None:
                report.skipped.append((name, why))
            else:
                cls = QuantLinear if layer_kind(m) == "linear" else QuantConv2d
                weight = m.weight if weight_of is None else weight_of(name, m)
                timed = tuner is not None and torch.device(compute_device or weight.device).type == "cpu"
                if timed:
                    tuner.begin(weight.numel())
                q = cls.from_float(m, bits=config.bits, experts=config.experts, train_s_in=config.train_s_in,
                                   s_in_init=config.s_in_init, s_in_sigma=config.s_in_sigma, generator=generator,
                                   compute_device=compute_device, weight=weight, device=device,
                                   group_size=config.group_size, minimize=config.minimize_error)
                if timed:
                    tuner.end()
                del weight
                _attach(q, name, router)
                _set_child(module, name, q)
                report.converted.append((name, cls.__name__, q.weight_shape))
            del m
            if progress is not None:
                progress(i + 1, len(targets))
        if tuner is not None and tuner.summary():
            report.notes.append(tuner.summary())
    _set_model_state(module, router, config)
    report.bytes_after = tensor_bytes(module)
    release_freed_memory()
    report.seconds = time.perf_counter() - start
    return report


def _set_model_state(module: nn.Module, router: ExpertRouter, config: TuneQDMConfig) -> None:
    # Plain attributes (object.__setattr__): neither is a submodule or a parameter of the model.
    object.__setattr__(module, ROUTER_ATTR, router)
    object.__setattr__(module, CONFIG_ATTR, config)


def _attach(layer: QuantLayer, name: str, router: ExpertRouter) -> None:
    layer.tuneqdm_name = name
    layer.router = router


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, child)


def file_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a file stores: without the quantized layers' empty weight placeholders."""
    placeholders = {f"{prefix}.{PLACEHOLDER}" if prefix else PLACEHOLDER
                    for prefix, m in module.named_modules() if isinstance(m, QuantLayer)}
    return {k: v for k, v in module.state_dict().items() if k not in placeholders}


def quantized_layers(module: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for _, m in module.named_modules():
        if isinstance(m, QuantLayer):
            yield m.tuneqdm_name, m


def get_router(module: nn.Module) -> ExpertRouter:
    router = getattr(module, ROUTER_ATTR, None)
    if router is None:
        raise NotQuantizedError("this model is not TuneQDM-quantized (no quantized layers were found)")
    return router


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, ROUTER_ATTR, None) is not None


def model_config(module: nn.Module) -> TuneQDMConfig:
    """The config a quantized model was built with (or loaded with, from a file)."""
    config = getattr(module, CONFIG_ATTR, None)
    if config is None or not is_quantized(module):
        raise NotQuantizedError("this model is not TuneQDM-quantized (no quantized layers were found)")
    return config


def fingerprint(module: nn.Module) -> str:
    """Identifies the quantized base model: layer names, shapes, bits and the per-channel steps and
    zero points, which depend on every channel's min and max, and the group steps of group-wise layers
    (per-channel layers hash exactly as before groups existed). Cheap (no pass over the weights)."""
    h = hashlib.sha256()
    for name, m in quantized_layers(module):
        h.update(f"{name}|{m.weight_shape}|{m.bits};".encode())
        h.update(m.base_scale.detach().cpu().float().numpy().tobytes())
        h.update(m.zero.detach().cpu().numpy().tobytes())
        if m.group_size:
            h.update(f"|g{m.group_size}".encode())
            h.update(m.group_scale.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_quantized_skeleton(module: nn.Module, layers: dict[str, dict], config: TuneQDMConfig) -> None:
    """Swap the named Linear/Conv2d layers of `module` (which may live on the meta device) for empty
    quantized layers, ready for `load_state_dict(assign=True)`; used to load a quantized file
    without ever materialising float weights."""
    router = ExpertRouter(config.experts, config.routing)
    for name, spec in layers.items():
        try:
            existing = module.get_submodule(name)
        except AttributeError:
            raise ModelMismatchError(f"does not fit this architecture: it has no layer {name!r}") from None
        have = (type(existing).__name__, _channels(existing))
        want = ("Linear" if spec["kind"] == "linear" else "Conv2d", (spec["in"], spec["out"]))
        if torch_layer_kind(existing) is None or have[1] != want[1]:
            raise ModelMismatchError(f"does not fit this architecture: layer {name!r} is {want[0]} "
                                     f"{want[1][0]}->{want[1][1]} in the file, {have[0]} {have[1]} here")
        q = make_empty_layer(spec, config)
        _attach(q, name, router)
        _set_child(module, name, q)
    _set_model_state(module, router, config)


def _channels(m: nn.Module) -> tuple[int, int] | None:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    return None


def layer_spec(layer: QuantLayer) -> dict:
    """What it takes to rebuild an empty layer of this shape (stored in quantized-model files)."""
    if isinstance(layer, QuantLinear):
        spec = {"kind": "linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
    else:
        spec = {"kind": "conv2d", "in": layer.in_channels, "out": layer.out_channels,
                "kernel": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
                "dilation": list(layer.dilation), "groups": layer.groups, "padding_mode": layer.padding_mode,
                "bias": layer.bias is not None}
    if layer.group_size:  # per-channel specs stay as they were (files without the key are per-channel)
        spec["group_size"] = layer.group_size
        if layer.group_scale.dtype == torch.uint8:  # without the key: the float16 steps of older files
            spec["group_steps"] = "codes"
    return spec


def specs_grouped(layers: dict[str, dict]) -> bool:
    """Whether any layer spec of a file is group-wise (such files need a reader that knows groups)."""
    return any(spec.get("group_size", 0) for spec in layers.values())


def specs_coded(layers: dict[str, dict]) -> bool:
    """Whether any layer spec of a file has step codes (such files need a reader that knows them)."""
    return any(spec.get("group_steps") == "codes" for spec in layers.values())


def make_empty_layer(spec: dict, config: TuneQDMConfig, device=None) -> QuantLayer:
    """An empty layer for `spec`; its group size and step storage are the spec's (absent: per channel, the
    files written before groups existed; float16 steps, those written before step codes), never the config's."""
    common = dict(bits=config.bits, experts=config.experts, train_s_in=config.train_s_in, device=device,
                  group_size=int(spec.get("group_size", 0)), step_codes=spec.get("group_steps") == "codes")
    if spec["kind"] == "linear":
        return QuantLinear(spec["in"], spec["out"], spec["bias"], **common)
    return QuantConv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]),
                       tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"], spec["bias"],
                       spec["padding_mode"], **common)
