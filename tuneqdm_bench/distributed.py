"""Data-parallel training (`python -m tuneqdm_train` under torchrun) on this machine's CPUs: the bytes a step
exchanges against the scales' size, and the step time of one process against two.

    python -m tuneqdm_bench distributed [--steps 20] [--batch-size 1] [--json]

Runs, each in its own processes with one thread each (OMP_NUM_THREADS=1, what torchrun sets), on the
embedded default model (W4, 4 experts) and its five held-out zeros, pre-encoded once:

- 1 process, batch b: the per-rank work alone;
- 1 process, batch 2b (`--streams 2`): the two-rank run's global batch in one process;
- 2 processes (torchrun, gloo), batch b each.

Bytes per step are measured on the process group: the payload of its collectives (the status exchange and
the all-reduce of the drawn experts' gradient rows, float32) and what the process wrote to its sockets
meanwhile (/proc/self/io wchar: gloo's actual traffic). Only the rows of the experts some rank drew travel,
so a step moves 1..experts quarters of the float32 scales. Step times are medians over the steps after the
first; they are reported, not targeted (two cores, shared with whatever else runs). For SD 1.5 the same
arithmetic is shown from its layer shapes (computed, not run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from tuneqdm_fixtures.paths import checkout, subprocess_env

EXPERTS = 4


def _run(cmd: list[str]) -> None:
    proc = subprocess.run([sys.executable, *cmd], cwd=checkout(), env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def prepare(folder: Path) -> Path:
    """The five held-out zeros as PNGs, encoded once with the default model's codec and text encoder."""
    from PIL import Image

    from tuneqdm_demo import data

    images = folder / "images"
    images.mkdir()
    for i, image in enumerate(data.subject_images()):
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(images / f"zero{i}.png")
    out = folder / "data.safetensors"
    _run(["-m", "tuneqdm_train", "encode", "--model", "default", "--data", str(images), "--caption",
          data.SUBJECT_PROMPT, "--out", str(out)])
    return out


def train(folder: Path, data: Path, name: str, processes: int, batch: int, streams: int, steps: int) -> dict:
    report = folder / f"{name}.json"
    args = ["train", "--model", "default", "--bits", "4", "--experts", str(EXPERTS), "--data", str(data),
            "--out", str(folder / f"{name}.safetensors"), "--steps", str(steps), "--batch-size", str(batch),
            "--streams", str(streams), "--report", str(report)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    _run([*launcher, "-m", "tuneqdm_train", *args])
    r = json.loads(report.read_text())
    later = r["step_seconds"][1:] or r["step_seconds"]
    sockets = [b for b in r["socket_bytes"] if b is not None]
    return {"run": name, "processes": processes, "batch_per_process": batch, "global_batch": processes * batch,
            "steps": r["steps_done"], "step_s": statistics.median(later), "first_step_s": r["step_seconds"][0],
            "payload_bytes_per_step": statistics.mean(r["payload_bytes"]),
            "socket_bytes_per_step": statistics.mean(sockets) if len(sockets) == len(r["payload_bytes"]) else None,
            "experts_per_step": statistics.mean(len(e) for e in r["experts"]),
            "scales_values": r["scales_values"], "scales_fp32_bytes": r["scales_fp32_bytes"],
            "scales_file_bytes": r.get("file_bytes")}


def sd15_scales(experts: int = EXPERTS) -> dict:
    """SD 1.5's scales from its layer shapes (a meta-device UNet): s_out per output and s_in per input
    channel of every Linear and Conv2d, per expert."""
    from .comfy_unet import sd15_unet

    model = sd15_unet(device="meta")
    per_expert = sum(m.out_features + m.in_features if isinstance(m, nn.Linear) else m.out_channels + m.in_channels
                     for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return {"experts": experts, "values": per_expert * experts, "fp32_bytes": 4 * per_expert * experts,
            "file_fp16_bytes": 2 * per_expert * experts, "bytes_per_drawn_expert": 4 * per_expert}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1, help="per process")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    b = args.batch_size
    with tempfile.TemporaryDirectory(prefix="tuneqdm-bench-distributed-") as tmp:
        folder = Path(tmp)
        data = prepare(folder)
        rows = []
        for name, processes, batch, streams in (("1 process, batch b", 1, b, 1), ("1 process, batch 2b", 1, 2 * b, 2),
                                                ("2 processes, batch b each", 2, b, 1)):
            print(f"[distributed] {name} (b = {b}), {args.steps} steps ...", file=sys.stderr, flush=True)
            rows.append(train(folder, data, name, processes, batch, streams, args.steps))
    sd15 = sd15_scales()
    if args.json:
        print(json.dumps({"rows": rows, "sd15_computed": sd15}, indent=1))
        return 0
    two = rows[-1]
    print(f"default model W4, {EXPERTS} experts: {two['scales_values']:,} scale values = {two['scales_fp32_bytes']:,} B "
          f"float32 (scales file {two['scales_file_bytes']:,} B)")
    print(f"{'run':28} {'global batch':>12} {'step (s)':>9} {'first (s)':>9} {'payload B/step':>15} "
          f"{'socket B/step':>14} {'experts/step':>12}")
    for r in rows:
        sockets = "-" if r["socket_bytes_per_step"] is None else f"{r['socket_bytes_per_step']:,.0f}"
        print(f"{r['run']:28} {r['global_batch']:>12} {r['step_s']:>9.3f} {r['first_step_s']:>9.3f} "
              f"{r['payload_bytes_per_step']:>15,.0f} {sockets:>14} {r['experts_per_step']:>12.2f}")
    print(f"2 processes exchange {two['payload_bytes_per_step'] / two['scales_fp32_bytes']:.2f}x the float32 scales per "
          f"step (each rank's payload); time per step 2 processes / 1 process at batch 2b: "
          f"{two['step_s'] / rows[1]['step_s']:.2f}")
    print(f"SD 1.5 (computed from its layer shapes, {sd15['experts']} experts): {sd15['values']:,} values, "
          f"{sd15['fp32_bytes']:,} B float32, {sd15['file_fp16_bytes']:,} B in a scales file; a step moves "
          f"{sd15['bytes_per_drawn_expert']:,} B per drawn expert")
    return 0
