"""TuneQDM core: quantized diffusion layers with separable, timestep-routed scales. Plain torch; never
imports ComfyUI (the pack's nodes wrap it)."""
from .config import TuneQDMConfig
from .errors import FileFormatError, ModelMismatchError, RoutingError, TuneQDMError
from .fileio import (load_quantized_model, load_scales, read_quantized_model, save_quantized_model,
                     save_scales)
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .model import (QuantReport, fingerprint, get_router, is_quantized, model_config, quantize_model,
                    own_tensors, quantized_layers, structural_copy, tensor_bytes,
                    torch_layer_kind)
from .optim import ExpertAdamW
from .quant import QuantizedWeight, dequantize, pack, quantize_weight, unpack
from .routing import (NUM_TRAIN_TIMESTEPS, ExpertRouter, RoutingLog, RoutingPolicy, expert_of_timestep,
                      uniform_boundaries)
from .scales import ScaleSet, check_compatible, scales_of, trainable

__all__ = [
    "TuneQDMConfig", "FileFormatError", "ModelMismatchError", "RoutingError", "TuneQDMError",
    "load_quantized_model", "load_scales", "read_quantized_model", "save_quantized_model", "save_scales",
    "QuantConv2d", "QuantLayer", "QuantLinear", "QuantReport", "fingerprint", "get_router", "is_quantized",
    "model_config", "own_tensors", "quantize_model", "quantized_layers", "structural_copy", "tensor_bytes",
    "torch_layer_kind", "ExpertAdamW",
    "QuantizedWeight", "dequantize", "pack", "quantize_weight", "unpack", "NUM_TRAIN_TIMESTEPS", "ExpertRouter",
    "RoutingLog", "RoutingPolicy", "expert_of_timestep", "uniform_boundaries", "ScaleSet", "check_compatible", "scales_of", "trainable",
]
