"""ComfyUI nodes of the TuneQDM pack: thin wrappers around tuneqdm_core."""
from . import default_model, folders, rope_grad
from .default_nodes import DefaultSubjectImages, DefaultTextEncode, LoadDefaultModel
from .file_nodes import LoadQuantizedUNet, LoadScales, SaveQuantizedUNet, SaveScales
from .loader_nodes import LoadQuantizeCheckpoint, LoadQuantizeDiffusionModel
from .quantize_node import QuantizeUNet
from .sampler_node import ExpertRoutedSampler
from .train_node import TrainScales

folders.register()
default_model.register_detection()
# Training through Flux and Wan on ComfyUI 0.8 needs a backward for comfy_kitchen's RoPE ops.
rope_grad.register()

NODE_CLASS_MAPPINGS = {
    "TuneQDMQuantizeUNet": QuantizeUNet,
    "TuneQDMLoadQuantizeDiffusionModel": LoadQuantizeDiffusionModel,
    "TuneQDMLoadQuantizeCheckpoint": LoadQuantizeCheckpoint,
    "TuneQDMSaveQuantizedUNet": SaveQuantizedUNet,
    "TuneQDMLoadQuantizedUNet": LoadQuantizedUNet,
    "TuneQDMSaveScales": SaveScales,
    "TuneQDMLoadScales": LoadScales,
    "TuneQDMExpertRoutedSampler": ExpertRoutedSampler,
    "TuneQDMTrainScales": TrainScales,
    "TuneQDMLoadDefaultModel": LoadDefaultModel,
    "TuneQDMDefaultTextEncode": DefaultTextEncode,
    "TuneQDMDefaultSubjectImages": DefaultSubjectImages,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TuneQDMQuantizeUNet": "Quantize UNet (TuneQDM)",
    "TuneQDMLoadQuantizeDiffusionModel": "Load and Quantize Diffusion Model (TuneQDM)",
    "TuneQDMLoadQuantizeCheckpoint": "Load and Quantize Checkpoint UNet (TuneQDM)",
    "TuneQDMSaveQuantizedUNet": "Save Quantized UNet (TuneQDM)",
    "TuneQDMLoadQuantizedUNet": "Load Quantized UNet (TuneQDM)",
    "TuneQDMSaveScales": "Save Scales (TuneQDM)",
    "TuneQDMLoadScales": "Load Scales (TuneQDM)",
    "TuneQDMExpertRoutedSampler": "Expert-Routed Sampler (TuneQDM)",
    "TuneQDMTrainScales": "Train TuneQDM Scales",
    "TuneQDMLoadDefaultModel": "Load Default Digits Model (TuneQDM demo)",
    "TuneQDMDefaultTextEncode": "Default Text Encode (TuneQDM demo)",
    "TuneQDMDefaultSubjectImages": "Default Subject Images (TuneQDM demo)",
}
