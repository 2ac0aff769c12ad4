"""The one place outside `nodes/` where ComfyUI is imported: the benchmarks and scripts that run the
embedded default model, which is a ComfyUI model (built from ComfyUI's own UNet classes). The core
library proper never comes here."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..digits.files import MODEL_TYPE, UNET_CONFIG

COMFY_DIR = Path(__file__).resolve().parents[2] / ".comfyui"


def import_comfy() -> Any:
    """Makes the `.comfyui` host of `make setup` importable in CPU mode and returns the `comfy` package."""
    if str(COMFY_DIR) not in sys.path:
        if not (COMFY_DIR / "comfy").is_dir():
            raise FileNotFoundError(f"{COMFY_DIR}/comfy missing: run `make setup` first")
        # Appended: the host's top-level `nodes.py`, `utils/`, `server.py` must not shadow the pack's own
        # `nodes/` package or anything else; `comfy` and `node_helpers` exist nowhere else.
        sys.path.append(str(COMFY_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported: it picks the device then
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel
    import comfy.model_detection
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    return comfy


def default_base_model(state_dict: dict[str, torch.Tensor] | None = None) -> Any:
    """The default model as a ComfyUI BaseModel in float32; without a state dict its layers get torch's
    default initialisation (ComfyUI's operations leave them empty)."""
    comfy = import_comfy()
    model_config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    # SD1.5's config class always says eps; the default model has its own prediction type.
    import comfy.model_base

    base.model_type = comfy.model_base.ModelType[MODEL_TYPE]
    base.model_sampling = comfy.model_base.model_sampling(model_config, base.model_type)
    net = base.diffusion_model
    if state_dict is None:
        for m in net.modules():
            torch_class = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules")), None)
            if torch_class is not None and hasattr(torch_class, "reset_parameters"):
                torch_class.reset_parameters(m)
    else:
        net.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return base


def alphas_cumprod(base: Any) -> torch.Tensor:
    """(1000,) the model's own noise schedule (ComfyUI's sigmas: sigma^2 = (1 - a) / a)."""
    return 1.0 / (1.0 + base.model_sampling.sigmas.float() ** 2)

