"""Save / Load Quantized UNet and Save / Load Scales (TuneQDM), in models/tuneqdm/unet/ and models/tuneqdm/scales/."""
from __future__ import annotations

import dataclasses
import logging

from comfy_api.latest import io, ui

from ..tuneqdm_core import load_scales, save_scales, scales_of
from . import folders, model_files
from .file_fingerprint import fingerprint_or_nan
from .patcher import require_quantized, routing_of, with_routing

CATEGORY = "TuneQDM"
Scales = io.Custom("TUNEQDM_SCALES")


def overwrite_input() -> io.Boolean.Input:
    return io.Boolean.Input("overwrite", default=False, optional=True,
                            tooltip="Off: an existing file is kept and the new one gets the next free number "
                                    "(name_00001...). On: replace it.")


def fingerprint_of(kind: str, name: str) -> str | float:
    """The content fingerprint of a file of the pack's folders (file_fingerprint), for fingerprint_inputs."""
    return fingerprint_or_nan(lambda: folders.full_path(kind, name))


def describe(info: dict[str, str]) -> str:
    """A scales file's training record in words, e.g. 'PARTIAL: 4/200 steps (interrupted)'."""
    if not info:
        return "no training record"
    done, planned = info.get("steps_done", "?"), info.get("steps_planned", "?")
    if info.get("partial") == "1":
        why = info.get("stopped_by", "interrupted")
        return f"PARTIAL: {done}/{planned} steps ({why}); resume it with Train TuneQDM Scales' resume input"
    return f"complete: {done}/{planned} steps"


class SaveQuantizedUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMSaveQuantizedUNet",
            display_name="Save Quantized UNet (TuneQDM)",
            category=CATEGORY,
            description=("Writes a quantized MODEL to models/tuneqdm/unet/ so it loads later without the float "
                         "model. An existing file is never replaced unless overwrite is on."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A TuneQDM-quantized MODEL."),
                io.String.Input("filename_prefix", default="tuneqdm_unet",
                                tooltip="File name inside models/tuneqdm/unet/ (.safetensors added)."),
                overwrite_input(),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, model, filename_prefix, overwrite=False) -> io.NodeOutput:
        require_quantized(model, "Save Quantized UNet")
        path = folders.output_path(folders.UNETS, filename_prefix, bool(overwrite))
        model_files.save(path, model)
        logging.info("TuneQDM: saved quantized UNet %s", path)
        return io.NodeOutput(ui=ui.PreviewText(folders.relative_name(folders.UNETS, path)))


class LoadQuantizedUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMLoadQuantizedUNet",
            display_name="Load Quantized UNet (TuneQDM)",
            category=CATEGORY,
            description="Loads a quantized UNet saved by Save Quantized UNet; no float weights are ever built.",
            inputs=[io.Combo.Input("unet_name", options=folders.files(folders.UNETS),
                                   tooltip="A quantized UNet file in models/tuneqdm/unet/.")],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The quantized MODEL, as it was saved.")],
        )

    @classmethod
    def fingerprint_inputs(cls, unet_name, **_) -> str | float:
        return fingerprint_of(folders.UNETS, unet_name)

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        return io.NodeOutput(model_files.load(folders.full_path(folders.UNETS, unet_name)))


class SaveScales(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMSaveScales",
            display_name="Save Scales (TuneQDM)",
            category=CATEGORY,
            description=("Writes the small scales file (s_out, s_in per expert, fp16) to models/tuneqdm/scales/, "
                         "with the training record (steps done / planned). An existing file is never replaced "
                         "unless overwrite is on."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The quantized MODEL the scales belong to."),
                io.String.Input("filename_prefix", default="tuneqdm_scales",
                                tooltip="File name inside models/tuneqdm/scales/ (.safetensors added)."),
                Scales.Input("scales", optional=True,
                             tooltip="Scales to save (from Train TuneQDM Scales). If not connected, the scales the "
                                     "MODEL currently samples with."),
                overwrite_input(),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, model, filename_prefix, scales=None, overwrite=False) -> io.NodeOutput:
        require_quantized(model, "Save Scales")
        if scales is None:
            routing = routing_of(model)
            scales = routing.scales or scales_of(model.model.diffusion_model)
            scales = dataclasses.replace(scales, policy=routing.policy_for(model.model))
        path = folders.output_path(folders.SCALES, filename_prefix, bool(overwrite))
        save_scales(path, scales, model.model.diffusion_model)
        logging.info("TuneQDM: saved scales %s (%s)", path, describe(scales.info))
        return io.NodeOutput(ui=ui.PreviewText(folders.relative_name(folders.SCALES, path)))


class LoadScales(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMLoadScales",
            display_name="Load Scales (TuneQDM)",
            category=CATEGORY,
            description=("Returns a clone of a quantized MODEL that samples with the scales of a file, and shows "
                         "the file's training record (steps done / planned, PARTIAL if training was interrupted)."),
            inputs=[
                io.Model.Input("model", tooltip="The quantized MODEL these scales were trained on."),
                io.Combo.Input("scales_name", options=folders.files(folders.SCALES),
                               tooltip="A scales file in models/tuneqdm/scales/."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the MODEL sampling with these scales."),
                     Scales.Output(display_name="scales", tooltip="The file's scales (e.g. to save under a new name).")],
        )

    @classmethod
    def fingerprint_inputs(cls, scales_name, **_) -> str | float:
        return fingerprint_of(folders.SCALES, scales_name)

    @classmethod
    def execute(cls, model, scales_name) -> io.NodeOutput:
        require_quantized(model, "Load Scales")
        scales = load_scales(folders.full_path(folders.SCALES, scales_name), model.model.diffusion_model)
        record = describe(scales.info)
        logging.info("TuneQDM: loaded scales %s: %s", scales_name, record)
        trained = with_routing(model, routing_of(model).with_changes(scales=scales, policy=scales.policy))
        return io.NodeOutput(trained, scales, ui=ui.PreviewText(f"{scales_name}: {record}"))
