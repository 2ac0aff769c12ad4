"""Quantize-on-load keeps its memory promise on the full-size SD1.5 UNet (1.7 GB fp16 file): the load's peak
stays under the W4 model's own size, plus one largest float layer (in fp32, and as read from the file),
plus a fixed margin for the allocator and the per-layer temporaries of quantizing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneqdm_fixtures.checkpoints import cached_sd15_unet

MARGIN = 256 * 2**20


@pytest.mark.skipif(os.environ.get("TUNEQDM_FULL_SIZE") != "1",
                    reason="set TUNEQDM_FULL_SIZE=1 (writes a 1.7 GB file once; the load takes about a minute)")
def test_full_size_load_peak_stays_under_the_quantized_model_plus_one_layer():
    full = cached_sd15_unet(full_size=True)
    probe = Path(__file__).with_name("quantize_on_load_probe.py")
    out = subprocess.run([sys.executable, str(probe), str(full), "4"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    bound = r["model_bytes"] + r["largest_weight_numel"] * (4 + 2) + MARGIN
    print(f"\nfull-size SD1.5 W4 quantize-on-load: peak {r['peak_above_baseline'] / 2**20:.0f} MiB above baseline, "
          f"model {r['model_bytes'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, {r['seconds']:.1f} s")
    assert r["layers"] > 200
    assert r["peak_above_baseline"] <= bound
