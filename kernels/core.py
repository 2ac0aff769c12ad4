"""The parts of tuneqdm_core the kernels build on (its errors, the packed layout), found the way
tuneqdm_core finds the kernels: relative when the repo is imported as a package (inside ComfyUI),
top-level when the repo root is on sys.path (tests, scripts)."""
from __future__ import annotations

try:
    from ..tuneqdm_core import errors, packing
except ImportError:
    if "." in (__package__ or ""):
        raise  # inside the pack's package: the pack's own core failed, report that
    from tuneqdm_core import errors, packing  # type: ignore[no-redef]

__all__ = ["errors", "packing"]
