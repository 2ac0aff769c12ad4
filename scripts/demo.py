"""The README's first command: set up (done by `make demo`), start a headless ComfyUI with the pack,
run the pack's workflows end to end, and leave images and a report in out/demo-<time>/.

Until the pack's embedded default model lands, the model is a random-weight SD1.5-architecture
checkpoint (a one-level UNet with the full CLIP-L and VAE): every step is the real pipeline, the
images are noise."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pack_runner import (REPO, ComfyServer, adapted_workflow, asset_cache_dir, install, output_files, texts,
                         write_tiny_sd15_checkpoint)

SIZE, STEPS = 256, 12


def write_subject_images(folder: Path) -> None:
    """The train_subject workflow's three subject pictures: a bright disc, moved and recoloured."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(3):
        img = np.full((SIZE, SIZE, 3), 30, np.uint8)
        img[(yy - SIZE // 2 - 8 * i) ** 2 + (xx - SIZE // 2 + 10 * i) ** 2 < (SIZE // 4 + 6 * i) ** 2] = (230, 170 - 30 * i, 60)
        Image.fromarray(img).save(folder / f"subject_{i}.png")


def main() -> int:
    out = REPO / "out" / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    print(f"[demo] writing the random-weight SD1.5 checkpoint (cached after the first run) ...", flush=True)
    asset = write_tiny_sd15_checkpoint(asset_cache_dir() / "tiny_sd15.safetensors")
    report = [f"# TuneQDM demo ({time.strftime('%Y-%m-%d %H:%M')})", "",
              "Model: random-weight SD1.5-architecture checkpoint (outputs are noise; the pipeline is real).", ""]
    with ComfyServer() as server:
        print(f"[demo] ComfyUI running at {server.url}", flush=True)
        ckpt = install(asset.path, server.models_dir / "checkpoints").name
        write_subject_images(server.input_dir)
        for name in ("quantize_and_sample", "load_quantized_and_scales", "float_vs_w8_vs_w4", "train_subject"):
            print(f"[demo] running workflows/api/{name}.json ...", flush=True)
            start = time.perf_counter()
            entry = server.run(adapted_workflow(name, ckpt, SIZE, STEPS), timeout=900, check=True)
            seconds = time.perf_counter() - start
            report += [f"## {name} ({seconds:.1f} s)", ""]
            for path in output_files(entry, server.output_dir):
                target = out / f"{name}_{path.name}"
                shutil.copyfile(path, target)
                report.append(f"- image: {target.name}")
            for text in texts(entry).values():
                report += ["", "```", text, "```"]
            report.append("")
        # The server's folders are temporary: keep the quantized UNet and the scales it wrote.
        shutil.copytree(server.models_dir / "tuneqdm", out / "tuneqdm")
        report.append("Quantized UNet and scales files (models/tuneqdm/ of the demo server) copied to tuneqdm/.")
    (out / "report.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"[demo] done: images and report in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
