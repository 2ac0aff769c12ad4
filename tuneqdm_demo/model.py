"""The default model as a ComfyUI BaseModel outside a server (its training, the quality benchmarks): built
from ComfyUI's own SD1.5 classes, so ComfyUI must be importable first (`tuneqdm_fixtures.host.import_comfy()`
in the checkout). Inside ComfyUI the demo nodes build it themselves (nodes/default_model.py)."""
from __future__ import annotations

from typing import Any

import torch

from .files import MODEL_TYPE, UNET_CONFIG


def reset_parameters(module: torch.nn.Module, recurse: bool = True) -> None:
    """torch's default initialisation for `module` (and, with `recurse`, every module in it), which
    ComfyUI's operations skip: their layers subclass torch's, whose own reset_parameters is called."""
    for m in module.modules() if recurse else (module,):
        torch_class = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules")), None)
        if torch_class is not None and hasattr(torch_class, "reset_parameters"):
            torch_class.reset_parameters(m)


def default_base_model(state_dict: dict[str, torch.Tensor] | None = None) -> Any:
    """The default model as a ComfyUI BaseModel in float32; without a state dict its layers get torch's
    default initialisation (ComfyUI's operations leave them empty)."""
    import comfy.model_base
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    # SD1.5's config class always says eps; the default model has its own prediction type.
    base.model_type = comfy.model_base.ModelType[MODEL_TYPE]
    base.model_sampling = comfy.model_base.model_sampling(model_config, base.model_type)
    if state_dict is None:
        reset_parameters(base.diffusion_model)
    else:
        base.diffusion_model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return base


def alphas_cumprod(base: Any) -> torch.Tensor:
    """(1000,) the model's own noise schedule (ComfyUI's sigmas: sigma^2 = (1 - a) / a)."""
    return 1.0 / (1.0 + base.model_sampling.sigmas.float() ** 2)
