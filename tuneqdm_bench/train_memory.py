"""`python -m tuneqdm_bench train-memory`: the training path the Train TuneQDM Scales node uses
(`tuneqdm_core.train.train_scales`, with activation checkpointing as the node applies it) on the
full-size SD1.5 UNet at batch 1, each variant in its own process, against float32 full fine-tuning.

Rows: W4 and W8 TuneQDM (4 experts, s_out and s_in), PEQA (W4, 1 expert, s_out only), and float32 full
fine-tuning with AdamW (the memory benchmark's own step). Two training steps are run (the second one
has the optimizer state in place); the reported step time is the second step's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from tuneqdm_core.config import TuneQDMConfig
from tuneqdm_core.model import quantize_model, tensor_bytes
from tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS
from tuneqdm_core.scales import scales_of
from tuneqdm_core.train import SampleSet, TrainConfig, train_scales
from tuneqdm_fixtures.paths import checkout, subprocess_env

from . import memory
from .comfy_unet import run, unet_config

CONFIGS = {"w4": TuneQDMConfig(bits=4, experts=4), "w8": TuneQDMConfig(bits=8, experts=4),
           "peqa-w4": TuneQDMConfig.peqa(bits=4)}
VARIANTS = ("fp32-full", *CONFIGS)
TAG = "TUNEQDM_TRAIN_RESULT "
# SD1.x's training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps.
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, NUM_TRAIN_TIMESTEPS) ** 2, 0)


def run_scales(variant: str, latent: int, checkpointing: bool, tiny: bool) -> dict:
    baseline = memory.current_rss()
    model = memory.meta_unet(tiny)
    quantize_model(model, CONFIGS[variant], weight_init=memory.init_float_layer)
    memory.materialize_rest(model, torch.device("cpu"))
    model.requires_grad_(False)  # the trainer trains its own copy of the scales
    built_rss = memory.current_rss()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, model.in_channels, latent, latent, generator=gen)
    context = torch.randn(1, 77, unet_config(tiny)["context_dim"], generator=gen)

    def loss_fn(x0: torch.Tensor, t: torch.Tensor, cond: int) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=gen)
        a = ALPHAS[t.long()].reshape(-1, 1, 1, 1)
        pred = run(model, a.sqrt() * x0 + (1 - a).sqrt() * eps, t, context.expand(x0.shape[0], -1, -1))
        return (pred - eps).pow(2).flatten(1).mean(1)

    stamps = [time.perf_counter()]
    config = TrainConfig(steps=2, train_s_in=CONFIGS[variant].train_s_in, checkpointing=checkpointing)
    result = train_scales(model, scales_of(model), [SampleSet(x0, 0)], loss_fn, config,
                          on_step=lambda step, loss: stamps.append(time.perf_counter()))
    peak = memory.peak_rss()
    return {"variant": variant, "latent": latent, "checkpointing": checkpointing, "status": "ok",
            "steps": result.steps_done, "step_s": stamps[2] - stamps[1], "first_step_s": stamps[1] - stamps[0],
            "baseline_rss": baseline, "built_rss": built_rss, "peak_rss": peak, "peak_above_baseline": peak - baseline,
            "model_bytes": tensor_bytes(model), "trainable_values": scales_of(model).num_values()}


def run_fp32(latent: int, checkpointing: bool, tiny: bool) -> dict:
    row = memory.run_one("fp32-full", latent, checkpointing, tiny=tiny)
    return {**row, "variant": "fp32-full"}


def spawn(variant: str, latent: int, checkpointing: bool, tiny: bool) -> dict:
    cmd = [sys.executable, "-m", "tuneqdm_bench", "train-memory", "--one", variant, "--latent", str(latent)]
    cmd += ["--checkpointing"] * checkpointing + ["--tiny"] * tiny
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout(), env=subprocess_env())
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": variant, "latent": latent, "checkpointing": checkpointing, "status": f"failed: {tail}"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--one", choices=VARIANTS, help="run only this variant, in this process")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--checkpointing", action="store_true", help="with --one: activation checkpointing on")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same class (for tests)")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.one:
        row = (run_fp32(args.latent, args.checkpointing, args.tiny) if args.one == "fp32-full"
               else run_scales(args.one, args.latent, args.checkpointing, args.tiny))
        print(TAG + json.dumps(row), flush=True)
        return 0
    rows = []
    for variant in VARIANTS:
        for ckpt in (True, False):
            print(f"[train-memory] {variant} latent {args.latent} checkpointing {'on' if ckpt else 'off'} ...",
                  file=sys.stderr, flush=True)
            rows.append(spawn(variant, args.latent, ckpt, args.tiny))
    find = {(r["variant"], r["checkpointing"]): r for r in rows if r.get("status") == "ok"}
    checks = []
    fp, w4 = find.get(("fp32-full", True)), find.get(("w4", True))
    if fp and w4:
        checks = [
            ("W4 / fp32 full fine-tuning peak above baseline, both checkpointed", w4["peak_above_baseline"] / fp["peak_above_baseline"], 0.10),
            ("W4 / fp32 full fine-tuning whole-process peak RSS, both checkpointed", w4["peak_rss"] / fp["peak_rss"], 0.10),
            ("W4 whole-process peak RSS in GB (torch runtime included), checkpointed", w4["peak_rss"] / 1e9, 1.5),
            ("W4 / fp32 full fine-tuning step time, both checkpointed", w4["step_s"] / fp["step_s"], 0.5),
        ]
    if args.json:
        print(json.dumps({"rows": rows, "targets": [dict(name=n, value=v, limit=l, met=v <= l) for n, v, l in checks]}, indent=1))
        return 0
    print(f"{'variant':10} {'ckpt':5} {'peak RSS (B)':>16} {'above baseline (B)':>20} {'step (s)':>9}")
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['variant']:10} {'on' if r['checkpointing'] else 'off':5} {r['status']}")
            continue
        print(f"{r['variant']:10} {'on' if r['checkpointing'] else 'off':5} {r['peak_rss']:>16,} "
              f"{r['peak_above_baseline']:>20,} {r['step_s']:>9.2f}")
    for name, value, limit in checks:
        print(f"target: {name}: {value:.3f} (at most {limit}) {'met' if value <= limit else 'NOT met'}")
    return 0
