"""ModelPatcher plumbing: quantized copies of a MODEL, and clones that carry scales or routing.

A MODEL handed to a node is never mutated, and what ComfyUI did to it before is never read into the
result. ModelPatcher clones share their modules: while any clone is loaded, its LoRA-patched weights and
object patches sit in those shared modules and the originals in the clones' shared `backup` dicts.
Quantizing therefore reads every tensor through `_Unpatched` (the backup where there is one), merges
the input MODEL's own weight patches exactly once, and gives the copy private tensors on the offload
device, so that loading, moving or patching one model never touches the other.
"""
from __future__ import annotations

import logging
import uuid
from typing import Callable

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.utils
import torch
from torch import nn

from ..tuneqdm_core import (QuantReport, TuneQDMConfig, is_quantized, own_tensors, quantize_model, structural_copy,
                            torch_layer_kind)
from ..tuneqdm_core.errors import NotQuantizedError
from .family_defaults import resolve_keep_float
from .routing_wrapper import WRAPPER_KEY, ExpertRouting


APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
DIFFUSION_PREFIX = "diffusion_model."

# Attributes ModelPatcher keeps on the model object about its loaded state: a copied model must not
# inherit them, or ComfyUI would believe the copy is already loaded.
_LOAD_STATE = ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
               "current_weight_patches_uuid", "model_offload_buffer_memory")
# Per-module load state ModelPatcher leaves on layers (offloaded casting, low-VRAM patch functions).
_MODULE_LOAD_STATE = ("comfy_patched_weights", "prev_comfy_cast_weights", "weight_function", "bias_function")


def comfy_layer_kind(m: nn.Module) -> str | None:
    """Linear/Conv2d of every ComfyUI op class: plain, manual-cast, fp8 weight dtype, and the
    mixed-precision Linear (not an nn.Linear subclass; its weight may be an fp8 QuantizedTensor)."""
    kind = torch_layer_kind(m)
    if kind is None and isinstance(m, comfy.ops.CastWeightBiasOp) and type(m).__name__ == "Linear":
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (m.out_features, m.in_features):
            return "linear"
    return kind


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """A plain float tensor for ComfyUI's QuantizedTensor (fp8 with scales, nvfp4), else `t` itself."""
    deq = getattr(t, "dequantize", None)
    if callable(deq) and type(t) not in (torch.Tensor, nn.Parameter):
        return deq()
    return t


class _Unpatched:
    """The tensors of a MODEL as they are without any clone's weight or object patches."""

    def __init__(self, model: comfy.model_patcher.ModelPatcher) -> None:
        self.base = model.model
        self.backup = model.backup
        self.hook_backup = getattr(model, "hook_backup", {})
        self.object_backup = model.object_patches_backup

    def __call__(self, key: str) -> torch.Tensor | None:
        if key in self.hook_backup:
            return self.hook_backup[key][0]
        if key in self.backup:
            return self.backup[key].weight
        owner, rest = self.base, key
        for patched, original in self.object_backup.items():
            if key.startswith(patched + "."):
                owner, rest = original, key[len(patched) + 1:]
                break
        try:
            t = comfy.utils.get_attr(owner, rest)
        except AttributeError:
            return None
        return t if isinstance(t, torch.Tensor) else None


def require_quantized(model, node: str):
    if not is_quantized(model.model.diffusion_model):
        raise NotQuantizedError(f"{node} needs a TuneQDM-quantized MODEL: connect it after 'Quantize UNet (TuneQDM)' "
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
    base_model.device = like.offload_device
    new = comfy.model_patcher.ModelPatcher(base_model, like.load_device, like.offload_device)
    template = like.clone()
    for attr in ("model_options", "object_patches", "wrappers", "callbacks", "attachments", "additional_models",
                 "injections", "force_cast_weights"):
        if hasattr(template, attr):
            setattr(new, attr, getattr(template, attr))
    return new


def unpatched_copy(model: comfy.model_patcher.ModelPatcher) -> nn.Module:
    """A structural copy of the MODEL's BaseModel with the original objects wherever a loaded clone
    has object-patched them, and none of the per-module load state ModelPatcher leaves behind."""
    base = structural_copy(model.model)
    for key, original in model.object_patches_backup.items():
        comfy.utils.set_attr(base, key, structural_copy(original) if isinstance(original, nn.Module) else original)
    for m in base.modules():
        for attr in _MODULE_LOAD_STATE:
            m.__dict__.pop(attr, None)
        m.__dict__.pop("comfy_cast_weights", None)  # back to the op class's own setting
    return base


def quantize_patcher(model, config: TuneQDMConfig, progress=None) -> tuple[comfy.model_patcher.ModelPatcher, QuantReport]:
    """A new quantized MODEL from `model`, the same whatever ran before: built from the unpatched
    weights with `model`'s own weight patches merged once, owning every tensor it holds, on the
    offload device."""
    config, keep_float_note = resolve_keep_float(config, getattr(model.model, "model_config", None))
    original = _Unpatched(model)
    patches = model.patches
    offload = model.offload_device
    new_base = unpatched_copy(model)

    wrappers = getattr(model, "weight_wrapper_patches", {})

    def weight_of(name: str, layer: nn.Module) -> torch.Tensor:
        key = f"{DIFFUSION_PREFIX}{name}.weight"
        weight = dequantized(original(key))
        if key in patches:
            weight = comfy.lora.calculate_weight(patches[key], weight.float().clone(), key)
        for wrap in wrappers.get(key, ()):  # e.g. the LoRA a TrainLoraNode returns
            weight = wrap(weight.float())
        return weight

    compute = comfy.model_management.get_torch_device()
    report = quantize_model(new_base.diffusion_model, config, compute_device=compute, progress=progress,
                            weight_of=weight_of, layer_kind=comfy_layer_kind, device=offload)
    if keep_float_note:
        report.notes.append(keep_float_note)
    own_tensors(new_base, original, offload)
    quantized = {f"{DIFFUSION_PREFIX}{name}.weight" for name, _, _ in report.converted}
    _merge_bias_wrappers(new_base, wrappers, quantized)
    new = patcher_for(new_base, model)
    new.patches = {k: v[:] for k, v in patches.items() if k not in quantized}
    new.patches_uuid = uuid.uuid4()
    if hasattr(new, "weight_wrapper_patches"):
        new.weight_wrapper_patches = {k: v[:] for k, v in wrappers.items() if k not in quantized | _biases(quantized)}
    new.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    new.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, ExpertRouting())
    merged = len([k for k in patches if k in quantized]) + len([k for k in wrappers if k in quantized])
    if merged:
        report.notes.append(f"merged LoRA/weight patches of {merged} layers into their weights before quantizing")
        logging.info("TuneQDM: merged LoRA/weight patches of %d layers before quantizing", merged)
    return new, report


def _biases(weight_keys: set[str]) -> set[str]:
    return {k[: -len("weight")] + "bias" for k in weight_keys}


def _merge_bias_wrappers(base: nn.Module, wrappers: dict, quantized: set[str]) -> None:
    """A quantized layer ignores ComfyUI's per-call bias functions: bake its bias wrappers in (its bias
    is already a private copy)."""
    for key in _biases(quantized):
        if key in wrappers:
            bias = comfy.utils.get_attr(base, key)
            with torch.no_grad():
                for wrap in wrappers[key]:
                    bias.copy_(wrap(bias.float()).to(bias.dtype))


def progress_callback(total_hint: int = 0) -> Callable[[int, int], None]:
    """ProgressBar updates plus ComfyUI's interrupt button, for long per-layer loops."""
    bar = comfy.utils.ProgressBar(max(total_hint, 1))

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update
