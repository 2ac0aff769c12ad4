"""TuneQDM for ComfyUI: quantize a diffusion model to 4/8 bits, fine-tune only its separable,
timestep-routed quantization scales, and sample with the experts routed by timestep."""
import importlib.util

# Inside ComfyUI `folder_paths` is always importable. Outside it (pytest imports a rootdir package's
# __init__.py while collecting the tests) there is nothing to register, and the nodes must not load.
# ComfyUI registers the nodes through comfy_entrypoint (V3); it would take a NODE_CLASS_MAPPINGS instead,
# so the package defines none.
if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
