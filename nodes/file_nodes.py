"""Save / Load Quantized UNet and Save / Load Scales (TuneQDM), in models/tuneqdm/unet/ and models/tuneqdm/scales/."""
from __future__ import annotations

import dataclasses
import logging
import os

from ..tuneqdm_core import load_scales, save_scales, scales_of
from ..tuneqdm_core.fileio import SHA_KEY
from . import folders, model_files
from .patcher import require_quantized, routing_of, with_routing

CATEGORY = "TuneQDM"
SCALES_TYPE = "TUNEQDM_SCALES"
OVERWRITE = ("BOOLEAN", {"default": False, "tooltip": "Off: an existing file is kept and the new one gets the next "
                                                      "free number (name_00001...). On: replace it."})


def file_signature(path: str) -> str:
    """What ComfyUI's cache compares (IS_CHANGED): the sha256 recorded in the file (its content), its size and
    mtime, so a file rewritten by a save or by hand is read again, and an unchanged one is not."""
    from safetensors import safe_open

    stat = os.stat(path)
    try:
        with safe_open(path, framework="pt") as f:
            recorded = (f.metadata() or {}).get(SHA_KEY, "")
    except Exception:  # unreadable: loading will say why; size and mtime still track it
        recorded = ""
    return f"{recorded}:{stat.st_size}:{stat.st_mtime_ns}"


def signature_or_nan(kind: str, name: str) -> str | float:
    try:
        return file_signature(folders.full_path(kind, name))
    except OSError:
        return float("nan")  # never equal to itself: ComfyUI runs the node, which reports the missing file


def describe(info: dict[str, str]) -> str:
    """A scales file's training record in words, e.g. 'PARTIAL: 4/200 steps (interrupted)'."""
    if not info:
        return "no training record"
    done, planned = info.get("steps_done", "?"), info.get("steps_planned", "?")
    if info.get("partial") == "1":
        why = info.get("stopped_by", "interrupted")
        return f"PARTIAL: {done}/{planned} steps ({why}); resume it with Train TuneQDM Scales' resume input"
    return f"complete: {done}/{planned} steps"


class SaveQuantizedUNet:
    DESCRIPTION = ("Writes a quantized MODEL to models/tuneqdm/unet/ so it loads later without the float model. "
                   "An existing file is never replaced unless overwrite is on.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A TuneQDM-quantized MODEL."}),
                "filename_prefix": ("STRING", {"default": "tuneqdm_unet",
                                               "tooltip": "File name inside models/tuneqdm/unet/ (.safetensors added)."}),
            },
            "optional": {"overwrite": OVERWRITE},
        }

    def save(self, model, filename_prefix, overwrite=False):
        require_quantized(model, "Save Quantized UNet")
        path = folders.output_path(folders.UNETS, filename_prefix, bool(overwrite))
        model_files.save(path, model)
        logging.info("TuneQDM: saved quantized UNet %s", path)
        return {"ui": {"text": [folders.relative_name(folders.UNETS, path)]}}


class LoadQuantizedUNet:
    DESCRIPTION = "Loads a quantized UNet saved by Save Quantized UNet; no float weights are ever built."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folders.files(folders.UNETS),
                                           {"tooltip": "A quantized UNet file in models/tuneqdm/unet/."})}}

    @classmethod
    def IS_CHANGED(cls, unet_name, **_):
        return signature_or_nan(folders.UNETS, unet_name)

    def load(self, unet_name):
        return (model_files.load(folders.full_path(folders.UNETS, unet_name)),)


class SaveScales:
    DESCRIPTION = ("Writes the small scales file (s_out, s_in per expert, fp16) to models/tuneqdm/scales/, with the "
                   "training record (steps done / planned). An existing file is never replaced unless overwrite is on.")
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
                                               "tooltip": "File name inside models/tuneqdm/scales/ (.safetensors added)."}),
            },
            "optional": {
                "scales": (SCALES_TYPE, {"tooltip": "Scales to save (from Train TuneQDM Scales). If not connected, "
                                                    "the scales the MODEL currently samples with."}),
                "overwrite": OVERWRITE,
            },
        }

    def save(self, model, filename_prefix, scales=None, overwrite=False):
        require_quantized(model, "Save Scales")
        if scales is None:
            routing = routing_of(model)
            scales = routing.scales or scales_of(model.model.diffusion_model)
            scales = dataclasses.replace(scales, policy=routing.policy_for(model.model))
        path = folders.output_path(folders.SCALES, filename_prefix, bool(overwrite))
        save_scales(path, scales, model.model.diffusion_model)
        logging.info("TuneQDM: saved scales %s (%s)", path, describe(scales.info))
        return {"ui": {"text": [folders.relative_name(folders.SCALES, path)]}}


class LoadScales:
    DESCRIPTION = ("Returns a clone of a quantized MODEL that samples with the scales of a file, and shows the "
                   "file's training record (steps done / planned, PARTIAL if training was interrupted).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", SCALES_TYPE)
    RETURN_NAMES = ("model", "scales")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The quantized MODEL these scales were trained on."}),
            "scales_name": (folders.files(folders.SCALES), {"tooltip": "A scales file in models/tuneqdm/scales/."}),
        }}

    @classmethod
    def IS_CHANGED(cls, scales_name, **_):
        return signature_or_nan(folders.SCALES, scales_name)

    def load(self, model, scales_name):
        require_quantized(model, "Load Scales")
        scales = load_scales(folders.full_path(folders.SCALES, scales_name), model.model.diffusion_model)
        record = describe(scales.info)
        logging.info("TuneQDM: loaded scales %s: %s", scales_name, record)
        result = (with_routing(model, routing_of(model).with_changes(scales=scales, policy=scales.policy)), scales)
        return {"ui": {"text": [f"{scales_name}: {record}"]}, "result": result}
