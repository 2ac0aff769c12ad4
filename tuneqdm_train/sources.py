"""Model sources without a ComfyUI server: ComfyUI imported as a library, the pack loaded as the package
ComfyUI would load it as (its `nodes` use ComfyUI's model classes and relative imports), and from it either
the embedded default model, quantized here, or a quantized-model file that Save Quantized UNet wrote (its
ComfyUI model config included). Also the text encoder and VAE that turn training images into latents and
captions into conditioning: the default model's own, or safetensors files given on the command line."""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from tuneqdm_core.errors import FileMissingError, SettingError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK = "tuneqdm_pack"  # the name the in-process tests load the pack under: one copy of its classes per process
DEFAULT = "default"


def comfy_root() -> Path:
    """$TUNEQDM_COMFYUI, else the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>), else the
    `.comfyui` host of `make setup`."""
    if os.environ.get("TUNEQDM_COMFYUI"):
        return Path(os.environ["TUNEQDM_COMFYUI"])
    if REPO_ROOT.parent.name == "custom_nodes" and (REPO_ROOT.parent.parent / "comfy").is_dir():
        return REPO_ROOT.parent.parent
    return REPO_ROOT / ".comfyui"


def import_comfy(device: torch.device) -> ModuleType:
    """The ComfyUI host (comfy_root) as a library. CPU mode unless this process trains on a GPU (ComfyUI
    chooses its device on first import)."""
    comfy_dir = comfy_root()
    if not (comfy_dir / "comfy").is_dir():
        raise FileMissingError(f"{comfy_dir}/comfy missing: run `make setup`, or set TUNEQDM_COMFYUI to a ComfyUI checkout")
    if str(comfy_dir) not in sys.path:
        # Appended: ComfyUI's top-level `nodes.py` must not shadow anything of ours.
        sys.path.append(str(comfy_dir))
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.model_management  # noqa: F401  (picks its device now)
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401
    return sys.modules["comfy"]


def pack() -> ModuleType:
    """The pack as a package (after import_comfy): `pack().nodes`, `pack().tuneqdm_core`. Every tensor class
    the trainer checks (QuantLayer...) must come from this one copy of the core."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK]
            raise
    return sys.modules[PACK]


def load_model(spec: str, bits: int = 4, experts: int = 4) -> Any:
    """A quantized ComfyUI ModelPatcher: `default` (the embedded model, quantized to `bits` with `experts`) or
    the path of a quantized-model file (bits and experts are the file's)."""
    p = pack()
    if spec == DEFAULT:
        from tuneqdm_pack.nodes.default_model import load_model as load_default
        from tuneqdm_pack.nodes.patcher import quantize_patcher

        model, _ = quantize_patcher(load_default(), p.tuneqdm_core.TuneQDMConfig(bits=bits, experts=experts))
        return model
    path = Path(spec)
    if path.suffix != ".safetensors":
        raise SettingError(f"--model {spec}: expected `default` or a quantized-model .safetensors file "
                         "(from Save Quantized UNet); only safetensors files are loaded")
    from tuneqdm_pack.nodes import model_files

    return model_files.load(str(path))


def is_default_model(model: Any) -> bool:
    """True for the embedded default (quantized here or saved and reloaded): its UNet config is the digits one."""
    from tuneqdm_pack.tuneqdm_demo.files import UNET_CONFIG

    config = model.model.model_config.unet_config
    return all(config.get(k) == v for k, v in UNET_CONFIG.items() if isinstance(v, (int, str, bool)))


@dataclass
class Encoders:
    """text(prompt) -> ComfyUI CONDITIONING ([[context, options]]); vae.encode(IMAGE (B, H, W, 3)) -> latents."""

    text: Callable[[str], list]
    vae: Any
    resolution: int  # the square size training images are resized to


def _safetensors(path: str, what: str) -> str:
    if Path(path).suffix != ".safetensors":
        raise SettingError(f"{what} {path}: only .safetensors files are loaded")
    if not Path(path).is_file():
        raise FileMissingError(f"{what} {path}: no such file")
    return path


def encoders(model: Any, vae: str | None, text_encoder: str | None, clip_type: str,
             resolution: int | None) -> Encoders:
    """The default model's MiniLM and pixel codec when `model` is the default and no files are given; else a
    ComfyUI VAE file and text-encoder file (both needed)."""
    import comfy.sd
    import comfy.utils

    if vae is None and text_encoder is None and is_default_model(model):
        from tuneqdm_pack.nodes.default_model import DefaultTextEncoder, PixelVAE

        return Encoders(DefaultTextEncoder().conditioning, PixelVAE(), resolution or 64)
    if vae is None or text_encoder is None:
        raise SettingError("training from images needs --vae and --text-encoder for this model (only the embedded "
                         "default model has its own); or give pre-encoded data (python -m tuneqdm_train encode)")
    vae_model = comfy.sd.VAE(sd=comfy.utils.load_torch_file(_safetensors(vae, "--vae"), safe_load=True))
    try:
        kind = comfy.sd.CLIPType[clip_type.upper()]
    except KeyError:
        raise SettingError(f"--clip-type {clip_type}: one of {', '.join(t.name.lower() for t in comfy.sd.CLIPType)}") from None
    clip = comfy.sd.load_clip(ckpt_paths=[_safetensors(text_encoder, "--text-encoder")], clip_type=kind)

    def text(prompt: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))

    return Encoders(text, vae_model, resolution or 512)
