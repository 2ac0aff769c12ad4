"""Files derived from the embedded default model, as users have them for real models: a LoRA for its UNet,
and fp8 copies in the two formats ComfyUI 0.8 reads (the older scaled-fp8 checkpoints and the
`_quantization_metadata` checkpoints). All are written from the shipped fp16 UNet, seeded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuneqdm_demo.files import UNET_FILE, UNET_FORMAT, load_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def unet_state() -> dict[str, torch.Tensor]:
    state, _ = load_file(UNET_FILE, UNET_FORMAT)
    return state


def linear_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the layers with a 2-D weight (every Linear of the UNet)."""
    return sorted(k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2)


def conv2d_layers(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 4)


def _scale_to(delta: torch.Tensor, weight: torch.Tensor, relative: float) -> float:
    """The factor that makes `delta`'s RMS `relative` times `weight`'s (the update is linear in it)."""
    return relative * float(weight.pow(2).mean().sqrt()) / float(delta.pow(2).mean().sqrt())


def write_lora(path: Path, *, naming: str = "diffusion_model", rank: int = 4, relative: float = 0.1,
               seed: int = 0) -> Path:
    """A random LoRA on every Linear of the UNet whose update is about `relative` of each weight's size.
    naming 'diffusion_model': `diffusion_model.<layer>.lora_up.weight`; 'lora_unet': `lora_unet_<layer_>`."""
    state = unet_state()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in linear_layers(state):
        w = state[f"{layer}.weight"].float()
        n_out, n_in = w.shape
        down = torch.randn(rank, n_in, generator=g) / n_in**0.5
        # alpha = rank, so strength 1 applies up @ down as it is.
        up = torch.randn(n_out, rank, generator=g)
        up *= _scale_to(up @ down, w, relative)
        key = f"diffusion_model.{layer}" if naming == "diffusion_model" else "lora_unet_" + layer.replace(".", "_")
        out[f"{key}.lora_up.weight"] = up.half().contiguous()
        out[f"{key}.lora_down.weight"] = down.half().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.float().abs().max() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).to(FP8), scale.reshape(()).float()


def write_fp8(path: Path, fmt: str) -> Path:
    """Every Linear weight in fp8 e4m3 with a per-tensor scale, the rest fp16, in one of ComfyUI's two
    layouts: 'scaled' (`<layer>.scale_weight` and a `scaled_fp8` marker) or 'metadata'
    (`<layer>.weight_scale` and the `_quantization_metadata` JSON in the file's metadata)."""
    state = unet_state()
    out: dict[str, torch.Tensor] = {k: v for k, v in state.items()}
    layers = linear_layers(state)
    for layer in layers:
        q, scale = _fp8(state[f"{layer}.weight"])
        out[f"{layer}.weight"] = q
        out[f"{layer}.scale_weight" if fmt == "scaled" else f"{layer}.weight_scale"] = scale
    metadata = None
    if fmt == "scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    elif fmt == "metadata":
        metadata = {"_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"} for layer in layers}})}
    else:
        raise ValueError(f"fmt must be 'scaled' or 'metadata', got {fmt!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)
    return path


def write_loha(path: Path, *, rank: int = 4, relative: float = 0.1, seed: int = 0) -> Path:
    """A random LoHa (Hadamard product of two low-rank pairs) on every Linear of the UNet."""
    state = unet_state()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in linear_layers(state):
        w = state[f"{layer}.weight"].float()
        n_out, n_in = w.shape
        w1a, w1b = torch.randn(n_out, rank, generator=g), torch.randn(rank, n_in, generator=g)
        w2a, w2b = torch.randn(n_out, rank, generator=g), torch.randn(rank, n_in, generator=g)
        w1a *= _scale_to((w1a @ w1b) * (w2a @ w2b), w, relative)
        key = f"lora_unet_{layer.replace('.', '_')}"
        for name, t in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
            out[f"{key}.{name}"] = t.half().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path
