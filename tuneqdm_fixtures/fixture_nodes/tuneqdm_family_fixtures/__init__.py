"""Test-only ComfyUI nodes for the model-family tests: what a family needs besides its diffusion model, when no
text encoder or VAE weights exist on the test machines.

* Family Test Conditioning: seeded random CONDITIONING of the family's exact shapes (the context its text
  encoders would give, the pooled vector, SDXL's size conditions, Flux's guidance). The model sees exactly
  what CLIPTextEncode would hand it, with random values.
* Family Test VAE: a fixed pixel codec in the VAE's place (8x8 average pooling, then a fixed seeded 3 -> C
  channel map, then the family's latent format's process_out), so Train TuneQDM Scales' IMAGE + VAE route runs
  with latents of the family's shape and statistics (unit variance after process_latent_in). Wan's latents
  are videos: each image is a one-frame video (B, 16, 1, h, w), as Wan's VAE encodes a single image.
* Family Test Images: a seeded batch of smooth random images.

Linked into a server's custom_nodes by tests/test_families_server.py and `python -m tuneqdm_bench families`
(as `tuneqdm_fixtures.families.FAMILY_NODES`); never loaded by the pack itself.
"""
from __future__ import annotations

import comfy.latent_formats
import torch

FAMILIES = ["sdxl", "sd35m", "flux", "wan21"]
# context width, pooled width (None: no pooled vector), latent channels, latent format
SHAPES = {
    "sdxl": (2048, 1280, 4, comfy.latent_formats.SDXL),
    "sd35m": (4096, 2048, 16, comfy.latent_formats.SD3),
    "flux": (4096, 768, 16, comfy.latent_formats.Flux),
    "wan21": (4096, None, 16, comfy.latent_formats.Wan21),
}
CATEGORY = "tests/model families"


class FamilyTestConditioning:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES,),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "width": ("INT", {"default": 1024, "min": 8, "max": 8192}),
            "height": ("INT", {"default": 1024, "min": 8, "max": 8192}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
        }}

    def make(self, family, seed, tokens, width, height, guidance):
        context_dim, pooled_dim, _, _ = SHAPES[family]
        gen = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=gen)
        options: dict = {}
        if pooled_dim is not None:
            options["pooled_output"] = torch.randn(1, pooled_dim, generator=gen)
        if family == "sdxl":  # what CLIPTextEncodeSDXL adds
            options.update(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
        if family == "flux":  # what FluxGuidance adds
            options["guidance"] = guidance
        return ([[context, options]],)


class PixelCodec:
    """IMAGE (B, H, W, 3) -> the family's raw latents (what its VAE's encode returns)."""

    def __init__(self, family: str) -> None:
        _, _, self.channels, fmt = SHAPES[family]
        self.format = fmt()
        self.video = family == "wan21"
        self.mix = torch.randn(self.channels, 3, generator=torch.Generator().manual_seed(7)) / 3 ** 0.5

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels[..., :3].movedim(-1, 1).float() * 2 - 1  # (B, 3, H, W) in [-1, 1]
        x = torch.nn.functional.avg_pool2d(x, 8)
        x = (x - x.mean()) / x.std().clamp(min=1e-6)  # unit variance: what process_latent_in should give
        latent = torch.einsum("cd,bdhw->bchw", self.mix, x)
        if self.video:
            latent = latent.unsqueeze(2)  # one frame
        return self.format.process_out(latent)


class FamilyTestVAE:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,)}}

    def make(self, family):
        return (PixelCodec(family),)


class FamilyTestImages:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "count": ("INT", {"default": 3, "min": 1, "max": 64}),
            "size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
        }}

    def make(self, count, size, seed):
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(count, 3, 4, 4, generator=gen)
        images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        return (images.movedim(1, -1).clamp(0, 1),)


NODE_CLASS_MAPPINGS = {
    "TestFamilyConditioning": FamilyTestConditioning,
    "TestFamilyVAE": FamilyTestVAE,
    "TestFamilyImages": FamilyTestImages,
}
