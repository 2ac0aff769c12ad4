"""ModelPatcher plumbing: quantized copies of a MODEL, and clones that carry scales or routing.

A MODEL handed to a node is never mutated. Quantizing builds a new BaseModel whose module tree is its
own (structural copy: untouched tensors shared, replaced ones never referenced), wrapped in a new
ModelPatcher that inherits the input's options, object patches, wrappers and callbacks. Weight
patches (LoRAs) on quantized layers are merged into the weight before it is quantized.
"""
from __future__ import annotations

import logging
import uuid

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils

from ..tuneqdm_core import QuantReport, TuneQDMConfig, is_quantized, quantize_model, structural_copy
from .routing import WRAPPER_KEY, ExpertRouting

APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL

# Attributes ModelPatcher keeps on the model object about its loaded state: a copied model must not
# inherit them, or ComfyUI would believe the copy is already loaded.
_LOAD_STATE = ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
               "current_weight_patches_uuid", "model_offload_buffer_memory")


def require_quantized(model, node: str):
    if not is_quantized(model.model.diffusion_model):
        raise ValueError(f"{node} needs a TuneQDM-quantized MODEL: connect it after 'Quantize UNet (TuneQDM)' "
                         "or 'Load Quantized UNet (TuneQDM)'")


def routing_of(model) -> ExpertRouting:
    wrappers = model.get_wrappers(APPLY_MODEL, WRAPPER_KEY)
    return wrappers[-1] if wrappers else ExpertRouting()


def with_routing(model, routing: ExpertRouting):
    """A clone of `model` whose TuneQDM wrapper is `routing` (any previous one replaced)."""
    clone = model.clone()
    clone.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    clone.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, routing)
    return clone


def patcher_for(base_model, like) -> comfy.model_patcher.ModelPatcher:
    """A fresh ModelPatcher for `base_model` that inherits what `like` carries (options, object
    patches, wrappers, callbacks), but not its weight patches or its loaded state."""
    for attr in _LOAD_STATE:
        base_model.__dict__.pop(attr, None)  # ModelPatcher.__init__ sets them afresh
    base_model.current_patcher = None
    new = comfy.model_patcher.ModelPatcher(base_model, like.load_device, like.offload_device)
    template = like.clone()
    for attr in ("model_options", "object_patches", "wrappers", "callbacks", "attachments", "additional_models",
                 "injections", "force_cast_weights"):
        setattr(new, attr, getattr(template, attr))
    return new


def quantize_patcher(model, config: TuneQDMConfig, progress=None) -> tuple[comfy.model_patcher.ModelPatcher, QuantReport]:
    base = model.model
    new_base = structural_copy(base)
    prefix = "diffusion_model."
    patches = model.patches

    def merge_patches(name: str, weight):
        key = f"{prefix}{name}.weight"
        if key not in patches:
            return weight
        return comfy.lora.calculate_weight(patches[key], weight.float().clone(), key)

    compute = comfy.model_management.get_torch_device()
    report = quantize_model(new_base.diffusion_model, config, compute_device=compute, progress=progress,
                            weight_transform=merge_patches)
    new = patcher_for(new_base, model)
    quantized = {f"{prefix}{name}.weight" for name, _, _ in report.converted}
    new.patches = {k: v[:] for k, v in patches.items() if k not in quantized}
    new.patches_uuid = uuid.uuid4()
    new.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    new.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, ExpertRouting())
    merged = len([k for k in patches if k in quantized])
    if merged:
        logging.info("TuneQDM: merged weight patches (LoRA) into %d layers before quantizing", merged)
    return new, report


def progress_callback(total_hint: int = 0):
    """ProgressBar updates plus ComfyUI's interrupt button, for long per-layer loops."""
    bar = comfy.utils.ProgressBar(max(total_hint, 1))

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update
