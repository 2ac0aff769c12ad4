"""Quantize UNet (TuneQDM), and the quantization options it shares with the quantize-on-load loaders."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..tuneqdm_core import QuantReport, TuneQDMConfig
from ..tuneqdm_core.errors import SettingError
from ..tuneqdm_core.routing import NUM_TRAIN_TIMESTEPS
from .family_defaults import AUTO
from .patcher import progress_callback, quantize_patcher

CATEGORY = "TuneQDM"
BITS = ("4", "8")
SCALE_MODES = ("s_out and s_in (TuneQDM)", "s_out only (PEQA)")
PER_CHANNEL = "per-channel"
AUTO_GROUP = "auto"
GROUP_SIZES = (AUTO_GROUP, PER_CHANNEL, "16", "32", "64", "128")
DEFAULT_GROUP = AUTO_GROUP


def quantize_options() -> list[io.Input]:
    """The inputs every quantizing node takes, in this order (saved workflows list widget values by position)."""
    return [
        io.Combo.Input("bits", options=list(BITS), default="4", tooltip="Weight bits. W4 packs two weights per byte."),
        io.Int.Input("experts", default=4, min=1, max=8,
                     tooltip=f"Timestep experts: the {NUM_TRAIN_TIMESTEPS} timesteps are split into this many equal intervals, each "
                             "with its own scales. 1 = no timestep experts."),
        io.Combo.Input("scales", options=list(SCALE_MODES), default=SCALE_MODES[0],
                       tooltip="Which scales training may change. PEQA (the baseline) trains s_out only, with 1 expert."),
        io.Combo.Input("s_in_init", options=["ones", "normal"], default="ones",
                       tooltip="Initial input-channel scales: all 1 (reference code) or N(1, 0.01) (paper)."),
        io.String.Input("keep_float", default=AUTO, multiline=False,
                        tooltip="Comma-separated layer-name patterns to leave in float, e.g. '*conv_in*, *out.2*'. "
                                "auto: the model family's default (SDXL, SD3, Flux, Wan: the timestep, text and "
                                "input embeddings and the final layer; SD 1.x/2.x: none, as in the method); it can "
                                "be combined with patterns ('auto, *attn2*'). Empty: quantize all. The report "
                                "lists what was kept."),
    ]


def quantize_optional() -> list[io.Input]:
    """Quantization inputs that are optional in the graph (a workflow saved before they existed gets the
    default): the group size of the frozen base steps."""
    return [
        io.Combo.Input("group_size", options=list(GROUP_SIZES), default=DEFAULT_GROUP, optional=True,
                       tooltip="Frozen base steps per group of this many input values, each group with its own step "
                               "and zero point fitted to minimise the weight error (as GGUF's blocks); the trainable "
                               "scales sit on top. auto: 16 at W4 (GGUF Q4_0's size, 0.8x its distance to the float "
                               "model), 32 at W8 (Q8_0's size). per-channel: one step per output channel (smaller, "
                               "less faithful at W4)."),
    ]


def _check_option(name: str, value: str, options: tuple[str, ...]) -> str:
    """ComfyUI 0.3.x validates a V3 combo's value only by its type, so an API prompt can send any string."""
    if value not in options:
        raise SettingError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


def group_size_of(option: str) -> int | None:
    """The config's group size for a widget value: None (auto) lets the config pick it for the bits."""
    if _check_option("group_size", option, GROUP_SIZES) == AUTO_GROUP:
        return None
    return 0 if option == PER_CHANNEL else int(option)


def config_from_options(bits: str, experts: int, scales: str, s_in_init: str, keep_float: str,
                        group_size: str = DEFAULT_GROUP) -> TuneQDMConfig:
    patterns = tuple(p.strip() for p in keep_float.split(",") if p.strip())
    return TuneQDMConfig(bits=int(_check_option("bits", bits, BITS)), experts=experts,
                         train_s_in=_check_option("scales", scales, SCALE_MODES) == SCALE_MODES[0],
                         s_in_init=s_in_init, keep_float=patterns, group_size=group_size_of(group_size))


def quantized_outputs(model_tooltip: str) -> list[io.Output]:
    """The outputs of every quantizing node: the MODEL and the quantization report."""
    return [io.Model.Output(display_name="model", tooltip=model_tooltip),
            io.String.Output(display_name="report",
                             tooltip="Layers converted and kept in float, weight bytes before and after.")]


def publish(report: QuantReport) -> str:
    text = report.summary()
    logging.info(text)
    return text


class QuantizeUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TuneQDMQuantizeUNet",
            display_name="Quantize UNet (TuneQDM)",
            category=CATEGORY,
            description=(
                "Quantizes every Linear/Conv2d of the diffusion model to 4 or 8 bits (a frozen step and zero point "
                "per group of 16 (W4) or 32 (W8) input values, fitted to the weights; or per output channel) and "
                "gives it trainable separable scales, one set per timestep expert. The input MODEL is left "
                "untouched, so the float model stays in memory beside the quantized one: to quantize a model file "
                "without ever holding it in float, use 'Load and Quantize Diffusion Model (TuneQDM)' instead. This "
                "node is for models other nodes have changed (LoRAs merged, patches)."),
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion model ComfyUI loads (SD 1.x, SDXL, SD3, Flux...). It "
                                                "stays in memory: 'Load and Quantize Diffusion Model' never loads "
                                                "the float model at all."),
                *quantize_options(),
                *quantize_optional(),
            ],
            outputs=quantized_outputs("A new quantized MODEL (the input is not modified)."),
        )

    @classmethod
    def execute(cls, model, bits, experts, scales, s_in_init, keep_float, group_size=DEFAULT_GROUP) -> io.NodeOutput:
        config = config_from_options(bits, experts, scales, s_in_init, keep_float, group_size)
        quantized, report = quantize_patcher(model, config, progress=progress_callback())
        return io.NodeOutput(quantized, publish(report))
