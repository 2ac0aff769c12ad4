"""Random-weight diffusion-model files of the families people use today (SDXL, SD3.5 Medium, Flux, Wan 2.1
T2V 1.3B), with each family's exact tensor names and shapes, that ComfyUI's stock UNETLoader detects as
that family.

Where names and shapes come from: a family is a handful of numbers (the config ComfyUI's
`model_detection.detect_unet_config` reads back from a file). The model is built from those numbers by
ComfyUI's own `supported_models` class on the meta device (no storage), and its `state_dict()` gives every
key and shape; nothing is listed by hand. `family_specs` then checks that detection on those keys and shapes
gives back the same config and the expected `supported_models` class, so a test-size file is detected as
the family or the generator fails.

Sizes: `full` is the real architecture (SDXL UNet 2.57B, SD3.5 Medium, Wan 2.1 T2V 1.3B; Flux at its
true widths with a reduced number of blocks, see FLUX_FULL_DEPTH). `test` is the smallest file ComfyUI
still detects as the family (why each is as small as it is: the comments on the configs).

Files are written tensor by tensor by `checkpoints.write_safetensors_streaming` (the whole model is never in
memory) into `paths.asset_cache_dir()`, and reused when the cached file is this exact asset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import Asset, TensorSpec, _cached_or_write, write_safetensors_streaming
from .host import import_comfy
from .paths import asset_cache_dir

#: A test-only custom-node package (conditioning, VAE stand-in, images of each family's shapes) to link into a
#: server's custom_nodes beside the pack, since no text encoder or VAE weights exist on the test machines.
FAMILY_NODES = Path(__file__).resolve().parent / "fixture_nodes" / "tuneqdm_family_fixtures"

# ---- the families' configs, as comfy.model_detection.detect_unet_config returns them -------------------------

_SDXL_BASE: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# SDXL detection matches model_channels 320, context 2048, adm 2816 and transformer_depth [0,0,2,2,10,10]
# exactly, so the 24 input transformer blocks must stay; channel_mult, the middle block and the output
# depths are free: every level at 320 channels, no middle transformer, one output transformer per block.
_SDXL_TEST = {**_SDXL_BASE, "channel_mult": [1, 1, 1], "transformer_depth_middle": -1,
              "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1]}

_FLUX_BASE: dict[str, Any] = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
    "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "guidance_embed": True, "yak_mlp": False,
    "txt_norm": False,
}
#: Flux dev has 19 double and 38 single blocks; the "full" file keeps the true widths with fewer blocks
#: (the figures scale to the real depth by the per-block counts; see README "Model families").
FLUX_DEV_DEPTH = (19, 38)
FLUX_FULL_DEPTH = (2, 4)
# Detection fixes 24 heads and rope axes of 128 per head: hidden 3072 is the only width a Flux file can have.
_FLUX_FULL = {**_FLUX_BASE, "depth": FLUX_FULL_DEPTH[0], "depth_single_blocks": FLUX_FULL_DEPTH[1]}
_FLUX_TEST = {**_FLUX_BASE, "depth": 1, "depth_single_blocks": 1}


def _mmdit(depth: int, pos_embed_max_size: int, self_attn_layers: list[int]) -> dict[str, Any]:
    """SD3.5 Medium's MMDiT-X: width 64 * depth, depth heads, qk RMS norm, extra self-attention in the first blocks."""
    return {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 4096, "out_features": 64 * depth}},
        "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size, "qk_norm": "rms",
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": self_attn_layers,
    }


_SD35M_FULL = _mmdit(24, 384, list(range(13)))
# Width is 64 * depth in MMDiT, so depth 2 is width 128; the position table is cut to 32x32 patches (64x64 latents).
_SD35M_TEST = _mmdit(2, 32, [0])


def _wan(dim: int, ffn_dim: int, num_layers: int) -> dict[str, Any]:
    return {
        "image_model": "wan2.1", "dim": dim, "out_dim": 16, "num_heads": dim // 128, "ffn_dim": ffn_dim,
        "num_layers": num_layers, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "model_type": "t2v",
    }


_WAN_FULL = _wan(1536, 8960, 30)
_WAN_TEST = _wan(128, 256, 2)  # heads are 128 wide (detection: num_heads = dim // 128): one head


@dataclass(frozen=True)
class Family:
    """One model family: its ComfyUI class, configs, latent and conditioning shapes."""

    name: str
    comfy_class: str  # the comfy.supported_models class detection must pick
    configs: dict[str, dict[str, Any]]  # size -> detected config
    latent_channels: int
    video: bool = False  # latents (B, C, T, H, W)
    context_dim: int = 4096
    pooled_dim: int | None = None


FAMILIES: dict[str, Family] = {
    "sdxl": Family("sdxl", "SDXL", {"full": _SDXL_BASE, "test": _SDXL_TEST}, 4, context_dim=2048, pooled_dim=1280),
    "sd35m": Family("sd35m", "SD3", {"full": _SD35M_FULL, "test": _SD35M_TEST}, 16, pooled_dim=2048),
    "flux": Family("flux", "Flux", {"full": _FLUX_FULL, "test": _FLUX_TEST}, 16, pooled_dim=768),
    "wan21": Family("wan21", "WAN21_T2V", {"full": _WAN_FULL, "test": _WAN_TEST}, 16, video=True),
}

#: The real SDXL UNet's parameter count, which the full-size file must have.
SDXL_UNET_PARAMS = 2_567_463_684


def _model_config(family: Family, size: str) -> Any:
    comfy = import_comfy()
    cls = getattr(comfy.supported_models, family.comfy_class)
    return cls(dict(family.configs[size]))


def _init_rule(module: Any, pname: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """How to fill one tensor, by the layer that owns it: variance-preserving weights, norms at 1, biases at 0,
    learned tables and modulation vectors small."""
    import torch

    kind = type(module).__name__
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        if pname == "bias":
            return "zeros", 0.0
        return "normal", (math.prod(shape) // shape[0]) ** -0.5
    if "Norm" in kind:  # GroupNorm, LayerNorm, RMSNorm (torch's, ComfyUI's and Flux's own with `.scale`)
        return ("zeros", 0.0) if pname == "bias" else ("ones", 0.0)
    # nn.Embedding, SD3's pos_embed, Wan's modulation tables: small random values, as trained models have.
    return "normal", 0.02


def family_specs(family: str | Family, size: str) -> dict[str, TensorSpec]:
    """Every tensor of the family's diffusion-model file (bare keys, as in models/diffusion_models)."""
    import torch

    comfy = import_comfy()
    fam = FAMILIES[family] if isinstance(family, str) else family
    model_config = _model_config(fam, size)
    model_config.set_inference_dtype(torch.float16, None)
    model_config.custom_operations = comfy.ops.disable_weight_init  # no initialisation: shapes only
    with torch.device("meta"):
        base = model_config.get_model({}, "", device=torch.device("meta"))
    dm = base.diffusion_model
    saved = set(dm.state_dict().keys())  # persistent tensors only: what a real file holds
    specs: dict[str, TensorSpec] = {}
    for mod_name, mod in dm.named_modules():
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{mod_name}.{pname}" if mod_name else pname
            if t is None or key not in saved:
                continue
            init, std = _init_rule(mod, pname, tuple(t.shape))
            specs[key] = TensorSpec(key, tuple(t.shape), init, std)
    check_detected(fam, size, specs)
    return specs


def check_detected(fam: Family, size: str, specs: dict[str, TensorSpec]) -> None:
    """ComfyUI's detection, run on the keys and shapes alone, must give the config and the family's class."""
    import torch

    comfy = import_comfy()
    sd = {k: torch.empty(s.shape, device="meta") for k, s in specs.items()}
    detected = comfy.model_detection.detect_unet_config(sd, "")
    want = fam.configs[size]
    diff = {k: (detected.get(k), v) for k, v in want.items() if detected.get(k) != v}
    if diff:
        raise AssertionError(f"{fam.name}/{size}: detection reads another config: {diff}")
    config = comfy.model_detection.model_config_from_unet_config(detected, sd)
    if type(config).__name__ != fam.comfy_class:
        raise AssertionError(f"{fam.name}/{size}: detected as {type(config).__name__}, not {fam.comfy_class}")


def file_name(family: str, size: str, dtype: str) -> str:
    return f"{family}_{size}_{dtype}.safetensors"


def write_family_file(family: str, size: str, dtype: str = "bf16", *, folder: Path | None = None,
                      seed: int = 0, force: bool = False) -> Asset:
    """The family's file in the asset cache (written on first use, reused after). dtype: fp16, bf16, or
    fp8 (float8_e4m3fn weights for every Linear/Conv, everything else bf16, as the common fp8 files are)."""
    path = (folder or asset_cache_dir()) / file_name(family, size, dtype)
    if dtype == "fp8":
        return _cached_or_write(path, lambda: _fp8_specs(family_specs(family, size)), f"{family}-{size}-fp8",
                                "bf16", seed, force)
    return _cached_or_write(path, lambda: family_specs(family, size), f"{family}-{size}", dtype, seed, force)


def _fp8_specs(specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """Weights with 2+ dims (Linear/Conv) stored as float8_e4m3fn; norms, biases and tables stay bf16."""
    return {k: (TensorSpec(k, s.shape, s.init, s.std, dtype="float8_e4m3fn")
                if s.init == "normal" and len(s.shape) >= 2 and k.endswith(".weight") else s)
            for k, s in specs.items()}


def parameters(family: str, size: str) -> int:
    return sum(s.numel for s in family_specs(family, size).values())


def weight_bytes(source: Path, quantized: Path) -> tuple[int, int]:
    """(Linear/Conv weight bytes of a 2-byte source file, the same weights in a quantized-model file): a
    quantized layer is every tensor under a prefix that has `qweight` (codes, zero points, steps, the
    experts' scales) except its bias; a weight left in float counts at 2 bytes a value, as in the source.
    Tables, norms and biases are no weights here, in either file."""
    from tuneqdm_core.lazy_file import read_header

    def tensors(path: Path) -> dict[str, dict]:
        return {k: v for k, v in read_header(str(path)).items() if isinstance(v, dict) and "shape" in v}

    def is_weight(key: str, v: dict) -> bool:
        return key.endswith(".weight") and len(v["shape"]) >= 2

    before = sum(2 * math.prod(v["shape"]) for k, v in tensors(source).items() if is_weight(k, v))
    q = tensors(quantized)
    layers = {k.rsplit(".", 1)[0] for k in q if k.endswith(".qweight")}
    after = 0
    for k, v in q.items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in layers:
            if leaf != "bias":
                after += v["data_offsets"][1] - v["data_offsets"][0]
        elif is_weight(k, v):
            after += 2 * math.prod(v["shape"])
    return before, after


def flux_dev_parameters(specs: dict[str, TensorSpec]) -> int:
    """A Flux file's parameters at Flux dev's depth (FLUX_DEV_DEPTH): its blocks counted from block 0 of each
    kind, everything outside the blocks as it is."""
    per = {kind: sum(s.numel for k, s in specs.items() if k.startswith(f"{kind}_blocks.0."))
           for kind in ("double", "single")}
    rest = sum(s.numel for k, s in specs.items() if not k.startswith(("double_blocks.", "single_blocks.")))
    return rest + FLUX_DEV_DEPTH[0] * per["double"] + FLUX_DEV_DEPTH[1] * per["single"]


__all__ = ["FAMILIES", "FAMILY_NODES", "Family", "family_specs", "write_family_file", "file_name", "parameters",
           "flux_dev_parameters", "weight_bytes", "write_safetensors_streaming", "FLUX_DEV_DEPTH", "FLUX_FULL_DEPTH", "SDXL_UNET_PARAMS"]
