"""ComfyUI nodes of the TuneQDM pack (V3 schema): thin wrappers around tuneqdm_core."""
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

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

NODES: tuple[type[io.ComfyNode], ...] = (
    QuantizeUNet,
    LoadQuantizeDiffusionModel,
    LoadQuantizeCheckpoint,
    SaveQuantizedUNet,
    LoadQuantizedUNet,
    SaveScales,
    LoadScales,
    ExpertRoutedSampler,
    TrainScales,
    LoadDefaultModel,
    DefaultTextEncode,
    DefaultSubjectImages,
)


class TuneQDMExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> TuneQDMExtension:
    return TuneQDMExtension()
