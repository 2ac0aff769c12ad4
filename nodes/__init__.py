"""ComfyUI nodes of the TuneQDM pack: thin wrappers around tuneqdm_core."""
from . import folders
from .default_nodes import DefaultSubjectImages, DefaultTextEncode, LoadDefaultModel
from .file_nodes import LoadQuantizedUNet, LoadScales, SaveQuantizedUNet, SaveScales
from .quantize_node import QuantizeUNet
from .sampler_node import ExpertRoutedSampler
from .train_node import TrainScales

folders.register()

NODE_CLASS_MAPPINGS = {
    "TuneQDMQuantizeUNet": QuantizeUNet,
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
