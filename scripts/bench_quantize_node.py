"""Quantize UNet (TuneQDM) on the full-size SD1.5 UNet (860M parameters, random weights) loaded by the
stock UNETLoader, in a real ComfyUI server: prints the node's time and the MODEL's weight bytes before
and after, for W8 and W4 (target: under 20 s, W4 at most 0.14 of the float32 bytes)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tuneqdm_fixtures.checkpoints import install, write_sd15_unet  # noqa: E402
from tuneqdm_fixtures.graph import texts  # noqa: E402
from tuneqdm_fixtures.paths import asset_cache_dir  # noqa: E402
from tuneqdm_fixtures.server import ComfyServer  # noqa: E402

FLOAT32_BYTES = 4 * 859_520_964


def main() -> int:
    asset = write_sd15_unet(asset_cache_dir() / "sd15_unet_full_fp16.safetensors", full_size=True)
    rows = []
    with ComfyServer() as server:
        name = install(asset.path, server.models_dir / "diffusion_models").name
        for bits in ("8", "4"):
            graph = {
                "1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
                "2": {"class_type": "TuneQDMQuantizeUNet", "inputs": {
                    "model": ["1", 0], "bits": bits, "experts": 4, "scales": "s_out and s_in (TuneQDM)",
                    "s_in_init": "ones", "keep_float": ""}},
                "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
            }
            report = texts(server.run(graph, timeout=900, check=True))["3"]
            m = re.search(r"quantized (\d+) layers in ([\d.]+) s; weights ([\d,]+) B -> ([\d,]+) B", report)
            layers, seconds, before, after = int(m[1]), float(m[2]), int(m[3].replace(",", "")), int(m[4].replace(",", ""))
            rows.append(dict(bits=int(bits), layers=layers, seconds=seconds, bytes_before=before, bytes_after=after,
                             ratio_to_float32=after / FLOAT32_BYTES))
    for r in rows:
        print(f"W{r['bits']}: {r['layers']} layers quantized in {r['seconds']:.1f} s; MODEL weights "
              f"{r['bytes_before']:,} B -> {r['bytes_after']:,} B = {r['ratio_to_float32']:.4f} of float32")
    w4 = next(r for r in rows if r["bits"] == 4)
    print(f"targets: W4 time < 20 s: {'met' if w4['seconds'] < 20 else 'MISSED'}; "
          f"W4 bytes <= 0.14 of float32: {'met' if w4['ratio_to_float32'] <= 0.14 else 'MISSED'}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
