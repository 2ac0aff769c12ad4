"""Load and Quantize Diffusion Model / Checkpoint (TuneQDM): quantize while loading, for the memory the
pack promises (the float model is never in memory)."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .file_fingerprint import fingerprint_or_nan
from .patcher import progress_callback
from .quantize_node import (CATEGORY, DEFAULT_GROUP, config_from_options, publish, quantize_optional,
                            quantize_options, quantized_outputs)
from .quantize_on_load import WEIGHT_DTYPES, load_quantized

_MODEL_TOOLTIP = "The quantized MODEL."


def _weight_dtype() -> io.Combo.Input:
    return io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                          tooltip="dtype of what stays float (norms, embeddings, layers kept in float); default: "
                                  "what ComfyUI's loaders would pick.")


def _file_input(name: str, folder: str) -> io.Combo.Input:
    return io.Combo.Input(name, options=folder_paths.get_filename_list(folder), tooltip=f"A file in models/{folder}.")


def _load(folder: str, name: str, weight_dtype: str, bits: str, experts: int, scales: str, s_in_init: str,
          keep_float: str, group_size: str) -> io.NodeOutput:
    config = config_from_options(bits, experts, scales, s_in_init, keep_float, group_size)
    path = folder_paths.get_full_path_or_raise(folder, name)
    model, report = load_quantized(path, config, weight_dtype, progress=progress_callback())
    return io.NodeOutput(model, publish(report))


class LoadQuantizeDiffusionModel(io.ComfyNode):
    FOLDER = "diffusion_models"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMLoadQuantizeDiffusionModel",
            display_name="Load and Quantize Diffusion Model (TuneQDM)",
            category=CATEGORY,
            description=(
                "Reads a diffusion-model file (models/diffusion_models) tensor by tensor and quantizes each "
                "Linear/Conv2d as it is read: the float model is never in memory. Same options and report as "
                "Quantize UNet; works for every family ComfyUI's UNETLoader detects, from fp32, fp16, bf16 and "
                "fp8 files."),
            inputs=[_file_input("unet_name", cls.FOLDER), _weight_dtype(), *quantize_options(), *quantize_optional()],
            outputs=quantized_outputs(_MODEL_TOOLTIP),
        )

    @classmethod
    def fingerprint_inputs(cls, unet_name, **_) -> str | float:
        return fingerprint_or_nan(lambda: folder_paths.get_full_path_or_raise(cls.FOLDER, unet_name))

    @classmethod
    def execute(cls, unet_name, weight_dtype, bits, experts, scales, s_in_init, keep_float,
                group_size=DEFAULT_GROUP) -> io.NodeOutput:
        return _load(cls.FOLDER, unet_name, weight_dtype, bits, experts, scales, s_in_init, keep_float, group_size)


class LoadQuantizeCheckpoint(io.ComfyNode):
    FOLDER = "checkpoints"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMLoadQuantizeCheckpoint",
            display_name="Load and Quantize Checkpoint UNet (TuneQDM)",
            category=CATEGORY,
            description=(
                "The UNet of a full checkpoint (models/checkpoints), quantized while it is read; the text encoders "
                "and VAE are not loaded (use CheckpointLoaderSimple's CLIP and VAE outputs)."),
            inputs=[_file_input("ckpt_name", cls.FOLDER), _weight_dtype(), *quantize_options(), *quantize_optional()],
            outputs=quantized_outputs(_MODEL_TOOLTIP),
        )

    @classmethod
    def fingerprint_inputs(cls, ckpt_name, **_) -> str | float:
        return fingerprint_or_nan(lambda: folder_paths.get_full_path_or_raise(cls.FOLDER, ckpt_name))

    @classmethod
    def execute(cls, ckpt_name, weight_dtype, bits, experts, scales, s_in_init, keep_float,
                group_size=DEFAULT_GROUP) -> io.NodeOutput:
        return _load(cls.FOLDER, ckpt_name, weight_dtype, bits, experts, scales, s_in_init, keep_float, group_size)
