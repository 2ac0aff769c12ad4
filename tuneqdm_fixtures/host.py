"""The checkout's ComfyUI host imported as a library (CPU mode), for what builds ComfyUI's own model
classes outside a server: the checkpoint generators, the benchmarks, the default model's training, and
the pack loaded the way ComfyUI loads it."""
from __future__ import annotations

import sys
from types import ModuleType

from .paths import host_dir


def import_comfy() -> ModuleType:
    """Makes the host (`paths.host_dir()`) importable in CPU mode and returns the `comfy` package."""
    comfy_dir = host_dir()
    if str(comfy_dir) not in sys.path:
        if not (comfy_dir / "comfy").is_dir():
            raise FileNotFoundError(f"{comfy_dir}/comfy missing: run `make setup` first")
        # Appended: the host's top-level `nodes.py`, `utils/`, `server.py` must not shadow the pack's own
        # `nodes/` package or anything else; `comfy` and `node_helpers` exist nowhere else.
        sys.path.append(str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported: it picks the device then
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel
    import comfy.model_detection
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    return comfy


def import_pack() -> ModuleType:
    """The pack imported as ComfyUI imports it (package `tuneqdm_pack`, whose `nodes` import ComfyUI), after
    `import_comfy`: the headless trainer's own loader, so tests and trainer share one copy of its classes."""
    import_comfy()
    from tuneqdm_train.sources import pack

    return pack()


def host_version() -> tuple[int, ...]:
    """The host's version from its comfyui_version.py, e.g. (0, 8, 0)."""
    text = (host_dir() / "comfyui_version.py").read_text()
    value = text.split("=", 1)[1].strip().strip("\"'")
    return tuple(int(p) for p in value.split(".")[:3])
