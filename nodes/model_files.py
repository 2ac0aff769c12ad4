"""Quantized UNet files for ComfyUI: the core's quantized-model format plus what ComfyUI needs to
rebuild the BaseModel around it (model config class, UNet config, dtype). Loading builds the
architecture with every layer on the meta device (custom operations), then fills it from the file:
the float model is never materialised."""
from __future__ import annotations

import json
import os

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import torch

from ..tuneqdm_core import FileFormatError, ModelMismatchError
from ..tuneqdm_core.fileio import load_into_skeleton, read_quantized_model, save_quantized_model
from .routing_wrapper import ExpertRouting
from .patcher import APPLY_MODEL, WRAPPER_KEY

META_CLASS = "comfy.model_config_class"
META_UNET = "comfy.unet_config"
META_DTYPE = "comfy.unet_dtype"
META_MODEL_TYPE = "comfy.model_type"


def _json_safe(config: dict) -> dict:
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def save(path: str, model) -> None:
    base = model.model
    extra = {
        META_CLASS: type(base.model_config).__name__,
        META_UNET: json.dumps(_json_safe(base.model_config.unet_config)),
        META_DTYPE: str(base.get_dtype()).removeprefix("torch."),
        # Config classes guess eps vs v from weights (SD2.x) or assume one (SD1.5): record what the model is.
        META_MODEL_TYPE: base.model_type.name,
    }
    save_quantized_model(path, base.diffusion_model, extra_metadata=extra)


class _MetaOps(comfy.ops.disable_weight_init):
    """Every layer ComfyUI builds lands on the meta device: shapes without storage."""

    class Linear(comfy.ops.disable_weight_init.Linear):
        def __init__(self, *args, device=None, **kwargs):
            super().__init__(*args, device="meta", **kwargs)

    class Conv2d(comfy.ops.disable_weight_init.Conv2d):
        def __init__(self, *args, device=None, **kwargs):
            super().__init__(*args, device="meta", **kwargs)

    class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
        def __init__(self, *args, device=None, **kwargs):
            super().__init__(*args, device="meta", **kwargs)

    class LayerNorm(comfy.ops.disable_weight_init.LayerNorm):
        def __init__(self, *args, device=None, **kwargs):
            super().__init__(*args, device="meta", **kwargs)


def set_model_type(base, type_name: str, source: str) -> None:
    """Give a BaseModel built by its config class the prediction type (and so the sampling) it was trained with."""
    try:
        model_type = comfy.model_base.ModelType[type_name]
    except KeyError:
        raise FileFormatError(f"{source}: unknown ComfyUI model type {type_name!r}") from None
    base.model_type = model_type
    base.model_sampling = comfy.model_base.model_sampling(base.model_config, model_type)


def load(path: str) -> comfy.model_patcher.ModelPatcher:
    name = os.path.basename(path)
    header, tensors = read_quantized_model(path)
    meta = header.metadata
    try:
        config_cls = getattr(comfy.supported_models, meta[META_CLASS])
        unet_config = json.loads(meta[META_UNET])
        dtype = getattr(torch, meta[META_DTYPE])
    except (KeyError, AttributeError, ValueError) as e:
        raise FileFormatError(f"{name}: a TuneQDM model file without the ComfyUI model description ({e}); "
                              "it was not written by Save Quantized UNet") from None
    model_config = config_cls(unet_config)
    load_device = comfy.model_management.get_torch_device()
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model_config.custom_operations = _MetaOps
    base = model_config.get_model({}, "")
    if META_MODEL_TYPE in meta:
        set_model_type(base, meta[META_MODEL_TYPE], name)
    try:
        load_into_skeleton(base.diffusion_model, header, tensors, name)
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{e} (model config {meta[META_CLASS]})") from None
    offload = comfy.model_management.unet_offload_device()
    base = base.to(offload)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload)
    patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, ExpertRouting())
    return patcher
