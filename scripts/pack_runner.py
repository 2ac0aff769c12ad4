"""Shared by the demo and the node-level benchmark: a real headless ComfyUI with the pack, the
random-weight SD1.5 files the tests use, and the pack's API workflows adapted to them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from assets import asset_cache_dir, install, output_files, write_sd15_unet, write_tiny_sd15_checkpoint  # noqa: E402,F401
from comfy_host import ComfyServer  # noqa: E402,F401


def workflow(name: str, ckpt: str, size: int, steps: int) -> dict:
    graph = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        if "steps" in inputs:
            inputs["steps"] = steps
    return graph


def texts(entry: dict) -> dict[str, str]:
    """node id -> text shown by PreviewAny nodes."""
    return {nid: "".join(out["text"]) for nid, out in entry.get("outputs", {}).items() if "text" in out}
