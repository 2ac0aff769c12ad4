"""Training inputs as Train TuneQDM Scales receives them (INPUT_IS_LIST: every input is a list): an IMAGE batch
or ComfyUI's dataset lists (one IMAGE per file, one LATENT per image or per resolution bucket from
MakeTrainingDataset / ResolutionBucket / a mapped VAEEncode), and CONDITIONING shared by all images or one
per image (captions). Turns them into latent groups of one size each, with a conditioning index per image."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentGroup:
    """Latents of one size, after process_latent_in: images (N, C, H, W) or videos (N, C, T, H, W), as the
    model's latent format has them; and each sample's conditioning index."""

    latents: torch.Tensor
    conds: tuple[int, ...]


def check_image(image: torch.Tensor, what: str) -> None:
    """ComfyUI IMAGEs are (B, H, W, C); say which input got what instead of a torch shape error later."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        hint = " (a MASK? convert it with Convert Mask to Image)" if isinstance(image, torch.Tensor) and image.ndim == 3 else ""
        raise ValueError(f"{what}: expected an IMAGE of shape (B, H, W, C) with C = 1, 3 or 4, got {shape}{hint}")
    if image.shape[0] == 0:
        raise ValueError(f"{what}: empty image batch")


def images_to_batch(images: list[torch.Tensor], what: str, resize) -> torch.Tensor:
    """A list of IMAGE batches (any sizes) -> one (N, H, W, 3) batch, each resized by `resize`."""
    if not images:
        raise ValueError(f"{what}: no images")
    out = []
    for i, image in enumerate(images):
        check_image(image, what if len(images) == 1 else f"{what}[{i}]")
        rgb = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, -1, 3)
        out.append(resize(rgb))
    return torch.cat(out, dim=0)


def flatten_conditioning(values: list, what: str) -> list:
    """CONDITIONING values -> their [context, options] pairs. ResolutionBucket's per-bucket lists are one
    pair per image; MakeTrainingDataset's are one list of one pair per image."""
    pairs = []
    for value in values:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{what}: empty or malformed conditioning")
        pairs.extend(value)
    return pairs


def conditioning_per_image(values: list, count: int, what: str) -> tuple[list, tuple[int, ...]]:
    """(pairs, index of each image's pair): one pair for all images, or one per image (captions)."""
    pairs = flatten_conditioning(values, what)
    if len(pairs) == count:
        return pairs, tuple(range(count))
    if len(values) == 1 or len(pairs) == 1:
        return pairs[:1], (0,) * count  # one CONDITIONING for all images (only its first entry is used)
    raise ValueError(f"{what}: {len(pairs)} conditionings for {count} images; give one for all images or one per image")


def group_latents(latents: list, cond_values: list, what: str, cond_what: str) -> tuple[list[LatentGroup], list]:
    """Dataset latents and their conditioning -> one LatentGroup per latent size, and the conditioning pairs
    the groups index into. Captions follow their images into the size groups."""
    order: dict[tuple[int, ...], list[tuple[torch.Tensor, int]]] = {}
    flat: list[tuple[torch.Tensor, tuple[int, ...]]] = []
    for i, latent in enumerate(latents):
        samples = latent.get("samples") if isinstance(latent, dict) else None
        # 5-D: video models' latents (Wan, Hunyuan Video: B, C, T, H, W); each video is one training sample.
        if not isinstance(samples, torch.Tensor) or samples.ndim not in (4, 5) or samples.shape[0] == 0:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
            raise ValueError(f"{what}[{i}]: expected a LATENT with samples (B, C, H, W), or (B, C, T, H, W) for "
                             f"a video model, got {shape}")
        flat.extend((samples[j], tuple(samples.shape[1:])) for j in range(samples.shape[0]))
    if not flat:
        raise ValueError(f"{what}: no latents")
    pairs, index = conditioning_per_image(cond_values, len(flat), cond_what)
    for (sample, size), cond in zip(flat, index):
        order.setdefault(size, []).append((sample, cond))
    groups = [LatentGroup(torch.stack([s for s, _ in items]), tuple(c for _, c in items)) for items in order.values()]
    return groups, pairs
