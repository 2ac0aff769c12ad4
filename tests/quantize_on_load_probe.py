"""Run as a script: loads FILE with the pack's quantize-on-load path in this fresh process and prints, as JSON,
the peak anonymous memory above the baseline taken just before loading, the quantized model's bytes and the
largest float layer the file holds. Anonymous memory (RssAnon) is what the process holds; the file's own
pages are never mapped by the loader."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(path: str, bits: int) -> None:
    from tuneqdm_fixtures.host import import_pack

    import_pack()
    from tuneqdm_pack.nodes.quantize_on_load import load_quantized
    from tuneqdm_pack.tuneqdm_core import TuneQDMConfig, tensor_bytes
    from tuneqdm_pack.tuneqdm_core.lazy_file import LazyFile
    from tuneqdm_pack.tuneqdm_core.heap import release_freed_memory

    file = LazyFile(path)
    largest = max(t.numel() for k, t in file.items() if k.endswith(".weight"))
    release_freed_memory()
    baseline = peak = rss_anon()
    done = False

    def watch() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, rss_anon())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    model, report = load_quantized(path, TuneQDMConfig(bits=bits, experts=4))
    seconds = time.perf_counter() - start
    done = True
    watcher.join()
    peak = max(peak, rss_anon())
    print(json.dumps({"peak_above_baseline": peak - baseline, "model_bytes": tensor_bytes(model.model),
                      "largest_weight_numel": largest, "layers": len(report.converted), "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
