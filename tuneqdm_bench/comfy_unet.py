"""ComfyUI's own SD 1.5 UNet for the benchmarks (random weights: only bytes and seconds mean anything),
built through the checkout's host like the test files (tuneqdm_fixtures.checkpoints.sd15_unet): the full
UNet (859,520,964 parameters) or a tiny one of the same class and code path for tests.

Attention is fixed here so that a measurement does not depend on what ComfyUI would choose: always
PyTorch's scaled_dot_product_attention (ComfyUI picks sub-quadratic attention on a CPU), passed per call
as ComfyUI's `optimized_attention_override`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuneqdm_demo.model import reset_parameters
from tuneqdm_fixtures.checkpoints import SD15_UNET_CONFIG, sd15_unet as build_sd15_unet
from tuneqdm_fixtures.host import import_comfy

ATTENTION = "torch scaled_dot_product_attention"
# Two levels of 32 and 64 channels, a transformer after each res block of the first: seconds on a CPU.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [2, 2],
    "transformer_depth": [1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 0, 0, 0], "context_dim": 32,
}


def unet_config(tiny: bool = False) -> dict[str, Any]:
    return TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG


def sd15_unet(tiny: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """ComfyUI's UNetModel; on the meta device the structure alone, elsewhere every layer initialised as
    torch initialises its own layers."""
    unet = build_sd15_unet(unet_config(tiny), device)
    if torch.device(device).type != "meta":
        reset_parameters(unet)
    return unet


def count_layers(model: nn.Module) -> int:
    """Linear and Conv2d layers: what TuneQDM quantizes."""
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


def run(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One forward of the UNet with PyTorch's attention, whatever ComfyUI chose for this device."""
    sdpa = import_comfy().ldm.modules.attention.attention_pytorch

    def override(chosen: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sdpa(*args, **kwargs)

    return unet(x, t, context, transformer_options={"optimized_attention_override": override})
