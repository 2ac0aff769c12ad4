"""Demo nodes for the embedded default model (category TuneQDM/demo): load it, encode its prompts, and
give the held-out subject's five images. Everything else in a demo graph is the pack's real nodes and
ComfyUI's stock ones (EmptyLatentImage, KSampler, VAEDecode, SaveImage)."""
from __future__ import annotations

from comfy_api.latest import io

from ..tuneqdm_demo import data
from .default_model import TEXT_ENCODER_TYPE, UNET_FILE, DefaultTextEncoder, PixelVAE, load_model
from .file_fingerprint import fingerprint_or_nan

CATEGORY = "TuneQDM/demo"
TextEncoder = io.Custom(TEXT_ENCODER_TYPE)


class LoadDefaultModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMLoadDefaultModel",
            display_name="Load Default Digits Model (TuneQDM demo)",
            category=CATEGORY,
            description=("The pack's embedded default: a 1.9M-parameter SD1.5-family UNet trained on scikit-learn's "
                         "handwritten digits except zeros (the held-out subject), its MiniLM text encoder, and a "
                         "pixel codec in the VAE's place. Sample it at 64x64."),
            inputs=[],
            outputs=[io.Model.Output(display_name="model", tooltip="The float UNet."),
                     TextEncoder.Output(display_name="text_encoder", tooltip="Wire into Default Text Encode."),
                     io.Vae.Output(display_name="vae",
                                   tooltip="Encodes images to latents and back (stock VAEEncode / VAEDecode).")],
        )

    @classmethod
    def fingerprint_inputs(cls, **_) -> str | float:
        return fingerprint_or_nan(lambda: str(UNET_FILE))  # the demo's training script may rewrite it

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(load_model(), DefaultTextEncoder(), PixelVAE())


class DefaultTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMDefaultTextEncode",
            display_name="Default Text Encode (TuneQDM demo)",
            category=CATEGORY,
            description="Encodes a prompt for the default model, e.g. 'a handwritten digit seven' or 'a sks digit'.",
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="The text encoder of Load Default Digits Model."),
                io.String.Input("text", multiline=True, default=data.SUBJECT_PROMPT, dynamic_prompts=True,
                                tooltip="The prompt: 'a handwritten digit <name>' for digits 1-9, 'a sks digit' "
                                        "for the subject once trained, empty for the negative."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING", tooltip="The prompt's conditioning.")],
        )

    @classmethod
    def execute(cls, text_encoder, text) -> io.NodeOutput:
        return io.NodeOutput(text_encoder.conditioning(text))


class DefaultSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMDefaultSubjectImages",
            display_name="Default Subject Images (TuneQDM demo)",
            category=CATEGORY,
            description=(f"The held-out subject: the first {data.SUBJECT_IMAGES} handwritten "
                         f"{data.NAMES[data.SUBJECT_CLASS]}s of the digits set, which the default model never saw."),
            inputs=[],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The subject's images, one batch.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(data.subject_images())
