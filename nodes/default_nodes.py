"""Demo nodes for the embedded default model (category TuneQDM/demo): load it, encode its prompts, and
give the held-out subject's five images. Everything else in a demo graph is the pack's real nodes and
ComfyUI's stock ones (EmptyLatentImage, KSampler, VAEDecode, SaveImage)."""
from __future__ import annotations

from ..tuneqdm_demo import data
from .default_model import TEXT_ENCODER_TYPE, DefaultTextEncoder, PixelVAE, load_model

CATEGORY = "TuneQDM/demo"


class LoadDefaultModel:
    DESCRIPTION = ("The pack's embedded default: a 1.9M-parameter SD1.5-family UNet trained on scikit-learn's "
                   "handwritten digits except zeros (the held-out subject), its MiniLM text encoder, and a "
                   "pixel codec in the VAE's place. Sample it at 64x64.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", TEXT_ENCODER_TYPE, "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The float UNet.", "Wire into Default Text Encode.",
                       "Encodes images to latents and back (stock VAEEncode / VAEDecode).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (load_model(), DefaultTextEncoder(), PixelVAE())


class DefaultTextEncode:
    DESCRIPTION = "Encodes a prompt for the default model, e.g. 'a handwritten digit seven' or 'a sks digit'."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER_TYPE,),
            "text": ("STRING", {"multiline": True, "default": data.SUBJECT_PROMPT, "dynamicPrompts": True}),
        }}

    def encode(self, text_encoder, text):
        return (text_encoder.conditioning(text),)


class DefaultSubjectImages:
    DESCRIPTION = (f"The held-out subject: the first {data.SUBJECT_IMAGES} handwritten "
                   f"{data.NAMES[data.SUBJECT_CLASS]}s of the digits set, which the default model never saw.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "images"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def images(self):
        return (data.subject_images(),)
