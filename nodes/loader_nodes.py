"""Load and Quantize Diffusion Model / Checkpoint (TuneQDM): quantize while loading, for the memory the
pack promises (the float model is never in memory)."""
from __future__ import annotations

import os

import folder_paths

from .patcher import progress_callback
from .quantize_node import CATEGORY, DEFAULT_GROUP, config_from_options, publish, quantize_optional, quantize_options
from .quantize_on_load import WEIGHT_DTYPES, load_quantized

_WEIGHT_DTYPE = (list(WEIGHT_DTYPES), {"default": "default",
                                       "tooltip": "dtype of what stays float (norms, embeddings, layers kept in "
                                                  "float); default: what ComfyUI's loaders would pick."})


def _changed(folder: str, name: str) -> str:
    path = folder_paths.get_full_path_or_raise(folder, name)
    st = os.stat(path)
    return f"{st.st_mtime_ns}:{st.st_size}"


class LoadQuantizeDiffusionModel:
    DESCRIPTION = ("Reads a diffusion-model file (models/diffusion_models) tensor by tensor and quantizes each "
                   "Linear/Conv2d as it is read: the float model is never in memory. Same options and report as "
                   "Quantize UNet; works for every family ComfyUI's UNETLoader detects, from fp32, fp16, bf16 "
                   "and fp8 files.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The quantized MODEL.", "Layers converted and kept in float, weight bytes before and after.")
    FUNCTION = "load"
    FOLDER = "diffusion_models"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list(cls.FOLDER), {"tooltip": f"A file in models/{cls.FOLDER}."}),
            "weight_dtype": _WEIGHT_DTYPE,
            **quantize_options(),
        }, "optional": quantize_optional()}

    @classmethod
    def IS_CHANGED(cls, unet_name, **_):
        return _changed(cls.FOLDER, unet_name)

    def load(self, unet_name, weight_dtype, bits, experts, scales, s_in_init, keep_float, group_size=DEFAULT_GROUP):
        config = config_from_options(bits, experts, scales, s_in_init, keep_float, group_size)
        path = folder_paths.get_full_path_or_raise(self.FOLDER, unet_name)
        model, report = load_quantized(path, config, weight_dtype, progress=progress_callback())
        return (model, publish(report))


class LoadQuantizeCheckpoint(LoadQuantizeDiffusionModel):
    DESCRIPTION = ("The UNet of a full checkpoint (models/checkpoints), quantized while it is read; the text "
                   "encoders and VAE are not loaded (use CheckpointLoaderSimple's CLIP and VAE outputs).")
    FOLDER = "checkpoints"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list(cls.FOLDER), {"tooltip": f"A file in models/{cls.FOLDER}."}),
            "weight_dtype": _WEIGHT_DTYPE,
            **quantize_options(),
        }, "optional": quantize_optional()}

    @classmethod
    def IS_CHANGED(cls, ckpt_name, **_):
        return _changed(cls.FOLDER, ckpt_name)

    def load(self, ckpt_name, weight_dtype, bits, experts, scales, s_in_init, keep_float, group_size=DEFAULT_GROUP):
        return super().load(ckpt_name, weight_dtype, bits, experts, scales, s_in_init, keep_float, group_size)
