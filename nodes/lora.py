"""LoRA and the other ComfyUI weight patches on quantized layers.

The stock LoRA loaders address a layer by `<name>.weight`; a quantized layer keeps that key (an empty
placeholder), so ComfyUI maps the LoRA's keys and stores the patches on the MODEL clone, per clone, as
for any model. ModelPatcher never writes them (the placeholder is no parameter): at call time the
sampling wrapper turns the running clone's patches for quantized layers into adapters that the layers
add to their output (tuneqdm_core/adapters.py). LoRA stays low-rank; LoHa, LoKr and plain differences
are additive and build one layer's difference inside the call. A patch that is not additive (OFT,
BOFT, GLoRA, DoRA, 'set', offsets, functions) is an error naming its key, never a silent skip.
"""
from __future__ import annotations

import logging
from typing import Iterable

import comfy.lora
import comfy.weight_adapter
import torch

from ..tuneqdm_core import quantized_layers
from ..tuneqdm_core.adapters import Adapter, LowRank, WeightDelta
from ..tuneqdm_core.errors import UnsupportedError

DIFFUSION_PREFIX = "diffusion_model."
_ADDITIVE = tuple(getattr(comfy.weight_adapter, name) for name in ("LoHaAdapter", "LoKrAdapter")
                  if hasattr(comfy.weight_adapter, name))


class UnsupportedPatch(UnsupportedError):
    """A weight patch on a quantized layer that cannot be applied without its float weight."""


def quantized_keys(diffusion_model: torch.nn.Module) -> dict[str, str]:
    """'diffusion_model.<layer>.weight' -> '<layer>' for every quantized layer."""
    return {f"{DIFFUSION_PREFIX}{name}.weight": name for name, _ in quantized_layers(diffusion_model)}


def adapters_for(patcher, diffusion_model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype) -> dict[str, tuple[Adapter, ...]]:
    """The clone's weight patches and weight wrappers on quantized layers, as adapters on `device`."""
    keys = quantized_keys(diffusion_model)
    shapes = {name: layer.weight_shape for name, layer in quantized_layers(diffusion_model)}
    out: dict[str, tuple[Adapter, ...]] = {}
    for key, patches in patcher.patches.items():
        if key in keys:
            name = keys[key]
            out[name] = tuple(a.to(device, dtype) for a in _from_patches(key, patches, shapes[name]))
    for key, wrappers in getattr(patcher, "weight_wrapper_patches", {}).items():
        if key in keys:
            name = keys[key]
            out[name] = out.get(name, ()) + tuple(_from_wrapper(key, f, shapes[name], device, dtype) for f in wrappers)
    return out


def count(adapters: dict[str, tuple[Adapter, ...]]) -> int:
    return sum(len(v) for v in adapters.values())


def _from_patches(key: str, patches: Iterable[tuple], shape: tuple[int, ...]) -> list[Adapter]:
    out: list[Adapter] = []
    for patch in patches:
        strength, value, strength_model, offset, function = (tuple(patch) + (None,) * 5)[:5]
        if offset is not None or function is not None:
            raise UnsupportedPatch(f"{key}: a weight patch with an offset or a function cannot be applied to a "
                                   "quantized layer")
        if strength_model is None:
            strength_model = 1.0
        out.append(_adapter(key, strength, value, float(strength_model), shape))
    return out


def _adapter(key: str, strength: float, value, strength_model: float, shape: tuple[int, ...]) -> Adapter:
    if isinstance(value, comfy.weight_adapter.LoRAAdapter):
        up, down, alpha, mid, dora_scale, reshape = value.weights
        if dora_scale is not None or reshape is not None:
            raise UnsupportedPatch(f"{key}: DoRA and reshaping LoRAs need the float weight, which a quantized "
                                   "layer does not have; quantize after applying this LoRA instead")
        scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        return LowRank(down=down, up=up, scale=scale, mid=mid, base_strength=strength_model)
    if isinstance(value, _ADDITIVE) and value.weights[-1] is None:
        return WeightDelta(_delta(key, strength, value, shape), base_strength=strength_model)
    if isinstance(value, tuple) and (len(value) == 1 or (len(value) == 2 and value[0] == "diff")):
        return WeightDelta(_delta(key, strength, value, shape), base_strength=strength_model)
    kind = type(value).__name__ if not isinstance(value, tuple) else f"'{value[0]}'"
    raise UnsupportedPatch(f"{key}: a {kind} patch is not additive, so it cannot be applied to a quantized layer "
                           "(LoRA, LoHa, LoKr and plain differences can); quantize after applying it instead")


def _delta(key: str, strength: float, value, shape: tuple[int, ...]):
    def build() -> torch.Tensor:
        return comfy.lora.calculate_weight([(strength, value, 1.0, None, None)], torch.zeros(shape), key)
    return build


def _from_wrapper(key: str, wrapper, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Adapter:
    # TrainLoraNode's LoRA wrappers add their difference to any weight they get (w + scale * up @ down).
    if type(wrapper).__name__ != "LoraDiff":
        raise UnsupportedPatch(f"{key}: a {type(wrapper).__name__} weight wrapper cannot be applied to a quantized "
                               "layer; quantize after applying it instead")
    return WeightDelta(lambda: wrapper(torch.zeros(shape, device=device, dtype=dtype)).to(dtype))


def log_applied(n_keys: int, where: str) -> None:
    if n_keys:
        logging.info("TuneQDM: %d LoRA/adapter patches applied to quantized layers %s", n_keys, where)
