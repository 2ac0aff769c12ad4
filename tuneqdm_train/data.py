"""Training data for the headless trainer: a folder of images with captions, or pre-encoded latents and
conditioning in a safetensors file (written by `python -m tuneqdm_train encode`, so that a run on many
processes encodes nothing and no rank needs the VAE or the text encoder).

Folder convention (ComfyUI's Load Image and Text Dataset from Folder, kohya): `name.png` is captioned by
`name.txt` beside it; an image without one takes `--caption`. Images are resized and center-cropped to one
square size, as the Train TuneQDM Scales node does. Latents are kept as the VAE returns them (ComfyUI's
LATENT); the trainer applies the model's `process_latent_in`.

ComfyUI's own Save Training Dataset writes pickle shards (.pkl); those are refused: only safetensors load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tuneqdm_core.errors import FileFormatError, FileMissingError, TrainingDataError
from tuneqdm_core.fileio import METADATA_HASH_VERSION, SHA_KEY, atomic_save, digest, read_verified

FORMAT = "tuneqdm-train-data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class TrainingData:
    """Latent groups of one size each, (N, C, H, W) as an image VAE gives them or (N, C, T, H, W) from a video
    VAE (each video one sample, as in Train TuneQDM Scales), with each sample's conditioning
    index; the conditionings as ComfyUI [context, options] pairs, and the captions they encode."""

    groups: list[tuple[torch.Tensor, tuple[int, ...]]]
    conds: list[list]
    captions: list[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for g, (latents, index) in enumerate(self.groups):
            out[f"latents.{g}"] = latents.float().contiguous()
            out[f"cond_index.{g}"] = torch.tensor(index, dtype=torch.int64)
        for j, (context, options) in enumerate(self.conds):
            out[f"context.{j}"] = context.float().contiguous()
            if options.get("pooled_output") is not None:
                out[f"pooled.{j}"] = options["pooled_output"].float().contiguous()
        return out

    def digest(self) -> str:
        """Identifies the data (every rank must train on the same)."""
        return digest(self.tensors(), {"captions": json.dumps(self.captions)})[:16]

    @property
    def images(self) -> int:
        return sum(latents.shape[0] for latents, _ in self.groups)


def read_folder(folder: str | Path, caption: str | None) -> tuple[list[torch.Tensor], list[str]]:
    """Images as ComfyUI IMAGEs (1, H, W, 3) in [0, 1], sorted by name, and each one's caption."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingDataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for path in files:
        text_file = path.with_suffix(".txt")
        text = text_file.read_text().strip() if text_file.is_file() else caption
        if not text:
            raise TrainingDataError(f"{path.name}: no caption ({text_file.name} missing or empty) and no --caption")
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(rgb).unsqueeze(0))
        captions.append(text)
    return images, captions


def encode_folder(folder: str | Path, caption: str | None, text: Callable[[str], list], vae: Any,
                  resolution: int) -> TrainingData:
    """Encode every image once (VAE) and every distinct caption once (text encoder)."""
    from tuneqdm_pack.nodes.dataset_inputs import images_to_batch
    from tuneqdm_pack.nodes.training_data import square_resize

    images, captions = read_folder(folder, caption)
    with torch.inference_mode(False), torch.no_grad():
        latents = vae.encode(images_to_batch(images, str(folder), square_resize(resolution))).float().cpu()
        distinct = list(dict.fromkeys(captions))
        conds = []
        for c in distinct:
            context, options = text(c)[0]
            conds.append([context.float().cpu().clone(),
                          {k: v.float().cpu().clone() for k, v in options.items() if k == "pooled_output" and v is not None}])
    index = tuple(distinct.index(c) for c in captions)
    return TrainingData([(latents, index)], conds, distinct)


def save(path: str | Path, data: TrainingData) -> None:
    """Atomically, with a sha256 over tensors and metadata (read back with `load`)."""
    tensors = data.tensors()
    meta = {"tuneqdm.format": FORMAT, "tuneqdm.version": METADATA_HASH_VERSION,
            "tuneqdm.groups": str(len(data.groups)), "tuneqdm.captions": json.dumps(data.captions)}
    meta[SHA_KEY] = digest(tensors, meta)
    atomic_save(tensors, path, meta)


def load(path: str | Path) -> TrainingData:
    path = Path(path)
    if path.suffix != ".safetensors":
        hint = " (ComfyUI's Save Training Dataset writes pickle shards: encode the images with `python -m " \
               "tuneqdm_train encode` instead)" if path.suffix == ".pkl" or path.is_dir() else ""
        raise FileFormatError(f"{path}: only .safetensors training data is loaded{hint}")
    meta, tensors = read_verified(path, FORMAT)
    try:
        captions = json.loads(meta["tuneqdm.captions"])
        groups = [(tensors[f"latents.{g}"], tuple(tensors[f"cond_index.{g}"].tolist()))
                  for g in range(int(meta["tuneqdm.groups"]))]
        conds = [[tensors[f"context.{j}"], {"pooled_output": tensors[f"pooled.{j}"]} if f"pooled.{j}" in tensors else {}]
                 for j in range(len(captions))]
    except (KeyError, ValueError) as e:
        raise FileFormatError(f"{path.name}: training data incomplete ({e})") from None
    for g, (latents, index) in enumerate(groups):
        if latents.ndim not in (4, 5) or len(index) != latents.shape[0] or any(not 0 <= i < len(conds) for i in index):
            raise FileFormatError(f"{path.name}: latents.{g} {tuple(latents.shape)} and its {len(index)} "
                                  f"conditioning indices do not fit ({len(conds)} conditionings)")
    return TrainingData(groups, conds, captions)


def from_path(path: str | Path, caption: str | None, encoders: Callable[[], Any]) -> TrainingData:
    """A folder of images (encoded with `encoders()`, made only then) or a pre-encoded .safetensors file."""
    path = Path(path)
    if path.is_dir():
        enc = encoders()
        return encode_folder(path, caption, enc.text, enc.vae, enc.resolution)
    if not path.exists():
        raise FileMissingError(f"--data {path}: no such file or folder")
    return load(path)
