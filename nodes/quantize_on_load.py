"""Quantize while loading: a diffusion-model file (or a checkpoint's UNet) becomes a TuneQDM MODEL without
the float model ever being in memory.

ComfyUI's own model detection runs on the file's header (lazy tensors: shapes and dtypes, data read
only where detection looks at a value); the BaseModel is built on the meta device; then the core fills
it layer by layer from the memory-mapped file, quantizing each Linear/Conv2d as its weight is read.
fp8 files (scaled-fp8 and `_quantization_metadata`) are dequantized one weight at a time.
"""
from __future__ import annotations

from typing import Callable

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

from ..tuneqdm_core import FileFormatError, ModelMismatchError, QuantReport, TuneQDMConfig
from ..tuneqdm_core.lazy_file import LazyFile, LazyTensor
from ..tuneqdm_core.streaming import quantize_from_file
from .family_defaults import resolve_keep_float
from .patcher import APPLY_MODEL, WRAPPER_KEY, comfy_layer_kind
from .routing_wrapper import ExpertRouting

WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # scaled-fp8 and _quantization_metadata files
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


def meta_ops(base: type) -> type:
    """ComfyUI operations whose every module is built on the meta device: shapes without storage."""
    attrs = {}
    for name, cls in vars(base).items():
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            def init(self, *args, _cls=cls, device=None, **kwargs):
                _cls.__init__(self, *args, device="meta", **kwargs)
            attrs[name] = type(name, (cls,), {"__init__": init})
    return type(f"Meta{base.__name__}", (base,), attrs)


def _diffusion_tensors(file: LazyFile) -> tuple[dict, dict[str, LazyTensor]]:
    """(state dict of the diffusion model, fp8 scale per weight key), as ComfyUI's loaders see the file."""
    sd: dict = dict(file)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if inner:
        sd = inner
    scales: dict[str, LazyTensor] = {}
    for key in list(sd):
        if key.endswith(".weight_scale_2"):
            raise FileFormatError(f"{file.name}: nvfp4 weights are not supported here; load the file with "
                                  "UNETLoader and connect 'Quantize UNet (TuneQDM)'")
        if key.endswith(_SCALE_SUFFIXES):
            scales[key.rsplit(".", 1)[0] + ".weight"] = sd.pop(key)
        elif key.endswith(_DROPPED_SUFFIXES) or key == "scaled_fp8":
            sd.pop(key)
    return sd, scales


def _unet_dtype(model_config, sd: dict, choice: str) -> tuple[torch.dtype, torch.dtype | None]:
    load_device = comfy.model_management.get_torch_device()
    dtype = WEIGHT_DTYPES[choice]
    if dtype is None:
        params = sum(v.numel() for v in sd.values())
        dtype = comfy.model_management.unet_dtype(model_params=params,
                                                  supported_dtypes=list(model_config.supported_inference_dtypes),
                                                  weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    return dtype, manual_cast


def load_quantized(path: str, config: TuneQDMConfig, weight_dtype: str = "default",
                   progress: Callable[[int, int], None] | None = None) -> tuple[comfy.model_patcher.ModelPatcher, QuantReport]:
    file = LazyFile(path)
    sd, scales = _diffusion_tensors(file)
    model_config = comfy.model_detection.model_config_from_unet(sd, "", metadata=file.metadata)
    if model_config is None:
        raise ModelMismatchError(f"{file.name}: ComfyUI recognises no diffusion model in this file (no model family "
                                 "matches its tensor names and shapes)")
    config, keep_float_note = resolve_keep_float(config, model_config)
    if hasattr(model_config, "quant_config"):
        model_config.quant_config = None  # fp8 weights are dequantized here, one at a time
    dtype, manual_cast = _unet_dtype(model_config, sd, weight_dtype)
    model_config.set_inference_dtype(dtype, manual_cast)
    model_config.custom_operations = meta_ops(comfy.ops.manual_cast if manual_cast is not None
                                              else comfy.ops.disable_weight_init)
    base = model_config.get_model(sd, "", device=torch.device("meta"))
    tensors = model_config.process_unet_state_dict(dict(sd))

    def read(key: str) -> torch.Tensor:
        value = tensors[key]
        t = value.load() if isinstance(value, LazyTensor) else value
        if key in scales:
            t = t.float() * scales[key].load().float()
        return t

    offload = comfy.model_management.unet_offload_device()
    report = quantize_from_file(base.diffusion_model, config, read, tensors.keys(), source=file.name, device=offload,
                                compute_device=comfy.model_management.get_torch_device(), layer_kind=comfy_layer_kind,
                                progress=progress)
    leftover = [n for n, t in list(base.named_parameters()) + list(base.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelMismatchError(f"{file.name}: {len(leftover)} tensors of the model have no data (first: {leftover[0]})")
    if keep_float_note:
        report.notes.append(keep_float_note)
    report.notes.append(f"loaded from {file.name} ({type(model_config).__name__}); what stays float is {dtype}")
    base.device = offload
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=offload)
    patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, ExpertRouting())
    return patcher, report
