"""Save / Load Quantized UNet and Save / Load Scales (TuneQDM), in models/tuneqdm/."""
from __future__ import annotations

from ..tuneqdm_core import load_scales, save_scales, scales_of
from . import folders, model_files
from .patcher import require_quantized, routing_of, with_routing

CATEGORY = "TuneQDM"
SCALES_TYPE = "TUNEQDM_SCALES"


class SaveQuantizedUNet:
    DESCRIPTION = "Writes a quantized MODEL to models/tuneqdm/ so it loads later without the float model."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A TuneQDM-quantized MODEL."}),
            "filename_prefix": ("STRING", {"default": "tuneqdm_unet",
                                           "tooltip": "File name inside models/tuneqdm/ (.safetensors added)."}),
        }}

    def save(self, model, filename_prefix):
        require_quantized(model, "Save Quantized UNet")
        path = folders.output_path(filename_prefix)
        model_files.save(path, model)
        return {"ui": {"text": [path]}}


class LoadQuantizedUNet:
    DESCRIPTION = "Loads a quantized UNet saved by Save Quantized UNet; no float weights are ever built."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folders.files(), {"tooltip": "A quantized UNet file in models/tuneqdm/."})}}

    def load(self, unet_name):
        return (model_files.load(folders.full_path(unet_name)),)


class SaveScales:
    DESCRIPTION = "Writes the small scales file (s_out, s_in per expert, fp16) to models/tuneqdm/."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The quantized MODEL the scales belong to."}),
                "filename_prefix": ("STRING", {"default": "tuneqdm_scales",
                                               "tooltip": "File name inside models/tuneqdm/ (.safetensors added)."}),
            },
            "optional": {
                "scales": (SCALES_TYPE, {"tooltip": "Scales to save (from Train TuneQDM Scales). If not connected, "
                                                    "the scales the MODEL currently samples with."}),
            },
        }

    def save(self, model, filename_prefix, scales=None):
        require_quantized(model, "Save Scales")
        if scales is None:
            scales = routing_of(model).scales or scales_of(model.model.diffusion_model)
        path = folders.output_path(filename_prefix)
        save_scales(path, scales, model.model.diffusion_model)
        return {"ui": {"text": [path]}}


class LoadScales:
    DESCRIPTION = "Returns a clone of a quantized MODEL that samples with the scales of a file."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", SCALES_TYPE)
    RETURN_NAMES = ("model", "scales")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The quantized MODEL these scales were trained on."}),
            "scales_name": (folders.files(), {"tooltip": "A scales file in models/tuneqdm/."}),
        }}

    def load(self, model, scales_name):
        require_quantized(model, "Load Scales")
        scales = load_scales(folders.full_path(scales_name), model.model.diffusion_model)
        return (with_routing(model, routing_of(model).with_changes(scales=scales)), scales)
