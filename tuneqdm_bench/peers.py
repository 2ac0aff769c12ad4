"""The pack against ComfyUI's own tools, as a user runs them: every row is one graph in its own fresh
ComfyUI server (the full-size SD1.5 UNet, random weights, fp16 file; CLIP and VAE from a checkpoint),
and the figure is that server process's peak resident memory (VmHWM).

    python -m tuneqdm_bench peers [--rows train|infer|all] [--only TEXT ...] [--attention default|pytorch|both]
                                  [--steps 3] [--size 256] [--phases 4|8] [--json]

Training rows: UNETLoader -> TrainLoraNode (rank 8 fp32, rank 8 bf16, rank 32 fp32) against the pack's
UNETLoader -> Quantize UNet -> Train TuneQDM Scales (W4, W8), Load Quantized UNet (a W4 file) -> Train,
and Load and Quantize Diffusion Model (W4, W8) -> Train; batch 1, images at --size, checkpointing on,
seconds per step measured inside the node (TrainLoraNode: its progress bar's rate; the pack: its report).
Inference rows: load + sample one 512x512 image (64x64 latent, 4 euler steps) with UNETLoader at its
default dtype (fp32 on this CPU), fp16 and fp8_e4m3fn, against Load and Quantize Diffusion Model W8 and W4.

--phases 4|8 runs the loader's inference graph instead, in one server, one prompt per part (the loader; CLIP's
load and encoding; sampling), and prints the server's peak and current memory after each: where the row peaks.

Targets (issue 11): loader W4 -> Train peaks at most 0.45x UNETLoader -> TrainLoraNode (rank 8, fp32);
loader W4 load + sample at most 0.6x UNETLoader fp16 and 0.4x its default; the W4 training step at most
1.0x the fp32 LoRA step. ComfyUI 0.8.0 (the .comfyui host of `make setup`).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from tuneqdm_fixtures.checkpoints import cached_sd15_unet, install, write_tiny_sd15_checkpoint
from tuneqdm_fixtures.graph import Graph
from tuneqdm_fixtures.paths import asset_cache_dir
from tuneqdm_fixtures.server import ComfyServer

UNET = "sd15_full_fp16.safetensors"
CKPT = "tiny_sd15.safetensors"
W4_FILE = "peers_w4"
QUANT = dict(experts=4, scales="s_out and s_in (TuneQDM)", s_in_init="ones", keep_float="")


def _with_defaults(info: dict, node: str, given: dict) -> dict:
    """A node's inputs: what is given, plus the default of every other required widget (so a row keeps
    working when a node gains an input)."""
    inputs = dict(given)
    for name, spec in info[node]["input"]["required"].items():
        if name in inputs or not (isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict)):
            continue
        if "default" in spec[1]:
            inputs[name] = spec[1]["default"]
        elif isinstance(spec[0], list) and spec[0]:
            inputs[name] = spec[0][0]
    return inputs


class Row:
    def __init__(self, name: str, kind: str, build, server_args: tuple[str, ...] = ()) -> None:
        self.name, self.kind, self.build, self.server_args = name, kind, build, server_args


def _common(g: Graph, size: int):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CKPT)
    pos = g.node("CLIPTextEncode", text="a photo of sks digit", clip=ckpt.out(1))
    images = g.node("ImageScale", image=g.node("TuneQDMDefaultSubjectImages").out(0), upscale_method="bilinear",
                    width=size, height=size, crop="center")
    return ckpt, pos, images


def _lora_row(rank: int, dtype: str):
    def build(g: Graph, info: dict, args) -> None:
        ckpt, pos, images = _common(g, args.size)
        unet = g.node("UNETLoader", unet_name=UNET, weight_dtype="default")
        latents = g.node("VAEEncode", pixels=images, vae=ckpt.out(2))
        train = g.node("TrainLoraNode", **_with_defaults(info, "TrainLoraNode", dict(
            model=unet.out(0), latents=latents.out(0), positive=pos.out(0), batch_size=1, steps=args.steps,
            learning_rate=1e-4, rank=rank, training_dtype=dtype, lora_dtype=dtype, gradient_checkpointing=True,
            existing_lora="[None]")))
        g.node("PreviewAny", source=train.out(3))
    return build


def _tuneqdm_row(source: str, bits: str):
    def build(g: Graph, info: dict, args) -> None:
        ckpt, pos, images = _common(g, args.size)
        if source == "quantize":
            unet = g.node("UNETLoader", unet_name=UNET, weight_dtype="default")
            model = g.node("TuneQDMQuantizeUNet", model=unet.out(0), bits=bits, **QUANT).out(0)
        elif source == "loader":
            model = g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=UNET, weight_dtype="default", bits=bits,
                           **QUANT).out(0)
        else:
            model = g.node("TuneQDMLoadQuantizedUNet", unet_name=f"{W4_FILE}.safetensors").out(0)
        train = g.node("TuneQDMTrainScales", **_with_defaults(info, "TuneQDMTrainScales", dict(
            model=model, vae=ckpt.out(2), instance_images=images, instance_conditioning=pos.out(0), steps=args.steps,
            batch_size=1, resolution=args.size, checkpointing=True)))
        g.node("PreviewAny", source=train.out(3))
    return build


def _infer_row(source: str, option: str):
    def build(g: Graph, info: dict, args) -> None:
        _infer_graph(g, source, option, stage=3)
    return build


def _infer_graph(g: Graph, source: str, option: str, stage: int) -> None:
    """The inference graph, in ComfyUI's order of execution: stage 1 the model loader (the pack's loaders
    only: their report is an output), 2 also the checkpoint's CLIP encoding, 3 the whole graph."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CKPT)
    if source == "unet":
        model = g.node("UNETLoader", unet_name=UNET, weight_dtype=option).out(0)
    else:
        loader = g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=UNET, weight_dtype="default", bits=option,
                        **QUANT)
        model = loader.out(0)
        if stage < 3:
            g.node("PreviewAny", source=loader.out(1))
    pos = g.node("CLIPTextEncode", text="a photo", clip=ckpt.out(1))
    neg = g.node("CLIPTextEncode", text="", clip=ckpt.out(1))
    if stage == 2:
        g.node("PreviewAny", source=pos.out(0))
        g.node("PreviewAny", source=neg.out(0))
    if stage == 3:
        latent = g.node("EmptyLatentImage", width=512, height=512, batch_size=1)
        s = g.node("KSampler", model=model, positive=pos.out(0), negative=neg.out(0), latent_image=latent.out(0),
                   seed=0, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        g.node("SaveLatent", samples=s.out(0), filename_prefix="latents/peers")


def phases(files: dict, bits: str, server_args: tuple[str, ...]) -> list[dict]:
    """Where the loader's inference row peaks: one server, three prompts that add the graph's nodes in the
    order ComfyUI runs them (the model loader, then CLIP's load and encoding, then sampling); ComfyUI keeps
    each prompt's outputs, so every prompt runs only what is new. Peak and current memory (bytes) after each."""
    server = _server(files, server_args)
    try:
        out = [{"phase": "server started", **server.memory()}]
        for stage, what in ((1, f"Load and Quantize W{bits}"), (2, "+ CheckpointLoaderSimple, CLIPTextEncode"),
                            (3, "+ KSampler 512x512, 4 steps")):
            g = Graph()
            _infer_graph(g, "loader", bits, stage)
            start = time.perf_counter()
            server.run(g.to_api(), timeout=1800, check=True)
            out.append({"phase": what, "seconds": time.perf_counter() - start, **server.memory()})
            print(f"[peers phases] {what}: {out[-1]['seconds']:.1f} s, " + ", ".join(
                f"{k} {v / 1e9:.3f} GB" for k, v in out[-1].items() if k.startswith(("Vm", "Rss"))), flush=True)
        return out
    finally:
        server.stop()


ROWS = [
    Row("UNETLoader -> TrainLoraNode (rank 8, fp32)", "train", _lora_row(8, "fp32")),
    Row("UNETLoader -> TrainLoraNode (rank 8, bf16)", "train", _lora_row(8, "bf16")),
    Row("UNETLoader -> TrainLoraNode (rank 32, fp32)", "train", _lora_row(32, "fp32")),
    Row("UNETLoader -> Quantize UNet W4 -> Train TuneQDM Scales", "train", _tuneqdm_row("quantize", "4")),
    Row("UNETLoader -> Quantize UNet W8 -> Train TuneQDM Scales", "train", _tuneqdm_row("quantize", "8")),
    Row("Load Quantized UNet (W4 file) -> Train TuneQDM Scales", "train", _tuneqdm_row("file", "4")),
    Row("Load and Quantize W4 -> Train TuneQDM Scales", "train", _tuneqdm_row("loader", "4")),
    Row("Load and Quantize W8 -> Train TuneQDM Scales", "train", _tuneqdm_row("loader", "8")),
    Row("UNETLoader default (fp32) -> KSampler 512x512", "infer", _infer_row("unet", "default")),
    # UNETLoader's own choices are default and fp8: fp16 weights are ComfyUI's --fp16-unet.
    Row("UNETLoader fp16 -> KSampler 512x512", "infer", _infer_row("unet", "default"), ("--fp16-unet",)),
    Row("UNETLoader fp8_e4m3fn -> KSampler 512x512", "infer", _infer_row("unet", "fp8_e4m3fn")),
    Row("Load and Quantize W8 -> KSampler 512x512", "infer", _infer_row("loader", "8")),
    Row("Load and Quantize W4 -> KSampler 512x512", "infer", _infer_row("loader", "4")),
]


PYTORCH_ATTENTION = " (pytorch attention)"


def _with_attention(rows: list[Row], attention: str) -> list[Row]:
    """The inference rows under the chosen attention (training rows are unchanged)."""
    out = []
    for row in rows:
        if row.kind == "infer" and attention in ("pytorch", "both"):
            if attention == "both":
                out.append(row)
            out.append(Row(row.name + PYTORCH_ATTENTION, row.kind, row.build,
                           row.server_args + ("--use-pytorch-cross-attention",)))
        else:
            out.append(row)
    return out


def _step_seconds(row: Row, entry: dict, log: str, steps: int) -> float | None:
    if row.kind != "train":
        return None
    if "TrainLora" in row.name:
        rates = re.findall(r"Training LoRA.*?(\d+(?:\.\d+)?)(s/it|it/s)[,\]]", log)
        if not rates:
            return None
        value, unit = rates[-1]
        return float(value) if unit == "s/it" else 1.0 / float(value)
    for out in entry.get("outputs", {}).values():
        for text in out.get("text", []):
            m = re.search(r"(\d+)/\d+ steps in ([\d.]+) s", text)
            if m:
                return float(m.group(2)) / int(m.group(1))
    return None


def _server(files: dict[str, Path], args: tuple[str, ...] = ()) -> ComfyServer:
    server = ComfyServer(extra_args=list(args)).start()
    for folder, (src, name) in files.items():
        install(src, server.models_dir / folder, name)
    return server


def _make_w4_file(files: dict) -> Path:
    """One W4 quantized-model file, made by the pack's own loader and saver, for the Load Quantized UNet row."""
    server = _server(files)
    try:
        g = Graph()
        model = g.node("TuneQDMLoadQuantizeDiffusionModel", unet_name=UNET, weight_dtype="default", bits="4", **QUANT)
        g.node("TuneQDMSaveQuantizedUNet", model=model.out(0), filename_prefix=W4_FILE)
        server.run(g.to_api(), timeout=900, check=True)
        made = sorted((server.models_dir / "tuneqdm").rglob(f"{W4_FILE}*.safetensors"))
        target = asset_cache_dir() / f"{W4_FILE}.safetensors"
        target.write_bytes(made[-1].read_bytes())
        return target
    finally:
        server.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", choices=("train", "infer", "all"), default="all")
    p.add_argument("--only", action="append", default=[],
                   help="run only the rows whose name contains this text (repeat for several; names hold commas)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--attention", choices=("default", "pytorch", "both"), default="default",
                   help="inference rows: the host's own attention on this machine (on a CPU, ComfyUI's sub-quadratic "
                        "attention), PyTorch's scaled-dot-product attention (--use-pytorch-cross-attention, "
                        "ComfyUI's choice on NVIDIA GPUs), or each row under both")
    p.add_argument("--phases", choices=("4", "8"),
                   help="instead of the rows: where Load and Quantize at these bits -> KSampler 512x512 peaks, "
                        "its nodes added prompt by prompt in one server (peak and current memory after each)")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    unet = cached_sd15_unet(full_size=True)
    ckpt = write_tiny_sd15_checkpoint(asset_cache_dir() / CKPT)
    files = {"diffusion_models": (unet.path, UNET), "checkpoints": (ckpt.path, CKPT)}
    if args.phases:
        server_args = ("--use-pytorch-cross-attention",) if args.attention == "pytorch" else ()
        found = phases(files, args.phases, server_args)
        if args.json:
            print(json.dumps({"phases": found, "attention": args.attention}, indent=1))
        return 0
    rows = [r for r in _with_attention(ROWS, args.attention)
            if args.rows in ("all", r.kind) and (not args.only or any(t in r.name for t in args.only))]
    if any("W4 file" in r.name for r in rows):
        files["tuneqdm"] = (_make_w4_file(files), f"{W4_FILE}.safetensors")
    results = []
    for row in rows:
        server = _server(files, row.server_args)
        try:
            g = Graph()
            row.build(g, server.object_info(), args)
            start = time.perf_counter()
            entry = server.run(g.to_api(), timeout=1800, check=True)
            wall = time.perf_counter() - start
            result = {"row": row.name, "kind": row.kind, "peak_rss": server.peak_rss(), "wall_s": wall,
                      "step_s": _step_seconds(row, entry, server.log_text(), args.steps)}
        finally:
            server.stop()
        results.append(result)
        step = f"{result['step_s']:.1f} s/step" if result["step_s"] else "-"
        print(f"[peers] {row.name}: peak {result['peak_rss'] / 1e9:.2f} GB, {step}, prompt {wall:.1f} s", flush=True)
    by = {r["row"]: r for r in results}
    print("\n| graph | peak RSS | step | prompt wall time |\n|---|---|---|---|")
    for r in results:
        step = f"{r['step_s']:.1f} s" if r["step_s"] else "-"
        print(f"| {r['row']} | {r['peak_rss'] / 1e9:.2f} GB | {step} | {r['wall_s']:.1f} s |")
    targets = _targets(by)
    for line in targets:
        print(line)
    if args.json:
        print(json.dumps({"rows": results, "targets": targets}, indent=1))
    return 0


def _targets(by: dict) -> list[str]:
    lines = []

    def ratio(a: str, b: str, key: str, limit: float, what: str) -> None:
        if a in by and b in by and by[a][key] and by[b][key]:
            r = by[a][key] / by[b][key]
            lines.append(f"target: {what} {r:.2f}x (at most {limit}x): {'MET' if r <= limit else 'MISSED'}")

    lora = "UNETLoader -> TrainLoraNode (rank 8, fp32)"
    w4 = "Load and Quantize W4 -> Train TuneQDM Scales"
    ratio(w4, lora, "peak_rss", 0.45, "loader W4 -> Train peak / UNETLoader -> TrainLoraNode fp32 peak")
    ratio(w4, lora, "step_s", 1.0, "loader W4 training step / fp32 LoRA step")
    for attention in ("", PYTORCH_ATTENTION):
        infer = "Load and Quantize W4 -> KSampler 512x512" + attention
        ratio(infer, "UNETLoader fp16 -> KSampler 512x512" + attention, "peak_rss", 0.6,
              f"loader W4 inference peak / UNETLoader fp16{attention}")
        ratio(infer, "UNETLoader default (fp32) -> KSampler 512x512" + attention, "peak_rss", 0.4,
              f"loader W4 inference peak / UNETLoader default (fp32){attention}")
    return lines
