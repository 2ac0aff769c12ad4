#!/usr/bin/env python3
"""Regenerates example_workflows/<name>.jpg, the thumbnail ComfyUI's templates dialog shows for each
example workflow: the workflow opened from the templates menu in ComfyUI's own page (headless
Chromium), the whole graph in view, cropped and fitted into a square.

    python scripts/thumbnails.py --server http://127.0.0.1:8188   # a running ComfyUI with this pack
    python scripts/thumbnails.py --start                          # a throwaway server of this checkout

Frontend 1.35 asks for `/api/workflow_templates/<pack folder>/<name>.jpg` (a custom node's templates
are always "image", "jpg"), and ComfyUI serves that from the pack's example_workflows/ folder.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tuneqdm_fixtures.browser import ComfyPage, browser_missing  # noqa: E402
from tuneqdm_fixtures.server import PACK_FOLDER  # noqa: E402

WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
SIDE = 480  # pixels; the dialog shows the thumbnail in a card about 240 px wide, twice that for sharp screens
QUALITY = 82


def thumbnail(png: bytes, box: tuple[int, int, int, int], side: int = SIDE) -> Image.Image:
    """The graph's box of a screenshot, scaled to fit a side x side square on the canvas's colour."""
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    left, top, right, bottom = box
    graph = shot.crop((left, top, min(right, shot.width), min(bottom, shot.height)))
    graph.thumbnail((side, side), Image.LANCZOS)
    square = Image.new("RGB", (side, side), shot.getpixel((left + 2, bottom - 2 if bottom < shot.height else top + 2)))
    square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
    return square


def write_jpeg(image: Image.Image, path: Path) -> None:
    """Written atomically: a half-written thumbnail is never served."""
    tmp = path.with_name(path.name + ".partial")
    image.save(tmp, "JPEG", quality=QUALITY, optimize=True, progressive=True)
    os.replace(tmp, path)


def render_all(url: str, names: list[str], out_dir: Path) -> None:
    with ComfyPage(url) as page:
        for name in names:
            page.open_template(PACK_FOLDER, name)
            png, box = page.screenshot_graph()
            path = out_dir / f"{name}.jpg"
            write_jpeg(thumbnail(png, box), path)
            print(f"wrote       {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path} "
                  f"({path.stat().st_size // 1024} KB)")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", metavar="URL", help="a running ComfyUI with this pack loaded as "
                        f"custom_nodes/{PACK_FOLDER}")
    source.add_argument("--start", action="store_true",
                        help="start a throwaway ComfyUI from this checkout's .comfyui host")
    parser.add_argument("names", nargs="*", help="workflow names (default: every example workflow)")
    args = parser.parse_args(None if argv is None else list(argv))
    reason = browser_missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    names = args.names or sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    if args.server:
        render_all(args.server, names, WORKFLOWS_DIR)
        return 0
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: CPU-only host
    from tuneqdm_fixtures.server import ComfyServer  # noqa: E402
    with ComfyServer() as server:
        render_all(server.url, names, WORKFLOWS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
