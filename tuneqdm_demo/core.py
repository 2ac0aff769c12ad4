"""What the demo uses of the core library, from the copy of it beside this package: `<pack>.tuneqdm_core`
when ComfyUI loads the pack as a package (its demo nodes import this package from there), top-level
`tuneqdm_core` when the checkout's tests, scripts and benchmarks import both from the repository root.
A model quantized by one copy is recognised only by that copy's classes, so the demo never mixes them."""
from __future__ import annotations

if "." in __package__:
    from ..tuneqdm_core.fileio import FORMAT_VERSION, atomic_save, digest, read_verified
    from ..tuneqdm_core.model import get_router, is_quantized
    from ..tuneqdm_core.routing import LAST_TIMESTEP, NUM_TRAIN_TIMESTEPS
else:
    from tuneqdm_core.fileio import FORMAT_VERSION, atomic_save, digest, read_verified
    from tuneqdm_core.model import get_router, is_quantized
    from tuneqdm_core.routing import LAST_TIMESTEP, NUM_TRAIN_TIMESTEPS

__all__ = ["FORMAT_VERSION", "LAST_TIMESTEP", "NUM_TRAIN_TIMESTEPS", "atomic_save", "digest", "get_router", "is_quantized",
           "read_verified"]
