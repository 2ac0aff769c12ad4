"""TuneQDM for ComfyUI: quantize a diffusion model to 4/8 bits, fine-tune only its separable,
timestep-routed quantization scales, and sample with the experts routed by timestep."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
