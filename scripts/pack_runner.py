"""Shared by the demo and the node-level benchmark: a real headless ComfyUI with the pack (the test
host), the random-weight SD1.5 files the tests use, and the pack's API workflows adapted to them."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from assets import (adapted_workflow, asset_cache_dir, install, output_files, read_images,  # noqa: E402,F401
                    write_sd15_unet, write_tiny_sd15_checkpoint)
from comfy_host import ComfyServer  # noqa: E402,F401


def texts(entry: dict) -> dict[str, str]:
    """node id -> text shown by PreviewAny nodes."""
    return {nid: "".join(out["text"]) for nid, out in entry.get("outputs", {}).items() if "text" in out}
