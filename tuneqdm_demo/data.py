"""The embedded default's data: scikit-learn's 1797 handwritten 8x8 digits, their captions, the
held-out subject, and the fixed pixel codec that turns images into the model's latents.

Latents are a lossless rearrangement of a 16x16 grey image (the 8x8 digit upsampled): 2x2 pixel
blocks become 4 channels of an 8x8 latent, which is the shape ComfyUI's stock EmptyLatentImage gives
for a 64x64 image. The codec divides by SD1.5's latent scale so that the model, an SD1.5-family
model, sees pixel values in [-1, 1] after ComfyUI's `process_latent_in`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUBJECT_CLASS = 0  # never seen by the base model: the DreamBooth subject
SUBJECT_PROMPT = "a sks digit"
CLASS_PROMPT = "a handwritten digit"  # the class noun's prompt (prior preservation)
LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor
IMAGE_SIZE = 64  # what the codec decodes to; any size encodes
CODEC_SIZE = 16
SUBJECT_IMAGES = 5


def caption(digit: int) -> str:
    return f"{CLASS_PROMPT} {NAMES[digit]}"


@dataclass(frozen=True)
class Digits:
    """Grey images (N, 1, 16, 16) in [0, 1], ink dark on white paper, and their labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def of_class(self, digit: int) -> "Digits":
        keep = self.labels == digit
        return Digits(self.images[keep], self.labels[keep])

    def without_class(self, digit: int) -> "Digits":
        keep = self.labels != digit
        return Digits(self.images[keep], self.labels[keep])


def load_digits() -> Digits:
    """All 1797 digits, upsampled to 16x16."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # the pack's requirements list it; say so rather than a bare ImportError
        raise ImportError("the embedded default model's data needs scikit-learn (pip install scikit-learn)") from e
    bunch = sk_load_digits()
    ink = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(1.0 - ink, size=(CODEC_SIZE, CODEC_SIZE), mode="bilinear", align_corners=False)
    return Digits(images.clamp(0, 1), torch.tensor(bunch.target, dtype=torch.long))


def subject_images() -> torch.Tensor:
    """The DreamBooth subject: the first SUBJECT_IMAGES digits of SUBJECT_CLASS, as ComfyUI IMAGE (B, 64, 64, 3)."""
    grey = load_digits().of_class(SUBJECT_CLASS).images[:SUBJECT_IMAGES]
    return grey_to_image(grey)


def grey_to_image(grey: torch.Tensor, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> torch.Tensor:
    """(B, 1, h, w) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3) of size (H, W)."""
    up = F.interpolate(grey, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return up.movedim(1, -1).expand(-1, -1, -1, 3).contiguous()


def image_to_grey(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) of any size -> (B, 1, 16, 16) grey in [0, 1] (area average)."""
    if image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"expected a non-empty IMAGE batch (B, H, W, C), got shape {tuple(image.shape)}")
    grey = image[..., :3].float().mean(-1, keepdim=True).movedim(-1, 1)
    return F.interpolate(grey, size=(CODEC_SIZE, CODEC_SIZE), mode="area")


def grey_to_latent(grey: torch.Tensor) -> torch.Tensor:
    """(B, 1, 16, 16) in [0, 1] -> latents (B, 4, 8, 8) as a VAE returns them (before process_latent_in)."""
    return F.pixel_unshuffle(grey * 2.0 - 1.0, 2) / LATENT_SCALE


def latent_to_grey(latent: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) -> (B, 1, 2h, 2w) grey in [0, 1]."""
    if latent.ndim != 4 or latent.shape[1] != 4:
        raise ValueError(f"expected latents (B, 4, H, W), got shape {tuple(latent.shape)}")
    return ((F.pixel_shuffle(latent.float() * LATENT_SCALE, 2) + 1.0) / 2.0).clamp(0, 1)
