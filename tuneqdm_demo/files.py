"""The embedded default's two files, shipped in `assets/`: the UNet (ComfyUI SD1.5-family state dict
in fp16) and the digit classifier used by the quality metrics. Both are TuneQDM safetensors files:
format tag, version and sha256 checked on load; written atomically by their training script."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .core import FORMAT_VERSION, atomic_save, digest, read_verified

# The pack's own assets/ folder, shipped beside this package.
ASSETS = Path(__file__).resolve().parents[1] / "assets"
UNET_FILE = ASSETS / "digits_unet.safetensors"
CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"
UNET_FORMAT = "default-unet"
CLASSIFIER_FORMAT = "digits-classifier"

# A ComfyUI SD1.5-family UNet (comfy.supported_models.SD15 adds num_heads 8 / num_head_channels -1), cut down
# for 8x8 latents: 32/64 channels, two res blocks and one linear transformer per level, 384-wide context
# (MiniLM's token states instead of CLIP-L's 768). 1.93M parameters, 3.9 MB in fp16.
# v-prediction, by the name of comfy.model_base.ModelType (as SD2.x-v): an eps-predicting model this small
# multiplies its eps error by sigma_max = 14.6 in its first x0 estimate, lands far off the data and, in
# samplers that do not clamp (ComfyUI's), never recovers.
MODEL_TYPE = "V_PREDICTION"
UNET_CONFIG: dict = {
    "use_checkpoint": False, "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2], "channel_mult": [1, 2], "transformer_depth": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "use_linear_in_transformer": True, "context_dim": 384, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def save_file(path: str | Path, fmt: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """`info` (JSON-able: configuration, training record) goes into the metadata as tuneqdm.info."""
    meta = {"tuneqdm.format": fmt, "tuneqdm.version": FORMAT_VERSION, "tuneqdm.sha256": digest(tensors),
            "tuneqdm.info": json.dumps(info)}
    atomic_save(tensors, path, meta)


def load_file(path: str | Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, info); a missing file says how to make it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing; it ships with the pack, or run `python -m tuneqdm_demo.train`")
    meta, tensors = read_verified(path, fmt)
    return tensors, json.loads(meta.get("tuneqdm.info", "{}"))
