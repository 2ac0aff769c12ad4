"""Train TuneQDM Scales' data inputs -> the core's SampleSets: IMAGE batches encoded once with the VAE, or
ComfyUI's dataset latents, each kind (subject, second subject, class images) with its conditioning."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import comfy.utils
import torch

from ..tuneqdm_core.errors import TrainingDataError
from ..tuneqdm_core.train import SampleSet
from .dataset_inputs import LatentGroup, conditioning_per_image, group_latents, images_to_batch


@dataclass(frozen=True)
class DataKind:
    """One kind of training data as the node's inputs give it (IMAGE list or LATENT list, CONDITIONING)."""

    images: Any
    latents: Any
    conditioning: Any
    prior: bool
    what: str
    cond_what: str


@dataclass
class TrainingData:
    """Latent groups as (latents, conditioning indices, prior, subject), and the [context, options] pairs."""

    sets: list[tuple[torch.Tensor, tuple[int, ...], bool, int]]
    conds: list

    def sample_sets(self, device: torch.device) -> list[SampleSet]:
        # Contiguous copies: a channels-last latent (ComfyUI's LatentUpscale makes them) makes every CPU
        # convolution of the step many times slower.
        return [SampleSet(lat.to(device).clone(memory_format=torch.contiguous_format), c if len(set(c)) > 1 else c[0],
                          prior, subject)
                for lat, c, prior, subject in self.sets]

    def describe(self) -> str:
        sizes = ", ".join(f"{'x'.join(map(str, lat.shape[-2:]))} ({lat.shape[0]})" for lat, _, _, _ in self.sets)
        captions = len({i for _, c, _, _ in self.sets for i in c})
        return f"latents: {sizes}; conditionings: {captions}"


def square_resize(resolution: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """IMAGE -> the IMAGE resized and center-cropped to resolution x resolution (how training images are sized)."""
    def resize(image: torch.Tensor) -> torch.Tensor:
        return comfy.utils.common_upscale(image.movedim(-1, 1), resolution, resolution, "bilinear", "center").movedim(1, -1)

    return resize


def encode_images(vae: Any, images: list, resolution: int, base: Any, what: str) -> torch.Tensor:
    pixels = images_to_batch(images, what, square_resize(resolution))
    return base.process_latent_in(vae.encode(pixels)).float()


def _gather(base: Any, vae: Any, resolution: int, kind: DataKind) -> tuple[list[LatentGroup], list]:
    """One kind of training data -> latent groups of one size each, and their conditioning."""
    if kind.images is not None and kind.latents is not None:
        raise TrainingDataError(f"connect either {kind.what} (with a vae) or latents, not both")
    if kind.conditioning is None:
        raise TrainingDataError(f"{kind.what} and {kind.cond_what} must be connected together")
    if kind.latents is not None:
        groups, pairs = group_latents(kind.latents, kind.conditioning, "latents", kind.cond_what)
        return [LatentGroup(base.process_latent_in(g.latents).float(), g.conds) for g in groups], pairs
    if vae is None:
        raise TrainingDataError(f"{kind.what} need a vae to encode them (or give latents from ComfyUI's dataset nodes instead)")
    encoded = encode_images(vae, kind.images, resolution, base, kind.what)
    pairs, index = conditioning_per_image(kind.conditioning, encoded.shape[0], kind.cond_what)
    return [LatentGroup(encoded, index)], pairs


def gather(base: Any, vae: Any, resolution: int, kinds: list[DataKind]) -> TrainingData:
    """Every connected kind, in order; kind i is subject i (a kind without data must have no conditioning)."""
    data = TrainingData([], [])
    for subject, kind in enumerate(kinds):
        if kind.images is None and kind.latents is None:
            if kind.conditioning is not None and subject > 0:
                raise TrainingDataError(f"{kind.what} and {kind.cond_what} must be connected together")
            continue
        groups, pairs = _gather(base, vae, resolution, kind)
        for g in groups:
            data.sets.append((g.latents, tuple(len(data.conds) + i for i in g.conds), kind.prior, subject))
        data.conds.extend(pairs)
    return data
