"""TuneQDM for ComfyUI: quantize a diffusion model to 4/8 bits, fine-tune only its separable,
timestep-routed quantization scales, and sample with the experts routed by timestep."""
import importlib.util

# Inside ComfyUI `folder_paths` is always importable. Outside it (pytest imports a rootdir package's
# __init__.py while collecting the tests) there is nothing to register, and the nodes must not load.
if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
