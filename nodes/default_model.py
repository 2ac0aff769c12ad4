"""The embedded default in ComfyUI terms: its UNet as a ModelPatcher (an SD1.5-family BaseModel, so the
stock samplers and every pack node treat it like any checkpoint), its MiniLM text encoder, and a VAE
stand-in that is the fixed pixel codec of tuneqdm_demo.data (stock VAEEncode / VAEDecode call
only `encode` and `decode`)."""
from __future__ import annotations

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

from ..tuneqdm_demo import data
from ..tuneqdm_demo.files import MODEL_TYPE, UNET_CONFIG, UNET_FILE, UNET_FORMAT, load_file
from ..tuneqdm_demo.text import TextEncoder
from . import model_files

TEXT_ENCODER_TYPE = "TUNEQDM_TEXT_ENCODER"


class DigitsSD15(comfy.supported_models.SD15):
    """The default model's family for ComfyUI's model detection, so that the stock UNETLoader loads its
    files too (fp16, fp8-scaled or `_quantization_metadata` copies): SD1.5's detection wants 320
    channels and 768-wide context, and SD1.5 is eps where the default model predicts v."""

    unet_config = {"context_dim": UNET_CONFIG["context_dim"], "model_channels": UNET_CONFIG["model_channels"],
                   "use_linear_in_transformer": True, "adm_in_channels": None, "use_temporal_attention": False}

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType[MODEL_TYPE]


def register_detection() -> None:
    """Idempotent; the config matches only this 32-channel, 384-context UNet."""
    if not any(getattr(c, "__name__", "") == DigitsSD15.__name__ for c in comfy.supported_models.models):
        comfy.supported_models.models.insert(0, DigitsSD15)


def load_model() -> comfy.model_patcher.ModelPatcher:
    state, _ = load_file(UNET_FILE, UNET_FORMAT)
    model_config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)  # 1.9M parameters: float32 costs nothing
    base = model_config.get_model({})
    model_files.set_model_type(base, MODEL_TYPE, UNET_FILE.name)
    base.diffusion_model.load_state_dict({k: v.float() for k, v in state.items()})
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(base.to(offload), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


class PixelVAE:
    """Encodes an IMAGE of any size to the default model's latents (B, 4, 8, 8: its 16x16 grey version,
    rearranged) and decodes latents (B, 4, h, w) to IMAGE (B, 8h, 8w, 3), an SD VAE's shapes."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return data.grey_to_latent(data.image_to_grey(pixels))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        grey = data.latent_to_grey(samples)
        return data.grey_to_image(grey, size=(4 * grey.shape[-2], 4 * grey.shape[-1]))


class DefaultTextEncoder:
    """MiniLM, loaded once per server and shared: it is read-only."""

    _shared: TextEncoder | None = None

    @classmethod
    def get(cls) -> TextEncoder:
        if cls._shared is None:
            cls._shared = TextEncoder()
        return cls._shared

    def conditioning(self, text: str) -> list:
        states, pooled = self.get().encode(text)
        return [[states.clone(), {"pooled_output": pooled.clone()}]]
