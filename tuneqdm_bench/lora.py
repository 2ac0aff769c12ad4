"""A LoRA on a quantized model, applied at call time: one sampling step of the W4 SD 1.5 UNet with and
without a rank-16 LoRA on every attention projection and every convolution, and the bytes each holds.

    python -m tuneqdm_bench lora [--batch 2] [--latent 64] [--rank 16] [--rounds 3] [--json]

The LoRA reaches the layers as low-rank adapters through the model's router (what the pack does for
ComfyUI's LoraLoader after Quantize UNet), so no weight-sized float tensor is built. Both models are
timed in interleaved rounds (one step each per round), so load from other processes hits them alike.
Target (issue 12): the LoRA step at most 1.15x the W4 step, and the W4 model's resident bytes
unchanged (the LoRA adds only its own tensors).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from tuneqdm_core.adapters import LowRank
from tuneqdm_core.config import TuneQDMConfig
from tuneqdm_core.model import get_router, quantize_model, quantized_layers, tensor_bytes

from .comfy_unet import run, sd15_unet
from .kernels import CONTEXT, EXPERTS, describe, rel_error

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TARGET = 1.15


def lora_targets(model: nn.Module) -> list[str]:
    """Every attention projection and every convolution of the quantized UNet."""
    names = []
    for name, layer in quantized_layers(model):
        if name.endswith(ATTENTION) or len(layer.weight_shape) == 4:
            names.append(name)
    return names


def random_lora(model: nn.Module, names: list[str], rank: int, seed: int = 0) -> dict[str, tuple[LowRank, ...]]:
    g = torch.Generator().manual_seed(seed)
    layers = dict(quantized_layers(model))
    out = {}
    for name in names:
        shape = layers[name].weight_shape
        n_out, fan_in = shape[0], shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        down = torch.randn((rank, *shape[1:]), generator=g) / fan_in**0.5
        up = torch.randn((n_out, rank) + ((1, 1) if len(shape) == 4 else ()), generator=g) * 0.01
        out[name] = (LowRank(down=down, up=up, scale=1.0),)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = sd15_unet().eval()
    quantize_model(model, TuneQDMConfig(bits=4, experts=EXPERTS))
    w4_bytes = tensor_bytes(model)
    names = lora_targets(model)
    adapters = random_lora(model, names, args.rank)
    lora_bytes = sum(t.numel() * t.element_size() for (a,) in adapters.values() for t in (a.down, a.up))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    t = torch.linspace(100, 900, args.batch).round()
    context = torch.randn(args.batch, 77, CONTEXT, generator=g)
    router = get_router(model)

    def step(with_lora: bool) -> torch.Tensor:
        with router.route(t, adapters=adapters if with_lora else None):
            return run(model, x, t, context)

    print(f"device: {describe(device)}; W4 SD 1.5 UNet, {EXPERTS} experts, batch {args.batch}, "
          f"{args.latent}x{args.latent} latent; rank-{args.rank} LoRA on {len(names)} layers "
          f"(attention projections and convolutions)", flush=True)
    times: dict[str, list[float]] = {"W4": [], "W4 + LoRA": []}
    with torch.inference_mode():
        plain, lora = step(False), step(True)  # warm-up
        for r in range(args.rounds):
            for name, with_lora in (("W4", False), ("W4 + LoRA", True)):
                start = time.perf_counter()
                step(with_lora)
                times[name].append(time.perf_counter() - start)
            print(f"[lora] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
                  flush=True)
    base, with_lora = statistics.median(times["W4"]), statistics.median(times["W4 + LoRA"])
    ratio = with_lora / base
    resident = tensor_bytes(model)
    result = {"device": describe(device), "w4_step_s": base, "w4_lora_step_s": with_lora, "ratio": ratio,
              "w4_bytes": w4_bytes, "w4_bytes_after": resident, "lora_bytes": lora_bytes,
              "lora_layers": len(names), "lora_effect": rel_error(lora.float(), plain.float())}
    print(f"  W4        : median {base:7.3f} s  {w4_bytes / 2**20:7.1f} MiB resident")
    print(f"  W4 + LoRA : median {with_lora:7.3f} s  ({ratio:.3f}x W4)  LoRA tensors {lora_bytes / 2**20:.1f} MiB, "
          f"output moved {result['lora_effect']:.3f} relative")
    met = ratio <= TARGET and resident == w4_bytes
    print(f"target (LoRA step at most {TARGET}x the W4 step; W4 resident bytes unchanged: "
          f"{w4_bytes:,} -> {resident:,} B): {'MET' if met else 'MISSED'}")
    if args.json:
        print(json.dumps(result, indent=1))
    return 0
